"""Text-to-image, image-to-image and inpainting with a :class:`ldm.model.LatentDiffusion`.

One object, three entry points that each build a :class:`pipelines.request.GenerationRequest`, and
one flow over the request in numbered stages (the order diffusers' Stable Diffusion pipelines use,
so the same seed, weights and scheduler give the same image):

1. settle the request  2. timesteps            3. prompts → conditioning
4. initial latents     5. denoise with guidance  6. decode (fp32 fallback, tiling)  7. result

Seeds: image ``i`` of a call with ``seed`` draws all its randomness from
``torch.Generator("cpu").manual_seed(seed + i)`` (noise of shape (1, 4, H/f, W/f), the autoencoder
posterior sample, a stochastic sampler's noise), so it equals a single-image call with ``seed + i``
and a diffusers pipeline given that generator, on any device.
"""
from __future__ import annotations

import dataclasses
import inspect
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldm.resources import shipped_file
from ldm.weights_io import parse_dtype

from . import preprocess as pre
from .latents import INITIAL_LATENTS, Canvas, decode
from .prompts import encode_prompts
from .request import PARAMETERS, GenerationRequest
from .sampling import Guidance, Progress, Schedule, denoise, step_kwargs
from .schedulers import import_in_background, make_scheduler
from .validate import check_number

DEFAULT_CHECKPOINT = shipped_file("weights", "tiny-shapes.safetensors")
DEFAULT_CONFIG = shipped_file("configs", "tiny-shapes.yaml")


class DefaultModelMissing(RuntimeError):
    """No checkpoint was given and the shipped default model is not installed."""


def default_model(config=None) -> tuple[Path, object]:
    """The shipped default model's file and config (``config`` if one is given), or
    :class:`DefaultModelMissing` when it is not installed."""
    if not DEFAULT_CHECKPOINT.is_file():
        raise DefaultModelMissing(f"no default model is installed ({DEFAULT_CHECKPOINT.parent.name}/"
                                  f"{DEFAULT_CHECKPOINT.name}); pass --checkpoint PATH")
    return DEFAULT_CHECKPOINT, DEFAULT_CONFIG if config is None and DEFAULT_CONFIG.is_file() else config


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
    return parse_dtype(dtype)


def _documented(method):
    """Append the method's parameters, described by :data:`pipelines.request.PARAMETERS`, to its
    docstring."""
    names = [n for n in inspect.signature(method).parameters if n != "self"]
    width = max(map(len, names))
    rows = "".join(f"\n        {n:<{width}}  {PARAMETERS[n]}" for n in names)
    method.__doc__ = f"{method.__doc__}\n\n        Parameters:{rows}\n"
    return method


# above this size a checkpoint's load (copies, page faults) takes long enough to hide the ~1 s
# import of a diffusers scheduler behind it; below, the two threads only contend for the GIL
BACKGROUND_IMPORT_BYTES = 256 << 20


def _large_file(path) -> bool:
    try:
        return Path(path).is_file() and Path(path).stat().st_size >= BACKGROUND_IMPORT_BYTES
    except OSError:
        return False


def _request(mode: str, given: dict) -> GenerationRequest:
    """The request for an entry point's arguments (its ``locals()``: exactly its parameters)."""
    return GenerationRequest(mode, **{k: v for k, v in given.items() if k != "self"})


