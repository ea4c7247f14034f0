"""Single-file checkpoints: weights-only pickles, strict key checks, EMA, config resolution, save
round trips converted by diffusers' own converters, and every error path of loading. (The file
reader and writer themselves: test_weights_io.)"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm import checkpoint as ckpt_mod
from ldm import weights_io
from ldm.checkpoint import load_model, save_checkpoint
from ldm.model import LatentDiffusion, LoadInfo
from ldm.weights_io import read_state_dict
from tests.ldm.test_weights_io import error_line
from reference.models import diffusers_unet, diffusers_vae, randomize_
from reference.tiny import tiny_config, tiny_tree

ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=None)
def _model(kind: str = "sd1", seed: int = 0) -> LatentDiffusion:
    return randomize_(LatentDiffusion(tiny_config(kind)), seed=seed).eval()


def _state(kind: str = "sd1") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _model(kind).state_dict().items()}


def _write(tmp_path: Path, sd: dict, name: str = "model.safetensors", kind: str | None = None) -> Path:
    """Save a state dict with the safetensors library; ``kind`` adds a sidecar YAML."""
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    if kind:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_tree(kind)))
    return path


def _ddpm_alphas_cumprod() -> torch.Tensor:
    """SD's schedule from an independent implementation (diffusers' scaled_linear)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


# --------------------------------------------------------------------------------- bad input

def _corrupt_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = _write(tmp_path, {"a": torch.ones(1000), "b": torch.ones(10)}, "good.safetensors")
    raw = good.read_bytes()
    gen = torch.Generator().manual_seed(3)
    noise = bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist())
    files = {
        "missing": ("nothing.safetensors", None, "no such file"),
        "empty": ("empty.safetensors", b"", "empty file"),
        "truncated data": ("cut.safetensors", raw[: len(raw) - 100], "truncated"),
        "truncated header": ("cuthead.safetensors", raw[:20], "truncated"),
        "tiny": ("short.safetensors", raw[:5], "truncated"),
        "random .safetensors": ("noise.safetensors", noise, "not a safetensors file"),
        "random .ckpt": ("noise.ckpt", b"\x13" + noise, "unrecognised bytes"),
        "json": ("model.json", json.dumps({"weights": [1, 2, 3]}).encode(), "a text file"),
        "json as .safetensors": ("text.safetensors", b'{"weights": [1, 2, 3], "more": "x"}',
                                 "not a safetensors file"),
        "text": ("notes.txt", b"just some notes\n", "a text file"),
        "torn zip": ("torn.ckpt", b"PK\x03\x04" + noise[:300], "corrupt or truncated PyTorch"),
        "bad header json": ("badjson.safetensors", (6).to_bytes(8, "little") + b"{nope}", "not valid JSON"),
    }
    out = {}
    for label, (name, content, expected) in files.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        out[label] = (path, expected)
    return out


def test_unreadable_files_give_one_line_naming_the_file(tmp_path):
    for label, (path, expected) in _corrupt_files(tmp_path).items():
        text = error_line(read_state_dict, path)
        assert text.startswith(f"{path}: ") and expected in text, (label, text)
        assert error_line(load_model, path).startswith(f"{path}: "), label


def test_unrelated_tensors_are_not_a_checkpoint(tmp_path):
    path = _write(tmp_path, {"encoder.layer.0.weight": torch.ones(2, 2)})
    assert error_line(load_model, path) == \
        f"{path}: not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)"


def test_folder_and_bad_arguments(tmp_path):
    assert "is a folder" in error_line(read_state_dict, tmp_path)
    path = _write(tmp_path, _state(), kind="sd1")
    with pytest.raises(ValueError, match="prediction"):
        load_model(path, prediction="x0")
    with pytest.raises(ValueError, match="dtype"):
        load_model(path, dtype="int8")


# ------------------------------------------------------------------------------------- pickles

_EXECUTED: list[str] = []


def _record_execution(note: str) -> str:
    _EXECUTED.append(note)
    return note


