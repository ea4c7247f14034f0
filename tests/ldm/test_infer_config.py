"""ldm.infer_config: a model's configuration read back from the shapes of its state dict.

Each case builds a model on the meta device, infers a config from its state-dict shapes and checks
that (1) the inferred config builds a model with exactly the same keys and shapes and (2) every
architecture field equals the original's. Fields that no weight's shape depends on are kept from
the family's built-in config (``KEPT_FROM_BASE``); attention head counts change no shape either, so
they follow the base's head rule, and cases whose original used another head layout get a base
carrying that layout (``_base_with_heads``).
"""
from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import pytest
import torch

from ldm.config import ModelConfig, builtin_config, load_config
from ldm.infer_config import infer_config
from ldm.model import LatentDiffusion
from ldm.weights_io import CheckpointError
from reference.tiny import tiny_config

FAMILY_BASE = {"sd1": "v1-inference", "sd1-inpaint": "v1-inpainting-inference",
               "sd2": "v2-inference", "sd2-v": "v2-inference-v",
               "sd2-inpaint": "v2-inpainting-inference"}

# Fields no weight shape depends on: inference keeps the base's value. Top level: schedule and
# sampling; per part: run-time switches, plus the ones listed with their reason.
KEPT_FROM_BASE = {
    None: ("linear_start", "linear_end", "timesteps", "beta_schedule", "scale_factor",
           "parameterization", "conditioning_key", "image_size", "sampling"),
    "unet": ("use_checkpoint", "dropout", "legacy"),  # legacy changes head widths only when a
    # head rule does not divide a width, which inference rejects
    "autoencoder": ("dropout", "resolution"),  # resolution: training image size; only the levels
    # that have attention are visible, expressed relative to the base's resolution
    "text": ("layer", "act", "pad_token_id"),  # which block the UNet reads, activation, padding
}


@functools.lru_cache(maxsize=None)
def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _meta_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in _shapes(cfg).items()}


def _expected(original: ModelConfig, base: ModelConfig) -> ModelConfig:
    """``original`` with the fields inference keeps from ``base``."""
    top = {f: getattr(base, f) for f in KEPT_FROM_BASE[None]}
    parts = {part: dataclasses.replace(getattr(original, part),
                                       **{f: getattr(getattr(base, part), f) for f in fields})
             for part, fields in KEPT_FROM_BASE.items() if part is not None}
    return original.replace(**top, **parts)


def _base_with_heads(name: str, original: ModelConfig) -> ModelConfig:
    """The built-in ``name`` carrying ``original``'s head layout (heads leave no trace in shapes):
    its UNet head rule, and a text head width equal to the original's."""
    base = builtin_config(name)
    head_width = original.text.width // original.text.heads
    unet = dataclasses.replace(base.unet, num_heads=original.unet.num_heads,
                               num_head_channels=original.unet.num_head_channels)
    text = dataclasses.replace(base.text, heads=base.text.width // head_width)
    return base.replace(unet=unet, text=text)


def assert_round_trip(original: ModelConfig, inferred: ModelConfig, base: ModelConfig) -> None:
    want, got = _shapes(original), _shapes(inferred)
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys())[:5],
                                       sorted(want.keys() - got.keys())[:5])
    diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not diff, list(diff.items())[:5]
    assert _unordered(inferred) == _unordered(_expected(original, base))


def _unordered(cfg: ModelConfig) -> ModelConfig:
    """The UNet asks only whether a level's resolution is in attention_resolutions: order is free."""
    return cfg.replace(unet=dataclasses.replace(
        cfg.unet, attention_resolutions=tuple(sorted(cfg.unet.attention_resolutions))))


def _check(original: ModelConfig, base: ModelConfig) -> list[str]:
    inferred, rules = infer_config(_meta_state_dict(original), base)
    assert_round_trip(original, inferred, base)
    assert rules and all(isinstance(r, str) and "\n" not in r for r in rules)
    return rules


@pytest.mark.parametrize("kind", sorted(FAMILY_BASE))
def test_tiny_configs_round_trip(kind):
    original = tiny_config(kind)
    _check(original, _base_with_heads(FAMILY_BASE[kind], original))


def test_shipped_tiny_shapes_round_trips():
    original = load_config("configs/tiny-shapes.yaml")
    rules = _check(original, _base_with_heads("v1-inference", original))
    assert "unet.model_channels = 64 (input_blocks.0.0.weight has 64 output channels)" in rules


@pytest.mark.parametrize("name", ["v1-inference", "v2-inference-v", "v1-inpainting-inference"])
def test_full_size_builtins_round_trip_with_the_family_rules(name):
    original = builtin_config(name)
    rules = _check(original, original)  # the family's own head rules reproduce the built-ins
    assert any(r.startswith("text.heads = ") for r in rules)


