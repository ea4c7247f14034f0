"""Pipeline behaviour on tiny random models: inpainting keeps what is outside the mask, the fp32
fallback of a half-precision decode, img2img strength, sizes, seeds, batches, callbacks, errors."""
from __future__ import annotations

import copy
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import pipelines.latents as latents_module
import pipelines.pipeline as pipeline_module
from pipelines.pipeline import DefaultModelMissing, GenerationResult, Pipeline, resolve_dtype
from reference import pipelines as dp

FAST = dict(num_inference_steps=3, guidance_scale=5.0, progress=False)


@pytest.fixture(scope="module")
def models():
    return {kind: dp.random_model(kind) for kind in ("sd1", "sd1-inpaint")}


@pytest.fixture(scope="module")
def pipe(models):
    return Pipeline(models["sd1"], device="cpu", model_name="tiny")


@pytest.fixture(scope="module")
def inpaint_pipe(models):
    return Pipeline(models["sd1-inpaint"], device="cpu", model_name="tiny-inpaint")


def u8(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def unet_timesteps(pipe, monkeypatch) -> list:
    """Record the timestep of every UNet evaluation."""
    seen = []
    original = pipe.model.apply_model

    def spy(x, t, context, concat=None, control=None):
        seen.append(t[0].item())
        return original(x, t, context, concat, control)

    monkeypatch.setattr(pipe.model, "apply_model", spy)
    return seen


# ------------------------------------------------------------------ inpainting
@pytest.mark.parametrize("kind", ["sd1", "sd1-inpaint"])
@pytest.mark.parametrize("blur", [0, 2])
def test_inpaint_keeps_pixels_outside_the_mask(models, kind, blur):
    pipe = Pipeline(models[kind], device="cpu")
    image, mask = dp.sample_image(32, 32, seed=3), dp.box_mask(32, 32, (10, 8, 22, 26))
    result = pipe.inpaint("a cat", image, mask, mask_blur=blur, seed=1, **FAST)
    out, src = u8(result.images[0]), u8(image)
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask)
    outside, inside = soft == 0, np.asarray(mask) == 255
    assert outside.sum() > 400  # the comparison covers most of the image
    assert np.array_equal(out[outside], src[outside])
    assert np.abs(out[inside] - src[inside]).mean() > 10
    assert result.parameters[0]["mode"] == "inpaint" and result.parameters[0]["mask_blur"] == blur


def test_inpaint_returns_the_input_size_when_rounding(pipe):
    image, mask = dp.sample_image(37, 29), dp.box_mask(37, 29, (4, 4, 20, 20))
    with pytest.warns(UserWarning, match="37x29 is not a multiple of 8; resized to 32x24"):
        result = pipe.inpaint("a cat", image, mask, seed=1, **FAST)
    assert result.images[0].size == (37, 29)
    outside = np.asarray(mask) == 0
    assert np.array_equal(u8(result.images[0])[outside], u8(image)[outside])


def test_inpaint_mask_problems(pipe):
    image = dp.sample_image(32, 32)
    with pytest.raises(ValueError, match="empty"):
        pipe.inpaint("a cat", image, Image.new("L", (32, 32), 0), seed=1, **FAST)
    with pytest.raises(ValueError, match="aspect"):
        pipe.inpaint("a cat", image, dp.box_mask(64, 16), seed=1, **FAST)
    with pytest.raises(ValueError, match="mask must be a PIL"):
        pipe.inpaint("a cat", image, np.zeros((32, 32)), seed=1, **FAST)
    # a mask of the same shape at another scale is fitted to the image
    result = pipe.inpaint("a cat", image, dp.box_mask(64, 64, (16, 16, 48, 48)), seed=1, **FAST)
    assert result.images[0].size == (32, 32)


def test_inpainting_model_also_does_txt2img_and_img2img(inpaint_pipe):
    a = inpaint_pipe.txt2img("a cat", seed=1, height=16, width=16, **FAST)
    b = inpaint_pipe.img2img("a cat", dp.sample_image(16, 16), seed=1, **FAST)
    assert a.images[0].size == b.images[0].size == (16, 16)
    assert u8(a.images[0]).std() > 5


