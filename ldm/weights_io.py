"""Weight files, at the bottom of the stack: read safetensors (memory-mapped) and PyTorch pickles
(``weights_only`` only), write safetensors atomically, read a safetensors header's metadata, hash
files, name dtypes, and the one error type for files that cannot be read.

Nothing here knows a model: callers get tensors by key. This module imports nothing from ``ldm``.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import pickle
import re
import secrets
import threading
from pathlib import Path
from typing import Callable, Mapping

import torch

__all__ = ["CheckpointError", "DTYPE_NAMES", "SAFETENSORS_DTYPES", "parse_dtype", "MappedFile",
           "read_weights", "read_state_dict", "write_safetensors", "read_safetensors_metadata",
           "file_hash", "lora_file_hash", "hash_in_background", "hash_cache_path"]


class CheckpointError(Exception):
    """A checkpoint cannot be read or does not fit; the message is ``"<path>: <problem>"``."""


def file_error(path, problem: str) -> CheckpointError:
    """The error for ``path``, worded ``"<path>: <problem>"``."""
    return CheckpointError(f"{path}: {problem}")


# --------------------------------------------------------------------------------------- dtypes

# One row per dtype: the safetensors code, then the names a user may give (floats only).
_DTYPES = (
    (torch.float16, "F16", ("fp16", "float16", "half")),
    (torch.bfloat16, "BF16", ("bf16", "bfloat16")),
    (torch.float32, "F32", ("fp32", "float32", "float")),
    (torch.float64, "F64", ()),
    (torch.int64, "I64", ()),
    (torch.int32, "I32", ()),
    (torch.int16, "I16", ()),
    (torch.int8, "I8", ()),
    (torch.uint8, "U8", ()),
    (torch.bool, "BOOL", ()),
)
SAFETENSORS_DTYPES = {code: dtype for dtype, code, _ in _DTYPES}
_SAFETENSORS_CODES = {dtype: code for dtype, code, _ in _DTYPES}
DTYPE_NAMES = {name: dtype for dtype, _, names in _DTYPES for name in names}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """The weight/compute dtype a user named: ``torch.float16`` / ``bfloat16`` / ``float32``, or
    one of their names ("fp16", "half", "bf16", "fp32", "float32", ...; any case)."""
    if isinstance(value, torch.dtype):
        if value in DTYPE_NAMES.values():
            return value
    elif isinstance(value, str) and value.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[value.lower()]
    raise ValueError(f"dtype must be fp16, bf16 or fp32, got {value!r}")


# -------------------------------------------------------------------------------------- reading

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format caps its JSON header at 100 MB


def _looks_like_text(head: bytes) -> bool:
    return bool(head) and all(b in b"\t\n\r" or 32 <= b < 127 for b in head)


def _header_entry(path, name: str, info, data_len: int, start: int, size: int):
    """(name, dtype, shape, begin, end) of one header entry, checked against the file's size."""
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise file_error(path, f"tensor {name!r}: malformed header entry {info!r}") from None
    numel = 1
    for d in shape:
        numel *= d
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
        raise file_error(path, f"tensor {name!r}: offsets {begin}..{end} do not fit "
                         f"{info['dtype']} {shape}")
    if end > data_len:
        raise file_error(path, f"truncated: tensor {name!r} ends at byte {start + end} but the file "
                         f"has {size}")
    return name, dtype, shape, begin, end


