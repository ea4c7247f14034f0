"""Prepacked convolution weights (speed option ``cpu_prepack``): made once per model and input shape,
kept across sampling runs, made again when a weight changes, and not made for runs too short to pay
them back."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ldm.speed import SpeedOptions, apply_speed, sampling_scope
from ldm.speed import runner as runner_mod
from ldm.speed.runner import PREPACK_MIN_CALLS, prepack_available
from tests.ldm.test_parity import unet_inputs
from reference.models import random_tiny_model

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not prepack_available(), reason="this CPU/PyTorch has no oneDNN prepacking")]

OPTIONS = SpeedOptions.off().replace(channels_last=True, cpu_prepack=True)


@pytest.fixture()
def setup(monkeypatch):
    model = random_tiny_model("sd1")
    plain = copy.deepcopy(model)
    apply_speed(model, OPTIONS)
    reorders = []
    real = torch._C._nn.mkldnn_reorder_conv2d_weight

    def counting(*args):
        reorders.append(args[-1])
        return real(*args)

    monkeypatch.setattr(runner_mod.torch._C._nn, "mkldnn_reorder_conv2d_weight", counting)
    x, context, _ = unet_inputs(model, 2, 8, 8)
    t = torch.tensor([10, 900])
    return model, plain, reorders, (x, t, context)


def _run(model, inputs, calls):
    with torch.inference_mode(), sampling_scope(model, calls):
        return model.apply_model(*inputs)


def _convs(model):
    return [m for m in model.model.diffusion_model.modules()
            if type(m) is nn.Conv2d and m.kernel_size != (1, 1)]


def test_packs_are_made_once_and_kept_across_runs(setup):
    model, plain, reorders, inputs = setup
    first = _run(model, inputs, PREPACK_MIN_CALLS)
    made = len(reorders)
    assert made == len(_convs(model))  # every 3×3 convolution, once
    second = _run(model, inputs, PREPACK_MIN_CALLS)
    short = _run(model, inputs, 1)  # a short run uses the packs that exist
    assert len(reorders) == made
    assert torch.equal(first, second) and torch.equal(first, short)
    with torch.inference_mode():
        ref = plain.apply_model(*inputs)
    assert torch.allclose(first, ref, rtol=1e-4, atol=1e-4)


def test_a_run_too_short_to_pay_back_makes_no_packs(setup):
    model, _, reorders, inputs = setup
    _run(model, inputs, PREPACK_MIN_CALLS - 1)
    assert reorders == []
    _run(model, inputs, None)  # unknown length: pack
    assert len(reorders) == len(_convs(model))


def test_a_changed_weight_is_packed_again(setup):
    model, plain, reorders, inputs = setup
    _run(model, inputs, PREPACK_MIN_CALLS)
    made = len(reorders)
    conv = _convs(model)[0]
    with torch.no_grad():
        new = torch.randn_like(conv.weight)
        conv.weight.copy_(new)  # in place: same storage, new version
        _convs(plain)[0].weight.copy_(new)
    changed = _run(model, inputs, PREPACK_MIN_CALLS)
    assert len(reorders) == made + 1
    with torch.inference_mode():
        ref = plain.apply_model(*inputs)
    assert torch.allclose(changed, ref, rtol=1e-4, atol=1e-4)
    # replaced storage (a cast, .data =) is noticed too; a short run then falls back to the layer
    conv.weight.data = conv.weight.data.clone(memory_format=torch.channels_last)
    again = _run(model, inputs, 1)
    assert len(reorders) == made + 1 and torch.allclose(again, ref, rtol=1e-4, atol=1e-4)
    model.model.diffusion_model.runner.forget_packs()
    _run(model, inputs, PREPACK_MIN_CALLS)
    assert len(reorders) == 2 * made + 1


def test_a_model_with_packs_can_be_copied(setup):
    model, plain, reorders, inputs = setup
    first = _run(model, inputs, PREPACK_MIN_CALLS)
    twin = copy.deepcopy(model)
    assert len(twin.model.diffusion_model.runner.packs) == 0  # its own, made on its first run
    assert torch.equal(_run(twin, inputs, PREPACK_MIN_CALLS), first)
    assert len(reorders) == 2 * len(_convs(model))
