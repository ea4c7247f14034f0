"""SDXL ControlNets: the original layout (``label_emb`` reading the UNet's vector ``y``) and
diffusers' (``add_embedding``, ``addition_embed_type="text_time"``), residuals equal to diffusers'
``ControlNetModel`` on the same random weights; configs from shapes, cldm trees, file headers and
``config.json``; the other family refused with one line; full-size counts on the meta device."""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
import yaml
from safetensors.torch import save_file

from ldm.config import builtin_config
from ldm.controlnet_config import ControlNetConfig, parse_cldm_config
from ldm.controlnet_diffusers import config_from_diffusers, from_diffusers, key_map, skeleton_config
from ldm.controlnet_loading import (check_fits_base, controlnet_family, infer_controlnet_config,
                                    load_controlnet)
from ldm.model import LatentDiffusion
from ldm.modules.controlnet import ControlNet
from ldm.weights_io import CheckpointError
from reference.models import max_error, randomize_
from reference.sdxl import (diffusers_sdxl_controlnet, diffusers_time_ids,
                            random_diffusers_sdxl_controlnet, sdxl_cldm_tree)
from reference.tiny import tiny_config, tiny_sdxl_config, tiny_sdxl_tree
from tests.ldm.test_parity import check_close, swap

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5
SIZE_KEYS = ["original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"]


def random_sdxl_controlnet(seed: int = 1) -> ControlNet:
    cfg = ControlNetConfig.from_unet(tiny_sdxl_config().unet)
    return randomize_(ControlNet(cfg), seed=seed, scale=0.5).eval()


@pytest.fixture(scope="module")
def ours():
    return random_sdxl_controlnet()


@pytest.fixture(scope="module")
def conditioner():
    return LatentDiffusion(tiny_sdxl_config()).conditioner


