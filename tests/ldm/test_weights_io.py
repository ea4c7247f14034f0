"""Weight-file I/O (ldm.weights_io): the memory-mapped safetensors reader and streaming writer
(checked against the safetensors library), hashing, safetensors metadata, the dtype names. (Bad
files and pickles are checked through the checkpoint loader: test_checkpoint.)"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm import weights_io
from ldm.weights_io import (DTYPE_NAMES, SAFETENSORS_DTYPES, CheckpointError, file_hash,
                            lora_file_hash, parse_dtype, read_safetensors_metadata, read_state_dict,
                            write_safetensors)


def _write(tmp_path: Path, sd: dict, name: str = "model.safetensors") -> Path:
    """Save tensors with the safetensors library."""
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def error_line(fn, *args, **kwargs) -> str:
    """The message of the CheckpointError ``fn`` raises: one line."""
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- safetensors I/O

def test_reader_maps_the_file_without_copying(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f16": torch.randn(3, 5, generator=gen).half(), "bf16": torch.randn(7, generator=gen).bfloat16(),
        "f32": torch.randn(2, 3, 4, generator=gen), "f64": torch.randn(3, generator=gen).double(),
        "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16), "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }
    path = _write(tmp_path, tensors)
    got = read_state_dict(path)
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    # every tensor is a view into one storage spanning the whole file: a memory map, no copies
    storages = {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(storages) == 1
    assert got["f32"].untyped_storage().nbytes() == path.stat().st_size
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path) in maps.read_text()


def test_reader_copies_only_misaligned_tensors(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = bytes([7, 9]) + torch.tensor([1.5, -2.0]).numpy().tobytes()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    got = read_state_dict(path)
    assert got["a"].tolist() == [7, 9] and got["b"].tolist() == [1.5, -2.0]


def test_writer_streams_a_file_the_safetensors_library_reads(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {"odd_half": torch.randn(3, generator=gen).half(), "wide": torch.randn(5, 2, generator=gen),
               "ids": torch.arange(3), "flag": torch.tensor([True]), "b16": torch.randn(2).bfloat16()}
    produced = []

    def produce(name):
        produced.append(name)
        return tensors[name]

    path = tmp_path / "w.safetensors"
    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, produce,
                      {"note": "hello"})
    assert sorted(produced) == sorted(tensors)  # each produced exactly once
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"note": "hello"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + n])
    assert n % 8 == 0
    for k, info in header.items():
        if k != "__metadata__":
            assert info["data_offsets"][0] % tensors[k].dtype.itemsize == 0, k
    with pytest.raises(ValueError, match="announced"):
        write_safetensors(tmp_path / "bad.safetensors", {"x": (torch.float32, (2,))},
                          lambda k: torch.zeros(3))
    assert not (tmp_path / "bad.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# ------------------------------------------------------------------------------------- hashing

def test_file_hash(tmp_path, monkeypatch):
    path = tmp_path / "h.bin"
    path.write_bytes(os.urandom(5_000_000))
    assert file_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()

    def no_reading(*args, **kwargs):
        raise AssertionError("the cached hash should be used")

    monkeypatch.setattr(weights_io, "open", no_reading, raising=False)
    assert file_hash(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.undo()
    path.write_bytes(b"changed")
    assert file_hash(path) == hashlib.sha256(b"changed").hexdigest()
    assert "cannot read" in error_line(file_hash, tmp_path / "absent.bin")




def test_parse_dtype_names_and_dtypes():
    for name in ("fp16", "float16", "half", "FP16"):
        assert parse_dtype(name) == torch.float16
    for name in ("bf16", "bfloat16", "BF16"):
        assert parse_dtype(name) == torch.bfloat16
    for name in ("fp32", "float32", "float", "Float32"):
        assert parse_dtype(name) == torch.float32
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert parse_dtype(dtype) is dtype
    for bad in ("int8", "no", "", None, 16, torch.int8, torch.float64):
        with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
            parse_dtype(bad)


def test_one_table_for_names_and_file_codes():
    assert set(DTYPE_NAMES.values()) == {torch.float16, torch.bfloat16, torch.float32}
    assert {SAFETENSORS_DTYPES[c] for c in ("F16", "BF16", "F32")} == set(DTYPE_NAMES.values())
    assert len(set(SAFETENSORS_DTYPES.values())) == len(SAFETENSORS_DTYPES)


def test_safetensors_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    t = torch.arange(3.0)
    write_safetensors(path, {"t": (t.dtype, tuple(t.shape))}, lambda _: t, {"rank": "4"})
    assert read_safetensors_metadata(path) == {"rank": "4"}
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 4)
    assert read_safetensors_metadata(tmp_path / "junk.bin") == {}
    assert read_safetensors_metadata(tmp_path / "absent.safetensors") == {}


def _forget_hashes_in_process(monkeypatch):
    """What a new process starts with: no hash known in memory."""
    monkeypatch.setattr(weights_io, "_HASHES", {})


def test_file_hash_is_kept_across_processes(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "hashes.json"
    monkeypatch.setenv("LDM_HASH_CACHE", str(cache))
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(1_000_000))
    real = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_hash(path) == real and cache.is_file()

    _forget_hashes_in_process(monkeypatch)

    def no_reading(*args, **kwargs):
        raise AssertionError("the hash should come from the cache file")

    monkeypatch.setattr(weights_io, "open", no_reading, raising=False)
    assert file_hash(path) == real
    monkeypatch.delattr(weights_io, "open")

    # a changed file (size or mtime) is hashed again, never served from the cache
    _forget_hashes_in_process(monkeypatch)
    path.write_bytes(b"other content")
    assert file_hash(path) == hashlib.sha256(b"other content").hexdigest()
    # the entry is per file: a LoRA hash (tensor data only) is a different entry
    entries = json.loads(cache.read_text())
    assert set(entries) == {"file:" + str(path.resolve())}


def test_hash_cache_that_is_damaged_or_unwritable_is_ignored(tmp_path, monkeypatch):
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights")
    real = hashlib.sha256(b"weights").hexdigest()
    cache = tmp_path / "hashes.json"
    cache.write_text("{not json")
    monkeypatch.setenv("LDM_HASH_CACHE", str(cache))
    assert file_hash(path) == real
    _forget_hashes_in_process(monkeypatch)
    # a forged entry for another size is not believed
    st = path.stat()
    cache.write_text(json.dumps({"file:" + str(path.resolve()):
                                 {"size": st.st_size + 1, "mtime_ns": st.st_mtime_ns, "sha256": "0" * 64}}))
    assert file_hash(path) == real
    _forget_hashes_in_process(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LDM_HASH_CACHE", str(blocker / "hashes.json"))  # parent is a file
    assert file_hash(path) == real
    monkeypatch.setenv("LDM_HASH_CACHE", "")  # disabled
    _forget_hashes_in_process(monkeypatch)
    assert weights_io.hash_cache_path() is None and file_hash(path) == real


def test_hash_in_background_gives_the_same_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_HASH_CACHE", str(tmp_path / "hashes.json"))
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(3_000_000))
    monkeypatch.setattr(weights_io, "_HASHES", {})
    weights_io.hash_in_background(path)
    keys = [k for k in [*weights_io._PENDING, *weights_io._HASHES] if k[0] == str(path.resolve())]
    assert keys  # started (or already done)
    assert file_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert keys[0] not in weights_io._PENDING and keys[0] in weights_io._HASHES
    weights_io.hash_in_background(tmp_path / "absent.bin")  # errors wait for file_hash
    assert "cannot read" in error_line(file_hash, tmp_path / "absent.bin")


def test_lora_hash_leaves_out_the_header(tmp_path):
    t = torch.arange(4.0)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_safetensors(a, {"t": (t.dtype, (4,))}, lambda _: t, {"note": "one"})
    write_safetensors(b, {"t": (t.dtype, (4,))}, lambda _: t, {"note": "another, longer"})
    assert lora_file_hash(a) == lora_file_hash(b) == hashlib.sha256(t.numpy().tobytes()).hexdigest()[:12]
    other = tmp_path / "c.pt"
    other.write_bytes(b"not safetensors")
    assert lora_file_hash(other) == hashlib.sha256(b"not safetensors").hexdigest()[:12]
