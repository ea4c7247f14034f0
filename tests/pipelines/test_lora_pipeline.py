"""LoRA files between us and diffusers: ours load in ``StableDiffusionPipeline.load_lora_weights``
and give diffusers' image; a LoRA trained on the diffusers side (peft on its UNet and text encoder,
``save_lora_weights``) gives the same image here. Then the ``--lora`` command-line option."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import lora as L
from pipelines.pipeline import Pipeline
from reference import pipelines as dp
from reference.tiny import tiny_tree

pytestmark = pytest.mark.usefixtures("single_thread")

SEED, SIZE = 7, 32
KW = dict(negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE)
PROMPT = "a red ring on a blue background"


@pytest.fixture(scope="module")
def side():
    model = dp.random_model("sd1")
    return model, dp.components(model, tiny_tree("sd1"))


def _u8(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def assert_close(ours, theirs):
    diff = np.abs(_u8(ours) - _u8(theirs))
    assert _u8(ours).std() > 8
    assert diff.mean() <= 1.0 and diff.max() <= 4, f"mean {diff.mean():.3f}, max {diff.max()}"


def assert_far(a, b):
    assert np.abs(_u8(a) - _u8(b)).mean() > 4.0, "the LoRA hardly changed the image"


def ours_image(pipe):
    return pipe.txt2img(PROMPT, scheduler="ddim", seed=SEED, progress=False, **KW).images[0]


def reference_image(parts, lora_file=None, prepare=None):
    """diffusers' image, on copies of its UNet and text encoder (adapters are added to them)."""
    import copy

    parts = dict(parts, unet=copy.deepcopy(parts["unet"]), text_encoder=copy.deepcopy(parts["text_encoder"]))
    ref = dp.pipeline("txt2img", parts, dp.reference_scheduler("ddim"))
    if prepare is not None:
        prepare(ref)
    if lora_file is not None:
        ref.load_lora_weights(str(lora_file))
    return ref(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **KW).images[0]


def random_lora(model, path, seed=0):
    """Our save_lora on a random adapter (non-zero up weights), UNet incl. LoCon and text encoder."""
    params = L.add_lora(model, "maker", rank=4, alpha=2.0,
                        targets=L.UNET_ATTENTION + L.UNET_FEED_FORWARD + ("conv1", "conv2"),
                        text_targets=L.TEXT_ATTENTION + L.TEXT_MLP)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    L.save_lora(model, path, "maker")
    L.remove_lora(model, "maker")
    return path


def test_our_file_loads_in_diffusers_with_the_same_image(side, tmp_path):
    model, parts = side
    path = random_lora(model, tmp_path / "ours.safetensors")
    pipe = Pipeline(model, device="cpu")
    base = ours_image(pipe)
    name = pipe.load_lora(path)
    mine = ours_image(pipe)
    assert_close(mine, reference_image(parts, path))
    assert_far(mine, base)
    pipe.unload_lora(name)
    assert np.array_equal(_u8(ours_image(pipe)), _u8(base))


def test_a_diffusers_made_lora_gives_diffusers_image_here(side, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model, parts = side
    state = {}

    def prepare(ref):
        ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v",
                                                                            "to_out.0", "conv1"]))
        ref.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj", "fc1"]))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for module in (ref.unet, ref.text_encoder):
                for n, p in module.named_parameters():
                    if "lora_" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        StableDiffusionPipeline.save_lora_weights(
            tmp_path, unet_lora_layers=get_peft_model_state_dict(ref.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
            unet_lora_adapter_metadata=ref.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=ref.text_encoder.peft_config["default"].to_dict())
        state["file"] = tmp_path / "pytorch_lora_weights.safetensors"

    theirs = reference_image(parts, prepare=prepare)
    pipe = Pipeline(model, device="cpu")
    base = ours_image(pipe)
    pipe.load_lora(state["file"])
    mine = ours_image(pipe)
    assert_close(mine, theirs)
    assert_far(mine, base)
    pipe.unload_lora()


def test_scales_and_fusing_through_the_pipeline(side, tmp_path):
    model, parts = side
    path = random_lora(model, tmp_path / "s.safetensors", seed=3)
    pipe = Pipeline(model, device="cpu")
    base = ours_image(pipe)
    name = pipe.load_lora(path, scale=0.0)
    assert np.array_equal(_u8(ours_image(pipe)), _u8(base))
    pipe.set_lora_scale(name, 0.5)
    half = ours_image(pipe)
    assert_far(half, base)
    pipe.fuse_lora()
    assert_close(ours_image(pipe), half)
    pipe.fuse_lora(False)
    pipe.unload_lora()
    assert np.array_equal(_u8(ours_image(pipe)), _u8(base))


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, side):
    import yaml

    from ldm.checkpoint import save_checkpoint

    model, _ = side
    folder = tmp_path_factory.mktemp("model")
    save_checkpoint(model, folder / "tiny.safetensors")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(tiny_tree("sd1")))  # the sidecar config
    return folder / "tiny.safetensors"


def cli(argv, capsys):
    from cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lora_option_matches_the_python_api(side, checkpoint, tmp_path, capsys):
    from pipelines.images import parse_parameters, read_parameters

    model, _ = side
    path = random_lora(model, tmp_path / "my-style.safetensors", seed=5)
    args = ["txt2img", PROMPT, "--checkpoint", checkpoint, "--seed", SEED, "--steps", 4,
            "--scheduler", "ddim", "--width", SIZE, "--height", SIZE, "--negative-prompt", "blurry", "-q"]
    code, out, err = cli(args + ["-o", tmp_path / "base.png"], capsys)
    assert code == 0, err
    code, out, err = cli(args + ["-o", tmp_path / "lora.png", "--lora", f"{path}:0.5"], capsys)
    assert code == 0, err
    pipe = Pipeline.from_checkpoint(checkpoint, device="cpu")
    pipe.load_lora(path, scale=0.5)
    expected = ours_image(pipe)
    written = Image.open(tmp_path / "lora.png")
    assert np.array_equal(_u8(written), _u8(expected))
    assert_far(written, Image.open(tmp_path / "base.png"))
    params = parse_parameters(read_parameters(tmp_path / "lora.png"))
    from ldm.weights_io import lora_file_hash

    assert params["Lora hashes"] == f"my-style: {lora_file_hash(path)}"
    assert params["Lora scales"] == "my-style: 0.5"


def test_cli_lora_errors(side, checkpoint, tmp_path, capsys):
    args = ["txt2img", PROMPT, "--checkpoint", checkpoint, "--steps", 1, "-q",
            "-o", tmp_path / "x.png"]
    code, _, err = cli(args + ["--lora", tmp_path / "missing.safetensors:0.5"], capsys)
    assert code == 1 and err.startswith("error: LoRA") and "no such file" in err and err.count("\n") == 1
    (tmp_path / "full.safetensors").write_bytes(checkpoint.read_bytes())
    code, _, err = cli(args + ["--lora", tmp_path / "full.safetensors"], capsys)
    assert code == 1 and "not a LoRA for this model" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()
