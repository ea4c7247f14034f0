"""SDXL generation against diffusers' StableDiffusionXLPipeline on identical random weights (tiny
base and refiner models, converted by diffusers' single-file code): same seed, steps, guidance,
sizes; 8-bit images within 1/255 on average."""
from __future__ import annotations

import pytest
import torch

from pipelines.pipeline import Pipeline
from reference import pipelines as dp
from reference.sdxl import random_sdxl_model, sdxl_pipeline
from reference.tiny import tiny_sdxl_tree
from tests.pipelines.test_pipeline_parity import assert_close, assert_far

SEED, STEPS, SIZE = 11, 4, 32
PROMPT, NEGATIVE, OTHER = "a red circle", "blurry", "a blue square on grass"


class Side:
    def __init__(self, kind: str):
        self.model = random_sdxl_model(kind)
        self.tree = tiny_sdxl_tree(kind)
        self.ours = Pipeline(self.model, device="cpu", model_name=f"tiny-{kind}")

    def reference(self, scheduler: str, task: str = "txt2img"):
        return sdxl_pipeline(self.model, self.tree, dp.reference_scheduler(scheduler), task)


@pytest.fixture(scope="module")
def sides():
    cache: dict[str, Side] = {}

    def get(kind: str) -> Side:
        if kind not in cache:
            cache[kind] = Side(kind)
        return cache[kind]

    return get


# (model, scheduler, negative prompt; None: ours gets "" and diffusers None -> zeroed on the base)
CASES = [("sdxl", "euler", NEGATIVE), ("sdxl", "ddim", None), ("sdxl", "dpmpp_2m", NEGATIVE)]


@pytest.mark.parametrize("kind, scheduler, negative", CASES)
def test_txt2img_matches_diffusers(sides, kind, scheduler, negative):
    side = sides(kind)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE, width=SIZE)
    ours = side.ours.txt2img(PROMPT, negative_prompt=negative or "", scheduler=scheduler, seed=SEED,
                             progress=False, **kw)
    ref = side.reference(scheduler)
    theirs = ref(PROMPT, negative_prompt=negative, generator=torch.Generator("cpu").manual_seed(SEED),
                 **kw).images[0]
    assert ours.images[0].size == (SIZE, SIZE)
    assert_close(ours.images[0], theirs)
    other = side.ours.txt2img(OTHER, negative_prompt=negative or "", scheduler=scheduler, seed=SEED,
                              progress=False, **kw)
    assert_far(other.images[0], theirs)


def test_empty_negative_is_zeroed_on_the_base_only():
    from pipelines.sdxl import sdxl_conditioning

    for kind, zeroed in (("sdxl", True), ("sdxl-refiner", False)):
        model = random_sdxl_model(kind)
        context, y = sdxl_conditioning(model, ["a cat"], [""], 0, 2, 64, 48, True, torch.float32)
        assert context.shape[0] == y.shape[0] == 4
        assert bool((context[:2] == 0).all()) == zeroed
        pooled_width = model.config.conditioner.texts[-1].projection_dim
        assert bool((y[:2, :pooled_width] == 0).all()) == zeroed
        assert torch.equal(y[2], y[3])  # the size features of both images: (64, 48), crop (0, 0)


def test_weighted_and_long_prompts_reach_both_towers():
    from pipelines.sdxl import sdxl_conditioning

    model = random_sdxl_model("sdxl")
    args = (0, 1, 32, 32, False, torch.float32)
    plain, _ = sdxl_conditioning(model, ["a red circle"], [""], *args)
    weighted, _ = sdxl_conditioning(model, ["a (red:1.5) circle"], [""], *args)
    assert plain.shape == weighted.shape == (1, 77, 64)
    changed = (plain - weighted).abs().amax(dim=(0, 1))
    assert bool((changed[:32] > 0).any()) and bool((changed[32:] > 0).any())  # CLIP-L and bigG
    long, y = sdxl_conditioning(model, ["circle, " * 60], [""], *args)
    assert long.shape == (1, 154, 64) and y.shape == (1, 80)


# the refiner's aesthetic score is diffusers' img2img pipeline's (requires_aesthetics_score)
IMG2IMG = [("sdxl", "euler", NEGATIVE), ("sdxl-refiner", "euler", NEGATIVE),
           ("sdxl-refiner", "ddim", None)]


@pytest.mark.parametrize("kind, scheduler, negative", IMG2IMG)
def test_img2img_matches_diffusers(sides, kind, scheduler, negative):
    side = sides(kind)
    image = dp.sample_image(SIZE, SIZE)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, strength=0.75)
    ours = side.ours.img2img(PROMPT, image, negative_prompt=negative or "", scheduler=scheduler,
                             seed=SEED, progress=False, **kw)
    theirs = side.reference(scheduler, "img2img")(
        PROMPT, image=image, negative_prompt=negative,
        generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]
    assert_close(ours.images[0], theirs)
    other = side.ours.img2img(OTHER, image, negative_prompt=negative or "", scheduler=scheduler,
                              seed=SEED, progress=False, **kw)
    assert_far(other.images[0], theirs)


@pytest.mark.parametrize("kind, scheduler, strength", [("sdxl-inpaint", "euler", 1.0),
                                                       ("sdxl-inpaint", "ddim", 0.75),
                                                       ("sdxl", "ddim", 1.0)])
