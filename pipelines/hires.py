"""A1111's "hires fix": txt2img at the base size, then an img2img pass at a larger size.

The first pass's latents are upscaled in latent space (``Latent`` modes: ``F.interpolate`` with
A1111's modes) or decoded, resized with Pillow (``Lanczos``, ``Nearest``) and encoded again; the
second pass is exactly an ``img2img`` call on that upscaled result with the image's own seed, so
it can be repeated on its own. Sizes follow A1111: ``scale`` times the base size, or
``resize_x``/``resize_y`` (one of them keeps the aspect ratio; both: scale to cover, then crop the
middle).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .validate import check_number

# A1111's latent upscalers: name → (interpolation mode, antialias)
LATENT_MODES = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                "Latent (bicubic)": ("bicubic", False),
                "Latent (bicubic antialiased)": ("bicubic", True),
                "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
PIXEL_MODES = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS = tuple(LATENT_MODES) + tuple(PIXEL_MODES)


@dataclass(frozen=True)
class HiresFix:
    """The second pass. ``steps`` 0 = the first pass's; ``sampler``/``prompt``/``negative_prompt``
    None = the first pass's."""

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "Latent"
    denoising_strength: float = 0.7
    steps: int = 0
    sampler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    def __post_init__(self):
        check_number(self.scale, "hires scale", 1, 8)
        check_number(self.resize_x, "hires resize_x", 0, integer=True)
        check_number(self.resize_y, "hires resize_y", 0, integer=True)
        check_number(self.denoising_strength, "hires denoising_strength", 0, 1)
        check_number(self.steps, "hires steps", 0, integer=True)
        if self.upscaler not in UPSCALERS:
            raise ValueError(f"hires upscaler must be one of {', '.join(UPSCALERS)}, "
                             f"got {self.upscaler!r}")
        if self.sampler is not None:
            from .schedulers import check_name

            check_name(self.sampler)

    def sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((upscaled w, h), (final w, h)) for a base size, multiples of 8 (A1111's rule)."""
        if not self.resize_x and not self.resize_y:
            up = (int(width * self.scale), int(height * self.scale))
            final = up
        elif not self.resize_y:
            up = final = (self.resize_x, self.resize_x * height // width)
        elif not self.resize_x:
            up = final = (self.resize_y * width // height, self.resize_y)
        else:
            final = (self.resize_x, self.resize_y)
            if width / height < self.resize_x / self.resize_y:
                up = (self.resize_x, self.resize_x * height // width)
            else:
                up = (self.resize_y * width // height, self.resize_y)
        up, final = tuple(v - v % 8 for v in up), tuple(v - v % 8 for v in final)
        if min(final) < 8:
            raise ValueError(f"hires size {final[0]}x{final[1]} is too small")
        return up, final


def _crop_middle(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


def upscale_latents(latents: torch.Tensor, hires: HiresFix, up, final, f: int) -> torch.Tensor:
    mode, antialias = LATENT_MODES[hires.upscaler]
    out = F.interpolate(latents.float(), size=(up[1] // f, up[0] // f), mode=mode,
                        antialias=antialias)
    return _crop_middle(out, final[1] // f, final[0] // f).to(latents.dtype)


def upscale_image(image: Image.Image, hires: HiresFix, up, final) -> Image.Image:
    big = image.resize(up, PIXEL_MODES[hires.upscaler])
    left, top = (up[0] - final[0]) // 2, (up[1] - final[1]) // 2
    return big.crop((left, top, left + final[0], top + final[1]))


def run_hires(pipe, request):
    """Both passes of a txt2img request with ``hires`` set; returns the second pass's result with
    the first pass's seeds and A1111's hires fields in the parameters."""
    import dataclasses

    hires = request.hires
    if request.generator is not None:
        raise ValueError("hires fix needs seed= (each image's second pass uses its own seed)")
    first = pipe._generate(request.replace(hires=None, output_type="latent", return_latents=True))
    base = first.parameters[0]
    if first.interrupted:
        return pipe._finish_latents(request, first)
    up, final = hires.sizes(base["width"], base["height"])
    second = dict(strength=hires.denoising_strength, num_inference_steps=hires.steps or base["steps"],
                  scheduler=hires.sampler or base["sampler"], guidance_scale=base["cfg_scale"],
                  guidance_rescale=request.guidance_rescale, eta=request.eta,
                  clip_skip=request.clip_skip, output_type=request.output_type,
                  return_latents=request.return_latents, callback=request.callback,
                  progress=request.progress, control=request.control)
    prompts = request.prompt if hires.prompt is None else hires.prompt
    negatives = request.negative_prompt if hires.negative_prompt is None else hires.negative_prompt
    if hires.upscaler in LATENT_MODES:
        f = pipe.model.config.autoencoder.downscale
        latents = upscale_latents(first.latents, hires, up, final, f)
        result = pipe.img2img(list(prompts) if not isinstance(prompts, str) else prompts, latents,
                              negative_prompt=_negatives(negatives), seed=first.seeds[0],
                              num_images=request.num_images, **second)
        images, out_latents, interrupted = result.images, result.latents, result.interrupted
    else:  # decode, resize, and one img2img call per image with its seed
        decoded = pipe._finish_latents(request.replace(output_type="pil"), first).images
        n = request.num_images
        parts = []
        for i, image in enumerate(decoded):
            prompt = prompts if isinstance(prompts, str) else prompts[i // n]
            negative = negatives if isinstance(negatives, str) else negatives[i // n]
            parts.append(pipe.img2img(prompt, upscale_image(image, hires, up, final),
                                      negative_prompt=negative, seed=first.seeds[i], **second))
        images = [im for part in parts for im in part.images]
        latents = [part.latents for part in parts if part.latents is not None]
        out_latents = torch.cat(latents) if latents else None
        interrupted = any(part.interrupted for part in parts)
    params = [dict(p, strength=hires.denoising_strength, **hires_fields(hires)) for p in first.parameters]
    return dataclasses.replace(first, images=images, latents=out_latents, parameters=params,
                               interrupted=interrupted)


def _negatives(value):
    return value if isinstance(value, str) else list(value)


def hires_fields(hires: HiresFix) -> dict:
    """The PNG parameters A1111 writes for the second pass."""
    out = {"Hires upscaler": hires.upscaler}
    if hires.resize_x or hires.resize_y:
        out["Hires resize"] = f"{hires.resize_x}x{hires.resize_y}"
    else:
        out["Hires upscale"] = f"{hires.scale:g}"
    if hires.steps:
        out["Hires steps"] = str(hires.steps)
    if hires.sampler:
        from .images import SAMPLER_NAMES

        out["Hires sampler"] = SAMPLER_NAMES.get(hires.sampler, hires.sampler)
    if hires.prompt is not None:
        out["Hires prompt"] = hires.prompt if isinstance(hires.prompt, str) else hires.prompt[0]
    if hires.negative_prompt is not None:
        out["Hires negative prompt"] = hires.negative_prompt if isinstance(
            hires.negative_prompt, str) else hires.negative_prompt[0]
    return out
