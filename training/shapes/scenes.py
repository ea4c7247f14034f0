"""Scenes of the shapes world: a complete scene (:class:`ShapeSpec`) and its anti-aliased
rendering, random scenes for a caption, and the deterministic training examples with the captions
the training data phrases. Pillow only."""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from .captions import Caption, parse_caption
from .world import (ACROSS_JITTER, BORDER, CENTER_JITTER, COLOURS, IMAGE_SIZE, OFF_CENTER_MIN, PALETTE,
                    POSITIONS, SHAPES, SIZES, SUPERSAMPLE, is_held_out)


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
