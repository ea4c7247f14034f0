"""ControlNet: the original checkpoints' layout, and numerical parity with diffusers.

Our tiny SD1 / SD2 ControlNets get random weights everywhere (the zero convolutions too, or every
residual would be zero and any mix-up would pass); diffusers' own single-file converter turns our
state dict into a ``ControlNetModel``, and both must return the same residuals. The UNet's
``control`` input is compared with ``UNet2DConditionModel``'s additional residuals, with the speed
options off and on (the runner's shared classifier-free-guidance prefix included).
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from ldm.config import ConfigError
from ldm.controlnet_config import (ControlNetConfig, builtin_cldm_config, parse_cldm_config,
                                   parse_controlnet_config)
from ldm.modules.controlnet import ControlNet, strip_prefix
from ldm.modules.unet import UNetModel
from ldm.speed import SpeedOptions, apply_speed
from reference.models import (diffusers_controlnet, diffusers_unet, max_error, random_tiny_model,
                              randomize_)
from reference.tiny import tiny_config, tiny_tree
from tests.ldm.test_parity import TOL, check_close, swap

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = ("sd1", "sd2")


def random_controlnet(kind: str, seed: int = 1) -> ControlNet:
    cfg = ControlNetConfig.from_unet(tiny_config(kind).unet)
    return randomize_(ControlNet(cfg), seed=seed, scale=0.5).eval()


def cldm_tree(kind: str) -> dict:
    """The tiny model's tree with a ``control_stage_config`` for its UNet (cldm schema)."""
    tree = tiny_tree(kind)
    params = tree["model"]["params"]
    params["control_stage_config"] = {"target": "cldm.cldm.ControlNet",
                                      "params": dict(params["unet_config"]["params"], hint_channels=3)}
    return tree


@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    kind = request.param
    ours = random_controlnet(kind)
    # the file layout with the training model's prefix, as most released ControlNets have it
    prefixed = {f"control_model.{k}": v for k, v in ours.state_dict().items()}
    return kind, ours, diffusers_controlnet(cldm_tree(kind), prefixed)


def inputs(cfg, batch: int, h: int, w: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=gen)
    hint = torch.rand(batch, 3, 8 * h, 8 * w, generator=gen)
    context = torch.randn(batch, 77, cfg.context_dim, generator=gen)
    return x, hint, context


