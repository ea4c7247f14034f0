"""Autoencoder behaviour: tiled and sliced encode/decode, the posterior's sampling and KL.

Tiling cannot reproduce the untiled result exactly: each tile sees only its own crop, so zero
padding at the crop's edge and GroupNorm statistics over the crop change what the network computes
(with random weights, a lot). The tests therefore check three separate things:
- the tiling arithmetic (placement, blend weights, output size) is exact for a network whose output
  at a pixel depends only on the input at that pixel;
- with the real network, every output pixel stays within the range of what the tiles covering it
  produce on their own: blending is a convex combination, so it can add no error of its own;
- the cross-fade hides the per-tile offsets that per-tile normalisation causes (the usual seam).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.autoencoder import AutoencoderKL, DiagonalGaussian
from reference.models import max_error, randomize_
from reference.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

TILE = 16  # pixels: latent tiles of 8 with the tiny VAE's factor 2, so many tiles and overlaps


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return randomize_(AutoencoderKL(tiny_config("sd1").autoencoder), scale=0.5).eval()


def smooth(channels: int, h: int, w: int, period: float = 12.0, seed: int = 0) -> torch.Tensor:
    """Sums of slow plane waves, values within about [-1, 1]: a smooth image or latent."""
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    planes = []
    for _ in range(channels):
        a, b, phase = torch.rand(3, 3, generator=gen)
        planes.append(sum(0.3 * torch.sin(2 * math.pi * (a[i] * x + b[i] * y) / period + 6 * phase[i])
                          for i in range(3)))
    return torch.stack(planes)[None]


def run(vae: AutoencoderKL, fn: str, x: torch.Tensor, tiled: bool, tile: int = TILE,
        overlap: float | None = None):
    saved = vae.tiling, vae.tile_size, vae.tile_overlap
    vae.enable_tiling(tiled, tile_size=tile)
    if overlap is not None:
        vae.tile_overlap = overlap
    try:
        with torch.no_grad():
            return getattr(vae, fn)(x)
    finally:
        vae.tiling, vae.tile_size, vae.tile_overlap = saved


# ---- tiling arithmetic: exact with a pixel-local network ---------------------------------------

class LocalDecoder(nn.Module):
    """Nearest-neighbour upsampling and a 1×1 convolution: output pixels depend on one latent."""

    def __init__(self, factor: int, channels: int):
        super().__init__()
        self.factor = factor
        self.proj = nn.Conv2d(channels, 3, 1)

    def forward(self, z):
        return self.proj(F.interpolate(z, scale_factor=self.factor, mode="nearest"))


class LocalEncoder(nn.Module):
    """Average pooling over each f×f cell and a 1×1 convolution to the posterior's moments."""

    def __init__(self, factor: int, channels: int):
        super().__init__()
        self.factor = factor
        self.proj = nn.Conv2d(3, channels, 1)

    def forward(self, x):
        return self.proj(F.avg_pool2d(x, self.factor))


@pytest.fixture
def local_vae(vae):
    cfg = vae.config
    local = randomize_(AutoencoderKL(cfg), seed=1, scale=0.5).eval()
    local.decoder = LocalDecoder(cfg.downscale, cfg.z_channels)
    local.encoder = LocalEncoder(cfg.downscale, 2 * cfg.z_channels)
    return randomize_(local, seed=2, scale=0.5)


@pytest.mark.parametrize("h, w", [(8, 8), (9, 8), (20, 26), (21, 27), (30, 14), (6, 40)])
def test_tiled_decode_is_exact_for_a_local_network(local_vae, h, w):
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * w))
    ref = run(local_vae, "decode", z, tiled=False)
    for tile in (TILE, 12, 22):
        out = run(local_vae, "decode", z, tiled=True, tile=tile)
        assert out.shape == ref.shape
        assert max_error(out, ref)[0] <= 1e-5, f"tile {tile}, latent {h}x{w}"


@pytest.mark.parametrize("h, w", [(16, 16), (18, 16), (40, 52), (42, 54), (60, 28), (12, 80)])
def test_tiled_encode_is_exact_for_a_local_network(local_vae, h, w):
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * w)) * 2 - 1
    ref = run(local_vae, "encode", x, tiled=False)
    for tile in (TILE, 12, 24):
        out = run(local_vae, "encode", x, tiled=True, tile=tile)
        assert out.mean.shape == ref.mean.shape
        assert max_error(out.mean, ref.mean)[0] <= 1e-5, f"tile {tile}, image {h}x{w}"
        assert max_error(out.logvar, ref.logvar)[0] <= 1e-5, f"tile {tile}, image {h}x{w}"


