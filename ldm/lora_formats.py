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

SDXL: kohya ``lora_te1_`` / diffusers ``text_encoder.`` name the CLIP-L tower, ``lora_te2_`` /
``text_encoder_2.`` the bigG tower (transformers' layer names, as diffusers and kohya use them).
bigG's attention fuses q/k/v here, so its q/k/v LoRAs become one adapter on the input projection
(:func:`fuse_qkv`, exact) and are written as q, k and v again (:func:`split_qkv`).

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
from .lora_attention import fused_attention_weight
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
    diffusers: dict[str, tuple[str, str]]  # our path → (diffusers component, diffusers path)
    unsupported: dict[str, str]  # kohya/dotted names of layers we cannot adapt → why
    # SDXL's bigG attention: q/k/v names (kohya and dotted) → (our ``…attn.in_proj`` path, 0/1/2)
    fused: dict[str, tuple[str, int]] = field(default_factory=dict)
    # our ``…attn.in_proj`` path → the (component, diffusers path) and kohya name of q, k and v
    split: dict[str, tuple[tuple[str, str, str], ...]] = field(default_factory=dict)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


QKV = ("q_proj", "k_proj", "v_proj")


def _add(table: dict, name: str, ours: str) -> None:
    if table.get(name, ours) != ours:  # cannot happen for SD layouts; guards the table itself
        raise RuntimeError(f"LoRA name {name!r} would mean both {table[name]} and {ours}")
    table[name] = ours


def _add_unet(t: NameTable, model: nn.Module) -> None:
    unet = model.get_submodule(UNET_PREFIX)
    for rel, theirs in unet_module_map(unet).items():
        if not _adaptable(unet.get_submodule(rel)):
            continue
        ours = f"{UNET_PREFIX}.{rel}"
        t.diffusers[ours] = ("unet", theirs)
        t.to_kohya[ours] = kohya_lora_name("unet", theirs)
        _add(t.kohya, t.to_kohya[ours], ours)
        _add(t.kohya, "lora_unet_" + rel.replace(".", "_"), ours)  # CompVis-style kohya name
        _add(t.dotted, f"unet.{theirs}", ours)
        _add(t.dotted, theirs, ours)


def _add_text(t: NameTable, text: nn.Module, prefix: str, component: str, kohya_prefix: str,
              bare: bool, fuse_attention: bool) -> None:
    """One text tower's layers; ``bare``: also the names without a component prefix (one tower
    only); ``fuse_attention``: OpenCLIP's fused attention takes q/k/v LoRAs (SDXL)."""
    mha = {name for name, m in text.named_modules() if isinstance(m, nn.MultiheadAttention)}

    def forms(theirs: str) -> list[str]:
        out = [f"{component}.{theirs}", f"{component}.text_model.{theirs}"]
        return out + [f"text_model.{theirs}"] if bare else out

    for rel, theirs in text_module_map(text).items():
        module = text.get_submodule(rel)
        ours = f"{prefix}.{rel}"
        if rel in mha and fuse_attention:  # q/k/v → one adapter on the input projection
            parts = tuple((component, f"{theirs}.{p}", f"{kohya_prefix}text_model_{theirs}_{p}"
                           .replace(".", "_")) for p in QKV)
            t.split[f"{ours}.in_proj"] = parts
            t.diffusers[f"{ours}.in_proj"] = (component, f"{theirs}.in_proj")
            for i, (_, path, kohya) in enumerate(parts):
                for name in (kohya, *forms(path)):
                    _add(t.fused, name, (f"{ours}.in_proj", i))
            continue
        if rel in mha:  # OpenCLIP's fused attention: q/k/v/out are not separate layers here
            why = ("text-encoder attention LoRA is not supported on the OpenCLIP (SD2) text "
                   "encoder, whose attention fuses q/k/v; its MLP layers (fc1/fc2) are")
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                t.unsupported[f"{kohya_prefix}text_model_{theirs}_{proj}".replace(".", "_")] = why
                for form in forms(f"{theirs}.{proj}"):
                    t.unsupported[form] = why
            continue
        if not _adaptable(module) or (rel.rpartition(".")[0] in mha and not fuse_attention):
            continue  # MultiheadAttention reads out_proj's weight directly: an adapter would be ignored
        t.diffusers[ours] = (component, theirs)
        t.to_kohya[ours] = f"{kohya_prefix}text_model_{theirs}".replace(".", "_")
        _add(t.kohya, t.to_kohya[ours], ours)
        for form in forms(theirs):
            _add(t.dotted, form, ours)


def build_name_table(model: nn.Module) -> NameTable:
    """Names for every ``nn.Linear`` / ``nn.Conv2d`` of the UNet and the text encoder(s).

    SDXL's towers are diffusers' ``text_encoder`` (CLIP-L, kohya ``lora_te1_``) and
    ``text_encoder_2`` (bigG, ``lora_te2_``); the refiner has only the second. Must run on a model
    without injected adapters (its module paths are then the checkpoint's); :func:`name_table`
    caches the result on the model for that reason.
    """
    t = NameTable({}, {}, {}, {}, {})
    _add_unet(t, model)
    if not model.config.is_sdxl:
        _add_text(t, model.get_submodule(TEXT_PREFIX), TEXT_PREFIX, "text_encoder", "lora_te_",
                  bare=True, fuse_attention=False)
        return t
    embedders = model.config.conditioner.embedders
    towers = [i for i, e in enumerate(embedders) if e.text is not None]
    components = ["text_encoder", "text_encoder_2"][-len(towers):]
    for i, component in zip(towers, components):
        kohya = "lora_te1_" if component == "text_encoder" else "lora_te2_"
        _add_text(t, model.conditioner.embedders[i], f"conditioner.embedders.{i}", component, kohya,
                  bare=False, fuse_attention=True)
    return t


def name_table(model: nn.Module) -> NameTable:
    """:func:`build_name_table`, computed once per model (before any adapter is injected) and kept
    in its ``lora_names`` field."""
    if model.lora_names is None:
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
    for component in ("unet", "text_encoder", "text_encoder_2"):
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

    # our path (or (path, q/k/v index) for a fused attention) → {"down", "up", "alpha", "names"}
    layers: dict = field(default_factory=dict)
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
            ours = table.kohya.get(spelled, table.fused.get(spelled))
        else:
            dotted = _dotted_module(key)
            if dotted is None:
                found.unknown.append(key)
                continue
            spelled, role = dotted
            ours = table.dotted.get(spelled, table.fused.get(spelled))
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
            raise LoraError(f"{source}: two entries for the {role} weight of layer {_listing(sorted(entry['names']), 1)} "
                            f"(spelled {_listing(sorted(entry['names']))})")
        entry[role] = tensor
    return found


def _refuse_unmatched(parts: _Parts, state: dict, source: str, sdxl: bool) -> None:
    family = _other_family(parts.unknown, sdxl)
    lead = f"{source}: {family}: " if family else f"{source}: "
    if not parts.layers and not parts.unsupported:
        raise LoraError(f"{lead}not a LoRA for this model: none of its {len(state)} keys name a "
                        f"LoRA layer of it (e.g. {_listing(sorted(state), 3)})"
                        + ("" if family else _structure_hint(parts.unknown)))
    if parts.unsupported:
        names = sorted(parts.unsupported)
        raise LoraError(f"{source}: {parts.unsupported[names[0]]} (keys {_listing(names, 3)})")
    if parts.unknown:
        raise LoraError(f"{lead}{len(parts.unknown)} keys name no layer of this model: "
                        f"{_listing(sorted(parts.unknown))}"
                        + ("" if family else _structure_hint(parts.unknown)))


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
    sdxl = model.config.is_sdxl
    _refuse_unmatched(parts, state, source, sdxl)
    configs = _diffusers_alphas(metadata, sidecar_config)
    modules: dict[str, LoraModule] = {}
    fused: dict[str, dict[int, LoraModule]] = {}
    for ours, entry in parts.layers.items():
        label = _listing(sorted(entry["names"]), 1)
        missing = [r for r in ("down", "up") if r not in entry]
        if missing:
            raise LoraError(f"{source}: layer {label} has no {missing[0]} weight (only "
                            f"{', '.join(r for r in ('down', 'up', 'alpha') if r in entry)})")
        alpha = _layer_alpha(entry, parts.dotted_alpha.get(ours), configs, label, source)
        path, index = ours if isinstance(ours, tuple) else (ours, None)
        weight = _layer_weight(model, path)
        if index is not None:  # q, k or v: its rows of the fused input projection
            rows = weight.shape[0] // 3
            weight = weight[index * rows:(index + 1) * rows]
        module = _checked(weight, entry["down"], entry["up"], label, path, source,
                          "an SD1/SD2 LoRA on an SDXL model" if sdxl else
                          "an SD2 LoRA on an SD1 model, or an SDXL LoRA on SD1/SD2")
        module.alpha = alpha
        if index is None:
            modules[path] = module
        else:
            fused.setdefault(path, {})[index] = module
    for path, qkv in fused.items():
        modules[path] = fuse_qkv(qkv, _layer_weight(model, path).shape[0] // 3)
    return LoraWeights(modules, metadata, source)


def fuse_qkv(parts: dict[int, LoraModule], width: int) -> LoraModule:
    """q, k and v LoRAs (any of them) as one LoRA of the fused (3·width) input projection: the
    downs stacked, the ups block-diagonal, each scaled by its alpha/rank; the sum's delta is each
    part's delta in its rows, exactly what separate q/k/v layers (transformers) compute. Parts
    sharing one down (what we write) stay one rank-r adapter."""
    order = sorted(parts)
    ratios = {parts[i].effective_alpha / parts[i].rank for i in order}
    q = parts[order[0]]
    if len(order) == 3 and len(ratios) == 1 and all(
            parts[i].down.shape == q.down.shape and torch.equal(parts[i].down, q.down) for i in order):
        # one shared down, as :func:`split_qkv` writes a fused adapter: that adapter again
        return LoraModule(q.down, torch.cat([parts[i].up.to(q.up.dtype) for i in order]), q.alpha)
    rank = sum(parts[i].rank for i in order)
    common = ratios.pop() if len(ratios) == 1 else None
    ref = parts[order[0]].up
    up = torch.zeros(3 * width, rank, dtype=ref.dtype, device=ref.device)
    col = 0
    for i in order:
        m = parts[i]
        factor = 1.0 if common is not None else m.effective_alpha / m.rank
        up[i * width:(i + 1) * width, col:col + m.rank] = m.up.to(ref.dtype) * factor
        col += m.rank
    down = torch.cat([parts[i].down.to(parts[order[0]].down.dtype) for i in order])
    return LoraModule(down, up, common * rank if common is not None else float(rank))


def split_qkv(module: LoraModule) -> list[LoraModule]:
    """The inverse for writing: q, k and v LoRAs of a fused input projection's LoRA (the down
    shared, each part's rows of up), without the ranks whose up column is zero in that part
    (alpha adjusted so that alpha/rank is kept)."""
    width = module.up.shape[0] // 3
    out = []
    for i in range(3):
        up = module.up[i * width:(i + 1) * width]
        keep = up.abs().amax(dim=0) > 0
        if not bool(keep.any()):
            keep = torch.ones_like(keep)
        ratio = module.effective_alpha / module.rank
        out.append(LoraModule(module.down[keep], up[:, keep], ratio * int(keep.sum())))
    return out


# Names only one family has: SDXL's towers (kohya te1/te2, diffusers text_encoder_2), its depth-2+
# transformers (SD1/SD2 have one block per attention); SD1/SD2's single tower (kohya te) and the
# attention of their first UNet level (SDXL has none there).
_SDXL_ONLY = re.compile(r"^(lora_te[12]_|text_encoder_2\.)|transformer_blocks[._][1-9]")
_SD_ONLY = re.compile(r"^lora_te_|down_blocks[._]0[._]attentions|input_blocks[._][12][._]1[._]")


def _other_family(unknown: list[str], sdxl: bool) -> str:
    """What the unmatched keys say about the file's family, when they tell it."""
    if not sdxl and any(_SDXL_ONLY.search(k) for k in unknown):
        return "an SDXL LoRA (its keys name SDXL layers), and this model is SD1/SD2"
    if sdxl and any(_SD_ONLY.search(k) for k in unknown):
        return "an SD1/SD2 LoRA (its keys name SD1/SD2 layers), and this model is SDXL"
    return ""


def _structure_hint(unknown: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "unet.")) for k in unknown):
        return " (made for a model of another structure?)"
    return ""


