"""SDXL: configs in the sgm schema, the UNet with label_emb, the two text towers and the vector
conditioning, against diffusers / transformers on the same random weights (converted by diffusers'
single-file code), and full-size parameter counts on the meta device."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ldm.config import ConfigError, builtin_config, config_tree, parse_config
from ldm.model import LatentDiffusion
from reference.models import max_error, randomize_
from reference.sdxl import (diffusers_sdxl_unet, diffusers_time_ids, transformers_bigg,
                            transformers_clip_l)
from reference.tiny import tiny_sdxl_config, tiny_sdxl_tree

TOL = 1e-4
SIZE_KEYS = ["original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"]
REFINER_KEYS = ["original_size_as_tuple", "crop_coords_top_left", "aesthetic_score"]


def _model(kind: str, seed: int = 0) -> LatentDiffusion:
    torch.manual_seed(seed)
    return randomize_(LatentDiffusion(tiny_sdxl_config(kind)), seed=seed, scale=0.5).eval()


def _values(kind: str, batch: int = 2) -> dict[str, torch.Tensor]:
    values = {"original_size_as_tuple": torch.tensor([[1024.0, 768.0], [512.0, 512.0]])[:batch],
              "crop_coords_top_left": torch.tensor([[0.0, 0.0], [16.0, 48.0]])[:batch],
              "target_size_as_tuple": torch.tensor([[1024.0, 1024.0], [768.0, 1344.0]])[:batch]}
    if kind == "sdxl-refiner":
        values["aesthetic_score"] = torch.tensor([[6.0], [2.5]])[:batch]
    return values


def _tokens(model: LatentDiffusion, texts: list[str]) -> list[torch.Tensor]:
    from ldm.modules.tokenizer import tokenize

    return [tokenize(t, texts) for t in model.config.conditioner.texts]


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("name", ["sd_xl_base", "sd_xl_refiner", "sd_xl_inpaint"])
def test_shipped_sgm_configs_parse_and_read_back(name):
    cfg = builtin_config(name)
    assert cfg.is_sdxl and cfg.scale_factor == 0.13025 and cfg.default_image_size == 1024
    assert parse_config(json.loads(json.dumps(config_tree(cfg)))) == cfg
    texts = cfg.conditioner.texts
    if name == "sd_xl_refiner":
        assert (cfg.unet.context_dim, cfg.unet.adm_in_channels, len(texts)) == (1280, 2560, 1)
        assert cfg.unet.model_channels == 384 and cfg.unet.middle_depth == 4
    else:
        assert (cfg.unet.context_dim, cfg.unet.adm_in_channels, len(texts)) == (2048, 2816, 2)
        assert cfg.unet.transformer_depth == (1, 2, 10) and cfg.unet.middle_depth == 10
        assert texts[0].kind == "clip" and texts[0].skip_layers() == 1 and not texts[0].normed
    big = texts[-1]
    assert (big.width, big.layers, big.heads, big.pooled, big.normed) == (1280, 32, 20, True, False)
    assert cfg.is_inpainting == (name == "sd_xl_inpaint")


@pytest.mark.parametrize("edit, fragment", [
    (lambda p: p["network_config"]["params"].update(adm_in_channels=2000),
     "adm_in_channels (2000) != the conditioner's vector width (2816)"),
    (lambda p: p["network_config"]["params"].update(context_dim=[2048, 1024, 2048]),
     "context_dim' must be one width for all levels"),
    (lambda p: p["network_config"]["params"].update(transformer_depth=[1, 2]),
     "transformer_depth' has 2 entries for 3 levels"),
    (lambda p: p["conditioner_config"]["params"]["emb_models"][2].update(input_key="fps"),
     "emb_models[2].input_key' is 'fps'"),
    (lambda p: p["network_config"]["params"].pop("num_classes"),
     "num_classes 'sequential' and adm_in_channels go together"),
])
def test_bad_sgm_configs_name_the_field(edit, fragment):
    import yaml

    from ldm.config import CONFIG_DIR

    tree = yaml.safe_load((CONFIG_DIR / "sd_xl_base.yaml").read_text())
    edit(tree["model"]["params"])
    with pytest.raises(ConfigError) as err:
        parse_config(tree, "x.yaml")
    assert fragment in str(err.value)


# ---------------------------------------------------------------- full size, meta device

def _diffusers_meta_unet(name: str):
    import yaml
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from ldm.config import CONFIG_DIR

    tree = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(tree, {}))


@pytest.mark.parametrize("name, unet_params", [("sd_xl_base", 2_567_463_684),
                                               ("sd_xl_refiner", 2_259_526_660),
                                               ("sd_xl_inpaint", 2_567_478_084)])
def test_full_size_parameter_counts_equal_diffusers(name, unet_params):
    with torch.device("meta"):
        model = LatentDiffusion(builtin_config(name))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.unet) == unet_params == count(_diffusers_meta_unet(name))
    assert count(model.vae) == 83_653_863
    towers = [count(t) for t in model.conditioner.text_embedders]
    # bigG: diffusers' CLIPTextModelWithProjection plus OpenCLIP's logit_scale (one number)
    assert towers == ([694_659_841] if name == "sd_xl_refiner" else [123_060_480, 694_659_841])
    keys = model.state_dict()
    assert len(keys) == (1858 if name == "sd_xl_refiner" else 2514)  # + position_ids in files: 2515
    assert "model.diffusion_model.label_emb.0.2.weight" in keys
    prefix = "conditioner.embedders.0." if name == "sd_xl_refiner" else "conditioner.embedders.1."
    assert prefix + "model.text_projection" in keys


# ---------------------------------------------------------------- parity at reduced width

@pytest.mark.parametrize("kind", ["sdxl", "sdxl-refiner", "sdxl-inpaint"])
def test_unet_equals_diffusers(kind):
    model = _model(kind)
    sd = model.state_dict()
    ref = diffusers_sdxl_unet(tiny_sdxl_tree(kind), model.config, sd)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.unet.in_channels, 16, 16, generator=gen)
    t = torch.tensor([999, 421])
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=gen)
    pooled = torch.randn(2, 32, generator=gen)
    values = _values(kind)
    y = model.conditioner.vector(pooled, values)
    assert y.shape == (2, cfg.unet.adm_in_channels)
    with torch.no_grad():
        ours = model.unet(x, t, context, y=y)
        keys = REFINER_KEYS if kind == "sdxl-refiner" else SIZE_KEYS
        theirs = ref(x, t, encoder_hidden_states=context, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": diffusers_time_ids(values, keys)}).sample
    err, scale = max_error(ours, theirs)
    assert err <= TOL * max(1.0, scale), (err, scale)
    # y matters: another size changes the output
    with torch.no_grad():
        other = model.unet(x, t, context, y=model.conditioner.vector(pooled, _values(kind, 2) | {
            "target_size_as_tuple": torch.tensor([[512.0, 512.0], [512.0, 512.0]])}))
    assert kind == "sdxl-refiner" or (other - ours).abs().max() > 1e-3


def test_unet_without_y_is_refused():
    model = _model("sdxl")
    with pytest.raises(ValueError, match="needs a vector y of shape"):
        model.unet(torch.zeros(1, 4, 8, 8), torch.tensor([1]), torch.zeros(1, 77, 64))


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-refiner"])
def test_text_towers_equal_transformers(kind):
    model = _model(kind, seed=3)
    sd = model.state_dict()
    texts = ["a photo of a cat", "two red squares and a blue circle, long " * 3]
    tokens = _tokens(model, texts)
    cfg = model.config.conditioner
    with torch.no_grad():
        context, pooled = model.conditioner.encode_text(tokens)
        states = []
        if kind == "sdxl":
            clip_l = transformers_clip_l(cfg.texts[0], sd)
            states.append(clip_l(tokens[0], output_hidden_states=True).hidden_states[-2])
        big = transformers_bigg(cfg.texts[-1], sd, index=len(cfg.texts) - 1)
        out = big(tokens[-1], output_hidden_states=True)
        states.append(out.hidden_states[-2])
        reference = torch.cat(states, dim=-1)
    assert context.shape == (2, 77, model.config.unet.context_dim)
    for ours, theirs in ((context, reference), (pooled, out.text_embeds)):
        err, scale = max_error(ours, theirs)
        assert err <= TOL * max(1.0, scale), (err, scale)
    # clip skip: one block earlier in every tower, as diffusers' hidden_states[-(clip_skip + 2)]
    with torch.no_grad():
        skipped, _ = model.conditioner.encode_text(tokens, clip_skip=1)
        ref_skip = [big(tokens[-1], output_hidden_states=True).hidden_states[-3]]
        if kind == "sdxl":
            ref_skip.insert(0, clip_l(tokens[0], output_hidden_states=True).hidden_states[-3])
    err, scale = max_error(skipped, torch.cat(ref_skip, dim=-1))
    assert err <= TOL * max(1.0, scale)


def test_bigg_pooled_equals_open_clip_encode_text():
    """The pooled output is open_clip's ``encode_text``: ln_final of the last state at the end
    token, times text_projection (the same tower's own method, run separately)."""
    model = _model("sdxl", seed=5)
    tokens = _tokens(model, ["a cat", ""])
    tower = model.conditioner.embedders[1].model
    with torch.no_grad():
        _, pooled = model.conditioner.encode_text(tokens)
        err, scale = max_error(pooled, tower.encode_text(tokens[1]))
    assert err <= 1e-6 * max(1.0, scale)


def test_size_embedding_is_sgm_fourier_features():
    from ldm.modules.unet import timestep_embedding

    model = _model("sdxl")
    values = _values("sdxl", 1)
    y = model.conditioner.vector(torch.zeros(1, 32), values)
    numbers = torch.cat([values[k] for k in SIZE_KEYS], dim=1).flatten()
    expected = torch.cat([torch.zeros(1, 32), timestep_embedding(numbers, 8).reshape(1, -1)], dim=1)
    assert torch.equal(y, expected)


def test_model_conditioning_from_prompts():
    model = _model("sdxl")
    with torch.no_grad():
        context, y = model.sdxl_conditioning(["a cat", "a dog"], _values("sdxl"))
    assert context.shape == (2, 77, 64) and y.shape == (2, 80)
    with pytest.raises(ValueError, match="sdxl_conditioning"):
        model.get_learned_conditioning(["a cat"])


# ---------------------------------------------------------------- single files and detection

def _meta_file_state(name: str) -> dict[str, torch.Tensor]:
    """A full-size state dict as a generative-models file holds it (shapes only)."""
    with torch.device("meta"):
        model = LatentDiffusion(builtin_config(name))
    sd = dict(model.state_dict())
    if name != "sd_xl_refiner":  # CLIP-L files keep the position ids
        sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = \
            torch.empty(1, 77, dtype=torch.long, device="meta")
    return sd


@pytest.mark.parametrize("name, family", [("sd_xl_base", "sdxl"), ("sd_xl_refiner", "sdxl-refiner"),
                                          ("sd_xl_inpaint", "sdxl-inpaint")])
def test_full_size_files_are_detected(name, family):
    from ldm.detect import detect

    sd = _meta_file_state(name)
    assert len(sd) == {"sd_xl_base": 2515, "sd_xl_refiner": 1858, "sd_xl_inpaint": 2515}[name]
    found = detect(sd, path="x.safetensors")
    assert (found.family, found.config_name, found.prediction) == (family, name, "eps")
    width = 1280 if family == "sdxl-refiner" else 2048
    assert f"context dim {width} (attn2.to_k in_features) -> {family.replace('-inpaint', '')}" in found.rules
    assert any(r.startswith("label_emb takes") for r in found.rules)
    assert ("input_blocks.0.0.weight has 9 input channels -> inpainting" in found.rules) == \
        (family == "sdxl-inpaint")


def test_inconsistent_sdxl_files_are_refused():
    from ldm.detect import detect
    from ldm.weights_io import CheckpointError

    base = _meta_file_state("sd_xl_base")
    refiner_text = {k.replace("embedders.1.", "embedders.0."): v for k, v in base.items()
                    if k.startswith("conditioner.embedders.1.")}
    mixed = {k: v for k, v in base.items() if not k.startswith("conditioner.")} | refiner_text
    with pytest.raises(CheckpointError, match="inconsistent SDXL layout.*bigG alone"):
        detect(mixed)
    odd = {**base, "model.diffusion_model.input_blocks.0.0.weight":
           torch.empty(320, 8, 3, 3, device="meta")}
    with pytest.raises(CheckpointError, match="takes 8 input channels"):
        detect(odd)


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-refiner"])
def test_single_file_round_trip_loads_strictly(kind, tmp_path):
    from ldm.checkpoint import load_model, save_checkpoint
    from ldm.weights_io import CheckpointError

    model = _model(kind, seed=7)
    path = tmp_path / f"{kind}.safetensors"
    save_checkpoint(model, path)
    loaded = load_model(path)
    assert loaded.config == model.config and loaded.source.detection.family == kind
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    values = _values(kind)
    with torch.no_grad():
        a = model.sdxl_conditioning(["a cat", ""], values)
        b = loaded.sdxl_conditioning(["a cat", ""], values)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # a reduced-width file without its config: the full-size built-in config names the mismatch
    from safetensors.torch import load_file, save_file
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))
    with pytest.raises(CheckpointError, match="shape mismatches.*detected|detection as sdxl"):
        load_model(bare)