# ------------------------------------------------------------------ precision
def test_half_precision_decode_falls_back_to_fp32(models):
    model = copy.deepcopy(models["sd1"])
    pipe = Pipeline(model, device="cpu", dtype="bf16")
    assert pipe.dtype == torch.bfloat16

    def nan_in_half(module, inputs, output):
        if output.dtype in (torch.float16, torch.bfloat16):
            return torch.full_like(output, float("nan"))

    model.first_stage_model.decoder.register_forward_hook(nan_in_half)
    with pytest.warns(UserWarning, match="overflowed"):
        result = pipe.txt2img("a cat", seed=1, height=16, width=16, return_latents=True, **FAST)
    image = u8(result.images[0])
    assert image.std() > 5 and image.mean() > 20  # not black, not flat
    vae = model.first_stage_model
    assert next(vae.parameters()).dtype == torch.float32
    assert not next(vae.parameters()).is_inference()  # still usable outside inference mode
    with torch.no_grad():
        x = model.decode_first_stage(result.latents.float())
    expected = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(image, expected)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "the autoencoder")  # it stays in fp32: no second fallback
        pipe.txt2img("a cat", seed=2, height=16, width=16, **FAST)


def test_dtype_names():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32 and resolve_dtype(None, cuda) == torch.float16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        resolve_dtype("int8", cpu)


def test_vae_tiling_switches_on_above_the_threshold(pipe, monkeypatch):
    vae = pipe.model.first_stage_model
    seen = []
    original = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z: (seen.append(vae.tiling), original(z))[1])
    pipe.txt2img("a cat", seed=1, height=16, width=16, **FAST)
    monkeypatch.setattr(latents_module, "AUTO_TILING_PIXELS", 8)
    pipe.txt2img("a cat", seed=1, height=16, width=16, **FAST)
    assert seen == [False, True] and vae.tiling is False
    pipe.enable_vae_tiling()
    try:
        assert vae.tiling is True
    finally:
        pipe.enable_vae_tiling(False)


# ------------------------------------------------------------------ img2img
@pytest.mark.parametrize("scheduler,steps,strength", [("ddim", 10, 0.35), ("ddim", 4, 1.0),
                                                      ("heun", 5, 0.5), ("euler", 3, 0.2)])
def test_img2img_runs_the_steps_diffusers_runs(pipe, monkeypatch, scheduler, steps, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = dp.reference_scheduler(scheduler)
    ref.set_timesteps(steps)
    expected, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=ref), steps, strength, "cpu")
    seen = unet_timesteps(pipe, monkeypatch)
    pipe.img2img("a cat", dp.sample_image(16, 16), strength=strength, scheduler=scheduler, seed=1,
                 num_inference_steps=steps, progress=False)
    assert seen == pytest.approx(expected.tolist())


def test_img2img_strength_zero_runs_no_step(pipe, monkeypatch):
    seen = unet_timesteps(pipe, monkeypatch)
    result = pipe.img2img("a cat", dp.sample_image(16, 16), strength=0.0, seed=1, **FAST)
    assert seen == [] and result.images[0].size == (16, 16)


def test_img2img_rounds_the_size_with_a_warning(pipe):
    with pytest.warns(UserWarning, match="37x29 is not a multiple of 8; resized to 32x24"):
        result = pipe.img2img("a cat", dp.sample_image(37, 29), seed=1, **FAST)
    assert result.images[0].size == (32, 24)
    assert result.parameters[0]["width"] == 32 and result.parameters[0]["height"] == 24
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*multiple of 8")
        assert pipe.img2img("a cat", dp.sample_image(24, 16), seed=1, **FAST).images[0].size == (24, 16)


def test_img2img_accepts_other_image_modes(pipe):
    image = dp.sample_image(16, 16).convert("RGBA")
    assert pipe.img2img("a cat", image, seed=1, **FAST).images[0].mode == "RGB"


# ------------------------------------------------------------------ seeds, batches, callbacks
def test_same_seed_same_image_and_other_seed_other_image(pipe):
    kw = dict(scheduler="euler_a", height=16, width=16, **FAST)
    a, b, c = (pipe.txt2img("a cat", seed=s, **kw).images[0] for s in (5, 5, 6))
    assert np.array_equal(u8(a), u8(b))
    assert np.abs(u8(a) - u8(c)).mean() > 5