# ---- the real network: blending adds no error beyond what each tile has on its own -------------

def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one side as the autoencoder lays them out (stride tile - overlap)."""
    return list(range(0, max(size - overlap, 1), tile - overlap))


def tile_envelope(fn, x: torch.Tensor, tile: int, overlap: int, scale: float, out_shape):
    """Per output pixel, the smallest and largest value that the tiles covering it produce."""
    lo = torch.full(out_shape, math.inf)
    hi = torch.full(out_shape, -math.inf)
    for top in tile_starts(x.shape[-2], tile, overlap):
        for left in tile_starts(x.shape[-1], tile, overlap):
            y = fn(x[..., top:top + tile, left:left + tile])
            t, l = int(top * scale), int(left * scale)
            where = (..., slice(t, t + y.shape[-2]), slice(l, l + y.shape[-1]))
            lo[where] = torch.minimum(lo[where], y)
            hi[where] = torch.maximum(hi[where], y)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all(), "tiles do not cover the output"
    return lo, hi


def assert_within(out, ref, lo, hi, what):
    slack = 1e-5
    outside = ((out < lo - slack) | (out > hi + slack)).float().mean().item()
    assert outside == 0, f"{what}: {outside:.1%} of values outside the tiles' own range"
    rel = ((out - ref).pow(2).mean().sqrt() / ref.std()).item()
    print(f"{what}: tiled vs untiled max abs {max_error(out, ref)[0]:.3g}, relative RMS {rel:.3g}")


@pytest.mark.parametrize("h, w", [(20, 26), (17, 30)])
def test_tiled_decode_stays_within_tile_envelope(vae, h, w):
    f = vae.config.downscale
    z = smooth(4, h, w, seed=h)
    ref = run(vae, "decode", z, tiled=False)
    out = run(vae, "decode", z, tiled=True)
    assert out.shape == ref.shape == (1, 3, h * f, w * f)
    tile = TILE // f
    with torch.no_grad():
        lo, hi = tile_envelope(lambda t: run(vae, "decode", t, tiled=False), z, tile,
                               int(tile * vae.tile_overlap), f, ref.shape)
    assert_within(out, ref, lo, hi, f"decode {h}x{w}")


@pytest.mark.parametrize("h, w", [(40, 52), (34, 60)])
def test_tiled_encode_stays_within_tile_envelope(vae, h, w):
    f = vae.config.downscale
    x = smooth(3, h, w, period=24, seed=h)
    ref = run(vae, "encode", x, tiled=False)
    out = run(vae, "encode", x, tiled=True)
    assert out.mean.shape == ref.mean.shape == (1, 4, h // f, w // f)
    overlap = int(TILE * vae.tile_overlap) // f * f
    for name in ("mean", "logvar"):
        with torch.no_grad():
            lo, hi = tile_envelope(lambda t: getattr(run(vae, "encode", t, tiled=False), name), x,
                                   TILE, overlap, 1 / f, ref.mean.shape)
        assert_within(getattr(out, name), getattr(ref, name), lo, hi, f"encode {name} {h}x{w}")


def test_tiled_decode_approaches_untiled_as_tiles_grow(vae):
    """The random network's reach (receptive field, GroupNorm statistics) exceeds small tiles; the
    larger the tile, the more of that reach it holds, so the difference must shrink."""
    z = smooth(4, 24, 40)
    ref = run(vae, "decode", z, tiled=False)
    errors = [((run(vae, "decode", z, tiled=True, tile=tile) - ref).pow(2).mean().sqrt()
               / ref.std()).item() for tile in (16, 32, 64)]
    print("relative RMS difference for tiles of 16, 32, 64 pixels:", [f"{e:.3f}" for e in errors])
    assert errors[0] > errors[1] > errors[2]


def test_untiled_below_tile_size(vae):
    z = smooth(4, 8, 8)
    assert torch.equal(run(vae, "decode", z, tiled=True), run(vae, "decode", z, tiled=False))


# ---- seams: per-tile normalisation offsets are cross-faded, not pasted -------------------------

class PerTileNormDecoder(nn.Module):
    """Normalises what it is given by its own statistics, then upsamples smoothly: run on tiles,
    each tile gets its own offset and gain, which is how real tiled VAE decodes get seams."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, z):
        z = F.group_norm(z, 1)
        return F.interpolate(z, scale_factor=self.factor, mode="bilinear")[:, :3]