class _Payload:
    """An arbitrary user class: unpickling it means importing and running project code."""

    def __init__(self):
        self.value = 1


class _Reducer:
    def __reduce__(self):
        return (_record_execution, ("code ran",))


@pytest.mark.parametrize("payload", [_Payload, _Reducer])
def test_pickle_with_code_is_refused(tmp_path, payload):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": _state(), "extra": payload()}, path)
    _EXECUTED.clear()
    text = error_line(load_model, path, tiny_config("sd1"))
    assert "not plain tensors" in text and "refused for safety" in text
    assert _EXECUTED == []  # nothing in the file was run


@pytest.mark.parametrize("name,legacy,wrapped", [("m.ckpt", False, True), ("m.pt", False, False),
                                                 ("m.pth", True, True), ("m.bin", False, True)])
def test_plain_pickles_load(tmp_path, name, legacy, wrapped):
    sd = _state()
    obj = {"state_dict": sd, "epoch": 3, "global_step": 100} if wrapped else sd
    path = tmp_path / name
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    model = load_model(path, tiny_config("sd1"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


# ---------------------------------------------------------------------------------- key checks

def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = _state()
    dropped = "first_stage_model.decoder.conv_out.bias"
    del sd[dropped]
    sd["model.diffusion_model.extra_block.weight"] = torch.ones(1)
    text = error_line(load_model, _write(tmp_path, sd), tiny_config("sd1"))
    assert f"1 missing keys ({dropped})" in text
    assert "1 unexpected keys (model.diffusion_model.extra_block.weight)" in text

    many = {k: v for k, v in _state().items() if not k.startswith("first_stage_model.")}
    text = error_line(load_model, _write(tmp_path, many, "many.safetensors"), tiny_config("sd1"))
    n = sum(k.startswith("first_stage_model.") for k in _state())
    assert f"{n} missing keys (first_stage_model." in text and f"... {n - 5} more" in text


def test_wrong_config_reports_shapes_and_the_detected_family(tmp_path):
    path = _write(tmp_path, _state("sd1"))
    text = error_line(load_model, path, tiny_config("sd1-inpaint"))
    assert ("model.diffusion_model.input_blocks.0.0.weight: file [32, 4, 3, 3] vs model [32, 9, 3, 3]"
            in text)
    assert "looks like sd1: config v1-inference" in text
    # no config at all: the shapes give the architecture, but not this tiny file's heads
    text = error_line(load_model, path)
    assert "heads cannot be read from shapes" in text and "--config" in text
    text = error_line(load_model, path, "v1-inference")
    assert "shape mismatches" in text


def test_harmless_extras_are_dropped_and_the_schedule_is_checked(tmp_path):
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    extras = {"betas": ddpm.betas, "alphas_cumprod": ddpm.alphas_cumprod.half(),
              "alphas_cumprod_prev": torch.ones(1000), "posterior_variance": torch.ones(1000),
              "logvar": torch.zeros(1000), "model_ema.decay": torch.tensor(0.9999),
              "model_ema.num_updates": torch.tensor(7, dtype=torch.int32),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    model = load_model(_write(tmp_path, {**_state(), **extras}), tiny_config("sd1"))
    assert model.state_dict().keys() == _model().state_dict().keys()

    linear = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    bad = _write(tmp_path, {**_state(), "betas": linear.betas}, "bad.safetensors")
    assert "betas does not match the config's noise schedule" in error_line(load_model, bad, tiny_config("sd1"))
    short = _write(tmp_path, {**_state(), "alphas_cumprod": torch.ones(10)}, "short.safetensors")
    assert "1000 steps" in error_line(load_model, short, tiny_config("sd1"))


def _with_ema(sd: dict, seed: int = 5) -> dict:
    """Add CompVis LitEma copies of the UNet weights (dots dropped from the names)."""
    gen = torch.Generator().manual_seed(seed)
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): torch.randn(v.shape, generator=gen)
           for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    return {**sd, **ema, "model_ema.decay": torch.tensor(0.9999),
            "model_ema.num_updates": torch.tensor(10, dtype=torch.int32)}


def test_ema_weights(tmp_path):
    sd = _with_ema(_state())
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd
    path = _write(tmp_path, sd, kind="sd1")
    plain = load_model(path)
    ema = load_model(path, use_ema=True)
    assert ema.source.use_ema and not plain.source.use_ema
    for k, v in ema.state_dict().items():
        expected = sd["model_ema." + k.removeprefix("model.").replace(".", "")] \
            if k.startswith("model.diffusion_model.") else sd[k]
        assert torch.equal(v, expected), k
        assert torch.equal(plain.state_dict()[k], sd[k]), k

    no_ema = _write(tmp_path, _state(), "plain.safetensors", kind="sd1")
    assert "no EMA weights" in error_line(load_model, no_ema, use_ema=True)
    partial = {k: v for k, v in sd.items() if k != "model_ema.diffusion_modelout2bias"}
    partial_path = _write(tmp_path, partial, "partial.safetensors", kind="sd1")
    text = error_line(load_model, partial_path, use_ema=True)
    assert "EMA weights incomplete" in text and "model.diffusion_model.out.2.bias" in text


# ------------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd2-inpaint"])
def test_loaded_model_is_fully_materialised(tmp_path, kind):
    model = load_model(_write(tmp_path, _state(kind), kind=kind))
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert on_meta == []
    assert not model.training
    buffers = dict(model.named_buffers())
    torch.testing.assert_close(model.alphas_cumprod, _ddpm_alphas_cumprod())
    if kind == "sd1":
        ids = buffers["cond_stage_model.transformer.text_model.embeddings.position_ids"]
        assert torch.equal(ids, torch.arange(77)[None])
    else:
        expected = torch.nn.Transformer.generate_square_subsequent_mask(77)
        assert torch.equal(buffers["cond_stage_model.model.attn_mask"], expected)
    # the loaded text tower computes what the original does (its buffers and weights are in place)
    tokens = _model(kind).tokenize(["a red circle"])
    with torch.no_grad():
        torch.testing.assert_close(model.cond_stage_model(tokens), _model(kind).cond_stage_model(tokens))


def test_same_dtype_load_keeps_the_memory_map(tmp_path):
    half = {k: v.half() for k, v in _state().items()}
    path = _write(tmp_path, half, kind="sd1")
    size = path.stat().st_size
    model = load_model(path, dtype=torch.float16)
    params = list(model.parameters())
    assert all(p.dtype == torch.float16 for p in params)
    assert {p.untyped_storage().data_ptr() for p in params} == {params[0].untyped_storage().data_ptr()}
    assert params[0].untyped_storage().nbytes() == size  # views of the mapped file
    # a different dtype converts (copies) tensor by tensor
    model = load_model(path, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 and p.untyped_storage().nbytes() < size
               for p in model.parameters())
    assert model.alphas_cumprod.dtype == torch.float32  # the schedule keeps full precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channels_last_layout_is_made_in_the_cast(tmp_path, dtype):
    """One copy per tensor: cast and NHWC layout together, which the pipeline's speed option then
    finds done (no second copy of the UNet)."""
    from pipelines.pipeline import Pipeline

    half = {k: v.half() for k, v in _state().items()}
    path = _write(tmp_path, half, kind="sd1")
    plain = load_model(path, dtype=dtype)
    nhwc = load_model(path, dtype=dtype, channels_last=True)
    convs = {k for k, v in nhwc.state_dict().items() if v.dim() == 4 and v.shape[-1] > 1}
    assert convs and all(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in convs)
    for k, v in nhwc.state_dict().items():
        assert v.dtype == (dtype if v.is_floating_point() else v.dtype) and torch.equal(v, plain.state_dict()[k]), k
        if k in convs:
            assert v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous(), k
    before = {k: nhwc.state_dict()[k].data_ptr() for k in convs}
    pipe = Pipeline(nhwc, device="cpu", dtype=dtype)  # channels_last is on by default
    assert {k: pipe.model.state_dict()[k].data_ptr() for k in convs} == before  # not copied again
    pipe = Pipeline.from_checkpoint(path, device="cpu", dtype=dtype)
    assert all(pipe.model.state_dict()[k].is_contiguous(memory_format=torch.channels_last) for k in convs)


def _mapped_rss_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc smaps")
def test_cast_gives_back_the_mapped_pages(tmp_path):
    from accelerate import init_empty_weights

    path = _write(tmp_path, {k: v.half() for k, v in _state().items()})
    with init_empty_weights():
        model = LatentDiffusion(tiny_config("sd1"))
    size_kb = path.stat().st_size // 1024
    results = {}
    for release in (False, True):
        sd, mapped = weights_io.read_weights(path)
        weights = ckpt_mod.prepare_state_dict(sd, model, model.config, path=path, dtype=torch.float32,
                                              release=mapped.release if release else None)
        results[release] = _mapped_rss_kb(path)
        for k, v in weights.items():  # the casts are right either way
            assert v.dtype == torch.float32 and torch.equal(v, sd[k].float()), k
        del sd, mapped, weights
    assert results[False] > 0.9 * size_kb  # every page was read for the cast, and stays resident
    assert results[True] < 0.1 * size_kb  # ... unless it is given back after the cast

    # while casting: the resident part of the mapping stays near one tensor, not the whole file
    big = _write(tmp_path, {f"t{i}": torch.full((1 << 20,), float(i)).half() for i in range(8)},
                 "big.safetensors")
    sd, mapped = weights_io.read_weights(big)
    peaks = []
    for v in sd.values():
        v.float()
        mapped.release(v)
        peaks.append(_mapped_rss_kb(big))
    assert max(peaks) < 2 * 2048  # kB: under two 2 MB tensors at any time


def test_config_sources(tmp_path):
    sd = _state("sd2-v")
    path = _write(tmp_path, sd, kind="sd2-v")
    model = load_model(path)
    assert isinstance(model.source, LoadInfo)
    assert model.source.config_source == f"sidecar config {path.with_suffix('.yaml')}"
    assert model.source.name == "model" and model.source.path == str(path)
    assert model.config.parameterization == "v" and model.prediction.kind == "v"
    assert model.source.detection.family == "sd2-v"

    other = _write(tmp_path, sd, "other.safetensors")
    yaml_path = tmp_path / "config.yaml"
    yaml_path.write_text(yaml.safe_dump(tiny_tree("sd2-v")))
    assert load_model(other, yaml_path).source.config_source == f"config file {yaml_path}"
    given = load_model(other, tiny_config("sd2"))
    assert given.source.config_source == "ModelConfig given by the caller"
    assert given.config.parameterization == "eps"
    forced = load_model(other, tiny_config("sd2"), prediction="v")
    assert forced.config.parameterization == "v" and forced.prediction.kind == "v"


def test_diffusers_folder_dispatch(tmp_path, monkeypatch):
    calls = []
    made = _model("sd1")

    def fake_loader(path, *, dtype=torch.float32, device="cpu"):
        calls.append((Path(path), dtype, device))
        made.source = None
        return made

    monkeypatch.setattr(ckpt_mod, "load_diffusers_folder", fake_loader)
    model = load_model(tmp_path, dtype=torch.float16)
    assert calls == [(tmp_path, torch.float16, "cpu")]
    assert model.source.config_source == "diffusers folder" and model.source.name == tmp_path.name
    assert "diffusers folder" in error_line(load_model, tmp_path, "v1-inference")
    made.source = None


# ---------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("half", [False, True])
def test_save_round_trip(tmp_path, half):
    model = _model("sd2")
    path = tmp_path / "saved.safetensors"
    save_checkpoint(model, path, half=half, metadata={"title": "tiny", "author": "tests"})
    with safe_open(str(path), "pt") as f:  # an independent reader
        assert set(f.keys()) == set(model.state_dict())
        assert f.metadata()["title"] == "tiny" and f.metadata()["author"] == "tests"
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == ({"F16"} if half else {"F32"})
    path.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_tree("sd2")))
    loaded = load_model(path)
    for k, v in model.state_dict().items():
        expected = v.half().float() if half else v
        assert torch.equal(loaded.state_dict()[k], expected), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.safetensors", "saved.yaml"]
    with pytest.raises(TypeError, match="metadata"):
        save_checkpoint(model, path, metadata={"steps": 5})


