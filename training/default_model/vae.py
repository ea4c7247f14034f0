"""Stage 1: the KL autoencoder (Rombach et al. 2022, §3.1), f=8 with 4 latent channels like SD.

Loss: L1 reconstruction plus an L1 term on horizontal/vertical image differences (keeps the
anti-aliased edges sharp without LPIPS or a discriminator), plus the KL term with LDM's weight 1e-6
relative to the per-image summed reconstruction loss. Afterwards: reconstruction PSNR on fresh renders
and ``scale_factor`` = 1 / std of the latents, as LDM computes it before training the UNet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm.modules.autoencoder import AutoencoderKL

from ..shapes_data import ShapeImages, render_batch
from .common import Settings, load_weights, make_accelerator, model_config, save_weights, train, \
    write_json

STAGE = "vae"
# bf16 autocast: 1.8x faster steps on CPUs with AMX (and on GPUs); weights and evaluation stay fp32
DEFAULTS = dict(steps=5000, batch_size=32, lr=1e-3, warmup=200, save_every=500, mixed_precision="bf16")
EVAL_SEED_OFFSET = 7919
TARGET_PSNR_DB = 30.0  # fresh scenes: a run seed never used for training examples


@dataclass
class VAEOptions:
    kl_weight: float = 1e-6
    edge_weight: float = 0.5
    eval_images: int = 512
    scale_images: int = 2048


def _differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(model: AutoencoderKL, images: torch.Tensor, opts: VAEOptions,
             gen: torch.Generator | None = None) -> torch.Tensor:
    recon, posterior = model(images, generator=gen)
    loss = (recon - images).abs().mean()
    for a, b in zip(_differences(recon), _differences(images)):
        loss = loss + opts.edge_weight * 0.5 * (a - b).abs().mean()
    per_image = images[0].numel()  # LDM weighs the KL against the sum over an image's values
    return loss + opts.kl_weight * posterior.kl().mean() / per_image


@torch.no_grad()
def reconstruction_psnr(model: AutoencoderKL, count: int, seed: int, batch: int = 128) -> float:
    """Mean PSNR (dB) of 8-bit reconstructions (posterior mode) of ``count`` fresh renders."""
    model.eval()
    device = next(model.parameters()).device
    values = []
    for start in range(0, count, batch):
        images, _ = render_batch(seed, start, min(batch, count - start))
        images = images.to(device)
        recon = model.decode(model.encode(images).mode()).clamp(-1, 1)
        recon8 = ((recon + 1) * 127.5).round() / 255.0  # what a saved image holds
        mse = (recon8 - (images + 1) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        values += (10 * torch.log10(1 / mse)).tolist()
    return sum(values) / len(values)


@torch.no_grad()
def latent_statistics(model: AutoencoderKL, count: int, seed: int, batch: int = 128) -> dict:
    """Mean and std of posterior samples over ``count`` training renders; scale_factor = 1/std."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for start in range(0, count, batch):
        images, _ = render_batch(seed, start, min(batch, count - start))
        samples.append(model.encode(images.to(device)).sample(gen).float().cpu())
    z = torch.cat(samples)
    std = z.std().item()
    return {"latent_mean": z.mean().item(), "latent_std": std, "scale_factor": 1.0 / std}


def run(settings: Settings, opts: VAEOptions | None = None) -> dict:
    opts = opts or VAEOptions()
    settings.check()
    cfg = model_config(settings).autoencoder
    accelerator = make_accelerator(settings)
    from accelerate.utils import set_seed

    set_seed(settings.seed)
    model = AutoencoderKL(cfg)
    dataset = ShapeImages(settings.steps * settings.batch_size * accelerator.num_processes, settings.seed)

    def step(m, batch, gen):
        return vae_loss(m, batch["image"], opts, gen)

    model = train(settings, STAGE, model, dataset, step, accelerator)
    stats = {}
    if accelerator.is_main_process:
        stats = {"steps": settings.steps,
                 "psnr_db": reconstruction_psnr(model, opts.eval_images,
                                                settings.seed + EVAL_SEED_OFFSET),
                 **latent_statistics(model, opts.scale_images, settings.seed)}
        out = settings.out / STAGE
        save_weights(model.state_dict(), out / "autoencoder.safetensors")
        write_json(out / "stats.json", stats)
        accelerator.print(f"{STAGE}: reconstruction PSNR {stats['psnr_db']:.2f} dB on "
                          f"{opts.eval_images} fresh renders; scale_factor {stats['scale_factor']:.5f}")
        if stats["psnr_db"] < TARGET_PSNR_DB:
            accelerator.print(f"{STAGE}: below the {TARGET_PSNR_DB} dB target; continue with more "
                              f"--steps and --resume latest")
    accelerator.wait_for_everyone()
    return stats


def load_trained(settings: Settings) -> tuple[AutoencoderKL, float]:
    """The stage's autoencoder and scale factor (for the UNet and assemble stages)."""
    from .common import read_json, require

    out = settings.out / STAGE
    stats = read_json(out / "stats.json", STAGE)
    model = AutoencoderKL(model_config(settings).autoencoder)
    model.load_state_dict(load_weights(require(out / "autoencoder.safetensors", STAGE)))
    scale = float(stats["scale_factor"])
    if not math.isfinite(scale) or scale <= 0:
        raise RuntimeError(f"{out / 'stats.json'}: invalid scale_factor {scale}")
    return model.eval().requires_grad_(False), scale
