"""Scheduler names → diffusers schedulers configured as Stable Diffusion ships them.

Every scheduler gets SD's training noise schedule (``scaled_linear`` betas 0.00085 → 0.012 over 1000
steps) and SD's inference spacing (``timestep_spacing="leading"``, ``steps_offset=1``) where its class
takes those options, so a name here gives the same images as the same scheduler in a diffusers
Stable Diffusion pipeline. Only the module of the scheduler class in use is imported, inside the
functions: the package's top level would cost a second or more of start-up.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import threading

SCHEDULERS: tuple[str, ...] = ("ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m",
                               "dpmpp_2m_karras", "dpmpp_sde_karras", "unipc")

SD_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")

# name → (diffusers class, options beyond SD_DEFAULTS)
_SPECS: dict[str, tuple[str, dict]] = {
    # SD's own scheduler_config: no clipping of x0 (latents are not in [-1, 1]) and the final step
    # uses alpha_cumprod at t=0 instead of 1.
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    "ddpm": ("DDPMScheduler", dict(clip_sample=False)),
    # skip_prk_steps: the linear multistep (PLMS) form that the LDM repository samples with
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=False)),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", dict(use_karras_sigmas=True)),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# diffusers class → its module under diffusers.schedulers
_MODULES = {"DDIMScheduler": "scheduling_ddim", "DDPMScheduler": "scheduling_ddpm",
            "PNDMScheduler": "scheduling_pndm", "LMSDiscreteScheduler": "scheduling_lms_discrete",
            "EulerDiscreteScheduler": "scheduling_euler_discrete",
            "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
            "HeunDiscreteScheduler": "scheduling_heun_discrete",
            "DPMSolverMultistepScheduler": "scheduling_dpmsolver_multistep",
            "DPMSolverSDEScheduler": "scheduling_dpmsolver_sde",
            "UniPCMultistepScheduler": "scheduling_unipc_multistep"}

_PREDICTIONS = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction",
                "v_prediction": "v_prediction"}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _torchsde_available() -> bool:
    return _installed("torchsde")


def _scipy_available() -> bool:
    return _installed("scipy")


def scheduler_class(cls_name: str):
    """The diffusers scheduler class, imported from its own module only."""
    return getattr(importlib.import_module(f"diffusers.schedulers.{_MODULES[cls_name]}"), cls_name)


def import_in_background(name: str) -> threading.Thread | None:
    """Start importing the diffusers module of scheduler ``name`` in a daemon thread (None for an
    unknown name). The import holds the GIL, so it only gains where the other thread releases it:
    a large checkpoint's load, whose time goes to copying and page faults. A later
    :func:`make_scheduler` waits for the module's import lock if it is still running."""
    if name not in _SPECS:
        return None
    module = f"diffusers.schedulers.{_MODULES[resolve(name)[0]]}"
    if module in sys.modules:
        return None
    thread = threading.Thread(target=_import_quietly, args=(module,), name="ldm-scheduler-import",
                              daemon=True)
    thread.start()
    return thread


def _import_quietly(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception:  # make_scheduler imports it again and reports the error
        pass


def check_name(name) -> None:
    if name not in _SPECS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def resolve(name: str) -> tuple[str, dict]:
    """The diffusers class name and options for a scheduler name.

    ``dpmpp_sde_karras`` is A1111's "DPM++ SDE Karras", diffusers' ``DPMSolverSDEScheduler``, which
    needs the optional ``torchsde`` package (its Brownian-tree noise). Without it we use diffusers'
    ``DPMSolverMultistepScheduler`` with ``algorithm_type="sde-dpmsolver++"`` and Karras sigmas: the
    same solver family (DPM-Solver++ with SDE noise, Lu et al. 2022) as a 2M multistep method,
    so images differ from the torchsde version but are of the same kind.
    """
    check_name(name)
    cls_name, options = _SPECS[name]
    if name == "dpmpp_sde_karras" and not _torchsde_available():
        return "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=2,
                                                   use_karras_sigmas=True)
    return cls_name, dict(options)


def make_scheduler(name: str, prediction: str = "eps", **overrides):
    """A configured diffusers scheduler for ``name`` (one of :data:`SCHEDULERS`).

    ``prediction`` is the model's parameterization ("eps" or "v"; diffusers' spellings work too).
    ``overrides`` replace SD defaults or add options (e.g. ``beta_end=0.02``); an option that the
    scheduler's class does not take raises ValueError.
    """
    cls_name, options = resolve(name)
    if prediction not in _PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; expected 'eps' or 'v'")
    if name == "lms" and not _scipy_available():
        raise ValueError("scheduler 'lms' needs scipy (diffusers computes its coefficients with it); "
                         "install it with: pip install scipy")
    cls = scheduler_class(cls_name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"scheduler {name!r} ({cls_name}) has no option {', '.join(map(repr, unknown))}")
    config = {k: v for k, v in SD_DEFAULTS.items() if k in accepted}
    config.update(options)
    config["prediction_type"] = _PREDICTIONS[prediction]
    config.update(overrides)
    return cls(**config)
