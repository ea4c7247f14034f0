"""Load a diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``) into our
CompVis-layout :class:`LatentDiffusion`.

The diffusers configs are translated into our :class:`ModelConfig`; the model is built on the meta
device and every tensor is renamed through the module table of :mod:`ldm.diffusers_names`, checked
strictly by name and shape, and assigned in place (no second copy of the weights).

SD2's text encoder in diffusers is a ``CLIPTextModel`` of 23 layers: the 24-layer OpenCLIP tower cut
after its penultimate block, which is exactly what SD2 conditions on. We build our OpenCLIP tower with
that many layers and take its *last* block's output (through ``ln_final``), the same function.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .config import (AutoencoderConfig, ConfigError, ModelConfig, TextEncoderConfig, UNetConfig,
                     validate)
from .diffusers_names import text_module_map, unet_module_map, vae_module_map
from .model import LatentDiffusion
from .weights_io import CheckpointError, read_state_dict


class DiffusersFolderError(ValueError):
    """A diffusers folder is incomplete, unsupported, or does not match its configs."""


COMPONENTS = ("unet", "vae", "text_encoder")
# weight-file stems per component, in diffusers / transformers naming
_STEMS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
          "text_encoder": ("model", "pytorch_model")}
_PIPELINE_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"),
                     "vae": ("diffusers", "AutoencoderKL"),
                     "text_encoder": ("transformers", "CLIPTextModel")}
# Extra tensors some saved files carry that no module owns.
_IGNORED_KEYS = {"text_encoder": {"embeddings.position_ids", "text_model.embeddings.position_ids"}}
# Older diffusers saved the autoencoder's attention as query/key/value/proj_attn.
_LEGACY_VAE_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _fail(path: Path, problem: str) -> DiffusersFolderError:
    return DiffusersFolderError(f"{path}: {problem}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise _fail(path, "missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _fail(path, "expected a JSON object")
    return data


# ---------------------------------------------------------------------------------------------------
# configs


def _expect(cfg: dict, path: Path, key: str, allowed, what: str | None = None):
    """Fields our architecture fixes: a different value would silently change the network."""
    value = cfg.get(key, allowed[0])
    if value not in allowed:
        raise _fail(path, f"{key}={value!r} is not supported (expected {what or allowed[0]!r})")
    return value


def _int(cfg: dict, path: Path, key: str, default=None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
        value = value[0]  # per-level lists with one value throughout
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"{key} must be an integer (the same for every level), got {value!r}")
    return value


def _channels(cfg: dict, path: Path) -> tuple[int, tuple[int, ...]]:
    channels = cfg.get("block_out_channels")
    if not isinstance(channels, list) or not channels or not all(
            isinstance(c, int) and c > 0 for c in channels):
        raise _fail(path, f"block_out_channels must be a list of positive integers, got {channels!r}")
    base = channels[0]
    if any(c % base for c in channels):
        raise _fail(path, f"block_out_channels {channels} are not multiples of the first")
    return base, tuple(c // base for c in channels)


# fields an SD1/SD2 UNet does not have, and fields it has with one value only
_UNET_ABSENT = ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "time_cond_proj_dim",
                "num_class_embeds", "timestep_post_act", "time_embedding_act_fn",
                "cross_attention_norm")
_UNET_FIXED = (("act_fn", ("silu",)), ("norm_num_groups", (32,)), ("norm_eps", (1e-5,)),
               ("flip_sin_to_cos", (True,)), ("freq_shift", (0,)),
               ("time_embedding_type", ("positional",)), ("conv_in_kernel", (3,)),
               ("conv_out_kernel", (3,)), ("resnet_time_scale_shift", ("default",)),
               ("dual_cross_attention", (False,)), ("center_input_sample", (False,)),
               ("mid_block_scale_factor", (1, 1.0)), ("downsample_padding", (1,)),
               ("attention_type", ("default",)), ("resnet_skip_time_act", (False,)),
               ("resnet_out_scale_factor", (1.0, 1)), ("class_embeddings_concat", (False,)),
               ("mid_block_type", ("UNetMidBlock2DCrossAttn",)))


def _check_sd_unet(cfg: dict, path: Path) -> None:
    for key in _UNET_ABSENT:
        if cfg.get(key) is not None:
            raise _fail(path, f"{key}={cfg[key]!r} is not supported (SD1/SD2 UNets have none)")
    for key, allowed in _UNET_FIXED:
        _expect(cfg, path, key, allowed)
    only_cross = cfg.get("only_cross_attention", False)
    if only_cross is True or (isinstance(only_cross, list) and any(only_cross)):
        raise _fail(path, "only_cross_attention is not supported")
    # upcast_attention (SD2.1) asks for fp32 attention scores; the SDPA kernels accumulate in fp32


def _attention_levels(cfg: dict, path: Path, levels: int) -> list[bool]:
    """Per level, whether it has cross-attention (from the block types)."""
    down = cfg.get("down_block_types")
    up = cfg.get("up_block_types")
    if not isinstance(down, list) or len(down) != levels:
        raise _fail(path, f"down_block_types must list one block per block_out_channels, got {down!r}")
    attn_levels = []
    for i, kind in enumerate(down):
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise _fail(path, f"down_block_types[{i}] = {kind!r} is not supported")
        attn_levels.append(kind == "CrossAttnDownBlock2D")
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)]
    if up != expected_up:
        raise _fail(path, f"up_block_types {up!r} do not mirror down_block_types (expected "
                          f"{expected_up})")
    return attn_levels


def _heads(cfg: dict, path: Path, mc: int, mult: tuple[int, ...], attn_levels: list[bool]
           ) -> tuple[int, int]:
    """(num_heads, num_head_channels) in our config's convention (-1: the other one is fixed)."""
    # diffusers' historical naming: "attention_head_dim" holds the number of heads (an int for SD1,
    # one per level for SD2); newer configs may give it as num_attention_heads.
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = [heads] * len(mult) if isinstance(heads, int) else heads
    if not isinstance(heads, list) or len(heads) != len(mult) or not all(
            isinstance(h, int) and h > 0 for h in heads):
        raise _fail(path, f"attention_head_dim must be an int or one int per level, got {heads!r}")
    used = [(mc * mult[i], heads[i]) for i in range(len(mult)) if attn_levels[i]]
    used.append((mc * mult[-1], heads[-1]))  # the middle block's transformer
    if any(ch % h for ch, h in used):
        raise _fail(path, f"attention_head_dim {heads} does not divide block_out_channels")
    if len({h for _, h in used}) == 1:
        return used[0][1], -1
    if len({ch // h for ch, h in used}) == 1:
        return -1, used[0][0] // used[0][1]
    raise _fail(path, f"attention_head_dim {heads}: neither the head count nor the head width "
                      "is the same at every level")


def unet_config(cfg: dict, path: Path) -> UNetConfig:
    """diffusers ``UNet2DConditionModel`` config → our UNet config (SD1/SD2 structure only)."""
    _check_sd_unet(cfg, path)
    mc, mult = _channels(cfg, path)
    attn_levels = _attention_levels(cfg, path, len(mult))
    num_heads, head_channels = _heads(cfg, path, mc, mult, attn_levels)
    in_channels = _int(cfg, path, "in_channels", 4)
    if in_channels not in (4, 9):
        raise _fail(path, f"in_channels={in_channels} is not supported (4, or 9 for inpainting)")
    return UNetConfig(
        in_channels=in_channels, out_channels=_int(cfg, path, "out_channels", 4), model_channels=mc,
        attention_resolutions=tuple(2 ** i for i, a in enumerate(attn_levels) if a),
        num_res_blocks=_int(cfg, path, "layers_per_block", 2), channel_mult=mult, num_heads=num_heads,
        num_head_channels=head_channels,
        transformer_depth=_int(cfg, path, "transformer_layers_per_block", 1),
        context_dim=_int(cfg, path, "cross_attention_dim", 1280),
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)))


