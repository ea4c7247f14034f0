"""Single-file checkpoints → a model: check the keys strictly, load into a model built on the
meta device (diffusers folders are handed to :mod:`ldm.diffusers_folder`), and save a model as
safetensors. Reading and writing the files themselves is :mod:`ldm.weights_io`'s.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping

import torch

from .config import ConfigError, ModelConfig, builtin_config, config_tree, load_config, parse_config
from .detect import Detection, detect, sidecar_config_path
from .diffusers_folder import load_diffusers_folder
from .infer_config import infer_config
from .model import LatentDiffusion, LoadInfo, make_betas
from .weights_io import (CheckpointError, file_error, parse_dtype, read_safetensors_metadata, read_weights,
                         write_safetensors)

__all__ = ["load_model", "prepare_state_dict", "check_keys", "cast_weights", "save_checkpoint",
           "resolve_config", "embedded_config"]

# CompVis LatentDiffusion registers its whole noise schedule as buffers; we derive it from the config.
SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
# Present in many files, harmless: training-only state, a buffer we rebuild, a v-prediction marker.
DROPPED_KEYS = frozenset(SCHEDULE_KEYS + (
    "logvar", "cond_stage_model.transformer.text_model.embeddings.position_ids", "v_pred",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "denoiser.sigmas", "denoiser.log_sigmas"))  # sgm's DiscreteDenoiser buffers, from the schedule
EMA_PREFIX = "model_ema."
CONFIG_METADATA_KEY = "ldm_config"
_EMA_BOOKKEEPING = {"decay", "num_updates"}


# ------------------------------------------------------------------------------ checking the keys

def listing(keys: list[str], what: str, limit: int = 5) -> str:
    """``"N what (a, b, c, ... M more)"``: a count and the first ``limit`` names."""
    more = f", ... {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {what} ({', '.join(keys[:limit])}{more})"


def _check_schedule(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, path) -> None:
    """The file's own betas / alphas_cumprod must match the schedule the config will rebuild."""
    betas = make_betas(cfg)
    for key, ref in (("betas", betas), ("alphas_cumprod", torch.cumprod(1 - betas, 0))):
        v = sd.get(key)
        if v is None or v.is_meta:
            continue
        if tuple(v.shape) != tuple(ref.shape):
            raise file_error(path, f"{key} has shape {list(v.shape)} but the config's schedule has "
                             f"{cfg.timesteps} steps (wrong config for this file?)")
        rtol = max(1e-5, 4 * torch.finfo(v.dtype).eps) if v.is_floating_point() else 1e-5
        if not torch.allclose(v.double(), ref, rtol=rtol, atol=1e-8):
            diff = float((v.double() - ref).abs().max())
            raise file_error(path, f"{key} does not match the config's noise schedule (linear_start "
                             f"{cfg.linear_start}, linear_end {cfg.linear_end}; max difference "
                             f"{diff:.3g}): wrong config for this file?")


def _ema_tensors(ema: dict[str, torch.Tensor], expected: Mapping, path) -> dict[str, torch.Tensor]:
    """The UNet's EMA weights under our keys. CompVis LitEma stores ``model.X.Y`` as
    ``model_ema.XY`` (dots removed); a dotted copy is accepted too."""
    weights = {k: v for k, v in ema.items() if k not in _EMA_BOOKKEEPING}
    if not weights:
        raise file_error(path, "use_ema was asked for, but the file has no EMA weights "
                         "(no model_ema.* tensors)")
    out, missing = {}, []
    for key in expected:
        if not key.startswith("model.diffusion_model."):
            continue
        inner = key.removeprefix("model.")
        name = inner.replace(".", "") if inner.replace(".", "") in weights else inner
        if name in weights:
            out[key] = weights[name]
        else:
            missing.append(key)
    if missing:
        raise file_error(path, "EMA weights incomplete: "
                         + listing(missing, "UNet tensors without a model_ema entry"))
    return out


# threads converting tensors while loading (each copy's time is mostly page faults, which run in
# parallel); peak memory grows by at most this many source tensors
LOAD_THREADS = max(1, min(4, os.cpu_count() or 1))
# the parts that run in NHWC with the speed option channels_last (ldm.speed.set_channels_last)
CHANNELS_LAST_PREFIXES = ("model.diffusion_model.", "first_stage_model.")


