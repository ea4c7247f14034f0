"""AUTOMATIC1111's vocabulary: sampler and schedule names as its API (≥ 1.9) reads them, the
``eta`` rule of its samplers, and the ``info`` JSON and PNG text of its responses.

A1111 ≥ 1.9 names a sampler ("DPM++ 2M") and a schedule type ("Karras") separately; "Automatic"
means the sampler's own default schedule. Older clients send one combined name ("DPM++ 2M
Karras"). Both spellings map onto our scheduler names (:data:`pipelines.schedulers.SCHEDULERS`);
a pair we have no scheduler for is refused, naming the field.
"""
from __future__ import annotations

import json
import re
import time

from pipelines.images import format_parameters, parse_parameters

# A1111 sampler → (its default schedule, {schedule label: our scheduler name}).
# "Uniform" is the model's own spacing of timesteps, what diffusers' schedulers use by default.
SAMPLERS: dict[str, tuple[str, dict[str, str]]] = {
    "DPM++ 2M": ("Karras", {"Uniform": "dpmpp_2m", "Karras": "dpmpp_2m_karras"}),
    "DPM++ SDE": ("Karras", {"Karras": "dpmpp_sde_karras"}),
    "Euler a": ("Uniform", {"Uniform": "euler_a"}),
    "Euler": ("Uniform", {"Uniform": "euler"}),
    "LMS": ("Uniform", {"Uniform": "lms"}),
    "Heun": ("Uniform", {"Uniform": "heun"}),
    "DDIM": ("Uniform", {"Uniform": "ddim"}),
    "DDPM": ("Uniform", {"Uniform": "ddpm"}),
    "PLMS": ("Uniform", {"Uniform": "pndm"}),
    "UniPC": ("Uniform", {"Uniform": "unipc"}),
}
# Schedule types as A1111 lists them (name, label); only those in SAMPLERS can be used.
SCHEDULES = (("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"),
             ("exponential", "Exponential"), ("polyexponential", "Polyexponential"),
             ("sgm_uniform", "SGM Uniform"), ("kl_optimal", "KL Optimal"),
             ("align_your_steps", "Align Your Steps"), ("simple", "Simple"),
             ("normal", "Normal"), ("ddim", "DDIM"), ("beta", "Beta"))
_SCHEDULE_LABEL = {k: label for name, label in SCHEDULES for k in (name, label.lower())}
_SAMPLER_KEY = {name.lower(): name for name in SAMPLERS}
# Samplers whose noise is ancestral/SDE: A1111 applies `eta` to them (default 1); ours fix η = 1.
_ANCESTRAL = {"Euler a", "DPM++ SDE"}


class Unsupported(ValueError):
    """A request field whose value we cannot honour (answered with 422 naming ``field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def sampler_choice(sampler_name: str | None, scheduler: str | None) -> tuple[str, str, str]:
    """(A1111 sampler, schedule label, our scheduler name) for a request's ``sampler_name`` and
    ``scheduler``; a combined old name ("DPM++ 2M Karras") carries its schedule."""
    raw = (sampler_name or "Euler").strip()
    key = raw.lower()
    label = None
    if key not in _SAMPLER_KEY:  # an old combined name: the last word(s) are the schedule
        for sched_key, sched_label in _SCHEDULE_LABEL.items():
            base = key[: -len(sched_key)].rstrip() if key.endswith(" " + sched_key) else None
            if base in _SAMPLER_KEY:
                key, label = base, sched_label
                break
    if key not in _SAMPLER_KEY:
        raise Unsupported("sampler_name", f"unknown sampler {raw!r}; choose one of "
                          f"{', '.join(SAMPLERS)}")
    sampler = _SAMPLER_KEY[key]
    default, table = SAMPLERS[sampler]
    if scheduler and scheduler.strip().lower() not in ("", "automatic"):
        wanted = _SCHEDULE_LABEL.get(scheduler.strip().lower())
        if wanted is None:
            raise Unsupported("scheduler", f"unknown schedule type {scheduler!r}; choose one of "
                              f"{', '.join(label for _, label in SCHEDULES)}")
        label = wanted
    label = label or default
    if label not in table:
        raise Unsupported("scheduler", f"{sampler!r} with schedule type {label!r} is not "
                          f"available; use {' or '.join(table)}")
    return sampler, label, table[label]


def sampler_list() -> list[dict]:
    """``GET /sdapi/v1/samplers``: name, aliases (our scheduler names), options."""
    out = []
    for name, (default, table) in SAMPLERS.items():
        options = {"scheduler": default.lower()} if default != "Uniform" else {}
        if name in _ANCESTRAL:
            options["uses_ensd"] = "True"
        out.append({"name": name, "aliases": sorted(set(table.values())), "options": options})
    return out


def schedule_list() -> list[dict]:
    """``GET /sdapi/v1/schedulers``; every label A1111 knows, usable or not with a sampler."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for name, label in SCHEDULES]


