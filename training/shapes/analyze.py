"""The analyzer of the shapes world: background, colour, shape, size and position read back from
pixels (a render, or a generated image), with the world's own geometry. numpy and Pillow only."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .captions import Caption, parse_caption
from .world import (CENTER_RADIUS, CIRCLE_MIN_FILL, COLOURS, IMAGE_SIZE, PALETTE, SIZE_SPLIT,
                    SQUARE_MIN_FILL)


@dataclass(frozen=True)
class ShapeAnalysis:
    """Attributes recovered from an image; ``shape`` etc. are None when no shape is found."""

    background: str
    colour: str | None
    shape: str | None
    size: str | None
    position: str | None
    bbox: tuple[float, float, float, float] | None  # x0, y0, x1, y1 in pixels
    fill_ratio: float | None
    area: float  # covered pixels

    def matches(self, caption: Caption | str) -> dict[str, bool]:
        """For each attribute the caption mentions, whether the image shows it."""
        if isinstance(caption, str):
            caption = parse_caption(caption)
        checks = {"colour": caption.colour, "shape": caption.shape, "background": caption.background,
                  "size": caption.size, "position": caption.position}
        return {k: getattr(self, k) == v for k, v in checks.items() if v is not None}


_PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=np.float64)
MIN_SHAPE_DISTANCE = 30.0  # RGB distance from the background that counts as "not background"
MIN_AREA = 6.0  # covered pixels of a 64×64 image below which no shape is reported


def nearest_colour(rgb) -> str:
    d = ((_PALETTE_ARRAY - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)
    return COLOURS[int(d.argmin())]


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:  # floats in [0, 1]
        arr = np.clip(arr * 255.0, 0, 255)
    return arr.astype(np.float64)


def _box_blur(arr: np.ndarray) -> np.ndarray:
    padded = np.pad(arr, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = arr.shape[:2]
    return sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _extent(profile: np.ndarray) -> tuple[float, float]:
    """First and one-past-last index where a coverage profile holds at least half a pixel."""
    idx = np.nonzero(profile >= 0.5)[0]
    return float(idx[0]), float(idx[-1] + 1)


def analyze(image) -> ShapeAnalysis:
    """Recover background, colour, shape, size and position from a shapes image (PIL or array).

    Background = median of the border pixels; shape pixels = those far from it; shape colour =
    their median (of the clearly covered ones), snapped to the palette. Each pixel's coverage is its
    position on the line from background to shape colour, so size and fill ratio are measured to a
    fraction of a pixel: width/height = the largest row/column coverage sums.
    """
    arr = _as_array(image)
    h, w, _ = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_colour(bg_rgb)
    smooth = _box_blur(arr)  # decides which pixels belong to the shape, robust to pixel noise
    dist = np.sqrt(((smooth - bg_rgb) ** 2).sum(axis=2))
    candidates = dist > MIN_SHAPE_DISTANCE
    scale = w / IMAGE_SIZE
    none = ShapeAnalysis(background, None, None, None, None, None, None, 0.0)
    if candidates.sum() < MIN_AREA * scale * scale:
        return none
    core = candidates & (dist >= 0.75 * np.percentile(dist[candidates], 90))
    fg_rgb = np.median(arr[core], axis=0)
    colour = nearest_colour(fg_rgb)
    axis = fg_rgb - bg_rgb
    norm = max(float(axis @ axis), 1e-9)
    coverage = np.clip(((arr - bg_rgb) @ axis) / norm, 0.0, 1.0)
    coverage[((smooth - bg_rgb) @ axis) / norm < 0.25] = 0.0  # far from the shape: noise
    area = float(coverage.sum())
    if area < MIN_AREA * scale * scale:
        return none
    rows, cols = coverage.sum(axis=1), coverage.sum(axis=0)
    x0, x1 = _extent(cols)
    y0, y1 = _extent(rows)
    width, height = float(rows.max()), float(cols.max())
    fill = area / max(width * height, 1e-9)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    centre = coverage[int(cy - 0.5):int(cy + 0.5) + 1, int(cx - 0.5):int(cx + 0.5) + 1]
    if centre.size and centre.mean() < 0.5:
        shape = "ring"
    elif fill >= SQUARE_MIN_FILL:
        shape = "square"
    elif fill >= CIRCLE_MIN_FILL:
        shape = "circle"
    else:
        shape = "triangle"
    side = max(x1 - x0, y1 - y0) / scale  # the pixel extent (row sums miss a ring's hole)
    size = "small" if side < SIZE_SPLIT else "large"
    dx, dy = (cx - w / 2) / scale, (cy - h / 2) / scale
    if max(abs(dx), abs(dy)) <= CENTER_RADIUS:
        position = "in the center"
    elif abs(dx) >= abs(dy):
        position = "on the left" if dx < 0 else "on the right"
    else:
        position = "at the top" if dy < 0 else "at the bottom"
    return ShapeAnalysis(background, colour, shape, size, position, (x0, y0, x1, y1), fill, area)


def shape_mask(image) -> np.ndarray:
    """Boolean (H, W) mask of the pixels that are not background: RGB distance from the border's
    median colour above :data:`MIN_SHAPE_DISTANCE` (anti-aliased edge pixels count once they
    are that far), to compare a generated shape's outline with the one asked for."""
    arr = _as_array(image)
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    return np.sqrt(((arr - np.median(border, axis=0)) ** 2).sum(axis=2)) > MIN_SHAPE_DISTANCE
