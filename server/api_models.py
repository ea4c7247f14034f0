"""Request and response bodies of the A1111 API: its field names and defaults, in one place.

Each request field says, in its annotation, what it becomes for our pipeline (``Ours``) or when its
value is one we cannot honour because it would change the image (``Refuse``); the server derives the
pipeline's keyword arguments and its 422 answers from these markers, so there is no second list of
parameters to drift from this one. Fields with neither marker are accepted and do not change the
image (saving options, hires settings while ``enable_hr`` is false...); unknown fields are accepted
too, as A1111 does, since clients send their own extras.

Deliberate difference: ``width``/``height`` default to the loaded model's own size rather than
A1111's fixed 512 (which is SD1's size); clients that send them get exactly what they ask for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Ours:
    """The pipeline keyword this field becomes."""
    name: str


@dataclass(frozen=True)
class Refuse:
    """A value for which the request is refused (422 naming the field): ``when(value)`` is true."""
    when: Callable[[Any], bool]
    why: str


def _positive(v) -> bool:
    return v is not None and v > 0


def _true(v) -> bool:
    return bool(v)


def _set(v) -> bool:
    return v not in (None, "", [], {})


def _not_one(v) -> bool:
    return v is not None and float(v) != 1.0


class _Generation(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: Annotated[str, Ours("prompt")] = ""
    negative_prompt: Annotated[str, Ours("negative_prompt")] = ""
    styles: Annotated[list[str] | None, Refuse(_set, "saved prompt styles are not available")] = None
    seed: int = -1  # -1: random; image i of the request uses seed + i
    subseed: int = -1  # the variation seed; -1: random (used when subseed_strength > 0)
    subseed_strength: Annotated[float, Ours("subseed_strength"), Field(ge=0, le=1)] = 0.0
    seed_resize_from_h: Annotated[int, Ours("seed_resize_from_h")] = -1  # on when both are > 0
    seed_resize_from_w: Annotated[int, Ours("seed_resize_from_w")] = -1
    sampler_name: str | None = None  # with scheduler: see server.a1111.sampler_choice
    scheduler: str | None = None
    sampler_index: str = "Euler"  # deprecated: used when sampler_name is missing
    batch_size: Annotated[int, Ours("num_images"), Field(ge=1)] = 1
    n_iter: int = Field(1, ge=1)
    steps: Annotated[int, Ours("num_inference_steps"), Field(ge=1)] = 50
    cfg_scale: Annotated[float, Ours("guidance_scale"), Field(ge=0)] = 7.0
    width: Annotated[int | None, Ours("width"), Field(ge=8)] = None
    height: Annotated[int | None, Ours("height"), Field(ge=8)] = None
    restore_faces: Annotated[bool | None, Refuse(_true, "face restoration is not available")] = None
    tiling: Annotated[bool | None, Refuse(_true, "tiling is not available")] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None  # see server.a1111.pipeline_eta
    s_min_uncond: Annotated[float | None, Refuse(_positive, "s_min_uncond is not available")] = None
    s_churn: Annotated[float | None, Refuse(_positive, "sigma churn is not available")] = None
    s_tmax: float | None = None  # only used with s_churn
    s_tmin: float | None = None
    s_noise: Annotated[float | None, Refuse(_not_one, "only s_noise 1 is available")] = None
    override_settings: dict[str, Any] | None = None  # sd_model_checkpoint, CLIP_stop_at_last_layers
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Annotated[str | None, Refuse(_set, "refiner models are not available")] = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False  # true: <lora:...> tags are removed, not applied
    firstpass_image: Annotated[str | None, Refuse(_set, "first-pass images are not available")] = None
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    script_name: Annotated[str | None, Refuse(_set, "scripts are not available")] = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False  # nothing is written on the server
    alwayson_scripts: dict[str, Any] = {}  # ControlNet: {"args": [unit, ...]}
    infotext: Annotated[str | None, Refuse(_set, "reading settings from infotext is not "
                                                 "available; send the fields")] = None


class Txt2ImgRequest(_Generation):
    # hires fix (pipelines.hires.HiresFix, built by server.jobs): used when enable_hr is true
    enable_hr: bool = False
    denoising_strength: float = Field(0.75, ge=0, le=1)  # of the second pass
    firstphase_width: int = 0  # pre-1.0 fields, no longer read by A1111 either
    firstphase_height: int = 0
    hr_scale: float = Field(2.0, ge=1, le=8)
    hr_upscaler: str | None = None  # None: "Latent"
    hr_second_pass_steps: int = Field(0, ge=0)  # 0: the first pass's steps
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    hr_checkpoint_name: str | None = None  # only "Use same checkpoint"
    hr_sampler_name: str | None = None  # None / "Use same sampler": the first pass's
    hr_scheduler: str | None = None
    hr_prompt: str = ""  # "": the first pass's prompt
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Generation):
    init_images: list[str] | None = None  # base64 PNG/JPEG (data: URLs too); one image
    resize_mode: int = Field(0, ge=0, le=3)  # just resize, crop and resize, resize and fill
    denoising_strength: Annotated[float, Ours("strength"), Field(ge=0, le=1)] = 0.75
    image_cfg_scale: float | None = None  # instruct-pix2pix models only
    mask: str | None = None  # white = repaint: inpainting
    mask_blur_x: int = Field(4, ge=0)
    mask_blur_y: int = Field(4, ge=0)
    mask_blur: Annotated[int | None, Ours("mask_blur"), Field(ge=0)] = None
    mask_round: bool = True
    inpainting_fill: int = Field(0, ge=0, le=3)  # fill, original, latent noise, latent nothing
    inpaint_full_res: bool = True  # "only masked"
    inpaint_full_res_padding: int = Field(0, ge=0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: Annotated[float | None, Refuse(_not_one, "only 1 is available")] = None
    latent_mask: Annotated[str | None, Refuse(_set, "a separate latent mask is not available")] = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: list[str] | None = None
    parameters: dict[str, Any]
    info: str


class PNGInfoRequest(BaseModel):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any] = {}
    parameters: dict[str, Any] = {}


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


class ControlNetUnitRequest(BaseModel):
    """One ``alwayson_scripts.ControlNet.args`` entry, as sd-webui-controlnet's API names it."""
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    enabled: bool = True
    image: str | dict[str, Any] | None = None  # base64, or {"image": ..., "mask": ...}
    input_image: str | None = None  # older name of image
    mask: str | None = None
    module: str = "none"
    model: str = "None"
    weight: float = Field(1.0, ge=0)
    resize_mode: str | int = "Crop and Resize"
    low_vram: bool = False
    processor_res: int = -1  # our preprocessors work at the hint's own size
    threshold_a: float = -1  # -1: the preprocessor's default
    threshold_b: float = -1
    guidance_start: float = Field(0.0, ge=0, le=1)
    guidance_end: float = Field(1.0, ge=0, le=1)
    control_mode: str | int = "Balanced"
    pixel_perfect: bool = False


def markers(model: type[BaseModel], kind: type) -> dict[str, Any]:
    """field name → its ``kind`` marker (``Ours`` or ``Refuse``) for the fields that have one."""
    out = {}
    for name, info in model.model_fields.items():
        for meta in info.metadata:
            if isinstance(meta, kind):
                out[name] = meta
    return out


def pipeline_arguments(request: _Generation) -> dict[str, Any]:
    """The pipeline keywords the request's ``Ours`` fields give (None values left out)."""
    values = {ours.name: getattr(request, field)
              for field, ours in markers(type(request), Ours).items()}
    return {k: v for k, v in values.items() if v is not None}


def refused_field(request: BaseModel) -> tuple[str, str] | None:
    """The first (field, reason) whose value cannot be honoured, or None."""
    for field, refuse in markers(type(request), Refuse).items():
        if refuse.when(getattr(request, field)):
            return field, refuse.why
    return None
