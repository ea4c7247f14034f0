"""The refiner hand-off (diffusers' denoising_end / denoising_start): the base stops at a fraction of
the schedule and hands its still-noisy latents to a second model's img2img, which continues
without adding noise. Against diffusers' StableDiffusionXL pipelines on identical tiny weights."""
from __future__ import annotations

import pytest
import torch

from pipelines.pipeline import Pipeline
from reference import pipelines as dp
from reference.sdxl import random_sdxl_model, sdxl_pipeline
from reference.tiny import tiny_sdxl_tree
from tests.pipelines.test_pipeline_parity import assert_close, assert_far

pytestmark = pytest.mark.usefixtures("single_thread")
SEED, STEPS, SIZE, PROMPT = 5, 6, 32, "a red circle"


@pytest.fixture(scope="module")
def models():
    return {kind: (random_sdxl_model(kind), tiny_sdxl_tree(kind)) for kind in ("sdxl", "sdxl-refiner")}


@pytest.mark.parametrize("scheduler,switch", [("euler", 0.8), ("ddim", 0.5), ("dpmpp_2m", 0.7)])
def test_hand_off_matches_diffusers(models, scheduler, switch):
    (base, base_tree), (refiner, refiner_tree) = models["sdxl"], models["sdxl-refiner"]
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0)
    ours_base = Pipeline(base, device="cpu")
    ours_refiner = Pipeline(refiner, device="cpu")
    latents = ours_base.txt2img(PROMPT, seed=SEED, scheduler=scheduler, height=SIZE, width=SIZE,
                                denoising_end=switch, output_type="latent", progress=False, **kw).latents
    ours = ours_refiner.img2img(PROMPT, latents, seed=SEED, scheduler=scheduler, denoising_start=switch,
                                progress=False, **kw).images[0]
    ref_base = sdxl_pipeline(base, base_tree, dp.reference_scheduler(scheduler))
    ref_refiner = sdxl_pipeline(refiner, refiner_tree, dp.reference_scheduler(scheduler), "img2img")
    gen = torch.Generator("cpu").manual_seed(SEED)
    their_latents = ref_base(PROMPT, height=SIZE, width=SIZE, denoising_end=switch, output_type="latent",
                             generator=gen, negative_prompt=None, **kw).images
    # the same steps ran: latents agree to rounding (random tiny SDXL weights amplify it a little)
    assert (latents - their_latents).abs().mean() < 2e-3 * their_latents.abs().mean()
    theirs = ref_refiner(PROMPT, image=their_latents, denoising_start=switch, negative_prompt=None,
                         generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]
    assert_close(ours, theirs)
    whole = ours_refiner.img2img(PROMPT, latents, seed=SEED, scheduler=scheduler, strength=0.9,
                                 progress=False, **kw).images[0]
    assert_far(whole, theirs)  # continuing differs visibly from re-noising the same latents


def test_hand_off_settings_are_checked():
    base = dp.random_model("sd1")
    pipe = Pipeline(base, device="cpu")
    from pipelines.request import GenerationRequest

    with pytest.raises(ValueError, match="denoising_start is for img2img"):
        GenerationRequest("txt2img", PROMPT, denoising_start=0.5)
    with pytest.raises(ValueError, match="denoising_end"):
        pipe.txt2img(PROMPT, denoising_end=1.5, progress=False)
    # a schedule cut at 0.5 runs the first half of the timesteps only
    seen = []
    pipe.txt2img(PROMPT, num_inference_steps=10, denoising_end=0.5, scheduler="ddim", seed=1,
                 height=32, width=32, progress=False, output_type="latent",
                 callback=lambda i, total, x: seen.append(total))
    assert seen[0] == 5
