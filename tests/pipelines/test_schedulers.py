"""Scheduler names → configured diffusers schedulers, and each one running on a tiny model."""
from __future__ import annotations

import pytest
import torch

from pipelines import schedulers
from pipelines.pipeline import Pipeline
from pipelines.schedulers import SCHEDULERS, make_scheduler
from reference.pipelines import random_model

# Values Stable Diffusion's own scheduler_config.json ships (written out here, not imported).
SD_VALUES = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", steps_offset=1)

EXPECTED_CLASS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def test_names_are_the_documented_ones():
    assert SCHEDULERS == ("ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m",
                          "dpmpp_2m_karras", "dpmpp_sde_karras", "unipc")


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n != "dpmpp_sde_karras"])
def test_each_name_builds_with_sd_defaults(name):
    if name == "lms" and not schedulers._scipy_available():
        with pytest.raises(ValueError, match="pip install scipy"):
            make_scheduler(name)
        return
    s = make_scheduler(name)
    assert type(s).__name__ == EXPECTED_CLASS[name]
    for key, value in SD_VALUES.items():
        if key in s.config:
            assert s.config[key] == value, key
    assert s.config.prediction_type == "epsilon"
    if "timestep_spacing" in s.config:
        assert s.config.timestep_spacing == "leading"


def test_sd_specific_options():
    ddim = make_scheduler("ddim")
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
    assert make_scheduler("pndm").config.skip_prk_steps is True
    assert make_scheduler("dpmpp_2m_karras").config.use_karras_sigmas is True
    assert make_scheduler("dpmpp_2m").config.use_karras_sigmas is False
    assert make_scheduler("dpmpp_2m").config.algorithm_type == "dpmsolver++"


def test_leading_spacing_gives_sds_timesteps():
    # SD's 50-step DDIM schedule: 981, 961, ..., 1 ("leading" spacing with steps_offset 1)
    s = make_scheduler("ddim")
    s.set_timesteps(50)
    assert s.timesteps.tolist() == list(range(981, 0, -20))


def test_prediction_type_from_the_model():
    assert make_scheduler("euler", "v").config.prediction_type == "v_prediction"
    assert make_scheduler("euler", "eps").config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction type"):
        make_scheduler("euler", "x0")


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        make_scheduler("k_euler")
    message = str(err.value)
    assert "'k_euler'" in message and all(name in message for name in SCHEDULERS)


def test_overrides():
    assert make_scheduler("ddim", beta_end=0.02).config.beta_end == 0.02
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        make_scheduler("ddim", use_karras_sigmas=True)


def test_dpmpp_sde_karras_with_and_without_torchsde(monkeypatch):
    monkeypatch.setattr(schedulers, "_torchsde_available", lambda: True)
    assert schedulers.resolve("dpmpp_sde_karras") == ("DPMSolverSDEScheduler",
                                                       {"use_karras_sigmas": True})
    monkeypatch.setattr(schedulers, "_torchsde_available", lambda: False)
    s = make_scheduler("dpmpp_sde_karras")
    assert type(s).__name__ == "DPMSolverMultistepScheduler"
    assert s.config.algorithm_type == "sde-dpmsolver++" and s.config.use_karras_sigmas is True


def test_dpmpp_sde_karras_uses_what_is_installed():
    s = make_scheduler("dpmpp_sde_karras")
    expected = "DPMSolverSDEScheduler" if schedulers._torchsde_available() else "DPMSolverMultistepScheduler"
    assert type(s).__name__ == expected


def test_lms_without_scipy_says_what_to_install(monkeypatch):
    monkeypatch.setattr(schedulers, "_scipy_available", lambda: False)
    with pytest.raises(ValueError, match="pip install scipy"):
        make_scheduler("lms")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(random_model("sd1"), device="cpu")


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_scheduler_runs_two_steps(pipe, name):
    if name == "lms" and not schedulers._scipy_available():
        with pytest.raises(ValueError, match="scipy"):
            pipe.txt2img("a cat", scheduler=name, num_inference_steps=2, seed=0, progress=False)
        return
    calls = []
    result = pipe.txt2img("a cat", scheduler=name, num_inference_steps=2, seed=0, height=16,
                          width=16, progress=False, return_latents=True,
                          callback=lambda i, n, x: calls.append((i, n)))
    assert torch.isfinite(result.latents).all()
    assert result.images[0].size == (16, 16)
    # one callback per UNet evaluation: 2, or 3 where a second-order method (heun, the SDE
    # sampler) or PNDM's PLMS warm-up adds an evaluation
    total = calls[0][1]
    assert total in (2, 3) and calls == [(i, total) for i in range(total)]


def test_scheduler_classes_are_diffusers_own_imported_from_their_module():
    import diffusers

    classes = {schedulers._SPECS[name][0] for name in schedulers.SCHEDULERS} | {"DPMSolverMultistepScheduler"}
    assert classes <= set(schedulers._MODULES)
    for cls_name in classes:
        assert schedulers.scheduler_class(cls_name) is getattr(diffusers, cls_name)


def test_making_a_scheduler_imports_only_its_module():
    import subprocess
    import sys

    code = ("import sys; from pipelines.schedulers import make_scheduler; make_scheduler('dpmpp_2m'); "
            "loaded = sorted(m for m in sys.modules if m.startswith('diffusers.schedulers.scheduling_')); "
            "print(loaded); assert 'diffusers.pipelines' not in sys.modules and "
            "'diffusers.models' not in sys.modules and 'transformers' not in sys.modules, loaded")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "scheduling_dpmsolver_multistep'" in out.stdout and "scheduling_ddim'" not in out.stdout


def test_import_in_background_imports_the_module_of_the_name(monkeypatch):
    import sys

    assert schedulers.import_in_background("no such scheduler") is None
    module = "diffusers.schedulers.scheduling_euler_ancestral_discrete"
    monkeypatch.delitem(sys.modules, module, raising=False)
    thread = schedulers.import_in_background("euler_a")
    assert thread is not None
    thread.join(60)
    assert module in sys.modules
    assert schedulers.import_in_background("euler_a") is None  # already imported
