"""SDXL LoRAs against diffusers' ``StableDiffusionXLPipeline.load_lora_weights`` on the same tiny
random model: kohya files (``lora_unet_`` with diffusers-style and with CompVis-style names,
``lora_te1_`` for CLIP-L, ``lora_te2_`` for bigG) and diffusers/peft files (``unet.``,
``text_encoder.``, ``text_encoder_2.``; ``lora_A/lora_B`` and ``lora.down/lora.up``) give
diffusers' image here; layer names come from diffusers' own modules and converter, never from our
name table. Then the family-mismatch errors of ``--lora``."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.pipeline import Pipeline
from reference import pipelines as dp
from reference.sdxl import random_sdxl_model, sdxl_pipeline
from reference.tiny import tiny_sdxl_tree
from tests.pipelines.test_pipeline_parity import assert_close, assert_far

pytestmark = pytest.mark.usefixtures("single_thread")

SEED, STEPS, SIZE = 5, 3, 32
PROMPT, NEGATIVE = "a red circle", "blurry"
KW = dict(num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE, width=SIZE)
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1", "proj_in")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def model():
    return random_sdxl_model("sdxl")


def reference(model):
    return sdxl_pipeline(model, tiny_sdxl_tree("sdxl"), dp.reference_scheduler("euler"))


def theirs_image(ref):
    return ref(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(SEED),
               **KW).images[0]


def ours_image(pipe):
    return pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, scheduler="euler", seed=SEED,
                        progress=False, **KW).images[0]


def _layers(module: nn.Module, wanted) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and any(n == w or n.endswith("." + w) for w in wanted)]


def _pair(layer: nn.Module, rank: int, g: torch.Generator, std: float):
    if isinstance(layer, nn.Conv2d):  # kohya LoCon: kernel-sized down, 1×1 up
        return (torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=g) * std,
                torch.randn(layer.out_channels, rank, 1, 1, generator=g) * std)
    return (torch.randn(rank, layer.in_features, generator=g) * std,
            torch.randn(layer.out_features, rank, generator=g) * std)


def _compvis_names(model, ref) -> dict[str, str]:
    """diffusers UNet module path → our (CompVis) one, by diffusers' own checkpoint converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd = {k: v for k, v in model.state_dict().items() if k.startswith("model.diffusion_model.")}
    converted = convert_ldm_unet_checkpoint(sd, dict(ref.unet.config))
    by_id = {id(v): k for k, v in sd.items()}
    return {k.rsplit(".", 1)[0]: by_id[id(v)].removeprefix("model.diffusion_model.").rsplit(".", 1)[0]
            for k, v in converted.items() if id(v) in by_id}


def kohya_file(model, ref, path, compvis: bool = False, seed: int = 0):
    """Random kohya tensors (rank 4, alpha 2) for diffusers' UNet and both towers. (One alpha:
    diffusers 0.42 reads per-layer kohya alphas of attention layers under names peft never
    matches, and falls back to the commonest alpha.)"""
    g = torch.Generator().manual_seed(seed)
    names = _compvis_names(model, ref) if compvis else {}
    sd = {}
    groups = [("lora_unet_", ref.unet, UNET_LAYERS, 0.15), ("lora_te1_text_model_", ref.text_encoder,
              TEXT_LAYERS, 0.3), ("lora_te2_text_model_", ref.text_encoder_2, TEXT_LAYERS, 0.3)]
    for prefix, module, wanted, std in groups:
        for name, layer in _layers(module, wanted):
            if prefix == "lora_unet_":
                name = names.get(name, name)
            else:  # transformers names without the text_model. that kohya's names have
                name = name.removeprefix("text_model.")
            stem = prefix + name.replace(".", "_")
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = _pair(layer, 4, g, std)
            sd[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("compvis", [False, True], ids=["diffusers-names", "compvis-names"])
def test_kohya_sdxl_file_gives_diffusers_image(model, tmp_path, compvis):
    ref = reference(model)
    path = kohya_file(model, ref, tmp_path / "xl.safetensors", compvis=compvis)
    if compvis:
        assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(str(path)))
    ref.load_lora_weights(str(path))
    theirs = theirs_image(ref)
    pipe = Pipeline(model, device="cpu")
    base = ours_image(pipe)
    pipe.load_lora(path)
    mine = ours_image(pipe)
    pipe.unload_lora()
    assert_close(mine, theirs)
    assert_far(mine, base)
    assert_close(ours_image(pipe), base)  # unloaded: the base model again


