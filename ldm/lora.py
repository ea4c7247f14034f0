"""LoRA on our models through peft: apply files at a scale, several at once, change scales, remove,
fuse into the weights and unfuse exactly, add fresh trainable adapters, save kohya files.

Every LoRA is its own peft adapter (``peft.inject_adapter_in_model`` on our modules, which keep
their checkpoint names). Scales are per adapter; an adapter at scale 0 is deactivated rather than
multiplied by zero, so the model computes exactly what the base model computes. Fusing keeps a copy
of each touched layer's weight, and unfusing puts that copy back: the weights are bit-identical to
the originals afterwards, which subtracting the delta again would not guarantee.

File layouts and name resolution live in :mod:`ldm.lora_formats`; SDXL's bigG tower, whose
attention fuses q/k/v, takes its adapters through :mod:`ldm.lora_attention`.
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .lora_attention import restore_attention, split_attention
from .lora_formats import (LoraError, LoraModule, LoraWeights, name_table, read_lora,
                           write_lora)
from .weights_io import file_hash

__all__ = ["LoraError", "LoraModule", "LoraWeights", "LoraState", "UNET_ATTENTION", "UNET_FEED_FORWARD",
           "UNET_PROJECTIONS", "TEXT_ATTENTION", "TEXT_MLP", "TARGET_PRESETS", "target_layers",
           "add_lora", "apply_lora", "read_lora", "set_lora_scale", "lora_adapters", "lora_info",
           "has_lora", "remove_lora",
           "fuse_lora", "unfuse_lora", "is_fused", "get_lora", "set_lora_weights",
           "lora_parameters", "save_lora", "lora_file_metadata", "model_family"]

# Layer names as diffusers spells them (a target matches a layer whose diffusers path ends in it)
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
UNET_PROJECTIONS = ("proj_in", "proj_out")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_MLP = ("fc1", "fc2")
TARGET_PRESETS = {"attention": UNET_ATTENTION, "ff": UNET_FEED_FORWARD, "proj": UNET_PROJECTIONS,
                  "text-attention": TEXT_ATTENTION, "text-mlp": TEXT_MLP}


@dataclass
class _Adapter:
    scale: float
    trainable: bool
    source: str | None
    layers: list[str]


@dataclass
class LoraState:
    """The LoRAs applied to one model (its ``lora`` field; this module alone writes it)."""

    adapters: dict[str, _Adapter] = field(default_factory=dict)  # in the order they were added
    fused: dict[str, torch.Tensor] = field(default_factory=dict)  # layer path → original weight


def _state(model: nn.Module) -> LoraState:
    """The model's LoRA state, created on first use."""
    if model.lora is None:
        model.lora = LoraState()
    return model.lora


def _current(model: nn.Module) -> LoraState:
    """The model's LoRA state for reading; an empty one, not kept, when it has none."""
    return LoraState() if model.lora is None else model.lora


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def model_family(model: nn.Module) -> str:
    """"sd1", "sd2", "sd2-v", "sd1-inpaint", "sd2-inpaint", "sdxl", "sdxl-refiner" or "sdxl-inpaint"
    (and "-v" variants), from the model's configuration."""
    cfg = model.config
    if cfg.is_sdxl:
        base = "sdxl" if any(t.kind == "clip" for t in cfg.conditioner.texts) else "sdxl-refiner"
    else:
        base = "sd1" if cfg.text.kind == "clip" else "sd2"
    if cfg.is_inpainting:
        return f"{base}-inpaint"
    return f"{base}-v" if cfg.parameterization == "v" else base


# ------------------------------------------------------------------------------------- targets

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")  # SDXL: CLIP-L (kohya te1), bigG (te2)


