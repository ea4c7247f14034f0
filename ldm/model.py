"""LatentDiffusion: UNet + autoencoder + text encoder + noise schedule, with CompVis state-dict keys
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``; SDXL's
``conditioner.embedders.*`` in place of the last).

The model also declares the state that other modules keep on it, each field written by one owner:
``source`` (:mod:`ldm.checkpoint`), ``speed`` (:mod:`ldm.speed`), ``lora`` (:mod:`ldm.lora`) and
``lora_names`` (:mod:`ldm.lora_formats`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .detect import Detection
from .lora import LoraState
from .lora_formats import NameTable
from .modules.attention import set_attention_backend
from .modules.autoencoder import AutoencoderKL
from .modules.conditioner import GeneralConditioner
from .modules.text import build_text_encoder
from .modules.tokenizer import tokenize
from .modules.unet import UNetModel
from .speed import SpeedOptions
from .speed.runner import guidance_copies


def make_betas(cfg: ModelConfig) -> torch.Tensor:
    """CompVis "linear" schedule: linear in sqrt(beta) (diffusers calls it scaled_linear)."""
    if cfg.beta_schedule != "linear":
        raise ValueError(f"unsupported beta schedule {cfg.beta_schedule!r}")
    return torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps,
                          dtype=torch.float64) ** 2


@dataclass(frozen=True)
class Prediction:
    """What the UNet predicts, as scalings between x_t, x_0, ε and v (Salimans & Ho 2022, §4)."""

    kind: str  # "eps" or "v"

    def target(self, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
        """Training target for x_t = a·x0 + s·ε, with a = sqrt(ᾱ_t), s = sqrt(1-ᾱ_t)."""
        return noise if self.kind == "eps" else a * noise - s * x0


@dataclass(frozen=True)
class LoadInfo:
    """Where a loaded model came from, and how its configuration was chosen."""

    path: str
    detection: Detection | None
    config_source: str
    use_ema: bool = False

    @property
    def name(self) -> str:
        p = Path(self.path)
        return p.name if p.is_dir() else p.stem


def posterior_latents(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor,
                      scale_factor: float) -> torch.Tensor:
    """A sample of the autoencoder's posterior N(mean, std²) in SD's scaled latent space:
    (mean + std·eps)·scale_factor (Rombach et al. 2022, §4.3.2: unit-variance latents)."""
    return (mean + std * eps) * scale_factor


class DiffusionWrapper(nn.Module):
    """Holds the UNet under ``diffusion_model`` and concatenates inpainting inputs ("hybrid")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.diffusion_model = UNetModel(cfg.unet)
        self.conditioning_key = cfg.conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                concat: torch.Tensor | None = None,
                control: list[torch.Tensor] | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditioning_key == "hybrid":
            if concat is None:
                raise ValueError("an inpainting model needs mask and masked-image latents (concat)")
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        if y is not None:
            return self.diffusion_model(x, t, context, control=control, y=y)
        if control is None:
            return self.diffusion_model(x, t, context)
        return self.diffusion_model(x, t, context, control=control)


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DiffusionWrapper(cfg)
        self.first_stage_model = AutoencoderKL(cfg.autoencoder)
        if cfg.conditioner is not None:  # SDXL: the text towers and size embedders
            self.conditioner = GeneralConditioner(cfg.conditioner)
        else:
            self.cond_stage_model = build_text_encoder(cfg.text)
        self.prediction = Prediction(cfg.parameterization)
        self.scale_factor = cfg.scale_factor
        # a plain attribute, not a buffer: model.to(float16) must not round the schedule
        self.alphas_cumprod = torch.cumprod(1 - make_betas(cfg), 0).float()
        # the file or folder it was loaded from (ldm.checkpoint; None when built in code)
        self.source: LoadInfo | None = None
        # the inference switches in force (ldm.speed.apply_speed; None: the plain model)
        self.speed: SpeedOptions | None = None
        # the applied LoRA adapters (ldm.lora; None until the first one)
        self.lora: LoraState | None = None
        # LoRA names of the plain model's layers, computed once (ldm.lora_formats.name_table)
        self.lora_names: NameTable | None = None

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> nn.Module:
        return self.conditioner if self.config.is_sdxl else self.cond_stage_model

    def set_attention_backend(self, name: str) -> str:
        """Choose "sdpa", "xformers" or "math" for every attention layer; returns the one in use."""
        return set_attention_backend(self, name)

    # text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return tokenize(self.config.text, texts)

    def get_learned_conditioning(self, texts: list[str] | torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """The text encoder's output for prompts, or for token ids (B, max_length) already made
        (weighted and chunked prompts make their own)."""
        if self.config.is_sdxl:
            raise ValueError("an SDXL model is conditioned through sdxl_conditioning")
        device = next(self.cond_stage_model.parameters()).device
        ids = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.cond_stage_model(ids.to(device), clip_skip=clip_skip)

    def sdxl_conditioning(self, texts: list[str] | list[torch.Tensor],
                          values: dict[str, torch.Tensor], clip_skip: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's (context, y) for prompts, or for token ids made per text tower; ``values``: the
        size/crop/aesthetic numbers by sgm input key, (batch, n) each."""
        cond = self.conditioner
        if texts and isinstance(texts[0], str):
            texts = [tokenize(t, texts) for t in cond.config.texts]
        context, pooled = cond.encode_text(texts, clip_skip)
        return context, cond.vector(pooled, values)

    # autoencoder, with SD's latent scaling
    def encode_first_stage(self, images: torch.Tensor, generator: torch.Generator | None = None,
                           sample: bool = True) -> torch.Tensor:
        posterior = self.first_stage_model.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1]; ``z`` is unscaled in its own dtype, then cast to the autoencoder's."""
        dtype = next(self.first_stage_model.parameters()).dtype
        return self.first_stage_model.decode((z / self.scale_factor).to(dtype))

    # diffusion
    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    concat: torch.Tensor | None = None,
                    control: list[torch.Tensor] | None = None,
                    y: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's raw output (ε or v, per ``config.parameterization``).

        ``context`` may hold k × as many rows as ``x_t``: the batch is then evaluated under each of
        the k conditionings (classifier-free guidance's [uncond, cond] with k = 2), as if ``x_t``,
        ``t`` and ``concat`` were repeated k times (which is what happens without speed applied); with
        the speed option ``shared_cfg_prefix`` the layers before the UNet's first cross-attention
        run once for all k.

        ``control``: ControlNet residuals (see ``UNetModel.forward``), with one row per row of
        ``context``; so has ``y``, SDXL's vector conditioning (then no prefix is shared)."""
        copies = guidance_copies(x_t, context)
        shared = self.speed is not None and self.speed.shared_cfg_prefix and y is None
        if copies > 1 and not shared:
            x_t = torch.cat([x_t] * copies)
            t = torch.cat([t] * copies) if t.dim() else t
            concat = None if concat is None else torch.cat([concat] * copies)
        return self.model(x_t, t, context, concat, control, y)
