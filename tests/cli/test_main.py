"""The ``ldm`` entry point: instant help, exit statuses, one-line errors before any model loads."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main
from tests.cli.common import ROOT, assert_one_error, files_under, model_args, run


# ---------------------------------------------------------------- start-up cost
def test_help_imports_no_torch():
    code = ("import sys, contextlib, io\n"
            "from cli.main import main\n"
            "for argv in (['--help'], ['txt2img', '--help'], ['inpaint', '--help'], ['info', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        assert main(argv) == 0, argv\n"
            "    assert 'usage: ldm' in out.getvalue()\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'ldm', 'PIL',\n"
            "                      'pipelines.pipeline', 'training')\n"
            "         if m in sys.modules]\n"
            "print(heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _ldm_command() -> list[str]:
    script = Path(sys.executable).with_name("ldm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def test_real_process_exit_codes_and_stderr(tmp_path):
    cmd = _ldm_command()
    proc = subprocess.run(cmd + ["img2img", "a cat", "--image", "missing.png"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "error: image missing.png: no such file\n"
    assert proc.stdout == ""
    proc = subprocess.run(cmd + ["txt2img", "a cat", "--steps", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_error(proc.stderr, "argument --steps: must be at least 1, got 0")
    assert files_under(tmp_path) == set()
    proc = subprocess.run([sys.executable, "-m", "cli", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "txt2img" in proc.stdout


# ---------------------------------------------------------------- bad input
BAD = [  # argv, exit code, fragment of the error line
    (["txt2img"], 2, "missing PROMPT"),
    (["txt2img", "x", "--from-file", "notes.txt"], 2, "not both"),
    (["txt2img", "x", "--steps", "0"], 2, "--steps: must be at least 1"),
    (["txt2img", "x", "--steps", "ten"], 2, "--steps: expected a whole number"),
    (["txt2img", "x", "--width", "0"], 2, "--width: must be at least 1"),
    (["txt2img", "x", "--height", "-8"], 2, "--height: must be at least 1"),
    (["txt2img", "x", "--width", "20"], 2, "--width: must be a multiple of 8"),
    (["txt2img", "x", "--guidance-scale", "-1"], 2, "--guidance-scale: must be at least 0"),
    (["txt2img", "x", "--guidance-scale", "nan"], 2, "--guidance-scale"),
    (["txt2img", "x", "--num-images", "0"], 2, "--num-images: must be at least 1"),
    (["txt2img", "x", "--eta", "-0.5"], 2, "--eta: must be at least 0"),
    (["txt2img", "x", "--clip-skip", "-1"], 2, "--clip-skip: must be at least 0"),
    (["txt2img", "x", "--seed", "-7"], 2, "--seed: must be between 0 and 2**64-1"),
    (["txt2img", "x", "--seed", str(2**64 - 1), "--num-images", "2"], 2, "exceeds 2**64-1"),
    (["txt2img", "x", "--dtype", "fp8"], 2, "--dtype: invalid choice"),
    (["txt2img", "x", "--attention", "flash"], 2, "--attention: invalid choice"),
    (["txt2img", "x", "--prediction", "x0"], 2, "--prediction: invalid choice"),
    (["txt2img", "x", "--scheduler", "euler_b"], 2, "unknown scheduler 'euler_b'; choose from ddim,"),
    (["txt2img", "x", "--device", "gpu!"], 2, "--device: not a device name"),
    (["txt2img", "x", "-o", "out.jpg"], 2, "--output must name a .png file"),
    (["txt2img", "x", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["img2img", "x"], 2, "the following arguments are required: --image"),
    (["img2img", "x", "--image", "in.png", "--strength", "1.5"], 2, "--strength: must be between 0 and 1"),
    (["inpaint", "x", "--image", "in.png", "--mask", "mask.png", "--strength", "-0.1"], 2,
     "--strength: must be between 0 and 1"),
    (["inpaint", "x", "--image", "in.png"], 2, "required: --mask"),
    (["inpaint", "x", "--image", "in.png", "--mask", "mask.png", "--mask-blur", "-2"], 2,
     "--mask-blur: must be at least 0"),
    (["img2img", "x", "--image", "missing.png"], 1, "image missing.png: no such file"),
    (["img2img", "x", "--image", "notes.txt"], 1, "image notes.txt: not an image file"),
    (["img2img", "x", "--image", "fake.png"], 1, "image fake.png: not an image file"),
    (["img2img", "x", "--image", "outdir.png"], 1, "image outdir.png: is a folder"),
    (["inpaint", "x", "--image", "in.png", "--mask", "nomask.png"], 1, "mask nomask.png: no such file"),
    (["inpaint", "x", "--image", "in.png", "--mask", "notes.txt"], 1, "mask notes.txt: not an image file"),
    (["inpaint", "x", "--image", "notes.txt", "--mask", "mask.png"], 1, "image notes.txt: not an image"),
    (["txt2img", "--from-file", "empty.txt"], 1, "prompts file empty.txt: no prompts in it"),
    (["txt2img", "--from-file", "nofile.txt"], 1, "prompts file nofile.txt: no such file"),
    (["txt2img", "--from-file", "in.png"], 1, "prompts file in.png: not UTF-8 text"),
    (["txt2img", "x", "--checkpoint", "nothere.safetensors"], 1, "nothere.safetensors: no such file"),
    (["txt2img", "x", "--config", "bad.yaml"], 1, "bad.yaml: not valid YAML"),
    (["txt2img", "x", "--config", "wrong.yaml"], 1, "wrong.yaml"),
    (["txt2img", "x", "--config", "nothere.yaml"], 1, "nothere.yaml: cannot read"),
    (["txt2img", "x", "-o", "outdir.png"], 1, "output outdir.png: is a folder"),
    (["info", "nothere.png"], 1, "nothere.png: no such file"),
    (["info", "in.png"], 1, "image in.png: no generation parameters stored"),
    (["info", "notes.txt"], 1, "notes.txt: not a checkpoint (a text file"),
    (["info", "garbage.safetensors"], 1, "garbage.safetensors"),
]


@pytest.mark.parametrize("argv, code, fragment", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_input_one_error_line_no_model_no_file(argv, code, fragment, inputs, capsys, monkeypatch):
    from pipelines.pipeline import Pipeline

    loads = []
    monkeypatch.setattr(Pipeline, "from_checkpoint", classmethod(lambda cls, *a, **k: loads.append(a)))
    monkeypatch.chdir(inputs)
    before = files_under(inputs)
    got, out, err = run(argv, capsys)
    assert got == code, err
    assert_one_error(err, fragment)
    assert loads == []  # checked before any model loading
    assert files_under(inputs) == before
    assert out == ""


@pytest.mark.parametrize("extra, fragment", [
    (["--checkpoint", "garbage.safetensors"], "garbage.safetensors: "),
    (["--clip-skip", "5"], "clip_skip must be"),
    (["--config", str(ROOT / "configs" / "v2-inference.yaml")], "tiny.safetensors"),
])
def test_errors_found_while_loading_or_generating(extra, fragment, tiny, inputs, capsys, monkeypatch):
    monkeypatch.chdir(inputs)
    before = files_under(inputs)
    argv = ["txt2img", "x", "--steps", "1", "--width", "16", "--height", "16", "--seed", "1"]
    argv += model_args(tiny)
    argv += extra  # argparse keeps the last --checkpoint / --config given
    code, out, err = run(argv, capsys)
    assert code == 1, err
    assert_one_error(err, fragment)
    assert files_under(inputs) == before


def test_default_model_missing(inputs, capsys, monkeypatch):
    import pipelines.pipeline as pipeline

    monkeypatch.setattr(pipeline, "DEFAULT_CHECKPOINT", inputs / "weights" / "tiny-shapes.safetensors")
    monkeypatch.chdir(inputs)
    code, out, err = run(["txt2img", "a red square", "--seed", "3"], capsys)
    assert code == 1
    assert_one_error(err, "error: no default model is installed")
    assert "--checkpoint" in err and not (inputs / "out.png").exists()


def test_unexpected_error_one_line_and_debug_traceback(capsys, monkeypatch):
    import cli.generate as generate

    def boom(args):
        raise RuntimeError("kernel exploded\n  at line 3")

    monkeypatch.setattr(generate, "run", boom)
    code, out, err = run(["txt2img", "x"], capsys)
    assert code == 1
    line = assert_one_error(err, "unexpected RuntimeError: kernel exploded at line 3")
    assert line.endswith("(rerun with LDM_DEBUG=1 for the traceback)")
    monkeypatch.setenv("LDM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kernel exploded"):
        main(["txt2img", "x"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.delenv("LDM_DEBUG")
    monkeypatch.setattr(generate, "run", interrupted)
    code, out, err = run(["txt2img", "x"], capsys)
    assert code == 130 and err == "error: interrupted\n"


def test_train_lora_gets_the_rest_of_the_command_line(capsys, monkeypatch):
    import types

    import cli

    seen = []
    fake = types.ModuleType("cli.train_lora")
    fake.run = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "cli.train_lora", fake)
    monkeypatch.setattr(cli, "train_lora", fake, raising=False)
    assert main(["train-lora", "--data", "d", "--output", "o.safetensors"]) == 0
    assert seen == [["--data", "d", "--output", "o.safetensors"]]
    fake.run = lambda argv: (_ for _ in ()).throw(cli.args.UsageError("--rank: must be at least 1"))
    code, out, err = run(["train-lora", "--rank", "0"], capsys)
    assert code == 2 and err == "error: --rank: must be at least 1\n"


@pytest.mark.parametrize("kind, low, high, strict, text, message", [
    (int, 1, None, False, "0", "must be at least 1, got 0"),
    (int, 1, None, False, "1.5", "expected a whole number, got '1.5'"),
    (float, 0.0, 1.0, False, "1.5", "must be between 0 and 1, got 1.5"),
    (float, 0.0, None, False, "nan", "must be at least 0, got nan"),
    (float, 0.0, None, True, "0", "must be greater than 0, got 0"),
    (float, 0.0, None, False, "x", "expected a number, got 'x'"),
])
def test_number_options_report_the_range(kind, low, high, strict, text, message):
    import argparse

    from cli.args import number

    parse = number(kind, low, high, strict_low=strict)
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(message)}$"):
        parse(text)
    assert parse("1") == 1 and type(parse("1")) is kind