@pytest.mark.parametrize("kind", ["sd1", "sd2-v", "sd1-inpaint"])
def test_saved_files_carry_their_config(tmp_path, kind):
    """A file written by save_checkpoint loads anywhere without a config, and equals the same
    weights loaded with their YAML; a sidecar YAML or an explicit config still wins."""
    from ldm.checkpoint import embedded_config
    from ldm.config import parse_config

    model = _model(kind)
    path = tmp_path / "a" / "model.safetensors"
    path.parent.mkdir()
    save_checkpoint(model, path)
    assert embedded_config(path) == model.config == parse_config(tiny_tree(kind))
    copy = tmp_path / "b" / "renamed.safetensors"  # a copy elsewhere, no YAML beside it
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    loaded = load_model(copy)
    assert loaded.config == model.config and "ldm_config" in loaded.source.config_source
    yaml_path = tmp_path / "config.yaml"
    yaml_path.write_text(yaml.safe_dump(tiny_tree(kind)))
    with_yaml = load_model(path, yaml_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v) and torch.equal(with_yaml.state_dict()[k], v), k
    # precedence: explicit config, then the sidecar YAML, then the file's own
    other = tiny_tree(kind)
    other["sampling"] = {"guidance_scale": 1.5, "num_inference_steps": 3, "scheduler": "euler"}
    copy.with_suffix(".yaml").write_text(yaml.safe_dump(other))
    assert load_model(copy).config.sampling.guidance_scale == 1.5
    assert "sidecar" in load_model(copy).source.config_source
    assert load_model(copy, model.config).config.sampling == model.config.sampling