def test_ldm_info_names_the_sdxl_rules(tmp_path, capsys):
    from cli.main import main

    from ldm.checkpoint import save_checkpoint

    save_checkpoint(_model("sdxl"), tmp_path / "xl.safetensors")
    assert main(["info", str(tmp_path / "xl.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "family: sdxl" in out
    assert "text encoder keys conditioner.embedders.0.transformer.* -> CLIP-L first, then bigG (base)" in out
    assert "the file's own config" in out


# ---------------------------------------------------------------- full size (-m slow)

def _materialised(build):
    """``build()`` with real, uninitialised parameters and its real buffers (position ids, masks):
    no time spent on an initialisation that randomize_ overwrites."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = build()
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(torch.empty(p.shape), requires_grad=False)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd_xl_base", "sd_xl_refiner"])
def test_full_size_unet_equals_diffusers(name):
    """One 10 GB model in memory at a time: ours runs, is dropped, and diffusers' UNet is built on
    the meta device and given the very same tensors (``assign``) after diffusers' conversion."""
    import yaml
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)

    from ldm.config import CONFIG_DIR
    from ldm.modules.unet import UNetModel

    cfg = builtin_config(name)
    unet = _materialised(lambda: UNetModel(cfg.unet))
    randomize_(unet, seed=11, scale=0.5).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    t = torch.tensor([500])
    context = torch.randn(1, 77, cfg.unet.context_dim, generator=gen)
    pooled = torch.randn(1, 1280, generator=gen)
    keys = REFINER_KEYS if name == "sd_xl_refiner" else SIZE_KEYS
    values = {k: v[:1] for k, v in _values("sdxl-refiner" if name == "sd_xl_refiner" else "sdxl").items()}
    from ldm.modules.conditioner import GeneralConditioner
    with torch.device("meta"):
        cond = GeneralConditioner(cfg.conditioner)
    y = cond.vector(pooled, values)
    with torch.no_grad():
        ours = unet(x, t, context, y=y)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    del unet
    tree = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    with torch.device("meta"):
        ref = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(tree, sd))
    ref.load_state_dict(convert_ldm_unet_checkpoint(sd, dict(ref.config)), strict=True, assign=True)
    del sd
    with torch.no_grad():
        theirs = ref.eval()(x, t, encoder_hidden_states=context, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": diffusers_time_ids(values, keys)}).sample
    err, scale = max_error(ours, theirs)
    assert err <= TOL * max(1.0, scale), (err, scale)


@pytest.mark.slow
def test_full_size_text_towers_equal_transformers():
    model_cfg = builtin_config("sd_xl_base")
    from ldm.modules.conditioner import GeneralConditioner
    cond = _materialised(lambda: GeneralConditioner(model_cfg.conditioner))
    randomize_(cond, seed=13, scale=0.5).eval()
    sd = {f"conditioner.{k}": v for k, v in cond.state_dict().items()}
    from ldm.modules.tokenizer import tokenize
    texts = ["a photograph of an astronaut riding a horse", ""]
    tokens = [tokenize(t, texts) for t in model_cfg.conditioner.texts]
    with torch.no_grad():
        context, pooled = cond.encode_text(tokens)
        clip_l = transformers_clip_l(model_cfg.conditioner.texts[0], sd)
        first = clip_l(tokens[0], output_hidden_states=True).hidden_states[-2]
        del clip_l
        big = transformers_bigg(model_cfg.conditioner.texts[1], sd, index=1)
        out = big(tokens[1], output_hidden_states=True)
    for ours, theirs in ((context, torch.cat([first, out.hidden_states[-2]], -1)),
                         (pooled, out.text_embeds)):
        err, scale = max_error(ours, theirs)
        assert err <= TOL * max(1.0, scale), (err, scale)


# ---------------------------------------------------------------- diffusers folders

@pytest.mark.parametrize("kind", ["sdxl", "sdxl-refiner"])
def test_diffusers_folder_loads_to_the_same_model(kind, tmp_path):
    from ldm.checkpoint import load_model
    from reference.pipelines import reference_scheduler
    from reference.sdxl import sdxl_pipeline

    model = _model(kind, seed=9)
    task = "img2img" if kind == "sdxl-refiner" else "txt2img"
    sdxl_pipeline(model, tiny_sdxl_tree(kind), reference_scheduler("euler"), task).save_pretrained(
        tmp_path / "folder")
    loaded = load_model(tmp_path / "folder")
    assert loaded.config.conditioner == model.config.conditioner
    a, b = loaded.config.unet, model.config.unet
    # one attention width: "4 heads" and "heads of 16" are the same layers
    assert a.heads_and_dim(64) == b.heads_and_dim(64)
    assert dataclasses.replace(a, num_heads=b.num_heads, num_head_channels=b.num_head_channels) == b
    assert loaded.config.scale_factor == model.config.scale_factor
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        if not k.endswith("logit_scale"):  # not in diffusers folders
            assert torch.equal(theirs[k], v), k


def test_diffusers_folder_with_a_wrong_vector_width_is_refused(tmp_path):
    import json

    from ldm.diffusers_folder import DiffusersFolderError
    from ldm.diffusers_sdxl import sdxl_folder_config
    from reference.pipelines import reference_scheduler
    from reference.sdxl import sdxl_pipeline

    model = _model("sdxl")
    sdxl_pipeline(model, tiny_sdxl_tree("sdxl"), reference_scheduler("euler")).save_pretrained(tmp_path)
    path = tmp_path / "unet" / "config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "projection_class_embeddings_input_dim": 81}))
    with pytest.raises(DiffusersFolderError, match="is not the pooled width 32 plus 5 or 6"):
        sdxl_folder_config(tmp_path)


def test_speed_options_give_the_plain_output_with_y():
    """The speed runner takes y (then no CFG prefix is shared: y differs per conditioning)."""
    import copy

    from ldm.speed import SpeedOptions, apply_speed

    plain = _model("sdxl")
    fast = copy.deepcopy(plain)
    apply_speed(fast, SpeedOptions(cpu_prepack=False))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(4, 77, 64, generator=gen)  # [uncond, cond] for the two latents
    y = plain.conditioner.vector(torch.randn(4, 32, generator=gen), {
        k: torch.cat([v, v]) for k, v in _values("sdxl").items()})
    with torch.no_grad():
        a = plain.apply_model(x, torch.tensor([700, 700]), context, y=y)
        b = fast.apply_model(x, torch.tensor([700, 700]), context, y=y)
    err, scale = max_error(b, a)
    assert a.shape == (4, 4, 16, 16) and err <= 1e-4 * max(1.0, scale)


def test_v_pred_marker_makes_an_sdxl_v_model(tmp_path):
    from ldm.detect import detect

    sd = {**_meta_file_state("sd_xl_base"), "v_pred": torch.empty(0, device="meta")}
    found = detect(sd)
    assert (found.family, found.config_name, found.prediction) == ("sdxl-v", "sd_xl_base", "v")
    assert "file has a v_pred key -> v-prediction" in found.rules
    assert detect(sd, prediction="eps").family == "sdxl"
    from safetensors.torch import save_file

    from ldm.checkpoint import resolve_config
    save_file({"x": torch.zeros(1)}, str(tmp_path / "empty.safetensors"))  # a header without a config
    cfg, source, _ = resolve_config(None, tmp_path / "empty.safetensors", sd)
    assert cfg.parameterization == "v" and "detected sdxl-v" in source


def test_sgm_denoiser_buffers_in_a_file_are_dropped(tmp_path):
    from safetensors.torch import load_file, save_file

    from ldm.checkpoint import load_model, save_checkpoint
    from ldm.weights_io import read_safetensors_metadata

    save_checkpoint(_model("sdxl"), tmp_path / "a.safetensors")
    tensors = load_file(str(tmp_path / "a.safetensors"))
    tensors["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=read_safetensors_metadata(tmp_path / "a.safetensors"))
    assert load_model(tmp_path / "b.safetensors").config.is_sdxl


@pytest.mark.parametrize("name", ["sd_xl_base", "sd_xl_refiner"])
def test_full_size_keys_convert_strictly_with_diffusers_single_file_code(name):
    """On the meta device: diffusers' own single-file converters read our full-size state dict and
    fill its SDXL UNet, autoencoder and text towers with no key left over or missing."""
    import yaml
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint,
                                                     create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextModelWithProjection

    from ldm.config import CONFIG_DIR
    from reference.sdxl import _hf_config

    sd = _meta_file_state(name)
    unet = _diffusers_meta_unet(name)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, dict(unet.config)), strict=True, assign=True)
    tree = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(tree, sd))
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, dict(vae.config)), strict=True, assign=True)
    cfg = builtin_config(name)
    index = len(cfg.conditioner.texts) - 1
    with torch.device("meta"):
        big = CLIPTextModelWithProjection(_hf_config(cfg.conditioner.texts[-1]))
    big.load_state_dict(convert_open_clip_checkpoint(big, sd, prefix=f"conditioner.embedders.{index}.model."),
                        strict=True, assign=True)


