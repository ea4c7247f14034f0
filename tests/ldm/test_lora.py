"""LoRA on our models: exact scale-0 and unfuse, sums of several LoRAs, every file layout, errors.

Expected values are computed here from the file's tensors with plain torch (W + α/r · up @ down
patched into a copy of the model), and layer names for the other layouts come from diffusers'
own models and checkpoint converter, never from our name table.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm import lora as L
from ldm.model import LatentDiffusion
from reference.models import random_tiny_model
from reference.tiny import tiny_tree

pytestmark = pytest.mark.usefixtures("single_thread")

CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


@pytest.fixture(scope="module")
def sd1():
    return random_tiny_model("sd1", seed=3)


@pytest.fixture()
def model(sd1):
    m = copy.deepcopy(sd1)
    yield m


def inputs(seed: int = 0, width: int = 32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([15, 640]),
            torch.randn(2, 77, width, generator=g))


@torch.no_grad()
def run(model, seed: int = 0):
    x, t, ctx = inputs(seed)
    tokens = model.tokenize(["a red ring", "a blue square on grass"])
    return model.apply_model(x, t, ctx), model.cond_stage_model(tokens)


def make_lora(model, path, *, seed=0, rank=4, alpha=2.0, targets=L.UNET_ATTENTION,
              text_targets=L.TEXT_ATTENTION + L.TEXT_MLP, std=0.3):
    """A LoRA file with random (non-zero) down and up weights, written by save_lora."""
    params = L.add_lora(model, "maker", rank=rank, alpha=alpha, targets=targets,
                        text_targets=text_targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    L.save_lora(model, path, "maker")
    L.remove_lora(model, "maker")
    return path


def patched(model, files_and_scales):
    """A copy of ``model`` with W += scale · α/r · up @ down for each kohya file, by plain torch."""
    from ldm.diffusers_names import kohya_lora_name, text_module_map, unet_module_map

    out = copy.deepcopy(model)
    # our layer for each kohya name, through the diffusers name table
    names = {kohya_lora_name("unet", d): f"model.diffusion_model.{o}"
             for o, d in unet_module_map(out.unet).items()}
    names.update({kohya_lora_name("text_encoder", d): f"cond_stage_model.{o}"
                  for o, d in text_module_map(out.cond_stage_model).items()})
    with torch.no_grad():
        for path, scale in files_and_scales:
            sd = load_file(str(path))
            for key in [k for k in sd if k.endswith(".lora_down.weight")]:
                stem = key.removesuffix(".lora_down.weight")
                down, up = sd[key].double(), sd[f"{stem}.lora_up.weight"].double()
                alpha = sd[f"{stem}.alpha"].item() if f"{stem}.alpha" in sd else down.shape[0]
                weight = out.get_submodule(names[stem]).weight
                delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape[0], *down.shape[1:])
                weight += (scale * alpha / down.shape[0] * delta).to(weight.dtype)
    return out


def assert_close(a, b, tol=2e-5):
    for x, y in zip(a, b):
        scale = y.abs().max().item()
        assert (x - y).abs().max().item() <= tol * max(scale, 1.0), (x - y).abs().max().item()


def assert_equal(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------- maths

def test_applied_lora_equals_patched_weights_and_moves_the_output(model, tmp_path):
    path = make_lora(model, tmp_path / "a.safetensors", targets=L.UNET_ATTENTION + L.UNET_FEED_FORWARD)
    base = run(model)
    L.apply_lora(model, path, scale=0.7)
    ours = run(model)
    expected = run(patched(_plain(model), [(path, 0.7)]))
    assert_close(ours, expected)
    assert (ours[0] - base[0]).abs().max() > 0.05 and (ours[1] - base[1]).abs().max() > 0.05


def _plain(model):
    """The base model under the adapters (a copy, adapters removed)."""
    out = copy.deepcopy(model)
    L.remove_lora(out)
    return out


def test_scale_zero_is_bit_identical_to_the_base(model, sd1, tmp_path):
    path = make_lora(model, tmp_path / "a.safetensors")
    base = run(model)
    L.apply_lora(model, path, scale=0.0, name="a")
    assert_equal(run(model), base)
    L.set_lora_scale(model, "a", 1.0)
    assert (run(model)[0] - base[0]).abs().max() > 0.05
    L.set_lora_scale(model, "a", 0)
    assert_equal(run(model), base)
    L.remove_lora(model)
    assert_equal(run(model), base)
    assert not any(hasattr(m, "base_layer") for m in model.modules())
    assert list(model.state_dict()) == list(sd1.state_dict())


def test_lora_state_is_read_without_being_created(model, tmp_path):
    fresh = random_tiny_model("sd1", seed=4)
    assert fresh.lora is None
    assert L.lora_info(fresh) == [] and L.lora_adapters(fresh) == {}
    assert not L.has_lora(fresh) and not L.is_fused(fresh)
    assert fresh.lora is None  # reading created nothing
    path = make_lora(model, tmp_path / "a.safetensors")
    L.apply_lora(model, path, scale=0.5, name="a")
    assert L.has_lora(model) and isinstance(model.lora, L.LoraState)
    assert L.lora_info(model) == [{"name": "a", "scale": 0.5, "source": str(path), "trainable": False}]
    copied = copy.deepcopy(model)  # the state travels with the model
    assert L.lora_adapters(copied) == {"a": 0.5}
    L.remove_lora(model)
    assert not L.has_lora(model) and L.has_lora(copied)


def test_two_loras_at_once_add_their_deltas(model, tmp_path):
    a = make_lora(model, tmp_path / "a.safetensors", seed=1)
    b = make_lora(model, tmp_path / "b.safetensors", seed=2, rank=2, alpha=None,
                  targets=("to_k", "to_v", "ff.net.2"), text_targets=("fc1",))
    expected = run(patched(model, [(a, 0.8), (b, -0.5)]))
    assert L.apply_lora(model, a, scale=0.8) == "a"
    assert L.apply_lora(model, b, scale=-0.5) == "b"
    assert L.lora_adapters(model) == {"a": 0.8, "b": -0.5}
    assert_close(run(model), expected)
    L.set_lora_scale(model, "b", 0)
    assert_close(run(model), run(patched(_plain(model), [(a, 0.8)])))
    L.remove_lora(model, "a")
    assert L.lora_adapters(model) == {"b": 0.0}


def test_fuse_then_unfuse_restores_the_weights_bit_for_bit(model, tmp_path):
    a = make_lora(model, tmp_path / "a.safetensors", seed=1)
    b = make_lora(model, tmp_path / "b.safetensors", seed=2, targets=L.UNET_ATTENTION + CONV_TARGETS)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    L.apply_lora(model, a, scale=1.3)
    L.apply_lora(model, b, scale=0.6)
    unfused = run(model)
    L.fuse_lora(model)
    assert L.is_fused(model)
    fused = run(model)
    assert_close(fused, unfused, tol=1e-5)
    changed = [k for k, v in model.state_dict().items() if "base_layer" in k and
               not torch.equal(v, original[k.replace(".base_layer", "")])]
    assert changed, "fusing changed no weight"
    with pytest.raises(L.LoraError, match="unfuse first"):
        L.set_lora_scale(model, "a", 1.0)
    L.unfuse_lora(model)
    assert_equal(run(model), unfused)
    L.remove_lora(model)
    after = model.state_dict()
    assert list(after) == list(original)
    assert all(torch.equal(after[k], original[k]) for k in original)


def test_locon_convolutions_apply(model, tmp_path):
    """kohya LoCon: 3×3 (and strided) down convolutions with 1×1 up, on resnets and resamplers."""
    path = make_lora(model, tmp_path / "locon.safetensors", targets=CONV_TARGETS + ("proj_in",),
                     text_targets=())
    sd = load_file(str(path))
    downs = [k for k in sd if k.endswith("conv1.lora_down.weight")]
    assert downs and sd[downs[0]].shape[2:] == (3, 3)
    assert sd[downs[0].replace("lora_down", "lora_up")].shape[2:] == (1, 1)
    assert any("downsamplers" in k for k in sd) and any("upsamplers" in k for k in sd)
    expected = run(patched(model, [(path, 1.0)]))
    L.apply_lora(model, path)
    assert_close(run(model), expected)
    assert (run(model)[0] - run(_plain(model))[0]).abs().max() > 0.05


# ------------------------------------------------------------------------------------- layouts

def _compvis_names(model) -> dict[str, str]:
    """kohya diffusers-style UNet name → kohya CompVis-style name, derived through diffusers'
    converter (which maps CompVis checkpoint keys to diffusers keys)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from reference.models import diffusers_unet

    sd = {k: torch.full(v.shape, float(i)) for i, (k, v) in enumerate(model.state_dict().items())}
    unet = diffusers_unet(tiny_tree("sd1"), sd)
    converted = convert_ldm_unet_checkpoint(sd, dict(unet.config))
    by_value = {float(v.flatten()[0]): k for k, v in sd.items()}
    out = {}
    for key, value in converted.items():
        if key.endswith(".weight"):
            ours = by_value[float(value.flatten()[0])].removeprefix("model.diffusion_model.")
            theirs = key.removesuffix(".weight")
            out["lora_unet_" + theirs.replace(".", "_")] = \
                "lora_unet_" + ours.removesuffix(".weight").replace(".", "_")
    return out


