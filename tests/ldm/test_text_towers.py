"""Our torch-only text towers (ldm.modules.clip_text, ldm.modules.openclip_text) against the
implementations they replace: transformers' CLIPTextModel and open_clip's blocks.

Everything is compared with ``torch.equal``, not a tolerance: the same random initialisation from
the same seed (the default-model recipe builds its tower under a seeded generator), the same outputs
in fp32, fp16 and bf16, the same gradients and the same trained weights. The ``*_detects_*`` tests
show that the comparisons can fail.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.modules import clip_text
from ldm.modules.text import EOT, SOT, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, build_text_encoder
from reference.models import OpenCLIPBlocksEmbedder, TransformersCLIPEmbedder, randomize_, \
    reference_text_encoder
from reference.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def text_config(kind: str, **changes):
    return dataclasses.replace(tiny_config(kind).text, **changes)


# SD1 and SD2 tiny towers, a deeper GELU CLIP, and the tower the default-model recipe trains
CONFIGS = {"sd1": text_config("sd1"), "sd2": text_config("sd2"),
           "sd1-gelu-5": text_config("sd1", act="gelu", layers=5, heads=2),
           "sd2-quick-4": text_config("sd2", act="quick_gelu", layers=4),
           # SD's head width (64): attention kernels may pick other code paths than for 8
           "sd1-head64": text_config("sd1", width=256, heads=4, projection_dim=256),
           "sd2-head64": text_config("sd2", width=256, heads=4, projection_dim=256),
           "shapes": text_config("sd1", width=128, layers=3, heads=4, projection_dim=128)}


def token_ids(cfg, lengths=(0, 5, 30, 75), seed: int = 0) -> torch.Tensor:
    """Start token, ``n`` random word ids, end token, then the tower's padding (49407 for SD1,
    0 for SD2); one row per length."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), cfg.max_length), cfg.pad_token_id)
    for row, n in enumerate(lengths):
        ids[row, 0] = SOT
        ids[row, 1: n + 1] = torch.randint(1, 49000, (n,), generator=gen)
        ids[row, n + 1] = EOT
    return ids


def same_state(a: nn.Module, b: nn.Module) -> list[str]:
    """Keys whose tensors differ (or exist on one side only)."""
    sa, sb = a.state_dict(), b.state_dict()
    if list(sa) != list(sb):
        return sorted(set(sa) ^ set(sb)) or ["<key order>"]
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def pair(name: str, seed: int = 0, scale: float = 0.5):
    """(ours, reference) holding one set of random weights of order one, in eval mode."""
    cfg = CONFIGS[name]
    ours = randomize_(build_text_encoder(cfg), seed=seed, scale=scale).eval()
    ref = reference_text_encoder(cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


# ------------------------------------------------------------------------------------ initialisation

@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_init_from_a_seed_equals_the_reference(name, seed):
    """Same seed → same values, and the generator left in the same state (what the recipe builds
    after the tower depends on it)."""
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    ours = build_text_encoder(cfg)
    ours_rng = torch.get_rng_state()
    torch.manual_seed(seed)
    ref = reference_text_encoder(cfg)
    assert torch.equal(ours_rng, torch.get_rng_state())
    assert same_state(ours, ref) == []


def test_init_check_detects_a_missing_draw(monkeypatch):
    """Without transformers' generic first pass (values it draws and then overwrites) every later
    draw shifts, so the weights differ."""
    cfg = CONFIGS["sd1"]
    monkeypatch.setattr(clip_text, "_generic_init", lambda module: None)
    torch.manual_seed(0)
    ours = build_text_encoder(cfg)
    torch.manual_seed(0)
    ref = reference_text_encoder(cfg)
    assert "transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in same_state(ours, ref)


def test_meta_construction_skips_init():
    with torch.device("meta"):
        for cfg in (CONFIGS["sd1"], CONFIGS["sd2"]):
            assert all(p.is_meta for p in build_text_encoder(cfg).parameters())


# ------------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["sd1", "sd2", "sd1-gelu-5", "sd2-quick-4", "sd1-head64", "sd2-head64"])
def test_hidden_states_equal_the_reference(name, dtype):
    ours, ref = pair(name)
    ours, ref = ours.to(dtype), ref.to(dtype)
    ids = token_ids(ours.config)
    usable = ours.config.layers - ours.config.skip_layers()
    with torch.no_grad():
        for clip_skip in range(usable):
            a, b = ours(ids, clip_skip), ref(ids, clip_skip)
            assert a.dtype == dtype and a.shape == (len(ids), 77, ours.config.width)
            assert torch.equal(a, b), (clip_skip, (a.float() - b.float()).abs().max().item())
        # shorter sequences (the recipe cuts its batch after the last end token)
        assert torch.equal(ours(ids[:, :9]), ref(ids[:, :9]))


def test_sd1_equals_transformers_clip_text_model():
    """Directly against CLIPTextModel's outputs: last hidden state, pooler output (the state at the
    first end token: SD1 pads with it too), every hidden state, and each one through the final layer
    norm (CLIP skip)."""
    ours, ref = pair("sd1-gelu-5")
    tower, hf = ours.transformer.text_model, ref.transformer.text_model
    ids = token_ids(ours.config)
    with torch.no_grad():
        expected = hf(input_ids=ids, output_hidden_states=True)
        got = tower(input_ids=ids, output_hidden_states=True)
        assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
        assert torch.equal(got.pooler_output, expected.pooler_output)
        assert len(got.hidden_states) == len(expected.hidden_states) == 6
        assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, expected.hidden_states))
        assert tower(ids).hidden_states is None
        assert torch.equal(tower.encode(ids), expected.last_hidden_state)
        for skip in range(1, len(expected.hidden_states)):
            assert torch.equal(tower.encode(ids, skip),
                               hf.final_layer_norm(expected.hidden_states[-1 - skip]))
    with pytest.raises(ValueError, match="cannot skip"):
        tower.encode(ids, len(expected.hidden_states))