def _sd1_variant() -> ModelConfig:
    base = builtin_config("v1-inference")
    unet = dataclasses.replace(base.unet, model_channels=96, channel_mult=(1, 2),
                               attention_resolutions=(2,), num_res_blocks=1, transformer_depth=2,
                               context_dim=192, in_channels=8, out_channels=8)
    vae = dataclasses.replace(base.autoencoder, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1,
                              attn_resolutions=(64,), z_channels=8, embed_dim=8)
    text = dataclasses.replace(base.text, width=192, layers=2, heads=3, max_length=20,
                               vocab_size=1000, mlp_ratio=2.5, projection_dim=192)
    return base.replace(unet=unet, autoencoder=vae, text=text, channels=8)


def _sd2_linear_variant() -> ModelConfig:
    base = builtin_config("v2-inference-v")
    unet = dataclasses.replace(base.unet, model_channels=128, channel_mult=(1, 2, 3),
                               attention_resolutions=(1, 4), num_res_blocks=1, context_dim=320)
    vae = dataclasses.replace(base.autoencoder, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                              double_z=False, out_ch=1, in_channels=1)
    text = dataclasses.replace(base.text, width=320, layers=2, heads=5, projection_dim=256,
                               mlp_ratio=3.0, vocab_size=512)
    return base.replace(unet=unet, autoencoder=vae, text=text)


@pytest.mark.parametrize("make,family", [(_sd1_variant, "v1-inference"),
                                         (_sd2_linear_variant, "v2-inference-v")])
def test_widths_of_no_shipped_config_round_trip(make, family):
    original = make()
    _check(original, builtin_config(family))


def test_only_shapes_are_read():
    original = _sd2_linear_variant()
    shapes_only = {k: SimpleNamespace(shape=torch.Size(s)) for k, s in _shapes(original).items()}
    inferred, _ = infer_config(shapes_only, builtin_config("v2-inference-v"))
    assert_round_trip(original, inferred, builtin_config("v2-inference-v"))


def test_non_architecture_fields_come_from_base():
    base = builtin_config("v2-inference-v")
    inferred, _ = infer_config(_meta_state_dict(_sd2_linear_variant()), base)
    assert inferred.parameterization == "v"
    assert (inferred.scale_factor, inferred.sampling, inferred.text.layer,
            inferred.text.pad_token_id) == (base.scale_factor, base.sampling, "penultimate", 0)


@pytest.mark.parametrize("wrong", [
    dict(num_res_blocks=1), dict(channel_mult=(1, 4)), dict(attention_resolutions=(1,)),
    dict(use_linear_in_transformer=True), dict(transformer_depth=2), dict(context_dim=64)])
def test_a_wrong_inference_is_caught(wrong):
    original = tiny_config("sd1")
    base = _base_with_heads("v1-inference", original)
    inferred, _ = infer_config(_meta_state_dict(original), base)
    bad = inferred.replace(unet=dataclasses.replace(inferred.unet, **wrong))
    if "context_dim" in wrong:
        bad = bad.replace(text=dataclasses.replace(bad.text, width=64))
    with pytest.raises(AssertionError):
        assert_round_trip(original, bad, base)


def test_a_wrong_head_count_is_caught_by_the_field_comparison():
    # heads leave shapes alone: only the field comparison can see them
    original = tiny_config("sd1")
    base = _base_with_heads("v1-inference", original)
    inferred, _ = infer_config(_meta_state_dict(original), base)
    bad = inferred.replace(unet=dataclasses.replace(inferred.unet, num_heads=4))
    assert _shapes(bad) == _shapes(original)
    with pytest.raises(AssertionError):
        assert_round_trip(original, bad, base)


def test_unet_heads_the_family_rule_cannot_split_are_an_error():
    # the tiny SD2 UNet is 32 channels wide; SD2's rule is 64 channels per head
    with pytest.raises(CheckpointError) as exc:
        infer_config(_meta_state_dict(tiny_config("sd2")), builtin_config("v2-inference"),
                     path="tiny.safetensors")
    msg = str(exc.value)
    assert msg.startswith("tiny.safetensors: ambiguous UNet attention heads")
    assert "num_head_channels = 64" in msg and "attention width 32" in msg
    assert "--config FILE.yaml" in msg and "\n" not in msg


def test_text_heads_the_family_rule_cannot_split_are_an_error():
    # SD1's UNet rule (8 heads) splits 32 and 64 channels, but the text tower is 32 wide
    with pytest.raises(CheckpointError) as exc:
        infer_config(_meta_state_dict(tiny_config("sd1")), builtin_config("v1-inference"))
    msg = str(exc.value)
    assert msg.startswith("state dict: ambiguous text encoder attention heads")
    assert "width 32" in msg and "64" in msg and "--config FILE.yaml" in msg and "\n" not in msg


def test_per_level_transformer_depth_is_refused():
    original = tiny_config("sd1")
    sd = dict(_meta_state_dict(original))
    prefix = "model.diffusion_model.input_blocks.1.1.transformer_blocks."
    sd.update({k.replace(prefix + "0.", prefix + "1."): v for k, v in sd.items()
               if k.startswith(prefix + "0.")})
    with pytest.raises(CheckpointError, match="different depths"):
        infer_config(sd, _base_with_heads("v1-inference", original))


def test_not_a_checkpoint():
    with pytest.raises(CheckpointError, match="no model.diffusion_model"):
        infer_config({"x": torch.empty(1, device="meta")}, builtin_config("v1-inference"))
