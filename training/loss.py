"""The one diffusion loss of every trainer that teaches a UNet to denoise (DDPM training, Ho et al.
2020, Algorithm 1): x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε, and the UNet's output is compared with the
target its parameterisation (:class:`ldm.model.Prediction`: ε or v) asks for. Options: min-SNR-γ
weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"), offset
noise (Guttenberg 2023), per-sample weights (prior preservation).

The random draws are separate small functions on a CPU generator, as diffusers draws them, so
every trainer keeps its own order of draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.model import Prediction, make_betas


def randn(shape, gen: torch.Generator, device) -> torch.Tensor:
    """Standard normal noise drawn on the CPU generator, then moved to ``device``."""
    return torch.randn(shape, generator=gen).to(device)


def draw_noise(shape, gen: torch.Generator, device, offset: float = 0.0) -> torch.Tensor:
    """ε, plus ``offset`` times one normal value per sample and channel (offset noise)."""
    noise = randn(shape, gen, device)
    if offset:
        noise = noise + offset * randn((shape[0], shape[1], 1, 1), gen, device)
    return noise


def draw_timesteps(count: int, timesteps: int, gen: torch.Generator, device) -> torch.Tensor:
    """``count`` training timesteps, uniform in [0, timesteps)."""
    return torch.randint(0, timesteps, (count,), generator=gen).to(device)


def posterior(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The autoencoder posterior (mean, std) of a batch: cached (``mean``/``std``) or encoded
    from its ``pixels``, in float32."""
    if "pixels" not in batch:
        return batch["mean"].to(device), batch["std"].to(device)
    vae = model.first_stage_model
    encoded = vae.encode(batch["pixels"].to(device, next(vae.parameters()).dtype))
    return encoded.mean.float(), encoded.std.float()


@torch.no_grad()
def noised_batch(model, diffusion: "DiffusionLoss", batch: dict, gen: torch.Generator, device,
                 noise_offset: float = 0.0):
    """(x_t, t, target) of a latent-diffusion training batch, drawn in the trainers' order:
    the posterior sample, the noise (offset noise after it), then the timesteps."""
    from ldm.model import posterior_latents

    mean, std = posterior(model, batch, device)
    z = posterior_latents(mean, std, randn(mean.shape, gen, device), model.scale_factor)
    noise = draw_noise(z.shape, gen, device, noise_offset)
    t = draw_timesteps(z.shape[0], model.config.timesteps, gen, device)
    x_t, target = diffusion.noised(z, t, noise)
    return x_t, t, target


@dataclass(frozen=True)
class DiffusionLoss:
    """The noising of x_0 and the loss of the UNet's output, for one noise schedule."""

    alphas_cumprod: torch.Tensor  # ᾱ_t, float32, one per training timestep
    prediction: Prediction
    min_snr_gamma: float | None = None

    @classmethod
    def for_config(cls, cfg, min_snr_gamma: float | None = None) -> "DiffusionLoss":
        """From a model config (for a UNet trained outside a :class:`ldm.model.LatentDiffusion`)."""
        return cls(torch.cumprod(1 - make_betas(cfg), 0).float(), Prediction(cfg.parameterization),
                   min_snr_gamma)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """(x_t, target) for clean latents ``x0`` at timesteps ``t``."""
        ac = self.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
        a, s = ac.sqrt(), (1 - ac).sqrt()
        return a * x0 + s * noise, self.prediction.target(x0, noise, a, s)

    def __call__(self, output: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error in float32. Without per-sample weights (min-SNR, ``weight``) it is
        the mean over all values; with them, the mean of the weighted per-sample means."""
        error = (output.float() - target) ** 2
        if weight is None and not self.min_snr_gamma:
            return error.mean()
        per_sample = error.mean(dim=tuple(range(1, error.dim())))
        if self.min_snr_gamma:
            ac = self.alphas_cumprod.to(output.device)[t]
            snr = ac / (1 - ac)
            clipped = torch.clamp(snr, max=self.min_snr_gamma)
            v = self.prediction.kind == "v"  # the v target weighs each timestep by snr + 1
            per_sample = per_sample * (clipped / (snr + 1 if v else snr))
        if weight is not None:
            per_sample = per_sample * weight
        return per_sample.mean()
