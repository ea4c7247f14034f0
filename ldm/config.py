"""Typed model configuration, read from CompVis-style inference YAML.

The YAML schema is the one the original Stable Diffusion repositories ship (``model.params.unet_config``
and friends). ``target:`` strings are recognised against a fixed table and never imported.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .resources import config_dir

CONFIG_DIR = config_dir()


class ConfigError(ValueError):
    """A model configuration is malformed or incomplete."""


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int | tuple[int, ...] = 1  # one for every level, or one per level (SDXL)
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    use_checkpoint: bool = False
    legacy: bool = False
    dropout: float = 0.0
    transformer_depth_middle: int = -1  # -1: the last level's depth (sgm's rule)
    adm_in_channels: int = 0  # width of the vector input to label_emb (SDXL's "sequential"); 0: none

    def depth_at(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at UNet level ``level``."""
        d = self.transformer_depth
        return d if isinstance(d, int) else d[level]

    @property
    def middle_depth(self) -> int:
        if self.transformer_depth_middle >= 0:
            return self.transformer_depth_middle
        return self.depth_at(len(self.channel_mult) - 1)

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        """Number of heads and head width for a transformer at ``channels`` (openaimodel rules)."""
        if self.num_head_channels == -1:
            heads = self.num_heads
            dim_head = channels // heads
        else:
            heads = channels // self.num_head_channels
            dim_head = self.num_head_channels
        if self.legacy:  # legacy: the head width was the channel count divided by heads
            dim_head = channels // heads
        return heads, dim_head


@dataclass(frozen=True)
class AutoencoderConfig:
    embed_dim: int = 4
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    double_z: bool = True

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """``kind`` is ``clip`` (SD1, transformers CLIPTextModel) or ``openclip`` (SD2, open_clip tower)."""

    kind: str = "clip"
    layer: str = "last"  # "last" (SD1) or "penultimate" (SD2)
    max_length: int = 77
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    projection_dim: int = 768
    pad_token_id: int = 49407  # SD1 pads with <|endoftext|>, SD2 (open_clip) with 0
    # sgm (SDXL): layer "hidden" takes hidden_states[layer_idx] (0 = the embeddings), without the
    # final norm; legacy False: OpenCLIP's chosen state skips ln_final too; pooled: the tower also
    # gives the projected end-token state (always_return_pooled)
    layer_idx: int = -1
    legacy: bool = True
    pooled: bool = False

    def skip_layers(self) -> int:
        """How many final transformer blocks the conditioning skips (0 = last block's output)."""
        if self.layer == "last":
            return 0
        if self.layer == "penultimate":
            return 1
        if self.layer == "hidden" and 0 <= self.layer_idx <= self.layers:
            return self.layers - self.layer_idx
        raise ConfigError(f"cond_stage_config.params.layer must be last, penultimate or hidden "
                          f"(with 0 <= layer_idx <= layers), got {self.layer!r}")

    @property
    def normed(self) -> bool:
        """Whether the conditioning passes through the final layer norm (SD1, SD2: yes; SDXL: no)."""
        return self.layer != "hidden" and self.legacy


# sgm's vector conditionings: how many numbers each input key holds (each gets a Fourier embedding)
VECTOR_INPUTS = {"original_size_as_tuple": 2, "crop_coords_top_left": 2, "target_size_as_tuple": 2,
                 "aesthetic_score": 1}


@dataclass(frozen=True)
class EmbedderConfig:
    """One of sgm's ``conditioner_config.params.emb_models``: a text tower (``text``) or a
    ConcatTimestepEmbedderND (``outdim``-wide sinusoidal features of each number of ``input_key``)."""
    input_key: str = "txt"
    text: TextEncoderConfig | None = None
    outdim: int = 256

    @property
    def vector_width(self) -> int:
        """Width this embedder adds to the UNet's ``y`` vector."""
        if self.text is not None:
            return self.text.projection_dim if self.text.pooled else 0
        return VECTOR_INPUTS[self.input_key] * self.outdim


