"""The generation request: everything one ``txt2img``, ``img2img`` or ``inpaint`` call asks for, as
one frozen value that is checked when it is made.

Its fields are the entry points' parameters, so a caller (Python, the command line, a server) can
build, store and replay a request. What only the model can tell (its default steps, guidance and
scheduler, its image size, how many text-encoder blocks may be skipped) is filled in or checked by
the pipeline, with :meth:`GenerationRequest.replace`. Conditioning that other model families or
control networks add becomes new fields here, not new keyword arguments.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from . import preprocess as pre, schedulers
from .control import as_units
from .sdxl import SizeConditioning
from .validate import check_number

MODES = ("txt2img", "img2img", "inpaint")
OUTPUT_TYPES = ("pil", "latent")
INPAINTING_FILLS = ("original", "latent_noise", "latent_nothing")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds


# What each field means, for the entry points' docstrings (and any other front end).
PARAMETERS = {
    "prompt": "what to draw: a string, or a list of strings (one batch entry each); A1111 "
              "emphasis such as (word:1.3) and BREAK are understood",
    "image": "the starting picture (PIL); the result has its size rounded down to a multiple of 8, "
             "except inpainting, which returns the input's own size. img2img also takes latents "
             "(a (1 or batch, 4, h, w) tensor in the model's scaled latent space), as diffusers does",
    "hires": "txt2img: a second pass at a larger size (A1111's hires fix), a "
             "pipelines.hires.HiresFix; None = one pass",
    "mask": "PIL image, white = repaint, black = keep; resized to the image if its size differs",
    "strength": "how much to change the image, 0 to 1: only the last int(steps·strength) "
                "timesteps run (diffusers' rule)",
    "mask_blur": "soften the mask edge by this many pixels (Gaussian blur)",
    "inpainting_fill": 'what the masked area starts from below strength 1 (A1111\'s "masked '
                       'content"): "original", "latent_noise" (the seed\'s noise) or "latent_nothing" '
                       '(zero latents)',
    "negative_prompt": 'what to steer away from ("" = the empty prompt), one, or one per prompt',
    "num_inference_steps": "scheduler steps; None: the model config's sampling section, else 25",
    "guidance_scale": "classifier-free guidance g; 1 turns the unconditional pass off; None: the "
                      "model config's, else 7.5",
    "scheduler": "a name from pipelines.schedulers.SCHEDULERS; None: the model config's, "
                 "else dpmpp_2m",
    "guidance_rescale": "φ of Lin et al. 2023 §3.4 (0 = off; 0.7 suggested for v-models)",
    "seed": "image i uses Generator('cpu').manual_seed(seed + i); None: a random seed",
    "generator": "explicit torch.Generator(s), as diffusers takes them (not with seed)",
    "height": "a multiple of 8; default: the model's size (txt2img) or the image's",
    "width": "a multiple of 8; default: the model's size (txt2img) or the image's",
    "num_images": "images per prompt; a list of prompts gives len(prompts)·num_images",
    "eta": "DDIM's η (0 = deterministic); ignored by other schedulers",
    "clip_skip": "text-encoder blocks to skip at the end (0 = as trained)",
    "output_type": '"pil", or "latent" for no decode',
    "return_latents": "keep the final latents in the result along with the images",
    "callback": "callback(i, total, latents) after each step; returning False stops",
    "progress": "show a progress bar",
    "subseed": "variation seed (A1111): image i's noise is interpolated towards that of subseed + i; "
               "None with a strength: a random one",
    "subseed_strength": "how far towards the variation seed's noise, 0 to 1 (A1111's slerp)",
    "seed_resize_from_h": "draw the seed's noise as for this height (pixels) and paste it centred "
                          "(0 = off), keeping a composition when the size changes",
    "seed_resize_from_w": "the width for seed_resize_from_h",
    "denoising_end": "txt2img/img2img: stop when this fraction of the training schedule is denoised "
                     "(diffusers' denoising_end; hand the latents to a refiner); None: run to the end",
    "denoising_start": "img2img: continue another pipeline's latents from this fraction of the "
                       "schedule, adding no noise (diffusers' denoising_start; strength is unused)",
    "control": "ControlNet unit(s): pipelines.control.ControlUnit (model, hint image, weight, "
               "guidance start/end, control and resize mode, preprocessor); their residuals add up",
    "sdxl": "SDXL's size, crop and aesthetic-score conditioning: a pipelines.sdxl.SizeConditioning "
            "or a dict of its fields; None: diffusers' defaults (the output size, crop (0, 0), "
            "scores 6.0 / 2.5)",
}


@dataclass(frozen=True)
class GenerationRequest:
    """One generation; :data:`PARAMETERS` says what each field means.
    ``prompt`` and ``negative_prompt`` are kept as tuples of equal length (a single negative
    prompt applies to every prompt); ``None`` settings are the model's to choose."""

    mode: str
    prompt: str | tuple[str, ...]
    negative_prompt: str | tuple[str, ...] = ""
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    guidance_rescale: float = 0.0
    seed: int | None = None
    generator: torch.Generator | list[torch.Generator] | None = None
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    eta: float = 0.0
    clip_skip: int = 0
    image: Image.Image | None = None  # img2img / inpaint
    strength: float = 1.0
    mask: Image.Image | None = None  # inpaint
    mask_blur: int = 0
    inpainting_fill: str = "original"  # inpaint
    output_type: str = "pil"
    return_latents: bool = False
    callback: Callable | None = None
    progress: bool = True
    control: tuple = ()  # pipelines.control.ControlUnit, normalised to a tuple
    subseed: int | None = None
    subseed_strength: float = 0.0
    seed_resize_from_h: int = 0
    seed_resize_from_w: int = 0
    hires: object | None = None  # pipelines.hires.HiresFix
    denoising_end: float | None = None
    denoising_start: float | None = None
    sdxl: SizeConditioning | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        prompts = _as_prompts(self.prompt, "prompt")
        negatives = _as_prompts(self.negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        elif len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
        object.__setattr__(self, "prompt", prompts)  # normalised once; frozen from here on
        object.__setattr__(self, "negative_prompt", negatives)
        self._check_numbers()
        self._check_images()
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, "
                             f"got {self.output_type!r}")
        if self.callback is not None and not callable(self.callback):
            raise ValueError("callback must be callable as callback(step, total, latents)")
        self._check_randomness()
        object.__setattr__(self, "control", as_units(self.control))
        if isinstance(self.sdxl, dict):
            object.__setattr__(self, "sdxl", SizeConditioning(**self.sdxl))
        elif self.sdxl is not None and not isinstance(self.sdxl, SizeConditioning):
            raise ValueError(f"sdxl must be a pipelines.sdxl.SizeConditioning or a dict of its "
                             f"fields, got {type(self.sdxl).__name__}")

    def _check_numbers(self) -> None:
        if self.num_inference_steps is not None:
            check_number(self.num_inference_steps, "num_inference_steps", 1, integer=True)
        check_number(self.num_images, "num_images", 1, integer=True)
        if self.guidance_scale is not None:
            check_number(self.guidance_scale, "guidance_scale")
        check_number(self.guidance_rescale, "guidance_rescale", 0, 1)
        check_number(self.eta, "eta", 0)
        check_number(self.strength, "strength", 0, 1)
        check_number(self.clip_skip, "clip_skip", 0, integer=True)  # the upper bound is the model's
        check_number(self.mask_blur, "mask_blur", 0, integer=True)
        check_number(self.subseed_strength, "subseed_strength", 0, 1)
        for name in ("denoising_end", "denoising_start"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name, 0, 1)
        if self.denoising_end is not None and self.mode == "inpaint":
            raise ValueError("denoising_end is for txt2img and img2img")
        if self.denoising_start is not None and self.mode != "img2img":
            raise ValueError("denoising_start is for img2img (continuing another pass's latents)")
        if self.subseed is not None:
            check_number(self.subseed, "subseed", 0, MAX_SEED + 1 - self.batch, integer=True)
        for name in ("seed_resize_from_h", "seed_resize_from_w"):
            value = getattr(self, name)
            check_number(value, name, 0, integer=True)
            if value % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {value}")
        if bool(self.seed_resize_from_h) != bool(self.seed_resize_from_w):
            raise ValueError("give both seed_resize_from_h and seed_resize_from_w, or neither")
        if self.scheduler is not None:
            schedulers.check_name(self.scheduler)

    def _check_images(self) -> None:
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                pre.check_side(name, getattr(self, name))
        if self.mode == "txt2img":
            for name in ("image", "mask"):
                if getattr(self, name) is not None:
                    raise ValueError(f"txt2img takes no {name}; use img2img or inpaint")
            return
        if self.mode == "img2img" and isinstance(self.image, torch.Tensor):
            if self.image.dim() != 4:  # latents, as diffusers' img2img takes them
                raise ValueError(f"image latents must be (batch, channels, h, w), got shape "
                                 f"{tuple(self.image.shape)}")
        else:
            pre.check_image(self.image)
        if self.hires is not None and self.mode != "txt2img":
            raise ValueError("hires (the second pass) is for txt2img only")
        if self.mode == "inpaint":
            pre.check_image(self.mask, "mask")
        if self.inpainting_fill not in INPAINTING_FILLS:
            raise ValueError(f"inpainting_fill must be one of {', '.join(INPAINTING_FILLS)}, "
                             f"got {self.inpainting_fill!r}")

    def _check_randomness(self) -> None:
        if self.generator is None:
            if self.seed is not None:
                check_number(self.seed, "seed", 0, MAX_SEED + 1 - self.batch, integer=True)
            return
        if self.seed is not None:
            raise ValueError("give seed or generator, not both")
        gens = self.generator if isinstance(self.generator, list) else [self.generator]
        if not all(isinstance(g, torch.Generator) for g in gens):
            raise ValueError("generator must be a torch.Generator or a list of them")
        if isinstance(self.generator, list) and len(self.generator) != self.batch:
            raise ValueError(f"got {len(self.generator)} generators for {self.batch} images")

    @property
    def batch(self) -> int:
        """Images in all: ``num_images`` per prompt."""
        return len(self.prompt) * self.num_images

    def replace(self, **changes) -> "GenerationRequest":
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)


def _as_prompts(value, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
