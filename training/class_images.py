"""DreamBooth's class images (Ruiz et al. 2023, prior preservation): pictures of the concept's class
drawn by the base model itself, trained alongside the user's images with their prompt as caption,
so the LoRA keeps what the base model drew for it. As diffusers' DreamBooth scripts do, the folder
(``--class-data``) is filled up to ``--num-class-images``: images already there are kept and only the
missing ones drawn, each with a fixed seed, so a rerun or a resumed run reuses them.
"""
from __future__ import annotations

from pathlib import Path

CLASS_SEED = 1_000_000  # image i is drawn with seed CLASS_SEED + i


def prompts_from_captions(captions: list[str], token: str, word: str) -> tuple[str, ...]:
    """Class prompts that pair the training images: each distinct caption with the concept word
    ``token`` replaced by the class ``word`` (captions without the token are left out), so the
    class images differ from the training images in the word only, not in colours or layout."""
    import re

    pattern = re.compile(rf"(?<!\w){re.escape(token)}(?!\w)")
    prompts = [pattern.sub(word, c) for c in captions if pattern.search(c)]
    if not prompts:
        raise ValueError(f"--class-word: no training caption holds the word {token!r}")
    return tuple(dict.fromkeys(prompts))


def class_prompt(prompts: tuple[str, ...], i: int) -> str:
    """Image i's prompt: the class prompts in turn."""
    return prompts[i % len(prompts)]


def examples(folder: Path, prompts: tuple[str, ...], count: int, weight: float) -> list:
    """The class images as regularisation examples, their prompts as captions."""
    from training.data import Example

    return [Example(folder / f"class-{i:05d}.png", class_prompt(prompts, i), weight)
            for i in range(count)]


def fill(folder: Path, model, prompts: tuple[str, ...], count: int, device, progress: bool = False,
         sampling: dict | None = None) -> int:
    """Draw the missing class images into ``folder`` with the (still unadapted) base ``model``;
    returns how many were drawn. An image whose caption no longer matches its prompt is redrawn."""
    import torch
    from tqdm.auto import tqdm

    from pipelines.pipeline import Pipeline

    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(count) if not _present(folder, i, class_prompt(prompts, i))]
    if not todo:
        return 0
    pipe = Pipeline(model, device=device, dtype=torch.float32)
    for i in tqdm(todo, desc="drawing class images", disable=not progress):
        prompt = class_prompt(prompts, i)
        image = pipe.txt2img(prompt, seed=CLASS_SEED + i, progress=False, **(sampling or {})).images[0]
        tmp = folder / f".class-{i:05d}.png"
        image.save(tmp)  # written whole, then renamed: never a half image in the folder
        tmp.replace(folder / f"class-{i:05d}.png")
        (folder / f"class-{i:05d}.txt").write_text(prompt + "\n", encoding="utf-8")
    return len(todo)


def _present(folder: Path, i: int, prompt: str) -> bool:
    image, caption = folder / f"class-{i:05d}.png", folder / f"class-{i:05d}.txt"
    return image.is_file() and caption.is_file() and \
        caption.read_text(encoding="utf-8").strip() == prompt.strip()
