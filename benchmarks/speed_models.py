"""Models for the pipeline speed benchmark: one random weight set per structure, loaded into our
:class:`Pipeline` and into diffusers' ``StableDiffusionPipeline`` (components converted from our
state dict by diffusers' own single-file converters, as the parity tests build them).

Structures:

- ``default``: the shipped default model's config (``configs/tiny-shapes.yaml``) with its weights
  when ``weights/tiny-shapes.safetensors`` is installed, else random weights of that config;
- ``sd1-small``: SD1's structure (4 UNet levels, cross-attention at the first three, 8 heads,
  CLIP ViT-L/14 text encoder) at reduced width: UNet model_channels 64, autoencoder ch 32;
- ``sd15`` (512²) and ``sd21v`` (768², v-prediction, OpenCLIP ViT-H text tower): full size.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
STRUCTURES = ("default", "sd1-small", "sd15", "sd21v")


@dataclass
class Structure:
    name: str
    tree: dict  # CompVis config tree
    size: int  # image side in pixels
    weights: str  # where the weights come from, for the report


def structure(name: str) -> Structure:
    from ldm.config import CONFIG_DIR

    def load(stem: str) -> dict:
        return yaml.safe_load((CONFIG_DIR / f"{stem}.yaml").read_text())

    if name == "default":
        path = ROOT / "weights" / "tiny-shapes.safetensors"
        source = "weights/tiny-shapes.safetensors" if path.is_file() else "random (no weights file)"
        return Structure(name, load("tiny-shapes"), 64, source)
    if name == "sd1-small":
        tree = load("v1-inference")
        tree["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
        tree["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch"] = 32
        return Structure(name, tree, 256, "random")
    if name == "sd15":
        return Structure(name, load("v1-inference"), 512, "random")
    if name == "sd21v":
        return Structure(name, load("v2-inference-v"), 768, "random")
    raise ValueError(f"unknown structure {name!r}; choose from {', '.join(STRUCTURES)}")


@torch.no_grad()
def random_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of std 1/sqrt(fan_in) (activations stay of order one through the network, so fp16
    neither overflows nor underflows), norms near 1; generated on the model's device."""
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    norms = {f"{prefix}.{p}".lstrip(".") for prefix, mod in model.named_modules()
             if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm))
             for p, _ in mod.named_parameters(recurse=False)}
    for name, p in model.named_parameters():
        if name.endswith("logit_scale"):
            continue
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        if name in norms:
            value = 1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
        else:
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            value = noise / max(fan_in, 1) ** 0.5
        p.copy_(value)
    return model


def our_model(s: Structure, device: torch.device):
    """Our LatentDiffusion for ``s`` in float32 on ``device`` (weights as ``s.weights`` says)."""
    from ldm.config import parse_config
    from ldm.model import LatentDiffusion

    cfg = parse_config(s.tree, s.name)
    if s.weights.startswith("weights/"):
        from ldm.checkpoint import load_model

        return load_model(ROOT / s.weights, cfg, dtype=torch.float32, device=device).eval()
    with torch.device(device):
        model = LatentDiffusion(cfg)
    return random_weights_(model).eval()


def _diffusers_tree(tree: dict) -> dict:
    """diffusers' config builder reads SD1's head count from ``num_heads``; a config that gives
    ``num_head_channels`` with 1×1 projections (the default model) is restated as heads per level."""
    tree = copy.deepcopy(tree)
    unet = tree["model"]["params"]["unet_config"]["params"]
    if "num_head_channels" in unet and not unet.get("use_linear_in_transformer"):
        per_head = unet.pop("num_head_channels")
        unet["num_heads"] = [unet["model_channels"] * m // per_head for m in unet["channel_mult"]]
    return tree


def diffusers_pipeline(model, s: Structure, scheduler, device: torch.device, dtype: torch.dtype):
    """A diffusers StableDiffusionPipeline holding ``model``'s weights (converted by diffusers'
    converters), in its default configuration: SDPA attention processors, no safety checker,
    progress bar off."""
    from reference import pipelines as diffusers_pipes

    parts = diffusers_pipes.components(model, _diffusers_tree(s.tree))
    pipe = diffusers_pipes.pipeline("txt2img", parts, scheduler)
    return pipe.to(device=device, dtype=dtype)
