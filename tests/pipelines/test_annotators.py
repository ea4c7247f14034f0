"""The weight-free ControlNet preprocessors: hints on drawn shapes, values against numpy, checks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines import annotators
from pipelines.annotators import PARAMETERS, PREPROCESSORS, check, run

ROOT = Path(__file__).resolve().parents[2]


def square(size=128, box=(32, 32, 95, 95), fill=(30, 30, 30), background="white"):
    """A filled square (corners inclusive) on a flat background."""
    im = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(im).rectangle(box, fill=fill)
    return im


def distance_to_border(size, box):
    """Per pixel: the Chebyshev distance to the square's outline (0 on the outline)."""
    x0, y0, x1, y1 = box
    y, x = np.mgrid[:size, :size]
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    # outside: distance to the box; inside: distance to the nearest side
    out = np.maximum.reduce([x0 - x, x - x1, y0 - y, y - y1, np.zeros_like(x)])
    inn = np.minimum.reduce([x - x0, x1 - x, y - y0, y1 - y])
    return np.where(inside, inn, out)


def random_image(seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def as_array(im):
    assert im.mode == "RGB"
    x = np.asarray(im)
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all(), "channels differ"
    return x[..., 0]


# ---------------------------------------------------------------- the names and parameters
def test_names_and_parameters():
    assert PREPROCESSORS == ("none", "canny", "scribble_xdog", "lineart_standard", "threshold",
                             "invert", "tile_resample")
    assert set(PARAMETERS) == set(PREPROCESSORS)
    shape = {n: [(p.name, p.default, p.low, p.high, p.a1111_label) for p in ps]
             for n, ps in PARAMETERS.items() if ps}
    assert shape == {
        "canny": [("low_threshold", 100, 1, 255, "Threshold A"),
                  ("high_threshold", 200, 1, 255, "Threshold B")],
        "scribble_xdog": [("threshold", 32, 1, 64, "Threshold A")],
        "threshold": [("threshold", 127, 0, 255, "Threshold A")],
        "tile_resample": [("down_sampling_rate", 1.0, 1.0, 8.0, "Threshold A")],
    }
    with pytest.raises(AttributeError):
        PARAMETERS["canny"][0].default = 5  # frozen


def test_check_fills_defaults_and_converts():
    assert check("canny", {}) == {"low_threshold": 100, "high_threshold": 200}
    assert check("canny", {"high_threshold": 150.0}) == {"low_threshold": 100, "high_threshold": 150}
    assert check("tile_resample", {"down_sampling_rate": 2}) == {"down_sampling_rate": 2.0}
    assert check("invert", {}) == {}
    assert check("canny", {"low_threshold": 120, "high_threshold": 120})["low_threshold"] == 120


@pytest.mark.parametrize("name, params, fragment", [
    ("sobel", {}, "unknown preprocessor 'sobel'; known: none, canny"),
    ("canny", {"threshold": 3}, "unknown parameter 'threshold'"),
    ("invert", {"threshold": 3}, "unknown parameter 'threshold'"),
    ("canny", {"low_threshold": 0}, "low_threshold must be between 1 and 255, got 0"),
    ("canny", {"high_threshold": 256}, "between 1 and 255"),
    ("canny", {"low_threshold": 201}, "low_threshold (201) is above high_threshold (200)"),
    ("scribble_xdog", {"threshold": 65}, "between 1 and 64"),
    ("threshold", {"threshold": -1}, "between 0 and 255"),
    ("threshold", {"threshold": 12.5}, "whole number"),
    ("threshold", {"threshold": float("nan")}, "finite"),
    ("threshold", {"threshold": "12"}, "must be a number"),
    ("threshold", {"threshold": True}, "must be a number"),
    ("tile_resample", {"down_sampling_rate": 0.5}, "between 1.0 and 8.0"),
])
def test_check_errors(name, params, fragment):
    with pytest.raises(ValueError) as info:
        check(name, params)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_run_checks_params():
    with pytest.raises(ValueError, match="unknown parameter"):
        run("canny", square(), threshold=5)


# ---------------------------------------------------------------- behaviour
@pytest.mark.parametrize("name", [n for n in PREPROCESSORS if n != "tile_resample"])
def test_rgb_of_same_size(name):
    out = run(name, square(size=40, box=(10, 10, 29, 29)).convert("L").resize((48, 40)))
    assert out.mode == "RGB" and out.size == (48, 40)


def test_none_is_unchanged_rgb():
    im = random_image()
    assert np.array_equal(np.asarray(run("none", im.convert("RGBA"))), np.asarray(im))


def test_canny_edges_lie_on_the_border():
    box = (16, 16, 31, 31)
    edges = as_array(run("canny", square(48, box, fill="white", background="black")))
    assert set(np.unique(edges)) == {0, 255}
    d = distance_to_border(48, box)
    on = edges > 0
    assert d[on].max() <= 1, "edge pixels more than 1 px from the square's outline"
    # every side is traced along its length (corners may be rounded off)
    for line in (on[14:18, 18:30], on[30:34, 18:30], on[18:30, 14:18].T, on[18:30, 30:34].T):
        assert line.any(axis=0).all()


def test_canny_thresholds_matter():
    # a faint square (grey step of 40) has edges at low thresholds only
    faint = square(48, (16, 16, 31, 31), fill=(140, 140, 140), background=(100, 100, 100))
    assert as_array(run("canny", faint, low_threshold=10, high_threshold=20)).any()
    assert not as_array(run("canny", faint, low_threshold=250, high_threshold=255)).any()


@pytest.mark.parametrize("t", [0, 50, 127, 254])
def test_threshold_against_numpy(t):
    im = random_image(t)
    expected = np.where(np.asarray(im).min(axis=2) > t, 255, 0)
    assert np.array_equal(as_array(run("threshold", im, threshold=t)), expected)


def test_threshold_default_is_127():
    im = Image.fromarray(np.array([[[127] * 3, [128] * 3]], dtype=np.uint8), "RGB")
    assert as_array(run("threshold", im)).tolist() == [[0, 255]]


def test_invert_against_numpy():
    im = random_image(1)
    assert np.array_equal(np.asarray(run("invert", im)), 255 - np.asarray(im).astype(int))


def test_scribble_xdog_lines_on_the_border():
    box = (32, 32, 95, 95)
    hint = as_array(run("scribble_xdog", square(128, box)))
    assert set(np.unique(hint)) == {0, 255}
    d = distance_to_border(128, box)
    # lines on the dark side of the outline, the outline itself white all round; flat regions black
    assert (hint[d == 0] == 255).all()
    assert (hint[d > 8] == 0).all()
    # the line is as wide as the wide blur (sigma 5) reaches: several pixels, not a hairline
    assert (hint[64, 32:37] == 255).all() and (hint[64, 96:] == 0).all()
    # a higher threshold keeps fewer line pixels
    assert (as_array(run("scribble_xdog", square(128, box), threshold=64)) > 0).sum() < (hint > 0).sum()


def test_lineart_standard_lines_on_the_border():
    box = (32, 32, 95, 95)
    hint = as_array(run("lineart_standard", square(128, box)))
    d = distance_to_border(128, box)
    assert hint.max() == 255
    assert (hint[d == 0] >= 200).all(), "the outline is the strongest line"
    assert (hint[d > 20] == 0).all(), "flat regions stay black"
    # strength falls off away from the outline (inside, on the dark side)
    row = hint[64, 32:52].astype(int)
    assert (np.diff(row) <= 0).all() and row[0] > row[10] > 0


@pytest.mark.parametrize("name", ["scribble_xdog", "lineart_standard", "canny"])
def test_flat_image_gives_a_black_hint(name):
    assert not as_array(run(name, Image.new("RGB", (64, 48), (90, 120, 200)))).any()


def test_tile_resample_shrinks_with_area_interpolation():
    im = random_image(2, size=(64, 48))
    assert run("tile_resample", im).size == (64, 48)
    assert run("tile_resample", im, down_sampling_rate=1.05).size == (64, 48)  # below 1.1: as is
    out = run("tile_resample", im, down_sampling_rate=2)
    assert out.size == (32, 24)
    x = np.asarray(im).astype(float)
    blocks = x.reshape(24, 2, 32, 2, 3).mean(axis=(1, 3))  # area = the mean of each 2x2 block
    assert np.abs(np.asarray(out).astype(float) - blocks).max() <= 1
    assert run("tile_resample", im, down_sampling_rate=3).size == (21, 16)


def test_missing_opencv_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # "import cv2" now raises ImportError
    with pytest.raises(annotators.OpenCVMissing) as info:
        run("canny", square())
    assert str(info.value) == ("OpenCV is needed for the canny preprocessor: "
                               "pip install opencv-python-headless")
    assert as_array(run("invert", square(8, (2, 2, 5, 5)))).any()  # numpy-only ones still work


def test_pipeline_does_not_import_annotators():
    code = ("import sys, pipelines.pipeline\n"
            "print('pipelines.annotators' in sys.modules, 'cv2' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]
