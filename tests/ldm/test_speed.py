"""Speed and memory switches (ldm.speed) keep parity with the independent implementations.

Each switch alone, and all of them, on the tiny SD1 / SD2-v / SD1-inpainting models: the UNet and
autoencoder must still compute what diffusers computes (CPU fp32, the parity tests' tolerance), the
checkpoint keys must not change, and the switches must step aside where they cannot apply (LoRA
wrappers, replaced weights, gradients). CUDA versions run with ``-m cuda``.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from ldm.modules import attention as attention_mod
from ldm.modules.attention import CrossAttention, attention
from ldm.speed import SpeedOptions, apply_speed, sampling_scope
from ldm.speed.projections import fuse_qkv
from tests.ldm.test_parity import TOL, check_close, unet_inputs
from reference.models import diffusers_unet, diffusers_vae, max_error, random_tiny_model
from reference.tiny import tiny_tree

pytestmark = pytest.mark.usefixtures("single_thread")

OFF = SpeedOptions.off()
SWITCHES = {
    "fused_qkv": OFF.replace(fused_qkv=True),
    "channels_last": OFF.replace(channels_last=True),
    "text_kv_cache": OFF.replace(text_kv_cache=True),
    "cpu_prepack": OFF.replace(channels_last=True, cpu_prepack=True),
    "sdpa_math": OFF.replace(sdpa_kernel="math"),
    "sdpa_flash": OFF.replace(sdpa_kernel="flash"),
    "defaults": SpeedOptions(),
}


@pytest.fixture(scope="module", params=["sd1", "sd2-v", "sd1-inpaint"])
def pair(request):
    kind = request.param
    ours = random_tiny_model(kind)
    sd = ours.state_dict()
    tree = tiny_tree(kind)
    return ours, diffusers_unet(tree, sd), diffusers_vae(tree, sd)


def _reference(unet, x, t, context, concat):
    full_x = x if concat is None else torch.cat([x, concat], dim=1)
    return unet(full_x, t, encoder_hidden_states=context).sample


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_unet_and_vae_match_diffusers_with_each_switch(pair, switch):
    ours, unet, vae = pair
    model = copy.deepcopy(ours)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    apply_speed(model, SWITCHES[switch])
    x, context, concat = unet_inputs(model, 2, 8, 12)
    t = torch.tensor([10, 900])
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(5))
    images = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.inference_mode():
        ref = _reference(unet, x, t, context, concat)
        with sampling_scope(model):  # the caches live for one sampling run: call twice in it
            first = model.apply_model(x, t, context, concat)
            second = model.apply_model(x, t, context, concat)
            runner = model.model.diffusion_model.runner
            packed = [w for w in runner.packs.values() if w] if runner else []
            cached = [m for m in model.modules() if isinstance(m, CrossAttention)
                      and m.projections is not None and m.projections.cache]
        # the switch really took its path
        assert bool(packed) == SWITCHES[switch].cpu_prepack
        assert bool(cached) == SWITCHES[switch].text_kv_cache
        decoded, posterior = model.first_stage_model.decode(z), model.first_stage_model.encode(images)
        ref_decoded, ref_posterior = vae.decode(z).sample, vae.encode(images).latent_dist
    check_close(f"{switch} unet", first, ref)
    check_close(f"{switch} unet, second call", second, ref)
    check_close(f"{switch} vae decode", decoded, ref_decoded)
    check_close(f"{switch} vae mean", posterior.mean, ref_posterior.mean)
    # the checkpoint is unchanged: same keys, same values
    after = model.state_dict()
    assert list(after) == list(keys)
    for k, v in keys.items():
        assert torch.equal(after[k], v), k
    assert first.is_contiguous() and decoded.is_contiguous()


def test_classifier_free_guidance_batches_share_the_prefix(pair):
    """x once with [uncond, cond] context equals diffusers on the repeated batch."""
    ours, unet, _ = pair
    model = copy.deepcopy(ours)
    apply_speed(model, SpeedOptions())
    x, context, concat = unet_inputs(model, 2, 8, 12)
    ctx = torch.cat([context, torch.randn(context.shape, generator=torch.Generator().manual_seed(9))])
    t = torch.tensor([10, 900])
    with torch.inference_mode():
        shared = model.apply_model(x, t, ctx, concat)
        ref = _reference(unet, torch.cat([x, x]), torch.cat([t, t]), ctx,
                         None if concat is None else torch.cat([concat, concat]))
        with pytest.raises(ValueError, match="not a multiple"):
            model.apply_model(x, t, ctx[:3], concat)
    assert shared.shape == ref.shape
    check_close("shared prefix", shared, ref)
    # the two halves really differ (the text reached them), so the check covers both
    assert max_error(shared[:2], shared[2:])[0] > 100 * TOL


# --------------------------------------------------------------------------- extension points
def _slots(model):
    unet = model.model.diffusion_model
    return unet.runner, [m.projections for m in model.modules() if isinstance(m, CrossAttention)]


def test_speed_attaches_through_the_declared_slots_and_comes_off_again():
    from ldm.speed.projections import FastProjections
    from ldm.speed.runner import UNetRunner

    model = random_tiny_model("sd1")
    layers = len(_slots(model)[1])
    assert model.speed is None and _slots(model) == (None, [None] * layers)
    assert apply_speed(model, SpeedOptions()) == model.speed == SpeedOptions()
    runner, projections = _slots(model)
    assert isinstance(runner, UNetRunner) and runner.channels_last and runner.graphs is None
    assert all(isinstance(p, FastProjections) and p.fused is not None for p in projections)
    apply_speed(model, OFF)  # the plain model again: nothing installed, weights in their own storage
    assert model.speed == OFF and _slots(model) == (None, [None] * layers)
    layer = model.model.diffusion_model.middle_block[1].transformer_blocks[0].attn1
    ptrs = {layer.to_q.weight.untyped_storage().data_ptr(), layer.to_k.weight.untyped_storage().data_ptr()}
    assert len(ptrs) == 2
    apply_speed(model, OFF.replace(text_kv_cache=True))  # caches need the slot, not the fusion
    runner, projections = _slots(model)
    assert runner is None and all(p is not None and p.fused is None for p in projections)


def test_the_unet_calls_its_runner_and_a_switchless_runner_is_the_plain_forward():
    from ldm.speed.runner import UNetRunner

    model = random_tiny_model("sd1-inpaint")
    unet = model.model.diffusion_model
    x, context, concat = unet_inputs(model, 2, 8, 12)
    x = torch.cat([x, concat], dim=1)
    t = torch.tensor([10, 900])
    calls = []

    class Recording(UNetRunner):
        def __call__(self, unet, x, timesteps, context):
            calls.append(x.shape)
            return super().__call__(unet, x, timesteps, context)

    with torch.no_grad():
        plain = unet(x, t, context)
        unet.runner = Recording()
        walked = unet(x, t, context)
        # k contexts per sample: the same as the repeated batch, plain or shared
        doubled = torch.cat([context, context.flip(0)])
        shared = unet(x, t, doubled)
        unet.runner = None
        repeated = unet(torch.cat([x, x]), torch.cat([t, t]), doubled)
    assert calls == [x.shape, x.shape]
    assert torch.equal(walked, plain)
    check_close("shared prefix in the runner", shared, repeated)


def test_apply_model_repeats_for_guidance_unless_the_prefix_is_shared():
    model = random_tiny_model("sd1")
    x, context, _ = unet_inputs(model, 2, 8, 8)
    doubled = torch.cat([context, torch.randn(context.shape, generator=torch.Generator().manual_seed(2))])
    t = torch.tensor([10, 900])
    with torch.no_grad():
        plain = model.apply_model(x, t, doubled)  # no speed applied: the plain UNet on 2× the batch
        assert torch.equal(plain, model.model.diffusion_model(torch.cat([x, x]), torch.cat([t, t]), doubled))
        with pytest.raises(ValueError, match="not a multiple"):
            model.apply_model(x, t, doubled[:3])
        apply_speed(model, SpeedOptions())
        check_close("shared prefix", model.apply_model(x, t, doubled), plain)


# ------------------------------------------------------------------------------ fused projections
def test_fused_qkv_shares_storage_and_follows_weight_edits():
    model = random_tiny_model("sd1")
    before = sum(p.numel() for p in model.parameters())
    assert fuse_qkv(model) == len([m for m in model.modules() if isinstance(m, CrossAttention)])
    layer = model.model.diffusion_model.middle_block[1].transformer_blocks[0].attn1
    ptrs = {layer.to_q.weight.data_ptr(), layer.to_k.weight.data_ptr(), layer.to_v.weight.data_ptr()}
    fused_buffer = layer.projections.fused
    assert layer.to_q.weight.untyped_storage().data_ptr() == fused_buffer.untyped_storage().data_ptr()
    assert len(ptrs) == 3 and sum(p.numel() for p in model.parameters()) == before
    x = torch.randn(2, 16, layer.to_q.in_features)
    with torch.no_grad():
        assert layer.projections.fused_weight(layer, True) is not None
        layer.to_k.weight.mul_(2)  # an in-place edit (as a fused LoRA makes) reaches the fused matmul
        fused = layer(x)
        fuse_qkv(model, False)
        assert layer.projections.fused is None
        assert max_error(fused, layer(x))[0] < 1e-6


def test_fused_qkv_steps_aside_for_lora_casts_and_gradients():
    from ldm.lora import add_lora

    model = random_tiny_model("sd1")
    fuse_qkv(model)
    layer = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1
    x = torch.randn(2, 16, layer.to_q.in_features)
    # gradients must reach the separate parameters: the fused path is not taken
    layer.to_q.weight.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.to_q.weight.grad is not None and layer.to_q.weight.grad.abs().sum() > 0
    layer.to_q.weight.requires_grad_(False)
    # a cast replaces the parameter data: the fused buffer no longer backs them, so it is not used
    half = copy.deepcopy(layer).to(torch.float64)
    with torch.no_grad():
        assert half.projections.fused_weight(half, True) is None
        assert max_error(half(x.double()), layer(x))[0] < 1e-5
    # a LoRA wraps to_q/to_k/to_v: the layer runs them (with the LoRA), and re-fusing is refused
    with torch.no_grad():
        before = layer(x)
    add_lora(model, rank=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        assert layer.projections.fused_weight(layer, True) is None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fuse_qkv(model)
        assert any("LoRA" in str(w.message) for w in caught)
        with_lora = layer(x)
        unfused = copy.deepcopy(layer)
        unfused.projections = None
        assert max_error(with_lora, unfused(x))[0] < 1e-6
        assert max_error(with_lora, before)[0] > 1e-3  # the LoRA is applied, not bypassed


def test_text_kv_cache_lives_for_one_run_and_checks_the_context():
    model = random_tiny_model("sd1")
    apply_speed(model, OFF.replace(text_kv_cache=True))
    x, context, _ = unet_inputs(model, 1, 8, 8)
    other = torch.randn(context.shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500])
    layers = [m for m in model.modules() if isinstance(m, CrossAttention)]
    with torch.inference_mode():
        expected = model.apply_model(x, t, other)
        with sampling_scope(model):
            model.apply_model(x, t, context)
            assert any(layer.projections.cache for layer in layers)
            # another context object is not served from the cache
            assert max_error(model.apply_model(x, t, other), expected)[0] < 1e-6
        assert all(layer.projections.cache is None for layer in layers)


# ------------------------------------------------------------------------------------- memory
def test_math_attention_works_in_query_chunks(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=gen) for _ in range(3))
    whole = attention(q, k, v, "math")
    calls = []
    original = attention_mod._math
    monkeypatch.setattr(attention_mod, "_math", lambda *a: calls.append(a[0].shape[-2]) or original(*a))
    monkeypatch.setattr(attention_mod, "MAX_SCORES", 2 * 3 * 50 * 8)  # 8 query rows per block
    chunked = attention(q, k, v, "math")
    assert calls == [8] * 6 + [2]
    assert max_error(chunked, whole)[0] < 1e-6
    # SDPA restricted to its math kernel (which would build all scores) is chunked too
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        assert max_error(attention(q, k, v, "sdpa"), whole)[0] < 1e-5


def test_autoencoder_slices_a_batch_by_its_memory_estimate(monkeypatch):
    model = random_tiny_model("sd1")
    vae = model.first_stage_model
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    original = vae._decode
    monkeypatch.setattr(vae, "_decode", lambda t: calls.append(t.shape[0]) or original(t))
    with torch.no_grad():
        whole = vae.decode(z)
        assert calls == [3]
        vae.slice_bytes = vae.activation_bytes(2, 16, 16, z.dtype)  # two 16² images fit, three not
        sliced = vae.decode(z)
    assert calls == [3, 1, 1, 1]
    assert max_error(sliced, whole)[0] < 1e-5
    # SD's autoencoder decoding four 512² images in fp16: several GiB, so it is sliced by default
    from ldm.config import builtin_config
    from ldm.modules.autoencoder import SLICE_BYTES, AutoencoderKL

    with torch.device("meta"):
        sd = AutoencoderKL(builtin_config("v1-inference").autoencoder)
    assert sd.activation_bytes(4, 512, 512, torch.float16) > SLICE_BYTES
    assert sd.activation_bytes(1, 512, 512, torch.float16) < SLICE_BYTES


# ---------------------------------------------------------------------------------- options
def test_speed_options_are_checked():
    with pytest.raises(ValueError, match="sdpa_kernel"):
        SpeedOptions(sdpa_kernel="fast")
    with pytest.raises(ValueError, match="fused_qkv"):
        SpeedOptions(fused_qkv="yes")
    with pytest.raises(ValueError, match="no option 'turbo'"):
        SpeedOptions().replace(turbo=True)
    model = random_tiny_model("sd1")
    with pytest.raises(ValueError, match="cuda_graphs needs the model on a CUDA device"):
        apply_speed(model, SpeedOptions(cuda_graphs=True))
    with pytest.raises(ValueError, match="CUDA kernel"):
        apply_speed(model, SpeedOptions(sdpa_kernel="efficient"))
    from pipelines.offload import place_model

    with pytest.raises(ValueError, match="offload"):
        place_model(model, torch.device("cpu"), torch.float32, {"offload": True})
    assert apply_speed(model, {"channels_last": False}) == SpeedOptions(channels_last=False)


def test_offload_hooks_chain_text_unet_autoencoder():
    """On the CPU the moves are no-ops, but the chain (who sends whom back) and the results are
    those of the CUDA mode: each stage offloads the one before, the text encoder the autoencoder."""
    from pipelines.offload import disable_model_offload, enable_model_offload, offload_hooks

    model = random_tiny_model("sd1")
    x, context, _ = unet_inputs(model, 1, 8, 8)
    with torch.inference_mode():
        expected = model.apply_model(x, torch.tensor([3]), context)
    text, unet, vae = enable_model_offload(model, "cpu")
    assert offload_hooks(model) == [text, unet, vae]
    assert text.hook.prev_module_hook is vae and unet.hook.prev_module_hook is text
    assert vae.hook.prev_module_hook is unet
    order = []
    for name, hook in (("text", text), ("unet", unet), ("vae", vae)):
        original = hook.hook.pre_forward
        hook.hook.pre_forward = (lambda n, f: lambda *a, **k: (order.append(n), f(*a, **k))[1])(name, original)
    with torch.inference_mode():
        model.get_learned_conditioning(["a cat"])
        out = model.apply_model(x, torch.tensor([3]), context)
        model.first_stage_model.decode(x)  # not forward: the autoencoder runs the hook itself
        model.first_stage_model.encode(torch.zeros(1, 3, 16, 16))
    assert order == ["text", "unet", "vae", "vae"]
    assert max_error(out, expected)[0] == 0
    disable_model_offload(model)
    assert offload_hooks(model) == []


# ------------------------------------------------------------------------------------ compile
def _compiled_pipelines(backend: str):
    from pipelines.pipeline import Pipeline
    from reference.pipelines import random_model

    model = random_model("sd1")
    eager = Pipeline(copy.deepcopy(model), device="cpu")
    compiled = Pipeline(model, device="cpu", speed=SpeedOptions(compile=True, compile_backend=backend))
    return eager, compiled


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_unet_compiles_once_and_matches_eager(backend):
    """Static shapes: a new seed or prompt (same token length) must reuse the compiled graph."""
    import torch._dynamo

    torch._dynamo.reset()
    eager, compiled = _compiled_pipelines(backend)
    kw = dict(height=32, width=32, num_inference_steps=3, scheduler="euler_a", progress=False,
              output_type="latent")
    first = compiled.txt2img("a red circle", seed=1, **kw)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = compiled.txt2img("a blue square on grass", seed=2, negative_prompt="blurry", **kw)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    for result, prompt, seed, neg in ((first, "a red circle", 1, ""),
                                      (second, "a blue square on grass", 2, "blurry")):
        ref = eager.txt2img(prompt, seed=seed, negative_prompt=neg, **kw)
        err, scale = max_error(result.latents, ref.latents)
        assert err <= 1e-4 * scale, f"{err:.3g} (scale {scale:.3g})"  # rounding, amplified by sampling
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("switch", ["fused_qkv", "channels_last", "text_kv_cache", "sdpa_flash",
                                    "sdpa_efficient", "sdpa_math", "cuda_graphs", "defaults"])
def test_fp16_parity_on_cuda_with_each_switch(pair, switch):
    ours, unet, vae = pair
    options = {**SWITCHES, "sdpa_efficient": OFF.replace(sdpa_kernel="efficient"),
               "cuda_graphs": OFF.replace(cuda_graphs=True),
               "defaults": SpeedOptions(cuda_graphs=True)}[switch]
    model = copy.deepcopy(ours).to("cuda", torch.float16)
    apply_speed(model, options)
    x, context, concat = unet_inputs(model, 2, 8, 12)
    t = torch.tensor([10, 900])
    with torch.inference_mode():
        ref = _reference(unet, x, t, context, concat)
        gpu = [None if v is None else v.to("cuda", torch.float16) for v in (x, context, concat)]
        with sampling_scope(model):
            outs = [model.apply_model(gpu[0], t.cuda(), gpu[1], gpu[2]) for _ in range(3)]
    for out in outs:  # a replayed graph gives the same as the first (captured) call
        err, scale = max_error(out, ref)
        assert out.dtype == torch.float16 and err <= 1e-2 * scale, f"{switch}: {err:.3g} vs {scale:.3g}"


@pytest.mark.cuda
@cuda
def test_cuda_graphs_replay_new_inputs_and_recapture_on_structure_change():
    model = random_tiny_model("sd1").to("cuda", torch.float16)
    apply_speed(model, OFF.replace(cuda_graphs=True))
    runner = model.model.diffusion_model.runner.graphs
    x, context, _ = unet_inputs(model, 1, 8, 8)
    x, context = x.to("cuda", torch.float16), context.to("cuda", torch.float16)
    eager = copy.deepcopy(model)
    apply_speed(eager, OFF)
    with torch.inference_mode():
        for seed in range(3):  # different values, same shapes: one graph, replayed
            xs = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x)
            t = torch.tensor([100 + 300 * seed], device="cuda")
            assert max_error(model.apply_model(xs, t, context), eager.apply_model(xs, t, context))[0] < 1e-2
        assert len(runner.graphs) == 1
        model.model.diffusion_model.out[2].weight.data = model.model.diffusion_model.out[2].weight.data * 2
        eager.model.diffusion_model.out[2].weight.data = eager.model.diffusion_model.out[2].weight.data * 2
        assert max_error(model.apply_model(x, t, context), eager.apply_model(x, t, context))[0] < 1e-2


@pytest.mark.cuda
@cuda
def test_offload_keeps_only_the_working_component_on_the_gpu():
    from pipelines.pipeline import Pipeline
    from reference.pipelines import random_model

    model = random_model("sd1")
    whole = Pipeline(copy.deepcopy(model), device="cuda")
    offloaded = Pipeline(model, device="cuda", speed=SpeedOptions(offload=True))
    assert next(offloaded.model.model.parameters()).device.type == "cpu"
    kw = dict(height=32, width=32, num_inference_steps=3, seed=1, progress=False)
    a, b = whole.txt2img("a red circle", **kw), offloaded.txt2img("a red circle", **kw)
    diff = (torch.tensor(list(a.images[0].getdata())) - torch.tensor(list(b.images[0].getdata()))).abs()
    assert diff.float().mean() <= 1.0
    assert next(offloaded.model.model.parameters()).device.type == "cpu"  # the VAE ran last
    assert next(offloaded.model.first_stage_model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("kind", ["sd1", "sd1-inpaint"])
def test_pipeline_gives_the_same_images_with_switches_on_and_off(kind, monkeypatch):
    """Through the whole sampling loop (prefix sharing, caches, prepacking)."""
    from ldm.speed import runner
    from pipelines.pipeline import Pipeline

    monkeypatch.setattr(runner, "PREPACK_MIN_CALLS", 1)  # prepack even these short runs
    from reference.pipelines import box_mask, random_model, sample_image

    model = random_model(kind)
    on = Pipeline(copy.deepcopy(model), device="cpu")
    off = Pipeline(model, device="cpu", speed=SpeedOptions.off())
    assert on.speed == SpeedOptions() and off.speed == OFF
    kw = dict(num_inference_steps=3, seed=4, progress=False, output_type="latent")
    if kind == "sd1":
        a, b = (p.txt2img("a red circle", height=32, width=40, scheduler="dpmpp_2m", **kw) for p in (on, off))
    else:
        image, mask = sample_image(32, 32), box_mask(32, 32)
        a, b = (p.inpaint("a red circle", image, mask, **kw) for p in (on, off))
    err, scale = max_error(a.latents, b.latents)
    # float rounding only: guidance (×7.5) and the solver amplify it to ~4e-5 of the latents' scale
    assert err <= 1e-4 * scale, f"{err:.3g} (scale {scale:.3g})"