def reference_residuals(model, x, hint, t, context) -> list[torch.Tensor]:
    down, mid = model(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    return [*down, mid]


@pytest.mark.parametrize("timesteps", [[0], [999], [3, 617]], ids=["t0", "t999", "mixed"])
@pytest.mark.parametrize("size", [(8, 12), (9, 13)], ids=["8x12", "9x13"])
def test_residuals_match_diffusers(pair, timesteps, size):
    kind, ours, ref_model = pair
    x, hint, context = inputs(ours.config, len(timesteps), *size)
    t = torch.tensor(timesteps)
    with torch.no_grad():
        out = ours(x, hint, t, context)
        ref = reference_residuals(ref_model, x, hint, t, context)
    assert len(out) == len(ref) == len(ours.input_blocks) + 1
    for i, (a, b) in enumerate(zip(out, ref)):
        check_close(f"{kind} residual {i} t={timesteps} {size}", a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_parity_detects_swapped_weights(kind):
    """Exchanging two same-shape tensors in the reference must break the residuals' parity."""
    ours = random_controlnet(kind)
    sd = ours.state_dict()
    attn = "input_blocks.1.1.transformer_blocks.0.attn2."
    x, hint, context = inputs(ours.config, 1, 8, 8)
    t = torch.tensor([500])
    with torch.no_grad():
        out = torch.cat([r.flatten() for r in ours(x, hint, t, context)])
        for a, b in [(attn + "to_k.weight", attn + "to_v.weight"),
                     ("zero_convs.1.0.weight", "zero_convs.2.0.weight"),
                     ("input_hint_block.0.bias", "input_hint_block.2.bias")]:
            ref_model = diffusers_controlnet(cldm_tree(kind), swap(sd, a, b))
            ref = torch.cat([r.flatten() for r in reference_residuals(ref_model, x, hint, t, context)])
            err = max_error(out, ref)[0]
            assert err > 100 * TOL, f"swapping {a} and {b} changed the residuals by only {err:.3g}"


@pytest.fixture(scope="module", params=KINDS)
def unet_pair(request):
    kind = request.param
    model = random_tiny_model(kind)
    return model, diffusers_unet(tiny_tree(kind), model.state_dict()), random_controlnet(kind)


@pytest.mark.parametrize("speed", ["off", "defaults"])
@pytest.mark.parametrize("guidance", [1, 2], ids=["batch", "cfg"])
def test_unet_with_control_matches_diffusers(unet_pair, speed, guidance):
    """``apply_model(..., control=)`` against diffusers' additional residuals; with guidance the
    context holds [uncond, cond] rows for one batch of latents (the runner's shared prefix)."""
    model, ref_unet, controlnet = unet_pair
    model = copy.deepcopy(model)
    apply_speed(model, SpeedOptions.off() if speed == "off" else SpeedOptions())
    x, hint, context = inputs(controlnet.config, 2, 8, 12, seed=3)
    context = torch.cat([context] * guidance) + torch.randn(guidance * 2, 1, 1) * (guidance - 1)
    full_x, full_hint = torch.cat([x] * guidance), torch.cat([hint] * guidance)
    t = torch.tensor([10, 900] * guidance)
    with torch.inference_mode():
        control = controlnet(full_x, full_hint, t, context)
        out = model.apply_model(x, t[:2], context, control=control)
        plain = model.apply_model(x, t[:2], context)
        ref = ref_unet(full_x, t, encoder_hidden_states=context,
                       down_block_additional_residuals=tuple(control[:-1]),
                       mid_block_additional_residual=control[-1]).sample
    check_close(f"unet + control, speed {speed}, guidance {guidance}", out, ref)
    # the residuals matter: without them the output is far from the reference
    assert max_error(plain, ref)[0] > 100 * TOL


@pytest.mark.parametrize("speed", ["off", "defaults"])
def test_untrained_controlnet_leaves_the_unet_unchanged(speed):
    """Zero convolutions: a fresh ControlNet's residuals are zero, and the UNet's output is
    bit-identical to the output without control."""
    model = random_tiny_model("sd1")
    apply_speed(model, SpeedOptions.off() if speed == "off" else SpeedOptions())
    controlnet = ControlNet(ControlNetConfig.from_unet(model.config.unet)).eval()
    controlnet.copy_encoder_from(model.unet)
    x, hint, context = inputs(controlnet.config, 1, 8, 8)
    context = torch.cat([context, context + 1])
    t = torch.tensor([250, 250])
    with torch.inference_mode():
        control = controlnet(torch.cat([x, x]), torch.cat([hint, hint]), t, context)
        assert all(not r.any() for r in control)
        assert torch.equal(model.apply_model(x, t[:1], context, control=control),
                           model.apply_model(x, t[:1], context))


def test_control_must_have_one_residual_per_skip():
    model = random_tiny_model("sd1")
    x, _, context = inputs(model.config.unet, 1, 8, 8)
    with pytest.raises(ValueError, match="residuals"):
        model.apply_model(x, torch.tensor([1]), context, control=[torch.zeros(1)] * 3)


def test_hint_of_the_wrong_size_is_refused():
    controlnet = random_controlnet("sd1")
    x, _, context = inputs(controlnet.config, 1, 8, 8)
    with pytest.raises(ValueError, match="8 times"):
        controlnet(x, torch.rand(1, 3, 32, 32), torch.tensor([1]), context)


@pytest.mark.parametrize("name, params", [("cldm_v15", 361_279_120), ("cldm_v21", 364_228_240)])
def test_full_size_layout(name, params):
    """Parameter and key counts of the released ControlNets; the encoder's keys and shapes are the
    base UNet's."""
    base, cfg = builtin_cldm_config(name)
    with torch.device("meta"):
        controlnet, unet = ControlNet(cfg), UNetModel(base.unet)
    assert sum(p.numel() for p in controlnet.parameters()) == params
    sd = controlnet.state_dict()
    assert Counter(k.split(".")[0] for k in sd) == {
        "input_blocks": 248, "middle_block": 46, "zero_convs": 24, "input_hint_block": 16,
        "time_embed": 4, "middle_block_out": 2}
    assert list(sd)[:4] == ["time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight",
                            "time_embed.2.bias"]
    unet_sd = unet.state_dict()
    encoder = {k: v.shape for k, v in sd.items() if k.split(".")[0] in
               ("time_embed", "input_blocks", "middle_block")}
    assert encoder == {k: unet_sd[k].shape for k in encoder}
    hint = [(tuple(sd[f"input_hint_block.{i}.weight"].shape), controlnet.input_hint_block[i].stride)
            for i in range(0, 15, 2)]
    assert hint == [((16, 3, 3, 3), (1, 1)), ((16, 16, 3, 3), (1, 1)), ((32, 16, 3, 3), (2, 2)),
                    ((32, 32, 3, 3), (1, 1)), ((96, 32, 3, 3), (2, 2)), ((96, 96, 3, 3), (1, 1)),
                    ((256, 96, 3, 3), (2, 2)), ((320, 256, 3, 3), (1, 1))]
    assert [tuple(sd[f"zero_convs.{i}.0.weight"].shape) for i in (0, 11)] == [(320, 320, 1, 1),
                                                                             (1280, 1280, 1, 1)]


def test_cldm_configs():
    base15, c15 = builtin_cldm_config("cldm_v15")
    base21, c21 = builtin_cldm_config("cldm_v21")
    assert c15.hint_channels == c21.hint_channels == 3
    assert (c15.context_dim, base15.text.kind, c15.use_linear_in_transformer) == (768, "clip", False)
    assert (c21.context_dim, base21.text.kind, c21.use_linear_in_transformer) == (1024, "openclip", True)
    assert c21.heads_and_dim(640) == (10, 64) and c15.heads_and_dim(640) == (8, 80)
    assert c15.unet_fields() == base15.unet and c21.unet_fields() == base21.unet
    assert base21.parameterization == "eps" and base15.scale_factor == 0.18215


def test_cldm_config_errors():
    tree = cldm_tree("sd1")
    tree["model"]["params"]["control_stage_config"]["params"]["bogus"] = 1
    with pytest.raises(ConfigError, match="control_stage_config.params.bogus"):
        parse_controlnet_config(tree)
    tree = cldm_tree("sd1")
    tree["model"]["params"]["control_stage_config"]["target"] = "cldm.cldm.Other"
    with pytest.raises(ConfigError, match="target"):
        parse_controlnet_config(tree)
    tree = cldm_tree("sd1")
    tree["model"]["params"]["control_stage_config"]["params"]["model_channels"] = 64
    with pytest.raises(ConfigError, match="model_channels"):
        parse_cldm_config(tree)


def test_strip_prefix():
    sd = {"control_model.time_embed.0.weight": torch.zeros(1), "model.diffusion_model.x": torch.zeros(1)}
    assert list(strip_prefix(sd)) == ["time_embed.0.weight"]
    assert list(strip_prefix({"time_embed.0.weight": torch.zeros(1)})) == ["time_embed.0.weight"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cldm_v15", "cldm_v21"])
def test_full_size_residuals_match_diffusers(name):
    """The released ControlNet architectures at full width, random weights: residuals equal
    diffusers' ControlNetModel built by its own converter (8×8 latents keep the forward short)."""
    import yaml

    from ldm.resources import config_dir

    _, cfg = builtin_cldm_config(name)
    ours = randomize_(ControlNet(cfg), seed=5, scale=0.2).eval()
    tree = yaml.safe_load((config_dir() / f"{name}.yaml").read_text())
    prefixed = {f"control_model.{k}": v for k, v in ours.state_dict().items()}
    ref_model = diffusers_controlnet(tree, prefixed)
    assert sum(p.numel() for p in ref_model.parameters()) == sum(p.numel() for p in ours.parameters())
    x, hint, context = inputs(cfg, 1, 8, 8)
    t = torch.tensor([421])
    with torch.no_grad():
        out = ours(x, hint, t, context)
        ref = reference_residuals(ref_model, x, hint, t, context)
    assert len(out) == len(ref) == 13
    for i, (a, b) in enumerate(zip(out, ref)):
        check_close(f"{name} residual {i}", a, b)