def _peft_file(ref, folder):
    """A LoRA made on the diffusers side: peft adapters on its UNet and both text encoders with
    random weights, written by ``StableDiffusionXLPipeline.save_lora_weights``."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v",
                                                                        "to_out.0", "conv1"]))
    ref.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj", "fc1"]))
    ref.text_encoder_2.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "k_proj",
                                                                                 "out_proj", "fc2"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module, std in ((ref.unet, 0.15), (ref.text_encoder, 0.3), (ref.text_encoder_2, 0.3)):
            for n, p in module.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(ref.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(ref.text_encoder_2),
        unet_lora_adapter_metadata=ref.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=ref.text_encoder.peft_config["default"].to_dict(),
        text_encoder_2_lora_adapter_metadata=ref.text_encoder_2.peft_config["default"].to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def test_diffusers_sdxl_lora_gives_diffusers_image_here(model, tmp_path):
    from safetensors import safe_open

    ref = reference(model)
    path = _peft_file(ref, tmp_path)
    theirs = theirs_image(ref)
    keys = load_file(str(path))
    assert any(k.startswith("text_encoder_2.") for k in keys)
    pipe = Pipeline(model, device="cpu")
    base = ours_image(pipe)
    pipe.load_lora(path)
    mine = ours_image(pipe)
    pipe.unload_lora()
    assert_close(mine, theirs)
    assert_far(mine, base)
    # the older diffusers spelling of the same tensors (alphas still from the file's header)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    old = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
           for k, v in keys.items()}
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    pipe.load_lora(tmp_path / "old.safetensors")
    assert_close(ours_image(pipe), theirs)
    pipe.unload_lora()


# ---------------------------------------------------------------- family mismatches, on the command line

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, model):
    import yaml

    from ldm.checkpoint import save_checkpoint
    from reference.tiny import tiny_tree

    folder = tmp_path_factory.mktemp("models")
    save_checkpoint(model, folder / "xl.safetensors")
    save_checkpoint(dp.random_model("sd1"), folder / "sd1.safetensors")
    (folder / "sd1.yaml").write_text(yaml.safe_dump(tiny_tree("sd1")))
    return folder


def _sd1_lora(path, text=True):
    from ldm import lora as L

    sd1 = dp.random_model("sd1")
    L.add_lora(sd1, "x", rank=2, text_targets=L.TEXT_ATTENTION if text else ())
    L.save_lora(sd1, path, "x")
    return path


def _xl_lora(model, path, text=True):
    path = kohya_file(model, reference(model), path)
    if not text:
        save_file({k: v for k, v in load_file(str(path)).items() if k.startswith("lora_unet_")}, str(path))
    return path


SDXL_ON_SD1 = ": an SDXL LoRA (its keys name SDXL layers), and this model is SD1/SD2: "
SD1_ON_SDXL = ": an SD1/SD2 LoRA (its keys name SD1/SD2 layers), and this model is SDXL: "


@pytest.mark.parametrize("base, lora, text, says", [
    ("sd1", "xl", True, SDXL_ON_SD1), ("xl", "sd1", True, SD1_ON_SDXL),
    ("sd1", "xl", False, SDXL_ON_SD1), ("xl", "sd1", False, SD1_ON_SDXL),
], ids=["xl-on-sd1", "sd1-on-xl", "xl-unet-on-sd1", "sd1-unet-on-xl"])
def test_family_mismatch_is_one_error_line(model, checkpoints, tmp_path, capsys, base, lora, text, says):
    from cli.main import main

    if lora == "xl":
        path = _xl_lora(model, tmp_path / "xl.safetensors", text)
    else:
        path = _sd1_lora(tmp_path / "sd1.safetensors", text)
    out = tmp_path / "x.png"
    code = main(["txt2img", PROMPT, "--checkpoint", str(checkpoints / f"{base}.safetensors"),
                 "--steps", "1", "--width", "32", "--height", "32", "-q", "-o", str(out),
                 "--lora", str(path)])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error:") and err.count("\n") == 1, err
    assert says in err and not out.exists(), err


def test_cli_lora_on_sdxl_matches_the_python_api(model, checkpoints, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from cli.main import main
    from tests.pipelines.test_pipeline_parity import _u8

    path = kohya_file(model, reference(model), tmp_path / "xl.safetensors", seed=2)
    out = tmp_path / "x.png"
    code = main(["txt2img", PROMPT, "--checkpoint", str(checkpoints / "xl.safetensors"), "--seed",
                 str(SEED), "--steps", str(STEPS), "--scheduler", "euler", "--width", str(SIZE),
                 "--height", str(SIZE), "--negative-prompt", NEGATIVE, "--guidance-scale", "6", "-q",
                 "-o", str(out), "--lora", f"{path}:0.5"])
    assert code == 0, capsys.readouterr().err
    pipe = Pipeline.from_checkpoint(checkpoints / "xl.safetensors", device="cpu")
    pipe.load_lora(path, scale=0.5)
    assert np.array_equal(_u8(Image.open(out)), _u8(ours_image(pipe)))
    assert 'Lora scales: "xl: 0.5"' in Image.open(out).info["parameters"]
