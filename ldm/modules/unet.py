"""The Stable Diffusion UNet (the openaimodel structure of Dhariwal & Nichol 2021, with the
SpatialTransformer cross-attention of Rombach et al. 2022). Attribute paths equal CompVis keys.

One extension point: :attr:`UNetModel.runner`, None for the plain forward below; :mod:`ldm.speed`
puts a runner there that computes the same function faster at inference.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import UNetConfig
from .attention import SpatialTransformer, pointwise


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (fractional) timesteps (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose members receive the time embedding or the context when they take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def upsample_nearest(x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Twice the size, or ``size``, by nearest neighbour (copies values: any dtype, bf16 too)."""
    if size is None:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=size, mode="nearest")


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # an explicit size lets latents that are not a multiple of 2**levels line up with the skips
        return self.conv(upsample_nearest(x, size))


class ResBlock(nn.Module):
    """Residual block with the time embedding added between its two convolutions."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))
        self.gradient_checkpointing = False

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        # at inference a 1×1 skip on a channels-last map runs as a matmul (see pointwise)
        skip = self.skip_connection(x) if self.training else pointwise(self.skip_connection, x)
        return skip + self.out_layers(h)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


def spatial_transformer(cfg: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    """The cross-attention transformer of a UNet level with ``ch`` channels."""
    heads, dim_head = cfg.heads_and_dim(ch)
    return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim,
                              cfg.use_linear_in_transformer, cfg.dropout)


def build_encoder(cfg: UNetConfig) -> tuple[nn.Sequential, nn.ModuleList, TimestepEmbedSequential,
                                             list[int]]:
    """The UNet's first half: ``time_embed``, ``input_blocks`` and ``middle_block`` (shared by
    :class:`UNetModel` and the ControlNet, whose copy has the same keys), and the channel count of
    each input block's output (the skip connections)."""
    mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
    time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    input_blocks = nn.ModuleList(
        [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skip_channels, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, cfg.dropout)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(spatial_transformer(cfg, ch, cfg.depth_at(level)))
            input_blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
            ds *= 2
    middle_block = TimestepEmbedSequential(
        ResBlock(ch, emb_dim, ch, cfg.dropout), spatial_transformer(cfg, ch, cfg.middle_depth),
        ResBlock(ch, emb_dim, ch, cfg.dropout))
    return time_embed, input_blocks, middle_block, skip_channels


def label_embedding(cfg: UNetConfig) -> nn.Sequential:
    """sgm's ``label_emb`` for ``num_classes: sequential``: the vector y → the time embedding's width
    (keys ``label_emb.0.0``, ``label_emb.0.2``)."""
    emb_dim = cfg.model_channels * 4
    return nn.Sequential(nn.Sequential(
        nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))


def check_vector(y: torch.Tensor | None, x: torch.Tensor, width: int,
                 what: str = "this UNet") -> torch.Tensor:
    """``y`` if it has one row of ``width`` per sample of ``x``, else a ValueError."""
    if y is None or y.shape != (x.shape[0], width):
        got = None if y is None else tuple(y.shape)
        raise ValueError(f"{what} needs a vector y of shape ({x.shape[0]}, {width}), got {got}")
    return y


class UNetRunner(Protocol):
    """Runs a :class:`UNetModel` in place of its plain forward: the same function (the outputs may
    differ by float rounding), computed another way. Installed in ``UNetModel.runner``."""

    def __call__(self, unet: UNetModel, x: torch.Tensor, timesteps: torch.Tensor,
                 context: torch.Tensor, control: list[torch.Tensor] | None = None
                 ) -> torch.Tensor: ...


class UNetModel(nn.Module):
    """Noise (or v) predictor ε(x_t, t, context)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.time_embed, self.input_blocks, self.middle_block, skip_channels = build_encoder(cfg)
        if cfg.adm_in_channels:  # sgm's num_classes "sequential": a vector y added to the time embedding
            self.label_emb = label_embedding(cfg)
        ch, ds = skip_channels[-1], 2 ** (len(cfg.channel_mult) - 1)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, cfg.dropout)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(spatial_transformer(cfg, ch, cfg.depth_at(level)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(),
                                 nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        # how to run this UNet instead of the plain forward (ldm.speed installs one; None: plain)
        self.runner: UNetRunner | None = None
        if cfg.use_checkpoint:
            self.set_gradient_checkpointing(True)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (trades compute for memory in training)."""
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    def embed_time(self, timesteps: torch.Tensor, x: torch.Tensor,
                   y: torch.Tensor | None = None) -> torch.Tensor:
        """The time embedding of each sample of ``x`` (one timestep is shared by all), plus
        ``label_emb(y)`` for a UNet with a vector input (SDXL)."""
        emb = embed_time(self.time_embed, self.config.model_channels, timesteps, x)
        if self.config.adm_in_channels:
            emb = emb + self.label_emb(check_vector(y, x, self.config.adm_in_channels).to(emb.dtype))
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                control: list[torch.Tensor] | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """``control``: a ControlNet's residuals, one per input block then one for the middle
        block, each added to that block's output where the decoder reads it (the skip connection;
        the encoder itself runs on unchanged values), as diffusers adds
        ``down_block_additional_residuals`` and ``mid_block_additional_residual``. ``y``: the
        vector conditioning of an SDXL UNet (pooled text and size embeddings), one row per sample."""
        if control is not None:
            check_control(self, control)
        if self.runner is not None:
            if y is not None:
                return self.runner(self, x, timesteps, context, control=control, y=y)
            if control is None:  # runners written before control residuals take four arguments
                return self.runner(self, x, timesteps, context)
            return self.runner(self, x, timesteps, context, control=control)
        emb = self.embed_time(timesteps, x, y)
        context = context.to(x.dtype)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            skips = [skip + residual.to(skip.dtype) for skip, residual in zip(skips, control)]
            h = h + control[-1].to(h.dtype)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            up_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, up_size)
        return self.out(h)


def embed_time(time_embed: nn.Module, model_channels: int, timesteps: torch.Tensor,
               x: torch.Tensor) -> torch.Tensor:
    """``time_embed`` of the sinusoidal embedding of each sample's timestep (one may be shared)."""
    if timesteps.dim() == 0:
        timesteps = timesteps[None]
    timesteps = timesteps.expand(x.shape[0])
    t_emb = timestep_embedding(timesteps, model_channels).to(x.dtype)
    return time_embed(t_emb)


def check_control(unet: UNetModel, control: list[torch.Tensor]) -> None:
    """Control residuals must be one per input block plus one for the middle block."""
    expected = len(unet.input_blocks) + 1
    if len(control) != expected:
        raise ValueError(f"control has {len(control)} residuals; this UNet takes {expected} "
                         f"(one per input block and one for the middle block)")
