"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors that stand for a word.

Files are read in the layouts people have them in:

- AUTOMATIC1111 ``.pt``/``.bin`` (``string_to_param: {"*": (n, width)}``, plus ``name``, ``step``...;
  read with ``torch.load(weights_only=True)``) and ``.safetensors`` (``emb_params: (n, width)``);
- diffusers' ``learned_embeds.safetensors``/``.bin`` (one key, the token, holding ``(width,)`` or
  ``(n, width)``);
- SDXL files (``clip_l`` and ``clip_g``), recognised and refused on the one-tower models here.

The word is the file's stem, as in A1111. The vectors replace the word's token rows in the text
encoder's token embedding for the call that encodes it (:func:`overridden`), so nothing is added to
the model's weights.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .weights_io import CheckpointError, file_error

SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(frozen=True)
class TextualInversion:
    name: str  # the prompt word
    vectors: torch.Tensor  # (n, width), float32
    path: Path | None = None

    @property
    def width(self) -> int:
        return int(self.vectors.shape[-1])


def _read(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is one line about the file
        raise file_error(path, f"not a readable embedding ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def vectors_from(data, path: Path) -> torch.Tensor:
    """The (n, width) vectors of one embedding file's contents."""
    if not isinstance(data, dict):
        raise file_error(path, "not an embedding file (expected a dictionary of tensors)")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise file_error(path, "string_to_param must hold one tensor")
        tensor = next(iter(params.values()))
    elif "emb_params" in data:  # A1111 .safetensors
        tensor = data["emb_params"]
    elif any(k in data for k in SDXL_KEYS):
        raise file_error(path, "an SDXL embedding (clip_l/clip_g); this model has one text encoder")
    else:  # diffusers: a single token → tensor
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise file_error(path, f"not an embedding file: expected string_to_param, emb_params or "
                             f"one token tensor, found keys {', '.join(sorted(map(str, data))[:5])}")
        tensor = next(iter(tensors.values()))
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2) or tensor.numel() == 0:
        raise file_error(path, "the embedding's vectors must be a (width,) or (n, width) tensor")
    return tensor.detach().float().reshape(-1, tensor.shape[-1]).clone()


def load_embedding(path, width: int | None = None) -> TextualInversion:
    """One embedding file; ``width`` (the text encoder's) refuses vectors of another width."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "no such file")
    emb = TextualInversion(path.stem, vectors_from(_read(path), path), path)
    if width is not None and emb.width != width:
        raise CheckpointError(f"embedding {emb.name!r} ({path}) has vectors {emb.width} wide; this "
                              f"model's text encoder is {width} wide (made for another model?)")
    return emb


def find_embeddings(folder) -> dict[str, Path]:
    """Prompt word → file for the embedding files in ``folder`` (and its subfolders, as A1111
    reads them); the first of equal stems in sorted order wins."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in SUFFIXES and path.is_file():
                found.setdefault(path.stem, path)
    return found


def save_embedding(path, name: str, vectors: torch.Tensor, step: int | None = None) -> None:
    """Write ``vectors`` as A1111 does: ``.safetensors`` with ``emb_params``, or ``.pt`` with
    ``string_to_param`` (diffusers' ``load_textual_inversion`` reads both)."""
    path = Path(path)
    vectors = vectors.detach().float().cpu().contiguous()
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file({"emb_params": vectors}, str(path), metadata={"name": name, "step": str(step or 0)})
    else:
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name,
                    "step": step or 0}, path)


def token_embedding(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The token-embedding layer of a text encoder (its rows are the vocabulary)."""
    for name, module in text_encoder.named_modules():
        if name.endswith("token_embedding"):
            return module
    raise ValueError("the text encoder has no token_embedding layer")


@contextlib.contextmanager
def overridden(text_encoder: torch.nn.Module, mask: torch.Tensor, vectors: torch.Tensor):
    """Within the block, token positions where ``mask`` (the ids' shape) is true take ``vectors``
    (one row per true position, in row-major order) instead of their ids' rows."""
    layer = token_embedding(text_encoder)
    layer.overrides = (mask, vectors)
    try:
        yield
    finally:
        layer.overrides = None


def lora_embeddings(path) -> list[TextualInversion]:
    """The embeddings that come with a LoRA file: A1111's bundled ones (``bundle_emb.<word>.…``
    keys) and the pivotal-tuning file its header names (``ldm_embedding_file``, beside it, for
    the word ``ldm_embedding_token``); a named file that is missing is an error."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return []
    from safetensors import safe_open

    found: dict[str, dict] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            if key.startswith("bundle_emb."):
                word, _, rest = key[len("bundle_emb."):].partition(".")
                part = found.setdefault(word, {})
                if rest.startswith("string_to_param."):
                    part.setdefault("string_to_param", {})[rest.split(".", 1)[1]] = f.get_tensor(key)
                else:
                    part[rest] = f.get_tensor(key)
    out = [TextualInversion(word, vectors_from(data, path), path) for word, data in found.items()]
    word, name = meta.get("ldm_embedding_token"), meta.get("ldm_embedding_file")
    if word and name:
        file = path.with_name(name)
        if not file.is_file():
            raise file_error(path, f"its embedding for {word!r} should be beside it as {name}, "
                             "but that file is missing")
        out.append(TextualInversion(word, load_embedding(file).vectors, file))
    return out
