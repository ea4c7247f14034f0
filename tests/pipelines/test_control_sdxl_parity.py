"""SDXL ControlNet generation against diffusers' StableDiffusionXLControlNet(Img2Img|Inpaint)Pipeline
on identical random weights: a tiny SDXL model (autoencoder factor 8, so hints are 8× the latents)
and random SDXL ControlNets in the original layout (``label_emb`` included, zero convolutions
randomised), converted for diffusers by its own single-file code. Same prompt, seed, steps,
guidance, control scale, window and guess mode; each comparison also checks that the control
visibly changes the image."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ldm.controlnet_config import ControlNetConfig
from ldm.modules.controlnet import ControlNet
from pipelines.control import ControlUnit
from pipelines.pipeline import Pipeline
from reference import pipelines as dp
from reference.models import randomize_
from reference.sdxl import (diffusers_sdxl_controlnet, random_diffusers_sdxl_controlnet,
                            random_sdxl_model, sdxl_cldm_tree, sdxl_pipeline)
from reference.tiny import tiny_sdxl_tree
from tests.pipelines.test_pipeline_parity import _u8, assert_close, assert_far

pytestmark = pytest.mark.usefixtures("single_thread")

SEED, STEPS, SIZE = 5, 4, 64  # 8×8 latents
PROMPT, NEGATIVE = "a red circle", "blurry"


def sdxl_controlnet_pair(model, tree: dict, seed: int):
    """A random ControlNet for the tiny SDXL ``model`` (4 latent channels, as an inpainting
    model's ControlNets have) and diffusers' ControlNetModel holding the same weights."""
    cfg = ControlNetConfig.from_unet(dataclasses.replace(model.config.unet, in_channels=4))
    ours = randomize_(ControlNet(cfg), seed=seed, scale=1.0).eval()
    prefixed = {f"control_model.{k}": v for k, v in ours.state_dict().items()}
    return ours, diffusers_sdxl_controlnet(sdxl_cldm_tree(tree, in_channels=4), model.config, prefixed)


class Side:
    def __init__(self, kind: str):
        self.model = random_sdxl_model(kind, downscale=8)
        self.tree = tiny_sdxl_tree(kind, downscale=8)
        self.ours = Pipeline(self.model, device="cpu", model_name=f"tiny-{kind}")
        self.nets = [sdxl_controlnet_pair(self.model, self.tree, seed) for seed in (11, 12)]

    def reference(self, task: str, count: int, scheduler: str = "euler"):
        nets = [theirs for _, theirs in self.nets[:count]]
        return sdxl_pipeline(self.model, self.tree, dp.reference_scheduler(scheduler), task,
                             controlnet=nets[0] if count == 1 else nets)


@pytest.fixture(scope="module")
def sides():
    cache: dict[str, Side] = {}

    def get(kind: str = "sdxl") -> Side:
        if kind not in cache:
            cache[kind] = Side(kind)
        return cache[kind]

    return get


def _hints(count: int):
    return [dp.sample_image(SIZE, SIZE, seed=20 + i) for i in range(count)]


def _units(side: Side, hints, scales, starts, ends, guess: bool):
    mode = "control" if guess else "balanced"
    return [ControlUnit(ours, hint, weight=w, guidance_start=s, guidance_end=e, control_mode=mode,
                        resize_mode="just_resize")
            for (ours, _), hint, w, s, e in zip(side.nets, hints, scales, starts, ends)]


def _theirs_kw(count, scales, starts, ends, guess):
    one = count == 1
    return dict(controlnet_conditioning_scale=scales[0] if one else list(scales),
                control_guidance_start=starts[0] if one else list(starts),
                control_guidance_end=ends[0] if one else list(ends), guess_mode=guess)


CASES = [  # (controlnets, scales, starts, ends, guess mode, scheduler, negative prompt)
    (1, (0.8,), (0.0,), (1.0,), False, "euler", NEGATIVE),
    (1, (1.0,), (0.25,), (0.75,), False, "ddim", None),  # None: zeroed negatives on both sides
    (1, (0.9,), (0.0,), (1.0,), True, "euler", NEGATIVE),
    (2, (0.6, 1.0), (0.0, 0.0), (0.5, 1.0), True, "dpmpp_2m", NEGATIVE),
]


@pytest.mark.parametrize("count,scales,starts,ends,guess,scheduler,negative", CASES)
def test_txt2img_with_control_matches_diffusers(sides, count, scales, starts, ends, guess,
                                                scheduler, negative):
    side = sides()
    hints = _hints(count)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE, width=SIZE)
    units = _units(side, hints, scales, starts, ends, guess)
    ours = side.ours.txt2img(PROMPT, negative_prompt=negative or "", scheduler=scheduler, seed=SEED,
                             progress=False, control=units, **kw)
    theirs = side.reference("txt2img", count, scheduler)(
        PROMPT, image=hints[0] if count == 1 else hints, negative_prompt=negative,
        generator=torch.Generator("cpu").manual_seed(SEED),
        **_theirs_kw(count, scales, starts, ends, guess), **kw).images[0]
    assert_close(ours.images[0], theirs)
    plain = side.ours.txt2img(PROMPT, negative_prompt=negative or "", scheduler=scheduler,
                              seed=SEED, progress=False, **kw)
    assert_far(plain.images[0], theirs)


def test_img2img_with_control_matches_diffusers(sides):
    side = sides()
    image, hints = dp.sample_image(SIZE, SIZE), _hints(1)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, strength=0.75)
    units = _units(side, hints, (0.8,), (0.0,), (0.8,), False)
    ours = side.ours.img2img(PROMPT, image, negative_prompt=NEGATIVE, scheduler="euler", seed=SEED,
                             progress=False, control=units, **kw)
    theirs = side.reference("img2img", 1)(
        PROMPT, image=image, control_image=hints[0], negative_prompt=NEGATIVE,
        generator=torch.Generator("cpu").manual_seed(SEED),
        **_theirs_kw(1, (0.8,), (0.0,), (0.8,), False), **kw).images[0]
    assert_close(ours.images[0], theirs)
    plain = side.ours.img2img(PROMPT, image, negative_prompt=NEGATIVE, scheduler="euler", seed=SEED,
                              progress=False, **kw)
    assert_far(plain.images[0], theirs)


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-inpaint"])
def test_inpaint_with_control_matches_diffusers(sides, kind):
    """A plain base and the 9-channel inpainting model; the ControlNet reads the 4 latent channels."""
    side = sides(kind)
    image, mask, hints = dp.sample_image(SIZE, SIZE), dp.box_mask(SIZE, SIZE), _hints(1)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, strength=1.0)
    units = _units(side, hints, (1.0,), (0.0,), (1.0,), False)
    ours = side.ours.inpaint(PROMPT, image, mask, negative_prompt=NEGATIVE, scheduler="euler",
                             seed=SEED, progress=False, control=units, **kw)
    theirs = side.reference("inpaint", 1)(
        PROMPT, image=image, mask_image=mask, control_image=hints[0], negative_prompt=NEGATIVE,
        height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(SEED),
        **_theirs_kw(1, (1.0,), (0.0,), (1.0,), False), **kw).images[0]
    inside = np.asarray(mask) == 255
    assert_close(ours.images[0], theirs, inside)
    assert np.array_equal(_u8(ours.images[0])[~inside], _u8(image)[~inside])
    plain = side.ours.inpaint(PROMPT, image, mask, negative_prompt=NEGATIVE, scheduler="euler",
                              seed=SEED, progress=False, **kw)
    assert_far(plain.images[0], theirs, inside)


def test_a_shallower_diffusers_controlnet_matches_diffusers(sides, tmp_path):
    """A diffusers-layout ControlNet with fewer transformer blocks than the UNet (as diffusers'
    smaller SDXL ControlNets have), loaded from its single file by path, as diffusers runs it."""
    from safetensors.torch import save_file

    side = sides()
    theirs_net = random_diffusers_sdxl_controlnet(seed=7, depths=(1, 1))  # zero convs random too
    path = tmp_path / "mid.safetensors"
    save_file({k: v.contiguous() for k, v in theirs_net.state_dict().items()}, str(path))
    hint = _hints(1)[0]
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE, width=SIZE)
    unit = ControlUnit(str(path), hint, weight=0.9, resize_mode="just_resize")
    ours = side.ours.txt2img(PROMPT, negative_prompt=NEGATIVE, scheduler="euler", seed=SEED,
                             progress=False, control=[unit], **kw)
    theirs = sdxl_pipeline(side.model, side.tree, dp.reference_scheduler("euler"), "txt2img",
                           controlnet=theirs_net)(
        PROMPT, image=hint, negative_prompt=NEGATIVE, controlnet_conditioning_scale=0.9,
        generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]
    assert_close(ours.images[0], theirs)
    plain = side.ours.txt2img(PROMPT, negative_prompt=NEGATIVE, scheduler="euler", seed=SEED,
                              progress=False, **kw)
    assert_far(plain.images[0], theirs)
