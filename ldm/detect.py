"""Tell which Stable Diffusion family a state dict belongs to, from tensor shapes alone.

The shape rules follow ComfyUI's model detection: the cross-attention context width (768 for SD1's
CLIP ViT-L, 1024 for SD2's OpenCLIP ViT-H), a 2-D ``proj_in`` (SD2's linear projection instead of a
1×1 conv), and 9 UNet input channels (latents + mask + masked-image latents: inpainting); SDXL by
its generative-models keys, context width 2048 / 1280 and label_emb width (base / refiner). Whether an
SD2 model predicts v (Salimans & Ho 2022) cannot be read from shapes; it comes from, in order, an
explicit ``prediction`` argument, the sidecar YAML next to the file, a ``v_pred`` marker key, or the
weight-statistics heuristic ComfyUI documents. Every decision is recorded so it can be shown.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .weights_io import CheckpointError


@dataclass(frozen=True)
class Detection:
    # "sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sdxl", "sdxl-v", "sdxl-refiner",
    # "sdxl-inpaint"
    family: str
    config_name: str  # stem of the built-in config in configs/
    rules: tuple[str, ...]  # the rules that fired, in the order they were applied

    @property
    def prediction(self) -> str:
        return "v" if self.family in ("sd2-v", "sdxl-v") else "eps"


CONFIG_FOR_FAMILY = {
    "sd1": "v1-inference",
    "sd1-inpaint": "v1-inpainting-inference",
    "sd2": "v2-inference",
    "sd2-v": "v2-inference-v",
    "sd2-inpaint": "v2-inpainting-inference",
    "sdxl": "sd_xl_base",
    "sdxl-v": "sd_xl_base",  # community v-prediction fine-tunes mark themselves with a v_pred key
    "sdxl-refiner": "sd_xl_refiner",
    "sdxl-inpaint": "sd_xl_inpaint",
}

UNET = "model.diffusion_model."
CONTEXT_KEY = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
PROJ_IN_KEY = UNET + "input_blocks.1.1.proj_in.weight"
INPUT_KEY = UNET + "input_blocks.0.0.weight"
# A norm bias deep in the decoder half whose spread is larger in v-trained SD2 weights (ComfyUI).
V_PROBE_KEY = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PROBE_THRESHOLD = 0.09
FULL_SIZE_CONTEXT = {768: "sd1", 1024: "sd2"}
_BASE_NAME = {"sd1": "SD1", "sd2": "SD2"}


def sidecar_config_path(path: str | Path | None) -> Path | None:
    """``<checkpoint stem>.yaml`` next to the checkpoint, if there is one (A1111's convention)."""
    if path is None:
        return None
    path = Path(path)
    candidate = path.with_suffix(".yaml")
    return candidate if candidate != path and candidate.is_file() else None


def _short(key: str) -> str:
    return key.removeprefix(UNET)


def _base_votes(sd: Mapping[str, torch.Tensor], rules: list[str]) -> list[tuple[str, str]]:
    """(family, rule) for every piece of SD1-vs-SD2 evidence present, strongest first."""
    votes = []
    if CONTEXT_KEY in sd:
        dim = sd[CONTEXT_KEY].shape[1]
        if dim in FULL_SIZE_CONTEXT:
            base = FULL_SIZE_CONTEXT[dim]
            votes.append((base, f"context dim {dim} (attn2.to_k in_features) -> {_BASE_NAME[base]}"))
        else:
            rules.append(f"context dim {dim} (attn2.to_k in_features) is not a full-size width "
                         "-> decided by other keys")
    has_clip = any(k.startswith("cond_stage_model.transformer.") for k in sd)
    has_openclip = any(k.startswith("cond_stage_model.model.") for k in sd)
    if has_clip:
        votes.append(("sd1", "text encoder keys cond_stage_model.transformer.* -> CLIP (SD1)"))
    if has_openclip:
        votes.append(("sd2", "text encoder keys cond_stage_model.model.* -> OpenCLIP (SD2)"))
    if PROJ_IN_KEY in sd:
        if sd[PROJ_IN_KEY].dim() == 2:
            votes.append(("sd2", "proj_in is 2-D -> linear projection (SD2)"))
        else:
            votes.append(("sd1", "proj_in is 4-D -> 1x1 conv projection (SD1)"))
    return votes


def _v_prediction(sd: Mapping[str, torch.Tensor], path, prediction: str | None,
                  rules: list[str]) -> bool:
    if prediction is not None:
        rules.append(f"prediction override {prediction!r} -> "
                     f"{'v-prediction' if prediction == 'v' else 'epsilon'}")
        return prediction == "v"
    sidecar = sidecar_config_path(path)
    if sidecar is not None:
        from .config import load_config  # a broken sidecar raises ConfigError naming that file

        param = load_config(sidecar).parameterization
        rules.append(f"sidecar {sidecar.name} says parameterization {param}")
        return param == "v"
    if "v_pred" in sd:
        rules.append("file has a v_pred key -> v-prediction")
        return True
    probe = sd.get(V_PROBE_KEY)
    if probe is None:
        rules.append(f"no {_short(V_PROBE_KEY)} to test, no v_pred key -> epsilon")
        return False
    if probe.is_meta or probe.numel() < 2:
        rules.append(f"{_short(V_PROBE_KEY)} holds no values -> heuristic unavailable -> epsilon")
        return False
    std = float(probe.detach().float().std(correction=0))
    if std > V_PROBE_THRESHOLD:
        rules.append(f"std of {_short(V_PROBE_KEY)} is {std:.3f} > {V_PROBE_THRESHOLD} "
                     "-> v-prediction (heuristic)")
        return True
    rules.append(f"std of {_short(V_PROBE_KEY)} is {std:.3f} <= {V_PROBE_THRESHOLD} "
                 "-> epsilon (heuristic)")
    return False


ADM_KEY = UNET + "label_emb.0.0.weight"
SDXL_CONTEXT = {2048: "sdxl", 1280: "sdxl-refiner"}  # CLIP-L 768 + bigG 1280, or bigG alone
SDXL_ADM = {2816: "sdxl", 2560: "sdxl-refiner"}  # pooled 1280 + 6 or 5 Fourier features of 256
SDXL_TEXT = {"conditioner.embedders.0.transformer.": ("sdxl", "CLIP-L first, then bigG (base)"),
             "conditioner.embedders.0.model.": ("sdxl-refiner", "bigG alone (refiner)")}


def _detect_sdxl(sd: Mapping[str, torch.Tensor], where: str, prediction: str | None) -> Detection:
    """SDXL base, refiner or inpainting: generative-models' layout (conditioner.embedders.*,
    label_emb). Full-size widths decide; at other widths the text encoder keys do."""
    if any(k.startswith("cond_stage_model.") for k in sd):
        raise CheckpointError(f"{where}: inconsistent layout: SDXL keys (conditioner.embedders.* / "
                              "label_emb) beside an SD1/SD2 text encoder (cond_stage_model.*)")
    rules = ["conditioner.embedders.* / label_emb keys -> SDXL (generative-models layout)"]
    votes = []
    to_k = next((k for k in sd if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if to_k is not None:
        dim = sd[to_k].shape[1]
        if dim in SDXL_CONTEXT:
            votes.append((SDXL_CONTEXT[dim], f"context dim {dim} (attn2.to_k in_features) -> "
                                             f"{SDXL_CONTEXT[dim]}"))
        else:
            rules.append(f"context dim {dim} is not a full-size SDXL width -> decided by other keys")
    if ADM_KEY in sd and sd[ADM_KEY].shape[1] in SDXL_ADM:
        adm = sd[ADM_KEY].shape[1]
        votes.append((SDXL_ADM[adm], f"label_emb takes {adm} inputs -> {SDXL_ADM[adm]}"))
    for prefix, (family, what) in SDXL_TEXT.items():
        if any(k.startswith(prefix) for k in sd):
            votes.append((family, f"text encoder keys {prefix}* -> {what}"))
    if not votes:
        raise CheckpointError(f"{where}: an SDXL-style checkpoint without the context width, "
                              "label_emb or text encoder keys that tell base from refiner")
    base = votes[0][0]
    for family, rule in votes[1:]:
        if family != base:
            raise CheckpointError(f"{where}: inconsistent SDXL layout: '{votes[0][1]}' but '{rule}'")
    rules.extend(rule for _, rule in votes)
    if INPUT_KEY not in sd:
        raise CheckpointError(f"{where}: missing {INPUT_KEY}; not a complete SDXL UNet")
    channels = sd[INPUT_KEY].shape[1]
    if channels == 9 and base == "sdxl":
        rules.append("input_blocks.0.0.weight has 9 input channels -> inpainting")
        base = "sdxl-inpaint"
    elif channels != 4:
        raise CheckpointError(f"{where}: the SDXL UNet takes {channels} input channels ({INPUT_KEY}); "
                              "only 4 (and 9 for the base model's inpainting variant) are supported")
    if prediction is not None:
        rules.append(f"prediction override {prediction!r} does not change the {base} family")
    elif base == "sdxl" and "v_pred" in sd:
        rules.append("file has a v_pred key -> v-prediction")
        base = "sdxl-v"
    return Detection(family=base, config_name=CONFIG_FOR_FAMILY[base], rules=tuple(rules))


def detect(state_dict: Mapping[str, torch.Tensor], *, path: str | Path | None = None,
           prediction: str | None = None) -> Detection:
    """Family and built-in config of a CompVis-layout state dict; only tensor shapes are read, except
    for the v-prediction heuristic (which treats meta tensors as unknown)."""
    where = str(path) if path is not None else "state dict"
    if prediction not in (None, "eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    if not any(k.startswith(UNET) for k in state_dict):
        raise CheckpointError(f"{where}: not a Stable Diffusion checkpoint "
                              "(no model.diffusion_model.* keys)")
    if any(k.startswith("conditioner.embedders.") for k in state_dict) or ADM_KEY in state_dict:
        return _detect_sdxl(state_dict, where, prediction)

    rules: list[str] = []
    votes = _base_votes(state_dict, rules)
    if not votes:
        raise CheckpointError(f"{where}: cannot tell SD1 from SD2 (no cross-attention, text encoder "
                              "or proj_in keys)")
    base = votes[0][0]
    for family, rule in votes[1:]:
        if family != base:
            raise CheckpointError(f"{where}: inconsistent layout: '{votes[0][1]}' but '{rule}'; "
                                  "not an SD1 or SD2 checkpoint")
    rules.extend(rule for _, rule in votes)

    if INPUT_KEY not in state_dict:
        raise CheckpointError(f"{where}: missing {INPUT_KEY}; not a complete Stable Diffusion UNet")
    channels = state_dict[INPUT_KEY].shape[1]
    if channels == 9:
        rules.append("input_blocks.0.0.weight has 9 input channels -> inpainting")
        family = f"{base}-inpaint"
    elif channels == 4:
        rules.append("input_blocks.0.0.weight has 4 input channels -> text-to-image")
        family = base
    else:
        raise CheckpointError(f"{where}: the UNet takes {channels} input channels "
                              f"({INPUT_KEY}); only 4 (text-to-image) and 9 (inpainting) are supported")

    if family == "sd2":
        if _v_prediction(state_dict, path, prediction, rules):
            family = "sd2-v"
    elif prediction is not None:
        rules.append(f"prediction override {prediction!r} does not change the {family} family")
    return Detection(family=family, config_name=CONFIG_FOR_FAMILY[family], rules=tuple(rules))
