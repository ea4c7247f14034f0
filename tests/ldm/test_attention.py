"""Attention backends: SDPA and the explicit "math" reference agree; xformers falls back to SDPA
where it cannot run; the choice belongs to one model, not to the process."""
from __future__ import annotations

import warnings

import pytest
import torch

from ldm.modules import attention as attention_mod
from ldm.modules.attention import BACKENDS, attention, resolve_backend
from reference.models import max_error, random_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = [m for m in model.modules() if hasattr(m, "attention_backend")]
    assert layers, "no attention layers found"
    return layers


@pytest.mark.parametrize("shape_q, shape_kv", [
    ((2, 8, 64, 40), (2, 8, 64, 40)),      # UNet self-attention, 8 heads of 40
    ((2, 8, 96, 16), (2, 8, 77, 16)),      # cross-attention to 77 text tokens
    ((1, 1, 300, 64), (1, 1, 300, 64)),    # VAE mid-block attention: one head over all pixels
    ((3, 5, 7, 24), (3, 5, 1, 24)),        # a single key
])
def test_sdpa_matches_math(shape_q, shape_kv):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(shape_q, generator=gen) * 2  # logits of std 2: a peaked softmax
    k = torch.randn(shape_kv, generator=gen)
    v = torch.randn(shape_kv, generator=gen)
    ref = attention(q, k, v, "math")
    # an independent formula, so that "math" itself is checked too
    logits = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    direct = torch.softmax(logits, dim=-1) @ v.double()
    assert max_error(ref, direct)[0] <= 1e-5
    assert max_error(attention(q, k, v, "sdpa"), ref)[0] <= 1e-5
    # layouts the layers produce: views transposed from (batch, tokens, heads, dim)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert max_error(attention(qt, kt, vt, "sdpa"), ref)[0] <= 1e-5


@pytest.mark.parametrize("kind", ["sd1", "sd2-v"])
def test_models_agree_across_backends(kind):
    model = random_tiny_model(kind)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=gen)
    context = torch.randn(2, 77, model.config.unet.context_dim, generator=gen)
    t = torch.tensor([10, 900])
    images = torch.rand(1, 3, 32, 24, generator=gen) * 2 - 1
    outputs = {}
    with torch.no_grad():
        for backend in ("math", "sdpa"):
            assert model.set_attention_backend(backend) == backend
            assert {m.attention_backend for m in attention_layers(model)} == {backend}
            posterior = model.first_stage_model.encode(images)
            outputs[backend] = (model.apply_model(x, t, context), posterior.mean, posterior.logvar,
                                model.first_stage_model.decode(x))
    for name, a, b in zip(("unet", "vae mean", "vae logvar", "vae decode"), *outputs.values()):
        err, scale = max_error(a, b)
        assert scale > 0.1 and err <= 1e-5, f"{name}: math vs sdpa differ by {err:.3g}"


def test_xformers_falls_back_to_sdpa_with_a_warning(monkeypatch):
    monkeypatch.setattr(attention_mod, "xformers_available", lambda device, dtype: False)
    model = random_tiny_model("sd1")
    model.set_attention_backend("math")
    with pytest.warns(UserWarning, match="xformers"):
        assert model.set_attention_backend("xformers") == "sdpa"
    assert {m.attention_backend for m in attention_layers(model)} == {"sdpa"}


def test_xformers_is_used_where_it_runs(monkeypatch):
    monkeypatch.setattr(attention_mod, "xformers_available", lambda device, dtype: True)
    model = random_tiny_model("sd1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.set_attention_backend("xformers") == "xformers"
    assert {m.attention_backend for m in attention_layers(model)} == {"xformers"}


def test_xformers_probe_answers_on_this_machine():
    """Without a working xformers kernel the real probe says so instead of raising."""
    available = attention_mod.xformers_available(torch.device("cpu"), torch.float32)
    assert isinstance(available, bool)
    if not available:
        with pytest.warns(UserWarning, match="xformers"):
            assert resolve_backend("xformers", torch.device("cpu"), torch.float32) == "sdpa"


@pytest.mark.parametrize("name", ["flash", "", "SDPA", "xformer"])
def test_unknown_backend_is_rejected(name):
    model = random_tiny_model("sd1")
    with pytest.raises(ValueError) as info:
        model.set_attention_backend(name)
    message = str(info.value)
    assert repr(name) in message and all(b in message for b in BACKENDS)
    with pytest.raises(ValueError, match="sdpa"):
        attention(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), name)


def test_backend_is_chosen_per_model():
    a, b = random_tiny_model("sd1"), random_tiny_model("sd1")
    a.set_attention_backend("math")
    assert {m.attention_backend for m in attention_layers(a)} == {"math"}
    assert {m.attention_backend for m in attention_layers(b)} == {"sdpa"}  # untouched
    b.set_attention_backend("sdpa")
    assert {m.attention_backend for m in attention_layers(a)} == {"math"}
    c = random_tiny_model("sd1")  # a new model starts from the default, not from a's choice
    assert {m.attention_backend for m in attention_layers(c)} == {"sdpa"}
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 77, 32)
    with torch.no_grad():  # both run side by side and agree
        assert max_error(a.apply_model(x, t, context), b.apply_model(x, t, context))[0] <= 1e-5