@dataclass(frozen=True)
class ConditionerConfig:
    """sgm's GeneralConditioner (SDXL): token states of the text towers concatenated along the
    width (the cross-attention context), pooled and Fourier vectors concatenated into ``y``."""
    embedders: tuple[EmbedderConfig, ...] = ()

    @property
    def texts(self) -> tuple[TextEncoderConfig, ...]:
        return tuple(e.text for e in self.embedders if e.text is not None)

    @property
    def context_dim(self) -> int:
        return sum(t.width for t in self.texts)

    @property
    def vector_width(self) -> int:
        return sum(e.vector_width for e in self.embedders)


@dataclass(frozen=True)
class SamplingDefaults:
    """How the model's makers recommend sampling it: the optional top-level ``sampling:`` section of
    the YAML (outside ``model:``, so CompVis-style loaders ignore it). The pipeline falls back to these
    when the caller leaves a setting unset; the defaults are SD's usual ones."""
    guidance_scale: float = 7.5
    num_inference_steps: int = 25
    scheduler: str = "dpmpp_2m"


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    beta_schedule: str = "linear"  # CompVis "linear" is diffusers' "scaled_linear"
    scale_factor: float = 0.18215
    parameterization: str = "eps"  # "eps" or "v"
    conditioning_key: str = "crossattn"  # "hybrid" for 9-channel inpainting models
    image_size: int = 64  # latent size the model was trained at
    channels: int = 4
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    # SDXL (sgm schema): the conditioner replaces cond_stage_model, and ``text`` is its first tower
    conditioner: ConditionerConfig | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.conditioner is not None

    @property
    def is_inpainting(self) -> bool:
        return self.conditioning_key == "hybrid" and self.unet.in_channels == 9

    @property
    def default_image_size(self) -> int:
        return self.image_size * self.autoencoder.downscale

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Recognised ``target:`` strings (never imported; see module docstring).
_LDM_TARGETS = {
    "ldm.models.diffusion.ddpm.LatentDiffusion": "crossattn",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion": "hybrid",
    # ControlNet's cldm_v15/v21.yaml: the base model is read here, the ControlNet by
    # ldm.controlnet_config from model.params.control_stage_config
    "cldm.cldm.ControlLDM": "crossattn",
}
_UNET_TARGETS = ("ldm.modules.diffusionmodules.openaimodel.UNetModel",  # the first is written out
                 "cldm.cldm.ControlledUnetModel")
_VAE_TARGETS = {"ldm.models.autoencoder.AutoencoderKL"}
_TEXT_TARGETS = {
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": "clip",
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": "openclip",
}
# OpenCLIP towers by architecture name (text part of open_clip's model configs).
OPENCLIP_TEXT_ARCHS = {
    "ViT-H-14": dict(width=1024, layers=24, heads=16, projection_dim=1024),
    "ViT-bigG-14": dict(width=1280, layers=32, heads=20, projection_dim=1280),
}


def _section(tree: dict, path: str, mapping: bool = False) -> Any:
    node: Any = tree
    walked = []
    for part in path.split("."):
        if not isinstance(node, dict):
            raise ConfigError(f"'{'.'.join(walked) or 'config'}' must be a mapping, got {node!r}")
        if part not in node:
            raise ConfigError(f"missing field '{path}'")
        node = node[part]
        walked.append(part)
    if mapping and not isinstance(node, dict):
        raise ConfigError(f"'{path}' must be a mapping, got {node!r}")
    return node


def _check_target(section: dict, path: str, allowed) -> str:
    target = section.get("target")
    if target not in allowed:
        raise ConfigError(f"'{path}.target' is {target!r}; expected one of {sorted(allowed)}")
    return target


