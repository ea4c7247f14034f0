"""Variation-seed options of the generation commands (the shipped default model)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.images import read_parameters
from pipelines.pipeline import Pipeline
from tests.cli.common import assert_one_error, run

pytestmark = pytest.mark.usefixtures("single_thread")


def test_variation_options_make_the_python_image(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["txt2img", "a red circle", "--seed", "3", "--steps", "3", "-q",
                          "--subseed", "9", "--subseed-strength", "0.4", "--seed-resize-from-w", "48",
                          "--seed-resize-from-h", "56", "-o", "v.png"], capsys)
    assert code == 0, err
    text = read_parameters(tmp_path / "v.png")
    assert "Variation seed: 9, Variation seed strength: 0.4" in text and "Seed resize from: 48x56" in text
    ref = Pipeline.from_checkpoint().txt2img("a red circle", seed=3, num_inference_steps=3, subseed=9,
                                             subseed_strength=0.4, seed_resize_from_w=48,
                                             seed_resize_from_h=56, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "v.png").convert("RGB")), np.asarray(ref))


@pytest.mark.parametrize("flags,fragment", [
    (["--subseed-strength", "2"], "--subseed-strength"),
    (["--seed-resize-from-w", "64"], "both"),
    (["--seed-resize-from-w", "60", "--seed-resize-from-h", "64"], "multiple of 8"),
])
def test_bad_variation_options(tmp_path, capsys, monkeypatch, flags, fragment):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["txt2img", "a red circle", "-o", "x.png"] + flags, capsys)
    assert code == 2
    assert_one_error(err, fragment)
    assert not (tmp_path / "x.png").exists()
