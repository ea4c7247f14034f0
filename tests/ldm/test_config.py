"""CompVis YAML → typed configs: the shipped files parse to the published hyperparameters, and every
kind of bad file fails with one ConfigError that names the file and the field."""
from __future__ import annotations

import builtins
import copy
import importlib
import os
import sys
from pathlib import Path

import pytest
import yaml

from ldm.config import CONFIG_DIR, ConfigError, SamplingDefaults, builtin_config, load_config

SD_CONFIGS = ["v1-inference", "v1-inpainting-inference", "v2-inference", "v2-inference-v",
              "v2-inpainting-inference"]


def test_every_shipped_yaml_parses():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert set(SD_CONFIGS) <= set(names)
    for name in names:
        builtin_config(name)


@pytest.mark.parametrize("name", SD_CONFIGS)
def test_shared_structure(name):
    cfg = builtin_config(name)
    sd2 = name.startswith("v2")
    inpaint = "inpainting" in name
    u, a, t = cfg.unet, cfg.autoencoder, cfg.text
    # UNet: 320 channels × (1, 2, 4, 4), attention at 1/1, 1/2, 1/4 resolution (Rombach et al. 2022)
    assert (u.model_channels, u.channel_mult, u.attention_resolutions) == (320, (1, 2, 4, 4), (4, 2, 1))
    assert (u.num_res_blocks, u.transformer_depth, u.out_channels) == (2, 1, 4)
    assert u.in_channels == (9 if inpaint else 4)
    assert u.context_dim == t.width == (1024 if sd2 else 768)
    assert u.use_linear_in_transformer is sd2
    assert u.heads_and_dim(640) == ((10, 64) if sd2 else (8, 80))  # SD2: 64-wide heads
    # KL-f8 autoencoder, 4 latent channels
    assert (a.ch, a.ch_mult, a.num_res_blocks, a.z_channels, a.embed_dim) == (128, (1, 2, 4, 4), 2, 4, 4)
    assert a.downscale == 8 and a.double_z
    # noise schedule: CompVis "linear" = diffusers "scaled_linear", 0.00085 → 0.012 over 1000 steps
    assert (cfg.linear_start, cfg.linear_end, cfg.timesteps) == (0.00085, 0.012, 1000)
    assert cfg.beta_schedule == "linear" and cfg.scale_factor == 0.18215
    assert cfg.conditioning_key == ("hybrid" if inpaint else "crossattn")
    assert cfg.is_inpainting is inpaint
    # text: SD1 = CLIP ViT-L/14, last layer, pads with <|endoftext|>;
    # SD2 = OpenCLIP ViT-H/14, penultimate layer, pads with 0
    if sd2:
        assert (t.kind, t.layer, t.pad_token_id, t.act) == ("openclip", "penultimate", 0, "gelu")
        assert (t.width, t.layers, t.heads) == (1024, 24, 16)
    else:
        assert (t.kind, t.layer, t.pad_token_id, t.act) == ("clip", "last", 49407, "quick_gelu")
        assert (t.width, t.layers, t.heads) == (768, 12, 12)
    assert (t.max_length, t.vocab_size) == (77, 49408)


@pytest.mark.parametrize("name, parameterization, latent, pixels", [
    ("v1-inference", "eps", 64, 512),
    ("v1-inpainting-inference", "eps", 64, 512),
    ("v2-inference", "eps", 64, 512),
    ("v2-inference-v", "v", 96, 768),
    ("v2-inpainting-inference", "eps", 64, 512),
])
def test_prediction_and_resolution(name, parameterization, latent, pixels):
    cfg = builtin_config(name)
    assert cfg.parameterization == parameterization
    assert (cfg.image_size, cfg.default_image_size) == (latent, pixels)


# ---- bad files ------------------------------------------------------------------------------

def sd1_tree() -> dict:
    return yaml.safe_load((CONFIG_DIR / "v1-inference.yaml").read_text())


