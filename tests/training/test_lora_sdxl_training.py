"""``ldm train-lora`` on a tiny SDXL model: the file loads in diffusers'
``StableDiffusionXLPipeline.load_lora_weights`` and gives the image we give; one tower on request;
SDXL-only options refused on SD1 as one error line."""
from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cli.main import main
from pipelines.pipeline import Pipeline
from reference import pipelines as dp
from reference.sdxl import random_sdxl_model, sdxl_pipeline
from reference.tiny import tiny_sdxl_tree
from tests.pipelines.test_pipeline_parity import assert_close, assert_far
from training.shapes import sample_spec

pytestmark = pytest.mark.usefixtures("single_thread")

SEED, STEPS, SIZE = 3, 3, 32
PROMPT = "a red ring on a blue background"
KW = dict(num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE, width=SIZE)


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from ldm.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("xl-lora")
    model = random_sdxl_model("sdxl")
    save_checkpoint(model, root / "xl.safetensors")  # its sgm config travels in the header
    data = root / "rings"
    data.mkdir()
    rng = random.Random(0)
    for i in range(4):
        spec = sample_spec(rng, shape="ring")
        spec.render(SIZE).save(data / f"ring{i}.png")
        (data / f"ring{i}.txt").write_text(f"a {spec.colour} ring on a {spec.background} background")
    return {"model": model, "xl": root / "xl.safetensors", "data": data}


def train(files, out, *extra, checkpoint=None):
    argv = ["train-lora", "--data", files["data"], "--checkpoint", checkpoint or files["xl"],
            "--output", out, "--resolution", SIZE, "--batch-size", 2, "--max-steps", 3,
            "--learning-rate", 0.05, "--seed", 1, "-q", *extra]
    return main([str(a) for a in argv])


def test_trained_sdxl_lora_gives_diffusers_image(files, tmp_path):
    out = tmp_path / "xl-lora.safetensors"
    assert train(files, out, "--targets", "attention", "ff", "text-attention", "text-mlp",
                 "--train-text-encoder") == 0
    keys = load_file(str(out))
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight" in keys
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["family"] == "sdxl" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_resolution"] == f"({SIZE}, {SIZE})"

    model = files["model"]
    ref = sdxl_pipeline(model, tiny_sdxl_tree("sdxl"), dp.reference_scheduler("euler"))
    ref.load_lora_weights(str(out))
    theirs = ref(PROMPT, negative_prompt="blurry", generator=torch.Generator("cpu").manual_seed(SEED),
                 **KW).images[0]
    pipe = Pipeline(model, device="cpu")
    kw = dict(negative_prompt="blurry", scheduler="euler", seed=SEED, progress=False, **KW)
    base = pipe.txt2img(PROMPT, **kw).images[0]
    pipe.load_lora(out)
    mine = pipe.txt2img(PROMPT, **kw).images[0]
    pipe.unload_lora()
    assert_close(mine, theirs)
    assert_far(mine, base)


def test_one_tower_on_request(files, tmp_path):
    out = tmp_path / "te2.safetensors"
    assert train(files, out, "--train-text-encoder", "te2", "--max-steps", 1) == 0
    keys = load_file(str(out))
    assert any(k.startswith("lora_te2_") for k in keys) and not any(k.startswith("lora_te1_") for k in keys)


def test_tower_choice_on_sd1_is_one_error_line(files, tmp_path, capsys):
    import yaml

    from ldm.checkpoint import save_checkpoint
    from reference.tiny import tiny_tree

    save_checkpoint(dp.random_model("sd1"), tmp_path / "sd1.safetensors")
    (tmp_path / "sd1.yaml").write_text(yaml.safe_dump(tiny_tree("sd1")))
    out = tmp_path / "x.safetensors"
    code = train(files, out, "--train-text-encoder", "te2", checkpoint=tmp_path / "sd1.safetensors")
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error:") and err.count("\n") == 1, err
    assert "te1 and te2 name SDXL's two text encoders" in err and not out.exists()
