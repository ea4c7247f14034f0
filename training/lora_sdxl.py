"""The SDXL parts of the LoRA trainer (:mod:`training.lora` calls them for SDXL base models).

SDXL conditions the UNet on both towers' token states (CLIP-L's and bigG's, side by side) and on a
vector ``y``: bigG's pooled projection followed by the Fourier features of the size numbers
(Podell et al. 2023, §2.2). Training uses the numbers that inference uses by default for an image
of the training size (:mod:`pipelines.sdxl`, diffusers' defaults): original size = target size =
the training resolution, crop (0, 0), so a LoRA is trained under the conditioning it is used with. ``--train-text-encoder`` adapts both towers, or one:
``te1`` (CLIP-L, diffusers' ``text_encoder``) or ``te2`` (bigG, ``text_encoder_2``), kohya's names.
"""
from __future__ import annotations

import torch
from torch import nn

from .engine import TrainingError
from .loss import DiffusionLoss, noised_batch

TOWERS = {"te1": ("text_encoder",), "te2": ("text_encoder_2",)}
BOTH = ("text_encoder", "text_encoder_2")


def text_components(model, train_text_encoder) -> tuple[str, ...]:
    """diffusers' names of the towers that text targets adapt, from ``--train-text-encoder``
    (True: every tower; "te1" / "te2": that SDXL tower)."""
    if train_text_encoder in (False, True, None):
        return BOTH
    if train_text_encoder not in TOWERS:
        raise TrainingError(f"--train-text-encoder {train_text_encoder!r}: te1 (CLIP-L) or te2 (bigG)")
    if not model.config.is_sdxl:
        raise TrainingError(f"--train-text-encoder {train_text_encoder}: te1 and te2 name SDXL's two "
                            "text encoders; this model has one (give the option without a value)")
    return TOWERS[train_text_encoder]


def check_model(model, path) -> None:
    """SDXL base models only: the refiner conditions on an aesthetic score and refines images."""
    if not any(t.kind == "clip" for t in model.config.conditioner.texts):
        raise TrainingError(f"{path}: an SDXL refiner; LoRA training takes SDXL base models")


class SDXLDenoiser(nn.Module):
    """What Accelerate wraps: the UNet, and the conditioner (both towers) when text trains."""

    def __init__(self, model):
        super().__init__()
        self.wrapper = model.model
        self.text = model.conditioner

    def forward(self, x_t, t, tokens=None, values=None, context=None, y=None):
        if context is None:
            context, pooled = self.text.encode_text(tokens)
            y = self.text.vector(pooled, values)
        return self.wrapper(x_t, t, context, y=y)


def size_ids(model, rows: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """The micro-conditioning numbers of ``rows`` training images of one size, by sgm key."""
    from pipelines.sdxl import size_values

    numbers = {"original_size_as_tuple": (height, width), "crop_coords_top_left": (0, 0),
               "target_size_as_tuple": (height, width)}
    return size_values(model.config.conditioner, rows, numbers)


class SDXLLoraLoss:
    """Diffusion loss of one micro-batch with SDXL's (context, y) conditioning."""

    def __init__(self, model, settings, device, train_text: bool):
        self.model, self.device, self.train_text = model, device, train_text
        self.noise_offset = settings.noise_offset
        self.diffusion = DiffusionLoss(model.alphas_cumprod, model.prediction, settings.min_snr_gamma)

    def __call__(self, denoiser, batch: dict, gen: torch.Generator) -> torch.Tensor:
        from ldm.modules.tokenizer import tokenize

        model, device = self.model, self.device
        x_t, t, target = noised_batch(model, self.diffusion, batch, gen, device, self.noise_offset)
        down = model.config.autoencoder.downscale
        values = size_ids(model, x_t.shape[0], x_t.shape[-2] * down, x_t.shape[-1] * down)
        values = {k: v.to(device) for k, v in values.items()}
        cond = model.conditioner
        tokens = [tokenize(tower, batch["caption"]).to(device) for tower in cond.config.texts]
        context = y = None
        if not self.train_text:
            with torch.no_grad():
                context, pooled = cond.encode_text(tokens)
                y = cond.vector(pooled, values)
        pred = denoiser(x_t, t, tokens=tokens, values=values, context=context, y=y)
        weight = batch["weight"].to(device) if "weight" in batch else None  # --prior-loss-weight
        return self.diffusion(pred, target, t, weight)


def sdxl_parts(model, settings, device, train_text: bool, path=None):
    """(module for Accelerate, loss) of an SDXL LoRA run."""
    check_model(model, path or settings.checkpoint)
    return SDXLDenoiser(model), SDXLLoraLoss(model, settings, device, train_text)