def test_kohya_compvis_names_equal_their_diffusers_named_twin(model, tmp_path):
    path = make_lora(model, tmp_path / "d.safetensors", text_targets=(),
                     targets=L.UNET_ATTENTION + L.UNET_PROJECTIONS + ("conv1", "time_emb_proj"))
    names = _compvis_names(model)
    twin = {}
    for key, value in load_file(str(path)).items():
        stem, _, suffix = key.partition(".")
        twin[f"{names[stem]}.{suffix}"] = value
    assert any("input_blocks_1_1_transformer_blocks_0_attn1_to_q" in k for k in twin)
    assert any("middle_block_1_" in k for k in twin) and any("output_blocks_" in k for k in twin)
    save_file(twin, str(tmp_path / "c.safetensors"))
    a = L.read_lora(path, model)
    c = L.read_lora(tmp_path / "c.safetensors", model)
    assert a.modules.keys() == c.modules.keys()
    for k in a.modules:
        assert torch.equal(a.modules[k].down, c.modules[k].down) and a.modules[k].alpha == c.modules[k].alpha
    L.apply_lora(model, tmp_path / "c.safetensors")
    assert_close(run(model), run(patched(_plain(model), [(path, 1.0)])))


def _dotted_names(model) -> dict[str, str]:
    """kohya name → diffusers dotted path, from diffusers' and transformers' own module trees."""
    from reference.models import diffusers_unet, transformers_text_model

    sd = model.state_dict()
    unet = diffusers_unet(tiny_tree("sd1"), sd)
    text = transformers_text_model(model, sd)
    out = {"lora_unet_" + n.replace(".", "_"): f"unet.{n}" for n, _ in unet.named_modules() if n}
    out.update({"lora_te_text_model_" + n.replace(".", "_"): f"text_encoder.text_model.{n}"
                for n, _ in text.named_modules() if n})
    return out


