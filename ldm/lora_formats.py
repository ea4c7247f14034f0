"""LoRA files: module names, key layouts, reading and writing.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") adds
``scale · alpha/rank · up @ down`` to a layer's weight. Files name the adapted layers in several ways;
all of them are resolved through one table built from the model's own ``named_modules()``:

* kohya-ss (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) with diffusers-style names
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``,
  ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``) — what we write, and what diffusers,
  A1111, ComfyUI and kohya all read — or CompVis-style names
  (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``). Underscores are ambiguous
  (``to_q`` vs ``input_blocks``), so names are never split: every module's candidate names are
  generated and looked up. 4-D weights on convolutions are kohya's LoCon (kernel-sized down, 1×1 up).
* peft / diffusers (``unet.<diffusers path>.lora_A.weight`` / ``lora_B.weight``,
  ``text_encoder.…``; alpha from diffusers' ``lora_adapter_metadata`` header or a peft
  ``adapter_config.json`` next to the file), and the older diffusers layouts ``….lora.down.weight``,
  ``…processor.to_q_lora.down.weight`` and ``…lora_linear_layer.down.weight``.

Without an alpha the scale is 1 (alpha = rank). Keys that name no module of the model are refused
by name, and a LoRA whose shapes do not fit (another family) is refused naming module and shapes.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .diffusers_names import kohya_lora_name, text_module_map, unet_module_map
from .weights_io import CheckpointError, read_safetensors_metadata, read_state_dict, write_safetensors

UNET_PREFIX = "model.diffusion_model"
TEXT_PREFIX = "cond_stage_model"


class LoraError(ValueError):
    """A LoRA file or request that does not fit the model."""


@dataclass
class LoraModule:
    """One adapted layer: ``delta W = alpha/rank · up @ down`` (convolutions: down has the layer's
    kernel, up is 1×1)."""

    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None = None  # None: alpha = rank

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def delta(self) -> torch.Tensor:
        """The full weight change at scale 1, in float32 (shaped like the layer's weight)."""
        down, up = self.down.float(), self.up.float()
        w = up.flatten(1) @ down.flatten(1)
        if down.dim() == 4:
            w = w.view(up.shape[0], *down.shape[1:])
        return w * (self.effective_alpha / self.rank)


@dataclass
class LoraWeights:
    """A LoRA resolved against a model: our module paths (in ``LatentDiffusion``) → weights."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str | None = None

    def ranks(self) -> Counter:
        return Counter(m.rank for m in self.modules.values())


# ------------------------------------------------------------------------------- the name table

@dataclass
class NameTable:
    """Every name a file may use for each LoRA-capable layer of one model."""

    kohya: dict[str, str]  # kohya name → our module path
    dotted: dict[str, str]  # "unet.<diffusers path>", "text_encoder.<path>", bare paths → ours
    to_kohya: dict[str, str]  # our path → the kohya name we write
    diffusers: dict[str, tuple[str, str]]  # our path → ("unet" | "text_encoder", diffusers path)
    unsupported: dict[str, str]  # kohya/dotted names of layers we cannot adapt → why


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def build_name_table(model: nn.Module) -> NameTable:
    """Names for every ``nn.Linear`` / ``nn.Conv2d`` of the UNet and the text encoder.

    Must run on a model without injected adapters (its module paths are then the checkpoint's);
    :func:`name_table` caches the result on the model for that reason.
    """
    kohya: dict[str, str] = {}
    dotted: dict[str, str] = {}
    to_kohya: dict[str, str] = {}
    diffusers: dict[str, tuple[str, str]] = {}
    unsupported: dict[str, str] = {}

    def add(table: dict, name: str, ours: str) -> None:
        if table.get(name, ours) != ours:  # cannot happen for SD layouts; guards the table itself
            raise RuntimeError(f"LoRA name {name!r} would mean both {table[name]} and {ours}")
        table[name] = ours

    unet = model.get_submodule(UNET_PREFIX)
    for rel, theirs in unet_module_map(unet).items():
        if not _adaptable(unet.get_submodule(rel)):
            continue
        ours = f"{UNET_PREFIX}.{rel}"
        diffusers[ours] = ("unet", theirs)
        to_kohya[ours] = kohya_lora_name("unet", theirs)
        add(kohya, to_kohya[ours], ours)
        add(kohya, "lora_unet_" + rel.replace(".", "_"), ours)  # CompVis-style kohya name
        add(dotted, f"unet.{theirs}", ours)
        add(dotted, theirs, ours)

    text = model.get_submodule(TEXT_PREFIX)
    mha = {name for name, m in text.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for rel, theirs in text_module_map(text).items():
        module = text.get_submodule(rel)
        ours = f"{TEXT_PREFIX}.{rel}"
        if rel in mha:  # OpenCLIP's fused attention: q/k/v/out are not separate layers here
            why = ("text-encoder attention LoRA is not supported on the OpenCLIP (SD2) text "
                   "encoder, whose attention fuses q/k/v; its MLP layers (fc1/fc2) are")
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                unsupported[kohya_lora_name("text_encoder", f"{theirs}.{proj}")] = why
                for form in (f"text_encoder.{theirs}.{proj}", f"text_encoder.text_model.{theirs}.{proj}"):
                    unsupported[form] = why
            continue
        if rel.rpartition(".")[0] in mha or not _adaptable(module):
            continue  # MultiheadAttention reads out_proj's weight directly: an adapter would be ignored
        diffusers[ours] = ("text_encoder", theirs)
        to_kohya[ours] = kohya_lora_name("text_encoder", theirs)
        add(kohya, to_kohya[ours], ours)
        for form in (f"text_encoder.{theirs}", f"text_encoder.text_model.{theirs}",
                     f"text_model.{theirs}"):
            add(dotted, form, ours)
    return NameTable(kohya, dotted, to_kohya, diffusers, unsupported)


def name_table(model: nn.Module) -> NameTable:
    """:func:`build_name_table`, computed once per model (before any adapter is injected) and kept
    in its ``lora_names`` field."""
    if model.lora_names is None:
        if model.config.is_sdxl:  # its two towers have no kohya/diffusers name table yet
            raise LoraError("LoRA on SDXL models is not supported yet")
        if any(hasattr(m, "base_layer") for m in model.modules()):
            raise LoraError("the model already holds adapters injected elsewhere; LoRA names must "
                            "be read from the plain model")
        model.lora_names = build_name_table(model)
    return model.lora_names


# ------------------------------------------------------------------------------------ key layouts

_KOHYA_KEY = re.compile(r"^(lora_(?:unet|te\d?)_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# dotted layouts: (pattern, role); group "m" is the module path, "p" an attention-processor part
_DOTTED_KEYS = [
    (re.compile(r"^(?P<m>.+)\.lora_A\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora_B\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+self_attn)\.(?P<p>to_q|to_k|to_v|to_out)_lora\.down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+self_attn)\.(?P<p>to_q|to_k|to_v|to_out)_lora\.up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.(?:lora|lora_linear_layer)\.down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.(?:lora|lora_linear_layer)\.up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
]
_PROCESSOR_PARTS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR_PARTS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_PEFT_PREFIX = "base_model.model."


def _dotted_module(key: str) -> tuple[str, str] | None:
    """(module name as the file spells it, role) of a dotted-layout key, or None."""
    for pattern, role in _DOTTED_KEYS:
        found = pattern.match(key)
        if found:
            module = found.group("m")
            part = found.groupdict().get("p")
            if part is not None:
                parts = _TEXT_PROCESSOR_PARTS if module.endswith("self_attn") else _PROCESSOR_PARTS
                module = f"{module}.{parts[part]}"
            return module.removeprefix(_PEFT_PREFIX), role
    return None


def _listing(items: list[str], limit: int = 5) -> str:
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _pattern_value(patterns: dict, path: str, default):
    # peft's rule: a pattern matches a module path that ends with it after a dot
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _diffusers_alphas(metadata: dict[str, str], sidecar: dict | None) -> dict[str, dict]:
    """LoraConfig fields per component ("unet", "text_encoder", "" for a bare peft file)."""
    out: dict[str, dict] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError:
            packed = {}
        for key, value in packed.items():
            component, _, name = key.partition(".")
            out.setdefault(component, {})[name] = value
    if sidecar:
        out.setdefault("", sidecar)
    return out


def _alpha_for(dotted_name: str, configs: dict[str, dict]) -> float | None:
    for component in ("unet", "text_encoder"):
        if dotted_name.startswith(component + ".") and component in configs:
            cfg = configs[component]
            inner = dotted_name[len(component) + 1:]
            return _pattern_value(cfg.get("alpha_pattern"), inner, cfg.get("lora_alpha"))
    if "" in configs:
        cfg = configs[""]
        return _pattern_value(cfg.get("alpha_pattern"), dotted_name, cfg.get("lora_alpha"))
    return None


_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


@dataclass
class _Parts:
    """A LoRA state dict sorted by our layer paths."""

    layers: dict[str, dict] = field(default_factory=dict)  # our path → {"down", "up", "alpha", "names"}
    unknown: list[str] = field(default_factory=list)  # keys that name no layer
    unsupported: dict[str, str] = field(default_factory=dict)  # spelled name → why not
    dotted_alpha: dict[str, str] = field(default_factory=dict)  # our path → its dotted name


BUNDLED_EMBEDDING = "bundle_emb."  # A1111: bundle_emb.<word>.string_to_param.* / .emb_params


def _sorted_parts(state: dict[str, torch.Tensor], table: NameTable, source: str) -> _Parts:
    found = _Parts()
    for key, tensor in state.items():
        if key.startswith(BUNDLED_EMBEDDING):  # A1111's embeddings inside a LoRA: not layers
            continue
        kohya = _KOHYA_KEY.match(key)
        if kohya:
            spelled, role = kohya.group(1), _KOHYA_ROLES[kohya.group(2)]
            ours = table.kohya.get(spelled)
        else:
            dotted = _dotted_module(key)
            if dotted is None:
                found.unknown.append(key)
                continue
            spelled, role = dotted
            ours = table.dotted.get(spelled)
            if ours is not None and role != "alpha":
                found.dotted_alpha[ours] = spelled
        if ours is None:
            if spelled in table.unsupported:
                found.unsupported[spelled] = table.unsupported[spelled]
            else:
                found.unknown.append(key)
            continue
        entry = found.layers.setdefault(ours, {"names": set()})
        entry["names"].add(spelled)
        if role in entry:
            raise LoraError(f"{source}: two entries for the {role} weight of layer {ours} "
                            f"(spelled {_listing(sorted(entry['names']))})")
        entry[role] = tensor
    return found


def _refuse_unmatched(parts: _Parts, state: dict, source: str) -> None:
    if not parts.layers and not parts.unsupported:
        raise LoraError(f"{source}: not a LoRA for this model: none of its {len(state)} keys name a "
                        f"LoRA layer of it (e.g. {_listing(sorted(state), 3)})"
                        + _family_hint(parts.unknown))
    if parts.unsupported:
        names = sorted(parts.unsupported)
        raise LoraError(f"{source}: {parts.unsupported[names[0]]} (keys {_listing(names, 3)})")
    if parts.unknown:
        raise LoraError(f"{source}: {len(parts.unknown)} keys name no layer of this model: "
                        f"{_listing(sorted(parts.unknown))}" + _family_hint(parts.unknown))


def _layer_alpha(entry: dict, dotted_name: str | None, configs: dict, label: str,
                 source: str) -> float | None:
    alpha = entry.get("alpha")
    if alpha is not None:
        if alpha.numel() != 1:
            raise LoraError(f"{source}: alpha of layer {label} has shape {list(alpha.shape)}, "
                            "expected a single number")
        return float(alpha.float().item())
    if dotted_name is not None:
        alpha = _alpha_for(dotted_name, configs)
        return None if alpha is None else float(alpha)
    return None


def parse_lora(state: dict[str, torch.Tensor], model: nn.Module, *, metadata: dict | None = None,
               source: str = "LoRA", sidecar_config: dict | None = None) -> LoraWeights:
    """Resolve a LoRA state dict of any supported layout against ``model``'s layers."""
    metadata = dict(metadata or {})
    table = name_table(model)
    if not state:
        raise LoraError(f"{source}: holds no tensors")
    parts = _sorted_parts(state, table, source)
    _refuse_unmatched(parts, state, source)
    configs = _diffusers_alphas(metadata, sidecar_config)
    modules: dict[str, LoraModule] = {}
    for ours, entry in parts.layers.items():
        label = _listing(sorted(entry["names"]), 1)
        missing = [r for r in ("down", "up") if r not in entry]
        if missing:
            raise LoraError(f"{source}: layer {label} has no {missing[0]} weight (only "
                            f"{', '.join(r for r in ('down', 'up', 'alpha') if r in entry)})")
        alpha = _layer_alpha(entry, parts.dotted_alpha.get(ours), configs, label, source)
        module = _checked(model.get_submodule(ours), entry["down"], entry["up"], label, ours, source)
        module.alpha = alpha
        modules[ours] = module
    return LoraWeights(modules, metadata, source)


def _family_hint(unknown: list[str]) -> str:
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in unknown):
        return " (an SDXL LoRA? this model is SD1/SD2)"
    if any(k.startswith("lora_unet_") for k in unknown):
        return " (made for a model of another structure?)"
    return ""


def _base_weight(module: nn.Module) -> torch.Tensor:
    return module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight


def _checked(module: nn.Module, down: torch.Tensor, up: torch.Tensor, label: str, ours: str,
             source: str) -> LoraModule:
    """Bring one layer's pair into the layer's layout (1×1 convolutions may be stored 2-D and
    vice versa), or say why it does not fit."""
    weight = _base_weight(module)
    conv = weight.dim() == 4
    if conv and down.dim() == 2 and tuple(weight.shape[2:]) == (1, 1):
        down, up = down[:, :, None, None], up[:, :, None, None]
    if not conv and down.dim() == 4 and tuple(down.shape[2:]) == (1, 1) and up.dim() == 4:
        down, up = down.flatten(1), up.flatten(1)
    if down.dim() != weight.dim() or up.dim() != weight.dim():
        raise LoraError(f"{source}: layer {label} ({ours}) has a {weight.dim()}-D weight "
                        f"{list(weight.shape)} but the LoRA's weights are down {list(down.shape)}, "
                        f"up {list(up.shape)}")
    if up.shape[1] != down.shape[0]:
        raise LoraError(f"{source}: layer {label}: up {list(up.shape)} and down {list(down.shape)} "
                        "disagree on the rank")
    fits = up.shape[0] == weight.shape[0] and down.shape[1] == weight.shape[1]
    if conv:
        fits = fits and tuple(down.shape[2:]) == tuple(weight.shape[2:]) and tuple(up.shape[2:]) == (1, 1)
    if not fits:
        their = [int(up.shape[0]), int(down.shape[1]), *map(int, down.shape[2:])]
        raise LoraError(f"{source}: made for a different model: layer {label} ({ours}) has weight "
                        f"{list(weight.shape)} here but {their} in the LoRA (up {list(up.shape)}, "
                        f"down {list(down.shape)}); e.g. an SD2 LoRA on an SD1 model")
    return LoraModule(down, up)


# ------------------------------------------------------------------------------ files in and out

def read_lora(path, model: nn.Module) -> LoraWeights:
    """Read and resolve a LoRA file (.safetensors, or a weights-only .bin/.pt/.ckpt)."""
    path = Path(path)
    try:
        state = read_state_dict(path)
    except CheckpointError as exc:
        raise LoraError(f"LoRA {exc}") from None
    sidecar = None
    config_file = path.with_name("adapter_config.json")
    if config_file.is_file():  # a peft adapter folder
        try:
            sidecar = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LoraError(f"{config_file}: not readable JSON ({exc})") from None
    weights = parse_lora(state, model, metadata=read_safetensors_metadata(path), source=str(path),
                         sidecar_config=sidecar)
    for module in weights.modules.values():  # own the data: the file's map is released
        module.down, module.up = module.down.clone(), module.up.clone()
    return weights


def kohya_state_dict(weights: LoraWeights, model: nn.Module, dtype: torch.dtype = torch.float32
                     ) -> dict[str, torch.Tensor]:
    """Kohya layout with diffusers-style names; alpha written for every layer."""
    table = name_table(model)
    out: dict[str, torch.Tensor] = {}
    for ours, module in sorted(weights.modules.items()):
        name = table.to_kohya.get(ours)
        if name is None:
            raise LoraError(f"layer {ours} has no kohya name (not a UNet or text-encoder layer)")
        out[f"{name}.lora_down.weight"] = module.down.detach().to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = module.up.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(module.effective_alpha, dtype=torch.float32)
    return out


def write_lora(weights: LoraWeights, path, model: nn.Module, *, metadata: dict | None = None,
               dtype: torch.dtype = torch.float32) -> None:
    """Write a kohya-format safetensors file atomically (temporary file, then rename)."""
    if not weights.modules:
        raise LoraError(f"cannot write {path}: the LoRA has no layers")
    state = kohya_state_dict(weights, model, dtype)
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    write_safetensors(path, specs, state.__getitem__, meta)