def test_explicit_generator_equals_seed(pipe):
    kw = dict(scheduler="euler_a", height=16, width=16, **FAST)
    a = pipe.txt2img("a cat", seed=5, **kw)
    b = pipe.txt2img("a cat", generator=torch.Generator().manual_seed(5), **kw)
    assert np.array_equal(u8(a.images[0]), u8(b.images[0])) and b.seeds == [5]
    with pytest.raises(ValueError, match="seed or generator"):
        pipe.txt2img("a cat", seed=5, generator=torch.Generator(), **kw)


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_batch_image_i_equals_a_single_run_with_seed_plus_i(pipe, mode):
    extra = {}
    if mode != "txt2img":
        extra["image"] = dp.sample_image(16, 16)
    if mode == "inpaint":
        extra["mask"] = dp.box_mask(16, 16, (4, 4, 12, 12))
    kw = dict(scheduler="euler_a", height=16, width=16, **extra, **FAST)
    run = getattr(pipe, mode)
    batch = run(["a cat", "a dog"], seed=10, num_images=2, **kw)
    assert batch.seeds == [10, 11, 12, 13]
    assert [p["prompt"] for p in batch.parameters] == ["a cat", "a cat", "a dog", "a dog"]
    assert [p["seed"] for p in batch.parameters] == [10, 11, 12, 13]
    for i, prompt in ((1, "a cat"), (3, "a dog")):
        single = run(prompt, seed=10 + i, **kw)
        diff = np.abs(u8(batch.images[i]) - u8(single.images[0]))
        assert diff.max() <= 1, (mode, i, diff.max())  # batched convolutions may round differently
    assert np.abs(u8(batch.images[0]) - u8(batch.images[1])).mean() > 5


def test_callback_sees_every_step_and_can_stop(pipe):
    calls = []
    full = pipe.txt2img("a cat", seed=1, height=16, width=16, num_inference_steps=4, progress=False,
                        callback=lambda i, n, x: calls.append((i, n, tuple(x.shape))))
    assert calls == [(i, 4, (1, 4, 8, 8)) for i in range(4)] and not full.interrupted

    stopped = []
    result = pipe.txt2img("a cat", seed=1, height=16, width=16, num_inference_steps=4, progress=False,
                          callback=lambda i, n, x: stopped.append(i) or (False if i == 1 else None))
    assert stopped == [0, 1] and result.interrupted and len(result.images) == 1


def test_guidance_scale_one_skips_the_unconditional_pass(pipe, monkeypatch):
    sizes = []  # rows of text conditioning per UNet call: [uncond, cond] doubles them
    original = pipe.model.apply_model
    monkeypatch.setattr(pipe.model, "apply_model",
                        lambda x, t, c, concat=None, control=None: (sizes.append(c.shape[0]),
                                                                        original(x, t, c, concat, control))[1])
    pipe.txt2img("a cat", seed=1, height=16, width=16, num_inference_steps=2, guidance_scale=1.0,
                 num_images=2, progress=False)
    pipe.txt2img("a cat", seed=1, height=16, width=16, num_inference_steps=2, guidance_scale=3.0,
                 num_images=2, progress=False)
    assert sizes == [2, 2, 4, 4]


# ------------------------------------------------------------------ outputs
def test_latent_output_and_parameters(pipe):
    result = pipe.txt2img("a cat", negative_prompt="dog", seed=3, height=16, width=24,
                          output_type="latent", eta=0.5, clip_skip=1, guidance_rescale=0.3,
                          scheduler="ddim", **FAST)
    assert isinstance(result, GenerationResult)
    assert result.images == [] and result.latents.shape == (1, 4, 8, 12)
    assert result.parameters == [dict(
        prompt="a cat", negative_prompt="dog", seed=3, steps=3, sampler="ddim", cfg_scale=5.0,
        width=24, height=16, model="tiny", model_path=None, clip_skip=1, eta=0.5, mode="txt2img",
        guidance_rescale=0.3)]
    plain = pipe.txt2img("a cat", seed=3, height=16, width=16, **FAST)
    assert plain.latents is None and "strength" not in plain.parameters[0]
    assert pipe.img2img("a cat", dp.sample_image(16, 16), strength=0.5, seed=1,
                        **FAST).parameters[0]["strength"] == 0.5


def test_default_size_is_the_models_training_size(pipe):
    size = pipe.model.config.default_image_size
    assert pipe.txt2img("a cat", seed=1, **FAST).images[0].size == (size, size)


