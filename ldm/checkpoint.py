"""Single-file checkpoints: read (.safetensors memory-mapped, .ckpt/.pt/.pth/.bin with
``weights_only``), check the keys strictly, load into a model built on the meta device, save
atomically as safetensors, and hash (A1111 shows the first 10 hex digits of the sha256).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from .config import ModelConfig, builtin_config, load_config
from .detect import CheckpointError, Detection, detect, sidecar_config_path
from .model import LatentDiffusion, make_betas

__all__ = ["CheckpointError", "Detection", "LoadInfo", "read_state_dict", "detect", "load_model",
           "save_checkpoint", "file_hash", "write_safetensors"]

SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format caps its JSON header at 100 MB

# CompVis LatentDiffusion registers its whole noise schedule as buffers; we derive it from the config.
SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
# Present in many files, harmless: training-only state, a buffer we rebuild, a v-prediction marker.
DROPPED_KEYS = frozenset(SCHEDULE_KEYS + (
    "logvar", "cond_stage_model.transformer.text_model.embeddings.position_ids", "v_pred"))
EMA_PREFIX = "model_ema."
_EMA_BOOKKEEPING = {"decay", "num_updates"}


@dataclass(frozen=True)
class LoadInfo:
    """Where a loaded model came from, and how its configuration was chosen."""

    path: str
    detection: Detection | None
    config_source: str
    use_ema: bool = False

    @property
    def name(self) -> str:
        p = Path(self.path)
        return p.name if p.is_dir() else p.stem


def _fail(path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


# the names a user may give for a load/compute dtype
DTYPE_NAMES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be fp16, bf16 or fp32, got {dtype!r}")
    return DTYPE_NAMES[dtype]


# ---------------------------------------------------------------------------------------- reading

def _looks_like_text(head: bytes) -> bool:
    return bool(head) and all(b in b"\t\n\r" or 32 <= b < 127 for b in head)


def _safetensors_entries(path: Path, size: int) -> tuple[int, list[tuple[str, torch.dtype, list, int, int]]]:
    """Parse and validate the header: (data start, [(name, dtype, shape, begin, end)])."""
    if size < 8:
        raise _fail(path, f"truncated: {size} bytes is too short for a safetensors header")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise _fail(path, f"truncated or not a safetensors file: the header claims {n} bytes but "
                              f"the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"not a safetensors file: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file: the header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    data_len = size - start
    entries = []
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _fail(path, f"tensor {name!r}: malformed header entry {info!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or not 0 <= begin <= end or \
                end - begin != numel * dtype.itemsize:
            raise _fail(path, f"tensor {name!r}: offsets {begin}..{end} do not fit "
                              f"{info['dtype']} {shape}")
        if end > data_len:
            raise _fail(path, f"truncated: tensor {name!r} ends at byte {start + end} but the file "
                              f"has {size}")
        entries.append((name, dtype, shape, begin, end))
    return start, entries


class _MappedFile:
    """A private (copy-on-write) memory map of a whole file, viewed as bytes by torch."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.flat = torch.frombuffer(self.mm, dtype=torch.uint8)  # shares the mapping, no copy
        self.base = self.flat.data_ptr()

    def release(self, t: torch.Tensor) -> None:
        """Drop the pages under ``t`` from this process's resident set once ``t`` was copied
        elsewhere. Nothing is ever written to the mapping, so a later read refaults from the file."""
        start = t.data_ptr() - self.base
        end = start + t.numel() * t.element_size()
        if not hasattr(self.mm, "madvise") or start < 0 or end > len(self.mm) or end <= start:
            return
        page = mmap.PAGESIZE
        lo, hi = start // page * page, min(-(-end // page) * page, len(self.mm))
        self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], _MappedFile | None]:
    """Views into one memory map of the file: nothing is copied, and nothing is read from disk
    until a tensor's pages are touched."""
    size = path.stat().st_size
    start, entries = _safetensors_entries(path, size)
    if not entries:
        return {}, None
    mapped = _MappedFile(path)
    out = {}
    for name, dtype, shape, begin, end in entries:
        t = mapped.flat[start + begin: start + end]
        if (start + begin) % dtype.itemsize:
            t = t.clone()  # the format does not promise alignment; misaligned data is copied
        out[name] = t.view(dtype).view(shape)
    return out, mapped


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (pre-zip) files cannot be memory-mapped
                raise
            obj = load(False)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise _fail(path, f"contains code or objects that are not plain tensors{what}; refused "
                              "for safety (only weights_only loading is allowed) - convert it to "
                              ".safetensors with a tool you trust") from None
        raise _fail(path, f"not a readable PyTorch checkpoint ({text.splitlines()[0]})") from None
    except (EOFError, OSError, RuntimeError, ValueError, KeyError, AttributeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise _fail(path, f"corrupt or truncated PyTorch checkpoint ({first})") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise _fail(path, f"holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], _MappedFile | None]:
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a folder, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, "empty file")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise _fail(path, f"cannot read ({exc.strerror or exc})") from None
    looks_safetensors = len(head) > 8 and head[8:9] == b"{" and \
        int.from_bytes(head[:8], "little") <= size - 8
    if path.suffix.lower() == ".safetensors" or looks_safetensors:
        return _read_safetensors(path)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip / legacy pickle
        return _read_pickle(path), None
    kind = "a text file" if _looks_like_text(head) else "unrecognised bytes"
    raise _fail(path, f"not a checkpoint ({kind}; expected safetensors or a PyTorch zip/pickle)")


def read_state_dict(path, *, device="cpu") -> dict[str, torch.Tensor]:
    """Tensors of a single-file checkpoint by key. Safetensors files are memory-mapped (no copy);
    pickles are read with ``weights_only=True`` and a top-level ``state_dict`` is unwrapped."""
    sd, _ = _read(Path(path))
    if torch.device(device).type != "cpu":
        sd = {k: v.to(device) for k, v in sd.items()}
    return sd


# ------------------------------------------------------------------------------ checking the keys

def _listing(keys: list[str], what: str, limit: int = 5) -> str:
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
            raise _fail(path, f"{key} has shape {list(v.shape)} but the config's schedule has "
                              f"{cfg.timesteps} steps (wrong config for this file?)")
        rtol = max(1e-5, 4 * torch.finfo(v.dtype).eps) if v.is_floating_point() else 1e-5
        if not torch.allclose(v.double(), ref, rtol=rtol, atol=1e-8):
            diff = float((v.double() - ref).abs().max())
            raise _fail(path, f"{key} does not match the config's noise schedule (linear_start "
                              f"{cfg.linear_start}, linear_end {cfg.linear_end}; max difference "
                              f"{diff:.3g}): wrong config for this file?")


def _ema_tensors(ema: dict[str, torch.Tensor], expected: Mapping, path) -> dict[str, torch.Tensor]:
    """The UNet's EMA weights under our keys. CompVis LitEma stores ``model.X.Y`` as
    ``model_ema.XY`` (dots removed); a dotted copy is accepted too."""
    weights = {k: v for k, v in ema.items() if k not in _EMA_BOOKKEEPING}
    if not weights:
        raise _fail(path, "use_ema was asked for, but the file has no EMA weights "
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
        raise _fail(path, "EMA weights incomplete: " + _listing(missing, "UNet tensors without a "
                                                                          "model_ema entry"))
    return out


def prepare_state_dict(sd: Mapping[str, torch.Tensor], model: torch.nn.Module, cfg: ModelConfig,
                       *, path, dtype: torch.dtype, use_ema: bool = False, hint: str = "",
                       release: Callable[[torch.Tensor], None] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Drop the known harmless extras, swap in EMA weights if asked, check every key and shape
    against ``model`` (any mismatch is an error naming the keys), and cast floats to ``dtype``
    (``release(original)`` is called after each cast, to give back the source's memory)."""
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

    missing = [k for k in expected if k not in kept]
    unexpected = [k for k in kept if k not in expected]
    shapes = [f"{k}: file {list(kept[k].shape)} vs model {list(expected[k].shape)}"
              for k in expected if k in kept and kept[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(_listing(missing, "missing keys"))
    if unexpected:
        problems.append(_listing(unexpected, "unexpected keys"))
    if shapes:
        problems.append(_listing(shapes, "shape mismatches", limit=3))
    if problems:
        raise _fail(path, "does not fit the model config: " + "; ".join(problems) + hint)

    out, sources = {}, []
    for k, v in kept.items():
        if v.is_floating_point() and v.dtype != dtype:
            out[k] = v.to(dtype)  # only here is a copy made
            if release is not None:
                release(v)
                sources.append(v)
        else:
            out[k] = v
    # the kernel maps a few neighbouring pages on each fault (fault-around), some of them already
    # released: one last pass gives those back too
    for v in sources:
        release(v)
    return out


# -------------------------------------------------------------------------------------- loading

def _resolve_config(config, path: Path, sd, prediction) -> tuple[ModelConfig, str, Detection | None]:
    """(config, where it came from, detection): explicit config, else the sidecar YAML, else the
    built-in config of the detected family."""
    detection = None
    try:
        detection = detect(sd, path=path, prediction=prediction)
    except CheckpointError:
        if config is None and sidecar_config_path(path) is None:
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
    return (builtin_config(detection.config_name),
            f"built-in config {detection.config_name} (detected {detection.family})", detection)


def _with_prediction(cfg: ModelConfig, prediction: str | None) -> ModelConfig:
    if prediction is None or prediction == cfg.parameterization:
        return cfg
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    return cfg.replace(parameterization=prediction)


def _assert_materialised(model: torch.nn.Module, path) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise _fail(path, "internal error: " + _listing(left, "tensors were left on the meta device"))


def _load_folder(path: Path, config, dtype, device, use_ema, prediction) -> LatentDiffusion:
    if config is not None or use_ema:
        raise _fail(path, "a diffusers folder brings its own config and has no EMA weights; "
                          "config and use_ema apply to single-file checkpoints")
    from .diffusers_folder import load_diffusers_folder

    model = load_diffusers_folder(path, dtype=dtype, device=device)
    if prediction is not None and prediction != model.config.parameterization:
        cfg = _with_prediction(model.config, prediction)
        model.config = cfg
        model.prediction = type(model.prediction)(cfg.parameterization)
    if getattr(model, "source", None) is None:
        model.source = LoadInfo(str(path), None, "diffusers folder")
    return model


def load_model(path, config=None, *, dtype=torch.float32, device="cpu", use_ema: bool = False,
               prediction: str | None = None) -> LatentDiffusion:
    """A ready :class:`LatentDiffusion` (eval mode) from a single-file checkpoint or a diffusers
    folder. ``config``: None (sidecar ``<stem>.yaml``, else detection), a YAML path, a built-in
    config stem or a :class:`ModelConfig`. ``prediction`` ("eps"/"v") overrides the config."""
    path = Path(path)
    dtype = _as_dtype(dtype)
    if prediction not in (None, "eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    if path.is_dir():
        return _load_folder(path, config, dtype, device, use_ema, prediction)
    sd, mapped = _read(path)
    cfg, source, detection = _resolve_config(config, path, sd, prediction)
    cfg = _with_prediction(cfg, prediction)
    hint = ""
    if config is None and sidecar_config_path(path) is None:
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
                                 release=mapped.release if mapped is not None else None)
    del sd, mapped
    model.load_state_dict(weights, strict=True, assign=True)
    _assert_materialised(model, path)
    model.eval()
    if torch.device(device).type != "cpu":
        model.to(device)
    model.source = LoadInfo(str(path), detection, source, use_ema)
    return model


# --------------------------------------------------------------------------------------- saving

def write_safetensors(path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Stream a safetensors file tensor by tensor: ``specs`` gives each name's dtype and shape,
    ``produce(name)`` the tensor when its turn comes (so at most one is materialised at a time).
    Written to a temporary file in the same folder, then renamed over ``path``."""
    path = Path(path)
    # larger elements first keeps every tensor aligned to its element size
    names = sorted(specs, key=lambda k: (-specs[k][0].itemsize, k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        dtype, shape = specs[name]
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= int(d)
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data then starts 8-byte aligned

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name in names:
                t = produce(name).detach()
                if t.dtype != specs[name][0] or tuple(t.shape) != tuple(specs[name][1]):
                    raise ValueError(f"{name}: produced {t.dtype} {list(t.shape)}, announced "
                                     f"{specs[name][0]} {list(specs[name][1])}")
                f.write(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(model: LatentDiffusion, path, *, half: bool = False,
                    metadata: dict[str, str] | None = None) -> None:
    """Save ``model.state_dict()`` (CompVis keys, no schedule buffers) as safetensors; floats in
    fp16 when ``half``; ``metadata`` strings go into the header."""
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str; got {k!r}: {type(v).__name__}")
        meta[k] = v
    state = model.state_dict()
    on_meta = [k for k, v in state.items() if v.is_meta]
    if on_meta:
        raise ValueError(f"cannot save {path}: " + _listing(on_meta, "tensors have no data (meta)"))

    def target(t: torch.Tensor) -> torch.dtype:
        return torch.float16 if half and t.is_floating_point() else t.dtype

    specs = {k: (target(v), tuple(v.shape)) for k, v in state.items()}
    write_safetensors(path, specs, lambda k: state[k].to(specs[k][0]), meta)


# -------------------------------------------------------------------------------------- hashing

_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path) -> str:
    """sha256 hex digest of the whole file, cached per (path, size, mtime) in this process."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise _fail(path, f"cannot read ({exc.strerror or exc})") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        buf = bytearray(1 << 22)
        view = memoryview(buf)
        with open(path, "rb") as f:
            while n := f.readinto(buf):
                digest.update(view[:n])
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]
