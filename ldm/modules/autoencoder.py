"""KL-regularised autoencoder (Rombach et al. 2022, LDM §3.1 and appendix G); CompVis key layout.

Images in [-1, 1] ↔ latents with ``2**(len(ch_mult)-1)`` times smaller sides. Large images can be
processed in overlapping tiles blended linearly across the overlap, so no seam shows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AutoencoderConfig
from .attention import attention


# Batches whose estimated activations exceed this are coded one sample at a time (see
# AutoencoderKL.activation_bytes): SD's autoencoder decoding four 512² images in fp16 is ~3 GiB.
SLICE_BYTES = 1 << 30


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1×1-convolution projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.attention_backend = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, self.attention_backend)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        if not x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous()  # keep one layout: the reshape above is a channels-last view
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # CompVis pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # any dtype, bf16 too


def _level(blocks: list[nn.Module], attn: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attn)
    return level


def _mid(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        resolution = cfg.resolution
        in_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * mult
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if resolution in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            level = _level(blocks, attn)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(level)
        self.mid = _mid(block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, (2 if cfg.double_z else 1) * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        resolution = cfg.resolution // cfg.downscale
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg.dropout)
        up: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if resolution in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            level = _level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(block_in)
                resolution *= 2
            up.insert(0, level)  # keep CompVis indexing: up[0] is the full-resolution level
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))) from the encoder's moments."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # noise drawn on the generator's device, as diffusers' randn_tensor does
        gen_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=gen_device,
                            dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over latent dimensions."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar, dim=[1, 2, 3])


def _blend(a: torch.Tensor, b: torch.Tensor, overlap: int, dim: int) -> torch.Tensor:
    """Linear cross-fade of the last ``overlap`` rows/cols of ``a`` into the first ones of ``b``."""
    overlap = min(overlap, a.shape[dim], b.shape[dim])
    if overlap == 0:
        return b
    ramp = torch.linspace(0, 1, overlap + 2, device=b.device, dtype=b.dtype)[1:-1]
    shape = [1] * b.dim()
    shape[dim] = overlap
    ramp = ramp.view(shape)
    b = b.clone()
    head = b.narrow(dim, 0, overlap)
    tail = a.narrow(dim, a.shape[dim] - overlap, overlap)
    head.copy_(tail * (1 - ramp) + head * ramp)
    return b


def _tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply ``fn`` (in → out with sides scaled by ``scale``) over overlapping tiles, then blend."""
    stride = tile - overlap
    h, w = x.shape[-2:]
    rows = []
    for top in range(0, max(h - overlap, 1), stride):
        row = [fn(x[..., top:top + tile, left:left + tile]) for left in range(0, max(w - overlap, 1), stride)]
        rows.append(row)
    out_overlap, out_stride = int(overlap * scale), int(stride * scale)
    out_rows = []
    for i, row in enumerate(rows):
        pieces = []
        for j, t in enumerate(row):
            if i > 0:
                t = _blend(rows[i - 1][j], t, out_overlap, dim=-2)
            if j > 0:
                t = _blend(row[j - 1], t, out_overlap, dim=-1)
            row[j] = t
            last_col = j == len(row) - 1
            pieces.append(t if last_col else t[..., :, :out_stride])
        out_rows.append(torch.cat(pieces, dim=-1))
    result = torch.cat([r if i == len(out_rows) - 1 else r[..., :out_stride, :]
                        for i, r in enumerate(out_rows)], dim=-2)
    return result[..., : int(h * scale), : int(w * scale)]


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.tiling = False
        self.slicing = False  # True: one sample at a time; False: by the memory estimate
        self.slice_bytes = SLICE_BYTES
        self.tile_size = 512  # pixels; latent tiles are tile_size // downscale
        self.tile_overlap = 0.25
        self.channels_last = False  # set by ldm.speed

    def enable_tiling(self, enabled: bool = True, tile_size: int | None = None) -> None:
        self.tiling = enabled
        if tile_size is not None:
            self.tile_size = tile_size

    def enable_slicing(self, enabled: bool = True) -> None:
        self.slicing = enabled

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(self._layout(x))).contiguous()

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self._layout(z))).contiguous()

    def activation_bytes(self, batch: int, height: int, width: int, dtype: torch.dtype) -> int:
        """Rough peak activation memory of coding ``batch`` images of height × width pixels at once.
        The widest full-resolution tensor (the decoder's second level upsampled, ch·ch_mult[1]
        channels) dominates; about six of that size are alive at once (measured ~5.5 for SD's
        autoencoder: block input, norm, activation, convolution outputs, shortcut)."""
        mult = self.config.ch_mult[1] if len(self.config.ch_mult) > 1 else self.config.ch_mult[0]
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 6 * batch * height * width * self.config.ch * mult * itemsize

    def _per_sample(self, fn, x: torch.Tensor, pixels: tuple[int, int]) -> torch.Tensor:
        """``fn`` on the whole batch, or sample by sample when asked (``slicing``) or when the whole
        batch would need more than ``slice_bytes`` of activations: per-image coding costs no speed
        at sizes where that matters (one image already fills the device), and bounds the peak."""
        if x.shape[0] > 1 and (self.slicing or self.activation_bytes(
                x.shape[0], *pixels, x.dtype) > self.slice_bytes):
            return torch.cat([fn(s) for s in x.split(1)])
        return fn(x)

    def _offload_hook(self) -> None:
        # encode/decode are not ``forward``: run the pre-forward of an Accelerate offload hook
        # (pipelines.offload) so the weights come to the execution device first
        hook = getattr(self, "_hf_hook", None)
        if hook is not None:
            hook.pre_forward(self)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._offload_hook()
        f = self.config.downscale
        if self.tiling and max(x.shape[-2:]) > self.tile_size:
            overlap = int(self.tile_size * self.tile_overlap) // f * f
            fn = lambda t: _tiled(self._moments, t, self.tile_size, overlap, 1 / f)  # noqa: E731
        else:
            fn = self._moments
        return DiagonalGaussian(self._per_sample(fn, x, tuple(x.shape[-2:])))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._offload_hook()
        f = self.config.downscale
        tile = self.tile_size // f
        if self.tiling and max(z.shape[-2:]) > tile:
            fn = lambda t: _tiled(self._decode, t, tile, int(tile * self.tile_overlap), f)  # noqa: E731
        else:
            fn = self._decode
        return self._per_sample(fn, z, (z.shape[-2] * f, z.shape[-1] * f))

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
