"""Numerical parity with independent implementations, on CPU in fp32.

Our tiny models get random weights; diffusers' single-file converters turn our state dict into
diffusers / transformers models, and both must compute the same function. A wrong key, a wrong
head split or a wrong layer order shows up as a difference far above the tolerance (see
``test_parity_detects_swapped_weights``, which proves that the comparison can fail).
"""
from __future__ import annotations

import pytest
import torch

from reference.models import (diffusers_unet, diffusers_vae, max_error, random_tiny_model,
                             transformers_text_model)
from reference.tiny import tiny_tree

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = ("sd1", "sd2-v", "sd1-inpaint")
TOL = 1e-4  # fp32; relative to the output's scale where that exceeds 1
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "A Painting of a CAT, by Greg Rutkowski; (masterpiece:1.2), café, 東京 — 4k!!",
    " ".join(["a very long prompt that goes past the seventy seven token window"] * 12),
]


def check_close(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> float:
    err, scale = max_error(ours, ref)
    print(f"{name}: max abs error {err:.3g} (reference max |x| {scale:.3g})")
    # random weights must give outputs of order one: a 1e-4 tolerance on outputs of ~1e-6
    # would accept anything
    assert scale > 0.1, f"{name}: reference output too small ({scale:.3g}) for a meaningful check"
    assert err <= tol * max(1.0, scale), f"{name}: max abs error {err:.3g} > {tol:g} (scale {scale:.3g})"
    return err


@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    """(our model, diffusers UNet, diffusers VAE, transformers text model) sharing one weight set."""
    kind = request.param
    ours = random_tiny_model(kind)
    sd = ours.state_dict()
    tree = tiny_tree(kind)
    return (ours, diffusers_unet(tree, sd), diffusers_vae(tree, sd),
            transformers_text_model(ours, sd))


def unet_inputs(model, batch: int, h: int, w: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=gen)
    context = torch.randn(batch, 77, model.config.unet.context_dim, generator=gen)
    concat = None
    if model.config.is_inpainting:  # mask (1 channel) + masked-image latents (4 channels)
        mask = (torch.rand(batch, 1, h, w, generator=gen) > 0.5).float()
        concat = torch.cat([mask, torch.randn(batch, 4, h, w, generator=gen)], dim=1)
    return x, context, concat


@pytest.mark.parametrize("timesteps", [[0], [1], [499], [999], [3, 250, 998], [617.5]],
                         ids=["t0", "t1", "t499", "t999", "mixed", "fractional"])
@pytest.mark.parametrize("size", [(8, 12), (16, 8), (9, 13)], ids=["8x12", "16x8", "9x13"])
def test_unet_matches_diffusers(pair, timesteps, size):
    ours, unet, _, _ = pair
    t = torch.tensor(timesteps, dtype=torch.float32 if timesteps[0] % 1 else torch.long)
    x, context, concat = unet_inputs(ours, len(timesteps), *size)
    with torch.no_grad():
        out = ours.apply_model(x, t, context, concat)
        full_x = x if concat is None else torch.cat([x, concat], dim=1)
        ref = unet(full_x, t, encoder_hidden_states=context).sample
    check_close(f"unet {ours.config.unet.in_channels}ch t={timesteps} {size}", out, ref)


@pytest.mark.parametrize("size", [(64, 48), (40, 56), (38, 54)], ids=["64x48", "40x56", "38x54"])
def test_vae_encoder_moments_match_diffusers(pair, size):
    ours, _, vae, _ = pair
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = ours.first_stage_model.encode(images)
        ref = vae.encode(images).latent_dist
    check_close("vae posterior mean", posterior.mean, ref.mean)
    check_close("vae posterior logvar", posterior.logvar, ref.logvar)
    check_close("vae posterior std", posterior.std, ref.std)


@pytest.mark.parametrize("size", [(8, 12), (16, 8), (7, 11)], ids=["8x12", "16x8", "7x11"])
def test_vae_decoder_matches_diffusers(pair, size):
    ours, _, vae, _ = pair
    z = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ours.first_stage_model.decode(z)
        ref = vae.decode(z).sample
        # SD's latent scaling lives in the model: decode_first_stage(z) = decoder(z / scale_factor)
        scaled = ours.decode_first_stage(z * ours.scale_factor)
    check_close("vae decoder", out, ref)
    check_close("vae decode_first_stage", scaled, ref)


def reference_text(ours, hf, tokens: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """SD1: last hidden state; SD2: penultimate block + final norm; clip_skip goes ``n`` further back
    (the final layer norm applied to an earlier block's output, as diffusers' ``clip_skip`` does)."""
    out = hf(input_ids=tokens, output_hidden_states=True)
    skip = clip_skip + (1 if ours.config.text.layer == "penultimate" else 0)
    if skip == 0:
        return out.last_hidden_state
    return hf.final_layer_norm(out.hidden_states[-1 - skip])


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_text_embeddings_match_transformers(pair, clip_skip):
    ours, _, _, hf = pair
    tokens = ours.tokenize(PROMPTS)
    with torch.no_grad():
        out = ours.get_learned_conditioning(PROMPTS, clip_skip=clip_skip)
        ref = reference_text(ours, hf, tokens, clip_skip)
    assert out.shape == (len(PROMPTS), 77, ours.config.text.width)
    check_close(f"text {ours.config.text.kind} clip_skip={clip_skip}", out, ref)


def test_sd1_text_is_last_hidden_state_and_clip_skip_is_penultimate():
    """Spelled out for SD1 against transformers' own outputs (no shared helper in between)."""
    ours = random_tiny_model("sd1")
    hf = transformers_text_model(ours, ours.state_dict())
    tokens = ours.tokenize(PROMPTS[:2])
    with torch.no_grad():
        out = hf(input_ids=tokens, output_hidden_states=True)
        check_close("sd1 last", ours.get_learned_conditioning(PROMPTS[:2]), out.last_hidden_state)
        penultimate = hf.final_layer_norm(out.hidden_states[-2])
        check_close("sd1 clip_skip=1", ours.get_learned_conditioning(PROMPTS[:2], clip_skip=1),
                    penultimate)
        # the two must differ, or the clip_skip check above proves nothing
        assert (out.last_hidden_state - penultimate).abs().max() > 0.1


def swap(sd: dict, a: str, b: str) -> dict:
    sd = dict(sd)
    sd[a], sd[b] = sd[b], sd[a]
    return sd


TEXT_SWAPS = {  # two same-shape tensors of the first text block, per text tower layout
    "clip": ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
             "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"),
    "openclip": ("cond_stage_model.model.transformer.resblocks.0.ln_1.weight",
                 "cond_stage_model.model.transformer.resblocks.0.ln_2.weight"),
}


@pytest.mark.parametrize("kind", ["sd1", "sd2-v"])
def test_parity_detects_swapped_weights(kind):
    """Exchanging two same-shape tensors in the reference must break every parity check."""
    ours = random_tiny_model(kind)
    sd, tree = ours.state_dict(), tiny_tree(kind)
    attn = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2."
    unet = diffusers_unet(tree, swap(sd, attn + "to_k.weight", attn + "to_v.weight"))
    mid = "first_stage_model.decoder.mid.attn_1."
    vae = diffusers_vae(tree, swap(sd, mid + "q.weight", mid + "k.weight"))
    hf = transformers_text_model(ours, swap(sd, *TEXT_SWAPS[ours.config.text.kind]))
    x, context, _ = unet_inputs(ours, 1, 8, 8)
    t = torch.tensor([500])
    z = torch.randn(1, 4, 8, 8)
    tokens = ours.tokenize(PROMPTS[:1])
    with torch.no_grad():
        errors = {
            "unet": max_error(ours.apply_model(x, t, context), unet(x, t, context).sample)[0],
            "vae": max_error(ours.first_stage_model.decode(z), vae.decode(z).sample)[0],
            "text": max_error(ours.get_learned_conditioning(PROMPTS[:1]),
                              reference_text(ours, hf, tokens, 0))[0],
        }
    print(kind, {k: f"{v:.3g}" for k, v in errors.items()})
    for name, err in errors.items():
        assert err > 100 * TOL, f"{name}: a swapped weight changed the output by only {err:.3g}"
