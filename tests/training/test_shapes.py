"""The shapes world: renderer, captions and analyzer agree with each other and with the spec."""
from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from training import shapes
from training.shapes import (HELD_OUT, PALETTE, SHAPES, Caption, ShapeSpec, analyze, parse_caption,
                              sample_spec, spec_for_caption, training_example)

ATTRIBUTES = ("colour", "shape", "background", "size", "position")


def _accuracy(specs) -> dict[str, float]:
    wrong = Counter()
    for spec in specs:
        result = analyze(spec.render())
        for key in ATTRIBUTES:
            wrong[key] += getattr(result, key) != getattr(spec, key)
    return {key: 1 - wrong[key] / len(specs) for key in ATTRIBUTES}


def test_analyzer_recovers_every_attribute_of_random_renders():
    rng = random.Random(1234)
    specs = [sample_spec(rng) for _ in range(600)]  # held-out pairs included
    assert {s.shape for s in specs} == set(SHAPES)
    accuracy = _accuracy(specs)
    assert all(v >= 0.99 for v in accuracy.values()), accuracy


def test_analyzer_recognises_rings():
    rng = random.Random(7)
    specs = [sample_spec(rng, shape="ring") for _ in range(100)]
    accuracy = _accuracy(specs)
    assert all(v >= 0.99 for v in accuracy.values()), accuracy


def test_analyzer_tolerates_pixel_noise():
    rng, noise = random.Random(3), np.random.default_rng(0)
    wrong = Counter()
    for _ in range(200):
        spec = sample_spec(rng)
        pixels = np.asarray(spec.render()).astype(np.float64) + noise.normal(0, 8, (64, 64, 3))
        result = analyze(np.clip(pixels, 0, 255).astype(np.uint8))
        wrong.update(k for k in ATTRIBUTES if getattr(result, k) != getattr(spec, k))
    assert sum(wrong.values()) <= 4, wrong


def test_analyzer_reports_no_shape_on_a_plain_image():
    result = analyze(Image.new("RGB", (64, 64), PALETTE["blue"]))
    assert result.background == "blue" and result.shape is None and result.colour is None


def test_analyzer_accepts_float_arrays_and_other_sizes():
    spec = ShapeSpec("red", "square", "white", "large", "on the right", 34, 12.0, 1.0)
    as_float = np.asarray(spec.render()).astype(np.float32) / 255.0
    assert analyze(as_float).matches(spec.caption) == dict.fromkeys(ATTRIBUTES, True)
    assert analyze(spec.render(size=128)).matches(spec.caption) == dict.fromkeys(ATTRIBUTES, True)
    with pytest.raises(ValueError, match="RGB"):
        analyze(np.zeros((64, 64)))


def test_render_geometry_matches_the_spec():
    """Pixel areas and extents, counted straight from the image, match each shape's formula."""
    for shape, expected_area in (("square", lambda s: s * s), ("circle", lambda s: math.pi * s * s / 4),
                                 ("triangle", lambda s: s * s / 2),
                                 ("ring", lambda s: math.pi * s * s / 4 * 0.75)):
        spec = ShapeSpec("white", shape, "black", "large", "in the center", 36, 0.0, 0.0)
        pixels = np.asarray(spec.render()).astype(np.float64)
        coverage = (pixels[..., 0] - 20) / (240 - 20)  # black → white: coverage is linear
        assert coverage.sum() == pytest.approx(expected_area(36), rel=0.02), shape
        cols = np.nonzero(coverage.sum(axis=0) > 0)[0]
        rows = np.nonzero(coverage.sum(axis=1) > 0)[0]
        assert (cols[0], cols[-1] + 1, rows[0], rows[-1] + 1) == (14, 50, 14, 50), shape