# ------------------------------------------------------------------ errors
INVALID = [
    (dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
    (dict(height=30), "height must be a multiple of 8"),
    (dict(width=-8), "width must be a multiple of 8|width must be a positive"),
    (dict(scheduler="k_lms"), "unknown scheduler 'k_lms'; choose one of ddim"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries but prompt has 1"),
    (dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]"),
    (dict(seed=-1), "seed must be"),
    (dict(num_images=0), "num_images must be >= 1"),
    (dict(clip_skip=5), "clip_skip must be in"),
    (dict(output_type="np"), "output_type must be one of pil, latent"),
    (dict(generator=[torch.Generator(), torch.Generator()]), "2 generators for 1 images"),
]


@pytest.mark.parametrize("kwargs,message", INVALID)
def test_invalid_arguments_raise_one_clear_error(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.txt2img("a cat", **{"progress": False, **kwargs})


def test_invalid_image_arguments(pipe):
    image = dp.sample_image(16, 16)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\], got 1.5"):
        pipe.img2img("a cat", image, strength=1.5, progress=False)
    with pytest.raises(ValueError, match="image must be a PIL.Image.Image"):
        pipe.img2img("a cat", "photo.png", progress=False)
    with pytest.raises(ValueError, match="at least 8x8"):
        pipe.img2img("a cat", dp.sample_image(7, 16), progress=False)
    with pytest.raises(ValueError, match="prompt must be a string"):
        pipe.txt2img(None, progress=False)
    with pytest.raises(TypeError, match="image"):
        pipe.txt2img("a cat", image=image)


def test_from_checkpoint_without_the_default_model(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_module, "DEFAULT_CHECKPOINT", tmp_path / "tiny-shapes.safetensors")
    with pytest.raises(DefaultModelMissing, match="no default model is installed .*pass --checkpoint PATH"):
        Pipeline.from_checkpoint()


# ------------------------------------------------------------------ no host syncs in the loop
@pytest.mark.parametrize("mode,scheduler", [("txt2img", "ddim"), ("txt2img", "euler_a"),
                                            ("inpaint", "dpmpp_2m")])
def test_the_denoising_loop_never_reads_tensors_back(pipe, monkeypatch, mode, scheduler):
    """On a GPU, turning a tensor into a Python value waits for every queued kernel. The loop in
    pipelines/sampling.py must never do it (what diffusers' schedulers do inside is theirs)."""
    import pipelines.sampling as sampling

    offenders = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            import sys
            caller = sys._getframe(1).f_code.co_filename
            if caller == sampling.__file__:
                offenders.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    if mode == "inpaint":
        pipe.inpaint("a cat", dp.sample_image(16, 16), dp.box_mask(16, 16, (4, 4, 12, 12)),
                     scheduler=scheduler, seed=1, guidance_rescale=0.5, **FAST)
    else:
        pipe.txt2img("a cat", scheduler=scheduler, seed=1, height=16, width=16, guidance_rescale=0.5,
                     callback=lambda i, n, x: None, **FAST)
    assert offenders == []


def test_unset_sampling_settings_come_from_the_model_config(models):
    from ldm.config import SamplingDefaults

    model = copy.deepcopy(models["sd1"])
    model.config = model.config.replace(sampling=SamplingDefaults(3.0, 2, "euler"))
    own = Pipeline(model, device="cpu", model_name="tiny")
    small = dict(seed=4, height=16, width=16, progress=False, output_type="latent")
    implicit = own.txt2img("a cat", **small)
    explicit = own.txt2img("a cat", num_inference_steps=2, guidance_scale=3.0, scheduler="euler",
                           **small)
    assert implicit.parameters == explicit.parameters
    used = {k: implicit.parameters[0][k] for k in ("steps", "cfg_scale", "sampler")}
    assert used == {"steps": 2, "cfg_scale": 3.0, "sampler": "euler"}
    assert torch.equal(implicit.latents, explicit.latents)
    # what the caller gives wins; unset ones still come from the model
    other = own.txt2img("a cat", guidance_scale=7.5, **small)
    assert other.parameters[0]["cfg_scale"] == 7.5 and other.parameters[0]["steps"] == 2
    assert not torch.equal(other.latents, implicit.latents)
