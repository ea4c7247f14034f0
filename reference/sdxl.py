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


def sdxl_cldm_tree(tree: dict, hint_channels: int = 3, **unet_changes) -> dict:
    """An sgm tree with a ``control_stage_config`` beside ``network_config``: the UNet's params
    (``unet_changes`` applied to both, e.g. ``in_channels=4`` for an inpainting base's ControlNet)
    plus ``hint_channels``, as a cldm YAML pairs them."""
    import copy

    tree = copy.deepcopy(tree)
    p = tree["model"]["params"]
    unet = dict(p["network_config"]["params"], **unet_changes)
    p["network_config"]["params"] = unet
    p["control_stage_config"] = {"target": "cldm.cldm.ControlNet",
                                 "params": dict(unet, hint_channels=hint_channels)}
    return tree


def diffusers_sdxl_controlnet(tree: dict, cfg: ModelConfig, state_dict: dict):
    """diffusers' ControlNetModel (``addition_embed_type="text_time"``) holding ``state_dict``
    (original keys, with or without ``control_model.``). ``tree``: :func:`sdxl_cldm_tree`'s.

    The config is built as ``create_controlnet_diffusers_config_from_ldm`` builds it (which raises
    a TypeError in 0.42.1, see reference.models.diffusers_controlnet), with the text_time embedding
    set as for the UNet at reduced width. ``convert_controlnet_checkpoint`` converts everything but
    ``label_emb`` (0.42.1 copies only its "layers" table; diffusers reads SDXL ControlNets in its
    own layout only): that one is copied by diffusers' own ``DIFFUSERS_TO_LDM_MAPPING["controlnet"]
    ["addition_embed_type"]`` table."""
    from diffusers.loaders.single_file_utils import (DIFFUSERS_TO_LDM_MAPPING,
                                                     convert_controlnet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)

    from reference.models import controlnet_model

    unet = create_unet_diffusers_config_from_ldm(tree, state_dict)
    outdim = next(e.outdim for e in cfg.conditioner.embedders if e.text is None)
    unet.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=outdim)
    model = controlnet_model(tree, unet)
    converted = convert_controlnet_checkpoint(state_dict, dict(model.config))
    bare = {k.removeprefix("control_model."): v for k, v in state_dict.items()}
    for theirs, ours in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        converted[theirs] = bare[ours]
    model.load_state_dict(converted, strict=True)
    return model.eval()


def random_diffusers_sdxl_controlnet(seed: int = 3, depths=(1, 2)):
    """A text_time ControlNetModel with the tiny SDXL structure (head width 16: 2 and 4 heads);
    ``depths``: transformer blocks per level (the tiny UNet's (1, 2); fewer, as diffusers' smaller
    SDXL ControlNets have)."""
    from diffusers import ControlNetModel

    from reference.models import randomize_

    model = ControlNetModel(
        in_channels=4, conditioning_channels=3, block_out_channels=[32, 64],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], layers_per_block=2,
        cross_attention_dim=64, attention_head_dim=[2, 4], use_linear_projection=True,
        transformer_layers_per_block=list(depths), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    return randomize_(model, seed=seed, scale=0.5).eval()


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


def sdxl_pipeline(model, tree: dict, scheduler, task: str = "txt2img", controlnet=None):
    """diffusers' StableDiffusionXL(Img2Img|Inpaint)Pipeline on CPU in fp32 holding ``model``'s
    weights (``tree``: its sgm config); the refiner has no CLIP-L tower and no zeroed negatives.
    With ``controlnet`` (a ControlNetModel, or a list): the ControlNet pipeline of the task."""
    import diffusers

    from reference.models import diffusers_vae
    from reference.tokenizer import clip_tokenizer

    sd = {k: v.float() for k, v in model.state_dict().items()}
    texts = model.config.conditioner.texts
    refiner = len(texts) == 1
    parts = dict(vae=diffusers_vae(tree, sd), unet=diffusers_sdxl_unet(tree, model.config, sd),
                 text_encoder_2=transformers_bigg(texts[-1], sd, index=len(texts) - 1),
                 tokenizer_2=clip_tokenizer("!", texts[-1].max_length), scheduler=scheduler)
    if refiner:
        parts.update(text_encoder=None, tokenizer=None, force_zeros_for_empty_prompt=False)
        if task != "txt2img":
            parts["requires_aesthetics_score"] = True
    else:
        parts.update(text_encoder=transformers_clip_l(texts[0], sd),
                     tokenizer=clip_tokenizer("<|endoftext|>", texts[0].max_length))
    cls = {"txt2img": diffusers.StableDiffusionXLPipeline,
           "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[task]
    if controlnet is not None:
        cls = {"txt2img": diffusers.StableDiffusionXLControlNetPipeline,
               "img2img": diffusers.StableDiffusionXLControlNetImg2ImgPipeline,
               "inpaint": diffusers.StableDiffusionXLControlNetInpaintPipeline}[task]
        parts["controlnet"] = controlnet
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_sdxl_model(kind: str = "sdxl", downscale: int = 2):
    """A tiny SDXL model whose images depend visibly on prompt and guidance (as
    reference.pipelines.random_model: the UNet randomised at unit scale); ``downscale`` 8 for
    ControlNet hints."""
    from ldm.model import LatentDiffusion
    from reference.models import randomize_
    from reference.tiny import tiny_sdxl_config

    model = randomize_(LatentDiffusion(tiny_sdxl_config(kind, downscale)), seed=1)
    randomize_(model.model.diffusion_model, seed=2, scale=1.0)
    return model.eval()