def test_a_broken_embedded_config_is_one_line(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in _state().items()}, str(path), metadata={"ldm_config": "{nope"})
    assert "ldm_config metadata is not valid JSON" in error_line(load_model, path)
    tree = tiny_tree("sd1")
    tree["model"]["params"]["unet_config"]["params"]["context_dim"] = 7
    save_file({k: v.contiguous() for k, v in _state().items()}, str(path),
              metadata={"ldm_config": json.dumps(tree)})
    text = error_line(load_model, path)
    assert "ldm_config metadata" in text and "context_dim" in text and "\n" not in text


def test_shipped_model_carries_its_config():
    from ldm.checkpoint import embedded_config
    from ldm.config import load_config
    from pipelines.pipeline import DEFAULT_CHECKPOINT, DEFAULT_CONFIG

    assert embedded_config(DEFAULT_CHECKPOINT) == load_config(DEFAULT_CONFIG)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"previous contents")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(weights_io.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_model("sd1"), path)
    assert path.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_saved_file_converts_with_diffusers(tmp_path, kind):
    """The file we write is read by the safetensors library and converted by diffusers' own
    single-file converters into models whose outputs equal ours."""
    model = _model(kind)
    path = tmp_path / "parity.safetensors"
    save_checkpoint(model, path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_tree(kind)))
    ours = load_model(path)
    state = load_file(str(path))
    unet, vae = diffusers_unet(tiny_tree(kind), state), diffusers_vae(tiny_tree(kind), state)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ours.apply_model(x, t, context),
                                   unet(x, t, encoder_hidden_states=context).sample, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.first_stage_model.decode(x), vae.decode(x).sample,
                                   atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ GPU and benchmark

