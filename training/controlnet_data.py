"""Training data of a ControlNet: target images, hint images and captions, in two layouts.

* folder: ``DIR/name.png`` (any image suffix of :data:`training.data.IMAGE_SUFFIXES`) with its
  caption in ``DIR/name.txt`` and its hint in ``DIR/conditioning/name.<any image suffix>``; only
  images directly in ``DIR`` are targets;
* diffusers (``train_controlnet.py``'s ``--dataset_name`` columns): a ``DIR/metadata.jsonl`` with one
  ``{"image": ..., "conditioning_image": ..., "text": ...}`` per line, paths relative to ``DIR``
  (``file_name`` is accepted for ``image``).

Items are addressed by key as in :mod:`training.data` (``key = epoch · N + i``), and caption dropout
for a key comes from a generator seeded by (seed, key), so resumed and multi-process runs see the
stream an uninterrupted single run would.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .data import IMAGE_SUFFIXES, METADATA, DataError, _listing, key_rng, prepare_image

HINT_FOLDER = "conditioning"


@dataclass(frozen=True)
class ControlExample:
    image: Path
    hint: Path
    caption: str


def _from_metadata(root: Path, meta: Path) -> list[ControlExample]:
    examples, missing = [], []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta}: line {n} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{meta}: line {n} is not a JSON object")
        image = row.get("image", row.get("file_name"))
        for name, value in (("image", image), ("conditioning_image", row.get("conditioning_image")),
                            ("text", row.get("text"))):
            if not isinstance(value, str):
                raise DataError(f"{meta}: line {n} has no \"{name}\" string")
        pair = (root / image, root / row["conditioning_image"])
        missing += [str(p.relative_to(root)) for p in pair if not p.is_file()]
        examples.append(ControlExample(*pair, row["text"].strip()))
    if missing:
        raise DataError(f"{meta}: {len(missing)} listed images do not exist: {_listing(missing)}")
    return examples


def _hint_for(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for s in (suffix, suffix.upper()):
            if (folder / f"{stem}{s}").is_file():
                return folder / f"{stem}{s}"
    return None


def _from_folder(root: Path) -> list[ControlExample]:
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    examples, no_caption, no_hint = [], [], []
    for path in images:
        caption, hint = path.with_suffix(".txt"), _hint_for(root / HINT_FOLDER, path.stem)
        if not caption.is_file():
            no_caption.append(path.name)
        if hint is None:
            no_hint.append(path.name)
        if caption.is_file() and hint is not None:
            try:
                examples.append(ControlExample(path, hint, caption.read_text(encoding="utf-8").strip()))
            except UnicodeDecodeError:
                raise DataError(f"{caption}: caption is not UTF-8 text") from None
    if no_hint:
        raise DataError(f"{root}: {len(no_hint)} images have no hint in {HINT_FOLDER}/ (same name, "
                        f"any image suffix): {_listing(no_hint)}")
    if no_caption:
        raise DataError(f"{root}: {len(no_caption)} images have no caption file (same name, .txt): "
                        f"{_listing(no_caption)}")
    return examples


def scan_control_folder(root, check_images: bool = True) -> list[ControlExample]:
    """The examples of a ControlNet training folder; raises :class:`DataError` naming the files."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"training data {root}: " + ("not a folder" if root.exists() else
                                                      "no such folder"))
    meta = root / METADATA
    examples = _from_metadata(root, meta) if meta.is_file() else _from_folder(root)
    if not examples:
        raise DataError(f"training data {root}: no images in it (looked for images with .txt "
                        f"captions and hints in {HINT_FOLDER}/, or a {METADATA})")
    if check_images:
        from PIL import Image

        bad = []
        for path in (p for ex in examples for p in (ex.image, ex.hint)):
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception:  # PIL raises many kinds for broken files
                bad.append(path.relative_to(root) if path.is_relative_to(root) else path)
        if bad:
            raise DataError(f"training data {root}: {len(bad)} images cannot be read: {_listing(bad)}")
    return examples


class ControlPairs(Dataset):
    """Items ``{"pixels": (3, R, R) in [-1, 1], "hint": (3, H, H) in [0, 1], "caption"}`` by key.
    ``H`` is 8× the latent size (the hint encoder's stride), which is ``R`` for SD's f=8 autoencoder.
    With ``posteriors`` (mean, std per example) items hold those instead of ``pixels``."""

    def __init__(self, examples: list[ControlExample], resolution: int, hint_resolution: int,
                 caption_dropout: float = 0.0, seed: int = 0, posteriors=None):
        self.examples, self.resolution, self.hint_resolution = examples, resolution, hint_resolution
        self.caption_dropout, self.seed, self.posteriors = caption_dropout, seed, posteriors

    def __len__(self) -> int:
        return len(self.examples)

    def dropped(self, key: int) -> bool:
        return self.caption_dropout > 0 and key_rng(self.seed, key).random() < self.caption_dropout

    def hint(self, i: int) -> torch.Tensor:
        return (prepare_image(self.examples[i].hint, self.hint_resolution, None, False) + 1) / 2

    def __getitem__(self, key: int) -> dict:
        i = key % len(self.examples)
        item = {"hint": self.hint(i), "caption": "" if self.dropped(key) else self.examples[i].caption}
        if self.posteriors is None:
            item["pixels"] = prepare_image(self.examples[i].image, self.resolution, None, False)
        else:
            item["mean"], item["std"] = self.posteriors[0][i], self.posteriors[1][i]
        return item


@torch.no_grad()
def encode_all(data: ControlPairs, vae, device, batch_size: int = 32, progress: bool = False):
    """(mean, std) of every example's target image: the autoencoder runs once, not every step."""
    from tqdm.auto import tqdm

    dtype = next(vae.parameters()).dtype
    means, stds = [], []
    for start in tqdm(range(0, len(data), batch_size), desc="caching latents", disable=not progress):
        stop = min(start + batch_size, len(data))
        pixels = torch.stack([prepare_image(data.examples[i].image, data.resolution, None, False)
                              for i in range(start, stop)])
        posterior = vae.encode(pixels.to(device, dtype))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def collate(items: list[dict]) -> dict:
    out = {"caption": [it["caption"] for it in items]}
    for name in ("pixels", "hint", "mean", "std"):
        if name in items[0]:
            out[name] = torch.stack([it[name] for it in items])
    return out
