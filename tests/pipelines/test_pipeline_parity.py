"""Image parity with diffusers' Stable Diffusion pipelines on identical random weights.

Our tiny SD1, SD2-v and SD1-inpainting models are converted to diffusers components with diffusers'
own converters; both sides get the same prompt, negative prompt, seed, steps and guidance. Decoded
8-bit images must agree to ≤ 1/255 on average and ≤ 4/255 at any pixel. Each comparison also checks
that the image has structure and that a different prompt lands far outside that tolerance, so an
agreement cannot come from images that ignore their inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.pipeline import Pipeline
from reference import pipelines as dp
from reference.tiny import tiny_tree

SEED = 7
STEPS = 4
SIZE = 32
PROMPT, NEGATIVE, OTHER = "a red circle", "blurry", "a blue square on grass"


class Side:
    """Our pipeline and the diffusers components for one tiny model."""

    def __init__(self, kind: str):
        self.kind = kind
        model = dp.random_model(kind)
        self.parts = dp.components(model, tiny_tree(kind))
        self.prediction = model.config.parameterization
        self.ours = Pipeline(model, device="cpu", model_name=f"tiny-{kind}")

    def reference(self, task: str, scheduler: str):
        return dp.pipeline(task, self.parts, dp.reference_scheduler(scheduler, self.prediction))


@pytest.fixture(scope="module")
def sides():
    cache: dict[str, Side] = {}

    def get(kind: str) -> Side:
        if kind not in cache:
            cache[kind] = Side(kind)
        return cache[kind]

    return get


def _u8(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def assert_close(ours, theirs, region=None):
    a, b = _u8(ours), _u8(theirs)
    assert a.shape == b.shape
    if region is not None:
        a, b = a[region], b[region]
    diff = np.abs(a - b)
    assert a.std() > 8, f"image too flat for a meaningful comparison (std {a.std():.1f})"
    assert diff.mean() <= 1.0 and diff.max() <= 4, f"mean {diff.mean():.3f}, max {diff.max()}"


def assert_far(ours, theirs, region=None):
    a, b = _u8(ours), _u8(theirs)
    if region is not None:
        a, b = a[region], b[region]
    assert np.abs(a - b).mean() > 4.0, "a different prompt gave nearly the same image"


def _common(**extra):
    return dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, **extra)


# (model, scheduler, guidance_rescale, eta): eta > 0 makes DDIM draw noise from the generator
CASES = [("sd1", "ddim", 0.0, 0.0), ("sd1", "ddim", 0.0, 0.6), ("sd1", "euler_a", 0.0, 0.0),
         ("sd1", "dpmpp_2m_karras", 0.0, 0.0), ("sd2-v", "ddim", 0.7, 0.0),
         ("sd2-v", "euler_a", 0.0, 0.0), ("sd2-v", "dpmpp_2m_karras", 0.5, 0.0)]


@pytest.mark.parametrize("kind,scheduler,rescale,eta", CASES)
def test_txt2img_matches_diffusers(sides, kind, scheduler, rescale, eta):
    side = sides(kind)
    kw = _common(height=SIZE, width=SIZE, guidance_rescale=rescale, eta=eta)
    ours = side.ours.txt2img(PROMPT, scheduler=scheduler, seed=SEED, progress=False, **kw)
    ref = side.reference("txt2img", scheduler)
    theirs = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]
    assert ours.images[0].size == (SIZE, SIZE)
    assert_close(ours.images[0], theirs)
    other = side.ours.txt2img(OTHER, scheduler=scheduler, seed=SEED, progress=False, **kw)
    assert_far(other.images[0], theirs)


def test_txt2img_batch_matches_diffusers_generator_list(sides):
    """Image i of a seeded batch is diffusers' image for Generator().manual_seed(seed + i)."""
    side = sides("sd1")
    kw = _common(height=SIZE, width=SIZE)
    ours = side.ours.txt2img(PROMPT, scheduler="euler_a", seed=SEED, num_images=2, progress=False, **kw)
    gens = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(2)]
    theirs = side.reference("txt2img", "euler_a")(PROMPT, generator=gens, num_images_per_prompt=2,
                                                   **kw).images
    assert ours.seeds == [SEED, SEED + 1]
    for a, b in zip(ours.images, theirs):
        assert_close(a, b)
    assert_far(ours.images[0], ours.images[1])


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_img2img_matches_diffusers(sides, scheduler):
    side = sides("sd1")
    image = dp.sample_image(SIZE, SIZE)
    kw = _common(strength=0.6)
    ours = side.ours.img2img(PROMPT, image, scheduler=scheduler, seed=SEED, progress=False, **kw)
    ref = side.reference("img2img", scheduler)
    theirs = ref(PROMPT, image=image, generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]
    assert_close(ours.images[0], theirs)
    other = side.ours.img2img(OTHER, image, scheduler=scheduler, seed=SEED, progress=False, **kw)
    assert_far(other.images[0], theirs)


