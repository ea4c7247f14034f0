"""Variation seeds, as AUTOMATIC1111 makes them with its random-number source set to CPU: the
initial noise of image ``i`` is the spherical interpolation, by ``subseed_strength``, between the
noise of ``seed + i`` and that of ``subseed + i``; with "resize seed from" the noise is drawn at
another size and pasted, centred, into the noise of the real size (so an image keeps its
composition when the canvas grows or shrinks).

Every draw is ``torch.randn`` of one image's (C, h, w) on a CPU generator seeded with that seed, the
numbers A1111 draws; the image's own generator (the one later stochastic steps draw from) makes
the full-size draw, as without variation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Variation:
    seeds: list[int]  # per image
    subseeds: list[int] | None  # per image; None: no interpolation
    strength: float
    resize_from: tuple[int, int] | None  # (height, width) in pixels; None: the real size

    @property
    def active(self) -> bool:
        return (self.subseeds is not None and self.strength != 0) or self.resize_from is not None


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's ``slerp`` on one image's (C, h, w) noise, quirks kept for equal numbers: the norms
    run over dim 1 (the rows), and nearly parallel inputs fall back to ``low·val + high·(1−val)``."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + \
        (torch.sin(val * omega) / so).unsqueeze(1) * high


def _seeded(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def paste_centred(small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """``small`` (C, h', w') over the centre of ``big`` (C, h, w), cropped where it is larger."""
    out = big.clone()
    dy, dx = (big.shape[1] - small.shape[1]) // 2, (big.shape[2] - small.shape[2]) // 2
    h = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    w = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    out[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return out


def variation_noise(shape: tuple[int, ...], generators: list[torch.Generator], v: Variation,
                    downscale: int) -> torch.Tensor:
    """(B, C, h, w) float32 initial noise on the CPU, image ``i`` from ``generators[i]``."""
    batch, channels, height, width = shape
    images = []
    for i in range(batch):
        full = torch.randn((channels, height, width), generator=generators[i])
        small_shape = (channels, height, width) if v.resize_from is None else \
            (channels, v.resize_from[0] // downscale, v.resize_from[1] // downscale)
        noise = full if v.resize_from is None else _seeded(v.seeds[i], small_shape)
        if v.subseeds is not None and v.strength != 0:
            noise = slerp(v.strength, noise, _seeded(v.subseeds[i], small_shape))
        if v.resize_from is not None:
            noise = paste_centred(noise, full)
        images.append(noise)
    return torch.stack(images)
