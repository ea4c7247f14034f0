"""The Stable Diffusion UNet (the openaimodel structure of Dhariwal & Nichol 2021, with the
SpatialTransformer cross-attention of Rombach et al. 2022). Attribute paths equal CompVis keys."""
from __future__ import annotations

import math

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


_prepack_ok: dict[torch.dtype, bool] = {}


def prepack_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build and CPU run oneDNN's prepacked convolution in ``dtype`` (probed
    once per dtype with a real call: bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    if dtype not in _prepack_ok:
        try:
            x = torch.ones(1, 8, 4, 4, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.ones(8, 8, 3, 3, dtype=dtype)
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1,
                                                               list(x.shape))
            y = torch.ops.mkldnn._convolution_pointwise(x, packed, None, [1, 1], [1, 1], [1, 1], 1,
                                                        "none", [], "")
            _prepack_ok[dtype] = bool(torch.allclose(y.float(), F.conv2d(x, w, padding=1).float()))
        except Exception:  # no oneDNN, no kernel for this dtype on this CPU, or the private ops changed
            _prepack_ok[dtype] = False
    return _prepack_ok[dtype]


def conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, or, while a sampling run has opened ``layer.prepacked`` (ldm.speed, CPU only),
    the same convolution with its weight reordered into oneDNN's blocked layout once per run and
    input shape instead of on every call (the reorder is ~30 % of a small convolution's time)."""
    cache = layer.__dict__.get("prepacked")
    if (cache is None or x.device.type != "cpu" or torch.is_grad_enabled()
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return layer(x)
    args = (list(layer.padding), list(layer.stride), list(layer.dilation), layer.groups)
    key = tuple(x.shape)
    weight = cache.get(key)
    if weight is None:
        weight = cache[key] = torch._C._nn.mkldnn_reorder_conv2d_weight(
            layer.weight.to_mkldnn(), *args[:3], args[3], list(key))
    return torch.ops.mkldnn._convolution_pointwise(x, weight, layer.bias, *args, "none", [], "")


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose members receive the time embedding or the context when they take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                upsample_size: tuple[int, int] | None = None, copies: int = 1) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, copies)
                if copies > 1:  # the batches differ from the first cross-attention on
                    emb, copies = torch.cat([emb] * copies), 1
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = conv(layer, x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv(self.op, x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # an explicit size lets latents that are not a multiple of 2**levels line up with the skips;
        # nearest-neighbour copies values, so it runs in any dtype (bf16 included) without a cast
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return conv(self.conv, x)


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
        if self.training:
            h = self.in_layers(x)
            h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
            return self.skip_connection(x) + self.out_layers(h)
        # inference: the same layers without the Sequential wrappers and the (identity) dropout;
        # convolutions and linears are still called as modules, so LoRA wrappers apply
        norm1, _, conv1 = self.in_layers
        norm2, _, _, conv2 = self.out_layers
        h = conv(conv1, F.silu(norm1(x)))
        h = h + self.emb_layers[1](F.silu(emb))[:, :, None, None].to(h.dtype)
        h = conv(conv2, F.silu(norm2(h)))
        return pointwise(self.skip_connection, x) + h

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class UNetModel(nn.Module):
    """Noise (or v) predictor ε(x_t, t, context)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(ch: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_and_dim(ch)
            return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                                      cfg.use_linear_in_transformer, cfg.dropout)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, cfg.dropout)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, cfg.dropout), transformer(ch), ResBlock(ch, emb_dim, ch, cfg.dropout))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, cfg.dropout)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(),
                                 nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        # inference switches set by ldm.speed: run in channels-last layout; a CUDA-graph runner
        self.channels_last = False
        self.graphed = None
        if cfg.use_checkpoint:
            self.set_gradient_checkpointing(True)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (trades compute for memory in training)."""
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.graphed is not None and not torch.compiler.is_compiling():
            return self.graphed(x, timesteps, context)
        return self.run(x, timesteps, context)

    def run(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet itself (``forward`` may replay a captured CUDA graph of it instead).

        A ``context`` with k > 1 times as many rows as ``x`` evaluates ``x`` under each of the k
        conditionings: the result is ``run(torch.cat([x] * k), t, context)``. Classifier-free
        guidance's [uncond, cond] batches share their latents and timesteps, so everything before
        the first cross-attention (the input convolution, the first ResBlock and self-attention —
        at full resolution among the costliest layers) is the same for all k and runs once."""
        copies = context.shape[0] // x.shape[0] if x.shape[0] else 1
        if context.shape[0] != copies * x.shape[0]:
            raise ValueError(f"context has {context.shape[0]} rows, not a multiple of the batch "
                             f"{x.shape[0]}")
        if timesteps.dim() == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb)
        context = context.to(x.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        h = x
        for block in self.input_blocks:
            if copies > 1 and any(isinstance(layer, SpatialTransformer) for layer in block):
                h = block(h, emb, context, copies=copies)
                emb, copies = torch.cat([emb] * copies), 1
            else:
                h = block(h, emb, context)
            skips.append(h)
        if copies > 1:  # no cross-attention before the middle block
            h, emb = torch.cat([h] * copies), torch.cat([emb] * copies)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            skip = skips.pop()
            if skip.shape[0] != h.shape[0]:  # a skip from the shared part
                skip = torch.cat([skip] * (h.shape[0] // skip.shape[0]))
            h = torch.cat([h, skip], dim=1)
            up_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, up_size)
        norm, _, out = self.out
        return conv(out, F.silu(norm(h))).contiguous()
