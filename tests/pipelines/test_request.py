"""The generation request: a frozen value, normalised and checked when made, whose fields are the
entry points' parameters."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from PIL import Image

from pipelines.pipeline import Pipeline
from pipelines.request import PARAMETERS, GenerationRequest

IMAGE = Image.new("RGB", (16, 16), "red")
MASK = Image.new("L", (16, 16), 255)


def test_prompts_are_normalised_to_equal_length_tuples():
    r = GenerationRequest("txt2img", ["a cat", "a dog"], negative_prompt="blurry", num_images=3)
    assert r.prompt == ("a cat", "a dog") and r.negative_prompt == ("blurry", "blurry")
    assert r.batch == 6
    assert GenerationRequest("txt2img", "a cat").prompt == ("a cat",)


def test_frozen_and_replace_checks_again():
    r = GenerationRequest("img2img", "a cat", image=IMAGE, strength=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.strength = 0.7
    assert r.replace(strength=0.25).strength == 0.25 and r.strength == 0.5
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\], got 2"):
        r.replace(strength=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="sketch"), "mode must be one of txt2img, img2img, inpaint"),
    (dict(prompt=[]), "prompt must be a string or a non-empty list of strings"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries but prompt has 1"),
    (dict(num_inference_steps=0), "num_inference_steps must be >= 1, got 0"),
    (dict(num_inference_steps=2.0), "num_inference_steps must be an integer, got 2.0"),
    (dict(guidance_scale="high"), "guidance_scale must be a number, got 'high'"),
    (dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\], got 1.5"),
    (dict(eta=-0.1), "eta must be >= 0, got -0.1"),
    (dict(clip_skip=-1), "clip_skip must be >= 0, got -1"),
    (dict(num_images=0), "num_images must be >= 1, got 0"),
    (dict(scheduler="k_lms"), "unknown scheduler 'k_lms'; choose one of ddim"),
    (dict(height=30), "height must be a multiple of 8, got 30"),
    (dict(width=True), "width must be a positive integer, got True"),
    (dict(output_type="np"), "output_type must be one of pil, latent, got 'np'"),
    (dict(callback=3), "callback must be callable"),
    (dict(seed=-1), "seed must be in"),
    (dict(seed=2**64 - 1, num_images=2), "seed must be in"),
    (dict(seed=1, generator=torch.Generator()), "give seed or generator, not both"),
    (dict(generator="g"), "generator must be a torch.Generator"),
    (dict(generator=[torch.Generator()] * 2), "got 2 generators for 1 images"),
    (dict(image=IMAGE), "txt2img takes no image"),
    (dict(mode="img2img"), "image must be a PIL.Image.Image, got NoneType"),
    (dict(mode="inpaint", image=IMAGE), "mask must be a PIL.Image.Image, got NoneType"),
    (dict(mode="inpaint", image=IMAGE, mask=MASK, mask_blur=-2), "mask_blur must be >= 0, got -2"),
])
def test_invalid_requests(kwargs, message):
    kwargs = {"mode": "txt2img", "prompt": "a cat", **kwargs}
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**kwargs)


def test_unset_settings_stay_unset_until_the_pipeline_fills_them():
    r = GenerationRequest("txt2img", "a cat")
    assert (r.num_inference_steps, r.guidance_scale, r.scheduler, r.height, r.width) == (None,) * 5


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_entry_points_take_the_request_fields_with_their_defaults(mode):
    """One source of truth: every parameter of an entry point is a request field with the same
    default (strength aside, whose default is per mode), and is documented."""
    fields = {f.name: f for f in dataclasses.fields(GenerationRequest)}
    params = {n: p for n, p in inspect.signature(getattr(Pipeline, mode)).parameters.items()
              if n != "self"}
    assert set(params) <= set(fields)
    for name, p in params.items():
        if p.default is not inspect.Parameter.empty and name != "strength":
            assert p.default == fields[name].default, name
        assert name in getattr(Pipeline, mode).__doc__ and name in PARAMETERS
    unused = set(fields) - set(params) - {"mode"}
    expected = {"txt2img": {"image", "strength", "mask", "mask_blur", "inpainting_fill",
                            "denoising_start"},
                "img2img": {"mask", "mask_blur", "hires", "inpainting_fill"},
                "inpaint": {"hires", "denoising_end", "denoising_start"}}[mode]
    assert unused == expected


def test_every_field_is_described():
    assert {f.name for f in dataclasses.fields(GenerationRequest)} - {"mode"} == set(PARAMETERS)
