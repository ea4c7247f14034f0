"""LoRA on SDXL models: both text towers (bigG's fused attention included), scale 0 and removal
exact, fusing exact, the q/k/v split of bigG's attention on writing and its fusion on reading.
(Parity of the images with diffusers: tests/pipelines/test_sdxl_lora.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ldm import lora as L
from ldm.lora_attention import SplitAttention
from reference.sdxl import random_sdxl_model

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT = L.TEXT_ATTENTION + L.TEXT_MLP


@pytest.fixture(scope="module")
def xl():
    return random_sdxl_model("sdxl")


@pytest.fixture()
def model(xl):
    return copy.deepcopy(xl)


@torch.no_grad()
def run(model):
    from ldm.modules.tokenizer import tokenize

    texts = ["a red ring", "a blue square on grass"]
    tokens = [tokenize(t, texts) for t in model.config.conditioner.texts]
    values = {"original_size_as_tuple": torch.tensor([[32.0, 32.0]] * 2),
              "crop_coords_top_left": torch.zeros(2, 2),
              "target_size_as_tuple": torch.tensor([[32.0, 32.0]] * 2)}
    context, y = model.sdxl_conditioning(tokens, values)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return model.apply_model(x, torch.tensor([15, 640]), context, y=y), context, y


def randomise(params, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_both_towers_adapt_and_scale_zero_and_removal_are_exact(model, xl):
    base = run(model)
    randomise(L.add_lora(model, "a", text_targets=TEXT))
    attn = model.conditioner.embedders[1].model.transformer.resblocks[0].attn
    assert isinstance(attn, SplitAttention)
    moved = run(model)
    width = model.config.conditioner.texts[0].width
    # the context: CLIP-L's then bigG's token states; both towers moved, and the UNet's output
    assert (moved[1][..., :width] - base[1][..., :width]).abs().max() > 0.05
    assert (moved[1][..., width:] - base[1][..., width:]).abs().max() > 0.05
    assert (moved[0] - base[0]).abs().max() > 0.05
    L.set_lora_scale(model, "a", 0)
    assert all(torch.equal(a, b) for a, b in zip(run(model), base))
    L.remove_lora(model)
    assert isinstance(model.conditioner.embedders[1].model.transformer.resblocks[0].attn,
                      nn.MultiheadAttention)
    assert list(model.state_dict()) == list(xl.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(run(model), base))


def test_fuse_and_unfuse_on_sdxl_are_exact(model):
    randomise(L.add_lora(model, "a", text_targets=TEXT))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    unfused = run(model)
    L.fuse_lora(model)
    # rounding of the fused weights (~1e-6 in the text states) grows in the unit-scale random UNet
    for a, b, tol in zip(run(model), unfused, (2e-3, 1e-5, 1e-5)):
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())
    L.unfuse_lora(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_written_file_names_both_towers_and_reads_back_exactly(model, tmp_path):
    randomise(L.add_lora(model, "a", rank=3, alpha=1.5, text_targets=TEXT))
    expected = run(model)
    L.save_lora(model, tmp_path / "xl.safetensors", "a")
    sd = load_file(str(tmp_path / "xl.safetensors"))
    for stem in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_0_self_attn_v_proj",
                 "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
                 "lora_te2_text_model_encoder_layers_0_mlp_fc1",
                 "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"):
        assert sd[f"{stem}.lora_down.weight"].shape[0] == 3 and sd[f"{stem}.alpha"].item() == 1.5
    # a training state read back into the adapter it came from (q/k/v share one down)
    L.set_lora_weights(model, "a", L.read_lora(tmp_path / "xl.safetensors", model))
    L.remove_lora(model)
    L.apply_lora(model, tmp_path / "xl.safetensors")
    for a, b in zip(run(model), expected):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


def test_qkv_of_different_ranks_fuse_and_split_exactly():
    from ldm.lora_formats import LoraModule, fuse_qkv, split_qkv

    g = torch.Generator().manual_seed(0)
    parts = {0: LoraModule(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 1.0),
             2: LoraModule(torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g), 8.0)}
    fused = fuse_qkv(parts, 8)
    delta = fused.delta()
    assert torch.allclose(delta[:8], parts[0].delta(), atol=1e-6)
    assert torch.equal(delta[8:16], torch.zeros(8, 8))
    assert torch.allclose(delta[16:], parts[2].delta(), atol=1e-6)
    q, k, v = split_qkv(fused)
    assert (q.rank, v.rank) == (2, 4)
    assert torch.allclose(q.delta(), parts[0].delta(), atol=1e-6)
    assert torch.allclose(v.delta(), parts[2].delta(), atol=1e-6)
    assert torch.equal(k.delta(), torch.zeros(8, 8))


def test_one_tower_on_request(model):
    L.add_lora(model, "a", targets=(), text_targets=TEXT, text_components=("text_encoder_2",))
    layers = {p for p, _ in L._lora_layers(model)}
    assert layers and all(p.startswith("conditioner.embedders.1.") for p in layers)
    assert any(p.endswith("attn.in_proj") for p in layers) and any(p.endswith("attn.out_proj") for p in layers)
    with pytest.raises(L.LoraError, match="no text encoder text_encoder"):
        L.add_lora(random_sdxl_model("sdxl-refiner"), "b", text_targets=TEXT,
                   text_components=("text_encoder",))


def test_two_loras_on_bigg_and_removing_them_one_by_one(model, xl, tmp_path):
    base = run(model)
    randomise(L.add_lora(model, "a", targets=(), text_targets=TEXT), seed=1)
    randomise(L.add_lora(model, "b", targets=(), text_targets=("q_proj",),
                         text_components=("text_encoder_2",)), seed=2)
    both = run(model)
    L.remove_lora(model, "a")
    only_b = run(model)
    assert isinstance(model.conditioner.embedders[1].model.transformer.resblocks[0].attn, SplitAttention)
    assert (only_b[1] - both[1]).abs().max() > 0.05 and (only_b[1] - base[1]).abs().max() > 0.05
    L.remove_lora(model, "b")
    assert list(model.state_dict()) == list(xl.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(run(model), base))
