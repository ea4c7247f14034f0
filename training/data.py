"""Image-caption folders for fine-tuning, in the two layouts users already have:

* kohya / A1111: ``photo.png`` next to ``photo.txt`` holding its caption (sub-folders are searched);
* diffusers imagefolder: a ``metadata.jsonl`` with one ``{"file_name": ..., "text": ...}`` per line.

kohya's folder names are honoured: images in a sub-folder named ``N_words`` (``10_ring``) are seen
N times per epoch, and those without a caption file take ``words`` as their caption.

Items are addressed by a *key* rather than an index: ``key = epoch · N + i`` is example ``i`` in epoch
``epoch``, and every random choice for it (crop, flip, caption dropout) comes from a generator
seeded by (seed, key). A run resumed at any step, or split across processes, therefore sees exactly
the examples and augmentations an uninterrupted single run would.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"


class DataError(ValueError):
    """A training folder that cannot be used, with the files concerned."""


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    weight: float = 1.0  # loss weight: --prior-loss-weight for regularisation images


def _listing(items, limit: int = 5) -> str:
    items = [str(i) for i in items]
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _from_metadata(root: Path, meta: Path) -> list[Example]:
    examples, missing = [], []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta}: line {n} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DataError(f"{meta}: line {n} has no \"file_name\"")
        text = row.get("text", row.get("caption"))
        if not isinstance(text, str):
            raise DataError(f"{meta}: line {n} ({row['file_name']}) has no \"text\" caption")
        path = root / row["file_name"]
        if not path.is_file():
            missing.append(row["file_name"])
        examples.append(Example(path, text.strip()))
    if missing:
        raise DataError(f"{meta}: {len(missing)} listed images do not exist: {_listing(missing)}")
    return examples


REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: "<repeats>_<class words>"


def kohya_folder(root: Path, path: Path) -> tuple[int, str | None]:
    """(repeats, folder caption) of an image: from the innermost ``N_words`` sub-folder of ``root``
    holding it, else (1, None)."""
    for folder in path.relative_to(root).parents:
        match = REPEATS_FOLDER.match(folder.name) if folder.name else None
        if match:
            return max(int(match.group(1)), 1), match.group(2).strip() or None
    return 1, None


def name_caption(path: Path) -> str:
    """A1111's caption from a file name: the stem without its leading digits and dashes."""
    return re.sub(r"^[-\d]+", "", path.stem).strip()


def _from_caption_files(root: Path, names: bool = False) -> list[Example]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    examples, missing = [], []
    for path in images:
        caption = path.with_suffix(".txt")
        repeats, folder_caption = kohya_folder(root, path)
        if not caption.is_file() and (folder_caption is not None or names):
            examples += [Example(path, folder_caption or name_caption(path))] * repeats
            continue
        if not caption.is_file():
            missing.append(path.relative_to(root))
            continue
        try:
            examples += [Example(path, caption.read_text(encoding="utf-8").strip())] * repeats
        except UnicodeDecodeError:
            raise DataError(f"{caption}: caption is not UTF-8 text") from None
    if missing:
        raise DataError(f"{root}: {len(missing)} images have no caption file (same name, .txt): "
                        f"{_listing(missing)}")
    return examples


