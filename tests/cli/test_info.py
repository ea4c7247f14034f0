"""``ldm info`` on images and checkpoints."""
from __future__ import annotations

import json

from PIL import Image

from pipelines.images import format_parameters, parse_parameters, save_png
from tests.cli.common import run


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


def test_info_on_checkpoint(tiny, capsys, tmp_path):
    from safetensors import safe_open

    path = tiny / "tiny.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    code, out, err = run(["info", path], capsys)
    assert code == 0, err
    assert "family: sd1\n" in out
    assert "config: the file's own config (ldm_config metadata)" in out  # written by save_checkpoint
    assert f"keys:   {len(keys)}\n" in out
    assert f"dtype:  float32 ({len(keys)} tensors)" in out
    assert f"({path.stat().st_size} bytes)" in out
    assert "  - " in out  # the detection rules that fired are listed
    code, out, err = run(["info", path, "--json"], capsys)
    info = json.loads(out)
    assert info["family"].startswith("sd1") and info["keys"] == len(keys) and info["rules"]
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"  # the same tensors without the config metadata
    save_file(load_file(str(path)), str(bare))
    code, out, err = run(["info", bare], capsys)
    # the architecture comes from the shapes, but this tiny file's heads cannot: named, with the fix
    assert "config: none (" in out and "heads cannot be read from shapes" in out and "--config" in out


def test_info_on_controlnet(capsys, tmp_path):
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from ldm.controlnet_config import ControlNetConfig
    from ldm.modules.controlnet import ControlNet
    from reference.tiny import tiny_config

    # a tiny ControlNet with SD1's context width (768), so the family and its head rule apply
    unet = dataclasses.replace(tiny_config("sd1").unet, context_dim=768, num_heads=8)
    state = ControlNet(ControlNetConfig.from_unet(unet)).state_dict()
    path = tmp_path / "control_tiny.safetensors"
    save_file({f"control_model.{k}": v.half() for k, v in state.items()}, str(path))
    code, out, err = run(["info", path], capsys)
    assert code == 0, err
    assert "family: controlnet (sd1)\n" in out
    assert "config: inferred from the tensor shapes (sd1; heads from built-in config v1-inference)" in out
    assert "  - channel_mult = (1, 2)" in out and "  - num_heads = 8" in out
    assert f"keys:   {len(state)}\n" in out and f"dtype:  float16 ({len(state)} tensors)" in out
    code, out, err = run(["info", path, "--json"], capsys)
    info = json.loads(out)
    assert info["family"] == "controlnet (sd1)" and info["keys"] == len(state)
    # the tiny configs' context width is no family's: described, with why no config
    tiny = ControlNet(ControlNetConfig.from_unet(tiny_config("sd2").unet)).state_dict()
    save_file(dict(tiny), str(path))
    code, out, err = run(["info", path], capsys)
    assert code == 0 and "family: controlnet (unknown)\n" in out
    assert "config: none (" in out and "heads" in out
