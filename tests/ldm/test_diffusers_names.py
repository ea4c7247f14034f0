"""The module-name table ours → diffusers: complete, one-to-one, and agreeing with diffusers' own
checkpoint converters on where every tensor goes."""
from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights

from ldm.config import CONFIG_DIR, parse_config
from ldm.diffusers_names import (diffusers_module_map, kohya_lora_name, text_module_map,
                                 unet_module_map, vae_module_map)
from ldm.model import LatentDiffusion
from reference.models import randomize_
from reference.tiny import tiny_tree

FAMILIES = ["sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sd1-3level"]


def variant_tree(kind: str) -> dict:
    """The tiny trees, plus a 3-level one whose last level has no attention (as in full-size SD)
    and one res block per level, so level bookkeeping is exercised beyond the 2-level shape."""
    if kind != "sd1-3level":
        return tiny_tree(kind)
    tree = copy.deepcopy(tiny_tree("sd1"))
    params = tree["model"]["params"]
    params["unet_config"]["params"].update(channel_mult=[1, 2, 2], attention_resolutions=[1, 2],
                                           num_res_blocks=1)
    params["first_stage_config"]["params"]["ddconfig"].update(ch_mult=[1, 2, 2], num_res_blocks=1)
    return tree


def _param_map(module_map: dict[str, str], module: torch.nn.Module) -> dict[str, str]:
    """Parameter names through the module table: owner module renamed, parameter name kept."""
    out = {}
    for name, _ in module.named_parameters():
        owner, _, pname = name.rpartition(".")
        out[name] = f"{module_map[owner]}.{pname}"
    return out


def _diffusers_models(tree: dict, state: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    with init_empty_weights():
        unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(tree, state))
        vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(tree, state))
    return unet, vae


def _assert_bijection(ours: torch.nn.Module, module_map: dict[str, str], theirs: torch.nn.Module):
    mapped = _param_map(module_map, ours)
    their_params = dict(theirs.named_parameters())
    unknown = [t for t in mapped.values() if t not in their_params]
    assert not unknown, unknown[:5]
    assert len(set(mapped.values())) == len(mapped)  # one-to-one
    assert set(mapped.values()) == set(their_params)  # onto
    ours_params = dict(ours.named_parameters())
    wrong = [(o, t) for o, t in mapped.items() if ours_params[o].numel() != their_params[t].numel()]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("kind", FAMILIES)
def test_tiny_tables_are_bijections(kind):
    tree = variant_tree(kind)
    with init_empty_weights():
        model = LatentDiffusion(parse_config(tree, kind))
    unet, vae = _diffusers_models(tree, {})
    _assert_bijection(model.unet, unet_module_map(model.unet), unet)
    _assert_bijection(model.vae, vae_module_map(model.vae), vae)


