"""The default model's evaluation: scoring from pixels, bars, and a run on a random tiny model."""
import random
from dataclasses import replace
from types import SimpleNamespace

import torch

from ldm.checkpoint import save_checkpoint
from ldm.config import load_config
from ldm.model import LatentDiffusion
from training.shapes import COLOURS, HELD_OUT, parse_caption, spec_for_caption
from training.default_model import evaluate
from training.default_model.cli import main
from training.default_model.common import CONFIG_PATH


class RenderingPipe:
    """Draws exactly what each prompt asks: a perfect model, to check the scoring end to end."""

    def __init__(self, wrong_colour=False):
        self.wrong_colour = wrong_colour

    def _draw(self, text, seed):
        caption = parse_caption(text)
        if self.wrong_colour:
            other = next(c for c in COLOURS if c not in (caption.colour, caption.background))
            caption = replace(caption, colour=other)
        return spec_for_caption(caption, random.Random(seed)).render()

    def txt2img(self, prompts, seed, **_):
        return SimpleNamespace(images=[self._draw(p, seed + i) for i, p in enumerate(prompts)])


def test_perfect_images_score_full_marks_and_wrong_colours_fail():
    rng = random.Random(0)
    captions = evaluate._prompts(rng, sorted(HELD_OUT), 40)
    opts = evaluate.EvalOptions(batch=16)
    good = evaluate.txt2img_group(RenderingPipe(), captions, opts, seed=5)
    assert {k: v["accuracy"] for k, v in good.items()} == \
        {"background": 1.0, "colour": 1.0, "position": 1.0, "shape": 1.0, "size": 1.0}
    assert good["colour"]["count"] == 40 and 0 < good["size"]["count"] < 40
    bad = evaluate.txt2img_group(RenderingPipe(wrong_colour=True), captions, opts, seed=5)
    assert bad["colour"]["accuracy"] < 0.2


def test_bars_are_judged_in_the_right_direction():
    report = {"trained": {"colour": {"accuracy": 0.99, "count": 10}, "shape": {"accuracy": 0.5, "count": 10}},
              "psnr_db": 29.9, "seconds_per_image": 0.2, "cli_seconds": 12.0}
    assert evaluate.passed(report) == {"trained.colour": True, "trained.shape": False, "psnr_db": False,
                                       "seconds_per_image": True, "cli_seconds": False}


def test_evaluate_command_runs_on_a_model_and_keeps_inpainting_outside_the_mask(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "random.safetensors"
    save_checkpoint(LatentDiffusion(load_config(CONFIG_PATH)), path, half=True)
    (tmp_path / "random.yaml").write_text(CONFIG_PATH.read_text())
    pipe_opts = evaluate.EvalOptions(checkpoint=path, images=2, steps=2, psnr_images=4, cli=False)
    report = evaluate.run(pipe_opts, tmp_path)
    assert report["trained"]["colour"]["count"] == 4 and report["held_out"]["shape"]["count"] == 2
    assert report["inpaint"]["outside_unchanged"]["accuracy"] == 1.0  # bit-identical outside the hole
    assert report["psnr_db"] < 20  # random weights reconstruct nothing
    assert report["passed"]["psnr_db"] is False
    assert report["reconstruction_shapes"]["shape_all"] < 0.5  # nor any shape
    assert "autoencoder shape kept: " in evaluate.format_report(report)


def test_evaluate_command_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    code = main(["evaluate", "--checkpoint", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "absent.safetensors" in err and len(err.splitlines()) == 1
