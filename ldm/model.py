"""LatentDiffusion: UNet + autoencoder + text encoder + noise schedule, with CompVis state-dict keys
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .modules.attention import set_attention_backend
from .modules.autoencoder import AutoencoderKL
from .modules.text import build_text_encoder, tokenize
from .modules.unet import UNetModel


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

    def to_eps(self, out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
        return out if self.kind == "eps" else s * x_t + a * out

    def to_x0(self, out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
        return (x_t - s * out) / a if self.kind == "eps" else a * x_t - s * out


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
                concat: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditioning_key == "hybrid":
            if concat is None:
                raise ValueError("an inpainting model needs mask and masked-image latents (concat)")
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        return self.diffusion_model(x, t, context)


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DiffusionWrapper(cfg)
        self.first_stage_model = AutoencoderKL(cfg.autoencoder)
        self.cond_stage_model = build_text_encoder(cfg.text)
        self.prediction = Prediction(cfg.parameterization)
        self.scale_factor = cfg.scale_factor
        # a plain attribute, not a buffer: model.to(float16) must not round the schedule
        self.alphas_cumprod = torch.cumprod(1 - make_betas(cfg), 0).float()

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> nn.Module:
        return self.cond_stage_model

    def set_attention_backend(self, name: str) -> str:
        """Choose "sdpa", "xformers" or "math" for every attention layer; returns the one in use."""
        return set_attention_backend(self, name)

    # text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return tokenize(self.config.text, texts)

    def get_learned_conditioning(self, texts: list[str], clip_skip: int = 0) -> torch.Tensor:
        device = next(self.cond_stage_model.parameters()).device
        return self.cond_stage_model(self.tokenize(texts).to(device), clip_skip=clip_skip)

    # autoencoder, with SD's latent scaling
    def encode_first_stage(self, images: torch.Tensor, generator: torch.Generator | None = None,
                           sample: bool = True) -> torch.Tensor:
        posterior = self.first_stage_model.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    # diffusion
    def _coefficients(self, t: torch.Tensor, like: torch.Tensor):
        ac = self.alphas_cumprod.to(like.device)[t.long().to(like.device)]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return ac.sqrt().view(shape), (1 - ac).sqrt().view(shape)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t, x0)
        return (a * x0 + s * noise).to(x0.dtype)

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t, x0)
        return self.prediction.target(x0, noise, a, s).to(x0.dtype)

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    concat: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's raw output (ε or v, per ``config.parameterization``).

        ``context`` may hold k × as many rows as ``x_t``: the batch is then evaluated under each of
        the k conditionings (classifier-free guidance's [uncond, cond] with k = 2), as if ``x_t``,
        ``t`` and ``concat`` were repeated k times; with the speed option ``shared_cfg_prefix``
        the layers before the UNet's first cross-attention run once for all k."""
        copies = context.shape[0] // x_t.shape[0] if x_t.shape[0] else 1
        if copies > 1 and not getattr(getattr(self, "speed", None), "shared_cfg_prefix", True):
            x_t = torch.cat([x_t] * copies)
            t = torch.cat([t] * copies) if t.dim() else t
            concat = None if concat is None else torch.cat([concat] * copies)
        return self.model(x_t, t, context, concat)