def _base_weight(module: nn.Module) -> torch.Tensor:
    return module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight


def _layer_weight(model: nn.Module, path: str) -> torch.Tensor:
    """The weight a LoRA on ``path`` changes (a fused attention's ``in_proj`` may not be a module
    yet: see :mod:`ldm.lora_attention`)."""
    fused = fused_attention_weight(model, path)
    return fused if fused is not None else _base_weight(model.get_submodule(path))


def _checked(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, label: str, ours: str,
             source: str, example: str) -> LoraModule:
    """Bring one layer's pair into the layer's layout (1×1 convolutions may be stored 2-D and
    vice versa), or say why it does not fit."""
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
                        f"down {list(down.shape)}); e.g. {example}")
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
    """Kohya layout with diffusers-style names; alpha written for every layer (a fused attention's
    LoRA as its q, k and v parts, as kohya names bigG's layers)."""
    table = name_table(model)
    named: list[tuple[str, LoraModule]] = []
    for ours, module in sorted(weights.modules.items()):
        if ours in table.split:
            named += [(kohya, part) for (_, _, kohya), part in zip(table.split[ours], split_qkv(module))]
        elif ours in table.to_kohya:
            named.append((table.to_kohya[ours], module))
        else:
            raise LoraError(f"layer {ours} has no kohya name (not a UNet or text-encoder layer)")
    out: dict[str, torch.Tensor] = {}
    for name, module in named:
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