def inputs(conditioner, batch: int = 2, h: int = 8, w: int = 12, seed: int = 0, target=None):
    """Latents, hints, context, timesteps, y, and diffusers' added_cond_kwargs for the same y."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=gen)
    hint = torch.rand(batch, 3, 8 * h, 8 * w, generator=gen)
    context = torch.randn(batch, 77, 64, generator=gen)
    pooled = torch.randn(batch, 32, generator=gen)
    values = {"original_size_as_tuple": torch.tensor([[1024.0, 768.0], [512.0, 512.0]])[:batch],
              "crop_coords_top_left": torch.tensor([[0.0, 0.0], [16.0, 48.0]])[:batch],
              "target_size_as_tuple": torch.tensor(target or [[1024.0, 1024.0], [768.0, 1344.0]])[:batch]}
    y = conditioner.vector(pooled, values)
    added = {"text_embeds": pooled, "time_ids": diffusers_time_ids(values, SIZE_KEYS)}
    return x, hint, context, y, added


def reference_residuals(model, x, hint, t, context, added) -> list[torch.Tensor]:
    down, mid = model(x, t, encoder_hidden_states=context, controlnet_cond=hint,
                      added_cond_kwargs=added, return_dict=False)
    return [*down, mid]


def reference(net: ControlNet, prefix: str = "control_model."):
    state = {f"{prefix}{k}": v for k, v in net.state_dict().items()}
    return diffusers_sdxl_controlnet(sdxl_cldm_tree(tiny_sdxl_tree()), tiny_sdxl_config(), state)


def assert_residuals_equal(net, ref, conditioner, timesteps=(3, 617), what="sdxl"):
    x, hint, context, y, added = inputs(conditioner, len(timesteps))
    t = torch.tensor(list(timesteps))
    with torch.no_grad():
        out = net(x, hint, t, context, y=y)
        theirs = reference_residuals(ref, x, hint, t, context, added)
    assert len(out) == len(theirs) == len(net.input_blocks) + 1
    for i, (a, b) in enumerate(zip(out, theirs)):
        check_close(f"{what} residual {i} t={timesteps}", a, b, tol=TOL)


# ---------------------------------------------------------------- the original layout

@pytest.mark.parametrize("prefix", ["control_model.", ""], ids=["prefixed", "bare"])
@pytest.mark.parametrize("timesteps", [(0, 999), (3, 617)], ids=["ends", "mixed"])
def test_residuals_match_diffusers(ours, conditioner, prefix, timesteps):
    assert_residuals_equal(ours, reference(ours, prefix), conditioner, timesteps)


def test_y_reaches_the_residuals(ours, conditioner):
    """Another target size (only y changes) moves the residuals of the second level and the middle
    block (at the tiny first level, 32 channels in 32 GroupNorm groups normalise the embedding's
    per-channel shift away); without y: one error."""
    x, hint, context, y, _ = inputs(conditioner)
    other = inputs(conditioner, target=[[512.0, 512.0], [512.0, 512.0]])[3]
    t = torch.tensor([3, 617])
    with torch.no_grad():
        a, b = ours(x, hint, t, context, y=y), ours(x, hint, t, context, y=other)
        assert all(max_error(r, s)[0] > 100 * TOL for r, s in zip(a[4:], b[4:]))
        with pytest.raises(ValueError, match=r"SDXL ControlNet needs a vector y of shape \(2, 80\)"):
            ours(x, hint, t, context)


def test_parity_detects_swapped_label_emb(ours, conditioner):
    x, hint, context, y, added = inputs(conditioner)
    t = torch.tensor([500, 500])
    state = {f"control_model.{k}": v for k, v in ours.state_dict().items()}
    with torch.no_grad():
        out = torch.cat([r.flatten() for r in ours(x, hint, t, context, y=y)])
        bad = diffusers_sdxl_controlnet(sdxl_cldm_tree(tiny_sdxl_tree()), tiny_sdxl_config(), swap(
            state, "control_model.label_emb.0.0.bias", "control_model.time_embed.0.bias"))
        ref = torch.cat([r.flatten() for r in reference_residuals(bad, x, hint, t, context, added)])
    assert max_error(out, ref)[0] > 100 * TOL


def test_untrained_copy_of_the_unet_gives_zero_residuals(conditioner):
    from reference.sdxl import random_sdxl_model

    model = random_sdxl_model()
    net = ControlNet(ControlNetConfig.from_unet(model.config.unet)).eval()
    net.copy_encoder_from(model.unet)
    assert torch.equal(net.label_emb[0][0].weight, model.unet.label_emb[0][0].weight)
    x, hint, context, y, _ = inputs(conditioner)
    with torch.no_grad():
        assert all(not r.any() for r in net(x, hint, torch.tensor([1, 2]), context, y=y))


def test_file_loads_with_config_from_shapes(ours, tmp_path):
    path = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(path))
    base = tiny_sdxl_config()
    net = load_controlnet(path, base)
    assert net.config == ours.config and "inferred" in net.config_source
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ours.state_dict().values()))
    assert controlnet_family(ours.state_dict()) == "sdxl"


def test_cldm_yaml_and_file_header(ours, tmp_path):
    """A cldm-style YAML (the sgm tree with control_stage_config) and the ``ldm_config`` header that
    training writes give the same config; no base model needed."""
    from training.controlnet import save_controlnet

    tree = sdxl_cldm_tree(tiny_sdxl_tree())
    base, cfg = parse_cldm_config(tree)
    assert cfg == ours.config and base == tiny_sdxl_config()
    (tmp_path / "cldm_xl.yaml").write_text(yaml.safe_dump(tree))
    path = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(path))
    assert load_controlnet(path, config=tmp_path / "cldm_xl.yaml").config == ours.config
    save_controlnet(ours, tmp_path / "trained.safetensors", tiny_sdxl_config())
    net = load_controlnet(tmp_path / "trained.safetensors")
    assert net.config == ours.config and net.config_source == "the file's ldm_config header"


def test_cldm_tree_with_another_vector_width_is_refused():
    from ldm.config import ConfigError

    tree = sdxl_cldm_tree(tiny_sdxl_tree())
    tree["model"]["params"]["control_stage_config"]["params"]["adm_in_channels"] = 72
    with pytest.raises(ConfigError, match="adm_in_channels is 72, the UNet's is 80"):
        parse_cldm_config(tree)


# ---------------------------------------------------------------- diffusers' layout

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = random_diffusers_sdxl_controlnet()
    folder = tmp_path_factory.mktemp("cn-xl")
    model.save_pretrained(folder / "folder")
    single = folder / "controlnet-xl.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(single))
    return model, folder / "folder", single


def test_diffusers_folder_matches_diffusers(saved, conditioner):
    model, folder, _ = saved
    net = load_controlnet(folder, tiny_sdxl_config())
    want = ControlNetConfig.from_unet(tiny_sdxl_config().unet)
    # config.json's head counts (4 at the one attention width, 64) are the tiny model's 16-wide heads
    assert net.config.heads_and_dim(64) == want.heads_and_dim(64) == (4, 16)
    assert dataclasses.replace(net.config, num_heads=want.num_heads,
                               num_head_channels=want.num_head_channels) == want
    assert net.config_source == f"config file {folder / 'config.json'}"
    assert_residuals_equal(net, model, conditioner, what="folder")


def test_diffusers_single_file_matches_diffusers(saved, conditioner):
    model, _, single = saved
    net = load_controlnet(single, tiny_sdxl_config())
    assert net.config == ControlNetConfig.from_unet(tiny_sdxl_config().unet)
    assert_residuals_equal(net, model, conditioner, what="single file")


@pytest.mark.parametrize("depths", [(1, 1), (1, 0)], ids=["shallower", "no-blocks"])
def test_shallower_controlnets_load_and_match_diffusers(conditioner, tmp_path, depths):
    """Fewer transformer blocks than the base UNet (none at all: norm and projections only) change
    no residual's shape: folder and single file load on the base and match diffusers."""
    model = random_diffusers_sdxl_controlnet(seed=5, depths=depths)
    model.save_pretrained(tmp_path / "folder")
    single = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(single))
    for path in (tmp_path / "folder", single):
        net = load_controlnet(path, tiny_sdxl_config())
        assert net.config.transformer_depth == depths and net.config.middle_depth == depths[-1]
        assert_residuals_equal(net, model, conditioner, what=f"{path.name} depths {depths}")


