"""The ``ldm`` command line: argument checking, one-line errors, outputs and their metadata."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.cli import main
from pipelines.images import format_parameters, parse_parameters, save_png

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD1 checkpoint saved as a user would have it, with its YAML next to it elsewhere."""
    import torch

    from ldm.checkpoint import save_checkpoint
    from ldm.model import LatentDiffusion
    from reference.tiny import tiny_config, tiny_tree

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_checkpoint(LatentDiffusion(tiny_config("sd1")), folder / "tiny.safetensors")
    (folder / "tiny-config.yaml").write_text(yaml.safe_dump(tiny_tree("sd1")))
    return folder


def model_args(tiny) -> list[str]:
    return ["--checkpoint", str(tiny / "tiny.safetensors"), "--config", str(tiny / "tiny-config.yaml")]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(err: str, fragment: str = "") -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]
    return lines[0]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- start-up cost
def test_help_imports_no_torch():
    code = ("import sys, contextlib, io\n"
            "from pipelines.cli import main\n"
            "for argv in (['--help'], ['txt2img', '--help'], ['inpaint', '--help'], ['info', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        assert main(argv) == 0, argv\n"
            "    assert 'usage: ldm' in out.getvalue()\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'ldm', 'PIL')\n"
            "         if m in sys.modules]\n"
            "print(heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _ldm_command() -> list[str]:
    script = Path(sys.executable).with_name("ldm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipelines.cli"]


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
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "txt2img" in proc.stdout


# ---------------------------------------------------------------- bad input
@pytest.fixture
def inputs(tmp_path):
    """A work folder with a valid image and mask and some bad files; cwd is the folder."""
    Image.new("RGB", (24, 16), "red").save(tmp_path / "in.png")
    Image.new("L", (24, 16), 255).save(tmp_path / "mask.png")
    (tmp_path / "notes.txt").write_text("not an image at all\n")
    (tmp_path / "fake.png").write_text("a text file named .png\n")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n   \n")
    (tmp_path / "garbage.safetensors").write_text("hello, I am not a checkpoint\n")
    (tmp_path / "bad.yaml").write_text("model:\n  params:\n    unet_config: [1, 2\n")
    (tmp_path / "wrong.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
                                         "  params:\n    unet_config: {}\n")
    (tmp_path / "outdir.png").mkdir()
    return tmp_path


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
    import pipelines.cli as cli

    def boom(args):
        raise RuntimeError("kernel exploded\n  at line 3")

    monkeypatch.setattr(cli, "generate", boom)
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
    monkeypatch.setattr(cli, "generate", interrupted)
    code, out, err = run(["txt2img", "x"], capsys)
    assert code == 130 and err == "error: interrupted\n"


# ---------------------------------------------------------------- info
def test_info_prints_stored_parameters(tmp_path, capsys):
    params = dict(prompt='a "red" circle, big\nsecond line', negative_prompt="blurry, dark", steps=30,
                  sampler="euler_a", cfg_scale=6.0, seed=1234567890123, width=64, height=48,
                  model="tiny-shapes", model_hash="abcdef1234", strength=0.5, mode="img2img",
                  clip_skip=1)
    save_png(Image.new("RGB", (64, 48)), tmp_path / "p.png", params)
    code, out, err = run(["info", tmp_path / "p.png"], capsys)
    assert code == 0 and err == ""
    assert out == format_parameters(params) + "\n"
    assert "Sampler: Euler a" in out and "Clip skip: 2" in out
    assert parse_parameters(out) == params
    code, out, err = run(["info", tmp_path / "p.png", "--json"], capsys)
    assert code == 0 and json.loads(out) == params


def test_info_on_checkpoint(tiny, capsys):
    from safetensors import safe_open

    path = tiny / "tiny.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    code, out, err = run(["info", path], capsys)
    assert code == 0, err
    assert "family: sd1 (config v1-inference)" in out
    assert f"keys:   {len(keys)}\n" in out
    assert f"dtype:  float32 ({len(keys)} tensors)" in out
    assert f"({path.stat().st_size} bytes)" in out
    assert "  - " in out  # the detection rules that fired are listed
    code, out, err = run(["info", path, "--json"], capsys)
    info = json.loads(out)
    assert info["family"].startswith("sd1") and info["keys"] == len(keys) and info["rules"]


# ---------------------------------------------------------------- end to end on a tiny model
def sha10(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_txt2img_writes_png_with_parameters(tiny, tmp_path, capsys):
    out_path = tmp_path / "sub" / "a.png"
    argv = ["txt2img", "a red circle, big", "--negative-prompt", "blue", "--steps", "2",
            "--scheduler", "euler", "--guidance-scale", "5", "--seed", "7", "--width", "24",
            "--height", "16", "-o", out_path, "--quiet"] + model_args(tiny)
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert err == ""  # --quiet: no progress bar, no notes
    assert out == f"wrote {out_path} (seed 7)\n"
    with Image.open(out_path) as im:
        assert im.size == (24, 16) and im.mode == "RGB"
        text = im.info["parameters"]
    assert parse_parameters(text) == {
        "prompt": "a red circle, big", "negative_prompt": "blue", "steps": 2, "sampler": "euler",
        "cfg_scale": 5.0, "seed": 7, "width": 24, "height": 16,
        "model_hash": sha10(tiny / "tiny.safetensors"), "model": "tiny", "mode": "txt2img"}
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["a.png"]  # no temp file left


def test_sampling_defaults_come_from_the_model_config(tiny, tmp_path, capsys):
    from reference.tiny import tiny_tree

    tree = tiny_tree("sd1")
    tree["sampling"] = {"guidance_scale": 3.5, "num_inference_steps": 2, "scheduler": "euler"}
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(tree))
    argv = ["txt2img", "x", "--seed", "1", "--width", "16", "--height", "16", "-q",
            "--checkpoint", tiny / "tiny.safetensors", "--config", tmp_path / "own.yaml"]
    code, _, err = run(argv + ["-o", tmp_path / "a.png"], capsys)
    assert code == 0, err
    p = parse_parameters(Image.open(tmp_path / "a.png").info["parameters"])
    assert (p["steps"], p["cfg_scale"], p["sampler"]) == (2, 3.5, "euler")
    code, _, err = run(argv + ["-o", tmp_path / "b.png", "--guidance-scale", "6"], capsys)
    assert code == 0, err
    p = parse_parameters(Image.open(tmp_path / "b.png").info["parameters"])
    assert (p["steps"], p["cfg_scale"], p["sampler"]) == (2, 6.0, "euler")


def test_random_seed_is_printed_and_reproduces(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["txt2img", "x", "--steps", "1", "--width", "16", "--height", "16"] + model_args(tiny)
    code, out, err = run(base, capsys)
    assert code == 0, err
    seed = int(out.split("(seed ")[1].rstrip(")\n"))
    assert f"note: seed {seed} (random; pass --seed {seed} to reproduce)" in err
    first = np.asarray(Image.open(tmp_path / "out.png"))  # the default output name
    code, out, err = run(base + ["--seed", seed, "-o", "again.png"], capsys)
    assert code == 0 and out == f"wrote again.png (seed {seed})\n"
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "again.png")))


