"""Text-to-image, image-to-image and inpainting with a :class:`ldm.model.LatentDiffusion`.

One object, three entry points, one flow in numbered stages (the order diffusers' Stable Diffusion
pipelines use, so the same seed, weights and scheduler give the same image):

1. check inputs        2. encode prompts         3. timesteps (and img2img strength)
4. initial latents     5. denoise with guidance  6. decode (fp32 fallback, tiling)  7. result

Seeds: image ``i`` of a call with ``seed`` draws all its randomness from
``torch.Generator("cpu").manual_seed(seed + i)`` (noise of shape (1, 4, H/f, W/f), the autoencoder
posterior sample, a stochastic sampler's noise), so it equals a single-image call with ``seed + i``
and a diffusers pipeline given that generator, on any device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoint import DTYPE_NAMES as _DTYPES
from ldm.resources import shipped_file

from . import preprocess as pre
from .prompts import encode_prompts
from .sampling import Guidance, KnownRegion, denoise, randn, step_kwargs
from .schedulers import make_scheduler

DEFAULT_CHECKPOINT = shipped_file("weights", "tiny-shapes.safetensors")
DEFAULT_CONFIG = shipped_file("configs", "tiny-shapes.yaml")

# Above this many pixels on a side the autoencoder works in overlapping tiles even when tiling was
# not asked for. SD1/SD2 images up to 1024 px (SD2-v's native 768 px included) decode whole, which
# avoids tile blending; beyond that a whole-image decode's activations grow quadratically (the
# decoder's full-resolution level holds 128 × H × W values per tensor) and tiles bound the peak.
AUTO_TILING_PIXELS = 1024

_MODES = ("txt2img", "img2img", "inpaint")
_OUTPUT_TYPES = ("pil", "latent")


class DefaultModelMissing(RuntimeError):
    """No checkpoint was given and the shipped default model is not installed."""


@dataclass
class GenerationResult:
    images: list[Image.Image]  # empty when output_type="latent"
    latents: torch.Tensor | None  # final latents when output_type="latent" or return_latents=True
    seeds: list[int]  # seed of each image
    parameters: list[dict]  # per image, for the PNG "parameters" text
    interrupted: bool = False  # a callback stopped the loop before the last step


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None → float16 on CUDA, float32 elsewhere; strings such as "fp16", "bf16", "fp32"."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; choose fp16, bf16 or fp32")


def _as_prompts(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def _number(name: str, value, low: float | None = None, high: float | None = None,
            integer: bool = False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value != value:
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _reject(kwargs: dict, method: str, names) -> None:
    for name in names:
        if name in kwargs:
            raise TypeError(f"{method}() got an unexpected keyword argument {name!r}")


class Pipeline:
    def __init__(self, model, *, device=None, dtype=None, attention: str = "sdpa",
                 model_name: str | None = None, speed=None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # speed: ldm.speed.SpeedOptions (or a dict of its fields); None = its defaults
        from .offload import place_model

        self.model, self.speed = place_model(model, self.device, self.dtype, speed)
        self.attention = model.set_attention_backend(attention)
        self.model_name = model_name
        self.model_path: str | None = None

    @classmethod
    def from_checkpoint(cls, path=None, *, config=None, device=None, dtype=None,
                        attention: str = "sdpa", use_ema: bool = False, prediction=None,
                        speed=None) -> "Pipeline":
        """Load a single-file checkpoint (None → the shipped default model)."""
        if path is None:
            if not DEFAULT_CHECKPOINT.is_file():
                raise DefaultModelMissing(f"no default model is installed ({DEFAULT_CHECKPOINT.parent.name}/"
                                          f"{DEFAULT_CHECKPOINT.name}); pass --checkpoint PATH")
            path = DEFAULT_CHECKPOINT
            config = DEFAULT_CONFIG if config is None and DEFAULT_CONFIG.is_file() else config
        from ldm.checkpoint import load_model

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model = load_model(path, config, dtype=dtype, device=device, use_ema=use_ema,
                           prediction=prediction)
        pipe = cls(model, device=device, dtype=dtype, attention=attention, model_name=Path(path).stem,
                   speed=speed)
        pipe.model_path = str(path)
        return pipe

    def enable_vae_tiling(self, enabled: bool = True, tile_size: int | None = None) -> None:
        """Decode (and encode) in overlapping tiles at every size, not only above
        ``AUTO_TILING_PIXELS``; ``tile_size`` is in pixels."""
        self.model.first_stage_model.enable_tiling(enabled, tile_size)

    # ------------------------------------------------------------------ LoRA (see ldm.lora)
    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Apply a LoRA file (kohya or peft/diffusers layout) without merging it; returns its
        name. Several may be loaded, each with its own scale; images record them."""
        from ldm.lora import apply_lora

        return apply_lora(self.model, path, scale=scale, name=name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        from ldm.lora import set_lora_scale

        set_lora_scale(self.model, name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all); the model is then exactly the base model again."""
        from ldm.lora import remove_lora

        remove_lora(self.model, name)

    def fuse_lora(self, fuse: bool = True) -> None:
        """Merge the loaded LoRAs into the weights (faster steps), or with False undo that exactly."""
        from ldm.lora import fuse_lora, unfuse_lora

        if fuse:
            fuse_lora(self.model)
        else:
            unfuse_lora(self.model)

    def _lora_parameters(self) -> dict:
        """A1111's "Lora hashes" field, plus the scales, for the LoRAs in use."""
        if "_lora_state" not in self.model.__dict__:
            return {}
        from ldm.lora import lora_info
        from ldm.lora_formats import lora_file_hash

        used = [a for a in lora_info(self.model) if a["scale"] != 0]
        hashes = [f"{a['name']}: {lora_file_hash(a['source'])}" for a in used
                  if a["source"] and Path(a["source"]).is_file()]
        out = {}
        if hashes:
            out["Lora hashes"] = ", ".join(hashes)
        if used:
            out["Lora scales"] = ", ".join(f"{a['name']}: {a['scale']:g}" for a in used)
        return out

    def sampling_settings(self, steps=None, guidance_scale=None, scheduler=None):
        """The given settings, the unset ones from the model config's defaults
        (an ``ldm.config.SamplingDefaults``)."""
        given = dict(num_inference_steps=steps, guidance_scale=guidance_scale, scheduler=scheduler)
        return dataclasses.replace(self.model.config.sampling,
                                   **{k: v for k, v in given.items() if v is not None})

    # ------------------------------------------------------------------ entry points
    def txt2img(self, prompt, **kwargs) -> GenerationResult:
        """Images from text. Keyword arguments: see :meth:`_generate`."""
        _reject(kwargs, "txt2img", ("image", "mask", "strength", "mask_blur"))
        return self._generate("txt2img", prompt, **kwargs)

    def img2img(self, prompt, image: Image.Image, *, strength: float = 0.75, **kwargs) -> GenerationResult:
        """Redraw ``image``: ``strength`` 0 keeps it, 1 replaces it (diffusers' semantics: the last
        ``int(steps * strength)`` of the ``steps`` timesteps are run)."""
        _reject(kwargs, "img2img", ("mask", "mask_blur"))
        return self._generate("img2img", prompt, image=image, strength=strength, **kwargs)

    def inpaint(self, prompt, image: Image.Image, mask: Image.Image, *, strength: float = 1.0,
                mask_blur: int = 0, **kwargs) -> GenerationResult:
        """Repaint the white part of ``mask``; pixels where the (blurred) mask is black come back
        unchanged, and the result has the input image's size."""
        return self._generate("inpaint", prompt, image=image, mask=mask, strength=strength,
                              mask_blur=mask_blur, **kwargs)

    # ------------------------------------------------------------------ the flow
    @torch.inference_mode()
    def _generate(self, mode: str, prompt, *, image=None, mask=None, strength: float = 1.0,
                  mask_blur: int = 0, negative_prompt="", num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, scheduler: str | None = None,
                  seed: int | None = None, generator=None, height: int | None = None,
                  width: int | None = None, num_images: int = 1, eta: float = 0.0, clip_skip: int = 0,
                  guidance_rescale: float = 0.0, callback=None, progress: bool = True,
                  output_type: str = "pil", return_latents: bool = False) -> GenerationResult:
        """The shared flow of the three entry points. Keyword arguments:

        negative_prompt     what to steer away from ("" = the empty prompt), one or one per prompt
        num_inference_steps scheduler steps (img2img/inpaint run the last ``int(steps·strength)``)
        guidance_scale      classifier-free guidance g; 1 turns the unconditional pass off
        scheduler           a name from ``pipelines.schedulers.SCHEDULERS``
                            (these three, when None: the model config's ``sampling`` section,
                            else 25 steps of dpmpp_2m at guidance 7.5)
        seed / generator    image i uses ``Generator("cpu").manual_seed(seed + i)``; or explicit
                            generator(s), as diffusers takes them (not both)
        height, width       multiples of 8; default: the model's size (txt2img) or the image's
        num_images          images per prompt; a list of prompts gives len(prompts)·num_images
        eta                 DDIM's η (0 = deterministic); ignored by other schedulers
        clip_skip           text-encoder blocks to skip at the end (0 = as trained)
        guidance_rescale    φ of Lin et al. 2023 §3.4 (0 = off; 0.7 suggested for v-models)
        callback            ``callback(i, total, latents)`` after each step; ``False`` stops
        progress            show a tqdm bar
        output_type         "pil" or "latent" (no decode); return_latents keeps them with images
        """
        model, cfg = self.model, self.model.config

        # 1. check inputs (everything, before any work)
        used = self.sampling_settings(num_inference_steps, guidance_scale, scheduler)
        num_inference_steps, guidance_scale, scheduler = (
            used.num_inference_steps, used.guidance_scale, used.scheduler)
        prompts = _as_prompts(prompt, "prompt")
        negatives = _as_prompts(negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        elif len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
        steps = _number("num_inference_steps", num_inference_steps, 1, integer=True)
        _number("num_images", num_images, 1, integer=True)
        _number("guidance_scale", guidance_scale)
        _number("guidance_rescale", guidance_rescale, 0, 1)
        _number("eta", eta, 0)
        _number("strength", strength, 0, 1)
        usable = cfg.text.layers - cfg.text.skip_layers()
        _number("clip_skip", clip_skip, 0, usable - 1, integer=True)
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(_OUTPUT_TYPES)}, got {output_type!r}")
        if callback is not None and not callable(callback):
            raise ValueError("callback must be callable as callback(step, total, latents)")
        batch = len(prompts) * num_images
        generators, seeds = self._generators(seed, generator, batch)
        sched = make_scheduler(scheduler, cfg.parameterization, beta_start=cfg.linear_start,
                               beta_end=cfg.linear_end, num_train_timesteps=cfg.timesteps)
        if mode == "txt2img":
            height = cfg.default_image_size if height is None else height
            width = cfg.default_image_size if width is None else width
            pre.check_size(height, width)
        else:
            image = pre.check_image(image)
            height, width = pre.target_size(image, height, width)
        soft_mask = pre.prepare_mask(mask, image.size, mask_blur) if mode == "inpaint" else None

        # 2. prompts → conditioning; one UNet call per step on the batch [uncond, cond]
        guidance = Guidance(float(guidance_scale), float(guidance_rescale))
        cond, uncond = encode_prompts(model, prompts, negatives, clip_skip)
        cond = cond.repeat_interleave(num_images, 0).to(self.dtype)
        uncond = uncond.repeat_interleave(num_images, 0).to(self.dtype)
        context = torch.cat([uncond, cond]) if guidance.enabled else cond

        # 3. timesteps; img2img/inpaint start part-way: the last int(steps·strength) are run
        sched.set_timesteps(steps, device=self.device)
        timesteps, begin = sched.timesteps, 0
        if mode != "txt2img":
            begin = (steps - min(int(steps * strength), steps)) * sched.order
            timesteps = timesteps[begin:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)  # lets the scheduler skip its host-side timestep lookup

        # 4. initial latents (random draws in diffusers' order: posterior sample, then noise)
        f = cfg.autoencoder.downscale
        shape = (batch, cfg.channels, height // f, width // f)
        concat = known = None
        if mode == "txt2img":
            latents = randn(shape, generators, self.device, self.dtype) * sched.init_noise_sigma
            if cfg.is_inpainting:
                concat = self._whole_image_condition(batch, height, width)
        elif mode == "img2img":
            pixels = pre.image_to_tensor(image, height, width)
            init = self._encode_image(pixels, generators, batch)
            latents = self._noised(sched, init, randn(shape, generators, self.device, self.dtype),
                                   timesteps)
            if cfg.is_inpainting:
                concat = self._whole_image_condition(batch, height, width)
        else:
            pixels = pre.image_to_tensor(image, height, width)
            pixel_mask = pre.mask_to_tensor(soft_mask, height, width)
            init = None
            if not cfg.is_inpainting or strength < 1:
                init = self._encode_image(pixels, generators, batch)
            noise = randn(shape, generators, self.device, self.dtype)
            if strength == 1:
                latents = noise * sched.init_noise_sigma
            else:
                latents = self._noised(sched, init, noise, timesteps)
            # diffusers' latent mask: nearest-neighbour downsampling of the binarised mask
            mask_latent = F.interpolate(pixel_mask, size=shape[-2:]).to(self.device, self.dtype)
            mask_latent = mask_latent.expand(batch, -1, -1, -1)
            if cfg.is_inpainting:
                masked = self._encode_image(pixels * (pixel_mask < 0.5), generators, batch)
                concat = torch.cat([mask_latent, masked], dim=1)
            else:
                known = KnownRegion(init, noise, mask_latent)

        # 5. denoise
        latents, interrupted = denoise(
            model, sched, latents, timesteps, context, guidance, concat=concat, known=known,
            extra=step_kwargs(sched, generators, eta), callback=callback, progress=progress, desc=mode)

        # 6. decode; inpainting pastes the result into the untouched original
        images: list[Image.Image] = []
        if output_type == "pil":
            images = [Image.fromarray(a) for a in pre.to_uint8(self._decode(latents))]
            if mode == "inpaint":
                images = [pre.composite(im, image, soft_mask) for im in images]

        # 7. result, with what is needed to reproduce each image
        common = dict(steps=steps, sampler=scheduler, cfg_scale=guidance_scale, width=width,
                      height=height, model=self.model_name, model_path=self.model_path,
                      clip_skip=clip_skip, eta=eta, mode=mode)
        if mode != "txt2img":
            common["strength"] = strength
        if mode == "inpaint":
            common["mask_blur"] = mask_blur
        if guidance_rescale:
            common["guidance_rescale"] = guidance_rescale
        common.update(self._lora_parameters())
        parameters = [dict(prompt=prompts[i // num_images], negative_prompt=negatives[i // num_images],
                           seed=seeds[i], **common) for i in range(batch)]
        keep = output_type == "latent" or return_latents
        return GenerationResult(images, latents if keep else None, seeds, parameters, interrupted)

    # ------------------------------------------------------------------ helpers
    def _generators(self, seed, generator, batch: int):
        """Per-image CPU generators seeded ``seed + i`` (a random seed when none is given), or the
        caller's generator(s), used as diffusers uses them. With one explicit generator for several
        images the images share its stream, and each reports the generator's initial seed."""
        if generator is not None:
            if seed is not None:
                raise ValueError("give seed or generator, not both")
            gens = generator if isinstance(generator, list) else [generator]
            if not all(isinstance(g, torch.Generator) for g in gens):
                raise ValueError("generator must be a torch.Generator or a list of them")
            if isinstance(generator, list) and len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for {batch} images")
            seeds = [g.initial_seed() for g in gens] * (batch if len(gens) == 1 else 1)
            return generator, seeds
        if seed is None:
            seed = secrets.randbelow(2**32)
        _number("seed", seed, 0, 2**64 - batch, integer=True)
        seeds = [seed + i for i in range(batch)]
        return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds

    @staticmethod
    def _noised(sched, init: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The image latents noised to the first timestep that will run (none run: unchanged)."""
        if len(timesteps) == 0:
            return init
        return sched.add_noise(init, noise, timesteps[:1].repeat(init.shape[0]))

    def _vae_dtype(self) -> torch.dtype:
        return next(self.model.first_stage_model.parameters()).dtype

    @contextlib.contextmanager
    def _auto_tiling(self, height: int, width: int):
        vae = self.model.first_stage_model
        before = vae.tiling
        vae.tiling = before or max(height, width) > AUTO_TILING_PIXELS
        try:
            yield
        finally:
            vae.tiling = before

    def _encode_image(self, pixels: torch.Tensor, generators, batch: int) -> torch.Tensor:
        """One image (1, 3, H, W) → ``batch`` scaled latents, each a posterior sample drawn from
        that image's generator (diffusers' ``latent_dist.sample(generator)``)."""
        vae = self.model.first_stage_model
        with self._auto_tiling(*pixels.shape[-2:]):
            posterior = vae.encode(pixels.to(self.device, self._vae_dtype()))
        mean, std = posterior.mean, posterior.std
        eps = randn((batch,) + tuple(mean.shape[1:]), generators, self.device, mean.dtype)
        return ((mean + std * eps) * self.model.scale_factor).to(self.dtype)

    def _whole_image_condition(self, batch: int, height: int, width: int) -> torch.Tensor:
        """Inpainting-model conditioning for "repaint everything": mask 1 and the latents of an
        all-masked (zero) image, as a 9-channel model sees a fully white mask."""
        f = self.model.config.autoencoder.downscale
        blank = torch.zeros(1, 3, height, width, device=self.device, dtype=self._vae_dtype())
        with self._auto_tiling(height, width):
            z = self.model.first_stage_model.encode(blank).mode() * self.model.scale_factor
        ones = torch.ones(batch, 1, height // f, width // f, device=self.device, dtype=self.dtype)
        return torch.cat([ones, z.to(self.dtype).expand(batch, -1, -1, -1)], dim=1)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1]. A half-precision decode that overflows (NaN/Inf, which SD
        VAEs can do in fp16) is redone in float32, and the autoencoder stays in float32 from then
        on; the finiteness check costs one host sync per decode."""
        vae = self.model.first_stage_model
        z = latents / self.model.scale_factor
        f = self.model.config.autoencoder.downscale
        with self._auto_tiling(z.shape[-2] * f, z.shape[-1] * f):
            dtype = self._vae_dtype()
            x = vae.decode(z.to(dtype))
            if dtype != torch.float32 and not bool(torch.isfinite(x).all()):
                warnings.warn(f"the autoencoder overflowed in {dtype}; decoding in float32 from now on",
                              stacklevel=4)
                with torch.inference_mode(False):  # keep the parameters ordinary tensors
                    vae.to(torch.float32)
                x = vae.decode(latents.float() / self.model.scale_factor)
        return x
