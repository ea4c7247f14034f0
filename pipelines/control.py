"""ControlNet units in a generation: what a unit asks for, its hint image fitted to the canvas, and
the residuals of all units at one denoising step.

The behaviour is sd-webui-controlnet's and diffusers' (``StableDiffusionControlNetPipeline``):

- a unit is active at step ``i`` of ``n`` unless ``i/n < guidance_start`` or ``(i+1)/n >
  guidance_end`` (diffusers' ``controlnet_keep``); the residuals of the active units are summed;
- *balanced*: every residual times the weight, both halves of the guidance batch;
- *prompt* ("My prompt is more important"): residual ``k`` of ``n`` times
  ``weight · 0.825^(n−1−k)`` (A1111's soft injection; for SD's 13 residuals ``0.825^(12−k)``);
- *control* ("ControlNet is more important", diffusers' ``guess_mode``): the ControlNet sees only
  the conditional half, the unconditional half gets no residual, and residual ``k`` is scaled by
  ``weight · 10^(k/(n−1) − 1)`` (diffusers' ``logspace(-1, 0, n)``; A1111's 0.825 per level is
  within 0.05 % of it).

A unit whose weight is 0, or whose window never opens, is not run at all, so the image is the one
made without it, bit for bit.

On SDXL the ControlNet gets the UNet's vector conditioning ``y`` beside the context, row for row
(diffusers' ``StableDiffusionXLControlNetPipeline`` passes the UNet's ``added_cond_kwargs``; in
guess mode the conditional half of both).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .validate import check_number

CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "control": "ControlNet is more important"}
RESIZE_MODES = {"just_resize": "Just Resize", "crop_and_resize": "Crop and Resize",
                "resize_and_fill": "Resize and Fill"}
PROMPT_DECAY = 0.825  # A1111's soft-injection factor per residual
CONTROL_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin")


def _choice(value, table: dict, what: str) -> str:
    """``value`` as a key of ``table``: our name, or A1111's label (any case, spaces or _)."""
    if isinstance(value, str):
        key = value.strip().lower().replace(" ", "_").replace("-", "_")
        if key in table:
            return key
        for name, label in table.items():
            if value.strip().lower() == label.lower():
                return name
    raise ValueError(f"{what} must be one of {', '.join(table)}, got {value!r}")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet in a generation.

    ``model``: a loaded :class:`ldm.modules.controlnet.ControlNet`, or a ControlNet file, folder or
    shipped name for the pipeline to load. ``image``: the hint (an edge map, depth map, pose...),
    or a picture for ``preprocessor`` to turn into one. ``weight`` ≥ 0 scales the residuals;
    ``guidance_start``/``guidance_end``: the fraction of the steps where the unit acts.
    ``control_mode``: balanced | prompt | control; ``resize_mode``: just_resize | crop_and_resize |
    resize_and_fill (how the hint is fitted to the image size, as A1111 does; diffusers' pipelines
    just resize). ``preprocessor``: a name of ``pipelines.annotators.PREPROCESSORS``, with
    ``preprocessor_params`` (e.g. ``{"low_threshold": 100}``); it runs on the fitted hint."""

    model: object
    image: Image.Image
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "balanced"
    resize_mode: str = "crop_and_resize"
    preprocessor: str = "none"
    preprocessor_params: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.image, Image.Image):
            raise ValueError(f"control image must be a PIL.Image.Image, got {type(self.image).__name__}")
        if not isinstance(self.model, (str, Path, torch.nn.Module)):
            raise ValueError("control model must be a ControlNet, a file path or a shipped name, "
                             f"got {type(self.model).__name__}")
        check_number(self.weight, "control weight", 0)
        check_number(self.guidance_start, "control guidance_start", 0, 1)
        check_number(self.guidance_end, "control guidance_end", 0, 1)
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"control guidance_start ({self.guidance_start}) is after guidance_end "
                             f"({self.guidance_end})")
        object.__setattr__(self, "control_mode", _choice(self.control_mode, CONTROL_MODES,
                                                         "control_mode"))
        object.__setattr__(self, "resize_mode", _choice(self.resize_mode, RESIZE_MODES,
                                                        "resize_mode"))
        name = str(self.preprocessor or "none").strip().lower()
        params = dict(self.preprocessor_params or {})
        if name != "none" or params:
            from . import annotators  # cheap: OpenCV loads when a preprocessor runs

            params = annotators.check(name, params)
        object.__setattr__(self, "preprocessor", name)
        object.__setattr__(self, "preprocessor_params", params)

    def active(self, step: int, total: int) -> bool:
        """Whether the unit acts at ``step`` of ``total`` (diffusers' ``controlnet_keep``)."""
        if self.weight == 0 or total == 0:
            return False
        return not (step / total < self.guidance_start or (step + 1) / total > self.guidance_end)


def as_units(control) -> tuple[ControlUnit, ...]:
    """None, one unit or a list of units → a tuple of units."""
    if control is None:
        return ()
    units = (control,) if isinstance(control, ControlUnit) else tuple(control)
    for unit in units:
        if not isinstance(unit, ControlUnit):
            raise ValueError(f"control must be ControlUnit(s), got {type(unit).__name__}")
    return units


# ------------------------------------------------------------------ hints
def fit_hint(image: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """The hint at the image size: stretched (*just resize*, diffusers' Lanczos resize), scaled to
    cover and centre-cropped (*crop and resize*), or scaled to fit and padded with the median colour
    of its border (*resize and fill*), as sd-webui-controlnet fits hints."""
    image = image.convert("RGB")
    if image.size == (width, height) or resize_mode == "just_resize":
        return image.resize((width, height), Image.LANCZOS)  # PIL returns a copy at the same size
    w, h = image.size
    cover = resize_mode == "crop_and_resize"
    k = max(width / w, height / h) if cover else min(width / w, height / h)
    new_w, new_h = max(1, round(w * k)), max(1, round(h * k))
    scaled = image.resize((new_w, new_h), Image.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    if cover:
        return scaled.crop((left, top, left + width, top + height))
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    fill = tuple(int(c) for c in np.median(border, axis=0))
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(scaled, (-left, -top))
    return canvas


def prepare_hint(unit: ControlUnit, width: int, height: int) -> Image.Image:
    """The unit's hint fitted to the canvas, then preprocessed at that size (A1111's pixel
    perfect: the annotator sees exactly the pixels the ControlNet will)."""
    image = fit_hint(unit.image, width, height, unit.resize_mode)
    if unit.preprocessor != "none":
        from . import annotators

        image = annotators.run(unit.preprocessor, image, **unit.preprocessor_params)
        if image.size != (width, height):  # tile_resample makes a smaller image
            image = image.resize((width, height), Image.LANCZOS)
    return image.convert("RGB")


def hint_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1], as diffusers' control image processor gives it."""
    array = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def residual_scales(mode: str, count: int, weight: float) -> torch.Tensor:
    """Per-residual factors (the last one is the middle block's)."""
    if mode == "prompt":
        return torch.tensor([weight * PROMPT_DECAY ** (count - 1 - k) for k in range(count)])
    if mode == "control":
        return torch.logspace(-1, 0, count) * weight
    return torch.full((count,), float(weight))


# ------------------------------------------------------------------ the residuals of a step
@dataclass
class PreparedUnit:
    unit: ControlUnit
    net: torch.nn.Module  # ControlNet, on the pipeline's device and dtype
    hint: torch.Tensor  # (B, 3, H, W): one row per image of the batch
    scales: torch.Tensor  # one factor per residual

    @property
    def cond_only(self) -> bool:
        return self.unit.control_mode == "control"

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  copies: int, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Residuals with one row per row of ``context`` (``copies`` conditionings of ``x``);
        ``y``: SDXL's vector conditioning, in the rows of ``context``."""
        extra = {} if y is None else {"y": y}
        if self.cond_only and copies > 1:  # the conditional half only; zeros for the rest
            rows = x.shape[0]
            if y is not None:
                extra["y"] = y[-rows:]
            out = self.net(x, self.hint, t, context[-rows:], **extra)
            zero = [torch.zeros_like(r) for r in out]
            return [torch.cat([z] * (copies - 1) + [r * s]) for z, r, s in zip(zero, out, self.scales)]
        hint = torch.cat([self.hint] * copies) if copies > 1 else self.hint
        out = self.net(torch.cat([x] * copies) if copies > 1 else x, hint, t, context, **extra)
        return [r * s for r, s in zip(out, self.scales)]


@dataclass
class ControlStack:
    """All units of a generation, applied at each denoising step."""

    units: list[PreparedUnit]
    total: int  # steps that run

    def residuals(self, step: int, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  y: torch.Tensor | None = None) -> list[torch.Tensor] | None:
        """The summed residuals of the units active at ``step``, or None when none is; ``y``:
        SDXL's vector conditioning (one row per row of ``context``), None for SD1/SD2."""
        copies = context.shape[0] // x.shape[0]
        summed = None
        for prepared in self.units:
            if not prepared.unit.active(step, self.total):
                continue
            out = prepared.residuals(x, t, context, copies, y)
            summed = out if summed is None else [a + b for a, b in zip(summed, out)]
        return summed


def prepare_units(units, nets: list[torch.nn.Module], width: int, height: int, batch: int,
                  device, dtype) -> list[PreparedUnit]:
    """Fit each unit's hint to the canvas and repeat it for the batch."""
    prepared = []
    for unit, net in zip(units, nets):
        hint = hint_tensor(prepare_hint(unit, width, height)).repeat_interleave(batch, 0)
        count = len(net.zero_convs) + 1
        prepared.append(PreparedUnit(unit, net, hint.to(device=device, dtype=dtype),
                                     residual_scales(unit.control_mode, count, unit.weight)))
    return prepared


# ------------------------------------------------------------------ files and the PNG text
def find_controlnet(spec, search_dirs=()) -> Path:
    """A ControlNet file or folder: ``spec`` as a path, else a name (with or without its suffix)
    in ``search_dirs`` and then among the shipped weights."""
    from ldm.resources import shipped_file

    path = Path(spec).expanduser()
    if path.exists():
        return path
    dirs = [Path(d).expanduser() for d in search_dirs] + [shipped_file("weights", "x").parent]
    for folder in dirs:
        for name in [str(spec)] + [f"{spec}{suffix}" for suffix in CONTROL_SUFFIXES]:
            if (folder / name).exists():
                return folder / name
    where = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(f"ControlNet {spec!r} not found (not a path, nor a name in {where})")


def describe_unit(unit: ControlUnit, model_label: str) -> str:
    """A unit as A1111 records it in the PNG parameters (``ControlNet i: "…"``)."""
    from .images import _num

    fields = [("Module", unit.preprocessor), ("Model", model_label), ("Weight", _num(unit.weight)),
              ("Resize Mode", RESIZE_MODES[unit.resize_mode])]
    values = list(unit.preprocessor_params.values())
    if values:
        fields.append(("Threshold A", _num(values[0])))
    if len(values) > 1:
        fields.append(("Threshold B", _num(values[1])))
    fields += [("Guidance Start", _num(unit.guidance_start)),
               ("Guidance End", _num(unit.guidance_end)), ("Pixel Perfect", "True"),
               ("Control Mode", CONTROL_MODES[unit.control_mode])]
    return ", ".join(f"{k}: {v}" for k, v in fields)