def test_inpaint_matches_diffusers(sides, kind, scheduler, strength):
    """The 9-channel SDXL inpainting model and a plain base model (known region re-noised each
    step) against diffusers' StableDiffusionXLInpaintPipeline, inside the mask."""
    import numpy as np

    from tests.pipelines.test_pipeline_parity import _u8

    side = sides(kind)
    image, mask = dp.sample_image(SIZE, SIZE), dp.box_mask(SIZE, SIZE)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, strength=strength)
    ours = side.ours.inpaint(PROMPT, image, mask, negative_prompt=NEGATIVE, scheduler=scheduler,
                             seed=SEED, progress=False, **kw)
    theirs = side.reference(scheduler, "inpaint")(
        PROMPT, image=image, mask_image=mask, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
        generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]
    inside = np.asarray(mask) == 255
    assert_close(ours.images[0], theirs, inside)
    assert np.array_equal(_u8(ours.images[0])[~inside], _u8(image)[~inside])
    other = side.ours.inpaint(OTHER, image, mask, negative_prompt=NEGATIVE, scheduler=scheduler,
                              seed=SEED, progress=False, **kw)
    assert_far(other.images[0], theirs, inside)


def test_ldm_txt2img_with_an_sdxl_file(tmp_path, capsys):
    """The command line end to end: a tiny SDXL single file (its config in the header), detected,
    loaded and sampled; the PNG carries its parameters."""
    from PIL import Image

    from cli.main import main
    from ldm.checkpoint import save_checkpoint

    save_checkpoint(random_sdxl_model("sdxl"), tmp_path / "xl.safetensors")
    out = tmp_path / "x.png"
    code = main(["txt2img", "a red circle", "--checkpoint", str(tmp_path / "xl.safetensors"),
                 "--steps", "2", "--seed", "3", "--width", "32", "--height", "32", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    image = Image.open(out)
    assert image.size == (32, 32) and "Seed: 3" in image.info["parameters"]


def test_size_conditioning_matches_diffusers(sides):
    """The micro-conditioning fields reach y as diffusers' arguments of the same names do."""
    from pipelines.sdxl import SizeConditioning

    side = sides("sdxl")
    sizes = dict(original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(64, 48),
                 negative_original_size=(256, 256), negative_target_size=(32, 32))
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE, width=SIZE)
    ours = side.ours.txt2img(PROMPT, negative_prompt=NEGATIVE, scheduler="euler", seed=SEED,
                             progress=False, sdxl=SizeConditioning(**sizes), **kw)
    theirs = side.reference("euler")(PROMPT, negative_prompt=NEGATIVE, **sizes,
                                     generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]
    assert_close(ours.images[0], theirs)
    plain = side.ours.txt2img(PROMPT, negative_prompt=NEGATIVE, scheduler="euler", seed=SEED,
                              progress=False, **kw)
    assert_far(plain.images[0], theirs)


def test_aesthetic_scores_match_diffusers(sides):
    side = sides("sdxl-refiner")
    image = dp.sample_image(SIZE, SIZE)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, strength=0.75)
    ours = side.ours.img2img(PROMPT, image, negative_prompt=NEGATIVE, scheduler="euler", seed=SEED,
                             progress=False, sdxl={"aesthetic_score": 9.0,
                                                   "negative_aesthetic_score": 1.0}, **kw)
    theirs = side.reference("euler", "img2img")(
        PROMPT, image=image, negative_prompt=NEGATIVE, aesthetic_score=9.0,
        negative_aesthetic_score=1.0, generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]
    assert_close(ours.images[0], theirs)


def test_bad_size_conditioning_is_refused():
    from pipelines.request import GenerationRequest

    with pytest.raises(ValueError, match=r"sdxl.target_size must be \(height, width\)"):
        GenerationRequest("txt2img", "a cat", sdxl={"target_size": (1024,)})
    with pytest.raises(ValueError, match="sdxl must be a pipelines.sdxl.SizeConditioning"):
        GenerationRequest("txt2img", "a cat", sdxl=(1024, 1024))


def test_refiner_txt2img_is_one_error_line(tmp_path, capsys):
    from cli.main import main
    from ldm.checkpoint import save_checkpoint

    save_checkpoint(random_sdxl_model("sdxl-refiner"), tmp_path / "refiner.safetensors")
    code = main(["txt2img", "a red circle", "--checkpoint", str(tmp_path / "refiner.safetensors"),
                 "--steps", "1", "--width", "32", "--height", "32", "-o", str(tmp_path / "x.png"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("error:")
    assert "SDXL refiner" in err and not (tmp_path / "x.png").exists()


def test_size_conditioning_on_an_sd1_model_is_refused():
    from reference.pipelines import random_model

    pipe = Pipeline(random_model("sd1"), device="cpu")
    with pytest.raises(ValueError, match="is for SDXL models"):
        pipe.txt2img("a cat", sdxl={"target_size": (64, 64)}, num_inference_steps=1, progress=False)


def test_guidance_off_matches_diffusers(sides):
    """guidance_scale 1: only the conditional half is encoded and run (no negative prompt)."""
    side = sides("sdxl")
    kw = dict(num_inference_steps=STEPS, guidance_scale=1.0, height=SIZE, width=SIZE)
    ours = side.ours.txt2img(PROMPT, scheduler="euler", seed=SEED, progress=False, **kw)
    theirs = side.reference("euler")(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED),
                                     **kw).images[0]
    assert_close(ours.images[0], theirs)