def pipeline_eta(sampler: str, eta: float | None) -> float:
    """The η our pipeline gets. A1111 applies ``eta`` to DDIM (default 0) and to ancestral/SDE
    samplers (default 1, which is all diffusers' versions can do); other samplers ignore it."""
    if sampler == "DDIM":
        return 0.0 if eta is None else float(eta)
    if sampler in _ANCESTRAL and eta is not None and float(eta) != 1.0:
        raise Unsupported("eta", f"{sampler} runs with eta 1 only, got {eta}")
    return 0.0


def image_parameters(params: dict, sampler: str, schedule: str, extra: dict) -> dict:
    """The pipeline's per-image parameters in A1111's spelling: sampler and ``Schedule type`` as
    two fields (≥ 1.9), plus the request's extra fields (LoRA tags, inpaint area...)."""
    out = dict(params)
    out["sampler"] = sampler  # not one of our names: format_parameters writes it as it is
    if schedule not in ("Uniform", "Automatic") or sampler in ("DPM++ 2M", "DPM++ SDE"):
        out["Schedule type"] = schedule
    out.update(extra)
    return out


def infotext(params: dict) -> str:
    return format_parameters(params)


def info_json(*, request: dict, images_params: list[dict], infotexts: list[str], sampler: str,
              schedule: str, model_name: str, model_hash: str | None, clip_skip: int,
              job_timestamp: float, extra: dict) -> str:
    """The ``info`` string of a txt2img/img2img answer: the JSON A1111's ``Processed.js()``
    gives, with the fields clients read (seeds, prompts, size, sampler, model, infotexts)."""
    first = images_params[0] if images_params else {}
    all_prompts = [p.get("prompt", "") for p in images_params]
    seeds = [p.get("seed") for p in images_params]
    subseeds = [p.get("Variation seed", -1) for p in images_params]
    return json.dumps({
        "prompt": request.get("prompt", ""),
        "all_prompts": all_prompts,
        "negative_prompt": request.get("negative_prompt", ""),
        "all_negative_prompts": [p.get("negative_prompt", "") for p in images_params],
        "seed": seeds[0] if seeds else request.get("seed"),
        "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else -1,
        "all_subseeds": subseeds,
        "subseed_strength": first.get("Variation seed strength", 0),
        "width": first.get("width", request.get("width")),
        "height": first.get("height", request.get("height")),
        "sampler_name": sampler,
        "scheduler": schedule,
        "cfg_scale": first.get("cfg_scale", request.get("cfg_scale")),
        "steps": first.get("steps", request.get("steps")),
        "batch_size": request.get("batch_size", 1),
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_name,
        "sd_model_hash": model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": request.get("seed_resize_from_w", -1),
        "seed_resize_from_h": request.get("seed_resize_from_h", -1),
        "denoising_strength": first.get("strength", request.get("denoising_strength")),
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job_timestamp)),
        "clip_skip": clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": "ldm-pipeline",
    })


_PAIR = re.compile(r'\s*([^,:]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def read_infotext(text: str) -> dict:
    """A parameters text as A1111's png-info answers it: "Prompt", "Negative prompt" and each
    ``Key: value`` of the last line (numbers as numbers, "Size" also as Size-1 and Size-2)."""
    parsed = parse_parameters(text)
    out: dict = {"Prompt": parsed.get("prompt", ""), "Negative prompt": parsed.get("negative_prompt", "")}
    last = text.strip("\n").split("\n")[-1]
    if parsed.get("mode"):  # the last line held the settings
        for key, value in _PAIR.findall(last):
            value = value.strip()
            if value.startswith('"'):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            out[key.strip()] = _number(value)
        if "x" in str(out.get("Size", "")):
            out["Size-1"], out["Size-2"] = (_number(v) for v in str(out["Size"]).split("x", 1))
    return out


def _number(value):
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value