def _build(cls, params: dict, path: str, renames: dict[str, str] | None = None, ignore=()):
    """Construct a config dataclass from a params dict, naming unknown or mistyped fields."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (params or {}).items():
        key = (renames or {}).get(key, key)
        if key in ignore:
            continue
        if key not in names:
            raise ConfigError(f"unknown field '{path}.{key}'")
        default = names[key].default
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"'{path}.{key}' must be a list of integers, got {value!r}")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"'{path}.{key}' must be true or false, got {value!r}")
        elif isinstance(default, (int, float)) and default is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"'{path}.{key}' must be a number, got {value!r}")
            value = type(default)(value) if isinstance(default, float) else value
        kwargs[key] = value
    return cls(**kwargs)


# CompVis fields that describe training or logging only.
_LDM_IGNORED = {
    "base_learning_rate", "num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key",
    "cond_stage_trainable", "monitor", "use_ema", "finetune_keys", "concat_keys", "masked_image_key",
    "use_ema", "ckpt_path", "ignore_keys", "load_ema", "scheduler_config", "cond_stage_forward",
    "unet_trainable", "ucg_training", "reset_ema", "reset_num_ema_updates", "loss_type",
    "learn_logvar", "logvar_init", "l_simple_weight", "original_elbo_weight", "v_posterior",
    "use_positional_encodings", "make_it_fit", "low_scale_key", "noise_aug_config",
    "control_key", "only_mid_control", "control_stage_config",
}
_UNET_IGNORED = {"image_size", "use_fp16", "use_spatial_transformer", "num_heads_upsample",
                 "conv_resample", "dims", "resblock_updown", "use_scale_shift_norm",
                 "use_new_attention_order", "num_classes", "n_embed", "disable_self_attentions",
                 "num_attention_blocks", "disable_middle_self_attn", "spatial_transformer_attn_type"}


def _unet_config(params: dict, path: str) -> UNetConfig:
    """UNet params of either schema: ``transformer_depth`` and sgm's ``context_dim`` may be lists."""
    params = dict(params)
    depth = params.pop("transformer_depth", 1)
    if isinstance(depth, list):
        if not depth or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in depth):
            raise ConfigError(f"'{path}.transformer_depth' must be a number or a list of numbers, "
                              f"got {depth!r}")
        depth = tuple(depth)
    elif isinstance(depth, bool) or not isinstance(depth, int):
        raise ConfigError(f"'{path}.transformer_depth' must be a number or a list of numbers, got {depth!r}")
    context = params.get("context_dim")
    if isinstance(context, list):  # sgm allows one per level; every model ships equal ones
        if not context or len(set(context)) != 1:
            raise ConfigError(f"'{path}.context_dim' must be one width for all levels, got {context!r}")
        params["context_dim"] = context[0]
    classes = params.pop("num_classes", None)
    if classes not in (None, "sequential"):
        raise ConfigError(f"'{path}.num_classes' is {classes!r}; only 'sequential' (SDXL) is supported")
    if (classes == "sequential") != bool(params.get("adm_in_channels")):
        raise ConfigError(f"'{path}': num_classes 'sequential' and adm_in_channels go together")
    cfg = _build(UNetConfig, params, path, ignore=_UNET_IGNORED)
    if not isinstance(depth, int) and len(depth) != len(cfg.channel_mult):
        raise ConfigError(f"'{path}.transformer_depth' has {len(depth)} entries for "
                          f"{len(cfg.channel_mult)} levels")
    return dataclasses.replace(cfg, transformer_depth=depth)


def _text_config(section: dict, path: str = "model.params.cond_stage_config",
                 targets: dict = _TEXT_TARGETS, renames: dict | None = None) -> TextEncoderConfig:
    kind = targets[_check_target(section, path, targets)]
    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"'{path}.params' must be a mapping, got {params!r}")
    params = dict(params)
    params.pop("freeze", None)
    params.pop("device", None)
    params.pop("version", None)  # a hub name in CompVis configs; weights come from the checkpoint
    path = path + ".params"
    params = {(renames or {}).get(k, k): v for k, v in params.items()}
    if kind == "openclip":
        arch = params.pop("arch", "ViT-H-14")
        if arch not in OPENCLIP_TEXT_ARCHS:
            raise ConfigError(f"'{path}.arch' is {arch!r}; known: {sorted(OPENCLIP_TEXT_ARCHS)}")
        base = dict(OPENCLIP_TEXT_ARCHS[arch], act="gelu", pad_token_id=0, layer="penultimate")
        base.update(params)
        return _build(TextEncoderConfig, {**base, "kind": "openclip"}, path)
    return _build(TextEncoderConfig, {**params, "kind": "clip"}, path)