def scan_folder(root, check_images: bool = True, names: bool = False) -> list[Example]:
    """The examples of a training folder; raises :class:`DataError` naming what is wrong. With
    ``names``, an image without a caption file is captioned by its file name (A1111)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"training data {root}: no such folder")
    if not root.is_dir():
        raise DataError(f"training data {root}: not a folder")
    meta = root / METADATA
    examples = _from_metadata(root, meta) if meta.is_file() else _from_caption_files(root, names)
    if not examples:
        raise DataError(f"training data {root}: no images in it (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)} with .txt captions, or a {METADATA})")
    if check_images:
        from PIL import Image

        bad = []
        for ex in examples:
            try:
                with Image.open(ex.path) as im:
                    im.verify()
            except Exception:  # PIL raises many kinds for broken files
                bad.append(ex.path.relative_to(root) if ex.path.is_relative_to(root) else ex.path)
        if bad:
            raise DataError(f"training data {root}: {len(bad)} images cannot be read: {_listing(bad)}")
    return examples


# ---------------------------------------------------------------------------------- transforms

def key_rng(seed: int, key: int) -> random.Random:
    """The generator behind every random choice for one item."""
    return random.Random(seed * 1_000_003 + key)


def load_rgb(path: Path):
    from pipelines.images import load_image

    return load_image(path)


def crop_box(width: int, height: int, size: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    """After scaling the short side to ``size``: the square to keep (centre, or random)."""
    if width < height:
        w, h = size, max(size, round(height * size / width))
    else:
        w, h = max(size, round(width * size / height)), size
    x = (w - size) // 2 if rng is None else rng.randint(0, w - size)
    y = (h - size) // 2 if rng is None else rng.randint(0, h - size)
    return w, h, x, y


def prepare_image(path: Path, size: int, rng: random.Random | None, flip: bool) -> torch.Tensor:
    """The crop of ``path`` as float (3, size, size) in [-1, 1], optionally mirrored."""
    from PIL import Image

    from pipelines.preprocess import image_to_tensor

    image = load_rgb(path)
    w, h, x, y = crop_box(*image.size, size, rng)
    if image.size != (w, h):
        image = image.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
    image = image.crop((x, y, x + size, y + size))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image_to_tensor(image, size, size)[0]


# ------------------------------------------------------------------------------------ datasets

@dataclass
class Augment:
    resolution: int
    random_crop: bool = False
    flip: bool = False  # horizontal flip with probability 1/2
    caption_dropout: float = 0.0  # probability of training on the empty caption
    seed: int = 0
    shuffle_caption: bool = False  # kohya: shuffle the comma-separated parts of each caption ...
    keep_tokens: int = 0  # ... but the first N parts, which stay in front
    # A1111's prompt templates: each item's caption is a random line, ``[filewords]`` → its caption
    templates: tuple[str, ...] = ()


FILEWORDS = "[filewords]"  # A1111's template word for the image's own caption


def read_templates(path: Path) -> tuple[str, ...]:
    """The non-empty lines of an A1111 prompt-template file (``textual_inversion_templates/``)."""
    try:
        lines = tuple(ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--template {path}: not a readable text file ({type(exc).__name__})") from None
    lines = tuple(ln for ln in lines if ln)
    if not lines:
        raise DataError(f"--template {path}: no template lines in it")
    return lines


def shuffled_caption(caption: str, keep: int, rng: random.Random) -> str:
    """kohya's ``--shuffle_caption``: the caption's comma-separated parts in random order, the
    first ``keep`` left where they are."""
    parts = [p.strip() for p in caption.split(",") if p.strip()]
    head, tail = parts[:keep], parts[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


class ImageCaptions(Dataset):
    """Items ``{"pixels": (3, R, R) in [-1, 1], "caption": str}`` by key (see module docstring)."""

    def __init__(self, examples: list[Example], augment: Augment):
        self.examples, self.augment = examples, augment

    def __len__(self) -> int:
        return len(self.examples)

    def choices(self, key: int) -> tuple[int, random.Random, bool, bool]:
        """(example index, its crop generator or None, flip, drop the caption)."""
        a = self.augment
        rng = key_rng(a.seed, key)
        flip = a.flip and rng.random() < 0.5
        drop = a.caption_dropout > 0 and rng.random() < a.caption_dropout
        return key % len(self.examples), (rng if a.random_crop else None), flip, drop

    def caption(self, key: int, i: int, drop: bool) -> str:
        """Example ``i``'s caption for ``key``: empty when dropped, shuffled when asked."""
        a = self.augment
        if drop:
            return ""
        caption = self.examples[i].caption
        if a.templates:  # a generator of its own, as below
            line = random.Random(f"template-{a.seed}-{key}").choice(a.templates)
            caption = line.replace(FILEWORDS, caption)
        if a.shuffle_caption:  # a generator of its own: the other choices stay as they were
            caption = shuffled_caption(caption, a.keep_tokens, random.Random(f"caption-{a.seed}-{key}"))
        return caption

    def __getitem__(self, key: int) -> dict:
        i, crop_rng, flip, drop = self.choices(key)
        ex = self.examples[i]
        pixels = prepare_image(ex.path, self.augment.resolution, crop_rng, flip)
        return {"pixels": pixels, "caption": self.caption(key, i, drop), "weight": ex.weight}


