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