def _sampling(tree: dict) -> SamplingDefaults:
    if "sampling" not in tree:
        return SamplingDefaults()
    out = _build(SamplingDefaults, _section(tree, "sampling", mapping=True), "sampling")
    if out.guidance_scale < 0:
        raise ConfigError(f"'sampling.guidance_scale' must be >= 0, got {out.guidance_scale}")
    if isinstance(out.num_inference_steps, float) or out.num_inference_steps < 1:
        raise ConfigError(f"'sampling.num_inference_steps' must be a whole number >= 1, "
                          f"got {out.num_inference_steps}")
    if not isinstance(out.scheduler, str):
        raise ConfigError(f"'sampling.scheduler' must be a scheduler name, got {out.scheduler!r}")
    return out


# Stability's generative-models ("sgm") schema: SDXL base, refiner and inpainting
_SGM_MODEL = "sgm.models.diffusion.DiffusionEngine"
_SGM_UNET = "sgm.modules.diffusionmodules.openaimodel.UNetModel"
_SGM_VAE = {"sgm.models.autoencoder.AutoencoderKL", "sgm.models.autoencoder.AutoencoderKLInferenceWrapper"}
_SGM_TEXT = {"sgm.modules.encoders.modules.FrozenCLIPEmbedder": "clip",
             "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": "openclip"}
_SGM_VECTOR = "sgm.modules.encoders.modules.ConcatTimestepEmbedderND"
_SGM_SCALING = {"sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling": "eps",
                "sgm.modules.diffusionmodules.denoiser_scaling.VScaling": "v"}
_SGM_DENOISER = "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser"
_SGM_DISCRETIZATION = "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"
_SGM_IGNORED = {"disable_first_stage_autocast", "ckpt_path", "sampler_config", "loss_fn_config",
                "optimizer_config", "scheduler_config", "network_wrapper", "compile_model", "use_ema",
                "ema_decay_rate", "input_key", "log_keys", "no_cond_log", "en_and_decode_n_samples_a_time",
                "control_stage_config"}  # an SDXL ControlNet's, read by ldm.controlnet_config


def _embedder(section: Any, path: str) -> EmbedderConfig:
    if not isinstance(section, dict):
        raise ConfigError(f"'{path}' must be a mapping, got {section!r}")
    key = section.get("input_key")
    if section.get("target") == _SGM_VECTOR:
        if key not in VECTOR_INPUTS:
            raise ConfigError(f"'{path}.input_key' is {key!r}; known: {sorted(VECTOR_INPUTS)}")
        return _build(EmbedderConfig, {"input_key": key, **(section.get("params") or {})},
                      path + ".params")
    if key != "txt":
        raise ConfigError(f"'{path}.input_key' of a text encoder must be 'txt', got {key!r}")
    text = _text_config(section, path, _SGM_TEXT, renames={"always_return_pooled": "pooled"})
    return EmbedderConfig("txt", text)


def _parse_sgm(tree: dict) -> ModelConfig:
    params = dict(_section(tree, "model.params", mapping=True))
    net_path = "model.params.network_config"
    _check_target(_section(tree, net_path, mapping=True), net_path, {_SGM_UNET})
    unet = _unet_config(_section(tree, net_path + ".params", mapping=True), net_path + ".params")
    cond_path = "model.params.conditioner_config.params.emb_models"
    models = _section(tree, cond_path)
    if not isinstance(models, list) or not models:
        raise ConfigError(f"'{cond_path}' must be a list of embedders")
    cond = ConditionerConfig(tuple(_embedder(m, f"{cond_path}[{i}]") for i, m in enumerate(models)))
    if not cond.texts:
        raise ConfigError(f"'{cond_path}' has no text encoder")
    vae_path = "model.params.first_stage_config"
    _check_target(_section(tree, vae_path, mapping=True), vae_path, _SGM_VAE)
    ddconfig = dict(_section(tree, vae_path + ".params.ddconfig", mapping=True))
    ddconfig.pop("attn_type", None)  # an attention kernel choice, not a shape
    ddconfig["embed_dim"] = _section(tree, vae_path + ".params.embed_dim")
    vae = _build(AutoencoderConfig, ddconfig, vae_path + ".params.ddconfig")
    den_path = "model.params.denoiser_config"
    denoiser = _section(tree, den_path, mapping=True)
    _check_target(denoiser, den_path, {_SGM_DENOISER})
    scaling = _check_target(_section(tree, den_path + ".params.scaling_config", mapping=True),
                            den_path + ".params.scaling_config", _SGM_SCALING)
    disc_path = den_path + ".params.discretization_config"
    disc = _section(tree, disc_path, mapping=True)
    _check_target(disc, disc_path, {_SGM_DISCRETIZATION})
    schedule = dict(disc.get("params") or {})
    if "num_idx" in denoiser["params"]:
        schedule["timesteps"] = denoiser["params"]["num_idx"]
    for key in ("network_config", "conditioner_config", "first_stage_config", "denoiser_config"):
        params.pop(key)
    cfg = _build(ModelConfig, {**params, **schedule}, "model.params", ignore=_SGM_IGNORED)
    return cfg.replace(unet=unet, autoencoder=vae, text=cond.texts[0], conditioner=cond,
                       parameterization=_SGM_SCALING[scaling], image_size=128,
                       conditioning_key="hybrid" if unet.in_channels == 9 else "crossattn")


