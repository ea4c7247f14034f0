"""``--control`` on SDXL files: the command equals the Python API, and a ControlNet of the other
family (SD1 on SDXL, SDXL on SD1) is one ``error:`` line, a non-zero exit and no image."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.cli.common import assert_one_error, files_under, run

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny SDXL (autoencoder factor 8) and SD1 checkpoints, and a random ControlNet for each."""
    from safetensors.torch import save_file

    from ldm.checkpoint import save_checkpoint
    from ldm.controlnet_config import ControlNetConfig
    from ldm.modules.controlnet import ControlNet
    from reference.models import random_tiny_model, randomize_
    from reference.sdxl import random_sdxl_model

    folder = tmp_path_factory.mktemp("xl")
    xl, sd1 = random_sdxl_model(downscale=8), random_tiny_model("sd1")
    save_checkpoint(xl, folder / "xl.safetensors")
    save_checkpoint(sd1, folder / "sd1.safetensors")
    for name, model in (("cn-xl", xl), ("cn-sd1", sd1)):
        net = randomize_(ControlNet(ControlNetConfig.from_unet(model.config.unet)), seed=4, scale=1.0)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                  str(folder / f"{name}.safetensors"))
    return folder


@pytest.fixture
def hint(tmp_path, monkeypatch):
    from reference.pipelines import sample_image

    monkeypatch.chdir(tmp_path)
    sample_image(64, 64, seed=3).save(tmp_path / "hint.png")
    return tmp_path


COMMON = ["--steps", "3", "--seed", "5", "--width", "64", "--height", "64", "-q"]


def test_control_on_an_sdxl_file_equals_the_python_api(files, hint, capsys):
    from ldm.checkpoint import load_model
    from pipelines.control import ControlUnit
    from pipelines.images import read_parameters
    from pipelines.pipeline import Pipeline

    cn = files / "cn-xl.safetensors"
    code, _, err = run(["txt2img", "a red circle", "--checkpoint", files / "xl.safetensors", *COMMON,
                        "--control", f"{cn}:hint.png,weight=0.8", "-o", "x.png"], capsys)
    assert code == 0, err
    image = Image.open(hint / "x.png")
    assert 'ControlNet 0: "Module: none, Model: cn-xl [' in read_parameters(hint / "x.png")
    pipe = Pipeline(load_model(files / "xl.safetensors"), device="cpu")
    unit = ControlUnit(str(cn), Image.open(hint / "hint.png"), weight=0.8)
    api = pipe.txt2img("a red circle", num_inference_steps=3, seed=5, width=64, height=64,
                       progress=False, control=[unit]).images[0]
    assert np.array_equal(np.asarray(api), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("checkpoint, controlnet, guess", [
    ("xl", "cn-sd1", "(an SD1/SD2 ControlNet on an SDXL model?)"),
    ("sd1", "cn-xl", "(an SDXL ControlNet on an SD1/SD2 model?)"),
])
def test_controlnet_of_the_other_family_is_one_error(files, hint, capsys, checkpoint, controlnet,
                                                     guess):
    before = files_under(hint)
    code, _, err = run(["txt2img", "a red circle", "--checkpoint", files / f"{checkpoint}.safetensors",
                        *COMMON, "--control", f"{files / controlnet}.safetensors:hint.png",
                        "-o", "x.png"], capsys)
    assert code != 0
    line = assert_one_error(err, "made for another model: input_blocks.4.1.transformer_blocks.0."
                                 "attn2.to_k.weight is [64, ")
    assert line.endswith(guess)
    assert files_under(hint) == before


def test_ldm_info_names_an_sdxl_controlnet(files, capsys):
    code, out, err = run(["info", files / "cn-xl.safetensors"], capsys)
    assert code == 0, err
    assert "family: controlnet (sdxl)\n" in out and "label_emb keys" in out