def open_clip_text_transformer(ours: FrozenOpenCLIPEmbedder):
    """open_clip's own TextTransformer (as in ViT-H-14's text config, at our width) holding our
    tower's weights."""
    from open_clip.transformer import QuickGELU, TextTransformer

    cfg = ours.config
    ref = TextTransformer(context_length=cfg.max_length, vocab_size=cfg.vocab_size, width=cfg.width,
                          heads=cfg.heads, layers=cfg.layers, mlp_ratio=cfg.mlp_ratio,
                          output_dim=cfg.projection_dim, output_tokens=True,
                          act_layer=nn.GELU if cfg.act == "gelu" else QuickGELU)
    state = {k: v for k, v in ours.model.state_dict().items() if k != "logit_scale"}
    ref.load_state_dict(state, strict=True)
    return ref.eval()


@pytest.mark.parametrize("name", ["sd2", "sd2-quick-4"])
def test_sd2_equals_open_clip_text_transformer(name):
    """Against open_clip's TextTransformer: its pooled, projected features (encode_text), its final
    token states, and the penultimate block through ln_final (what SD2 conditions on)."""
    ours, _ = pair(name)
    ref = open_clip_text_transformer(ours)
    ids = token_ids(ours.config)  # padded with 0: the end token is each row's largest id
    layers = ours.config.layers
    with torch.no_grad():
        pooled, tokens = ref(ids)
        assert torch.equal(ours.model.encode_text(ids), pooled)
        assert torch.equal(ours.model(ids), tokens)
        for skip in range(1, layers):
            inter = ref.forward_intermediates(ids, indices=[layers - 1 - skip], output_fmt="NLC",
                                              normalize_intermediates=True, intermediates_only=True)
            assert torch.equal(ours.model(ids, skip), inter["text_intermediates"][0])
        assert torch.equal(ours(ids), ours.model(ids, 1))  # SD2: penultimate


def test_padding_rules():
    """SD1 pads with the end token, SD2 with id 0; the pooled state is taken at the first end token."""
    assert CONFIGS["sd1"].pad_token_id == EOT and CONFIGS["sd2"].pad_token_id == 0
    ours, _ = pair("sd1")
    ids = token_ids(ours.config, lengths=(3,))
    tower = ours.transformer.text_model
    with torch.no_grad():
        out = tower(ids)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 4])


def swap_q_k(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, clip_text.CLIPAttention):
                q, k = module.q_proj.weight.clone(), module.k_proj.weight.clone()
                module.q_proj.weight.copy_(k)
                module.k_proj.weight.copy_(q)
            elif isinstance(module, nn.MultiheadAttention):
                w = module.in_proj_weight
                q, k = w[: w.shape[1]].clone(), w[w.shape[1]: 2 * w.shape[1]].clone()
                w[: w.shape[1]].copy_(k)
                w[w.shape[1]: 2 * w.shape[1]].copy_(q)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_comparison_detects_swapped_weights_and_a_dropped_block(name):
    ours, ref = pair(name)
    ids = token_ids(ours.config)
    with torch.no_grad():
        expected = ref(ids)
        swap_q_k(ours)
        assert not torch.equal(ours(ids), expected)
        swap_q_k(ours)
        assert torch.equal(ours(ids), expected)
        blocks = (ours.transformer.text_model.encoder.layers if name == "sd1"
                  else ours.model.transformer.resblocks)
        del blocks[0]
        ours.config = dataclasses.replace(ours.config, layers=ours.config.layers - 1)
        assert not torch.equal(ours(ids), expected)


# ----------------------------------------------------------------------------------------- training

def differing_grads(a: dict, b: dict) -> list[str]:
    return [n for n in a if (a[n] is None) != (b[n] is None)
            or (a[n] is not None and not torch.equal(a[n], b[n]))]


def _step_grads(model: nn.Module, ids: torch.Tensor, autocast: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    weight = torch.randn(ids.shape[0], ids.shape[1], model.config.width,
                         generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids)
    (out.float() * weight).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["sd1", "sd2", "sd1-head64", "sd2-head64"])
def test_gradients_equal_the_reference(name, autocast):
    ours, ref = pair(name)
    ours.train(), ref.train()
    ids = token_ids(ours.config)
    a, b = _step_grads(ours, ids, autocast), _step_grads(ref, ids, autocast)
    assert list(a) == list(b)
    # every weight of the blocks the output depends on gets a gradient (SD2: all but the last block)
    assert sum(g is not None and g.abs().sum() > 0 for g in a.values()) >= len(a) - 14
    assert differing_grads(a, b) == []


def test_shapes_clip_training_steps_equal_the_reference(monkeypatch):
    """The default-model recipe's CLIP (training/default_model/clip.py) built from one seed with our
    tower and with transformers' — equal before, and after three AdamW steps on the contrastive loss."""
    from training.default_model import clip as clip_stage

    cfg = CONFIGS["shapes"]
    captions = ["a red circle", "a blue square", "a red circle", "a small green triangle"]
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(len(captions), 3, 64, 64, generator=gen)
    ids = torch.stack([token_ids(cfg, lengths=(len(c.split()),), seed=i)[0] for i, c in enumerate(captions)])

    def train(embedder):
        monkeypatch.setattr(clip_stage, "FrozenCLIPEmbedder", embedder)
        torch.manual_seed(11)
        model = clip_stage.ShapesCLIP(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        grads = []
        for _ in range(3):
            opt.zero_grad()
            clip_stage.contrastive_loss(model(images, ids), captions).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            opt.step()
        return model, grads

    ours, ours_grads = train(FrozenCLIPEmbedder)
    ref, ref_grads = train(TransformersCLIPEmbedder)
    for g_ours, g_ref in zip(ours_grads, ref_grads):
        assert list(g_ours) == list(g_ref)
        assert [n for n in g_ours if not torch.equal(g_ours[n], g_ref[n])] == []
    assert same_state(ours, ref) == []
    assert not torch.equal(ours.text.state_dict()["transformer.text_model.final_layer_norm.weight"],
                           torch.ones(cfg.width))  # it did train


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_clip_stage_of_the_recipe_writes_the_same_files(monkeypatch, tmp_path, precision):
    """The recipe's clip stage itself (seeded construction, tokenizer, Accelerate, AdamW, saving),
    run for three steps with our tower and with transformers': the same bytes in its outputs."""
    from safetensors.torch import load_file
    from training.default_model import clip as clip_stage
    from training.default_model.common import Settings

    from accelerate.state import AcceleratorState

    def run(embedder, out: Path) -> dict[str, torch.Tensor]:
        # Accelerate keeps process-wide state; each run starts from none, as a fresh process would
        AcceleratorState._reset_state(reset_partial_state=True)
        monkeypatch.setattr(clip_stage, "FrozenCLIPEmbedder", embedder)
        settings = Settings(out=out, steps=3, batch_size=4, warmup=1, save_every=3, quiet=True, cpu=True,
                            mixed_precision=precision)
        clip_stage.run(settings, clip_stage.CLIPOptions(eval_images=4))
        return {**load_file(out / "clip" / "text_encoder.safetensors"),
                **load_file(out / "clip" / "clip-image.safetensors")}

    try:
        ours = run(FrozenCLIPEmbedder, tmp_path / "ours")
        ref = run(TransformersCLIPEmbedder, tmp_path / "ref")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert list(ours) == list(ref)
    assert [k for k in ours if not torch.equal(ours[k], ref[k])] == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["v1-inference", "v2-inference"])
def test_full_size_towers_equal_the_reference(name):
    """CLIP ViT-L/14 and OpenCLIP ViT-H/14 text towers: initialisation from a seed and outputs."""
    from ldm.config import builtin_config

    cfg = builtin_config(name).text
    torch.manual_seed(3)
    ours = build_text_encoder(cfg).eval()
    torch.manual_seed(3)
    ref = reference_text_encoder(cfg).eval()
    assert same_state(ours, ref) == []
    ids = token_ids(cfg, lengths=(4, 40))
    with torch.no_grad():
        for clip_skip in (0, 1):
            assert torch.equal(ours(ids, clip_skip), ref(ids, clip_skip))


# ------------------------------------------------------------------------------------ shipped model

@pytest.fixture(scope="module")
def shipped():
    from ldm.checkpoint import load_model

    model = load_model(ROOT / "weights" / "tiny-shapes.safetensors", ROOT / "configs" / "tiny-shapes.yaml")
    ref = TransformersCLIPEmbedder(model.config.text).eval()
    ref.load_state_dict(model.cond_stage_model.state_dict(), strict=True)
    return model, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shipped_model_text_encoder_equals_the_reference(shipped, dtype):
    model, ref = shipped
    ours = model.cond_stage_model
    assert isinstance(ours, FrozenCLIPEmbedder)
    ids = token_ids(model.config.text, lengths=(3, 6, 2))
    try:
        ours.to(dtype), ref.to(dtype)
        with torch.no_grad():
            for clip_skip in range(model.config.text.layers):
                assert torch.equal(ours(ids, clip_skip), ref(ids, clip_skip))
    finally:
        ours.float(), ref.float()


def test_sd2_reference_uses_open_clip_blocks():
    """The SD2 reference really is open_clip's code (so the comparisons above test something)."""
    from open_clip.transformer import ResidualAttentionBlock

    ref = OpenCLIPBlocksEmbedder(CONFIGS["sd2"])
    assert isinstance(ref.model.transformer.resblocks[0], ResidualAttentionBlock)
    assert not isinstance(build_text_encoder(CONFIGS["sd2"]).model.transformer.resblocks[0],
                          ResidualAttentionBlock)


# ------------------------------------------------------------------------------------------ imports

NO_IMPORT = """
import sys, torch
import ldm.model, ldm.checkpoint, ldm.modules.text
loaded = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'open_clip')]
assert not loaded, f'at import: {loaded[:5]}'
from ldm.checkpoint import load_model
from ldm.config import builtin_config
from ldm.model import LatentDiffusion
m = load_model('weights/tiny-shapes.safetensors', 'configs/tiny-shapes.yaml')
ids = torch.full((2, 77), 49407)
ids[:, 0], ids[:, 1] = 49406, 320
assert m.cond_stage_model(ids).shape == (2, 77, 128)
with torch.device('meta'):
    LatentDiffusion(builtin_config('v2-inference'))
loaded = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'open_clip')]
assert not loaded, f'after loading and encoding: {loaded[:5]}'
# prompts: the tokenizer may still come from transformers, the model code may not
m.get_learned_conditioning(['a red circle'])
loaded = [m for m in sys.modules if m.startswith(('open_clip', 'transformers.modeling_utils',
                                                  'transformers.models.clip.modeling_clip'))]
assert not loaded, f'after a prompt: {loaded[:5]}'
print('ok')
"""


def test_loading_and_encoding_import_neither_transformers_nor_open_clip():
    result = subprocess.run([sys.executable, "-c", NO_IMPORT], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["sd1", "sd2", "sd1-head64", "sd2-head64"])
def test_cuda_outputs_and_gradients_equal_the_reference(name, dtype):
    """On the GPU, where SDPA has flash / memory-efficient kernels that take ``is_causal`` and a mask
    differently: the same outputs and gradients as the reference, in every dtype."""
    ours, ref = pair(name)
    ours, ref = ours.to("cuda", dtype).train(), ref.to("cuda", dtype).train()
    ids = token_ids(ours.config).cuda()
    outs = []
    for model in (ours, ref):
        out = model(ids)
        out.float().square().mean().backward()
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    grads = [{n: p.grad for n, p in m.named_parameters()} for m in (ours, ref)]
    assert differing_grads(*grads) == []
