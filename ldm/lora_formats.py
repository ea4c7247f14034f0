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
    """:func:`build_name_table`, computed once per model (before any adapter is injected)."""
    table = model.__dict__.get("_lora_name_table")
    if table is None:
        if any(hasattr(m, "base_layer") for m in model.modules()):
            raise LoraError("the model already holds adapters injected elsewhere; LoRA names must "
                            "be read from the plain model")
        table = build_name_table(model)
        model.__dict__["_lora_name_table"] = table
    return table


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


def parse_lora(state: dict[str, torch.Tensor], model: nn.Module, *, metadata: dict | None = None,
               source: str = "LoRA", sidecar_config: dict | None = None) -> LoraWeights:
    """Resolve a LoRA state dict of any supported layout against ``model``'s layers."""
    metadata = dict(metadata or {})
    table = name_table(model)
    parts: dict[str, dict] = {}  # our path → {"down", "up", "alpha", "names"}
    unknown, unsupported, dotted_alpha = [], {}, {}
    if not state:
        raise LoraError(f"{source}: holds no tensors")
    for key, tensor in state.items():
        kohya = _KOHYA_KEY.match(key)
        if kohya:
            name, role = kohya.group(1), {"lora_down.weight": "down", "lora_up.weight": "up",
                                          "alpha": "alpha"}[kohya.group(2)]
            ours = table.kohya.get(name)
            spelled = name
        else:
            found = _dotted_module(key)
            if found is None:
                unknown.append(key)
                continue
            spelled, role = found
            ours = table.dotted.get(spelled)
            if ours is not None and role != "alpha":
                dotted_alpha[ours] = spelled
        if ours is None:
            if spelled in table.unsupported:
                unsupported[spelled] = table.unsupported[spelled]
            else:
                unknown.append(key)
            continue
        entry = parts.setdefault(ours, {"names": set()})
        entry["names"].add(spelled)
        if role in entry:
            raise LoraError(f"{source}: two entries for the {role} weight of layer {ours} "
                            f"(spelled {_listing(sorted(entry['names']))})")
        entry[role] = tensor

    if not parts and not unsupported:
        raise LoraError(f"{source}: not a LoRA for this model: none of its {len(state)} keys name a "
                        f"LoRA layer of it (e.g. {_listing(sorted(state), 3)})" + _family_hint(unknown))
    if unsupported:
        names = sorted(unsupported)
        raise LoraError(f"{source}: {unsupported[names[0]]} (keys {_listing(names, 3)})")
    if unknown:
        raise LoraError(f"{source}: {len(unknown)} keys name no layer of this model: "
                        f"{_listing(sorted(unknown))}" + _family_hint(unknown))

    configs = _diffusers_alphas(metadata, sidecar_config)
    modules: dict[str, LoraModule] = {}
    for ours, entry in parts.items():
        label = _listing(sorted(entry["names"]), 1)
        missing = [r for r in ("down", "up") if r not in entry]
        if missing:
            raise LoraError(f"{source}: layer {label} has no {missing[0]} weight (only "
                            f"{', '.join(r for r in ('down', 'up', 'alpha') if r in entry)})")
        alpha = entry.get("alpha")
        if alpha is not None:
            if alpha.numel() != 1:
                raise LoraError(f"{source}: alpha of layer {label} has shape {list(alpha.shape)}, "
                                "expected a single number")
            alpha = float(alpha.float().item())
        elif ours in dotted_alpha:
            alpha = _alpha_for(dotted_alpha[ours], configs)
            alpha = None if alpha is None else float(alpha)
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

def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors header (other formats: empty)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100 * 1024 * 1024:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


_HASHES: dict[tuple[str, int, int], str] = {}


def lora_file_hash(path) -> str:
    """The short hash A1111 shows for a LoRA ("Lora hashes"): the first 12 hex digits of the
    sha256 of a safetensors file's tensor data (the header, which holds the metadata, is left
    out, as in kohya's additional-networks hash), or of the whole file for other formats."""
    import hashlib

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            if path.suffix.lower() == ".safetensors":
                n = int.from_bytes(f.read(8), "little")
                f.seek(8 + n)
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()[:12]
    return _HASHES[key]


def read_lora(path, model: nn.Module) -> LoraWeights:
    """Read and resolve a LoRA file (.safetensors, or a weights-only .bin/.pt/.ckpt)."""
    from .checkpoint import CheckpointError, read_state_dict

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
    weights = parse_lora(state, model, metadata=read_metadata(path), source=str(path),
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
    from .checkpoint import write_safetensors

    if not weights.modules:
        raise LoraError(f"cannot write {path}: the LoRA has no layers")
    state = kohya_state_dict(weights, model, dtype)
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    write_safetensors(path, specs, state.__getitem__, meta)