def target_layers(model: nn.Module, unet_targets=UNET_ATTENTION, text_targets=(),
                  text_components=TEXT_COMPONENTS) -> list[str]:
    """Paths of the UNet / text-encoder layers whose diffusers name ends in one of the targets
    (e.g. ``to_q``, ``ff.net.2``, ``conv1``; text: ``q_proj``, ``fc1``), text targets in the
    towers named by ``text_components`` (diffusers' component names). On SDXL's bigG tower any of
    q/k/v_proj selects its fused input projection (all three: one adapter)."""
    table = name_table(model)
    unknown = set(text_components) - set(TEXT_COMPONENTS)
    if unknown:
        raise LoraError(f"unknown text encoder {sorted(unknown)[0]!r}: {', '.join(TEXT_COMPONENTS)}")
    wanted = {"unet": tuple(unet_targets)}
    wanted.update({c: tuple(text_targets) for c in text_components})
    found, used = [], set()
    for ours, (component, path) in table.diffusers.items():
        paths = [p for _, p, _ in table.split[ours]] if ours in table.split else [path]
        hits = [t for t in wanted.get(component, ())
                if any(p == t or p.endswith("." + t) for p in paths)]
        if hits:
            found.append(ours)
            used.update(("unet" if component == "unet" else "text", t) for t in hits)
    wanted_any = [("unet", t) for t in unet_targets] + ([("text", t) for t in text_targets]
                                                        if text_components else [])
    present = {c for c, _ in table.diffusers.values()}
    if text_targets and not present & set(text_components):
        raise LoraError(f"this model has no text encoder {' or '.join(text_components)}")
    missing = [t for c, t in wanted_any if (c, t) not in used]
    if missing:
        raise LoraError(f"LoRA targets match no layer of this model: {', '.join(missing)}")
    return found


# ------------------------------------------------------------------------------------ injection

def _valid_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def _adapter_name(state: LoraState, wanted: str | None, source: str | None) -> str:
    if wanted is not None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", wanted):
            raise LoraError(f"LoRA name {wanted!r}: use letters, digits, '_' and '-' only")
        if hasattr(nn.ModuleDict(), wanted):  # peft keys ModuleDicts by adapter name
            raise LoraError(f"LoRA name {wanted!r} is reserved (an nn.Module attribute); choose another")
        if wanted in state.adapters:
            raise LoraError(f"a LoRA named {wanted!r} is already applied")
        return wanted
    stem = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(source).stem if source else "lora") or "lora"
    if not stem[0].isalpha():
        stem = "lora_" + stem
    name, k = stem, 2
    while name in state.adapters or hasattr(nn.ModuleDict(), name):
        name, k = f"{stem}_{k}", k + 1
    return name


def _inject(model: nn.Module, name: str, specs: dict[str, tuple[int, float]]) -> None:
    """Add adapter ``name`` to the given layers with their (rank, alpha); peft's default init
    (A Kaiming-uniform, B zero). The base parameters keep their requires_grad flags."""
    from peft import LoraConfig, inject_adapter_in_model

    (rank, alpha), _ = Counter(specs.values()).most_common(1)[0]
    rank_pattern = {re.escape(p): r for p, (r, _) in specs.items() if r != rank}
    alpha_pattern = {re.escape(p): a for p, (_, a) in specs.items() if a != alpha}
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(specs), lora_dropout=0.0,
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    flags = {p: p.requires_grad for p in model.parameters()}
    split_attention(model, specs)  # fused attention (bigG): its projections as wrappable layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "already found a peft_config": several adapters is the point
        inject_adapter_in_model(config, model, adapter_name=name)
    model.__dict__.pop("peft_config", None)
    for p, flag in flags.items():
        p.requires_grad_(flag)