@pytest.mark.parametrize("layout", ["peft", "peft-bare", "lora.down", "processor"])
def test_peft_and_older_diffusers_layouts(model, tmp_path, layout):
    path = make_lora(model, tmp_path / "k.safetensors", text_targets=L.TEXT_ATTENTION)
    dotted = _dotted_names(model)
    parts = {"lora_down.weight": ("lora_A.weight", "lora.down.weight"),
             "lora_up.weight": ("lora_B.weight", "lora.up.weight")}
    converted, alphas = {}, set()
    for key, value in load_file(str(path)).items():
        stem, _, suffix = key.partition(".")
        module = dotted[stem]
        if suffix == "alpha":
            alphas.add(value.item())
            if layout != "peft":
                converted[f"{module}.alpha"] = value
            continue
        if layout == "processor":
            role = "down" if suffix.startswith("lora_down") else "up"
            if module.startswith("unet."):  # attention processors: to_q_lora ... to_out_lora
                attn, _, proj = module.removesuffix(".0").rpartition(".")
                name = f"{attn}.processor.{proj}_lora.{role}.weight"
            else:
                name = f"{module}.lora_linear_layer.{role}.weight"
        elif layout == "lora.down":
            name = f"{module}.{parts[suffix][1]}"
        else:
            name = f"{module}.{parts[suffix][0]}"
            if layout == "peft-bare":
                name = "base_model.model." + name.removeprefix("unet.") if name.startswith("unet.") else name
        converted[name] = value
    meta = {}
    if layout == "peft":  # alpha comes from diffusers' metadata header
        import json
        (alpha,) = alphas
        meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": alpha,
                                                     "text_encoder.lora_alpha": alpha})}
    save_file(converted, str(tmp_path / "p.safetensors"), metadata=meta)
    L.apply_lora(model, tmp_path / "p.safetensors")
    assert_close(run(model), run(patched(_plain(model), [(path, 1.0)])))


def test_missing_alpha_means_scale_one(model, tmp_path):
    path = make_lora(model, tmp_path / "a.safetensors", alpha=3.0, rank=3)
    sd = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".alpha")}
    save_file(sd, str(tmp_path / "n.safetensors"))
    # alpha 3 = rank 3: the same as no alpha at all
    L.apply_lora(model, tmp_path / "n.safetensors")
    assert_close(run(model), run(patched(_plain(model), [(path, 1.0)])))
    assert all(m.alpha is None for m in L.read_lora(tmp_path / "n.safetensors", model).modules.values())


