"""Hires fix: the second pass is img2img on the upscaled first pass, bit for bit; sizes and PNG
fields as A1111 makes them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.hires import HiresFix, upscale_image
from pipelines.images import format_parameters, parse_parameters
from pipelines.pipeline import Pipeline
from pipelines.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = "a red circle on a blue background"
KW = dict(num_inference_steps=6, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_checkpoint()


@pytest.mark.parametrize("upscaler,mode,antialias", [("Latent", "bilinear", False),
                                                     ("Latent (bicubic antialiased)", "bicubic", True),
                                                     ("Latent (nearest)", "nearest", False)])
def test_latent_second_pass_is_img2img_on_the_upscaled_latents(pipe, upscaler, mode, antialias):
    hires = HiresFix(scale=1.5, upscaler=upscaler, denoising_strength=0.6, steps=8)
    result = pipe.txt2img([PROMPT, "a green square"], seed=3, hires=hires, return_latents=True, **KW)
    first = pipe.txt2img([PROMPT, "a green square"], seed=3, output_type="latent", **KW).latents
    # the upscale written out independently: F.interpolate with A1111's mode for the latent upscaler
    up = F.interpolate(first, size=(12, 12), mode=mode, antialias=antialias)
    second = pipe.img2img([PROMPT, "a green square"], up, seed=3, strength=0.6,
                          num_inference_steps=8, progress=False)
    assert result.images[0].size == (96, 96)
    for a, b in zip(result.images, second.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert result.seeds == [3, 4]


def test_pixel_second_pass_is_img2img_on_the_resized_image(pipe):
    hires = HiresFix(resize_x=96, resize_y=128, upscaler="Lanczos", denoising_strength=0.5,
                     sampler="euler_a", prompt="a red circle")
    result = pipe.txt2img(PROMPT, seed=8, hires=hires, **KW)
    first = pipe.txt2img(PROMPT, seed=8, **KW).images[0]
    # both sides given: cover (128×128 for a square base), then crop the middle 96×128
    up = first.resize((128, 128), Image.LANCZOS)
    big = up.crop((16, 0, 112, 128))
    assert np.array_equal(np.asarray(upscale_image(first, hires, (128, 128), (96, 128))),
                          np.asarray(big))
    second = pipe.img2img("a red circle", big, seed=8, strength=0.5, scheduler="euler_a",
                          negative_prompt="", num_inference_steps=6, progress=False)
    assert result.images[0].size == (96, 128)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(second.images[0]))


@pytest.mark.parametrize("kw,base,up,final", [
    (dict(scale=2), (64, 48), (128, 96), (128, 96)),
    (dict(scale=1.3), (64, 64), (80, 80), (80, 80)),  # int(83.2) → 83 → 80
    (dict(resize_x=128), (64, 48), (128, 96), (128, 96)),
    (dict(resize_y=96), (64, 48), (128, 96), (128, 96)),
    (dict(resize_x=128, resize_y=64), (64, 64), (128, 128), (128, 64)),
    (dict(resize_x=64, resize_y=128), (64, 64), (128, 128), (64, 128)),
])
def test_sizes_follow_a1111(kw, base, up, final):
    assert HiresFix(**kw).sizes(*base) == (up, final)


def test_parameters_record_the_hires_pass(pipe):
    hires = HiresFix(scale=2, denoising_strength=0.55, steps=9, sampler="ddim")
    result = pipe.txt2img(PROMPT, seed=1, hires=hires, output_type="latent", **KW)
    text = format_parameters(result.parameters[0])
    assert "Size: 64x64" in text  # the first pass's size, as A1111 writes it
    for field in ("Denoising strength: 0.55", "Hires upscaler: Latent", "Hires upscale: 2",
                  "Hires steps: 9", "Hires sampler: DDIM"):
        assert field in text
    back = parse_parameters(text)
    assert back["mode"] == "txt2img" and back["strength"] == 0.55 and back["Hires upscale"] == "2"
    assert result.latents.shape[-2:] == (16, 16)


@pytest.mark.parametrize("kw,message", [(dict(scale=0.5), "scale"), (dict(upscaler="ESRGAN"), "upscaler"),
                                        (dict(denoising_strength=2), "denoising_strength"),
                                        (dict(sampler="nope"), "nope")])
def test_bad_hires_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        HiresFix(**kw)


def test_hires_is_txt2img_only_and_needs_seeds(pipe):
    image = pipe.txt2img(PROMPT, seed=1, **KW).images[0]
    with pytest.raises(ValueError, match="txt2img only"):
        GenerationRequest("img2img", PROMPT, image=image, hires=HiresFix())
    with pytest.raises(ValueError, match="seed="):
        pipe.txt2img(PROMPT, generator=torch.Generator().manual_seed(1), hires=HiresFix(), **KW)
