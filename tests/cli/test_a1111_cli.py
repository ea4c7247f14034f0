"""Hires fix, styles and --parameters-from on the command line (the shipped default model)."""
from __future__ import annotations

import pytest
from PIL import Image

from cli.a1111_args import merge_style
from pipelines.images import read_parameters
from tests.cli.common import assert_one_error, files_under, run

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = ["--steps", "4", "-q"]


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "styles.csv").write_text(
        'name,prompt,negative_prompt\nframed,"{prompt} on a white background",blurry\n'
        "shiny,glossy,dull\n", encoding="utf-8")
    return tmp_path


def test_merge_style_as_a1111():
    assert merge_style("{prompt}, at night", "a cat") == "a cat, at night"
    assert merge_style("glossy", "a cat") == "a cat, glossy"
    assert merge_style("glossy", "") == "glossy"
    assert merge_style("", "a cat") == "a cat"


def test_styles_merge_into_prompt_and_negative(work, capsys):
    code, out, err = run(["txt2img", "a red circle", "--style", "framed", "--style", "shiny",
                          "--negative-prompt", "noise", "--seed", "1", "-o", "s.png"] + FAST, capsys)
    assert code == 0, err
    text = read_parameters(work / "s.png")
    assert text.startswith("a red circle on a white background, glossy\nNegative prompt: noise, blurry, dull")


def test_hires_options_and_parameters_from_repeat_the_image(work, capsys):
    code, out, err = run(["txt2img", "a blue square", "--seed", "7", "--hr-scale", "1.5",
                          "--hr-denoising-strength", "0.45", "--hr-steps", "6", "--hr-sampler", "ddim",
                          "--subseed", "3", "--subseed-strength", "0.2", "-o", "h.png"] + FAST, capsys)
    assert code == 0, err
    assert Image.open(work / "h.png").size == (96, 96)
    text = read_parameters(work / "h.png")
    assert "Hires upscale: 1.5" in text and "Hires sampler: DDIM" in text
    code, out, err = run(["txt2img", "--parameters-from", "h.png", "-o", "again.png", "-q"], capsys)
    assert code == 0, err
    assert (work / "again.png").read_bytes() == (work / "h.png").read_bytes()
    # the same from a text file, and an option given on the command line wins
    (work / "p.txt").write_text(text, encoding="utf-8")
    code, out, err = run(["txt2img", "--parameters-from", "p.txt", "--seed", "8", "-o", "b.png",
                          "-q"], capsys)
    assert code == 0, err
    assert "Seed: 8," in read_parameters(work / "b.png")


def test_fields_that_cannot_be_repeated_are_named(work, capsys):
    (work / "p.txt").write_text(
        "a red circle\nSteps: 3, Sampler: Euler a, CFG scale: 3, Seed: 5, Size: 64x64, "
        'ControlNet 0: "Module: canny, Model: x", Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+, '
        "Denoising strength: 0.5, Face restoration: CodeFormer", encoding="utf-8")
    code, out, err = run(["txt2img", "--parameters-from", "p.txt", "-o", "c.png"], capsys)
    assert code == 0, err
    note = [line for line in err.splitlines() if "not repeated here" in line]
    assert note and "ControlNet 0" in note[0] and "R-ESRGAN 4x+" in note[0] and "Face restoration" in note[0]
    text = read_parameters(work / "c.png")
    assert "Sampler: Euler a" in text and "Seed: 5" in text and "Hires upscale: 2" in text


@pytest.mark.parametrize("argv,code,fragment", [
    (["txt2img", "x", "--style", "nope"], 1, "style 'nope' is not in styles.csv"),
    (["txt2img", "x", "--style", "framed", "--styles-file", "none.csv"], 1, "none.csv: no such file"),
    (["txt2img", "--parameters-from", "missing.png"], 1, "missing.png: no such file"),
    (["txt2img", "--parameters-from", "bare.png"], 1, "has no parameters"),
    (["txt2img", "x", "--hr-scale", "2", "--hr-upscaler", "ESRGAN"], 2, "upscaler"),
])
def test_bad_inputs(work, capsys, argv, code, fragment):
    Image.new("RGB", (8, 8)).save(work / "bare.png")
    before = files_under(work)
    got, out, err = run(argv + ["-o", "x.png"], capsys)
    assert got == code, err
    assert_one_error(err, fragment)
    assert files_under(work) == before
