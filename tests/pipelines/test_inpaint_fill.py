"""A1111's "masked content" below strength 1: the masked latents start from the seed's noise or
from zero instead of the image's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.pipeline import Pipeline
from reference import pipelines as dp

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_checkpoint()


def _start(pipe, fill):
    """The latents the loop starts from: 4 steps at strength 0.1 run none of them."""
    image, mask = dp.sample_image(64, 64), dp.box_mask(64, 64, (16, 16, 48, 48))
    return pipe.inpaint("a red circle", image, mask, strength=0.1, num_inference_steps=4, seed=5,
                        inpainting_fill=fill, output_type="latent", progress=False).latents, mask


@pytest.mark.parametrize("fill", ["latent_noise", "latent_nothing"])
def test_masked_latents_start_from_noise_or_nothing(pipe, fill):
    original, mask = _start(pipe, "original")
    filled, _ = _start(pipe, fill)
    m = F.interpolate(torch.from_numpy(np.asarray(mask) / 255.0)[None, None].float(),
                      size=(8, 8)) > 0.5
    m = m.expand_as(filled)
    # drawn in diffusers' order: the image's posterior sample, then the noise
    gen = torch.Generator().manual_seed(5)
    torch.randn((1, 4, 8, 8), generator=gen)
    noise = torch.randn((1, 4, 8, 8), generator=gen)
    expected = noise if fill == "latent_noise" else torch.zeros_like(noise)
    assert torch.equal(filled[m], expected[m])
    assert torch.equal(filled[~m], original[~m])
    assert not torch.equal(filled[m], original[m])


def test_unknown_fill_is_refused(pipe):
    with pytest.raises(ValueError, match="inpainting_fill"):
        _start(pipe, "latent noise")