def test_num_images_and_prompt_file_number_outputs(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--steps", "1", "--width", "16", "--height", "16", "-q"] + model_args(tiny)
    code, out, err = run(["txt2img", "two", "--num-images", "2", "--seed", "10"] + small, capsys)
    assert code == 0, err
    assert out == "wrote out-0.png (seed 10)\nwrote out-1.png (seed 11)\n"
    a, b = (np.asarray(Image.open(tmp_path / f"out-{i}.png")) for i in range(2))
    assert not np.array_equal(a, b)
    assert parse_parameters(Image.open(tmp_path / "out-1.png").info["parameters"])["seed"] == 11

    (tmp_path / "prompts.txt").write_text("# a batch\nfirst prompt\n\n  second, with comma  \n")
    code, out, err = run(["txt2img", "--from-file", "prompts.txt", "-o", "b.png", "--seed", "5",
                          "--num-images", "2"] + small, capsys)
    assert code == 0, err
    assert out.splitlines() == [f"wrote b-{i}.png (seed {5 + i})" for i in range(4)]
    prompts = [parse_parameters(Image.open(tmp_path / f"b-{i}.png").info["parameters"])["prompt"]
               for i in range(4)]
    assert prompts == ["first prompt", "first prompt", "second, with comma", "second, with comma"]


def test_img2img_end_to_end(tiny, tmp_path, capsys):
    Image.effect_noise((32, 24), 60).convert("RGB").save(tmp_path / "in.png")
    code, out, err = run(["img2img", "make it red", "--image", tmp_path / "in.png", "--strength", "0.5",
                          "--steps", "2", "--seed", "1", "-o", tmp_path / "o.png", "-q"]
                         + model_args(tiny), capsys)
    assert code == 0, err
    p = parse_parameters(Image.open(tmp_path / "o.png").info["parameters"])
    assert Image.open(tmp_path / "o.png").size == (32, 24)
    assert (p["mode"], p["strength"], p["width"], p["height"]) == ("img2img", 0.5, 32, 24)


def test_inpaint_end_to_end_keeps_unmasked_pixels(tiny, tmp_path, capsys):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    mask = Image.new("L", (12, 8), 0)
    mask.paste(255, (6, 0, 12, 8))  # right half; half the image's size, so it gets resized
    mask.save(tmp_path / "m.png")
    code, out, err = run(["inpaint", "a square", "--image", tmp_path / "in.png", "--mask", tmp_path / "m.png",
                          "--steps", "2", "--seed", "2", "-o", tmp_path / "o.png"] + model_args(tiny),
                         capsys)
    assert code == 0, err
    assert f"note: mask {tmp_path / 'm.png'} is 12x8; resized to the image's 24x16" in err
    result = np.asarray(Image.open(tmp_path / "o.png"))
    assert result.shape == (16, 24, 3)
    assert np.array_equal(result[:, :12], pixels[:, :12])  # black half kept exactly
    assert not np.array_equal(result[:, 12:], pixels[:, 12:])
    p = parse_parameters(Image.open(tmp_path / "o.png").info["parameters"])
    assert (p["mode"], p["strength"], p["mask_blur"]) == ("inpaint", 1.0, 0)


def test_vae_tiling_and_options_reach_the_pipeline(tiny, tmp_path, capsys, monkeypatch):
    from pipelines.pipeline import Pipeline

    seen = {}
    original = Pipeline.from_checkpoint.__func__

    def spy(cls, *a, **k):
        seen.update(k)
        pipe = original(cls, *a, **k)
        seen["tiling"] = lambda: pipe.model.first_stage_model.tiling
        return pipe

    monkeypatch.setattr(Pipeline, "from_checkpoint", classmethod(spy))
    code, out, err = run(["txt2img", "x", "--steps", "1", "--width", "16", "--height", "16", "--seed", "0",
                          "--vae-tiling", "--attention", "math", "--dtype", "fp32", "--device", "cpu",
                          "--prediction", "eps", "-o", tmp_path / "t.png", "-q"] + model_args(tiny), capsys)
    assert code == 0, err
    assert (seen["attention"], seen["dtype"], seen["device"], seen["prediction"], seen["use_ema"]) == \
        ("math", "fp32", "cpu", "eps", False)
    assert seen["tiling"]() is True