def test_bigg_embedder_equals_open_clip_text_transformer():
    """Against open_clip's own TextTransformer holding the same weights: the pooled projection is
    its encode_text output, the conditioning its penultimate block without ln_final (sgm's
    non-legacy FrozenOpenCLIPEmbedder2)."""
    from open_clip.transformer import TextTransformer

    model = _model("sdxl", seed=6)
    embedder = model.conditioner.embedders[1]
    cfg = embedder.config
    ref = TextTransformer(context_length=cfg.max_length, vocab_size=cfg.vocab_size, width=cfg.width,
                          heads=cfg.heads, layers=cfg.layers, mlp_ratio=cfg.mlp_ratio,
                          output_dim=cfg.projection_dim, output_tokens=True, act_layer=torch.nn.GELU)
    ref.load_state_dict({k: v for k, v in embedder.model.state_dict().items() if k != "logit_scale"})
    ids = _tokens(model, ["a red circle", "two (blue:1.2) squares"])[1]
    with torch.no_grad():
        hidden, pooled = embedder(ids)
        ref_pooled, _ = ref.eval()(ids)
        inter = ref.forward_intermediates(ids, indices=[cfg.layers - 2], output_fmt="NLC",
                                          normalize_intermediates=False, intermediates_only=True)
    assert torch.equal(pooled, ref_pooled)
    assert torch.equal(hidden, inter["text_intermediates"][0])