def _sgm_tree(cfg: ModelConfig, fields_of) -> dict:
    def embedder(e: EmbedderConfig) -> dict:
        if e.text is None:
            return {"input_key": e.input_key, "target": _SGM_VECTOR, "params": {"outdim": e.outdim}}
        target = next(t for t, kind in _SGM_TEXT.items() if kind == e.text.kind)
        text = fields_of(e.text, skip=("kind", "pooled"))
        return {"input_key": "txt", "target": target,
                "params": {**text, "always_return_pooled": e.text.pooled}}

    unet = fields_of(cfg.unet)
    if cfg.unet.adm_in_channels:
        unet["num_classes"] = "sequential"
    scaling = next(t for t, kind in _SGM_SCALING.items() if kind == cfg.parameterization)
    params = {
        "scale_factor": cfg.scale_factor,
        "denoiser_config": {"target": _SGM_DENOISER, "params": {
            "num_idx": cfg.timesteps, "scaling_config": {"target": scaling},
            "discretization_config": {"target": _SGM_DISCRETIZATION, "params": {
                "linear_start": cfg.linear_start, "linear_end": cfg.linear_end}}}},
        "network_config": {"target": _SGM_UNET, "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {
            "emb_models": [embedder(e) for e in cfg.conditioner.embedders]}},
        "first_stage_config": {"target": next(iter(sorted(_SGM_VAE))), "params": {
            "embed_dim": cfg.autoencoder.embed_dim,
            "ddconfig": fields_of(cfg.autoencoder, skip=("embed_dim",))}}}
    return {"model": {"target": _SGM_MODEL, "params": params}, "sampling": fields_of(cfg.sampling)}


def parse_config(tree: dict, source: str = "config") -> ModelConfig:
    """Turn a CompVis or sgm YAML tree into a :class:`ModelConfig`; errors name the offending field."""
    try:
        model = _section(tree, "model", mapping=True)
        if model.get("target") == _SGM_MODEL:
            cfg = _parse_sgm(tree).replace(sampling=_sampling(tree))
            validate(cfg, source)
            return cfg
        conditioning = _LDM_TARGETS[_check_target(model, "model", _LDM_TARGETS)]
        params = dict(_section(tree, "model.params", mapping=True))
        unet_sec = _section(tree, "model.params.unet_config", mapping=True)
        _check_target(unet_sec, "model.params.unet_config", _UNET_TARGETS)
        unet_path = "model.params.unet_config.params"
        unet = _unet_config(_section(tree, unet_path, mapping=True), unet_path)
        vae_sec = _section(tree, "model.params.first_stage_config", mapping=True)
        _check_target(vae_sec, "model.params.first_stage_config", _VAE_TARGETS)
        vae_path = "model.params.first_stage_config.params"
        ddconfig = dict(_section(tree, vae_path + ".ddconfig", mapping=True))
        ddconfig["embed_dim"] = _section(tree, vae_path + ".embed_dim")
        vae = _build(AutoencoderConfig, ddconfig, vae_path + ".ddconfig")
        text = _text_config(_section(tree, "model.params.cond_stage_config", mapping=True))
        for key in ("unet_config", "first_stage_config", "cond_stage_config"):
            params.pop(key)
        params.setdefault("conditioning_key", conditioning)
        cfg = _build(ModelConfig, params, "model.params", ignore=_LDM_IGNORED)
        cfg = cfg.replace(unet=unet, autoencoder=vae, text=text, sampling=_sampling(tree))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    validate(cfg, source)
    return cfg


