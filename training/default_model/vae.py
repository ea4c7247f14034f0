"""Stage 1: the KL autoencoder (Rombach et al. 2022, §3.1), f=8 with 4 latent channels like SD.

Loss: L1 reconstruction plus an L1 term on horizontal/vertical image differences (keeps the
anti-aliased edges sharp without LPIPS or a discriminator), both weighted up on and around the shape
(see :func:`shape_region_weights`), plus L1 of 2×/4×-pooled images (outlines such as a triangle's
corners, which edge jitter does not hide there), plus the KL term with LDM's weight 1e-6 relative
to the per-image summed reconstruction loss. Afterwards: reconstruction PSNR and the analyzer's
shape accuracy on fresh renders, and ``scale_factor`` = 1 / std of the latents, as LDM computes it
before training the UNet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm.modules.autoencoder import AutoencoderKL

from ..shapes.datasets import ShapeImages, render_batch
from .common import Settings, fit, load_weights, model_config, save_weights, stage_engine, write_json

STAGE = "vae"
# bf16 autocast: 1.8x faster steps on CPUs with AMX (and on GPUs); weights and evaluation stay fp32
DEFAULTS = dict(steps=5000, batch_size=32, lr=1e-3, warmup=200, save_every=500, mixed_precision="bf16")
EVAL_SEED_OFFSET = 7919
TARGET_PSNR_DB = 30.0  # fresh scenes: a run seed never used for training examples


@dataclass
class VAEOptions:
    kl_weight: float = 1e-6
    edge_weight: float = 0.5
    pyramid_weight: float = 1.0
    shape_weight: float = 10.0
    eval_images: int = 512
    scale_images: int = 2048


def _differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def shape_region_weights(images: torch.Tensor, weight: float, margin: int = 3) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): 1 + ``weight`` on and within ``margin`` px of the shape.

    An L1 gradient has the same size for every pixel however small its error, so on scenes that
    are ~80 % flat background (shape plus margin: ~20 %) the background's residual signs outvote the
    shape's pixels; weighting the shape region gives the shape its share of the gradient."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0],
                        images[..., 1:-1, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    shape = ((images - background).abs().amax(dim=1, keepdim=True) > 0.1).float()
    region = torch.nn.functional.max_pool2d(shape, 2 * margin + 1, stride=1, padding=margin)
    return 1 + weight * region


def vae_loss(model: AutoencoderKL, images: torch.Tensor, opts: VAEOptions,
             gen: torch.Generator | None = None) -> torch.Tensor:
    recon, posterior = model(images, generator=gen)
    w = shape_region_weights(images, opts.shape_weight) if opts.shape_weight else None

    def l1(a, b, weights=None):
        if weights is None:
            return (a - b).abs().mean()
        return ((a - b).abs() * weights).mean() / weights.mean()

    loss = l1(recon, images, w)
    weight_pairs = (w[..., :, 1:], w[..., 1:, :]) if w is not None else (None, None)
    for a, b, wd in zip(_differences(recon), _differences(images), weight_pairs):
        loss = loss + opts.edge_weight * 0.5 * l1(a, b, wd)
    for factor in (2, 4):  # coarse scales: edge jitter averages out, missing corners do not
        pooled = [torch.nn.functional.avg_pool2d(x, factor) for x in (recon, images)]
        loss = loss + opts.pyramid_weight * (pooled[0] - pooled[1]).abs().mean()
    per_image = images[0].numel()  # LDM weighs the KL against the sum over an image's values
    return loss + opts.kl_weight * posterior.kl().mean() / per_image


@torch.no_grad()
def reconstruction_figures(model: AutoencoderKL, count: int, seed: int, batch: int = 128) -> dict:
    """One pass over ``count`` fresh renders, reconstructed from the posterior mode as 8-bit images:
    mean PSNR (``psnr_db``) and, per shape, the share the analyzer reads as the same shape
    (``shape_<name>``, ``shape_all``). PSNR alone hides blunt triangle corners, which turn into
    circles for the analyzer."""
    from pipelines.preprocess import to_uint8

    from ..shapes import SHAPES, analyze

    model.eval()
    device = next(model.parameters()).device
    psnr, hits = [], {s: [0, 0] for s in SHAPES}
    for start in range(0, count, batch):
        images, specs = render_batch(seed, start, min(batch, count - start))
        recon8 = to_uint8(model.decode(model.encode(images.to(device)).mode()))  # as saved
        mse = (torch.from_numpy(recon8).permute(0, 3, 1, 2) / 255.0 - (images + 1) / 2)
        psnr += (10 * torch.log10(1 / mse.pow(2).flatten(1).mean(1).clamp_min(1e-10))).tolist()
        for arr, spec in zip(recon8, specs):
            hits[spec.shape][0] += analyze(arr).shape == spec.shape
            hits[spec.shape][1] += 1
    out = {"psnr_db": sum(psnr) / len(psnr)}
    out.update({f"shape_{s}": h / max(n, 1) for s, (h, n) in hits.items()})
    out["shape_all"] = sum(h for h, _ in hits.values()) / max(count, 1)
    return out


def reconstruction_shapes(model: AutoencoderKL, count: int, seed: int, batch: int = 128) -> dict:
    """The shape shares of :func:`reconstruction_figures`."""
    figures = reconstruction_figures(model, count, seed, batch)
    return {k: v for k, v in figures.items() if k.startswith("shape_")}


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
    engine = stage_engine(settings, STAGE)
    accelerator = engine.accelerator
    engine.seed()
    model = AutoencoderKL(cfg)
    dataset = ShapeImages(settings.steps * settings.batch_size * accelerator.num_processes, settings.seed)

    def step(m, batch, gen):
        return vae_loss(m, batch["image"], opts, gen)

    fit(engine, settings, model, dataset, step)
    stats = {}
    if accelerator.is_main_process:
        stats = {"steps": settings.steps,
                 **reconstruction_figures(model, opts.eval_images, settings.seed + EVAL_SEED_OFFSET),
                 **latent_statistics(model, opts.scale_images, settings.seed)}
        out = settings.out / STAGE
        save_weights(model.state_dict(), out / "autoencoder.safetensors")
        write_json(out / "stats.json", stats)
        accelerator.print(f"{STAGE}: reconstruction PSNR {stats['psnr_db']:.2f} dB, shape kept "
                          f"{stats['shape_all']:.1%} (triangles {stats['shape_triangle']:.1%}) on "
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
