"""The procedural "shapes" world of the shipped default model: renderer, captions and analyzer.

A scene is a 64×64 RGB image with a solid background and one filled shape. The same geometric
definitions drive the renderer (which draws a scene from a :class:`ShapeSpec`) and the analyzer
(which recovers the attributes from pixels, e.g. of a generated image), so they cannot drift apart.

Geometry, in pixels of a 64×64 image (other sizes scale linearly):

* size: the side of the shape's bounding box (width = height for every shape). ``small`` is 14–20,
  ``large`` 30–40; the analyzer splits at 25.
* position: offset (dx, dy) of the bounding-box centre from the image centre. ``in the center``
  renders with |dx|, |dy| ≤ 4; the other four render 11 px or more along their axis (the centre then
  lies in that third of the image, or on its edge for the largest shapes) and within 3 px across it.
  The analyzer says ``in the center`` when max(|dx|, |dy|) ≤ 8, else names the dominant axis.
* shape: the fill ratio of the bounding box — square ≈ 1, circle π/4 ≈ 0.785, triangle (upright
  isosceles, apex at the top) 0.5. A ``ring`` (a disc with a concentric hole of half its radius,
  for concept-learning tests, never in the base training data) shows the background at its centre.

Only numpy and Pillow are needed here; nothing imports torch.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # drawn at 4× then box-filtered: exact area coverage in steps of 1/16 pixel

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
EXTRA_SHAPES = ("ring",)  # rendered on request only
ALL_SHAPES = SHAPES + EXTRA_SHAPES
SIZES = {"small": (14, 20), "large": (30, 40)}
SIZE_SPLIT = 25
# position word → unit direction of the offset from the image centre (x right, y down)
POSITIONS = {
    "on the left": (-1, 0),
    "on the right": (1, 0),
    "at the top": (0, -1),
    "at the bottom": (0, 1),
    "in the center": (0, 0),
}
CENTER_RADIUS = 8  # analyzer: centred when both offsets are within this
CENTER_JITTER = 4  # renderer: offsets of a centred shape
OFF_CENTER_MIN = 11  # renderer: smallest offset along the axis of an off-centre shape
ACROSS_JITTER = 3  # renderer: offset across that axis
BORDER = 1  # renderer: pixels kept free between the shape and the image edge

# (colour, shape) pairs never shown in training, to test composition of seen attributes
HELD_OUT = frozenset({("purple", "triangle"), ("orange", "circle"), ("white", "square"),
                      ("green", "triangle")})

# fill ratio of the bounding box (see module docstring); the gap 0.62–0.68 splits at 0.65
SQUARE_MIN_FILL, CIRCLE_MIN_FILL = 0.88, 0.65


def is_held_out(colour: str, shape: str) -> bool:
    return (colour, shape) in HELD_OUT


def training_pairs() -> list[tuple[str, str]]:
    """The (colour, shape) pairs the training data may contain."""
    return [(c, s) for c in COLOURS for s in SHAPES if not is_held_out(c, s)]


# ---------------------------------------------------------------------------------------------
# captions

@dataclass(frozen=True)
class Caption:
    """What a caption says. ``None`` fields are not mentioned (the attribute is then random)."""

    colour: str
    shape: str
    background: str | None = None
    size: str | None = None
    position: str | None = None

    def __post_init__(self):
        _check("colour", self.colour, COLOURS)
        _check("shape", self.shape, ALL_SHAPES)
        _check("background", self.background, COLOURS, optional=True)
        _check("size", self.size, SIZES, optional=True)
        _check("position", self.position, POSITIONS, optional=True)
        if self.background is not None and self.background == self.colour:
            raise ValueError(f"shape colour and background are both {self.colour!r}")

    @property
    def text(self) -> str:
        """``a [small|large ]<colour> <shape>[ <position>][ on a <colour> background]``."""
        words = ["a"]
        if self.size:
            words.append(self.size)
        words += [self.colour, self.shape]
        if self.position:
            words.append(self.position)
        if self.background:
            words += ["on a", self.background, "background"]
        return " ".join(words)

    def __str__(self) -> str:
        return self.text


def _check(field: str, value, allowed, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise ValueError(f"unknown {field} {value!r}; expected one of {', '.join(allowed)}")


_CAPTION_RE = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour>\w+) (?P<shape>\w+)"
    r"(?: (?P<position>on the left|on the right|at the top|at the bottom|in the center))?"
    r"(?: on an? (?P<background>\w+) background)?$")


def parse_caption(text: str) -> Caption:
    """Parse a caption of the shapes grammar (case and surrounding space or full stop ignored)."""
    clean = " ".join(text.strip().rstrip(".").lower().split())
    match = _CAPTION_RE.match(clean)
    if match is None:
        raise ValueError(f"not a shapes caption: {text!r} (expected e.g. "
                         f"'a small red circle on the left on a blue background')")
    return Caption(**match.groupdict())


# ---------------------------------------------------------------------------------------------
# scenes

@dataclass(frozen=True)
class ShapeSpec:
    """A complete scene: categorical attributes plus the concrete geometry that renders them.

    ``side`` is the bounding-box side in pixels of a 64×64 image; ``dx``/``dy`` the offset of the
    bounding-box centre from the image centre, in multiples of 1/``SUPERSAMPLE`` pixel.
    """

    colour: str
    shape: str
    background: str
    size: str
    position: str
    side: int
    dx: float
    dy: float

    def __post_init__(self):
        Caption(self.colour, self.shape, self.background, self.size, self.position)  # validates
        lo, hi = SIZES[self.size]
        if not lo <= self.side <= hi:
            raise ValueError(f"side {self.side} is not {self.size} ({lo}–{hi} px)")

    @property
    def caption(self) -> Caption:
        """The full description of this scene."""
        return Caption(self.colour, self.shape, self.background, self.size, self.position)

    def render(self, size: int = IMAGE_SIZE) -> Image.Image:
        """Anti-aliased RGB image, drawn at ``SUPERSAMPLE``× and box-filtered down."""
        k = SUPERSAMPLE * size / IMAGE_SIZE
        big = size * SUPERSAMPLE
        image = Image.new("RGB", (big, big), PALETTE[self.background])
        draw = ImageDraw.Draw(image)
        side = round(self.side * k)
        x0 = round((IMAGE_SIZE / 2 + self.dx - self.side / 2) * k)
        y0 = round((IMAGE_SIZE / 2 + self.dy - self.side / 2) * k)
        x1, y1 = x0 + side, y0 + side  # exclusive
        fill = PALETTE[self.colour]
        if self.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif self.shape in ("circle", "ring"):
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
            if self.shape == "ring":
                q = side // 4
                draw.ellipse([x0 + q, y0 + q, x1 - 1 - q, y1 - 1 - q], fill=PALETTE[self.background])
        else:  # upright isosceles triangle: apex at the top centre, base along the bottom
            # (Pillow's coordinates are inclusive, like the boxes above)
            draw.polygon([(x0 + (side - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        return image.resize((size, size), Image.BOX)


def _quarter(value: float) -> float:
    return round(value * SUPERSAMPLE) / SUPERSAMPLE


def sample_spec(rng: random.Random, colour: str | None = None, shape: str | None = None,
                background: str | None = None, size: str | None = None,
                position: str | None = None, allow_held_out: bool = True) -> ShapeSpec:
    """A random scene; given attributes are kept, the others drawn uniformly.

    With ``allow_held_out=False`` the (colour, shape) pair is drawn from :func:`training_pairs`.
    """
    if colour is None or shape is None:
        shapes = SHAPES if shape is None else (shape,)  # a ring only when asked for
        pairs = [(c, s) for c in COLOURS for s in shapes
                 if (colour in (None, c)) and c != background
                 and (allow_held_out or not is_held_out(c, s))]
        if not pairs:
            raise ValueError(f"no allowed colour/shape for colour={colour!r} shape={shape!r}")
        colour, shape = rng.choice(pairs)
    if not allow_held_out and is_held_out(colour, shape):
        raise ValueError(f"{colour} {shape} is held out of the training data")
    if background is None:
        background = rng.choice([c for c in COLOURS if c != colour])
    size = size or rng.choice(list(SIZES))
    position = position or rng.choice(list(POSITIONS))
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; expected one of {', '.join(POSITIONS)}")
    side = rng.randint(*SIZES[size])
    ux, uy = POSITIONS[position]
    if (ux, uy) == (0, 0):
        dx, dy = (rng.uniform(-CENTER_JITTER, CENTER_JITTER) for _ in range(2))
    else:
        reach = IMAGE_SIZE / 2 - side / 2 - BORDER
        along = rng.uniform(OFF_CENTER_MIN, max(reach, OFF_CENTER_MIN))
        across = rng.uniform(-ACROSS_JITTER, ACROSS_JITTER)
        dx, dy = (along * ux + across * uy, along * uy + across * ux)
    return ShapeSpec(colour, shape, background, size, position, side, _quarter(dx), _quarter(dy))


def spec_for_caption(caption: Caption | str, rng: random.Random) -> ShapeSpec:
    """A scene that a caption describes; unmentioned attributes are random."""
    if isinstance(caption, str):
        caption = parse_caption(caption)
    return sample_spec(rng, caption.colour, caption.shape, caption.background, caption.size,
                       caption.position)


# how often training captions leave words out (the attribute is then random in the image)
SHORT_FORM_P = 0.15
MENTION_SIZE_P = 0.75
MENTION_POSITION_P = 0.75


def training_caption(spec: ShapeSpec, rng: random.Random) -> str:
    """A caption for ``spec`` as the training data phrases it: the full form with size and
    position each sometimes left out, or the short form ``a <colour> <shape>``."""
    if rng.random() < SHORT_FORM_P:
        return Caption(spec.colour, spec.shape).text
    full = spec.caption
    return replace(full, size=full.size if rng.random() < MENTION_SIZE_P else None,
                   position=full.position if rng.random() < MENTION_POSITION_P else None).text


def training_example(seed: int) -> tuple[ShapeSpec, str]:
    """The deterministic training example for ``seed``: a scene outside :data:`HELD_OUT` and a
    caption; the base training data never holds a ring."""
    rng = random.Random(seed)
    spec = sample_spec(rng, allow_held_out=False)
    return spec, training_caption(spec, rng)


# ---------------------------------------------------------------------------------------------
# analyzer

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