def validate(cfg: ModelConfig, source: str = "config") -> None:
    def bad(msg):
        raise ConfigError(f"{source}: {msg}")

    if cfg.parameterization not in ("eps", "v"):
        bad(f"model.params.parameterization must be 'eps' or 'v', got {cfg.parameterization!r}")
    if cfg.conditioning_key not in ("crossattn", "hybrid"):
        bad(f"model.params.conditioning_key must be crossattn or hybrid, got {cfg.conditioning_key!r}")
    text_width = cfg.conditioner.context_dim if cfg.conditioner else cfg.text.width
    if cfg.unet.context_dim != text_width:
        bad(f"unet_config.params.context_dim ({cfg.unet.context_dim}) != text encoder width "
            f"({text_width})")
    if cfg.conditioner and cfg.unet.adm_in_channels != cfg.conditioner.vector_width:
        bad(f"network_config.params.adm_in_channels ({cfg.unet.adm_in_channels}) != the "
            f"conditioner's vector width ({cfg.conditioner.vector_width})")
    if cfg.unet.num_head_channels == -1 and cfg.unet.num_heads < 1:
        bad("unet_config.params needs num_heads or num_head_channels")
    for i, mult in enumerate(cfg.unet.channel_mult):
        if (cfg.unet.model_channels * mult) % 32:
            bad(f"unet_config.params: channels at level {i} must be a multiple of 32 (GroupNorm)")
    if cfg.conditioning_key == "hybrid" and cfg.unet.in_channels != 9:
        bad("an inpainting model (conditioning_key hybrid) needs unet in_channels 9")
    for text in cfg.conditioner.texts if cfg.conditioner else (cfg.text,):
        try:
            text.skip_layers()
        except ConfigError as exc:
            bad(str(exc))


# fields only SDXL-style models use: left out of a tree at their defaults, so SD1/SD2 trees (and
# the headers of the files written with them) stay what they were
_SGM_ONLY = {"ModelConfig": {"conditioner"},
             "UNetConfig": {"transformer_depth_middle", "adm_in_channels"},
             "TextEncoderConfig": {"layer_idx", "pooled", "legacy"}}


def config_tree(cfg: ModelConfig) -> dict:
    """``cfg`` as a CompVis-style tree (what the YAML files hold) that :func:`parse_config` reads
    back to an equal config: every field written out, nothing left to a default."""
    def fields_of(obj, skip=()) -> dict:
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in skip or (f.name in _SGM_ONLY.get(type(obj).__name__, ())
                                  and value == f.default):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    if cfg.conditioner is not None:
        return _sgm_tree(cfg, fields_of)
    model_target = next(t for t, key in _LDM_TARGETS.items() if key == cfg.conditioning_key)
    text_target = next(t for t, kind in _TEXT_TARGETS.items() if kind == cfg.text.kind)
    vae = fields_of(cfg.autoencoder, skip=("embed_dim",))
    params = fields_of(cfg, skip=("unet", "autoencoder", "text", "sampling"))
    params.update(
        unet_config={"target": next(iter(_UNET_TARGETS)), "params": fields_of(cfg.unet)},
        first_stage_config={"target": next(iter(_VAE_TARGETS)),
                            "params": {"embed_dim": cfg.autoencoder.embed_dim, "ddconfig": vae}},
        cond_stage_config={"target": text_target, "params": fields_of(cfg.text, skip=("kind",))})
    return {"model": {"target": model_target, "params": params}, "sampling": fields_of(cfg.sampling)}


def read_config_tree(path: str | Path, what: str = "model configuration") -> dict:
    """A YAML config file's tree; unreadable, malformed or not a mapping: one ConfigError line."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: not a {what} (expected a mapping with 'model')")
    return tree


def load_config(path: str | Path) -> ModelConfig:
    return parse_config(read_config_tree(path), str(path))


def builtin_config(name: str) -> ModelConfig:
    """A config shipped in ``configs/`` by file stem, e.g. ``v1-inference``."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no built-in config {name!r}; known: {', '.join(known)}")
    return load_config(path)
