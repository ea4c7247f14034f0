"""Independent reference models: diffusers / transformers built from the same CompVis config tree,
with weights converted from our state dict by diffusers' own single-file converters."""
from __future__ import annotations

import torch

from ldm.model import LatentDiffusion


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values (zero-initialised layers would hide key mix-ups)."""
    gen = torch.Generator().manual_seed(seed)
    # norm layers by type too: the UNet's GroupNorms sit in nn.Sequential slots ("in_layers.0"),
    # and a near-zero gain there shrinks every residual branch until parity tests stop seeing it
    norms = {f"{prefix}.{p}".lstrip(".") for prefix, mod in model.named_modules()
             if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm))
             for p, _ in mod.named_parameters(recurse=False)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            if name in norms or "norm" in name or name.split(".")[-2].startswith("ln"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) * scale / max(fan_in, 1) ** 0.5 * 2)
    return model


def diffusers_unet(tree: dict, state_dict: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)

    config = create_unet_diffusers_config_from_ldm(tree, state_dict)
    unet = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(state_dict, dict(unet.config))
    unet.load_state_dict(converted, strict=True)
    return unet.eval()


def diffusers_vae(tree: dict, state_dict: dict):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     create_vae_diffusers_config_from_ldm)

    config = create_vae_diffusers_config_from_ldm(tree, state_dict)
    vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(state_dict, dict(vae.config))
    vae.load_state_dict(converted, strict=True)
    return vae.eval()


def transformers_text_model(model: LatentDiffusion, state_dict: dict):
    """A ``transformers.CLIPTextModel`` holding our text tower's weights, converted by diffusers."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint,
                                                     convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = model.config.text
    hf = CLIPTextModel(CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=int(cfg.width * cfg.mlp_ratio),
        max_position_embeddings=cfg.max_length, hidden_act=cfg.act, projection_dim=cfg.projection_dim))
    if cfg.kind == "clip":
        converted = convert_ldm_clip_checkpoint(state_dict)
    else:
        converted = convert_open_clip_checkpoint(hf, state_dict)
    # transformers 5 keeps CLIPTextModel keys without the "text_model." prefix
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()
                 if k.startswith(("text_model.", "embeddings.", "encoder.", "final_layer_norm."))}
    hf.load_state_dict(converted, strict=True)
    return hf.eval()


def random_tiny_model(kind: str, seed: int = 0, scale: float = 0.5) -> LatentDiffusion:
    """Our tiny model of ``kind`` (see tests/tiny.py) with random weights, in eval mode.

    ``scale`` 0.5 gives weights of std 1/sqrt(fan_in), which keeps activations of order one
    through the network: every attention and residual path then moves the output by far more
    than a 1e-4 tolerance (swapping one attention's keys and values changes it by ~0.1).
    """
    from reference.tiny import tiny_config

    return randomize_(LatentDiffusion(tiny_config(kind)), seed=seed, scale=scale).eval()


def max_error(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(largest absolute difference, largest absolute value of the reference), in float64."""
    ours, reference = ours.double().cpu(), reference.double().cpu()
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    return (ours - reference).abs().max().item(), reference.abs().max().item()
