"""The latents a generation starts from, one small function per mode, and the autoencoder on both
sides of the denoising loop (posterior samples in, images out, tiled when large).

Random draws keep diffusers' order, so the same generators give diffusers' latents: img2img draws
the image's posterior sample, then the noise; inpainting draws the image's posterior sample (when
it is needed), the noise, then (inpainting models) the masked image's posterior sample.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.model import posterior_latents

from . import preprocess as pre
from .request import GenerationRequest
from .sampling import Conditioning, Generators, KnownRegion, Schedule, randn

# Above this many pixels on a side the autoencoder works in overlapping tiles even when tiling was
# not asked for. SD1/SD2 images up to 1024 px (SD2-v's native 768 px included) decode whole, which
# avoids tile blending; beyond that a whole-image decode's activations grow quadratically (the
# decoder's full-resolution level holds 128 × H × W values per tensor) and tiles bound the peak.
AUTO_TILING_PIXELS = 1024


@dataclass(frozen=True)
class Canvas:
    """The batch being made: the model, where it computes and in what dtype, the per-image
    generators (or the caller's), and the size in pixels."""

    model: torch.nn.Module  # an ldm.model.LatentDiffusion
    device: torch.device
    dtype: torch.dtype
    generators: Generators
    batch: int
    height: int
    width: int
    variation: object | None = None  # pipelines.variation.Variation

    @property
    def shape(self) -> tuple[int, int, int, int]:
        f = self.model.config.autoencoder.downscale
        return (self.batch, self.model.config.channels, self.height // f, self.width // f)

    def noise(self) -> torch.Tensor:
        if self.variation is not None and self.variation.active:
            from .variation import variation_noise

            noise = variation_noise(self.shape, self.generators, self.variation,
                                    self.model.config.autoencoder.downscale)
            return noise.to(self.device, self.dtype)
        return randn(self.shape, self.generators, self.device, self.dtype)


@dataclass(frozen=True)
class Start:
    """Where denoising begins: the latents, and what conditions the steps besides the text."""

    latents: torch.Tensor
    concat: torch.Tensor | None = None  # an inpainting model's mask and masked-image latents
    known: KnownRegion | None = None  # inpainting with an ordinary model: the region kept

    def conditioning(self, context: torch.Tensor) -> Conditioning:
        return Conditioning(context, self.concat, self.known)


# ------------------------------------------------------------------ the autoencoder
def vae_dtype(model) -> torch.dtype:
    return next(model.first_stage_model.parameters()).dtype


@contextlib.contextmanager
def auto_tiling(model, height: int, width: int):
    """Tiles for this encode/decode if the image is larger than ``AUTO_TILING_PIXELS``."""
    vae = model.first_stage_model
    before = vae.tiling
    vae.tiling = before or max(height, width) > AUTO_TILING_PIXELS
    try:
        yield
    finally:
        vae.tiling = before


def encode_image(canvas: Canvas, pixels: torch.Tensor) -> torch.Tensor:
    """One image (1, 3, H, W) → ``batch`` scaled latents, each a posterior sample drawn from that
    image's generator (diffusers' ``latent_dist.sample(generator)``)."""
    model = canvas.model
    with auto_tiling(model, *pixels.shape[-2:]):
        posterior = model.first_stage_model.encode(pixels.to(canvas.device, vae_dtype(model)))
    mean, std = posterior.mean, posterior.std
    eps = randn((canvas.batch,) + tuple(mean.shape[1:]), canvas.generators, canvas.device, mean.dtype)
    return posterior_latents(mean, std, eps, model.scale_factor).to(canvas.dtype)


def whole_image_condition(canvas: Canvas) -> torch.Tensor:
    """Inpainting-model conditioning for "repaint everything": mask 1 and the latents of an
    all-masked (zero) image, as a 9-channel model sees a fully white mask."""
    model, (batch, _, h, w) = canvas.model, canvas.shape
    blank = torch.zeros(1, 3, canvas.height, canvas.width, device=canvas.device, dtype=vae_dtype(model))
    with auto_tiling(model, canvas.height, canvas.width):
        z = model.encode_first_stage(blank, sample=False)
    ones = torch.ones(batch, 1, h, w, device=canvas.device, dtype=canvas.dtype)
    return torch.cat([ones, z.to(canvas.dtype).expand(batch, -1, -1, -1)], dim=1)


def decode(model, latents: torch.Tensor, stacklevel: int = 1) -> torch.Tensor:
    """Latents → images in [-1, 1]. A half-precision decode that overflows (NaN/Inf, which SD
    VAEs can do in fp16) is redone in float32, and the autoencoder stays in float32 from then
    on; the finiteness check costs one host sync per decode. The warning then points
    ``stacklevel`` frames above this function (1: its caller)."""
    f = model.config.autoencoder.downscale
    with auto_tiling(model, latents.shape[-2] * f, latents.shape[-1] * f):
        dtype = vae_dtype(model)
        x = model.decode_first_stage(latents)
        if dtype != torch.float32 and not bool(torch.isfinite(x).all()):
            warnings.warn(f"the autoencoder overflowed in {dtype}; decoding in float32 from now on",
                          stacklevel=stacklevel + 1)
            with torch.inference_mode(False):  # keep the parameters ordinary tensors
                model.first_stage_model.to(torch.float32)
            x = model.decode_first_stage(latents.float())
    return x


# ------------------------------------------------------------------ initial latents, per mode
def txt2img_latents(canvas: Canvas, schedule: Schedule, request: GenerationRequest,
                    soft_mask: Image.Image | None = None) -> Start:
    """Pure noise at the scheduler's initial scale."""
    latents = canvas.noise() * schedule.init_noise_sigma
    if canvas.model.config.is_inpainting:
        return Start(latents, concat=whole_image_condition(canvas))
    return Start(latents)


def img2img_latents(canvas: Canvas, schedule: Schedule, request: GenerationRequest,
                    soft_mask: Image.Image | None = None) -> Start:
    """The image's latents noised to the first timestep that runs (diffusers' strength rule).
    Latents given as the image are used as they are (no posterior sample is drawn)."""
    if isinstance(request.image, torch.Tensor):
        init = request.image.to(canvas.device, canvas.dtype)
        if init.shape[0] not in (1, canvas.batch):
            raise ValueError(f"{init.shape[0]} image latents for {canvas.batch} images")
        init = init.expand(canvas.batch, -1, -1, -1)
    else:
        pixels = pre.image_to_tensor(request.image, canvas.height, canvas.width)
        init = encode_image(canvas, pixels)
    if request.denoising_start is not None:  # another pass's latents, already at that noise level
        latents = init
    else:
        latents = schedule.noised(init, canvas.noise())
    if canvas.model.config.is_inpainting:
        return Start(latents, concat=whole_image_condition(canvas))
    return Start(latents)


def inpaint_latents(canvas: Canvas, schedule: Schedule, request: GenerationRequest,
                    soft_mask: Image.Image | None = None) -> Start:
    """Noise (strength 1) or the noised image, plus the mask: as extra input channels for an
    inpainting model, as the region kept from the image for an ordinary one."""
    is_inpainting = canvas.model.config.is_inpainting
    pixels = pre.image_to_tensor(request.image, canvas.height, canvas.width)
    pixel_mask = pre.mask_to_tensor(soft_mask, canvas.height, canvas.width)
    init = None
    if not is_inpainting or request.strength < 1:
        init = encode_image(canvas, pixels)
    noise = canvas.noise()
    # diffusers' latent mask: nearest-neighbour downsampling of the binarised mask
    mask_latent = F.interpolate(pixel_mask, size=canvas.shape[-2:]).to(canvas.device, canvas.dtype)
    mask_latent = mask_latent.expand(canvas.batch, -1, -1, -1)
    if request.strength == 1:
        latents = noise * schedule.init_noise_sigma
    else:
        start = init
        if request.inpainting_fill != "original":  # A1111's masked content: the seed's noise, or 0
            fill = noise if request.inpainting_fill == "latent_noise" else torch.zeros_like(init)
            start = init * (1 - mask_latent) + fill * mask_latent
        latents = schedule.noised(start, noise)
    if is_inpainting:
        masked = encode_image(canvas, pixels * (pixel_mask < 0.5))
        return Start(latents, concat=torch.cat([mask_latent, masked], dim=1))
    return Start(latents, known=KnownRegion(init, noise, mask_latent))


INITIAL_LATENTS = {"txt2img": txt2img_latents, "img2img": img2img_latents, "inpaint": inpaint_latents}
