"""Parity on a CUDA GPU in fp16, per attention backend (run with ``-m cuda``).

Our model runs on the GPU in half precision; the reference is diffusers / transformers in fp32 on
the CPU (no TF32 convolutions), so the printed error is what fp16 inference costs. fp16 keeps
about three significant digits and the errors add up over the layers: 1e-2 of the output's scale.
"""
from __future__ import annotations

import pytest
import torch

from ldm.modules.attention import attention, xformers_available
from tests.ldm.test_parity import PROMPTS, reference_text, unet_inputs
from reference.models import (diffusers_unet, diffusers_vae, max_error, random_tiny_model,
                             transformers_text_model)
from reference.tiny import tiny_tree

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REL_TOL = 1e-2
CUDA = torch.device("cuda")


def check_fp16(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float16 and ours.device.type == "cuda"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values in fp16"
    err, scale = max_error(ours, ref)
    print(f"{name}: fp16 max abs error {err:.3g}, relative {err / scale:.3g} (scale {scale:.3g})")
    assert err <= REL_TOL * scale, f"{name}: relative error {err / scale:.3g} > {REL_TOL}"


@pytest.fixture(scope="module", params=["sd1", "sd2-v", "sd1-inpaint"])
def models(request):
    """(our fp16 CUDA model, fp32 CPU references) sharing one weight set."""
    kind = request.param
    ours = random_tiny_model(kind)
    sd = ours.state_dict()
    tree = tiny_tree(kind)
    refs = diffusers_unet(tree, sd), diffusers_vae(tree, sd), transformers_text_model(ours, sd)
    return ours.to(CUDA, torch.float16), refs


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_fp16_parity_on_cuda(models, backend):
    ours, (unet, vae, text) = models
    if backend == "xformers" and not xformers_available(CUDA, torch.float16):
        pytest.skip("xformers is not installed or has no CUDA fp16 kernel here")
    assert ours.set_attention_backend(backend) == backend  # no silent fallback
    kind = f"{ours.config.unet.in_channels}ch/{ours.config.text.kind}/{backend}"

    x, context, concat = unet_inputs(ours, 2, 8, 12)
    t = torch.tensor([20, 980])
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 12, generator=gen)
    images = torch.rand(2, 3, 32, 40, generator=gen) * 2 - 1
    tokens = ours.tokenize(PROMPTS)
    with torch.no_grad():
        full_x = x if concat is None else torch.cat([x, concat], dim=1)
        ref_unet = unet(full_x, t, encoder_hidden_states=context).sample
        ref_decode = vae.decode(z).sample
        ref_posterior = vae.encode(images).latent_dist
        ref_text = reference_text(ours, text, tokens, 0)

        def gpu(tensor):
            return None if tensor is None else tensor.to(CUDA, torch.float16)

        out_unet = ours.apply_model(gpu(x), t.to(CUDA), gpu(context), gpu(concat))
        out_decode = ours.first_stage_model.decode(gpu(z))
        posterior = ours.first_stage_model.encode(gpu(images))
        out_text = ours.get_learned_conditioning(PROMPTS)

    check_fp16(f"{kind} unet", out_unet, ref_unet)
    check_fp16(f"{kind} vae decode", out_decode, ref_decode)
    check_fp16(f"{kind} vae posterior mean", posterior.mean, ref_posterior.mean)
    check_fp16(f"{kind} text", out_text, ref_text)


def test_backends_agree_on_cuda():
    """SDPA's fused kernels against the explicit math path, both in fp16 on the GPU."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, n, 64, generator=gen).to(CUDA, torch.float16) for n in (4096, 77, 77))
    ref = attention(q.float(), k.float(), v.float(), "math")
    backends = ["sdpa", "math"] + (["xformers"] if xformers_available(CUDA, torch.float16) else [])
    for backend in backends:
        err, scale = max_error(attention(q, k, v, backend), ref)
        print(f"attention {backend} fp16: max abs error {err:.3g} (scale {scale:.3g})")
        assert err <= REL_TOL * scale
