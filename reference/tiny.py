"""Tiny model configurations in the CompVis YAML schema, shared by all tests.

Each is the real SD structure at reduced width (UNet levels of 32/64 channels, a 2-level VAE of
32/64, a text tower of width 32), so every code path of the full-size models runs in seconds.
"""
from __future__ import annotations

import copy

import yaml

from ldm.config import CONFIG_DIR, ModelConfig, parse_config


def _base(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())


def tiny_tree(kind: str = "sd1", downscale: int = 2) -> dict:
    """A CompVis config tree: ``sd1``, ``sd1-inpaint``, ``sd2``, ``sd2-v`` or ``sd2-inpaint``;
    ``downscale``: the autoencoder's factor (8 as in SD, for ControlNet hints; 2 is cheaper)."""
    base = {"sd1": "v1-inference", "sd1-inpaint": "v1-inpainting-inference", "sd2": "v2-inference",
            "sd2-v": "v2-inference-v", "sd2-inpaint": "v2-inpainting-inference"}[kind]
    tree = copy.deepcopy(_base(base))
    p = tree["model"]["params"]
    p["image_size"] = 8
    unet = p["unet_config"]["params"]
    unet.update(model_channels=32, channel_mult=[1, 2], attention_resolutions=[1, 2],
                num_res_blocks=2, context_dim=32, use_checkpoint=False)
    if "num_head_channels" in unet:
        unet["num_head_channels"] = 8
    else:
        unet["num_heads"] = 2
    levels = {2: [1, 2], 8: [1, 1, 2, 2]}[downscale]
    p["first_stage_config"]["params"]["ddconfig"].update(ch=32, ch_mult=levels, resolution=64)
    text = p["cond_stage_config"].setdefault("params", {})
    text.update(width=32, layers=3, heads=4, projection_dim=32)
    return tree


def tiny_config(kind: str = "sd1") -> ModelConfig:
    return parse_config(tiny_tree(kind), f"tiny-{kind}")


def tiny_sdxl_tree(kind: str = "sdxl", downscale: int = 2) -> dict:
    """An sgm (generative-models) config tree at the width of diffusers' own SDXL pipeline tests:
    UNet levels of 32/64 channels with transformer depths [1, 2] (attention on the second level
    only, head width 16), CLIP and bigG towers of width 32 (5 blocks, 4 heads), 8-wide Fourier
    features; ``kind``: ``sdxl``, ``sdxl-refiner`` or ``sdxl-inpaint``; ``downscale``: the
    autoencoder's factor (8 as in SDXL, for ControlNet hints; 2 is cheaper)."""
    base = {"sdxl": "sd_xl_base", "sdxl-refiner": "sd_xl_refiner", "sdxl-inpaint": "sd_xl_inpaint"}[kind]
    tree = copy.deepcopy(_base(base))
    p = tree["model"]["params"]
    models = p["conditioner_config"]["params"]["emb_models"]
    for m in models:
        if m["input_key"] == "txt":
            m["params"].update(width=32, layers=5, heads=4, projection_dim=32)
            if m["params"].get("layer") == "hidden":
                m["params"]["layer_idx"] = 4
        else:
            m["params"]["outdim"] = 8
    texts = sum(m["input_key"] == "txt" for m in models)
    unet = p["network_config"]["params"]
    unet.update(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2],
                transformer_depth=[1, 2], num_head_channels=16, context_dim=32 * texts,
                adm_in_channels=32 + 8 * (2 * (len(models) - texts) - (kind == "sdxl-refiner")))
    levels = {2: [1, 2], 8: [1, 1, 2, 2]}[downscale]
    p["first_stage_config"]["params"]["ddconfig"].update(ch=32, ch_mult=levels, resolution=64)
    return tree


def tiny_sdxl_config(kind: str = "sdxl", downscale: int = 2) -> ModelConfig:
    return parse_config(tiny_sdxl_tree(kind, downscale), f"tiny-{kind}")
