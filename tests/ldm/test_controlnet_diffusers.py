"""diffusers-layout ControlNets: folders and single files load into our ControlNet, whose residuals
equal those of diffusers' own ``ControlNetModel`` holding the same random weights."""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from ldm.controlnet_config import ControlNetConfig
from ldm.controlnet_diffusers import config_from_diffusers, key_map
from ldm.controlnet_loading import is_controlnet, load_controlnet
from ldm.modules.controlnet import ControlNet
from ldm.weights_io import CheckpointError
from reference.models import randomize_
from reference.tiny import tiny_config
from tests.ldm.test_parity import check_close

pytestmark = pytest.mark.usefixtures("single_thread")

# the tiny configs' structure (levels of 32/64, attention at both, context 32) in diffusers' terms;
# attention_head_dim is the number of heads (diffusers' historical naming): SD1 2 heads throughout,
# SD2 heads of width 8 (4 and 8 heads), with linear projections
DIFFUSERS_KWARGS = {
    "sd1": dict(attention_head_dim=2, use_linear_projection=False),
    "sd2": dict(attention_head_dim=[4, 8], use_linear_projection=True),
}
TOL = 1e-5


def diffusers_model(kind: str, seed: int = 3):
    from diffusers import ControlNetModel

    model = ControlNetModel(in_channels=4, conditioning_channels=3, block_out_channels=[32, 64],
                            down_block_types=["CrossAttnDownBlock2D"] * 2, layers_per_block=2,
                            cross_attention_dim=32, **DIFFUSERS_KWARGS[kind])
    return randomize_(model, seed=seed, scale=0.5).eval()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def saved(request, tmp_path_factory):
    """(kind, diffusers model, its folder, its single file)."""
    kind = request.param
    model = diffusers_model(kind)
    folder = tmp_path_factory.mktemp(f"cn-{kind}")
    model.save_pretrained(folder / "folder")
    single = folder / "controlnet-diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(single))
    return kind, model, folder / "folder", single


def tiny_controlnet_config(kind: str, like: ControlNetConfig) -> ControlNetConfig:
    """The tiny model's ControlNet config; a fixed head width makes num_heads unused (-1 or not)."""
    cfg = ControlNetConfig.from_unet(tiny_config(kind).unet)
    return dataclasses.replace(cfg, num_heads=like.num_heads) if cfg.num_head_channels != -1 else cfg


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def residuals_match(ours: ControlNet, ref, kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=gen)
    hint = torch.rand(2, 3, 64, 96, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([3, 617])
    with torch.no_grad():
        out = ours(x, hint, t, context)
        down, mid = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    assert len(out) == len(down) + 1
    for i, (a, b) in enumerate(zip(out, [*down, mid])):
        check_close(f"{kind} residual {i}", a, b, tol=TOL)


def test_folder_matches_diffusers(saved):
    kind, model, folder, _ = saved
    net = load_controlnet(folder, tiny_config(kind))
    # config.json, read with diffusers' meaning of attention_head_dim, gives the tiny model's config
    assert net.config == tiny_controlnet_config(kind, net.config)
    assert net.config_source == f"config file {folder / 'config.json'}"
    residuals_match(net, model, kind)


def test_single_file_matches_diffusers(saved):
    """No config.json: structure from the keys, heads from the base model."""
    kind, model, _, single = saved
    net = load_controlnet(single, tiny_config(kind))
    assert net.config == ControlNetConfig.from_unet(tiny_config(kind).unet)
    assert "inferred" in net.config_source
    residuals_match(net, model, kind)


def test_every_diffusers_key_maps_to_one_of_ours(saved):
    kind, model, _, _ = saved
    cfg = ControlNetConfig.from_unet(tiny_config(kind).unet)
    names = key_map(cfg)
    with torch.device("meta"):
        ours = ControlNet(cfg).state_dict()
    theirs = model.state_dict()
    assert set(names) == set(theirs)
    assert set(names.values()) == set(ours) and max(Counter(names.values()).values()) == 1
    for d, o in names.items():  # shapes are copied as they are
        assert tuple(theirs[d].shape) == tuple(ours[o].shape), (d, o)
    assert is_controlnet(theirs)


def test_folder_variants(saved, tmp_path):
    kind, model, folder, _ = saved
    fp16 = tmp_path / "fp16"
    fp16.mkdir()
    (fp16 / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
              str(fp16 / "diffusion_pytorch_model.fp16.safetensors"))
    net = load_controlnet(fp16, tiny_config(kind), dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in net.state_dict().values())
    pickled = tmp_path / "bin"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "diffusion_pytorch_model.bin")
    residuals_match(load_controlnet(pickled), model, kind)  # config.json: no base needed


def test_folder_without_weights(saved, tmp_path):
    _, _, folder, _ = saved
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError) as exc:
        load_controlnet(tmp_path)
    text = one_line(exc)
    assert text.startswith(f"{tmp_path}: no weights") and "diffusion_pytorch_model.safetensors" in text


@pytest.mark.parametrize("where", ["folder", "single"])
def test_truncated_keys_named(saved, tmp_path, where):
    kind, model, folder, _ = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not k.startswith("controlnet_down_blocks.3.")}
    if where == "folder":
        (tmp_path / "config.json").write_text((folder / "config.json").read_text())
        path = tmp_path / "diffusion_pytorch_model.safetensors"
    else:
        path = tmp_path / "cn.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as exc:
        load_controlnet(tmp_path if where == "folder" else path, tiny_config(kind))
    text = one_line(exc)
    assert text.startswith(f"{path}: ") and "2 missing keys" in text
    assert "controlnet_down_blocks.3.weight" in text and "controlnet_down_blocks.3.bias" in text


def test_unexpected_key_named(saved, tmp_path):
    kind, model, _, _ = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["controlnet_down_blocks.99.weight"] = torch.zeros(1)
    path = tmp_path / "cn.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as exc:
        load_controlnet(path, tiny_config(kind))
    assert "1 unexpected keys (controlnet_down_blocks.99.weight)" in one_line(exc)


@pytest.mark.parametrize("field, value", [
    ("conditioning_embedding_out_channels", [16, 32, 96, 512]),
    ("controlnet_conditioning_channel_order", "bgr"),
    ("global_pool_conditions", True),
])
def test_unsupported_config_fields_refused(field, value):
    cfg = {"_class_name": "ControlNetModel", "block_out_channels": [32, 64],
           "down_block_types": ["CrossAttnDownBlock2D"] * 2, "cross_attention_dim": 32,
           "attention_head_dim": 2, field: value}
    with pytest.raises(CheckpointError) as exc:
        config_from_diffusers(cfg, "config.json")
    text = one_line(exc)
    assert text.startswith(f"config.json: {field}={value!r} is not supported")


def test_full_size_sd15_config():
    """diffusers' SD1.5 ControlNet config.json (its defaults) is the cldm_v15 ControlNet."""
    from ldm.controlnet_config import builtin_cldm_config
    cfg = {"_class_name": "ControlNetModel", "attention_head_dim": 8, "cross_attention_dim": 768,
           "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "conditioning_embedding_out_channels": [16, 32, 96, 256], "upcast_attention": False,
           "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}
    want = builtin_cldm_config("cldm_v15")[1]
    # the YAML's training-only use_checkpoint and its resolution order do not change the network
    want = dataclasses.replace(want, use_checkpoint=False,
                               attention_resolutions=tuple(sorted(want.attention_resolutions)))
    assert config_from_diffusers(cfg, "config.json") == want
