"""``--control`` units on the generation commands (the shipped default model, f=8 like SD)."""
from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from cli.control_args import parse_unit
from cli.args import UsageError
from pipelines.images import read_parameters
from tests.cli.common import assert_one_error, files_under, run

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    """A ControlNet for the default model (random zero convolutions, so it acts) and an SD2-width
    one that does not fit it."""
    import torch
    from safetensors.torch import save_file

    from ldm.checkpoint import load_model
    from ldm.controlnet_config import ControlNetConfig
    from ldm.modules.controlnet import ControlNet
    from pipelines.pipeline import default_model
    from reference.models import randomize_
    from reference.tiny import tiny_config

    folder = tmp_path_factory.mktemp("controlnets")
    path, config = default_model()
    base = load_model(path, config)
    net = ControlNet(ControlNetConfig.from_unet(base.config.unet))
    net.copy_encoder_from(base.unet)
    with torch.no_grad():
        for conv in net.zero_layers():
            conv.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "edges.safetensors")
    other = randomize_(ControlNet(ControlNetConfig.from_unet(tiny_config("sd2").unet)), seed=1)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, folder / "sd2.safetensors")
    return folder


@pytest.fixture
def hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).polygon([(10, 50), (50, 50), (30, 12)], fill="purple")
    im.save(tmp_path / "photo.png")
    return tmp_path


def test_units_generate_and_are_recorded(controlnet, hint, capsys):
    cn = controlnet / "edges.safetensors"
    base = ["txt2img", "a purple triangle on a white background", "--seed", "3", "--steps", "4", "-q"]
    code, out, err = run(base + ["-o", "plain.png"], capsys)
    assert code == 0, err
    code, out, err = run(base + ["-o", "a.png", "--control", f"{cn}:photo.png,preprocess=canny,weight=0.8",
                                 "--control", f"edges:photo.png,mode=control,end=0.5,resize=just",
                                 "--controlnet-dir", controlnet], capsys)
    assert code == 0, err
    text = read_parameters(hint / "a.png")
    assert 'ControlNet 0: "Module: canny, Model: edges [' in text
    assert "Weight: 0.8, Resize Mode: Crop and Resize, Threshold A: 100, Threshold B: 200" in text
    assert "ControlNet 1: \"Module: none" in text and "Resize Mode: Just Resize" in text
    assert "Guidance End: 0.5" in text and "Control Mode: ControlNet is more important" in text
    import numpy as np

    a = np.asarray(Image.open(hint / "a.png")).astype(int)
    plain = np.asarray(Image.open(hint / "plain.png")).astype(int)
    assert np.abs(a - plain).mean() > 0.5  # the units act
    # weight 0 on every unit: the plain image, bit for bit
    code, out, err = run(base + ["-o", "zero.png", "--control", f"{cn}:photo.png,weight=0"], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(hint / "zero.png")), plain.astype(np.uint8))


def test_control_preprocess_applies_to_units_without_one():
    unit = parse_unit("m:h.png,low=50,high=120", "canny")
    assert unit["preprocessor"] == "canny"
    assert unit["preprocessor_params"] == {"low_threshold": 50, "high_threshold": 120}
    assert parse_unit("m:h.png,preprocess=invert", "canny")["preprocessor"] == "invert"
    assert parse_unit("m:h.png,resize=fill", None)["resize_mode"] == "resize_and_fill"


@pytest.mark.parametrize("spec,code,fragment", [
    ("{cn}", 2, "expected MODEL:HINT"),
    ("{cn}:photo.png,weight", 2, "not key=value"),
    ("{cn}:photo.png,weight=-1", 2, "control weight must be >= 0"),
    ("{cn}:photo.png,weight=lots", 2, "weight must be a number"),
    ("{cn}:photo.png,start=0.8,end=0.2", 2, "is after guidance_end"),
    ("{cn}:photo.png,mode=loud", 2, "control_mode"),
    ("{cn}:photo.png,colour=red", 2, "unknown key 'colour'"),
    ("{cn}:photo.png,preprocess=depth", 2, "unknown preprocessor 'depth'"),
    ("{cn}:missing.png", 1, "missing.png"),
    ("{cn}:notes.txt", 1, "notes.txt"),
    ("no-such-net:photo.png", 1, "ControlNet 'no-such-net' not found"),
    ("{other}:photo.png", 1, "made for another model"),
])
def test_bad_units_give_one_error_and_write_nothing(controlnet, hint, capsys, spec, code, fragment):
    (hint / "notes.txt").write_text("not an image\n")
    spec = spec.format(cn=controlnet / "edges.safetensors", other=controlnet / "sd2.safetensors")
    before = files_under(hint)
    got, out, err = run(["txt2img", "a red circle", "--steps", "2", "--seed", "1", "-o", "x.png",
                         "--control", spec], capsys)
    assert got == code, err
    assert_one_error(err, fragment)
    assert files_under(hint) == before


def test_control_preprocess_needs_a_unit(hint, capsys):
    code, out, err = run(["txt2img", "a red circle", "--control-preprocess", "canny"], capsys)
    assert code == 2
    assert_one_error(err, "needs a --control unit")


def test_parse_unit_errors_are_usage_errors():
    with pytest.raises(UsageError):
        parse_unit(":h.png", None)