def test_positions_fall_in_their_part_of_the_image():
    rng = random.Random(5)
    for _ in range(300):
        spec = sample_spec(rng)
        cx, cy = 32 + spec.dx, 32 + spec.dy
        half = spec.side / 2
        assert 1 <= cx - half and cx + half <= 63 and 1 <= cy - half and cy + half <= 63
        if spec.position == "in the center":
            assert abs(cx - 32) <= 8 and abs(cy - 32) <= 8
        else:
            coord = {"on the left": -cx, "on the right": cx, "at the top": -cy, "at the bottom": cy}
            third = {"on the left": -64 / 3, "on the right": 128 / 3, "at the top": -64 / 3,
                     "at the bottom": 128 / 3}
            # the centre lies in that third of the image (within a pixel, for the largest shapes)
            assert coord[spec.position] >= third[spec.position] - 1, spec


def test_renderer_is_deterministic_and_colours_are_from_the_palette():
    a, _ = training_example(42)
    b, _ = training_example(42)
    assert a == b and a.render().tobytes() == b.render().tobytes()
    assert training_example(43)[0] != a
    pixels = np.asarray(a.render())
    assert pixels.shape == (64, 64, 3)
    assert tuple(pixels[0, 0]) == PALETTE[a.background]
    assert (pixels == PALETTE[a.colour]).all(axis=2).sum() > 50


def test_training_data_never_holds_held_out_pairs_or_rings():
    seen = Counter()
    for seed in range(6000):
        spec, caption = training_example(seed)
        assert (spec.colour, spec.shape) not in HELD_OUT
        assert spec.shape in SHAPES and spec.colour != spec.background
        seen[(spec.colour, spec.shape)] += 1
    assert set(seen) == set(shapes.training_pairs())
    assert len(seen) == len(shapes.COLOURS) * len(SHAPES) - len(HELD_OUT)
    with pytest.raises(ValueError, match="held out"):
        sample_spec(random.Random(0), colour="purple", shape="triangle", allow_held_out=False)


def test_training_captions_parse_back_into_the_spec():
    forms = Counter()
    for seed in range(2000):
        spec, caption = training_example(seed)
        parsed = parse_caption(caption)
        assert parsed.text == caption
        for key in ATTRIBUTES:
            value = getattr(parsed, key)
            assert value is None or value == getattr(spec, key), (caption, spec)
        forms[(parsed.background is None, parsed.size is None, parsed.position is None)] += 1
    # full form, each optional word dropped, and the short form all occur
    assert {(False, False, False), (False, True, False), (False, False, True),
            (True, True, True)} <= set(forms)


def test_caption_grammar():
    full = Caption("red", "circle", "blue", "small", "on the left")
    assert full.text == "a small red circle on the left on a blue background"
    assert Caption("red", "circle").text == "a red circle"
    assert parse_caption(" A Large green square at the top on an orange background. ") == \
        Caption("green", "square", "orange", "large", "at the top")
    assert parse_caption("a purple ring in the center") == Caption("purple", "ring", None, None,
                                                                    "in the center")
    for bad in ("a red hexagon", "the red circle", "a red circle on a red background",
                "a teal circle", "a red circle somewhere"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_spec_for_caption_fills_in_unmentioned_attributes():
    rng = random.Random(0)
    backgrounds = set()
    for _ in range(50):
        spec = spec_for_caption("a large orange circle", rng)  # a held-out pair renders on request
        assert (spec.colour, spec.shape, spec.size) == ("orange", "circle", "large")
        backgrounds.add(spec.background)
        assert analyze(spec.render()).matches("a large orange circle") == \
            {"colour": True, "shape": True, "size": True}
    assert len(backgrounds) > 3 and "orange" not in backgrounds


def test_renderer_and_analyzer_need_no_torch():
    """The world, its captions, renderer and analyzer run on numpy and Pillow alone; only the
    datasets module (imported on its own) needs torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\nimport training.shapes\nfrom training.shapes import analyze, sample_spec\n"
            "import random\nanalyze(sample_spec(random.Random(0)).render())\n"
            "print('torch' in sys.modules)\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