def _safetensors_entries(path: Path, size: int) -> tuple[int, list[tuple[str, torch.dtype, list, int, int]]]:
    """Parse and validate the header: (data start, [(name, dtype, shape, begin, end)])."""
    if size < 8:
        raise file_error(path, f"truncated: {size} bytes is too short for a safetensors header")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise file_error(path, f"truncated or not a safetensors file: the header claims {n} bytes but "
                             f"the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise file_error(path, f"not a safetensors file: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise file_error(path, "not a safetensors file: the header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    return start, [_header_entry(path, name, info, size - start, start, size)
                   for name, info in header.items()]


class MappedFile:
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


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], MappedFile | None]:
    """Views into one memory map of the file: nothing is copied, and nothing is read from disk
    until a tensor's pages are touched."""
    size = path.stat().st_size
    start, entries = _safetensors_entries(path, size)
    if not entries:
        return {}, None
    mapped = MappedFile(path)
    out = {}
    for name, dtype, shape, begin, end in entries:
        t = mapped.flat[start + begin: start + end]
        if (start + begin) % dtype.itemsize:
            t = t.clone()  # the format does not promise alignment; misaligned data is copied
        out[name] = t.view(dtype).view(shape)
    return out, mapped


def _unpickling_error(path, exc: pickle.UnpicklingError) -> CheckpointError:
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return file_error(path, f"contains code or objects that are not plain tensors{what}; refused "
                          "for safety (only weights_only loading is allowed) - convert it to "
                          ".safetensors with a tool you trust")
    return file_error(path, f"not a readable PyTorch checkpoint ({text.splitlines()[0]})")


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
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
        raise _unpickling_error(path, exc) from None
    except (EOFError, OSError, RuntimeError, ValueError, KeyError, AttributeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise file_error(path, f"corrupt or truncated PyTorch checkpoint ({first})") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise file_error(path, f"holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_weights(path) -> tuple[dict[str, torch.Tensor], MappedFile | None]:
    """Tensors of one weight file by key, and the memory map they view (safetensors; None for a
    pickle), whose :meth:`MappedFile.release` gives pages back once a tensor was copied."""
    path = Path(path)
    if not path.exists():
        raise file_error(path, "no such file")
    if path.is_dir():
        raise file_error(path, "is a folder, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise file_error(path, "empty file")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise file_error(path, f"cannot read ({exc.strerror or exc})") from None
    looks_safetensors = len(head) > 8 and head[8:9] == b"{" and \
        int.from_bytes(head[:8], "little") <= size - 8
    if path.suffix.lower() == ".safetensors" or looks_safetensors:
        return _read_safetensors(path)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip / legacy pickle
        return _read_pickle(path), None
    kind = "a text file" if _looks_like_text(head) else "unrecognised bytes"
    raise file_error(path, f"not a checkpoint ({kind}; expected safetensors or a PyTorch zip/pickle)")


def read_state_dict(path, *, device="cpu") -> dict[str, torch.Tensor]:
    """Tensors of a single-file checkpoint by key. Safetensors files are memory-mapped (no copy);
    pickles are read with ``weights_only=True`` and a top-level ``state_dict`` is unwrapped."""
    sd, _ = read_weights(path)
    if torch.device(device).type != "cpu":
        sd = {k: v.to(device) for k, v in sd.items()}
    return sd


def read_safetensors_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors header (other formats, unreadable: empty)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > _MAX_HEADER:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


# -------------------------------------------------------------------------------------- writing

def _safetensors_header(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                        names: list[str], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        dtype, shape = specs[name]
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= int(d)
        header[name] = {"dtype": _SAFETENSORS_CODES[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data then starts 8-byte aligned


def write_safetensors(path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Stream a safetensors file tensor by tensor: ``specs`` gives each name's dtype and shape,
    ``produce(name)`` the tensor when its turn comes (so at most one is materialised at a time).
    Written to a temporary file in the same folder, then renamed over ``path``."""
    path = Path(path)
    # larger elements first keeps every tensor aligned to its element size
    names = sorted(specs, key=lambda k: (-specs[k][0].itemsize, k))
    raw = _safetensors_header(specs, names, metadata)
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


# -------------------------------------------------------------------------------------- hashing
# A file's sha256 is computed once: kept per (path, size, mtime) in this process and in a JSON cache
# file across processes (A1111 keeps such a cache too), and a checkpoint's hash can be computed in
# a background thread while the checkpoint loads (hashlib and file reads release the GIL).

_HASHES: dict[tuple[str, int, int, bool], str] = {}
_PENDING: dict[tuple[str, int, int, bool], threading.Thread] = {}
_LOCK = threading.Lock()
HASH_CACHE_ENV = "LDM_HASH_CACHE"


def hash_cache_path() -> Path | None:
    """The cross-process hash cache: ``$LDM_HASH_CACHE`` (empty: none), else
    ``$XDG_CACHE_HOME/ldm-pipeline/hashes.json`` (``~/.cache`` when unset)."""
    value = os.environ.get(HASH_CACHE_ENV)
    if value is not None:
        return Path(value) if value else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldm-pipeline" / "hashes.json"


def _cache_name(key) -> str:
    return ("data:" if key[3] else "file:") + key[0]


def _read_cache() -> dict:
    path = hash_cache_path()
    try:
        entries = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):  # absent, unreadable or damaged: start afresh
        return {}
    return entries if isinstance(entries, dict) else {}


def _cached_on_disk(key) -> str | None:
    entry = _read_cache().get(_cache_name(key))
    if isinstance(entry, dict) and entry.get("size") == key[1] and entry.get("mtime_ns") == key[2]:
        digest = entry.get("sha256")
        if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest
    return None


def _store_on_disk(key, digest: str) -> None:
    path = hash_cache_path()
    if path is None:
        return
    entries = _read_cache()
    entries[_cache_name(key)] = {"size": key[1], "mtime_ns": key[2], "sha256": digest}
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:  # a cache that cannot be written (read-only home) only costs a later re-hash
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _hash_key(path: Path, st: os.stat_result, skip_header: bool):
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, skip_header)


def _compute(path: Path, key) -> None:
    digest = hashlib.sha256()
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb") as f:
        if key[3]:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while n := f.readinto(buf):
            digest.update(view[:n])
    _HASHES[key] = digest.hexdigest()
    _store_on_disk(key, _HASHES[key])


def _sha256(path: Path, st: os.stat_result, skip_header: bool) -> str:
    """sha256 hex digest of a file (of its data after the safetensors header when
    ``skip_header``), cached per (path, size, mtime)."""
    key = _hash_key(path, st, skip_header)
    with _LOCK:
        pending = _PENDING.pop(key, None)
    if pending is not None:
        pending.join()
    if key not in _HASHES:
        cached = _cached_on_disk(key)
        if cached:
            _HASHES[key] = cached
        else:
            _compute(path, key)
    return _HASHES[key]


def hash_in_background(path) -> None:
    """Start computing ``file_hash(path)`` in a daemon thread unless it is known already; a later
    :func:`file_hash` waits for it. Errors are left for that call to report."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return
    key = _hash_key(path, st, False)
    with _LOCK:
        if key in _HASHES or key in _PENDING or not path.is_file():
            return
        cached = _cached_on_disk(key)
        if cached:
            _HASHES[key] = cached
            return

        def work():
            try:
                _compute(path, key)
            except OSError:
                pass  # file_hash computes again and reports the error
            finally:
                with _LOCK:
                    _PENDING.pop(key, None)

        _PENDING[key] = thread = threading.Thread(target=work, name="ldm-file-hash", daemon=True)
    thread.start()


def file_hash(path) -> str:
    """sha256 hex digest of the whole file (A1111 shows its first 10 hex digits as the model
    hash), computed once per (path, size, mtime): see :func:`hash_cache_path`."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise file_error(path, f"cannot read ({exc.strerror or exc})") from None
    return _sha256(path, st, False)


def lora_file_hash(path) -> str:
    """The short hash A1111 shows for a LoRA ("Lora hashes"): the first 12 hex digits of the
    sha256 of a safetensors file's tensor data (the header, which holds the metadata, is left
    out, as in kohya's additional-networks hash), or of the whole file for other formats."""
    path = Path(path)
    return _sha256(path, path.stat(), path.suffix.lower() == ".safetensors")[:12]