def vae_config(cfg: dict, path: Path) -> tuple[AutoencoderConfig, float]:
    """diffusers ``AutoencoderKL`` config → (our autoencoder config, latent scaling factor)."""
    for key, allowed in (("act_fn", ("silu",)), ("norm_num_groups", (32,)),
                         ("use_quant_conv", (True,)), ("use_post_quant_conv", (True,)),
                         ("mid_block_add_attention", (True,)), ("shift_factor", (None, 0, 0.0))):
        _expect(cfg, path, key, allowed)
    ch, mult = _channels(cfg, path)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = cfg.get(key, [kind] * len(mult))
        if types != [kind] * len(mult):
            raise _fail(path, f"{key} must be {len(mult)} × {kind}, got {types!r}")
    latent = _int(cfg, path, "latent_channels", 4)
    scale = cfg.get("scaling_factor", 0.18215)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise _fail(path, f"scaling_factor must be a positive number, got {scale!r}")
    return AutoencoderConfig(
        embed_dim=latent, z_channels=latent, resolution=_int(cfg, path, "sample_size", 256),
        in_channels=_int(cfg, path, "in_channels", 3), out_ch=_int(cfg, path, "out_channels", 3),
        ch=ch, ch_mult=mult, num_res_blocks=_int(cfg, path, "layers_per_block", 2)), float(scale)