def test_saved_file_is_kohya_with_metadata(model, tmp_path):
    from ldm.checkpoint import save_checkpoint
    from ldm.weights_io import file_hash

    base = tmp_path / "base.safetensors"
    save_checkpoint(model, base)
    model.source = type("Source", (), {"path": str(base)})()
    path = make_lora(model, tmp_path / "a.safetensors", rank=4, alpha=2.0)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert meta["ss_network_dim"] == meta["rank"] == "4"
    assert meta["ss_network_alpha"] == meta["alpha"] == "2"
    assert meta["family"] == "sd1" and meta["base_model_hash"] == file_hash(base)[:10]


# --------------------------------------------------------------------------------------- errors

def _no_adapters(model) -> bool:
    return not any(hasattr(m, "base_layer") for m in model.modules()) and not L.lora_adapters(model)


def test_unknown_keys_are_refused_by_name(model, tmp_path):
    path = make_lora(model, tmp_path / "a.safetensors")
    sd = load_file(str(path))
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    sd["something_else.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(L.LoraError) as err:
        L.apply_lora(model, tmp_path / "bad.safetensors")
    assert "3 keys name no layer" in str(err.value)
    assert "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight" in str(err.value)
    assert "something_else.weight" in str(err.value)
    assert _no_adapters(model)


def test_lora_for_another_family_names_the_layer_and_both_shapes(model, tmp_path):
    tree = tiny_tree("sd2")
    tree["model"]["params"]["unet_config"]["params"]["context_dim"] = 48
    tree["model"]["params"]["cond_stage_config"]["params"]["width"] = 48
    from ldm.config import parse_config

    other = LatentDiffusion(parse_config(tree, "tiny-sd2-48"))
    path = make_lora(other, tmp_path / "sd2.safetensors", text_targets=())
    with pytest.raises(L.LoraError) as err:
        L.apply_lora(model, path)
    text = str(err.value)
    assert "different model" in text and "[32, 32]" in text and "[32, 48]" in text, text
    assert _no_adapters(model)


def test_other_bad_files(model, tmp_path):
    from ldm.checkpoint import save_checkpoint

    save_checkpoint(model, tmp_path / "full.safetensors")
    with pytest.raises(L.LoraError, match="not a LoRA for this model"):
        L.read_lora(tmp_path / "full.safetensors", model)
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8)},
              str(tmp_path / "xl.safetensors"))
    with pytest.raises(L.LoraError, match="SDXL"):
        L.read_lora(tmp_path / "xl.safetensors", model)
    path = make_lora(model, tmp_path / "a.safetensors")
    sd = {k: v for k, v in load_file(str(path)).items() if "attn1_to_q.lora_up" not in k}
    save_file(sd, str(tmp_path / "half.safetensors"))
    with pytest.raises(L.LoraError, match="has no up weight"):
        L.read_lora(tmp_path / "half.safetensors", model)
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(L.LoraError, match="text.safetensors"):
        L.read_lora(tmp_path / "text.safetensors", model)
    with pytest.raises(L.LoraError, match="no such file"):
        L.apply_lora(model, tmp_path / "missing.safetensors")
    with pytest.raises(L.LoraError, match="rank must be a positive"):
        L.add_lora(model, rank=0)
    with pytest.raises(L.LoraError, match="match no layer"):
        L.add_lora(model, targets=("to_z",))
    with pytest.raises(L.LoraError, match="finite"):
        L.apply_lora(model, path, scale=float("nan"))
    assert _no_adapters(model)


def test_openclip_text_attention_is_refused_but_its_mlp_works(tmp_path):
    sd2 = random_tiny_model("sd2", seed=4)
    with pytest.raises(L.LoraError, match="match no layer"):
        L.add_lora(sd2, text_targets=("q_proj",))
    path = make_lora(sd2, tmp_path / "mlp.safetensors", text_targets=L.TEXT_MLP)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_mlp_fc1") for k in load_file(str(path)))
    base = run(sd2)[1]
    L.apply_lora(sd2, path)
    assert (run(sd2)[1] - base).abs().max() > 0.05
    L.remove_lora(sd2)
    sd = load_file(str(path))
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, 4)
    save_file(sd, str(tmp_path / "attn.safetensors"))
    with pytest.raises(L.LoraError, match="OpenCLIP"):
        L.apply_lora(sd2, tmp_path / "attn.safetensors")