def write(tmp_path: Path, content) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def load_error(tmp_path: Path, content) -> str:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, f"error does not name the file: {message}"
    assert "\n" not in message.strip(), f"expected one line: {message!r}"
    return message


def edited(edit) -> dict:
    tree = copy.deepcopy(sd1_tree())
    edit(tree)
    return tree


def test_missing_unet_config(tmp_path):
    tree = edited(lambda t: t["model"]["params"].pop("unet_config"))
    assert "model.params.unet_config" in load_error(tmp_path, tree)


def test_missing_unet_params(tmp_path):
    tree = edited(lambda t: t["model"]["params"]["unet_config"].pop("params"))
    assert "model.params.unet_config.params" in load_error(tmp_path, tree)


def test_missing_vae_embed_dim(tmp_path):
    tree = edited(lambda t: t["model"]["params"]["first_stage_config"]["params"].pop("embed_dim"))
    assert "model.params.first_stage_config.params.embed_dim" in load_error(tmp_path, tree)


@pytest.mark.parametrize("path, value", [
    ("model", 5),
    ("model.params", [1, 2]),
    ("model.params.unet_config", "x"),
    ("model.params.unet_config.params", [1]),
    ("model.params.first_stage_config.params.ddconfig", [1]),
    ("model.params.cond_stage_config.params", [1]),
    ("model.params.unet_config.params.channel_mult", ["a", 2]),
])
def test_malformed_section(tmp_path, path, value):
    tree = sd1_tree()
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value
    assert path in load_error(tmp_path, tree)


def test_bad_text_layer(tmp_path):
    tree = edited(lambda t: t["model"]["params"]["cond_stage_config"].update(params={"layer": "mid"}))
    assert "cond_stage_config.params.layer" in load_error(tmp_path, tree)


def test_unknown_field(tmp_path):
    tree = edited(lambda t: t["model"]["params"]["unet_config"]["params"].update(model_chanels=320))
    message = load_error(tmp_path, tree)
    assert "unknown field" in message and "unet_config.params.model_chanels" in message


def test_unknown_field_at_model_level(tmp_path):
    tree = edited(lambda t: t["model"]["params"].update(paramterization="v"))
    assert "model.params.paramterization" in load_error(tmp_path, tree)


def test_wrong_type(tmp_path):
    tree = edited(lambda t: t["model"]["params"]["unet_config"]["params"].update(model_channels="320"))
    message = load_error(tmp_path, tree)
    assert "unet_config.params.model_channels" in message and "'320'" in message


@pytest.mark.parametrize("field, value", [("channel_mult", 4), ("use_linear_in_transformer", "yes"),
                                          ("num_res_blocks", True)])
def test_other_wrong_types(tmp_path, field, value):
    tree = edited(lambda t: t["model"]["params"]["unet_config"]["params"].update({field: value}))
    assert f"unet_config.params.{field}" in load_error(tmp_path, tree)


def test_bad_parameterization(tmp_path):
    tree = edited(lambda t: t["model"]["params"].update(parameterization="x0"))
    assert "parameterization" in load_error(tmp_path, tree)


def test_context_dim_must_equal_text_width(tmp_path):
    tree = edited(lambda t: t["model"]["params"]["unet_config"]["params"].update(context_dim=1024))
    message = load_error(tmp_path, tree)
    assert "context_dim" in message and "1024" in message and "768" in message


def test_inpainting_needs_nine_channels(tmp_path):
    tree = yaml.safe_load((CONFIG_DIR / "v1-inpainting-inference.yaml").read_text())
    tree["model"]["params"]["unet_config"]["params"]["in_channels"] = 4
    assert "in_channels" in load_error(tmp_path, tree)


@pytest.mark.parametrize("section", ["model", "model.params.unet_config",
                                     "model.params.first_stage_config",
                                     "model.params.cond_stage_config"])