@pytest.mark.parametrize("config", ["v1-inference", "v2-inference", "v1-inpainting-inference"])
def test_full_size_tables_are_bijections(config):
    """Full-size structures, built on the meta device (no memory, no weights)."""
    import yaml

    tree = yaml.safe_load((CONFIG_DIR / f"{config}.yaml").read_text())
    with init_empty_weights():
        model = LatentDiffusion(parse_config(tree, config))
    unet, vae = _diffusers_models(tree, {})
    unet_map = unet_module_map(model.unet)
    _assert_bijection(model.unet, unet_map, unet)
    _assert_bijection(model.vae, vae_module_map(model.vae), vae)
    # well-known correspondences of the SD UNet (12 input blocks, 4 levels, last without attention)
    assert unet_map["input_blocks.10.0.in_layers.2"] == "down_blocks.3.resnets.0.conv1"
    assert unet_map["input_blocks.9.0.op"] == "down_blocks.2.downsamplers.0.conv"
    assert unet_map["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert unet_map["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert unet_map["output_blocks.11.1.proj_out"] == "up_blocks.3.attentions.2.proj_out"
    assert unet_map["output_blocks.3.0.skip_connection"] == "up_blocks.1.resnets.0.conv_shortcut"
    assert "output_blocks.2.1.transformer_blocks.0.attn1.to_q" not in unet_map  # no attention there


@pytest.mark.parametrize("kind", ["sd2-inpaint", "sd1-3level"])
def test_tables_agree_with_diffusers_converters(kind):
    """Every tensor lands where diffusers' own single-file converter puts it."""
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    tree = variant_tree(kind)
    model = randomize_(LatentDiffusion(parse_config(tree, kind)))
    state = model.state_dict()
    unet, vae = _diffusers_models(tree, state)
    for prefix, module, names, converted in (
            ("model.diffusion_model.", model.unet, unet_module_map(model.unet),
             convert_ldm_unet_checkpoint(state, dict(unet.config))),
            ("first_stage_model.", model.vae, vae_module_map(model.vae),
             convert_ldm_vae_checkpoint(state, dict(vae.config)))):
        mapped = _param_map(names, module)
        assert set(mapped.values()) == set(converted)
        for ours, theirs in mapped.items():
            assert torch.equal(state[prefix + ours].flatten(), converted[theirs].flatten()), ours


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_text_table(kind):
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        model = LatentDiffusion(parse_config(tiny_tree(kind), kind))
    cfg = model.config.text
    hf = CLIPTextModel(CLIPTextConfig(hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                                      num_attention_heads=cfg.heads, intermediate_size=cfg.width * 4,
                                      vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_length))
    names = text_module_map(model.text_encoder)
    if kind == "sd1":
        _assert_bijection(model.text_encoder, names, hf)
        return
    # OpenCLIP: each mapped module exists there with the same role; the fused q/k/v input
    # projection stands for the three separate ones
    theirs = dict(hf.named_modules())
    for ours, target in names.items():
        module = model.text_encoder.get_submodule(ours)
        assert target in theirs, (ours, target)
        if isinstance(module, torch.nn.MultiheadAttention):
            assert all(f"{target}.{p}_proj" in theirs for p in "qkv")
        for role in (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding):
            if isinstance(module, role):
                assert isinstance(theirs[target], role), (ours, target)
    assert names["model.transformer.resblocks.2.mlp.c_fc"] == "encoder.layers.2.mlp.fc1"
    assert names["model.ln_final"] == "final_layer_norm"


def test_kohya_names():
    with init_empty_weights():
        model = LatentDiffusion(parse_config(tiny_tree("sd1"), "sd1"))
    table = diffusers_module_map(model)
    expected = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q":
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_out.0":
            "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj":
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "model.diffusion_model.input_blocks.4.1.proj_in": "lora_unet_down_blocks_1_attentions_0_proj_in",
        "model.diffusion_model.input_blocks.3.0.op": "lora_unet_down_blocks_0_downsamplers_0_conv",
        "model.diffusion_model.output_blocks.2.2.conv": "lora_unet_up_blocks_0_upsamplers_0_conv",
        "model.diffusion_model.input_blocks.4.0.skip_connection":
            "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "model.diffusion_model.input_blocks.1.0.emb_layers.1":
            "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
        "model.diffusion_model.time_embed.2": "lora_unet_time_embedding_linear_2",
        "model.diffusion_model.input_blocks.0.0": "lora_unet_conv_in",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj":
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc2":
            "lora_te_text_model_encoder_layers_2_mlp_fc2",
    }
    for ours, name in expected.items():
        assert kohya_lora_name(*table[ours]) == name, ours
    assert table["first_stage_model.decoder.up.0.block.0.nin_shortcut"] == \
        ("vae", "decoder.up_blocks.1.resnets.0.conv_shortcut")
    assert table["first_stage_model.encoder.mid.attn_1.proj_out"] == \
        ("vae", "encoder.mid_block.attentions.0.to_out.0")
    with pytest.raises(ValueError, match="not 'vae'"):
        kohya_lora_name("vae", "decoder.conv_in")
    # every Linear/Conv2d of the UNet and text encoder has a name, and no two share one
    lora_modules = {n: m for n, m in model.named_modules()
                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                    and not n.startswith("first_stage_model.")}
    names = [kohya_lora_name(*table[n]) for n in lora_modules]
    assert len(set(names)) == len(names)
