"""Stage 3: the UNet, trained on latents precomputed with the frozen autoencoder of stage 1 and
conditioned on the frozen text encoder of stage 2.

DDPM training (Ho et al. 2020, Algorithm 1) with ε-prediction on SD's noise schedule; 10% of the
captions are replaced by the empty caption so one model also gives the unconditional prediction of
classifier-free guidance (Ho & Salimans 2022). Output layers start at zero, as in the openaimodel
UNet, so every block starts as the identity; the saved weights are an EMA of the trained ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm.model import posterior_latents
from ldm.modules.attention import SpatialTransformer
from ldm.modules.tokenizer import tokenize
from ldm.modules.unet import ResBlock, UNetModel
from ..shapes import training_example
from ..shapes.datasets import LatentCaptions, example_seed, render_batch
from . import clip as clip_stage
from . import vae as vae_stage
from ..engine import EMA
from ..loss import DiffusionLoss, draw_noise, draw_timesteps, randn
from .common import Settings, fit, load_weights, model_config, save_weights, stage_engine, write_json

STAGE = "unet"
DEFAULTS = dict(steps=8000, batch_size=64, lr=3e-4, warmup=500, save_every=1000)
LATENT_SEED_OFFSET = 2


@dataclass
class UNetOptions:
    latents: int = 30000  # distinct scenes encoded once with the frozen autoencoder
    caption_dropout: float = 0.1
    ema_decay: float = 0.999


def zero_init_(unet: UNetModel) -> UNetModel:
    """Zero the last layer of every residual branch and the output convolution (openaimodel's
    ``zero_module``): training starts from identity blocks and a zero prediction."""
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.out_layers[-1].weight)
                nn.init.zeros_(module.out_layers[-1].bias)
            elif isinstance(module, SpatialTransformer):
                nn.init.zeros_(module.proj_out.weight)
                nn.init.zeros_(module.proj_out.bias)
        nn.init.zeros_(unet.out[-1].weight)
        nn.init.zeros_(unet.out[-1].bias)
    return unet


@torch.no_grad()
def encode_latents(settings: Settings, count: int, batch: int = 256) -> dict[str, torch.Tensor]:
    """Posterior mean and std of ``count`` training scenes, cached in ``out/unet/latents.safetensors``
    (reused when count and seed match)."""
    path = settings.out / STAGE / "latents.safetensors"
    seed = settings.seed + LATENT_SEED_OFFSET
    if path.is_file():
        cached = load_weights(path)
        if len(cached["mean"]) == count and int(cached["seed"]) == seed:
            return cached
    vae, _ = vae_stage.load_trained(settings)
    means, stds = [], []
    for start in range(0, count, batch):
        images, _ = render_batch(seed, start, min(batch, count - start))
        posterior = vae.encode(images)
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
    latents = {"mean": torch.cat(means), "std": torch.cat(stds), "seed": torch.tensor(seed)}
    save_weights(latents, path)
    return latents


class CaptionContexts:
    """Frozen text-encoder outputs, cached per caption (the training captions are a few thousand)."""

    def __init__(self, encoder: nn.Module):
        self.encoder, self.cache = encoder, {}

    @torch.no_grad()
    def __call__(self, captions: list[str], device: torch.device) -> torch.Tensor:
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            out = self.encoder(tokenize(self.encoder.config, new)).float()
            self.cache.update(zip(new, out))
        return torch.stack([self.cache[c] for c in captions]).to(device)


def run(settings: Settings, opts: UNetOptions | None = None) -> dict:
    opts = opts or UNetOptions()
    settings.check()
    cfg = model_config(settings)
    engine = stage_engine(settings, STAGE)
    accelerator = engine.accelerator
    _, scale_factor = vae_stage.load_trained(settings)
    contexts = CaptionContexts(clip_stage.load_text_encoder(settings))
    if accelerator.is_main_process:
        encode_latents(settings, opts.latents)
    accelerator.wait_for_everyone()
    latents = encode_latents(settings, opts.latents)
    specs = [training_example(example_seed(int(latents["seed"]), i))[0]
             for i in range(opts.latents)]
    dataset = LatentCaptions(latents["mean"], latents["std"], specs,
                             settings.steps * settings.batch_size * accelerator.num_processes,
                             settings.seed)

    engine.seed()
    unet = zero_init_(UNetModel(cfg.unet))
    ema = EMA(unet, opts.ema_decay)
    diffusion = DiffusionLoss.for_config(cfg)

    def step(model, batch, gen):
        mean = batch["mean"]
        z = posterior_latents(mean, batch["std"], randn(mean.shape, gen, mean.device), scale_factor)
        drop = (torch.rand(len(z), generator=gen) < opts.caption_dropout).tolist()
        context = contexts(["" if d else c for d, c in zip(drop, batch["caption"])], z.device)
        t = draw_timesteps(len(z), cfg.timesteps, gen, z.device)
        x_t, target = diffusion.noised(z, t, draw_noise(mean.shape, gen, z.device))
        return diffusion(model(x_t, t, context), target, t)

    fit(engine, settings, unet, dataset, step, ema=ema)
    stats = {}
    if accelerator.is_main_process:
        out = settings.out / STAGE
        save_weights(ema.shadow, out / "unet.safetensors")
        stats = {"steps": settings.steps, "latents": opts.latents, "scale_factor": scale_factor}
        write_json(out / "stats.json", stats)
    accelerator.wait_for_everyone()
    return stats


def load_trained(settings: Settings) -> UNetModel:
    from .common import require

    unet = UNetModel(model_config(settings).unet)
    unet.load_state_dict(load_weights(require(settings.out / STAGE / "unet.safetensors", STAGE)))
    return unet.eval()
