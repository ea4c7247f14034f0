"""Loading ControlNet files (original layout; diffusers' in test_controlnet_diffusers): formats, prefix, config inference, strict checks."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldm.config import builtin_config
from ldm.controlnet_config import ControlNetConfig, builtin_cldm_config
from ldm.controlnet_loading import (check_fits_base, controlnet_family, infer_controlnet_config, is_controlnet,
                                    load_controlnet)
from ldm.modules.controlnet import ControlNet
from ldm.weights_io import CheckpointError
from reference.models import randomize_
from reference.tiny import tiny_config


def random_controlnet(kind: str, seed: int = 1) -> ControlNet:
    cfg = ControlNetConfig.from_unet(tiny_config(kind).unet)
    return randomize_(ControlNet(cfg), seed=seed, scale=0.5).eval()


@pytest.fixture(scope="module")
def sd1():
    return random_controlnet("sd1")


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def assert_same(net: ControlNet, ref: ControlNet):
    got, want = net.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("layout", ["safetensors", "prefixed.safetensors", "pth", "wrapped.ckpt"])
def test_loads_back_bit_equal(sd1, tmp_path, layout):
    state = {k: v.contiguous() for k, v in sd1.state_dict().items()}
    path = tmp_path / f"cn.{layout}"
    if layout.startswith("prefixed"):
        save_file({f"control_model.{k}": v for k, v in state.items()}, str(path))
    elif layout == "safetensors":
        save_file(state, str(path))
    elif layout == "pth":
        torch.save(state, path)
    else:  # a training checkpoint: the state_dict under a wrapper key, with the prefix
        torch.save({"state_dict": {f"control_model.{k}": v for k, v in state.items()},
                    "epoch": 3}, path)
    base = tiny_config("sd1")
    net = load_controlnet(path, base)
    assert_same(net, sd1)
    assert net.config == sd1.config  # inferred from the shapes, heads from the base model
    assert not net.training and "inferred" in net.config_source
    # an explicit config gives the same model; dtype casts
    half = load_controlnet(path, config=sd1.config, dtype=torch.float16)
    assert half.config == sd1.config
    assert all(v.dtype == torch.float16 for v in half.state_dict().values())


def test_tiny_heads_need_the_base(sd1, tmp_path):
    """The tiny configs' context width (32) is no family's: heads cannot be guessed without base."""
    path = tmp_path / "cn.safetensors"
    save_file(dict(sd1.state_dict()), str(path))
    with pytest.raises(CheckpointError) as exc:
        load_controlnet(path)
    assert "heads" in one_line(exc) and "context width 32" in str(exc.value)
    assert controlnet_family(sd1.state_dict()) is None and is_controlnet(sd1.state_dict())


@pytest.mark.parametrize("name, cldm, family", [("v1-inference", "cldm_v15", "sd1"),
                                                ("v2-inference", "cldm_v21", "sd2")])
def test_full_size_config_inferred_from_shapes(name, cldm, family):
    cfg = ControlNetConfig.from_unet(builtin_config(name).unet)
    with torch.device("meta"):
        state = ControlNet(cfg).state_dict()
    inferred, rules = infer_controlnet_config(state)
    assert inferred == cfg == builtin_cldm_config(cldm)[1]
    assert rules and all("\n" not in r for r in rules)
    assert controlnet_family({f"control_model.{k}": v for k, v in state.items()}) == family
    # with the base model, the same
    assert infer_controlnet_config(state, builtin_config(name))[0] == cfg


def test_full_size_sd2_controlnet_on_sd1_model_refused():
    with torch.device("meta"):  # only shapes are read: no full-size file needed
        state = ControlNet(ControlNetConfig.from_unet(builtin_config("v2-inference").unet)).state_dict()
    with pytest.raises(CheckpointError) as exc:
        check_fits_base(state, builtin_config("v1-inference"), "controlnet.safetensors")
    assert one_line(exc) == (
        "controlnet.safetensors: made for another model: "
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight is [320, 1024] here but "
        "[320, 768] in the model (an SD2 ControlNet on an SD1 model?)")
    check_fits_base(state, builtin_config("v2-inference"), "controlnet.safetensors")  # fits


def test_tiny_sd2_controlnet_on_sd1_base_refused(tmp_path):
    sd2 = random_controlnet("sd2")
    path = tmp_path / "cn2.safetensors"
    save_file(dict(sd2.state_dict()), str(path))
    with pytest.raises(CheckpointError) as exc:
        load_controlnet(path, tiny_config("sd1"))
    text = one_line(exc)
    # tiny SD1 and SD2 share the context width; the projection kind differs (conv vs linear)
    assert text.startswith(f"{path}: made for another model: ") and "proj_in.weight is [" in text
    assert "here but [" in text and "in the model" in text
    assert load_controlnet(path, tiny_config("sd2")).config == sd2.config


def test_missing_and_unexpected_keys_named(sd1, tmp_path):
    state = dict(sd1.state_dict())
    del state["zero_convs.2.0.weight"]
    state["zero_convs.99.0.bias"] = torch.zeros(3)
    path = tmp_path / "cn.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as exc:
        load_controlnet(path, tiny_config("sd1"))
    text = one_line(exc)
    assert "1 missing keys (zero_convs.2.0.weight)" in text
    assert "1 unexpected keys (zero_convs.99.0.bias)" in text
    state = dict(sd1.state_dict())
    state["middle_block_out.0.weight"] = torch.zeros(64, 64, 3, 3)
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as exc:
        load_controlnet(path, tiny_config("sd1"))
    assert "middle_block_out.0.weight: file [64, 64, 3, 3] vs model [64, 64, 1, 1]" in one_line(exc)


def test_garbage_and_non_controlnet_files(tmp_path, sd1):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError) as exc:
        load_controlnet(junk)
    assert one_line(exc).startswith(f"{junk}: ")
    unet_like = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)},
              str(unet_like))
    with pytest.raises(CheckpointError) as exc:
        load_controlnet(unet_like)
    assert "not a ControlNet" in one_line(exc)


def test_broken_diffusers_layout_named(tmp_path):
    """diffusers-layout keys without the encoder's blocks: one line naming what is absent."""
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3),
               "controlnet_down_blocks.0.weight": torch.zeros(32, 32, 1, 1),
               "controlnet_mid_block.weight": torch.zeros(64, 64, 1, 1),
               "conv_in.weight": torch.zeros(32, 4, 3, 3)}, str(path))
    with pytest.raises(CheckpointError) as exc:
        load_controlnet(path)
    assert one_line(exc) == f"{path}: diffusers-layout ControlNet without down_blocks.*"


def test_the_shipped_controlnet_reads_its_config_from_its_header():
    """Its text width (128) is no family's: without the header the heads could not be inferred."""
    from ldm.controlnet_loading import resolve_controlnet_config
    from ldm.resources import shipped_file
    from ldm.modules.controlnet import strip_prefix
    from ldm.weights_io import read_state_dict

    path = shipped_file("weights", "tiny-shapes-canny.safetensors")
    sd = strip_prefix(read_state_dict(path))
    cfg, source = resolve_controlnet_config(None, path, sd)
    assert source == "the file's ldm_config header"
    net = load_controlnet(path)
    assert net.config == cfg and cfg.context_dim == 128
