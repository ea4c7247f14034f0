"""Independent SDXL reference models: diffusers' UNet and transformers' text towers holding our
weights, converted from our single-file state dict by diffusers' own single-file code."""
from __future__ import annotations

import torch

from ldm.config import ModelConfig, TextEncoderConfig


def diffusers_sdxl_unet(tree: dict, cfg: ModelConfig, state_dict: dict):
    """diffusers' UNet2DConditionModel for an sgm tree. diffusers recognises SDXL by its full
    context widths (2048 / 1280), so at reduced width the ``text_time`` embedding is set here."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)

    config = create_unet_diffusers_config_from_ldm(tree, state_dict)
    outdim = next(e.outdim for e in cfg.conditioner.embedders if e.text is None)
    config.update(class_embed_type=None, addition_embed_type="text_time",
                  addition_time_embed_dim=outdim)
    unet = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(state_dict, dict(unet.config))
    unet.load_state_dict(converted, strict=True)
    return unet.eval()


def _hf_config(cfg: TextEncoderConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=int(cfg.width * cfg.mlp_ratio),
        max_position_embeddings=cfg.max_length, hidden_act=cfg.act, projection_dim=cfg.projection_dim,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=cfg.pad_token_id)


def transformers_clip_l(cfg: TextEncoderConfig, state_dict: dict):
    """``text_encoder`` of diffusers' SDXL pipeline (a CLIPTextModel) from embedder 0's keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    hf = CLIPTextModel(_hf_config(cfg))
    converted = convert_ldm_clip_checkpoint(
        {k: v for k, v in state_dict.items() if k.startswith("conditioner.embedders.0.")})
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()
                 if not k.endswith("position_ids")}
    hf.load_state_dict(converted, strict=True)
    return hf.eval()


def transformers_bigg(cfg: TextEncoderConfig, state_dict: dict, index: int):
    """``text_encoder_2`` (a CLIPTextModelWithProjection) from embedder ``index``'s keys."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection

    hf = CLIPTextModelWithProjection(_hf_config(cfg))
    converted = convert_open_clip_checkpoint(hf, state_dict, prefix=f"conditioner.embedders.{index}.model.")
    hf.load_state_dict(converted, strict=True)
    return hf.eval()


def diffusers_time_ids(values: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    """diffusers' ``add_time_ids``: the numbers of each sgm input key side by side."""
    return torch.cat([values[k].reshape(values[k].shape[0], -1) for k in keys], dim=1).float()