class Pipeline:
    def __init__(self, model, *, device=None, dtype=None, attention: str = "sdpa",
                 model_name: str | None = None, speed=None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # speed: ldm.speed.SpeedOptions (or a dict of its fields); None = its defaults
        from .offload import place_model

        self.model, self.speed = place_model(model, self.device, self.dtype, speed)
        if self.model.config.is_sdxl and self.dtype == torch.float16:
            # SDXL's stock autoencoder overflows in float16: decode in float32 from the start
            # (diffusers' force_upcast); a VAE made for float16 is put back by load_vae
            self.model.first_stage_model.to(torch.float32)
        self.attention = model.set_attention_backend(attention)
        self.model_name = model_name
        self.model_path: str | None = None
        # textual-inversion words: files in embeddings_dir (loaded when a prompt uses their
        # stem) and those added with load_embedding
        self.vae_path: str | None = None  # a separate autoencoder in use (load_vae)
        self.embeddings_dir: Path | None = None
        self.embeddings: dict[str, object] = {}
        self._lora_words: dict[str, list[str]] = {}  # LoRA name → embeddings it brought
        # ControlNets by resolved path, placed like the model; where names are looked up
        self.controlnets: dict[str, torch.nn.Module] = {}
        self.controlnet_dirs: list[Path] = []

    @classmethod
    def from_checkpoint(cls, path=None, *, config=None, device=None, dtype=None,
                        attention: str = "sdpa", use_ema: bool = False, prediction=None,
                        speed=None, scheduler: str | None = None) -> "Pipeline":
        """Load a single-file checkpoint (None → the shipped default model). ``scheduler``: the
        one you will sample with first (default: SD's default, DPM++ 2M); its module is imported
        while the weights load."""
        if path is None:
            path, config = default_model(config)
        from ldm.checkpoint import load_model
        from ldm.config import SamplingDefaults
        from ldm.speed import as_speed_options
        from ldm.weights_io import hash_in_background

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        speed = as_speed_options(speed)
        hash_in_background(path)  # for the images' metadata, while the weights load
        if _large_file(path):  # a long load releases the GIL: import the sampler meanwhile
            import_in_background(scheduler or SamplingDefaults.scheduler)
        # the NHWC layout of speed's channels_last is made in the same pass as the dtype cast
        model = load_model(path, config, dtype=dtype, device=device, use_ema=use_ema,
                           prediction=prediction, channels_last=speed.channels_last)
        pipe = cls(model, device=device, dtype=dtype, attention=attention, model_name=Path(path).stem,
                   speed=speed)
        pipe.model_path = str(path)
        pipe.embeddings_dir = Path(path).parent / "embeddings"  # as A1111's embeddings/ folder
        return pipe

    def enable_vae_tiling(self, enabled: bool = True, tile_size: int | None = None) -> None:
        """Decode (and encode) in overlapping tiles at every size, not only above
        ``AUTO_TILING_PIXELS``; ``tile_size`` is in pixels."""
        self.model.first_stage_model.enable_tiling(enabled, tile_size)

    # ------------------------------------------------------------------ LoRA (see ldm.lora)
    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Apply a LoRA file (kohya or peft/diffusers layout) without merging it; returns its
        name. Several may be loaded, each with its own scale; images record them."""
        from ldm.embeddings import check_fits, lora_embeddings
        from ldm.lora import apply_lora

        words = lora_embeddings(path) if isinstance(path, (str, Path)) else []
        for emb in words:  # checked before anything is applied; the error names the file
            check_fits(emb, self.text_widths())
        name = apply_lora(self.model, path, scale=scale, name=name)
        for emb in words:  # pivotal tuning / A1111's bundled embeddings: prompt words
            self.embeddings[emb.name] = emb
        self._lora_words[name] = [emb.name for emb in words]
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        from ldm.lora import set_lora_scale

        set_lora_scale(self.model, name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all); the model is then exactly the base model again."""
        from ldm.lora import remove_lora

        remove_lora(self.model, name)
        for adapter in ([name] if name is not None else list(self._lora_words)):
            for word in self._lora_words.pop(adapter, []):
                self.embeddings.pop(word, None)

    def fuse_lora(self, fuse: bool = True) -> None:
        """Merge the loaded LoRAs into the weights (faster steps), or with False undo that exactly."""
        from ldm.lora import fuse_lora, unfuse_lora

        if fuse:
            fuse_lora(self.model)
        else:
            unfuse_lora(self.model)

    def _lora_parameters(self) -> dict:
        """A1111's "Lora hashes" field, plus the scales, for the LoRAs in use."""
        from ldm.lora import lora_info

        used = [a for a in lora_info(self.model) if a["scale"] != 0]
        if not used:
            return {}
        from ldm.weights_io import lora_file_hash

        hashes = [f"{a['name']}: {lora_file_hash(a['source'])}" for a in used
                  if a["source"] and Path(a["source"]).is_file()]
        out = {}
        if hashes:
            out["Lora hashes"] = ", ".join(hashes)
        out["Lora scales"] = ", ".join(f"{a['name']}: {a['scale']:g}" for a in used)
        return out

    def sampling_settings(self, steps=None, guidance_scale=None, scheduler=None):
        """The given settings, the unset ones from the model config's defaults
        (an ``ldm.config.SamplingDefaults``)."""
        given = dict(num_inference_steps=steps, guidance_scale=guidance_scale, scheduler=scheduler)
        return dataclasses.replace(self.model.config.sampling,
                                   **{k: v for k, v in given.items() if v is not None})

    # ------------------------------------------------------------------ entry points
    @_documented
    def txt2img(self, prompt, *, negative_prompt="", num_inference_steps: int | None = None,
                guidance_scale: float | None = None, scheduler: str | None = None,
                guidance_rescale: float = 0.0, seed: int | None = None, generator=None,
                height: int | None = None, width: int | None = None, num_images: int = 1,
                eta: float = 0.0, clip_skip: int = 0, output_type: str = "pil",
                return_latents: bool = False, callback=None, progress: bool = True,
                control=(), subseed: int | None = None, subseed_strength: float = 0.0,
                seed_resize_from_h: int = 0, seed_resize_from_w: int = 0,
                hires=None, sdxl=None, denoising_end: float | None = None) -> GenerationResult:
        """Images from text."""
        return self._generate(_request("txt2img", locals()))

    @_documented
    def img2img(self, prompt, image: Image.Image, *, strength: float = 0.75, negative_prompt="",
                num_inference_steps: int | None = None, guidance_scale: float | None = None,
                scheduler: str | None = None, guidance_rescale: float = 0.0, seed: int | None = None,
                generator=None, height: int | None = None, width: int | None = None,
                num_images: int = 1, eta: float = 0.0, clip_skip: int = 0, output_type: str = "pil",
                return_latents: bool = False, callback=None, progress: bool = True,
                control=(), subseed: int | None = None, subseed_strength: float = 0.0,
                seed_resize_from_h: int = 0, seed_resize_from_w: int = 0,
                sdxl=None, denoising_end: float | None = None,
                denoising_start: float | None = None) -> GenerationResult:
        """Redraw ``image``: ``strength`` 0 keeps it, 1 replaces it."""
        return self._generate(_request("img2img", locals()))

    @_documented
    def inpaint(self, prompt, image: Image.Image, mask: Image.Image, *, strength: float = 1.0,
                mask_blur: int = 0, inpainting_fill: str = "original", negative_prompt="", num_inference_steps: int | None = None,
                guidance_scale: float | None = None, scheduler: str | None = None,
                guidance_rescale: float = 0.0, seed: int | None = None, generator=None,
                height: int | None = None, width: int | None = None, num_images: int = 1,
                eta: float = 0.0, clip_skip: int = 0, output_type: str = "pil",
                return_latents: bool = False, callback=None, progress: bool = True,
                control=(), subseed: int | None = None, subseed_strength: float = 0.0,
                seed_resize_from_h: int = 0, seed_resize_from_w: int = 0,
                sdxl=None) -> GenerationResult:
        """Repaint the white part of ``mask``; pixels where the (blurred) mask is black come back
        unchanged, and the result has the input image's size."""
        return self._generate(_request("inpaint", locals()))

    # ------------------------------------------------------------------ the flow
    @torch.inference_mode()
    def _generate(self, request: GenerationRequest) -> GenerationResult:
        """The shared flow of the three entry points (see the module docstring)."""
        if request.hires is not None:  # two passes (pipelines.hires), each through this flow
            from .hires import run_hires

            return run_hires(self, request)
        # 1. settle the request: the model's defaults for what it leaves unset, its own limits
        request = self._settle(request)
        soft_mask = None
        if request.mode == "inpaint":
            soft_mask = pre.prepare_mask(request.mask, request.image.size, request.mask_blur)

        # 2. per-image generators; timesteps (img2img/inpaint run the last int(steps·strength))
        generators, seeds = _generators(request)
        schedule = self._schedule(request, generators)

        # 3. prompts → conditioning; one UNet call per step on the batch [uncond, cond]
        guidance = Guidance(float(request.guidance_scale), float(request.guidance_rescale))
        context, vector = self._text_context(request, guidance)
        control = self._control(request, len(schedule.timesteps))

        # 4. initial latents (random draws in diffusers' order), per mode
        canvas = Canvas(self.model, self.device, self.dtype, generators, request.batch,
                        request.height, request.width, _variation(request, generators, seeds))
        start = INITIAL_LATENTS[request.mode](canvas, schedule, request, soft_mask)

        # 5. denoise
        conditioning = dataclasses.replace(start.conditioning(context), control=control, y=vector)
        latents, interrupted = denoise(self.model, start.latents, schedule, conditioning,
                                       guidance, request.callback,
                                       Progress(request.progress, request.mode))

        # 6. decode; inpainting pastes the result into the untouched original
        images = self._images(request, latents, soft_mask) if request.output_type == "pil" else []

        # 7. result, with what is needed to reproduce each image
        keep = request.output_type == "latent" or request.return_latents
        return GenerationResult(images, latents if keep else None, seeds,
                                self._parameters(request, seeds), interrupted)

    # ------------------------------------------------------------------ stages
    def _settle(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the model's sampling defaults and image size filled in, checked
        against what the model can do."""
        cfg = self.model.config
        used = self.sampling_settings(request.num_inference_steps, request.guidance_scale,
                                      request.scheduler)
        usable = cfg.text.layers - cfg.text.skip_layers()
        check_number(request.clip_skip, "clip_skip", 0, usable - 1, integer=True)
        if request.mode == "txt2img":
            height = cfg.default_image_size if request.height is None else request.height
            width = cfg.default_image_size if request.width is None else request.width
        elif isinstance(request.image, torch.Tensor):  # latents: their own size, no resizing
            f = cfg.autoencoder.downscale
            height, width = request.image.shape[-2] * f, request.image.shape[-1] * f
            if (request.height or height, request.width or width) != (height, width):
                raise ValueError(f"image latents are for {width}x{height} pixels; they are not "
                                 f"resized (got width {request.width}, height {request.height})")
        else:
            height, width = pre.target_size(request.image, request.height, request.width)
        if request.subseed_strength and request.subseed is None:  # A1111 draws one
            request = request.replace(subseed=secrets.randbelow(2**32))
        return request.replace(num_inference_steps=used.num_inference_steps,
                               guidance_scale=used.guidance_scale, scheduler=used.scheduler,
                               height=height, width=width)

    def _schedule(self, request: GenerationRequest, generators) -> Schedule:
        cfg = self.model.config
        sched = make_scheduler(request.scheduler, cfg.parameterization, beta_start=cfg.linear_start,
                               beta_end=cfg.linear_end, num_train_timesteps=cfg.timesteps)
        steps = request.num_inference_steps
        sched.set_timesteps(steps, device=self.device)
        timesteps, begin = sched.timesteps, 0
        total = cfg.timesteps
        if request.denoising_start is not None:  # diffusers' rule: the timesteps below the cutoff
            cutoff = int(round(total - request.denoising_start * total))
            count = int((timesteps < cutoff).sum())
            if sched.order == 2 and count % 2 == 0:  # a second-order step is not cut in half
                count += 1
            begin = len(timesteps) - count
            timesteps = timesteps[begin:]
        elif request.mode != "txt2img":
            begin = (steps - min(int(steps * request.strength), steps)) * sched.order
            timesteps = timesteps[begin:]
        if request.denoising_end is not None:  # diffusers' rule: the timesteps at or above it
            cutoff = int(round(total - request.denoising_end * total))
            timesteps = timesteps[:int((timesteps >= cutoff).sum())]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)  # lets the scheduler skip its host-side timestep lookup
        return Schedule(sched, timesteps, step_kwargs(sched, generators, request.eta))

    def _text_context(self, request: GenerationRequest, guidance: Guidance):
        """The text conditioning of every image, rows [uncond, cond] with guidance, else cond; and
        SDXL's vector conditioning in the same rows (None for SD1/SD2)."""
        if self.model.config.is_sdxl:
            from .sdxl import check_mode, sdxl_conditioning

            check_mode(self.model.conditioner.config, request.mode)
            return sdxl_conditioning(self.model, request.prompt, request.negative_prompt,
                                     request.clip_skip, request.num_images, request.height,
                                     request.width, guidance.enabled, self.dtype, request.sdxl,
                                     self.embeddings_in(request))
        if request.sdxl is not None:
            raise ValueError("sdxl (size and aesthetic conditioning) is for SDXL models")
        cond, uncond = encode_prompts(self.model, request.prompt, request.negative_prompt,
                                      request.clip_skip, self.embeddings_in(request))
        cond = cond.repeat_interleave(request.num_images, 0).to(self.dtype)
        uncond = uncond.repeat_interleave(request.num_images, 0).to(self.dtype)
        return (torch.cat([uncond, cond]) if guidance.enabled else cond), None

    def _control(self, request: GenerationRequest, steps: int):
        """The ControlNet units' stack for this generation (None without units): models loaded,
        hints fitted to the image size and repeated for the batch."""
        if not request.control:
            return None
        from .control import ControlStack, prepare_units

        nets = [self.controlnet(unit.model) for unit in request.control]
        units = prepare_units(request.control, nets, request.width, request.height, request.batch,
                              self.device, self.dtype)
        return ControlStack(units, steps)

    # ------------------------------------------------------------------ a separate autoencoder
    def load_vae(self, path) -> None:
        """Use the autoencoder weights of ``path`` (A1111's "SD VAE": a VAE file, a checkpoint's
        autoencoder, or a diffusers ``vae/`` folder); one of another shape is refused."""
        from ldm.vae_file import fp16_safe, load_vae_into

        load_vae_into(self.model, path)
        self.vae_path = str(path)
        if self.dtype == torch.float16 and fp16_safe(path):  # e.g. sdxl-vae-fp16-fix
            self.model.first_stage_model.to(torch.float16)

    # ------------------------------------------------------------------ textual inversion
    def load_embedding(self, path, name: str | None = None) -> str:
        """Make an embedding file's vectors a prompt word (its file stem unless ``name`` is
        given); one made for another model (text-encoder widths, SDXL's two towers) is refused.
        Returns the word."""
        from ldm.embeddings import load_embedding

        emb = load_embedding(path, self.text_widths())
        word = name or emb.name
        self.embeddings[word] = dataclasses.replace(emb, name=word)
        return word

    def text_widths(self) -> int | dict:
        """What an embedding must fit: the text encoder's width, or on SDXL each tower's width by
        its key in SDXL embedding files (clip_l, clip_g)."""
        from ldm.embeddings import TOWER_KEYS, token_embedding

        if self.model.config.is_sdxl:
            return {TOWER_KEYS[t.kind]: t.width for t in self.model.config.conditioner.texts}
        return token_embedding(self.model.cond_stage_model).embedding_dim

    def _idle_lora_words(self) -> set[str]:
        """Words of embeddings that came with a LoRA now at scale 0: they keep the base model's
        meaning, so a LoRA at scale 0 gives the base model's images bit for bit."""
        if not self._lora_words:
            return set()
        from ldm.lora import lora_adapters

        scales = lora_adapters(self.model)
        return {w for name, words in self._lora_words.items() if not scales.get(name) for w in words}

    def embeddings_in(self, request: GenerationRequest) -> dict:
        """The embeddings whose words appear in the request's prompts or negative prompts: those
        loaded, and files of ``embeddings_dir`` (loaded now, once)."""
        import re

        from ldm.embeddings import find_embeddings

        texts = "\n".join(request.prompt + request.negative_prompt)
        found = find_embeddings(self.embeddings_dir) if self.embeddings_dir else {}
        used = {}
        for word in set(found) | set(self.embeddings) - self._idle_lora_words():
            if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", texts):
                if word not in self.embeddings:
                    self.load_embedding(found[word])
                used[word] = self.embeddings[word]
        return used

    # ------------------------------------------------------------------ ControlNet
    def controlnet(self, spec) -> torch.nn.Module:
        """A ControlNet ready for this pipeline: ``spec`` is a loaded ControlNet (moved to the
        pipeline's device and dtype), or a file, folder or name (see
        :func:`pipelines.control.find_controlnet`), loaded once and kept. One made for another
        model family is refused."""
        if isinstance(spec, torch.nn.Module):
            return spec.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        from ldm.controlnet_loading import load_controlnet

        from .control import find_controlnet

        path = find_controlnet(spec, self.controlnet_dirs)
        key = str(path.resolve())
        if key not in self.controlnets:
            net = load_controlnet(path, self.model.config, dtype=self.dtype, device=self.device)
            self.controlnets[key] = net.requires_grad_(False)
        return self.controlnets[key]

    def _control_label(self, spec) -> str:
        """A ControlNet as A1111 names it in the parameters: file stem [first 8 of its sha256]."""
        if isinstance(spec, torch.nn.Module):
            return getattr(spec, "name", None) or type(spec).__name__
        from ldm.weights_io import file_hash

        from .control import find_controlnet

        path = find_controlnet(spec, self.controlnet_dirs)
        if path.is_file():
            return f"{path.stem} [{file_hash(path)[:8]}]"
        return path.name

    def _finish_latents(self, request: GenerationRequest, result: GenerationResult) -> GenerationResult:
        """``result`` (made with latents kept) decoded and trimmed as ``request`` asks."""
        images = self._images(request, result.latents, None) if request.output_type == "pil" else []
        keep = request.output_type == "latent" or request.return_latents
        return dataclasses.replace(result, images=images, latents=result.latents if keep else None)

    def _images(self, request: GenerationRequest, latents: torch.Tensor, soft_mask) -> list[Image.Image]:
        # an overflow warning points past _generate and its inference-mode wrapper to the caller
        # of the entry point
        images = [Image.fromarray(a) for a in pre.to_uint8(decode(self.model, latents, stacklevel=5))]
        if request.mode == "inpaint":
            images = [pre.composite(im, request.image, soft_mask) for im in images]
        return images

    def _parameters(self, request: GenerationRequest, seeds: list[int]) -> list[dict]:
        """Per image, what reproduces it (the PNG "parameters" text)."""
        common = dict(steps=request.num_inference_steps, sampler=request.scheduler,
                      cfg_scale=request.guidance_scale, width=request.width, height=request.height,
                      model=self.model_name, model_path=self.model_path, clip_skip=request.clip_skip,
                      eta=request.eta, mode=request.mode)
        if request.mode != "txt2img":
            common["strength"] = request.strength
        if request.mode == "inpaint":
            common["mask_blur"] = request.mask_blur
        if request.guidance_rescale:
            common["guidance_rescale"] = request.guidance_rescale
        if request.seed_resize_from_h:
            common["Seed resize from"] = f"{request.seed_resize_from_w}x{request.seed_resize_from_h}"
        common.update(self._lora_parameters())
        if self.vae_path:  # A1111's fields for a separate VAE
            vae = Path(self.vae_path)
            if vae.is_file():
                from ldm.weights_io import file_hash

                common["VAE hash"] = file_hash(vae)[:10]
            common["VAE"] = vae.name
        used = self.embeddings_in(request)
        if used:  # A1111's "TI hashes": the first 12 hex digits of each file's sha256
            from ldm.weights_io import file_hash

            common["TI hashes"] = ", ".join(
                f"{w}: {file_hash(e.path)[:12]}" for w, e in sorted(used.items()) if e.path)
        if request.control:
            from .control import describe_unit

            for i, unit in enumerate(request.control):
                common[f"ControlNet {i}"] = describe_unit(unit, self._control_label(unit.model))
        n = request.num_images
        out = [dict(prompt=request.prompt[i // n], negative_prompt=request.negative_prompt[i // n],
                    seed=seeds[i], **common) for i in range(request.batch)]
        if request.subseed_strength and request.subseed is not None:  # A1111's field names
            for i, params in enumerate(out):
                params["Variation seed"] = request.subseed + i
                params["Variation seed strength"] = request.subseed_strength
        return out


def _variation(request: GenerationRequest, generators, seeds: list[int]):
    """The request's variation-seed settings for the canvas (None when off)."""
    resize = request.seed_resize_from_h and (request.seed_resize_from_h, request.seed_resize_from_w)
    if not (request.subseed_strength or resize):
        return None
    from .variation import Variation

    if not isinstance(generators, list):
        raise ValueError("variation seeds need one generator per image (give seed=, or a list)")
    subseeds = None
    if request.subseed_strength:
        subseeds = [request.subseed + i for i in range(request.batch)]
    return Variation(seeds, subseeds, float(request.subseed_strength), resize or None)


def _generators(request: GenerationRequest):
    """Per-image CPU generators seeded ``seed + i`` (a random seed when none is given), or the
    caller's generator(s), used as diffusers uses them. With one explicit generator for several
    images the images share its stream, and each reports the generator's initial seed."""
    batch = request.batch
    if request.generator is not None:
        gens = request.generator if isinstance(request.generator, list) else [request.generator]
        seeds = [g.initial_seed() for g in gens] * (batch if len(gens) == 1 else 1)
        return request.generator, seeds
    seed = secrets.randbelow(2**32) if request.seed is None else request.seed
    seeds = [seed + i for i in range(batch)]
    return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds
