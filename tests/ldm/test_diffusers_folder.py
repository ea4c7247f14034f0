"""Loading diffusers pipeline folders: parity with the diffusers/transformers models saved into them,
weight round trip, file variants, and errors."""
from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.diffusers_folder import DiffusersFolderError, load_diffusers_folder
from ldm.model import LatentDiffusion
from reference.tokenizer import clip_tokenizer
from ldm.config import parse_config
from tests.ldm.test_diffusers_names import variant_tree
from reference.models import diffusers_unet, diffusers_vae, randomize_, transformers_text_model

VAE_SCALE = 0.13025  # not the config's 0.18215, so reading it is checked


def _reference_text_model(model: LatentDiffusion, state: dict):
    """The text model as a diffusers folder holds it. For SD2 that is a CLIPTextModel one block
    shorter than the OpenCLIP tower (the penultimate block's output is what SD2 uses)."""
    text = model.config.text
    if text.kind == "clip":
        return transformers_text_model(model, state)
    last = f"cond_stage_model.model.transformer.resblocks.{text.layers - 1}."
    trimmed = {k: v for k, v in state.items() if not k.startswith(last)}
    cut = SimpleNamespace(config=replace(model.config, text=replace(text, layers=text.layers - 1)))
    return transformers_text_model(cut, trimmed)


def build_folder(kind: str, folder: Path, seed: int = 0) -> SimpleNamespace:
    """Random weights in our layout → diffusers models (via diffusers' own converters) → a pipeline
    saved with ``save_pretrained``, exactly as diffusers writes it."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    tree = variant_tree(kind)
    ours = randomize_(LatentDiffusion(parse_config(tree, kind)), seed=seed).eval()
    state = ours.state_dict()
    unet, vae = diffusers_unet(tree, state), diffusers_vae(tree, state)
    text = _reference_text_model(ours, state)
    vae.register_to_config(scaling_factor=VAE_SCALE)
    prediction = "v_prediction" if ours.config.parameterization == "v" else "epsilon"
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction)
    pad = "<|endoftext|>" if ours.config.text.kind == "clip" else "!"
    cls = StableDiffusionInpaintPipeline if ours.config.is_inpainting else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(pad), unet=unet,
               scheduler=scheduler, safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return SimpleNamespace(ours=ours, state=state, unet=unet, vae=vae, text=text, folder=folder)


_BUILT: dict[str, SimpleNamespace] = {}


def _built(kind: str, factory) -> SimpleNamespace:
    if kind not in _BUILT:
        _BUILT[kind] = build_folder(kind, factory.mktemp(kind) / "pipe")
    return _BUILT[kind]


@pytest.fixture(params=["sd1", "sd2-v", "sd1-inpaint", "sd1-3level"])
def built(request, tmp_path_factory):
    return _built(request.param, tmp_path_factory)


@pytest.fixture
def sd1_folder(tmp_path_factory):
    return _built("sd1", tmp_path_factory)


def _unet_inputs(model: LatentDiffusion):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)  # divisible by 2**(levels-1) for every variant
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 5, model.config.unet.context_dim, generator=gen)
    concat = torch.randn(2, 5, 8, 8, generator=gen) if model.config.is_inpainting else None
    return x, t, ctx, concat


@torch.no_grad()
def test_outputs_match_diffusers_models(built):
    model = load_diffusers_folder(built.folder)
    x, t, ctx, concat = _unet_inputs(model)
    ours = model.apply_model(x, t, ctx, concat)
    ref_in = x if concat is None else torch.cat([x, concat], dim=1)
    ref = built.unet(ref_in, t, encoder_hidden_states=ctx).sample
    assert (ours - ref).abs().max() <= 1e-4

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    posterior = model.first_stage_model.encode(images)
    ref_dist = built.vae.encode(images).latent_dist
    assert (posterior.mean - ref_dist.mean).abs().max() <= 1e-4
    assert (posterior.logvar - ref_dist.logvar).abs().max() <= 1e-4
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    assert (model.first_stage_model.decode(z) - built.vae.decode(z).sample).abs().max() <= 1e-4

    tokens = model.tokenize(["a red cube on a table", ""])
    emb = model.cond_stage_model(tokens)
    assert (emb - built.text(tokens).last_hidden_state).abs().max() <= 1e-4


def test_config_read_from_folder(built):
    model = load_diffusers_folder(built.folder)
    cfg, orig = model.config, built.ours.config
    assert cfg.parameterization == orig.parameterization
    assert cfg.conditioning_key == orig.conditioning_key and cfg.is_inpainting == orig.is_inpainting
    assert model.scale_factor == pytest.approx(VAE_SCALE)
    assert cfg.unet.attention_resolutions == orig.unet.attention_resolutions
    assert cfg.unet.channel_mult == orig.unet.channel_mult
    # same head layout, however it is expressed (heads vs head width)
    assert [cfg.unet.heads_and_dim(32 * m) for m in cfg.unet.channel_mult] == \
        [orig.unet.heads_and_dim(32 * m) for m in orig.unet.channel_mult]
    assert cfg.text.kind == orig.text.kind and cfg.text.pad_token_id == orig.text.pad_token_id
    assert torch.allclose(model.alphas_cumprod, built.ours.alphas_cumprod)


def test_weights_round_trip(built):
    """Our random weights → diffusers' converter → saved folder → our name table: unchanged."""
    loaded = load_diffusers_folder(built.folder).state_dict()
    orig = built.state
    text = built.ours.config.text
    expected = set(orig) - {"cond_stage_model.model.text_projection",
                            "cond_stage_model.model.logit_scale"}
    if text.kind == "openclip":  # the folder holds one block fewer: SD2 never used the last one
        expected = {k for k in expected
                    if not k.startswith(f"cond_stage_model.model.transformer.resblocks.{text.layers - 1}.")}
        assert loaded["cond_stage_model.model.text_projection"].shape == (text.width, text.projection_dim)
    assert expected <= set(loaded)
    different = [k for k in sorted(expected) if not torch.equal(loaded[k], orig[k])]
    assert not different, different[:5]


def test_no_meta_tensors_and_dtype(sd1_folder):
    model = load_diffusers_folder(sd1_folder.folder, dtype=torch.float16)
    assert all(not t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    ref = sd1_folder.state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].half()
    assert torch.equal(model.state_dict()["model.diffusion_model.input_blocks.1.1.proj_in.weight"], ref)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(path: Path, fn) -> None:
    tensors = load_file(path)
    save_file(fn(tensors), path)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_file_variants(sd1_folder, tmp_path):
    """fp16 variant files, pickled .bin files, and the key spellings of older saved folders."""
    base = load_diffusers_folder(sd1_folder.folder)
    folder = _copy(sd1_folder.folder, tmp_path / "variants")
    # unet: only an fp16 variant
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(unet_file).items()},
              folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    unet_file.unlink()
    # vae: a torch pickle with the deprecated attention names (query/key/value/proj_attn)
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    vae = {}
    for k, v in load_file(vae_file).items():
        for new, old in renames.items():
            k = k.replace(new, old)
        vae[k] = v
    assert any(".query." in k for k in vae)
    torch.save(vae, folder / "vae" / "diffusion_pytorch_model.bin")
    vae_file.unlink()
    # text encoder: keys with the text_model. prefix and a position_ids buffer (older transformers),
    # in two shards listed by an index
    text_file = folder / "text_encoder" / "model.safetensors"
    text = {"text_model." + k: v for k, v in load_file(text_file).items()}
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    shards = {"model-00001-of-00002.safetensors": dict(list(text.items())[:10]),
              "model-00002-of-00002.safetensors": dict(list(text.items())[10:])}
    for name, part in shards.items():
        save_file(part, folder / "text_encoder" / name)
    (folder / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    text_file.unlink()
    loaded = load_diffusers_folder(folder)
    sa, sb = loaded.state_dict(), base.state_dict()
    for key in sa:
        expected = sb[key].half().float() if key.startswith("model.diffusion_model.") else sb[key]
        assert torch.equal(sa[key], expected), key
    assert loaded.unet.time_embed[0].weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# errors: each names the file at fault


def _error(folder: Path, **kwargs) -> str:
    with pytest.raises(DiffusersFolderError) as info:
        load_diffusers_folder(folder, **kwargs)
    return str(info.value)


def test_not_a_folder(tmp_path):
    assert "not a folder" in _error(tmp_path / "nothing")
    (tmp_path / "file.safetensors").write_bytes(b"x")
    assert "not a folder" in _error(tmp_path / "file.safetensors")
    message = _error(tmp_path)
    assert str(tmp_path) in message and "unet, vae, text_encoder" in message


def test_missing_pieces(sd1_folder, tmp_path):
    folder = _copy(sd1_folder.folder, tmp_path / "a")
    shutil.rmtree(folder / "vae")
    assert "no vae subfolder" in _error(folder)

    folder = _copy(sd1_folder.folder, tmp_path / "b")
    (folder / "unet" / "config.json").unlink()
    assert f"{folder / 'unet' / 'config.json'}: missing" in _error(folder)

    folder = _copy(sd1_folder.folder, tmp_path / "c")
    (folder / "text_encoder" / "model.safetensors").unlink()
    message = _error(folder)
    assert str(folder / "text_encoder") in message and "no weights" in message

    folder = _copy(sd1_folder.folder, tmp_path / "d")
    shutil.rmtree(folder / "scheduler")
    assert "epsilon or v" in _error(folder)
    assert load_diffusers_folder(folder, prediction="v").config.parameterization == "v"


def test_key_mismatches(sd1_folder, tmp_path):
    folder = _copy(sd1_folder.folder, tmp_path / "a")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    _rewrite_weights(unet_file, lambda t: {**{k: v for k, v in t.items()
                                              if not k.startswith("conv_in.")},
                                           "extra.weight": torch.zeros(1)})
    message = _error(folder)
    assert str(unet_file) in message
    assert "2 missing keys: conv_in.bias, conv_in.weight" in message
    assert "1 unexpected keys: extra.weight" in message

    folder = _copy(sd1_folder.folder, tmp_path / "b")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    _rewrite_weights(vae_file, lambda t: {**t, "quant_conv.weight": torch.zeros(8, 8, 3, 3)})
    message = _error(folder)
    assert str(vae_file) in message and "quant_conv.weight has shape (8, 8, 3, 3)" in message

    # a config that disagrees with the weights: more res blocks per level than the file has
    folder = _copy(sd1_folder.folder, tmp_path / "c")
    _edit_json(folder / "unet" / "config.json", layers_per_block=3)
    message = _error(folder)
    assert "missing keys: down_blocks.0.attentions.2." in message
    assert "shape mismatches: up_blocks.0.resnets.2.norm1.weight has shape (96,), " \
           "the config gives (128,)" in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_files(sd1_folder, tmp_path):
    folder = _copy(sd1_folder.folder, tmp_path / "a")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    message = _error(folder)
    assert str(unet_file) in message and "safetensors" in message

    folder = _copy(sd1_folder.folder, tmp_path / "b")
    (folder / "vae" / "config.json").write_text("{not json")
    assert f"{folder / 'vae' / 'config.json'}: not readable JSON" in _error(folder)

    # a pickle that needs code to load is refused, never executed
    folder = _copy(sd1_folder.folder, tmp_path / "c")
    (folder / "text_encoder" / "model.safetensors").unlink()
    bin_file = folder / "text_encoder" / "pytorch_model.bin"
    bin_file.write_bytes(pickle.dumps(SimpleNamespace(weights=1)))
    message = _error(folder)
    assert str(bin_file) in message and "plain tensors" in message


@pytest.mark.parametrize("file, changes, expected", [
    ("unet/config.json", {"class_embed_type": "timestep"}, "class_embed_type='timestep' is not supported"),
    ("unet/config.json", {"in_channels": 8}, "in_channels=8 is not supported"),
    ("unet/config.json", {"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}, "do not mirror"),
    ("unet/config.json", {"attention_head_dim": [2, 3]}, "does not divide"),
    ("unet/config.json", {"cross_attention_dim": 64}, "context_dim (64) != text encoder width (32)"),
    ("vae/config.json", {"use_quant_conv": False}, "use_quant_conv=False is not supported"),
    ("text_encoder/config.json", {"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ("scheduler/scheduler_config.json", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "linear"}, "beta_schedule='linear'"),
    ("model_index.json", {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}, "SDXL"),
])
def test_unsupported_configs(sd1_folder, tmp_path, file, changes, expected):
    folder = _copy(sd1_folder.folder, tmp_path / "f")
    _edit_json(folder / file, **changes)
    message = _error(folder)
    assert expected in message
    assert str(folder) in message