def text_config(cfg: dict, path: Path) -> TextEncoderConfig:
    """transformers ``CLIPTextConfig`` → our text-encoder config.

    quick_gelu is OpenAI CLIP (SD1, padded with <|endoftext|>); gelu is OpenCLIP (SD2, padded with
    "!"), which diffusers stores already cut to the blocks SD2 uses, so we take its last block.
    """
    arch = cfg.get("architectures") or ["CLIPTextModel"]
    if arch != ["CLIPTextModel"]:
        raise _fail(path, f"architectures {arch} are not supported (expected CLIPTextModel)")
    _expect(cfg, path, "layer_norm_eps", (1e-5,))
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise _fail(path, f"hidden_act={act!r} is not supported (quick_gelu for SD1, gelu for SD2)")
    width = _int(cfg, path, "hidden_size", 512)
    inner = _int(cfg, path, "intermediate_size", 2048)
    common = dict(layer="last", act=act, width=width, mlp_ratio=inner / width,
                  layers=_int(cfg, path, "num_hidden_layers", 12),
                  heads=_int(cfg, path, "num_attention_heads", 8),
                  vocab_size=_int(cfg, path, "vocab_size", 49408),
                  max_length=_int(cfg, path, "max_position_embeddings", 77),
                  projection_dim=_int(cfg, path, "projection_dim", 512))
    if act == "quick_gelu":
        return TextEncoderConfig(kind="clip", pad_token_id=49407, **common)
    return TextEncoderConfig(kind="openclip", pad_token_id=0, **common)


def schedule_fields(cfg: dict, path: Path) -> dict:
    """Scheduler config → our noise-schedule fields and parameterization."""
    prediction = {"epsilon": "eps", "v_prediction": "v"}.get(cfg.get("prediction_type", "epsilon"))
    if prediction is None:
        raise _fail(path, f"prediction_type={cfg['prediction_type']!r} is not supported "
                          "(epsilon or v_prediction)")
    if cfg.get("trained_betas") is not None:
        raise _fail(path, "trained_betas is not supported")
    # diffusers' scaled_linear (linear in sqrt(beta)) is the schedule CompVis calls "linear"
    _expect(cfg, path, "beta_schedule", ("scaled_linear",))
    _expect(cfg, path, "rescale_betas_zero_snr", (False,))  # Lin et al. 2024: other alphas
    return dict(parameterization=prediction, linear_start=float(cfg.get("beta_start", 0.00085)),
                linear_end=float(cfg.get("beta_end", 0.012)),
                timesteps=_int(cfg, path, "num_train_timesteps", 1000))


def _check_model_index(folder: Path) -> None:
    path = folder / "model_index.json"
    if not path.exists():
        return
    index = _read_json(path)
    if "text_encoder_2" in index or "unet" not in index:
        raise _fail(path, f"pipeline {index.get('_class_name')!r} is not an SD1/SD2 pipeline "
                          "(SDXL and other families are not supported)")
    for name, expected in _PIPELINE_CLASSES.items():
        entry = index.get(name)
        if not isinstance(entry, list) or tuple(entry) != expected:
            raise _fail(path, f"component {name!r} is {entry!r}; expected {list(expected)}")