def _sync(model: nn.Module) -> None:
    """Make every layer's active adapters, scales and trainable flags follow the model's state."""
    state = _current(model)
    active = [n for n, a in state.adapters.items() if a.scale != 0]
    for _, layer in _lora_layers(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.set_adapter(active, inference_mode=True)
        for n, adapter in state.adapters.items():
            if n in layer.lora_A:
                layer.set_scale(n, adapter.scale)
                layer.set_requires_grad(n, adapter.trainable)


def add_lora(model: nn.Module, name: str = "default", *, rank: int = 4, alpha: float | None = None,
             targets=UNET_ATTENTION, text_targets=(), dtype: torch.dtype | None = torch.float32,
             text_components=TEXT_COMPONENTS) -> list[nn.Parameter]:
    """A fresh trainable adapter (up weights zero: the model is unchanged until trained).
    Returns its parameters, in ``dtype`` (float32 by default, whatever the base weights are).
    ``text_components``: which towers the text targets adapt (SDXL: ``text_encoder`` and/or
    ``text_encoder_2``)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoraError(f"LoRA alpha must be positive, got {alpha!r}")
    state = _state(model)
    _refuse_when_fused(state, "add a LoRA")
    name = _adapter_name(state, name, None)
    layers = target_layers(model, targets, text_targets, text_components)
    _inject(model, name, {p: (rank, alpha) for p in layers})
    state.adapters[name] = _Adapter(1.0, True, None, layers)
    if dtype is not None:
        for p in _adapter_parameters(model, name):
            p.data = p.data.to(dtype)
    _sync(model)
    return lora_parameters(model, name)


def apply_lora(model: nn.Module, lora, *, scale: float = 1.0, name: str | None = None) -> str:
    """Apply a LoRA (a file path or :class:`LoraWeights`) without merging; returns its adapter
    name (default: from the file name). Nothing changes when the file does not fit."""
    scale = _valid_scale(scale)
    state = _state(model)
    _refuse_when_fused(state, "apply a LoRA")
    weights = lora if isinstance(lora, LoraWeights) else read_lora(lora, model)
    name = _adapter_name(state, name, weights.source)
    if not weights.modules:
        raise LoraError(f"{weights.source or 'LoRA'}: has no layers")
    specs = {p: (m.rank, m.effective_alpha) for p, m in weights.modules.items()}
    _inject(model, name, specs)
    state.adapters[name] = _Adapter(scale, False, weights.source, sorted(specs))
    set_lora_weights(model, name, weights)
    _sync(model)
    return name


def _refuse_when_fused(state: LoraState, what: str) -> None:
    if state.fused:
        raise LoraError(f"cannot {what} while LoRAs are fused into the weights; unfuse first")


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Change one adapter's scale (0 switches it off exactly)."""
    state = _state(model)
    adapter = _known(state, name)
    _refuse_when_fused(state, "change a LoRA scale")
    adapter.scale = _valid_scale(scale)
    _sync(model)


def lora_adapters(model: nn.Module) -> dict[str, float]:
    """Applied adapters and their scales, in the order they were added."""
    return {n: a.scale for n, a in _current(model).adapters.items()}


def lora_info(model: nn.Module) -> list[dict]:
    """Each applied adapter: {"name", "scale", "source" (file path or None), "trainable"}."""
    return [{"name": n, "scale": a.scale, "source": a.source, "trainable": a.trainable}
            for n, a in _current(model).adapters.items()]


def has_lora(model: nn.Module) -> bool:
    """Whether any adapter is applied (at any scale)."""
    return bool(_current(model).adapters)


def _known(state: LoraState, name: str) -> _Adapter:
    if name not in state.adapters:
        have = ", ".join(state.adapters) or "none"
        raise LoraError(f"no LoRA named {name!r} is applied (applied: {have})")
    return state.adapters[name]


def remove_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove one adapter (or all); fused weights are unfused first. Layers left without adapters
    get their original module back, so the model's structure is as before."""
    state = _state(model)
    names = list(state.adapters) if name is None else [name]
    for n in names:
        _known(state, n)
    if state.fused:
        unfuse_lora(model)
    for path, layer in _lora_layers(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns when the active adapter goes
            for n in names:
                if n in layer.lora_A:
                    layer.delete_adapter(n)
        if not layer.lora_A:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    restore_attention(model)
    for n in names:
        del state.adapters[n]
    _sync(model)


# ------------------------------------------------------------------------------ fuse and unfuse

def is_fused(model: nn.Module) -> bool:
    return bool(_current(model).fused)


@torch.no_grad()
def fuse_lora(model: nn.Module) -> None:
    """Add the active adapters (at their scales) into the layer weights: no extra cost per call.
    The touched weights are kept, for :func:`unfuse_lora`."""
    state = _state(model)
    if state.fused:
        raise LoraError("LoRAs are already fused")
    active = [n for n, a in state.adapters.items() if a.scale != 0]
    for path, layer in _lora_layers(model):
        names = [n for n in active if n in layer.lora_A]
        if names:
            state.fused[path] = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=names)


@torch.no_grad()
def unfuse_lora(model: nn.Module) -> None:
    """Put back the weights saved by :func:`fuse_lora`, bit for bit."""
    state = _state(model)
    for path, original in state.fused.items():
        layer = model.get_submodule(path)
        weight = layer.get_base_layer().weight
        if weight.dtype == original.dtype:
            weight.copy_(original)
        else:  # the model was cast since fusing; the original values still come back exactly
            weight.data = original.to(weight.device)
        layer.merged_adapters.clear()
    state.fused.clear()


# --------------------------------------------------------------------------- weights in and out

def _adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    out = []
    for _, layer in _lora_layers(model):
        if name in layer.lora_A:
            out += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return out


def lora_parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    """The adapter's down and up weights, layer by layer (what an optimizer trains)."""
    _known(_current(model), name)
    return _adapter_parameters(model, name)


def get_lora(model: nn.Module, name: str = "default") -> LoraWeights:
    """The adapter's current weights (views of the parameters, detached)."""
    adapter = _known(_current(model), name)
    modules = {}
    for path, layer in _lora_layers(model):
        if name in layer.lora_A:
            modules[path] = LoraModule(layer.lora_A[name].weight.detach(),
                                       layer.lora_B[name].weight.detach(),
                                       float(layer.lora_alpha[name]))
    return LoraWeights(modules, {}, adapter.source)


@torch.no_grad()
def set_lora_weights(model: nn.Module, name: str, weights: LoraWeights) -> None:
    """Copy weights into an existing adapter's parameters (the same tensors an optimizer holds)."""
    _known(_current(model), name)
    layers = dict(_lora_layers(model))
    have = {p for p, layer in layers.items() if name in layer.lora_A}
    if set(weights.modules) != have:
        extra = sorted(set(weights.modules) - have) or sorted(have - set(weights.modules))
        raise LoraError(f"{weights.source or 'LoRA'}: its layers differ from adapter {name!r} "
                        f"(e.g. {extra[0]})")
    for path, module in weights.modules.items():
        layer = layers[path]
        down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
        if down.shape != module.down.shape or up.shape != module.up.shape:
            raise LoraError(f"{weights.source or 'LoRA'}: layer {path} has rank {module.rank}, "
                            f"adapter {name!r} has rank {down.shape[0]}")
        if abs(float(layer.lora_alpha[name]) - module.effective_alpha) > 1e-6 * module.effective_alpha:
            raise LoraError(f"{weights.source or 'LoRA'}: layer {path} has alpha "
                            f"{module.effective_alpha:g}, adapter {name!r} has "
                            f"{float(layer.lora_alpha[name]):g}")
        down.copy_(module.down)
        up.copy_(module.up)


def lora_file_metadata(model: nn.Module, weights: LoraWeights, *, steps: int | None = None,
                       resolution: int | None = None, base_model_path=None,
                       extra: dict | None = None) -> dict[str, str]:
    """Header strings for a LoRA file: ours plus the kohya ``ss_*`` keys tools display."""
    ranks = weights.ranks()
    rank = ranks.most_common(1)[0][0] if ranks else 0
    alphas = Counter(m.effective_alpha for m in weights.modules.values())
    alpha = alphas.most_common(1)[0][0] if alphas else 0.0
    family = model_family(model)
    meta = {"rank": str(rank), "alpha": f"{alpha:g}", "family": family,
            "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}", "ss_v2": str(family.startswith("sd2"))}
    if family.startswith("sdxl"):  # what kohya's SDXL scripts write; A1111 shows it
        meta["ss_base_model_version"] = "sdxl_base_v1-0"
    if base_model_path is None:
        base_model_path = getattr(model.source, "path", None)
    if base_model_path is not None and Path(base_model_path).is_file():
        digest = file_hash(base_model_path)
        meta.update(base_model_hash=digest[:10], base_model=Path(base_model_path).stem,
                    ss_new_sd_model_hash=digest, ss_sd_model_name=Path(base_model_path).name)
    if steps is not None:
        meta.update(steps=str(steps), ss_steps=str(steps))
    if resolution is not None:
        meta.update(resolution=str(resolution), ss_resolution=f"({resolution}, {resolution})")
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def save_lora(model: nn.Module, path, name: str = "default", *, metadata: dict | None = None,
              dtype: torch.dtype = torch.float32, **info) -> None:
    """Write adapter ``name`` as a kohya safetensors file (diffusers-style layer names).
    ``info``: steps, resolution, base_model_path, extra (see :func:`lora_file_metadata`)."""
    weights = get_lora(model, name)
    meta = lora_file_metadata(model, weights, **info)
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    write_lora(weights, path, model, metadata=meta, dtype=dtype)
