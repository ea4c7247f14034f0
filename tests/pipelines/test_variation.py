"""Variation seeds and "resize seed from": the initial noise A1111 makes (CPU random source), and
what the pipeline does with it."""
from __future__ import annotations

import pytest
import torch

from pipelines.images import format_parameters, parse_parameters
from pipelines.latents import Canvas
from pipelines.pipeline import Pipeline
from pipelines.variation import Variation

pytestmark = pytest.mark.usefixtures("single_thread")


def a1111_noise(shape, seed, subseed, strength, resize_h, resize_w):
    """A1111's ``create_random_tensors`` for one image, written from its documented steps with the
    global RNG it uses (``torch.manual_seed`` + ``torch.randn``)."""
    def randn(s, sh):
        torch.manual_seed(s)
        return torch.randn(sh)

    def slerp(val, low, high):
        low_norm = low / torch.norm(low, dim=1, keepdim=True)
        high_norm = high / torch.norm(high, dim=1, keepdim=True)
        dot = (low_norm * high_norm).sum(1)
        if dot.mean() > 0.9995:
            return low * val + high * (1 - val)
        omega = torch.acos(dot)
        so = torch.sin(omega)
        return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + \
            (torch.sin(val * omega) / so).unsqueeze(1) * high

    noise_shape = shape if resize_h <= 0 or resize_w <= 0 else (shape[0], resize_h // 8, resize_w // 8)
    subnoise = randn(subseed, noise_shape) if strength != 0 else None
    noise = randn(seed, noise_shape)
    if subnoise is not None:
        noise = slerp(strength, noise, subnoise)
    if noise_shape != shape:
        x = randn(seed, shape)
        dx, dy = (shape[2] - noise_shape[2]) // 2, (shape[1] - noise_shape[1]) // 2
        w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
        h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
        tx, ty, dx, dy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
        x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
        noise = x
    return noise


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_checkpoint()


@pytest.mark.parametrize("strength,resize", [(0.3, (0, 0)), (0.9, (0, 0)), (0.0, (32, 48)),
                                             (0.5, (96, 40)), (1.0, (0, 0))])
def test_noise_equals_a1111(pipe, strength, resize):
    seeds, subseed = [11, 12], 400
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    variation = Variation(seeds, [subseed + i for i in range(2)] if strength else None, strength,
                          resize if resize[0] else None)
    canvas = Canvas(pipe.model, torch.device("cpu"), torch.float32, gens, 2, 64, 64, variation)
    ours = canvas.noise()
    for i, seed in enumerate(seeds):
        expected = a1111_noise((4, 8, 8), seed, subseed + i, strength, *resize)
        torch.testing.assert_close(ours[i], expected, atol=0, rtol=0)


def _latents(pipe, **kw):
    return pipe.txt2img("a red circle", num_inference_steps=4, progress=False, output_type="latent",
                        **kw).latents


def test_strength_zero_and_full_size_resize_change_nothing(pipe):
    plain = _latents(pipe, seed=3)
    assert torch.equal(_latents(pipe, seed=3, subseed=9, subseed_strength=0.0), plain)
    assert torch.equal(_latents(pipe, seed=3, seed_resize_from_h=64, seed_resize_from_w=64), plain)


def test_full_strength_is_the_variation_seed(pipe):
    # DPM++ 2M draws nothing after the initial noise, so only that noise tells the seeds apart
    assert torch.equal(_latents(pipe, seed=3, subseed=9, subseed_strength=1.0), _latents(pipe, seed=9))
    between = _latents(pipe, seed=3, subseed=9, subseed_strength=0.5)
    assert not torch.equal(between, _latents(pipe, seed=3))


def test_parameters_name_the_variation_as_a1111(pipe):
    result = pipe.txt2img("a red circle", seed=3, subseed=9, subseed_strength=0.25, num_images=2,
                          seed_resize_from_h=48, seed_resize_from_w=56, num_inference_steps=2,
                          progress=False)
    text = format_parameters(result.parameters[1])
    assert "Variation seed: 10, Variation seed strength: 0.25" in text
    assert "Seed resize from: 56x48" in text
    back = parse_parameters(text)
    assert back["Variation seed"] == "10" and back["Seed resize from"] == "56x48"
    random_sub = pipe.txt2img("a red circle", seed=3, subseed_strength=0.5, num_inference_steps=2,
                              progress=False)
    assert "Variation seed" in random_sub.parameters[0]  # drawn, and recorded to reproduce it


@pytest.mark.parametrize("kw,message", [
    (dict(subseed_strength=1.5), "subseed_strength"), (dict(subseed=-1, subseed_strength=0.2), "subseed"),
    (dict(seed_resize_from_h=30, seed_resize_from_w=32), "multiple of 8"),
    (dict(seed_resize_from_h=32), "both"),
])
def test_bad_variation_settings(pipe, kw, message):
    with pytest.raises(ValueError, match=message):
        pipe.txt2img("a red circle", seed=1, progress=False, **kw)
