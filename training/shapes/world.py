"""The vocabulary and geometry of the procedural "shapes" world of the shipped default model.

A scene is a 64×64 RGB image with a solid background and one filled shape. The definitions here
drive both the renderer (:mod:`.scenes`, which draws a scene from a spec) and the analyzer
(:mod:`.analyze`, which recovers the attributes from pixels, e.g. of a generated image), so the two
cannot drift apart.

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
"""
from __future__ import annotations

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
