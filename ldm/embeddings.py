"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors that stand for a word.

Files are read in the layouts people have them in:

- AUTOMATIC1111 ``.pt``/``.bin`` (``string_to_param: {"*": (n, width)}``, plus ``name``, ``step``...;
  read with ``torch.load(weights_only=True)``) and ``.safetensors`` (``emb_params: (n, width)``);
- diffusers' ``learned_embeds.safetensors``/``.bin`` (one key, the token, holding ``(width,)`` or
  ``(n, width)``);
- SDXL files (A1111's layout: ``clip_l`` (n, 768) for the CLIP-L tower and ``clip_g`` (n, 1280)
  for OpenCLIP bigG, safetensors), used on SDXL models only; a one-tower file is refused there.

The word is the file's stem, as in A1111. The vectors replace the word's token rows in the text
encoder's token embedding for the call that encodes it (:func:`overridden`), so nothing is added to
the model's weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .weights_io import CheckpointError, file_error

SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")
# an SDXL text tower's key in the files, by tower kind (A1111's ``textual_inversion_key``)
TOWER_KEYS = {"clip": "clip_l", "openclip": "clip_g"}


@dataclass(frozen=True)
class TextualInversion:
    name: str  # the prompt word
    vectors: torch.Tensor  # (n, width), float32; an SDXL file's: clip_l and clip_g side by side
    path: Path | None = None
    # an SDXL file: each tower's (n, width) vectors by key (clip_l, clip_g); None for one tower
    parts: dict | None = None

    @property
    def width(self) -> int:
        """The vectors' width; an SDXL file's is the towers' summed, as A1111 reports its shape."""
        return int(self.vectors.shape[-1])

    def describe(self) -> str:
        if self.parts is None:
            return f"has one set of vectors, {self.width} wide"
        return "is an SDXL embedding (" + " and ".join(
            f"{k} {v.shape[-1]}" for k, v in self.parts.items()) + " wide)"

    def tower(self, key: str) -> "TextualInversion":
        """The embedding as one tower sees it: its vectors for ``key`` (clip_l or clip_g)."""
        if self.parts is None or key not in self.parts:
            raise CheckpointError(f"embedding {self.name!r} ({self.path}) {self.describe()}; "
                                  f"an SDXL text tower needs {key} vectors")
        return TextualInversion(self.name, self.parts[key], self.path)


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
    else:  # diffusers: a single token → tensor
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise file_error(path, f"not an embedding file: expected string_to_param, emb_params or "
                             f"one token tensor, found keys {', '.join(sorted(map(str, data))[:5])}")
        tensor = next(iter(tensors.values()))
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2) or tensor.numel() == 0:
        raise file_error(path, "the embedding's vectors must be a (width,) or (n, width) tensor")
    return tensor.detach().float().reshape(-1, tensor.shape[-1]).clone()


def sdxl_parts(data, path: Path) -> dict | None:
    """An SDXL file's vectors by tower key (both, the same count), or None for other layouts."""
    if not isinstance(data, dict) or not any(k in data for k in SDXL_KEYS):
        return None
    parts = {k: data.get(k) for k in SDXL_KEYS}
    if not all(isinstance(v, torch.Tensor) and v.dim() == 2 and v.numel() for v in parts.values()):
        raise file_error(path, "an SDXL embedding needs clip_l and clip_g, each an (n, width) tensor")
    if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
        raise file_error(path, f"clip_l has {parts['clip_l'].shape[0]} vectors but clip_g "
                         f"{parts['clip_g'].shape[0]}; an SDXL embedding has the same number for both")
    return {k: v.detach().float().clone() for k, v in parts.items()}


def embedding_from(name: str, data, path: Path) -> TextualInversion:
    """The embedding in one file's contents (any layout above)."""
    parts = sdxl_parts(data, path)
    if parts is not None:
        return TextualInversion(name, torch.cat(list(parts.values()), dim=-1), path, parts)
    return TextualInversion(name, vectors_from(data, path), path)


def check_fits(emb: TextualInversion, width: int | dict) -> None:
    """Refuse an embedding that was not made for the model: ``width`` is a one-tower model's text
    width, or an SDXL model's tower widths by key (``{"clip_l": 768, "clip_g": 1280}``; the
    refiner has only clip_g). A1111 skips such files; here the prompt names them, so it is an error."""
    if isinstance(width, dict):
        fits = emb.parts is not None and all(
            k in emb.parts and emb.parts[k].shape[-1] == w for k, w in width.items())
        model = "this SDXL model's text encoders take " + " and ".join(
            f"{k} {w}" for k, w in width.items()) + " wide vectors"
    else:
        fits = emb.parts is None and emb.width == width
        model = f"this model's text encoder is {width} wide"
    if not fits:
        hint = "made for SDXL?" if emb.parts is not None and not isinstance(width, dict) else \
            "made for SD1/SD2?" if emb.parts is None and isinstance(width, dict) else \
            "made for another model?"
        raise CheckpointError(f"embedding {emb.name!r} ({emb.path}) {emb.describe()}; {model} "
                              f"({hint})")


def load_embedding(path, width: int | dict | None = None) -> TextualInversion:
    """One embedding file; ``width`` (the model's, see :func:`check_fits`) refuses others."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "no such file")
    emb = embedding_from(path.stem, _read(path), path)
    if width is not None:
        check_fits(emb, width)
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
    out = [embedding_from(word, data, path) for word, data in found.items()]
    word, name = meta.get("ldm_embedding_token"), meta.get("ldm_embedding_file")
    if word and name:
        file = path.with_name(name)
        if not file.is_file():
            raise file_error(path, f"its embedding for {word!r} should be beside it as {name}, "
                             "but that file is missing")
        out.append(dataclasses.replace(load_embedding(file), name=word))
    return out
