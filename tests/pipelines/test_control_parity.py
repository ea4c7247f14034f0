"""ControlNet generation against diffusers' ControlNet pipelines on identical random weights.

Our tiny models and random ControlNets (zero convolutions randomised too, so the control moves the
image) are converted with diffusers' own converters; both sides get the same prompt, seed, steps,
guidance, control scale, guidance window and guess mode. Each comparison also checks that the
control visibly changes the image, so agreement cannot come from a control that does nothing.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ldm.config import parse_config
from ldm.controlnet_config import ControlNetConfig
from ldm.model import LatentDiffusion
from ldm.modules.controlnet import ControlNet
from ldm.speed import SpeedOptions
from pipelines.control import ControlUnit
from pipelines.pipeline import Pipeline
from reference import pipelines as dp
from reference.models import diffusers_controlnet, randomize_
from reference.tiny import tiny_tree
from tests.pipelines.test_pipeline_parity import SEED, _common, _u8, assert_close, assert_far

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a red circle"
SIZE = 64  # 8×8 latents
STEPS = 4


def _controlnet(kind: str, seed: int):
    """A random ControlNet for the tiny ``kind`` model (4 latent channels, as an inpainting
    model's ControlNets have) and diffusers' ControlNetModel holding the same weights."""
    tree = tiny_tree(kind, downscale=8)
    cfg = ControlNetConfig.from_unet(dataclasses.replace(parse_config(tree).unet, in_channels=4))
    params = tree["model"]["params"]
    unet = dict(params["unet_config"]["params"], in_channels=4)
    params["unet_config"]["params"] = unet  # diffusers reads the ControlNet's shape from here
    params["control_stage_config"] = {"target": "cldm.cldm.ControlNet",
                                      "params": dict(unet, hint_channels=3)}
    ours = randomize_(ControlNet(cfg), seed=seed, scale=1.0).eval()
    prefixed = {f"control_model.{k}": v for k, v in ours.state_dict().items()}
    return ours, diffusers_controlnet(tree, prefixed)


class Side:
    def __init__(self, kind: str, speed=None):
        tree = tiny_tree(kind, downscale=8)  # hints are 8× the latents, as in SD
        model = randomize_(LatentDiffusion(parse_config(tree, f"tiny-{kind}")), seed=1)
        randomize_(model.model.diffusion_model, seed=2, scale=1.0)
        model.eval()
        self.prediction = model.config.parameterization
        self.parts = dp.components(model, tree)
        self.ours = Pipeline(model, device="cpu", model_name=f"tiny-{kind}", speed=speed)
        self.nets = [_controlnet(kind, seed) for seed in (11, 12)]

    def reference(self, task: str, count: int, scheduler: str = "ddim"):
        import diffusers

        cls = {"txt2img": diffusers.StableDiffusionControlNetPipeline,
               "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
               "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline}[task]
        nets = [theirs for _, theirs in self.nets[:count]]
        pipe = cls(**self.parts, controlnet=nets[0] if count == 1 else nets,
                   scheduler=dp.reference_scheduler(scheduler, self.prediction), safety_checker=None,
                   feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


@pytest.fixture(scope="module")
def sides():
    cache = {}

    def get(kind: str = "sd1", speed: str = "on") -> Side:
        if (kind, speed) not in cache:
            cache[kind, speed] = Side(kind, SpeedOptions.off() if speed == "off" else None)
        return cache[kind, speed]

    return get


def _hints(count: int):
    return [dp.sample_image(SIZE, SIZE, seed=20 + i) for i in range(count)]


def _units(side: Side, hints, scales, starts, ends, guess: bool):
    mode = "control" if guess else "balanced"
    return [ControlUnit(ours, hint, weight=w, guidance_start=s, guidance_end=e, control_mode=mode,
                        resize_mode="just_resize")
            for (ours, _), hint, w, s, e in zip(side.nets, hints, scales, starts, ends)]


def _theirs_kw(count, hints, scales, starts, ends, guess):
    one = count == 1
    return dict(controlnet_conditioning_scale=scales[0] if one else list(scales),
                control_guidance_start=starts[0] if one else list(starts),
                control_guidance_end=ends[0] if one else list(ends), guess_mode=guess)


CASES = [  # (controlnets, scales, starts, ends, guess mode, scheduler)
    (1, (0.8,), (0.0,), (1.0,), False, "ddim"),
    (1, (1.0,), (0.25,), (0.75,), False, "euler_a"),
    (1, (0.9,), (0.0,), (1.0,), True, "ddim"),
    (2, (0.7, 0.5), (0.0, 0.5), (1.0, 1.0), False, "ddim"),
    (2, (0.6, 1.0), (0.0, 0.0), (0.5, 1.0), True, "dpmpp_2m_karras"),
]


# the speed switches on (shared guidance prefix, prepacking...) for every case, off for some
@pytest.mark.parametrize("speed,count,scales,starts,ends,guess,scheduler",
                         [("on", *case) for case in CASES] + [("off", *case) for case in CASES[:4]])
def test_txt2img_with_control_matches_diffusers(sides, speed, count, scales, starts, ends, guess,
                                                scheduler):
    side = sides("sd1", speed)
    hints = _hints(count)
    kw = _common(height=SIZE, width=SIZE)
    kw["num_inference_steps"] = STEPS
    units = _units(side, hints, scales, starts, ends, guess)
    ours = side.ours.txt2img(PROMPT, seed=SEED, scheduler=scheduler, progress=False,
                             control=units, **kw)
    ref = side.reference("txt2img", count, scheduler)
    theirs = ref(PROMPT, image=hints[0] if count == 1 else hints,
                 generator=torch.Generator("cpu").manual_seed(SEED),
                 **_theirs_kw(count, hints, scales, starts, ends, guess), **kw).images[0]
    assert_close(ours.images[0], theirs)
    plain = side.ours.txt2img(PROMPT, seed=SEED, scheduler=scheduler, progress=False, **kw)
    assert_far(plain.images[0], theirs)


@pytest.mark.parametrize("kind", ["sd1", "sd2-v"])
def test_img2img_with_control_matches_diffusers(sides, kind):
    side = sides(kind)
    image, hints = dp.sample_image(SIZE, SIZE), _hints(1)
    kw = _common(strength=0.75)
    kw["num_inference_steps"] = STEPS
    units = _units(side, hints, (0.8,), (0.0,), (0.8,), False)
    ours = side.ours.img2img(PROMPT, image, seed=SEED, scheduler="ddim", progress=False,
                             control=units, **kw)
    ref = side.reference("img2img", 1)
    theirs = ref(PROMPT, image=image, control_image=hints[0],
                 generator=torch.Generator("cpu").manual_seed(SEED),
                 **_theirs_kw(1, hints, (0.8,), (0.0,), (0.8,), False), **kw).images[0]
    assert_close(ours.images[0], theirs)
    plain = side.ours.img2img(PROMPT, image, seed=SEED, scheduler="ddim", progress=False, **kw)
    assert_far(plain.images[0], theirs)


@pytest.mark.parametrize("kind", ["sd1-inpaint", "sd1"])
def test_inpaint_with_control_matches_diffusers(sides, kind):
    """9-channel and 4-channel inpainting; the ControlNet reads the 4 latent channels only."""
    side = sides(kind)
    image, mask, hints = dp.sample_image(SIZE, SIZE), dp.box_mask(SIZE, SIZE), _hints(2)
    kw = _common(strength=1.0)
    kw["num_inference_steps"] = STEPS
    units = _units(side, hints, (1.0, 0.5), (0.0, 0.0), (1.0, 0.5), False)
    ours = side.ours.inpaint(PROMPT, image, mask, seed=SEED, scheduler="ddim", progress=False,
                             control=units, **kw)
    ref = side.reference("inpaint", 2)
    theirs = ref(PROMPT, image=image, mask_image=mask, control_image=hints,
                 generator=torch.Generator("cpu").manual_seed(SEED), height=SIZE, width=SIZE,
                 **_theirs_kw(2, hints, (1.0, 0.5), (0.0, 0.0), (1.0, 0.5), False), **kw).images[0]
    inside = np.asarray(mask) == 255
    assert_close(ours.images[0], theirs, inside)
    assert np.array_equal(_u8(ours.images[0])[~inside], _u8(image)[~inside])
    plain = side.ours.inpaint(PROMPT, image, mask, seed=SEED, scheduler="ddim", progress=False, **kw)
    assert_far(plain.images[0], theirs, inside)
