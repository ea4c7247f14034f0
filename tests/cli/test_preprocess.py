"""``ldm preprocess``: a hint PNG written atomically, or one ``error:`` line and nothing written."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.cli.common import assert_one_error, files_under, run


@pytest.fixture
def photo(inputs, monkeypatch):
    """A white rectangle on black in the work folder, which is also the current directory."""
    monkeypatch.chdir(inputs)
    im = Image.new("RGB", (64, 48), "black")
    ImageDraw.Draw(im).rectangle((16, 12, 47, 35), fill="white")
    im.save(inputs / "photo.png")
    return inputs / "photo.png"


def test_canny_writes_a_png(inputs, photo, capsys):
    code, out, err = run(["preprocess", "canny", photo, "-o", inputs / "edges.png",
                          "--low-threshold", 50, "--high-threshold", 150], capsys)
    assert (code, err) == (0, "")
    assert out.strip() == str(inputs / "edges.png")
    with Image.open(inputs / "edges.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 48))
        edges = np.asarray(im)[..., 0]
    assert edges[11:13, 20].max() == 255  # the rectangle's top side, rows 12.. filled
    assert edges[24, 32] == 0 and edges[2, 2] == 0
    assert not [p for p in files_under(inputs) if p.name.endswith(".tmp")]


def test_tile_resample_rate(inputs, photo, capsys):
    code, out, err = run(["preprocess", "tile_resample", photo, "-o", inputs / "tile.png",
                          "--rate", 2], capsys)
    assert code == 0, err
    with Image.open(inputs / "tile.png") as im:
        assert im.size == (32, 24)


def test_invert_into_a_new_folder(inputs, photo, capsys):
    code, out, err = run(["preprocess", "invert", photo, "-o", inputs / "new" / "inv.png"], capsys)
    assert code == 0, err
    with Image.open(inputs / "new" / "inv.png") as im:
        assert np.asarray(im)[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("argv, status, fragment", [
    (["sobel", "photo.png"], 2, "invalid choice: 'sobel'"),
    (["canny", "photo.png", "--threshold", "3"], 2,
     "argument --threshold: not an option of the canny preprocessor (its options: "
     "--low-threshold, --high-threshold)"),
    (["invert", "photo.png", "--rate", "2"], 2, "not an option of the invert preprocessor"),
    (["threshold", "photo.png", "--low-threshold", "2"], 2, "argument --low-threshold"),
    (["scribble_xdog", "photo.png", "--threshold", "100"], 2,
     "argument --threshold: scribble_xdog: threshold must be between 1 and 64"),
    (["canny", "photo.png", "--low-threshold", "220"], 2, "low_threshold (220) is above"),
    (["canny", "photo.png", "--low-threshold", "ten"], 2, "argument --low-threshold"),
    (["canny", "missing.png"], 1, "image missing.png: no such file"),
    (["canny", "fake.png"], 1, "image fake.png: not an image file"),
    (["canny", "notes.txt"], 1, "image notes.txt"),
])
def test_errors_write_nothing(inputs, photo, capsys, argv, status, fragment):
    before = files_under(inputs)
    code, out, err = run(["preprocess", *argv, "-o", "out.png"], capsys)
    assert code == status
    assert_one_error(err, fragment)
    assert out == ""
    assert files_under(inputs) == before


def test_output_must_be_png_and_not_a_folder(inputs, photo, capsys):
    before = files_under(inputs)
    code, _, err = run(["preprocess", "canny", photo, "-o", "edges.jpg"], capsys)
    assert code == 2
    assert_one_error(err, "--output must name a .png file")
    code, _, err = run(["preprocess", "canny", photo, "-o", "outdir.png"], capsys)
    assert code == 1
    assert_one_error(err, "is a folder")
    assert files_under(inputs) == before


def test_missing_opencv(inputs, photo, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cv2", None)
    code, _, err = run(["preprocess", "canny", photo, "-o", "edges.png"], capsys)
    assert code == 1
    assert_one_error(err, "OpenCV is needed for the canny preprocessor: "
                          "pip install opencv-python-headless")
    assert not (inputs / "edges.png").exists()