def steps(image: torch.Tensor, dim: int) -> torch.Tensor:
    """Largest absolute difference between neighbouring rows (dim -2) or columns (dim -1)."""
    d = image.diff(dim=dim).abs()
    return d.amax(dim=(0, 1, 3 if dim == -2 else 2))


def seam_ratio(image: torch.Tensor, starts: list[int], overlap: int, dim: int) -> float:
    """Largest step at tile borders (through each cross-fade zone) over the largest step elsewhere."""
    s = steps(image, dim)
    border = torch.zeros_like(s, dtype=torch.bool)
    for start in starts[1:]:
        border[max(start - 1, 0): start + overlap] = True
    return (s[border].max() / s[~border].max()).item()


@pytest.mark.parametrize("overlap, seamless", [(0.25, True), (0.0, False)])
def test_no_visible_seam(vae, overlap, seamless):
    f = vae.config.downscale
    model = AutoencoderKL(vae.config).eval()
    model.decoder = PerTileNormDecoder(f)
    model.post_quant_conv = nn.Identity()
    z = smooth(4, 20, 44, period=40)
    out = run(model, "decode", z, tiled=True, overlap=overlap)
    tile = TILE // f
    latent_overlap = int(tile * overlap)
    for dim, size in ((-2, z.shape[-2]), (-1, z.shape[-1])):
        starts = [s * f for s in tile_starts(size, tile, latent_overlap)]
        ratio = seam_ratio(out, starts, latent_overlap * f, dim)
        print(f"tile_overlap {overlap}: border step / inside step = {ratio:.2f} along dim {dim}")
        # a cross-fade over the overlap spreads a tile's offset over overlap+1 pixels: border steps
        # stay of the size of the image's own; pasted tiles jump by the whole offset
        assert (ratio <= 1.5) is seamless


# ---- slicing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tiled", [False, True])
def test_slicing_equals_the_whole_batch(vae, tiled):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 12, 10, generator=gen)
    images = torch.rand(3, 3, 24, 20, generator=gen) * 2 - 1
    whole_dec, whole_enc = run(vae, "decode", z, tiled), run(vae, "encode", images, tiled)
    vae.enable_slicing(True)
    try:
        sliced_dec, sliced_enc = run(vae, "decode", z, tiled), run(vae, "encode", images, tiled)
    finally:
        vae.enable_slicing(False)
    assert max_error(sliced_dec, whole_dec)[0] <= 1e-5
    assert max_error(sliced_enc.mean, whole_enc.mean)[0] <= 1e-5
    assert max_error(sliced_enc.logvar, whole_enc.logvar)[0] <= 1e-5


# ---- posterior ------------------------------------------------------------------------------------

def moments(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(seed))


def test_sample_is_reproducible_and_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    m = moments()
    ours = DiagonalGaussian(m)
    a = ours.sample(torch.Generator().manual_seed(42))
    b = ours.sample(torch.Generator().manual_seed(42))
    c = ours.sample(torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    mean, logvar = m.chunk(2, dim=1)
    expected = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape,
                                                           generator=torch.Generator().manual_seed(42))
    assert max_error(a, expected)[0] <= 1e-6
    ref = DiagonalGaussianDistribution(m).sample(torch.Generator().manual_seed(42))
    assert max_error(a, ref)[0] <= 1e-6
    assert torch.equal(ours.mode(), mean)


def test_logvar_is_clamped_like_the_reference():
    m = moments()
    m[:, 4:] *= 40  # log-variances far outside [-30, 20]
    ours = DiagonalGaussian(m)
    assert ours.logvar.min() >= -30 and ours.logvar.max() <= 20
    assert torch.isfinite(ours.std).all() and torch.isfinite(ours.kl()).all()


def test_kl():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    for seed in range(3):
        m = moments(seed)
        kl = DiagonalGaussian(m).kl()
        assert kl.shape == (2,) and (kl >= 0).all()
        assert max_error(kl, DiagonalGaussianDistribution(m).kl())[0] <= 1e-4 * kl.abs().max()
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl(), torch.zeros(2))