def folder_config(folder: str | Path, prediction: str | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a diffusers SD folder, from its component configs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _fail(folder, "not a folder")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise _fail(folder, f"not a diffusers Stable Diffusion folder: no {', '.join(missing)} "
                            f"subfolder{'s' if len(missing) > 1 else ''}")
    if prediction not in (None, "eps", "v"):
        raise DiffusersFolderError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    _check_model_index(folder)
    unet_path, vae_path = folder / "unet" / "config.json", folder / "vae" / "config.json"
    text_path = folder / "text_encoder" / "config.json"
    unet_json = _read_json(unet_path)
    unet = unet_config(unet_json, unet_path)
    vae, scale = vae_config(_read_json(vae_path), vae_path)
    text = text_config(_read_json(text_path), text_path)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if sched_path.exists():
        fields = schedule_fields(_read_json(sched_path), sched_path)
    elif prediction is None:
        raise _fail(sched_path, "missing: it says whether the model predicts epsilon or v; "
                                "pass prediction='eps' or 'v' to load without it")
    else:
        fields = {}
    if prediction is not None:
        fields["parameterization"] = prediction
    cfg = ModelConfig(unet=unet, autoencoder=vae, text=text, scale_factor=scale,
                      conditioning_key="hybrid" if unet.in_channels == 9 else "crossattn",
                      image_size=_int(unet_json, unet_path, "sample_size", 64),
                      channels=vae.embed_dim, **fields)
    try:
        validate(cfg, str(folder))
    except ConfigError as exc:
        raise DiffusersFolderError(str(exc)) from None
    return cfg


# ---------------------------------------------------------------------------------------------------
# weights


def weight_file(component_dir: Path, component: str, dtype: torch.dtype) -> Path:
    """The component's weight file: safetensors first, the fp16 variant first when loading in fp16."""
    names = []
    for stem in _STEMS[component]:
        full = [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]
        half = [f"{stem}.fp16.safetensors", f"{stem}.fp16.safetensors.index.json"]
        names += half + full if dtype == torch.float16 else full + half
    for stem in _STEMS[component]:
        names += [f"{stem}.bin", f"{stem}.fp16.bin"]
    for name in names:
        if (component_dir / name).is_file():
            return component_dir / name
    raise _fail(component_dir, f"no weights (looked for {', '.join(names)})")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file (or of the shards an ``.index.json`` lists). Safetensors are
    memory-mapped without a copy; pickles load with ``weights_only=True`` (see ``ldm.weights_io``)."""
    if path.name.endswith(".index.json"):
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise _fail(path, "no weight_map")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise _fail(path, f"weight_map names {shard!r}, not a file next to the index")
            tensors.update(read_weights(path.parent / shard))
        return tensors
    try:
        return read_state_dict(path)
    except CheckpointError as exc:  # already "<file>: <problem>"
        raise DiffusersFolderError(str(exc)) from None


def _candidates(component: str, key: str) -> list[str]:
    """Spellings of one diffusers key in saved files: the current one, then older layouts."""
    keys = [key]
    if component == "text_encoder":
        keys.append("text_model." + key)  # files written before transformers 5
    elif component == "vae" and ".attentions." in key:
        module, _, param = key.rpartition(".")
        for new, old in _LEGACY_VAE_ATTN.items():
            if module.endswith("." + new):
                keys.append(module[: -len(new)] + old + "." + param)
    return keys


def _squeeze_1x1(shape) -> tuple[int, ...]:
    return tuple(shape[:2]) if len(shape) == 4 and tuple(shape[2:]) == (1, 1) else tuple(shape)


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


class _Matcher:
    """Takes tensors from one file by diffusers name, noting what was used, missing or mis-shaped."""

    def __init__(self, component: str, tensors: dict[str, torch.Tensor]):
        self.component, self.tensors = component, tensors
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.shapes: list[str] = []

    def fit(self, tensor: torch.Tensor, like: torch.Tensor, key: str) -> torch.Tensor | None:
        # 1×1 convolutions on one side may be linear layers on the other: same numbers
        if tensor.shape == like.shape:
            return tensor
        if _squeeze_1x1(tensor.shape) == _squeeze_1x1(like.shape):
            return tensor.reshape(like.shape)
        self.shapes.append(f"{key} has shape {tuple(tensor.shape)}, the config gives {tuple(like.shape)}")
        return None

    def take(self, key: str, like: torch.Tensor | None) -> torch.Tensor | None:
        for candidate in _candidates(self.component, key):
            if candidate in self.tensors:
                self.used.add(candidate)
                t = self.tensors[candidate]
                return t if like is None else self.fit(t, like, candidate)
        self.missing.append(key)
        return None

    def problems(self) -> list[str]:
        unexpected = sorted(set(self.tensors) - self.used - _IGNORED_KEYS.get(self.component, set()))
        problems = []
        if self.missing:
            problems.append(f"{len(self.missing)} missing keys: {_listed(sorted(self.missing))}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
        if self.shapes:
            problems.append(f"{len(self.shapes)} shape mismatches: {_listed(self.shapes)}")
        return problems


def _parameter(match: _Matcher, key: str, ours: torch.Tensor, names: dict[str, str]
               ) -> torch.Tensor | None:
    """The file's tensor for our parameter ``key`` (shaped like ``ours``)."""
    owner, _, pname = key.rpartition(".")
    if owner in names and pname in ("in_proj_weight", "in_proj_bias"):
        # OpenCLIP's fused attention input = q, k and v projections stacked
        suffix = pname.removeprefix("in_proj_")
        parts = [match.take(f"{names[owner]}.{p}_proj.{suffix}", None) for p in "qkv"]
        if all(p is not None for p in parts):
            return match.fit(torch.cat(parts), ours, f"{names[owner]}.[qkv]_proj.{suffix}")
        return None
    if owner in names:
        return match.take(f"{names[owner]}.{pname}", ours)
    if match.component == "text_encoder" and pname == "positional_embedding":
        return match.take("embeddings.position_embedding.weight", ours)
    if match.component == "text_encoder" and pname == "text_projection":
        # Not in diffusers folders (the UNet reads token features, not the pooled projection):
        # an identity keeps the tower's pooled output meaningful.
        return torch.eye(*ours.shape)
    if match.component == "text_encoder" and pname == "logit_scale":
        return torch.tensor(math.log(1 / 0.07))  # CLIP's initial temperature, also unused
    raise RuntimeError(f"no diffusers name for our parameter {key}")  # a name-table bug


def _component_state_dict(component: str, module: nn.Module, names: dict[str, str],
                          tensors: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """Our state dict for one component, each tensor taken from the file through ``names``.

    Every parameter must be found and every tensor of the file used (a strict load by name); all
    missing, unexpected and mis-shaped keys are reported together.
    """
    match = _Matcher(component, tensors)
    params = dict(module.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for key, ours in module.state_dict(keep_vars=True).items():
        if key not in params:  # a buffer we compute ourselves (schedule, masks, position ids)
            out[key] = ours
        else:
            out[key] = _parameter(match, key, ours, names)
    problems = match.problems()
    if problems:
        raise _fail(file, "does not match its config.json: " + "; ".join(problems))
    return out


def load_diffusers_folder(path: str | Path, *, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu",
                          prediction: str | None = None) -> LatentDiffusion:
    """Build our model from a diffusers SD1/SD2 pipeline folder.

    ``prediction`` ("eps"/"v") overrides the scheduler's prediction_type. Errors are
    :class:`DiffusersFolderError` naming the file at fault.
    """
    from accelerate import init_empty_weights

    folder = Path(path)
    cfg = folder_config(folder, prediction)
    with init_empty_weights():  # parameters on meta; buffers stay real
        model = LatentDiffusion(cfg)
    maps = {"unet": (model.unet, "model.diffusion_model.", unet_module_map),
            "vae": (model.vae, "first_stage_model.", vae_module_map),
            "text_encoder": (model.text_encoder, "cond_stage_model.", text_module_map)}
    state: dict[str, torch.Tensor] = {}
    for component, (module, prefix, name_map) in maps.items():
        file = weight_file(folder / component, component, dtype)
        tensors = read_weights(file)
        converted = _component_state_dict(component, module, name_map(module), tensors, file)
        del tensors
        params = dict(module.named_parameters())
        for key, tensor in converted.items():
            if key in params and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)  # only where it differs: no copy otherwise
            state[prefix + key] = tensor
    state.update({k: v for k, v in model.state_dict(keep_vars=True).items() if k not in state})
    model.load_state_dict(state, strict=True, assign=True)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:  # a bug in the name table, not bad input
        raise RuntimeError(f"{folder}: tensors left unloaded: {still_meta[:5]}")
    return model.to(device).eval()