def prepare_state_dict(sd: Mapping[str, torch.Tensor], model: torch.nn.Module, cfg: ModelConfig,
                       *, path, dtype: torch.dtype, use_ema: bool = False, hint: str = "",
                       release: Callable[[torch.Tensor], None] | None = None,
                       channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Drop the known harmless extras, swap in EMA weights if asked, check every key and shape
    against ``model`` (any mismatch is an error naming the keys), and cast floats to ``dtype``
    (``release(original)`` is called after each cast, to give back the source's memory).
    ``channels_last``: the UNet's and autoencoder's 4-D weights are laid out NHWC in the same
    pass (one copy per tensor instead of a cast and then a second full copy)."""
    expected = model.state_dict(keep_vars=True)
    kept, ema = {}, {}
    for k, v in sd.items():
        if k.startswith(EMA_PREFIX):
            ema[k.removeprefix(EMA_PREFIX)] = v
        elif k not in DROPPED_KEYS:
            kept[k] = v
    _check_schedule(sd, cfg, path)
    if use_ema:
        kept.update(_ema_tensors(ema, expected, path))

    check_keys(kept, expected, path=path, hint=hint)
    return cast_weights(kept, dtype, release=release, channels_last=channels_last)


def check_keys(kept: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, path,
               what: str = "the model config", hint: str = "") -> None:
    """Every key of ``expected`` in ``kept`` with the same shape, and no other: else one
    CheckpointError naming the missing and unexpected keys and the shape mismatches."""
    missing = [k for k in expected if k not in kept]
    unexpected = [k for k in kept if k not in expected]
    shapes = [f"{k}: file {list(kept[k].shape)} vs model {list(expected[k].shape)}"
              for k in expected if k in kept and kept[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(listing(missing, "missing keys"))
    if unexpected:
        problems.append(listing(unexpected, "unexpected keys"))
    if shapes:
        problems.append(listing(shapes, "shape mismatches", limit=3))
    if problems:
        raise file_error(path, f"does not fit {what}: " + "; ".join(problems) + hint)


def cast_weights(kept: Mapping[str, torch.Tensor], dtype: torch.dtype, *,
                 release: Callable[[torch.Tensor], None] | None = None, channels_last: bool = False,
                 channels_last_prefixes: tuple[str, ...] = CHANNELS_LAST_PREFIXES
                 ) -> dict[str, torch.Tensor]:
    """Floats cast to ``dtype`` (and 4-D weights under ``channels_last_prefixes`` laid out NHWC
    when ``channels_last``), on a few threads; ``release(original)`` after each copy."""
    def convert(k: str, v: torch.Tensor) -> torch.Tensor:
        nhwc = channels_last and v.dim() == 4 and k.startswith(channels_last_prefixes)
        if not (v.is_floating_point() and (v.dtype != dtype or nhwc)):
            return v
        # only here is a copy made, at most one per tensor
        out = v.to(dtype=dtype, memory_format=torch.channels_last if nhwc else torch.preserve_format)
        if release is not None:
            release(v)
        return out

    # Copies run on a few threads (torch releases the GIL): most of a copy's time is the kernel
    # faulting in its fresh pages, which a single-threaded copy does one page at a time.
    with ThreadPoolExecutor(max_workers=LOAD_THREADS) as pool:
        futures = {k: pool.submit(convert, k, v) for k, v in kept.items()}
        out = {k: f.result() for k, f in futures.items()}
    if release is not None:
        # the kernel maps a few neighbouring pages on each fault (fault-around), some of them
        # already released: one last pass gives those back too
        for k, v in kept.items():
            if out[k] is not v:
                release(v)
    return out


# -------------------------------------------------------------------------------------- loading

def embedded_config(path) -> ModelConfig | None:
    """The config a safetensors file carries in its header (``ldm_config``: the CompVis tree as
    JSON, written by :func:`save_checkpoint`), or None."""
    text = read_safetensors_metadata(path).get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        return parse_config(json.loads(text), f"its {CONFIG_METADATA_KEY} metadata")
    except (ValueError, ConfigError) as exc:  # ConfigError is a ValueError too
        raise file_error(path, str(exc) if isinstance(exc, ConfigError)
                         else f"its {CONFIG_METADATA_KEY} metadata is not valid JSON") from None


def resolve_config(config, path: Path, sd, prediction=None) -> tuple[ModelConfig, str, Detection | None]:
    """(config, where it came from, detection): explicit config, else the sidecar YAML, else the
    config the file carries, else the built-in config of the detected family."""
    detection = None
    embedded = embedded_config(path) if config is None else None
    try:
        detection = detect(sd, path=path, prediction=prediction)
    except CheckpointError:
        if config is None and sidecar_config_path(path) is None and embedded is None:
            raise
    if isinstance(config, ModelConfig):
        return config, "ModelConfig given by the caller", detection
    if config is not None:
        text = str(config)
        if text.endswith((".yaml", ".yml")) or os.sep in text or Path(text).is_file():
            return load_config(text), f"config file {text}", detection
        return builtin_config(text), f"built-in config {text}", detection
    sidecar = sidecar_config_path(path)
    if sidecar is not None:
        return load_config(sidecar), f"sidecar config {sidecar}", detection
    if embedded is not None:
        return embedded, f"the file's own config ({CONFIG_METADATA_KEY} metadata)", detection
    base = builtin_config(detection.config_name)
    if base.is_sdxl:  # no shape inference for SDXL yet: other widths need a config
        base = base.replace(parameterization=detection.prediction)
        return base, f"built-in config {detection.config_name} (detected {detection.family})", detection
    # the architecture from the tensor shapes; a file of the family's standard size keeps the
    # built-in config itself
    inferred, _ = infer_config(sd, base, path=path)
    if (inferred.unet, inferred.autoencoder, inferred.text) == (base.unet, base.autoencoder, base.text):
        return base, f"built-in config {detection.config_name} (detected {detection.family})", detection
    return (inferred, f"inferred from the tensor shapes (detected {detection.family}; the rest from "
                      f"built-in config {detection.config_name})", detection)


def _with_prediction(cfg: ModelConfig, prediction: str | None) -> ModelConfig:
    if prediction is None or prediction == cfg.parameterization:
        return cfg
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    return cfg.replace(parameterization=prediction)


def assert_materialised(model: torch.nn.Module, path) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise file_error(path, "internal error: "
                         + listing(left, "tensors were left on the meta device"))


def _load_folder(path: Path, config, dtype, device, use_ema, prediction) -> LatentDiffusion:
    if config is not None or use_ema:
        raise file_error(path, "a diffusers folder brings its own config and has no EMA weights; "
                         "config and use_ema apply to single-file checkpoints")
    if (path / "text_encoder_2").is_dir():  # SDXL: two text towers
        from .diffusers_sdxl import load_sdxl_folder

        model = load_sdxl_folder(path, dtype=dtype, device=device)
    else:
        model = load_diffusers_folder(path, dtype=dtype, device=device)
    if prediction is not None and prediction != model.config.parameterization:
        cfg = _with_prediction(model.config, prediction)
        model.config = cfg
        model.prediction = type(model.prediction)(cfg.parameterization)
    if model.source is None:
        model.source = LoadInfo(str(path), None, "diffusers folder")
    return model


def load_model(path, config=None, *, dtype=torch.float32, device="cpu", use_ema: bool = False,
               prediction: str | None = None, channels_last: bool = False) -> LatentDiffusion:
    """A ready :class:`LatentDiffusion` (eval mode) from a single-file checkpoint or a diffusers
    folder. ``config``: None (sidecar ``<stem>.yaml``, else detection), a YAML path, a built-in
    config stem or a :class:`ModelConfig`. ``prediction`` ("eps"/"v") overrides the config.
    ``channels_last``: lay the UNet's and autoencoder's convolution weights out NHWC while
    casting (what the speed option of that name needs; saves a second copy of each weight)."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    if prediction not in (None, "eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    if path.is_dir():
        return _load_folder(path, config, dtype, device, use_ema, prediction)
    sd, mapped = read_weights(path)
    cfg, source, detection = resolve_config(config, path, sd, prediction)
    cfg = _with_prediction(cfg, prediction)
    hint = ""
    if config is None and sidecar_config_path(path) is None and not source.startswith("the file's"):
        hint = (f" (config chosen by detection as {detection.family}; pass a config or put "
                f"{path.with_suffix('.yaml').name} next to the file)")
    elif detection is not None:
        hint = f" (the file looks like {detection.family}: config {detection.config_name})"

    from accelerate import init_empty_weights

    # Parameters are created on the meta device (no memory, no init); buffers stay real, so the
    # non-persistent ones (position ids, attention mask) need nothing from the file.
    with init_empty_weights():
        model = LatentDiffusion(cfg)
    # a cast copies; the mapped source pages are then dropped, so peak memory stays near the
    # size of the converted weights instead of converted + file
    weights = prepare_state_dict(sd, model, cfg, path=path, dtype=dtype, use_ema=use_ema, hint=hint,
                                 release=mapped.release if mapped is not None else None,
                                 channels_last=channels_last)
    del sd, mapped
    model.load_state_dict(weights, strict=True, assign=True)
    assert_materialised(model, path)
    model.eval()
    if torch.device(device).type != "cpu":
        model.to(device)
    model.source = LoadInfo(str(path), detection, source, use_ema)
    return model


# --------------------------------------------------------------------------------------- saving

def save_checkpoint(model: LatentDiffusion, path, *, half: bool = False,
                    metadata: dict[str, str] | None = None) -> None:
    """Save ``model.state_dict()`` (CompVis keys, no schedule buffers) as safetensors; floats in
    fp16 when ``half``; ``metadata`` strings go into the header, with the model's config
    (``ldm_config``, see :func:`embedded_config`)."""
    # the file describes itself: it loads without a config wherever it is copied
    meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config_tree(model.config))}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str; got {k!r}: {type(v).__name__}")
        meta[k] = v
    state = model.state_dict()
    on_meta = [k for k, v in state.items() if v.is_meta]
    if on_meta:
        raise ValueError(f"cannot save {path}: " + listing(on_meta, "tensors have no data (meta)"))

    def target(t: torch.Tensor) -> torch.dtype:
        return torch.float16 if half and t.is_floating_point() else t.dtype

    specs = {k: (target(v), tuple(v.shape)) for k, v in state.items()}
    write_safetensors(path, specs, lambda k: state[k].to(specs[k][0]), meta)
