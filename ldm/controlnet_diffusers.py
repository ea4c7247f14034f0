"""diffusers' ``ControlNetModel`` layout ↔ our :class:`~ldm.modules.controlnet.ControlNet` names,
and its ``config.json`` → :class:`ControlNetConfig`.

The name table is derived from the models, not from string rules: the encoder (``time_embed``,
``input_blocks``, ``middle_block``) takes the UNet's table of :mod:`ldm.diffusers_names` (our
ControlNet's encoder is built by the UNet's own builder, so its module paths are the UNet's), and
the ControlNet's own parts are read off a ControlNet built on the meta device: the hint encoder's
convolutions in order (``controlnet_cond_embedding.conv_in``, ``.blocks.{j}``, ``.conv_out``), the
zero convolutions (``controlnet_down_blocks.{i}``, ``controlnet_mid_block``). Tensor shapes are the
same on both sides: a linear-projection (SD2) config has linear ``proj_in``/``proj_out`` in both.
An SDXL ControlNet (``addition_embed_type="text_time"``) has ``add_embedding``, our ``label_emb``,
named by the UNet's table too.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .checkpoint import listing
from .config import ConfigError
from .controlnet_config import ControlNetConfig, validate_controlnet
from .diffusers_folder import DiffusersFolderError, unet_config, unet_module_map
from .modules.controlnet import HINT_CHANNELS, ControlNet
from .modules.unet import UNetModel
from .weights_io import file_error

__all__ = ["controlnet_module_map", "key_map", "from_diffusers", "config_from_diffusers",
           "skeleton_config", "DIFFUSERS_MARKERS"]

# keys only diffusers' ControlNetModel has
DIFFUSERS_MARKERS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
ENCODER = ("time_embed", "label_emb", "input_blocks", "middle_block")


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def controlnet_module_map(net: ControlNet) -> dict[str, str]:
    """Our module path → diffusers ``ControlNetModel`` module path, for every module of ``net``
    that owns parameters (a module left out is a table bug: ValueError)."""
    with torch.device("meta"):
        unet = UNetModel(net.config.unet_fields())
    out = {ours: theirs for ours, theirs in unet_module_map(unet).items()
           if ours.split(".")[0] in ENCODER}
    convs = [f"input_hint_block.{i}" for i, m in enumerate(net.input_hint_block)
             if isinstance(m, nn.Conv2d)]
    out[convs[0]] = "controlnet_cond_embedding.conv_in"
    out[convs[-1]] = "controlnet_cond_embedding.conv_out"
    out.update({ours: f"controlnet_cond_embedding.blocks.{j}" for j, ours in enumerate(convs[1:-1])})
    out.update({f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in range(len(net.zero_convs))})
    out["middle_block_out.0"] = "controlnet_mid_block"
    unnamed = [name for name, m in net.named_modules() if _owns_parameters(m) and name not in out]
    if unnamed:
        raise ValueError(f"ControlNet: no diffusers name for module '{unnamed[0]}'")
    return out


def key_map(cfg: ControlNetConfig) -> dict[str, str]:
    """diffusers state-dict key → our state-dict key, for a ControlNet of config ``cfg``."""
    with torch.device("meta"):
        net = ControlNet(cfg)
    modules = controlnet_module_map(net)
    out: dict[str, str] = {}
    for key in net.state_dict():
        owner, _, param = key.rpartition(".")
        out[f"{modules[owner]}.{param}"] = key
    return out


def from_diffusers(state_dict: Mapping[str, torch.Tensor], cfg: ControlNetConfig, *,
                   path="state dict") -> dict[str, torch.Tensor]:
    """``state_dict`` (diffusers names) under our names: every key of the config's ControlNet
    present, no other (else one CheckpointError naming the first few). Tensors are not copied."""
    names = key_map(cfg)
    missing = [k for k in names if k not in state_dict]
    unexpected = [k for k in state_dict if k not in names]
    problems = ([listing(missing, "missing keys")] if missing else []) + \
        ([listing(unexpected, "unexpected keys")] if unexpected else [])
    if problems:
        raise file_error(path, "diffusers-layout ControlNet does not fit its config: "
                         + "; ".join(problems))
    return {names[k]: v for k, v in state_dict.items()}


# --------------------------------------------------------------------------------------- configs

# ControlNetModel fields our ControlNet has one value of: (field, allowed, what it would change)
_CONTROL_FIXED = (
    ("conditioning_embedding_out_channels", (list(HINT_CHANNELS), tuple(HINT_CHANNELS)),
     f"the hint encoder's widths, {list(HINT_CHANNELS)} here"),
    ("controlnet_conditioning_channel_order", ("rgb",), "only rgb hints"),
    ("global_pool_conditions", (False, None), "residuals are not pooled here"),
    ("encoder_hid_dim_type", (None,), "SD1/SD2/SDXL ControlNets have none"),
)


def config_from_diffusers(cfg: dict, path) -> ControlNetConfig:
    """A ``ControlNetModel`` ``config.json`` (as a dict) → our config; a field our ControlNet
    cannot honour is refused with one CheckpointError line naming it."""
    for key, allowed, why in _CONTROL_FIXED:
        if key in cfg and cfg[key] not in allowed:
            raise file_error(path, f"{key}={cfg[key]!r} is not supported ({why})")
    down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    # the UNet reader checks the shared fields; a ControlNet has no up blocks, so mirror the down ones
    up = [("CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D")
          for t in reversed(down)] if isinstance(down, list) else None
    fields = {"block_out_channels": [320, 640, 1280, 1280], **cfg, "down_block_types": down,
              "up_block_types": up}
    hint = fields.get("conditioning_channels", 3)
    if isinstance(hint, bool) or not isinstance(hint, int) or hint < 1:
        raise file_error(path, f"conditioning_channels must be a positive integer, got {hint!r}")
    try:
        if fields.get("addition_embed_type") is not None:  # SDXL: as its UNet's config.json
            from .diffusers_sdxl import sdxl_unet_config

            unet = sdxl_unet_config(fields, Path(path))[0]
        else:
            unet = unet_config(fields, Path(path))
        control = ControlNetConfig.from_unet(unet, hint_channels=hint)
        validate_controlnet(control, source=str(path))
    except (DiffusersFolderError, ConfigError) as exc:
        text = str(exc)
        raise file_error(path, text.removeprefix(f"{path}: ")) from None
    return control


def _indices(keys, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def skeleton_config(state_dict: Mapping[str, torch.Tensor], path="state dict") -> ControlNetConfig:
    """A config with the block structure of a diffusers-layout state dict (levels, blocks, depth,
    widths), enough to name its keys; the heads are placeholders (no name or shape depends on them)
    and are decided afterwards from the renamed shapes (:func:`infer_controlnet_config`)."""
    keys = list(state_dict)

    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise file_error(path, f"diffusers-layout ControlNet without {key}")
        return state_dict[key]

    mc, in_ch = need("conv_in.weight").shape[:2]
    levels = _indices(keys, r"down_blocks\.(\d+)\.")
    if not levels:
        raise file_error(path, "diffusers-layout ControlNet without down_blocks.*")
    mult = tuple(int(need(f"down_blocks.{i}.resnets.0.conv1.weight").shape[0]) // mc for i in levels)
    attn = [i for i in levels if _indices(keys, rf"down_blocks\.{i}\.attentions\.(\d+)\.")]
    middle = len(_indices(keys, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))
    # SDXL: a depth per level (levels without attention take 1, unused)
    per_level = [len(_indices(keys, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\."))
                 if i in attn else 1 for i in levels]
    depth = middle if set(per_level[i] for i in attn) <= {middle} else tuple(per_level)
    adm = state_dict.get("add_embedding.linear_1.weight")
    proj = need("mid_block.attentions.0.proj_in.weight")
    # no name depends on the context width (depth-0 transformers have no key holding it)
    to_k = [k for k in keys if k.endswith("transformer_blocks.0.attn2.to_k.weight")]
    context = state_dict[to_k[0]].shape[1] if to_k else 1
    return ControlNetConfig(
        in_channels=int(in_ch), model_channels=int(mc), channel_mult=mult,
        attention_resolutions=tuple(2 ** i for i in attn),
        num_res_blocks=len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")),
        num_heads=1, num_head_channels=-1, transformer_depth=depth,
        transformer_depth_middle=-1 if isinstance(depth, int) or depth[-1] == middle else middle,
        adm_in_channels=0 if adm is None else int(adm.shape[1]),
        context_dim=int(context), use_linear_in_transformer=proj.dim() == 2,
        hint_channels=int(need("controlnet_cond_embedding.conv_in.weight").shape[1]))