def test_unknown_target_is_never_imported(tmp_path, monkeypatch, section):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    real_import, real_import_module = builtins.__import__, importlib.import_module

    def watch_import(name, *args, **kwargs):
        assert not name.startswith("evil_module"), f"config loader imported {name}"
        return real_import(name, *args, **kwargs)

    def watch_import_module(name, *args, **kwargs):
        assert not name.startswith(("evil_module", "os")), f"config loader imported {name}"
        return real_import_module(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", watch_import)
    monkeypatch.setattr(importlib, "import_module", watch_import_module)
    for target in ("os.system", "evil_module.Payload"):
        tree = sd1_tree()
        node = tree
        for part in section.split("."):
            node = node[part]
        node["target"] = target
        message = load_error(tmp_path, tree)
        assert f"{section}.target" in message and repr(target) in message
    assert calls == [] and "evil_module" not in sys.modules


@pytest.mark.parametrize("content", ["- model\n- params\n", "just a string\n", "42\n", ""])
def test_not_a_mapping(tmp_path, content):
    assert "mapping" in load_error(tmp_path, content)


def test_mapping_without_model(tmp_path):
    assert "'model'" in load_error(tmp_path, {"foo": 1})


@pytest.mark.parametrize("content", ["model: [unclosed\n", "model:\n  params: {a: 1\n",
                                     "model:\n\ttarget: x\n"])
def test_invalid_yaml_syntax(tmp_path, content):
    assert "YAML" in load_error(tmp_path, content)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_builtin_name_lists_known_ones():
    with pytest.raises(ConfigError) as info:
        builtin_config("v3-inference")
    assert "v1-inference" in str(info.value) and "v2-inference-v" in str(info.value)


# ---- sampling defaults (top-level ``sampling:``, outside the CompVis schema) -------------------

def test_sampling_defaults_absent_are_sds_usual_ones():
    assert builtin_config("v1-inference").sampling == SamplingDefaults(7.5, 25, "dpmpp_2m")


def test_sampling_section_is_read(tmp_path):
    tree = edited(lambda t: t.update(sampling={"guidance_scale": 3, "scheduler": "euler"}))
    cfg = load_config(write(tmp_path, tree))
    assert cfg.sampling == SamplingDefaults(guidance_scale=3.0, num_inference_steps=25,
                                            scheduler="euler")
    assert isinstance(cfg.sampling.guidance_scale, float)


@pytest.mark.parametrize("section, fragment", [
    ({"cfg": 3}, "unknown field 'sampling.cfg'"),
    ({"guidance_scale": "high"}, "'sampling.guidance_scale' must be a number"),
    ({"guidance_scale": -1}, "'sampling.guidance_scale' must be >= 0"),
    ({"num_inference_steps": 0}, "'sampling.num_inference_steps' must be a whole number >= 1"),
    ({"num_inference_steps": 2.5}, "'sampling.num_inference_steps' must be a whole number >= 1"),
    ({"scheduler": 3}, "'sampling.scheduler' must be a scheduler name"),
    ([1, 2], "'sampling' must be a mapping"),
])
def test_bad_sampling_section(tmp_path, section, fragment):
    assert fragment in load_error(tmp_path, edited(lambda t: t.update(sampling=section)))



@pytest.mark.parametrize("source", ["v1-inference", "v2-inference-v", "v1-inpainting-inference",
                                    "v2-inpainting-inference", "tiny-shapes", "sd1", "sd2-v", "sd1-inpaint"])
def test_config_tree_reads_back_to_the_same_config(source):
    import json

    from ldm.config import builtin_config, config_tree, parse_config
    from reference.tiny import tiny_config

    cfg = builtin_config(source) if "-" in source and not source.startswith("sd") else tiny_config(source)
    tree = json.loads(json.dumps(config_tree(cfg)))  # what a file header carries
    assert parse_config(tree) == cfg
    changed = cfg.replace(unet=cfg.unet.__class__(**{**cfg.unet.__dict__, "model_channels": cfg.unet.model_channels + 32}))
    assert parse_config(json.loads(json.dumps(config_tree(changed)))) != cfg