@pytest.mark.cuda
def test_load_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = load_model(_write(tmp_path, _state("sd2"), kind="sd2"), dtype=torch.float16, device="cuda")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    assert next(model.parameters()).dtype == torch.float16


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("load_checkpoint_bench",
                                                  ROOT / "benchmarks" / "load_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_functions_on_a_tiny_model(tmp_path):
    bench = _benchmark_module()
    path = tmp_path / "tiny.safetensors"
    bench.write_random_checkpoint(path, tiny_config("sd1"), dtype=torch.float16)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_tree("sd1")))
    result = bench.measure_ours(path, config=None, dtype=torch.float16)
    assert result["load_s"] > 0 and result["peak_rss_bytes"] > 0
    folder = bench.write_diffusers_config_folder(tmp_path / "cfg", tiny_tree("sd1"))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    result = bench.measure_diffusers(path, folder, dtype=torch.float16)
    assert result["load_s"] > 0


# ------------------------------------------------------------------- configs from the tensor shapes

@pytest.mark.parametrize("variant", ["_sd1_variant", "_sd2_linear_variant", "inpainting"])
def test_files_of_unlisted_widths_load_without_a_config(tmp_path, variant):
    """No config anywhere (no argument, no YAML, no header): the architecture comes from the shapes
    (the heads from the family's rule), and the model equals the same weights loaded with the YAML."""
    from ldm.config import config_tree
    from tests.ldm import test_infer_config

    cfg = getattr(test_infer_config, "_sd1_variant" if variant == "inpainting" else variant)()
    if cfg.unet.in_channels != 4:  # text-to-image latents (what detection accepts)
        cfg = cfg.replace(channels=4, unet=dataclasses.replace(cfg.unet, in_channels=4, out_channels=4),
                          autoencoder=dataclasses.replace(cfg.autoencoder, embed_dim=4, z_channels=4))
    if variant == "inpainting":  # latents + mask + masked-image latents
        cfg = cfg.replace(conditioning_key="hybrid", unet=dataclasses.replace(cfg.unet, in_channels=9))
    model = randomize_(LatentDiffusion(cfg), seed=1).eval()
    path = _write(tmp_path, {k: v.contiguous() for k, v in model.state_dict().items()}, "bare.safetensors")
    loaded = load_model(path, prediction=cfg.parameterization)
    assert loaded.source.config_source.startswith("inferred from the tensor shapes")
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text(yaml.safe_dump(config_tree(cfg)))
    reference = load_model(path, yaml_path)
    assert (loaded.config.unet, loaded.config.text) == (reference.config.unet, reference.config.text)
    for k, v in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    tokens = torch.randint(0, cfg.text.vocab_size, (1, cfg.text.max_length), generator=torch.Generator().manual_seed(2))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    concat = torch.randn(1, 5, 8, 8) if variant == "inpainting" else None
    assert loaded.config.is_inpainting == (variant == "inpainting")
    with torch.no_grad():
        ctx = reference.get_learned_conditioning(tokens)
        assert torch.equal(loaded.get_learned_conditioning(tokens), ctx)
        assert torch.equal(loaded.apply_model(x, torch.tensor([10]), ctx, concat),
                           reference.apply_model(x, torch.tensor([10]), ctx, concat))


def test_heads_the_shapes_cannot_decide_are_one_error_line(tmp_path):
    path = _write(tmp_path, _state("sd2"), "tiny-sd2.safetensors")  # 32-wide attention, SD2 rule 64
    text = error_line(load_model, path)
    assert "heads" in text and "--config" in text and str(path) in text


@pytest.mark.parametrize("name, prediction", [("v1-inference", None), ("v2-inference-v", "v"),
                                              ("v1-inpainting-inference", None)])
def test_full_size_files_keep_the_standard_configs(tmp_path, name, prediction):
    from ldm.checkpoint import resolve_config
    from ldm.config import builtin_config

    cfg = builtin_config(name)
    with torch.device("meta"):  # shapes only
        sd = LatentDiffusion(cfg).state_dict()
    got, source, _ = resolve_config(None, tmp_path / "absent.safetensors", sd, prediction)
    assert got == cfg and source.startswith(f"built-in config {name}")
