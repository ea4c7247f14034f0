"""ControlNet units in the pipeline: their checks, hint fitting, soft weights, the PNG record, and
that a unit which never acts leaves the image bit-identical."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ldm.controlnet_config import ControlNetConfig
from ldm.modules.controlnet import ControlNet
from pipelines import annotators
from pipelines.control import ControlUnit, fit_hint, prepare_hint, residual_scales
from pipelines.images import format_parameters, parse_parameters
from pipelines.pipeline import Pipeline
from reference import pipelines as dp
from reference.models import randomize_

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_checkpoint()  # the shipped default model: 64×64, f=8


@pytest.fixture(scope="module")
def net(pipe):
    cfg = ControlNetConfig.from_unet(pipe.model.config.unet)
    return randomize_(ControlNet(cfg), seed=3, scale=0.5).eval()


def square(size=64, box=(16, 16, 40, 40), fill="white", background="black") -> Image.Image:
    im = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(im).rectangle(box, fill=fill)
    return im


def _latents(pipe, **kw):
    return pipe.txt2img("a red square", seed=5, num_inference_steps=6, progress=False,
                        output_type="latent", **kw).latents


@pytest.mark.parametrize("unit", [dict(weight=0.0), dict(guidance_start=0.5, guidance_end=0.5),
                                  dict(guidance_start=1.0, guidance_end=1.0)])
def test_a_unit_that_never_acts_changes_nothing(pipe, net, unit):
    plain = _latents(pipe)
    with_unit = _latents(pipe, control=ControlUnit(net, square(), **unit))
    assert torch.equal(plain, with_unit)
    acting = _latents(pipe, control=ControlUnit(net, square()))
    assert (acting - plain).abs().mean() > 1e-3  # the same ControlNet does act when allowed


def test_window_counts_steps_as_diffusers():
    unit = ControlUnit(torch.nn.Identity(), square(), guidance_start=0.25, guidance_end=0.75)
    # diffusers: keep = not (i/n < start or (i+1)/n > end)
    assert [unit.active(i, 8) for i in range(8)] == [False, False, True, True, True, True, False, False]


@pytest.mark.parametrize("kw,message", [
    (dict(weight=-0.1), "control weight"), (dict(guidance_start=0.8, guidance_end=0.2), "after"),
    (dict(guidance_end=1.5), "guidance_end"), (dict(control_mode="louder"), "control_mode"),
    (dict(resize_mode="stretch"), "resize_mode"), (dict(preprocessor="depth"), "depth"),
    (dict(preprocessor="canny", preprocessor_params={"low_threshold": 300}), "low_threshold"),
])
def test_bad_units_are_refused_in_one_line(kw, message):
    with pytest.raises(ValueError, match=message) as err:
        ControlUnit("x.safetensors", square(), **kw)
    assert "\n" not in str(err.value)


def test_a1111_labels_are_accepted():
    unit = ControlUnit("x", square(), control_mode="My prompt is more important",
                       resize_mode="Resize and Fill")
    assert (unit.control_mode, unit.resize_mode) == ("prompt", "resize_and_fill")


def test_soft_weights():
    # A1111's "My prompt is more important" for SD's 13 residuals, and diffusers' guess mode
    assert torch.allclose(residual_scales("prompt", 13, 0.5),
                          torch.tensor([0.5 * 0.825 ** (12 - k) for k in range(13)]))
    control = residual_scales("control", 13, 2.0)
    assert torch.allclose(control, 2.0 * 10 ** (torch.arange(13) / 12 - 1))
    assert torch.equal(residual_scales("balanced", 7, 0.3), torch.full((7,), 0.3))


def _halves() -> Image.Image:
    """128×64: red left half, blue right half, a green 8-px frame."""
    im = Image.new("RGB", (128, 64), "green")
    ImageDraw.Draw(im).rectangle((8, 8, 63, 55), fill="red")
    ImageDraw.Draw(im).rectangle((64, 8, 119, 55), fill="blue")
    return im


def test_resize_modes():
    im = _halves()
    stretched = np.asarray(fit_hint(im, 64, 64, "just_resize"))
    assert stretched.shape == (64, 64, 3)
    # crop and resize: scaled to cover (×1), the middle 64 px kept: red left, blue right, no frame
    cropped = np.asarray(fit_hint(im, 64, 64, "crop_and_resize"))
    assert (cropped[32, 5] == (255, 0, 0)).all() and (cropped[32, 58] == (0, 0, 255)).all()
    assert (cropped[2, 32] == (0, 128, 0)).all()  # the frame's top edge is still there
    # resize and fill: scaled to fit (×0.5) into 64×32, padded above and below with the median
    # border colour (green)
    filled = np.asarray(fit_hint(im, 64, 64, "resize_and_fill"))
    assert (filled[5, 32] == (0, 128, 0)).all() and (filled[60, 32] == (0, 128, 0)).all()
    assert filled[32, 16, 0] > 200 and filled[32, 48, 2] > 200


def test_preprocessor_runs_on_the_fitted_hint():
    photo = square(128, box=(32, 32, 96, 96), fill="orange", background="navy")
    unit = ControlUnit("x", photo, preprocessor="canny", resize_mode="just_resize")
    hint = prepare_hint(unit, 64, 64)
    expected = annotators.run("canny", fit_hint(photo, 64, 64, "just_resize"))
    assert hint.size == (64, 64)
    assert np.array_equal(np.asarray(hint), np.asarray(expected))
    assert np.asarray(hint).max() == 255  # edges found


def test_parameters_record_each_unit_as_a1111(pipe, net, tmp_path):
    units = [ControlUnit(net, square(), weight=0.75, guidance_end=0.6, preprocessor="canny",
                         preprocessor_params={"low_threshold": 50}),
             ControlUnit(net, square(), control_mode="control", resize_mode="just_resize")]
    result = pipe.txt2img("a red square", seed=1, num_inference_steps=2, progress=False,
                          control=units)
    text = format_parameters(result.parameters[0])
    assert ('ControlNet 0: "Module: canny, Model: ControlNet, Weight: 0.75, Resize Mode: Crop and '
            'Resize, Threshold A: 50, Threshold B: 200, Guidance Start: 0, Guidance End: 0.6, '
            'Pixel Perfect: True, Control Mode: Balanced"') in text
    assert "ControlNet 1: \"Module: none, Model: ControlNet, Weight: 1, Resize Mode: Just Resize" in text
    assert "Control Mode: ControlNet is more important" in text
    back = parse_parameters(text)
    assert back["ControlNet 0"].startswith("Module: canny, Model: ControlNet, Weight: 0.75")


def test_controlnet_files_are_loaded_once_and_named_with_their_hash(pipe, net, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "my-edges.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    a = pipe.controlnet(str(path))
    assert pipe.controlnet(path) is a
    result = pipe.txt2img("a red square", seed=1, num_inference_steps=2, progress=False,
                          control=ControlUnit(path, square()))
    from ldm.weights_io import file_hash

    assert f"Model: my-edges [{file_hash(path)[:8]}]" in result.parameters[0]["ControlNet 0"]
    pipe.controlnet_dirs.append(tmp_path)
    assert pipe.controlnet("my-edges") is a
    with pytest.raises(FileNotFoundError, match="not found"):
        pipe.controlnet("no-such-controlnet")


def test_controlnet_of_another_family_is_refused(pipe, tmp_path):
    from ldm.weights_io import CheckpointError
    from reference.tiny import tiny_config
    from safetensors.torch import save_file

    other = ControlNet(ControlNetConfig.from_unet(tiny_config("sd2").unet))
    path = tmp_path / "sd2-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="made for another model"):
        pipe.controlnet(path)


def test_hint_is_repeated_for_every_image_of_a_batch(pipe, net):
    one = pipe.txt2img("a red square", seed=9, num_inference_steps=3, progress=False,
                       output_type="latent", control=ControlUnit(net, square())).latents
    two = pipe.txt2img(["a blue circle", "a red square"], seed=8, num_inference_steps=3,
                       progress=False, output_type="latent", control=ControlUnit(net, square())).latents
    torch.testing.assert_close(two[1:], one, atol=1e-5, rtol=1e-5)


def test_sample_image_hint_changes_the_image(pipe, net):
    a = _latents(pipe, control=ControlUnit(net, square()))
    b = _latents(pipe, control=ControlUnit(net, dp.sample_image(64, 64)))
    assert (a - b).abs().mean() > 1e-3