def _inside(mask) -> np.ndarray:
    return np.asarray(mask) == 255


@pytest.mark.parametrize("scheduler,strength", [("ddim", 1.0), ("euler_a", 1.0),
                                                ("dpmpp_2m_karras", 1.0), ("ddim", 0.75)])
def test_inpaint_9_channel_matches_diffusers(sides, scheduler, strength):
    side = sides("sd1-inpaint")
    image, mask = dp.sample_image(SIZE, SIZE), dp.box_mask(SIZE, SIZE)
    kw = _common(strength=strength)
    ours = side.ours.inpaint(PROMPT, image, mask, scheduler=scheduler, seed=SEED, progress=False,
                             return_latents=True, **kw)
    ref = side.reference("inpaint", scheduler)
    gen = lambda: torch.Generator("cpu").manual_seed(SEED)  # noqa: E731
    theirs = ref(PROMPT, image=image, mask_image=mask, generator=gen(), height=SIZE, width=SIZE, **kw)
    # diffusers returns the whole decoded image; ours pastes it into the original: compare the
    # repainted area, and the latents everywhere
    inside = _inside(mask)
    assert_close(ours.images[0], theirs.images[0], inside)
    latents = ref(PROMPT, image=image, mask_image=mask, generator=gen(), height=SIZE, width=SIZE,
                  output_type="latent", **kw).images
    torch.testing.assert_close(ours.latents, latents, atol=2e-3, rtol=2e-3)
    assert np.array_equal(_u8(ours.images[0])[~inside], _u8(image)[~inside])
    other = side.ours.inpaint(OTHER, image, mask, scheduler=scheduler, seed=SEED, progress=False, **kw)
    assert_far(other.images[0], theirs.images[0], inside)


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpaint_4_channel_matches_diffusers(sides, strength):
    """An ordinary model inpaints by re-noising the known region every step; diffusers'
    StableDiffusionInpaintPipeline does the same with a 4-channel UNet. (DDIM with eta 0 draws no
    noise while stepping, so the extra posterior sample diffusers draws for its unused masked-image
    latents does not matter.)"""
    side = sides("sd1")
    image, mask = dp.sample_image(SIZE, SIZE), dp.box_mask(SIZE, SIZE)
    kw = _common(strength=strength)
    ours = side.ours.inpaint(PROMPT, image, mask, scheduler="ddim", seed=SEED, progress=False, **kw)
    ref = side.reference("inpaint", "ddim")
    theirs = ref(PROMPT, image=image, mask_image=mask, generator=torch.Generator("cpu").manual_seed(SEED),
                 height=SIZE, width=SIZE, **kw).images[0]
    inside = _inside(mask)
    assert_close(ours.images[0], theirs, inside)
    assert np.array_equal(_u8(ours.images[0])[~inside], _u8(image)[~inside])


def test_img2img_strength_zero_is_the_autoencoder_round_trip(sides):
    """No step runs: the result is the decoded posterior sample of the input, drawn with the
    seed's generator (diffusers' VAE, sampled the way its pipelines sample)."""
    side = sides("sd1")
    image = dp.sample_image(SIZE, SIZE)
    ours = side.ours.img2img(PROMPT, image, strength=0.0, seed=SEED, num_inference_steps=5,
                             progress=False)
    vae = side.parts["vae"]
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(torch.Generator("cpu").manual_seed(SEED))
        y = vae.decode(z).sample
    ref = ((y / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    from PIL import Image

    assert_close(ours.images[0], Image.fromarray(ref))
