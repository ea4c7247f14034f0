"""A1111 generation requests → jobs for the worker, and their results → A1111 answers.

Everything a request can get wrong is checked here, on the HTTP side, before the job is queued:
refused fields, sampler names, sizes against the limits, images decoded, LoRA and ControlNet names
resolved. The job itself only runs the pipeline: ``n_iter`` batches of ``batch_size`` images, batch
``k`` seeded ``seed + k·batch_size`` so that image ``i`` uses ``seed + i`` as in A1111.
"""
from __future__ import annotations

import base64
import io
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import a1111
from .api_models import (ControlNetUnitRequest, Img2ImgRequest, Txt2ImgRequest, pipeline_arguments,
                         refused_field)
from .security import Refused, decode_image

_LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)
_RESIZE = {0: "just_resize", 1: "crop_and_resize", 2: "resize_and_fill"}
_CONTROL_RESIZE = {0: "just_resize", 1: "crop_and_resize", 2: "resize_and_fill",
                   "scale to fit (inner fit)": "crop_and_resize",
                   "envelope (outer fit)": "resize_and_fill"}
_CONTROL_MODE = {0: "balanced", 1: "prompt", 2: "control"}


@dataclass
class Plan:
    """A checked request, ready to run: the pipeline call of each batch and what the answer says."""
    mode: str  # txt2img | img2img | inpaint | inpaint_masked
    kwargs: dict  # pipeline keywords shared by every batch
    n_iter: int
    batch_size: int
    seed: int
    sampler: str
    schedule: str
    checkpoint: Path
    clip_skip: int
    subseed: int | None = None  # image i's variation seed is subseed + i, as its seed
    loras: list[tuple[Path, float, str]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # infotext fields the request adds
    inputs: dict = field(default_factory=dict)  # image, mask (and only-masked settings)


@dataclass
class Outcome:
    images: list  # PIL
    parameters: list[dict]
    interrupted: bool
    model_name: str
    model_path: str


def split_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """``<lora:name:weight>`` tags taken out of a prompt, as A1111 reads them (weight default 1)."""
    found = []

    def take(m):
        args = [a for a in m.group(2).split(":")[1:]]
        weights = [float(a) for a in args if a.strip()] or [1.0]
        if len(set(weights)) > 1:
            raise Refused(422, f"prompt: {m.group(0)} gives the text encoder and the UNet different "
                          "weights; only one weight is available")
        found.append((m.group(1).strip(), weights[0]))
        return ""

    try:
        text = _LORA_TAG.sub(take, prompt)
    except ValueError:
        raise Refused(422, "prompt: a <lora:name:weight> tag has a weight that is not a number") from None
    return text, found


def plan_request(server, req: Txt2ImgRequest | Img2ImgRequest, mode: str) -> Plan:
    """Check a request and turn it into a :class:`Plan` (raises :class:`Refused`)."""
    refused = refused_field(req)
    if refused:
        raise Refused(422, f"{refused[0]}: {refused[1]}")
    override = req.override_settings or {}
    check_settings(override, "override_settings.")
    settings = {**server.options, **override}
    try:
        sampler, schedule, ours = a1111.sampler_choice(req.sampler_name or req.sampler_index,
                                                       req.scheduler)
        eta = req.eta  # unset: the options' eta for DDIM / ancestral samplers, as in A1111
        if eta is None:
            eta = settings.get("eta_ddim" if sampler == "DDIM" else "eta_ancestral")
        eta = a1111.pipeline_eta(sampler, eta)
    except a1111.Unsupported as exc:
        raise Refused(422, str(exc)) from None
    checkpoint = server.checkpoint  # the model switched by POST /options when the job was queued
    if "sd_model_checkpoint" in override:
        checkpoint = server.checkpoints.resolve(override["sd_model_checkpoint"],
                                                "override_settings.sd_model_checkpoint")
    clip_skip = _clip_skip(settings.get("CLIP_stop_at_last_layers", 1))
    kwargs = pipeline_arguments(req)
    kwargs.update(scheduler=ours, eta=eta, clip_skip=clip_skip, progress=False)
    server.limits.check(width=req.width or 0, height=req.height or 0,
                        images=req.batch_size * req.n_iter, steps=req.steps)
    seed = secrets.randbelow(2**32) if req.seed is None or req.seed < 0 else req.seed
    if not (req.seed_resize_from_h > 0 and req.seed_resize_from_w > 0):  # A1111: both, or off
        kwargs["seed_resize_from_h"] = kwargs["seed_resize_from_w"] = 0
    plan = Plan(mode, kwargs, req.n_iter, req.batch_size, seed, sampler, schedule, checkpoint,
                clip_skip)
    if req.subseed_strength > 0:
        plan.subseed = secrets.randbelow(2**32) if req.subseed < 0 else req.subseed
    prompt, tags = split_loras(req.prompt)
    if tags and not req.disable_extra_networks:
        if server.loras is None:
            raise Refused(422, "prompt: <lora:...> tags need the server started with --lora-dir")
        plan.loras = [(server.loras.resolve(name, "prompt <lora:...>"), w, name) for name, w in tags]
    plan.kwargs["prompt"] = prompt
    plan.extra["prompt"] = req.prompt  # the infotext keeps the tags, as A1111's does
    if mode == "txt2img" and req.enable_hr:
        plan.kwargs["hires"] = _hires(server, req, sampler)
    units = control_units(server, req.alwayson_scripts)
    if units:
        plan.kwargs["control"] = units
    if mode == "img2img":
        _plan_img2img(server, req, plan)
    return plan


def _hires(server, req: Txt2ImgRequest, sampler: str):
    """The second pass of A1111's hires fix from the ``hr_*`` fields."""
    from pipelines.hires import UPSCALERS, HiresFix

    if req.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        raise Refused(422, "hr_checkpoint_name: another checkpoint for the second pass is not "
                      "available")
    upscaler = req.hr_upscaler or "Latent"
    if upscaler not in UPSCALERS:
        raise Refused(422, f"hr_upscaler: {upscaler!r} is not available; choose one of "
                      f"{', '.join(UPSCALERS)}")
    ours = None
    same = (None, "", "Use same sampler", "Use same scheduler")
    if req.hr_sampler_name not in same or req.hr_scheduler not in same:
        name = sampler if req.hr_sampler_name in same else req.hr_sampler_name
        schedule = None if req.hr_scheduler in same else req.hr_scheduler
        try:
            ours = a1111.sampler_choice(name, schedule)[2]
        except a1111.Unsupported as exc:
            raise Refused(422, f"hr_{exc}") from None
    server.limits.check(width=0, height=0, images=1, steps=req.hr_second_pass_steps)
    return HiresFix(scale=req.hr_scale, resize_x=req.hr_resize_x, resize_y=req.hr_resize_y,
                    upscaler=upscaler, denoising_strength=req.denoising_strength,
                    steps=req.hr_second_pass_steps, sampler=ours,
                    prompt=split_loras(req.hr_prompt)[0] or None,
                    negative_prompt=req.hr_negative_prompt or None)


def check_settings(settings: dict, where: str = "") -> None:
    """Options that would change images in ways not available here (others are kept, unused)."""
    if "CLIP_stop_at_last_layers" in settings:
        _clip_skip(settings["CLIP_stop_at_last_layers"])
    if settings.get("sd_vae") not in (None, "Automatic", "None"):
        raise Refused(422, f"{where}sd_vae: a separate VAE is not available; use \"Automatic\"")
    if settings.get("eta_noise_seed_delta") not in (None, 0):
        raise Refused(422, f"{where}eta_noise_seed_delta: only 0 is available")


def _clip_skip(value) -> int:
    try:
        layers = int(value)
    except (TypeError, ValueError):
        raise Refused(422, f"CLIP_stop_at_last_layers: expected a whole number, got {value!r}") from None
    if layers < 1:
        raise Refused(422, f"CLIP_stop_at_last_layers: must be 1 or more, got {layers}")
    return layers - 1  # A1111 counts the last layer as 1; we count skipped blocks


def _flatten(image):
    """RGB, transparent pixels on white (as A1111 flattens uploads)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image.convert("RGB")


def _mask(image, round_: bool, invert: bool):
    """A1111's binary mask: the alpha channel of a transparent mask, else its grey levels;
    rounded at 128 unless ``mask_round`` is false; inverted on request."""
    from PIL import ImageOps

    if image.mode in ("RGBA", "LA") and image.getextrema()[-1][0] < 255:
        mask = image.getchannel("A")
    else:
        mask = image.convert("L")
    if round_:
        mask = mask.point(lambda v: 255 if v > 128 else 0)
    return ImageOps.invert(mask) if invert else mask


def _fit(image, width: int, height: int, resize_mode: int):
    from PIL import Image

    from pipelines.control import fit_hint

    if image.size == (width, height):
        return image
    if resize_mode == 0:
        return image.resize((width, height), Image.LANCZOS)
    return fit_hint(image, width, height, _RESIZE[resize_mode])


def _plan_img2img(server, req: Img2ImgRequest, plan: Plan) -> None:
    if not req.init_images:
        raise Refused(422, "init_images: at least one image is needed")
    if len(req.init_images) > 1:
        raise Refused(422, "init_images: one image is available per request (it is used for "
                      "the whole batch)")
    if req.resize_mode == 3:
        raise Refused(422, "resize_mode: 3 (just resize, latent upscale) is not available")
    image = _flatten(decode_image(req.init_images[0], "init_images[0]", server.limits))
    width = req.width or image.width - image.width % 8
    height = req.height or image.height - image.height % 8
    server.limits.check(width=width, height=height, images=1, steps=req.steps)
    plan.kwargs.update(width=width, height=height)
    if req.mask is None:
        plan.inputs["image"] = _fit(image, width, height, req.resize_mode)
        return
    mask = _mask(decode_image(req.mask, "mask", server.limits), req.mask_round,
                 bool(req.inpainting_mask_invert))
    if req.mask_blur is None and req.mask_blur_x != req.mask_blur_y:
        raise Refused(422, "mask_blur_x: a blur different from mask_blur_y is not available")
    blur = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    plan.kwargs["mask_blur"] = blur
    if req.inpainting_fill in (2, 3):  # the masked latents start from the seed's noise, or zero
        plan.kwargs["inpainting_fill"] = "latent_noise" if req.inpainting_fill == 2 else "latent_nothing"
    fill = req.inpainting_fill == 0
    if mask.size != image.size:
        mask = mask.resize(image.size)
    if req.inpaint_full_res and mask.getbbox() is not None:
        plan.mode = "inpaint_masked"
        plan.inputs.update(image=image, mask=mask, padding=req.inpaint_full_res_padding, fill=fill)
        return
    if mask.getbbox() is None:  # nothing to repaint: A1111 goes on as img2img
        plan.kwargs.pop("mask_blur")
        plan.inputs["image"] = _fit(image, width, height, req.resize_mode)
        return
    plan.mode = "inpaint"
    plan.inputs.update(image=_fit(image, width, height, req.resize_mode),
                       mask=_fit(mask, width, height, req.resize_mode).convert("L"), fill=fill)


def control_units(server, scripts: dict) -> list:
    """``alwayson_scripts``: ControlNet units (sd-webui-controlnet's fields) → ControlUnits.
    Another script that is switched on is refused; one sent switched off is ignored."""
    from pipelines.control import ControlUnit

    units = []
    for name, value in (scripts or {}).items():
        args = (value or {}).get("args", []) if isinstance(value, dict) else []
        if name.lower() != "controlnet":
            if any(a not in (False, None, {}, []) for a in args[:1]):
                raise Refused(422, f"alwayson_scripts: {name!r} is not available")
            continue
        for i, raw in enumerate(args):
            where = f"alwayson_scripts.ControlNet.args[{i}]"
            if not isinstance(raw, dict):
                raise Refused(422, f"{where}: expected a unit object")
            unit = ControlNetUnitRequest.model_validate(raw)
            if not unit.enabled or unit.model in ("", "None", "none"):
                continue
            if server.controlnets is None:
                raise Refused(422, f"{where}.model: ControlNets need the server started with "
                              "--controlnet-dir")
            path = server.controlnets.resolve(unit.model, f"{where}.model")
            image = unit.image.get("image") if isinstance(unit.image, dict) else unit.image
            image = image or unit.input_image
            if not image:
                raise Refused(422, f"{where}.image: a hint image is needed")
            if unit.mask or (isinstance(unit.image, dict) and unit.image.get("mask")):
                raise Refused(422, f"{where}.mask: unit masks are not available")
            hint = _flatten(decode_image(image, f"{where}.image", server.limits))
            module, params = _preprocessor(unit, where)
            try:
                units.append(ControlUnit(
                    path, hint, unit.weight, unit.guidance_start, unit.guidance_end,
                    _CONTROL_MODE.get(unit.control_mode, unit.control_mode),
                    _CONTROL_RESIZE.get(unit.resize_mode if isinstance(unit.resize_mode, int)
                                        else unit.resize_mode.lower(), unit.resize_mode),
                    module, params))
            except ValueError as exc:
                raise Refused(422, f"{where}: {exc}") from None
    return units


def _preprocessor(unit: ControlNetUnitRequest, where: str) -> tuple[str, dict]:
    from pipelines.annotators import PARAMETERS

    module = unit.module.strip().lower().split(" (")[0] or "none"
    if module not in PARAMETERS:
        raise Refused(422, f"{where}.module: {unit.module!r} is not available; choose one of "
                      f"{', '.join(PARAMETERS)}")
    slots = {"Threshold A": unit.threshold_a, "Threshold B": unit.threshold_b}
    params = {}
    for p in PARAMETERS[module]:
        value = slots.get(p.a1111_label, -1)
        if value is not None and value != -1:
            params[p.name] = p.kind(value)
    return module, params


# ------------------------------------------------------------------ running (worker thread)
def make_runner(plan: Plan, limits) -> Callable:
    """The job: batches run one after another; interrupt stops, skip moves to the next batch."""
    from pipelines import inpaint_region

    def run(pipe, control) -> Outcome:
        images, params, interrupted = [], [], False
        for path, weight, name in plan.loras:
            pipe.load_lora(path, weight, name=name)
        try:
            for k in range(plan.n_iter):
                if control.interrupted:
                    interrupted = True
                    break
                control.begin_iteration(k, plan.n_iter, plan.kwargs["num_inference_steps"])
                kwargs = dict(plan.kwargs, seed=plan.seed + k * plan.batch_size,
                              callback=control.callback)
                if plan.subseed is not None:
                    kwargs["subseed"] = plan.subseed + k * plan.batch_size
                prompt = kwargs.pop("prompt")
                if kwargs.get("hires") is not None and k == 0:
                    size = pipe.model.config.default_image_size
                    final = kwargs["hires"].sizes(kwargs.get("width") or size,
                                                  kwargs.get("height") or size)[1]
                    limits.check(width=final[0], height=final[1], images=1, steps=1)
                if plan.mode == "txt2img":
                    result = pipe.txt2img(prompt, **kwargs)
                elif plan.mode == "img2img":
                    kwargs.pop("mask_blur", None)
                    kwargs.pop("inpainting_fill", None)
                    result = pipe.img2img(prompt, plan.inputs["image"], **kwargs)
                elif plan.mode == "inpaint":
                    del kwargs["width"], kwargs["height"]
                    result = inpaint_region.inpaint_whole(pipe, prompt, plan.inputs["image"],
                                                          plan.inputs["mask"], fill=plan.inputs["fill"],
                                                          **kwargs)
                else:
                    result = inpaint_region.inpaint_only_masked(
                        pipe, prompt, plan.inputs["image"], plan.inputs["mask"],
                        padding=plan.inputs["padding"], fill=plan.inputs["fill"], **kwargs)
                images += result.images
                params += result.parameters
                interrupted = interrupted or (result.interrupted and control.interrupted)
        finally:
            if plan.loras:
                pipe.unload_lora()
        return Outcome(images, params, interrupted, pipe.model_name, pipe.model_path)

    return run


def png_base64(image, text: str | None) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = None
    if text:
        info = PngInfo()
        info.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def answer(plan: Plan, outcome: Outcome, req, started: float, send_images: bool) -> dict:
    """The A1111 response body: base64 PNGs with their parameters text, the request, the info
    JSON."""
    from pipelines.images import model_hash

    extra = {k: v for k, v in plan.extra.items() if k[:1].isupper() and v is not None}
    params = []
    for p in outcome.parameters:
        p = a1111.image_parameters(p, plan.sampler, plan.schedule, extra)
        p["prompt"] = plan.extra.get("prompt", p.get("prompt"))
        params.append(p)
    texts = [a1111.infotext(p) for p in params]
    images = [png_base64(im, t) for im, t in zip(outcome.images, texts)] if send_images else []
    body = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        body["init_images"], body["mask"] = None, None
    info = a1111.info_json(request=body, images_params=params, infotexts=texts,
                           sampler=plan.sampler, schedule=plan.schedule,
                           model_name=outcome.model_name, model_hash=model_hash(outcome.model_path),
                           clip_skip=plan.clip_skip + 1, job_timestamp=started, extra=extra)
    return {"images": images, "parameters": body, "info": info}