def test_every_diffusers_key_maps_to_one_of_ours(saved):
    model, _, _ = saved
    cfg = ControlNetConfig.from_unet(tiny_sdxl_config().unet)
    names = key_map(cfg)
    with torch.device("meta"):
        ours = ControlNet(cfg).state_dict()
    theirs = model.state_dict()
    assert set(names) == set(theirs) and set(names.values()) == set(ours)
    assert names["add_embedding.linear_1.weight"] == "label_emb.0.0.weight"
    assert all(tuple(theirs[d].shape) == tuple(ours[o].shape) for d, o in names.items())


# ---------------------------------------------------------------- the other family

def _save(net: ControlNet, path):
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_tiny_sd1_controlnet_on_sdxl_and_reverse_refused(ours, tmp_path):
    sd1 = randomize_(ControlNet(ControlNetConfig.from_unet(tiny_config("sd1").unet)), seed=1)
    cases = [(_save(sd1, tmp_path / "sd1.safetensors"), tiny_sdxl_config(), "[64, 32] here but [64, 64]",
              "(an SD1/SD2 ControlNet on an SDXL model?)"),
             (_save(ours, tmp_path / "xl.safetensors"), tiny_config("sd1"), "[64, 64] here but [64, 32]",
              "(an SDXL ControlNet on an SD1/SD2 model?)")]
    for path, base, shapes, guess in cases:
        with pytest.raises(CheckpointError) as exc:
            load_controlnet(path, base)
        text = str(exc.value)
        assert "\n" not in text and text.startswith(f"{path}: made for another model: ")
        assert "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight is " + shapes in text
        assert text.endswith(guess)


# ---------------------------------------------------------------- full size, meta device

# diffusers/controlnet-canny-sdxl-1.0's config.json (the fields that shape the network)
SDXL_CONFIG = dict(
    _class_name="ControlNetModel", in_channels=4, conditioning_channels=3,
    block_out_channels=[320, 640, 1280], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
    transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    conditioning_embedding_out_channels=[16, 32, 96, 256])


def test_full_size_sdxl_controlnet_equals_diffusers_on_meta():
    from diffusers import ControlNetModel

    cfg = ControlNetConfig.from_unet(builtin_config("sd_xl_base").unet)
    with torch.device("meta"):
        net = ControlNet(cfg)
        ref = ControlNetModel(**{k: v for k, v in SDXL_CONFIG.items() if k != "_class_name"})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(net) == count(ref) == 1_251_014_160
    sd = net.state_dict()
    assert Counter(k.split(".")[0] for k in sd) == {
        "input_blocks": 574, "middle_block": 226, "zero_convs": 18, "input_hint_block": 16,
        "time_embed": 4, "label_emb": 4, "middle_block_out": 2}
    assert set(key_map(cfg)) == set(ref.state_dict())
    # config from the shapes alone (SDXL's heads rule from the context width), and from config.json
    inferred, rules = infer_controlnet_config(sd)
    assert inferred == cfg and controlnet_family(sd) == "sdxl"
    assert any("adm_in_channels = 2816" in r for r in rules)
    from_json = config_from_diffusers(SDXL_CONFIG, "config.json")
    assert dataclasses.replace(from_json, attention_resolutions=cfg.attention_resolutions,
                               num_heads=cfg.num_heads) == cfg
    # a diffusers single file (no config.json): named from its keys, then read from its shapes
    renamed = from_diffusers(ref.state_dict(), skeleton_config(ref.state_dict()))
    assert set(renamed) == set(sd) and infer_controlnet_config(renamed)[0] == cfg


def test_full_size_other_family_named():
    with torch.device("meta"):
        xl = ControlNet(ControlNetConfig.from_unet(builtin_config("sd_xl_base").unet)).state_dict()
        sd1 = ControlNet(ControlNetConfig.from_unet(builtin_config("v1-inference").unet)).state_dict()
    key = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    for state, base, here, there, guess in [
            (sd1, "sd_xl_base", 768, 2048, "an SD1 ControlNet on an SDXL model?"),
            (xl, "v1-inference", 2048, 768, "an SDXL ControlNet on an SD1 model?"),
            (xl, "v2-inference", 2048, 1024, "an SDXL ControlNet on an SD2 model?")]:
        with pytest.raises(CheckpointError) as exc:
            check_fits_base(state, builtin_config(base), "cn.safetensors")
        assert str(exc.value) == (f"cn.safetensors: made for another model: {key} is [640, {here}] "
                                  f"here but [640, {there}] in the model ({guess})")
    check_fits_base(xl, builtin_config("sd_xl_base"), "cn.safetensors")  # fits