class CachedLatents(Dataset):
    """The same items as :class:`ImageCaptions` (centre crops only) with the autoencoder's
    posterior precomputed: ``{"mean", "std", "caption"}``; ``mean``/``std`` hold one row per
    example, and a second block for the mirrored images when flipping is on."""

    def __init__(self, source: ImageCaptions, mean: torch.Tensor, std: torch.Tensor):
        if source.augment.random_crop:
            raise DataError("cached latents need fixed (centre) crops; --random-crop changes the "
                            "crop every epoch")
        self.source, self.mean, self.std = source, mean, std

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int) -> dict:
        i, _, flip, drop = self.source.choices(key)
        row = i + (len(self.source) if flip else 0)
        ex = self.source.examples[i]
        return {"mean": self.mean[row], "std": self.std[row], "caption": self.source.caption(key, i, drop),
                "weight": ex.weight}


@torch.no_grad()
def encode_posteriors(source: ImageCaptions, vae, device, batch_size: int = 8,
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every example's centre crop (then of the mirrored crops when
    flipping is on), unscaled, float32 on the CPU."""
    from tqdm.auto import tqdm

    rows = [(ex.path, False) for ex in source.examples]
    if source.augment.flip:
        rows += [(ex.path, True) for ex in source.examples]
    jobs = list(dict.fromkeys(rows))  # a repeated image (kohya's N_ folders) is encoded once
    dtype = next(vae.parameters()).dtype
    means, stds = [], []
    for start in tqdm(range(0, len(jobs), batch_size), desc="caching latents", disable=not progress):
        pixels = torch.stack([prepare_image(p, source.augment.resolution, None, f)
                              for p, f in jobs[start:start + batch_size]])
        posterior = vae.encode(pixels.to(device, dtype))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    if len(jobs) == len(rows):
        return mean, std
    where = {job: k for k, job in enumerate(jobs)}
    index = torch.tensor([where[r] for r in rows])
    return mean[index], std[index]


def collate(items: list[dict]) -> dict:
    out = {"caption": [it["caption"] for it in items],
           "weight": torch.tensor([float(it.get("weight", 1.0)) for it in items])}
    for name in ("pixels", "mean", "std"):
        if name in items[0]:
            out[name] = torch.stack([it[name] for it in items])
    return out


class KeyBatches(Sampler):
    """Batches of keys for one process of a data-parallel run, from micro-batch ``start`` on.

    Micro-batch ``m`` of process ``p`` takes stream positions ``(m·P + p)·B … +B``. With
    ``shuffle`` the stream visits the examples in a fresh permutation each epoch (seeded by (seed,
    epoch)) and position q is key ``epoch·N + perm[i]``; without it, the key is the position itself
    (datasets that are already a function of the index, as long as the run).
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int,
                 process: int = 0, processes: int = 1, shuffle: bool = True):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.start, self.stop, self.process, self.processes = start, stop, process, processes
        self._perms: dict[int, list[int]] = {}

    def _key(self, position: int) -> int:
        if not self.shuffle:
            return position
        epoch, i = divmod(position, self.size)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=gen).tolist()}
        return epoch * self.size + self._perms[epoch][i]

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self):
        for m in range(self.start, self.stop):
            first = (m * self.processes + self.process) * self.batch_size
            yield [self._key(q) for q in range(first, first + self.batch_size)]
