"""``ldm txt2img / img2img / inpaint`` end to end on a tiny model: outputs and their metadata."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipelines.images import parse_parameters
from tests.cli.common import model_args, run


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


def test_shipped_model_by_path_or_copied_gives_the_default_image(tmp_path, capsys):
    """The default model's file carries its config: passed by path, or copied to another folder
    without its YAML, it gives the image the command gives without --checkpoint."""
    from PIL import Image

    from pipelines.pipeline import DEFAULT_CHECKPOINT

    copy = tmp_path / "elsewhere" / "my-model.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(DEFAULT_CHECKPOINT.read_bytes())
    outs = []
    for extra, name in (([], "default.png"), (["--checkpoint", str(DEFAULT_CHECKPOINT)], "path.png"),
                        (["--checkpoint", str(copy)], "copy.png")):
        code, out, err = run(["txt2img", "a red circle on a blue background", "--seed", "3", "--steps", "4",
                              "-o", str(tmp_path / name), "-q", *extra], capsys)
        assert code == 0, err
        outs.append(Image.open(tmp_path / name))
    pixels = [im.tobytes() for im in outs]
    assert pixels[0] == pixels[1] == pixels[2]
    hashes = {im.info["parameters"].split("Model hash: ")[1].split(",")[0] for im in outs}
    assert len(hashes) == 1  # the same file
