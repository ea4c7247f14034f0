"""Load a diffusers SDXL folder (``unet/``, ``vae/``, ``text_encoder/`` (not in the refiner),
``text_encoder_2/``, ``scheduler/``) into our generative-models-layout :class:`LatentDiffusion`.

The component configs become an SDXL :class:`ModelConfig` (the conditioner's embedders follow from
which towers exist and from the UNet's ``projection_class_embeddings_input_dim``: pooled width plus
6 Fourier features for the base, 5 with the aesthetic score for the refiner); the tensors are
renamed with the same tables and strict checks as SD folders (:mod:`ldm.diffusers_folder`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import (ConditionerConfig, ConfigError, EmbedderConfig, ModelConfig, TextEncoderConfig,
                     UNetConfig, validate)
from .diffusers_folder import (_component_state_dict, _fail, _read_json, read_weights, schedule_fields,
                               text_config, unet_config, vae_config, weight_file)
from .diffusers_names import text_module_map, unet_module_map, vae_module_map
from .model import LatentDiffusion

_SDXL_UNET_FIELDS = ("addition_embed_type", "addition_time_embed_dim", "addition_embed_type_num_heads",
                     "projection_class_embeddings_input_dim", "transformer_layers_per_block",
                     "reverse_transformer_layers_per_block")
BASE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
REFINER_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "aesthetic_score")


def is_sdxl_folder(folder: Path) -> bool:
    return (Path(folder) / "text_encoder_2").is_dir()


def sdxl_unet_config(cfg: dict, path: Path) -> tuple[UNetConfig, int]:
    """diffusers' SDXL UNet config → (our UNet config, the Fourier feature width)."""
    if cfg.get("addition_embed_type") != "text_time":
        raise _fail(path, f"addition_embed_type={cfg.get('addition_embed_type')!r}: an SDXL UNet "
                          "has 'text_time'")
    if cfg.get("reverse_transformer_layers_per_block") is not None:
        raise _fail(path, "reverse_transformer_layers_per_block is not supported")
    base = unet_config({k: v for k, v in cfg.items() if k not in _SDXL_UNET_FIELDS}, path)
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, list):
        if len(depth) != len(base.channel_mult) or not all(isinstance(d, int) for d in depth):
            raise _fail(path, f"transformer_layers_per_block must be one integer per level, got {depth!r}")
        depth = tuple(depth)
    elif not isinstance(depth, int) or isinstance(depth, bool):
        raise _fail(path, f"transformer_layers_per_block must be an integer or a list, got {depth!r}")
    adm, outdim = cfg.get("projection_class_embeddings_input_dim"), cfg.get("addition_time_embed_dim")
    if not all(isinstance(v, int) and v > 0 for v in (adm, outdim)):
        raise _fail(path, "projection_class_embeddings_input_dim and addition_time_embed_dim must "
                          f"be positive integers, got {adm!r} and {outdim!r}")
    return dataclasses.replace(base, transformer_depth=depth, adm_in_channels=adm), outdim


def _tower(folder: Path, name: str, clip_l: bool) -> TextEncoderConfig:
    path = folder / name / "config.json"
    data = _read_json(path)
    data.pop("architectures", None)  # CLIPTextModel or CLIPTextModelWithProjection: same tower
    cfg = text_config(data, path)
    if clip_l:  # sgm: hidden_states[layers - 1], no final norm
        if cfg.kind != "clip":
            raise _fail(path, "the first SDXL text encoder must be CLIP ViT-L (quick_gelu)")
        return dataclasses.replace(cfg, layer="hidden", layer_idx=cfg.layers - 1)
    return dataclasses.replace(cfg, kind="openclip", pad_token_id=0, layer="penultimate",
                               legacy=False, pooled=True)


def sdxl_folder_config(folder: str | Path, prediction: str | None = None) -> ModelConfig:
    folder = Path(folder)
    missing = [c for c in ("unet", "vae", "text_encoder_2") if not (folder / c).is_dir()]
    if missing:
        raise _fail(folder, f"not a diffusers SDXL folder: no {', '.join(missing)}")
    unet_path, vae_path = folder / "unet" / "config.json", folder / "vae" / "config.json"
    unet, outdim = sdxl_unet_config(_read_json(unet_path), unet_path)
    vae, scale = vae_config(_read_json(vae_path), vae_path)
    towers = ([_tower(folder, "text_encoder", True)] if (folder / "text_encoder").is_dir() else [])
    towers.append(_tower(folder, "text_encoder_2", False))
    numbers, rest = divmod(unet.adm_in_channels - towers[-1].projection_dim, outdim)
    keys = {6: BASE_KEYS, 5: REFINER_KEYS}.get(numbers) if rest == 0 else None
    if keys is None:
        raise _fail(unet_path, f"projection_class_embeddings_input_dim {unet.adm_in_channels} is not "
                               f"the pooled width {towers[-1].projection_dim} plus 5 or 6 × {outdim}")
    embedders = [EmbedderConfig("txt", t) for t in towers]
    embedders += [EmbedderConfig(k, None, outdim) for k in keys]
    sched_path = folder / "scheduler" / "scheduler_config.json"
    fields = schedule_fields(_read_json(sched_path), sched_path) if sched_path.exists() else {}
    if prediction is not None:
        fields["parameterization"] = prediction
    cfg = ModelConfig(unet=unet, autoencoder=vae, text=towers[0], scale_factor=scale,
                      conditioner=ConditionerConfig(tuple(embedders)), image_size=128,
                      conditioning_key="hybrid" if unet.in_channels == 9 else "crossattn",
                      channels=vae.embed_dim, **fields)
    try:
        validate(cfg, str(folder))
    except ConfigError as exc:
        raise _fail(folder, str(exc)) from None
    return cfg


def load_sdxl_folder(path: str | Path, *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", prediction: str | None = None) -> LatentDiffusion:
    from accelerate import init_empty_weights

    folder = Path(path)
    cfg = sdxl_folder_config(folder, prediction)
    with init_empty_weights():
        model = LatentDiffusion(cfg)
    parts = [("unet", "unet", model.unet, "model.diffusion_model.", unet_module_map),
             ("vae", "vae", model.vae, "first_stage_model.", vae_module_map)]
    names = ["text_encoder", "text_encoder_2"][-len(cfg.conditioner.texts):]
    for i, (name, embedder) in enumerate(zip(names, model.conditioner.text_embedders)):
        parts.append((name, "text_encoder", embedder, f"conditioner.embedders.{i}.", text_module_map))
    state: dict[str, torch.Tensor] = {}
    for folder_name, component, module, prefix, name_map in parts:
        file = weight_file(folder / folder_name, component, dtype)
        tensors = read_weights(file)
        # bigG's projection: a Linear weight in transformers, OpenCLIP's transposed matrix here
        projection = next((tensors.pop(k) for k in ("text_projection.weight",) if k in tensors), None)
        converted = _component_state_dict(component, module, name_map(module), tensors, file)
        if hasattr(module, "model"):
            if projection is None:
                raise _fail(file, "missing text_projection.weight (the pooled projection)")
            converted["model.text_projection"] = projection.t()
        params = dict(module.named_parameters())
        for key, tensor in converted.items():
            if key in params and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            state[prefix + key] = tensor
    state.update({k: v for k, v in model.state_dict(keep_vars=True).items() if k not in state})
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{folder}: tensors left unloaded: {left[:5]}")
    return model.to(device).eval()
