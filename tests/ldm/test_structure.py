"""Full-size structure on the meta device: every key, every shape, every parameter count.

Our models are built from the shipped YAML without allocating memory; diffusers' models are built
from the same YAML through diffusers' own config converters, and diffusers' checkpoint converters
must turn our state dict into exactly the diffusers model's keys and shapes.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from ldm.config import CONFIG_DIR, builtin_config
from ldm.model import LatentDiffusion

# Published sizes of the Stable Diffusion components (millions of parameters, 2 decimals).
UNET_PARAMS = {"v1-inference": 859.52, "v2-inference": 865.91, "v1-inpainting-inference": 859.54}
VAE_PARAMS = 83.65
CLIP_L_TEXT_PARAMS = 123.06
# Keys of an SD1.5-layout checkpoint per component; SD2's OpenCLIP text tower without the visual part.
UNET_KEYS, VAE_KEYS, CLIP_L_KEYS, OPENCLIP_H_TEXT_KEYS = 686, 248, 196, 294

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."


def millions(tensors) -> float:
    return round(sum(t.numel() for t in tensors) / 1e6, 2)


def part(sd: dict, prefix: str) -> dict:
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def assert_same_layout(converted: dict, expected: dict, what: str) -> None:
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    assert not missing and not extra, f"{what}: missing {missing[:5]}, extra {extra[:5]}"
    wrong = [(k, tuple(converted[k].shape), tuple(expected[k].shape)) for k in expected
             if converted[k].shape != expected[k].shape]
    assert not wrong, f"{what}: shapes differ (key, ours, reference): {wrong[:5]}"


@pytest.fixture(scope="module", params=list(UNET_PARAMS))
def built(request):
    name = request.param
    with torch.device("meta"):
        model = LatentDiffusion(builtin_config(name))
    tree = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    return name, model, tree, model.state_dict()


def test_unet_matches_diffusers_layout(built):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)

    name, model, tree, sd = built
    with torch.device("meta"):
        ref = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(tree, sd))
    assert len(part(sd, UNET)) == UNET_KEYS
    ours_n, ref_n = millions(model.unet.parameters()), millions(ref.parameters())
    assert ours_n == ref_n == UNET_PARAMS[name], (ours_n, ref_n)
    assert_same_layout(convert_ldm_unet_checkpoint(sd, dict(ref.config)), ref.state_dict(),
                       f"{name} UNet")


def test_vae_matches_diffusers_layout(built):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     create_vae_diffusers_config_from_ldm)

    name, model, tree, sd = built
    with torch.device("meta"):
        ref = AutoencoderKL(**create_vae_diffusers_config_from_ldm(tree, sd))
    assert len(part(sd, VAE)) == VAE_KEYS
    ours_n, ref_n = millions(model.vae.parameters()), millions(ref.parameters())
    assert ours_n == ref_n == VAE_PARAMS, (ours_n, ref_n)
    assert_same_layout(convert_ldm_vae_checkpoint(sd, dict(ref.config)), ref.state_dict(),
                       f"{name} VAE")


def test_state_dict_holds_only_the_three_components(built):
    name, _, _, sd = built
    text_keys = CLIP_L_KEYS if name.startswith("v1") else OPENCLIP_H_TEXT_KEYS
    assert len(sd) == UNET_KEYS + VAE_KEYS + text_keys
    assert len(part(sd, UNET)) + len(part(sd, VAE)) + len(part(sd, TEXT)) == len(sd)


def test_sd1_text_encoder_is_clip_vit_l():
    """CLIP ViT-L/14's text model (OpenAI): width 768, 12 layers, 12 heads, MLP 3072, 77 positions."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = LatentDiffusion(builtin_config("v1-inference"))
        ref = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    sd = part(model.state_dict(), TEXT)
    assert len(sd) == CLIP_L_KEYS
    ours_n, ref_n = millions(sd.values()), millions(ref.parameters())
    assert ours_n == ref_n == CLIP_L_TEXT_PARAMS, (ours_n, ref_n)
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()}
    assert_same_layout(converted, ref.state_dict(), "SD1 text encoder")


def test_sd2_text_tower_is_open_clip_vit_h_text():
    import open_clip

    # the device context keeps open_clip from initialising 1 B parameters on the CPU first
    with torch.device("meta"):
        model = LatentDiffusion(builtin_config("v2-inference"))
        ref = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    expected = {k: v for k, v in ref.state_dict().items() if not k.startswith("visual.")}
    ours = {k.removeprefix(TEXT + "model."): v for k, v in part(model.state_dict(), TEXT).items()}
    assert len(ours) == OPENCLIP_H_TEXT_KEYS
    assert_same_layout(ours, expected, "SD2 text tower")
    assert millions(ours.values()) == millions(expected.values())
