"""Evaluation of a shapes model (by default the shipped one) against the default model's bars.

Every figure comes from generated pixels read back by :func:`training.shapes.analyze`, with the
pipeline's default sampler settings unless told otherwise:

* txt2img, trained combinations and held-out combinations (:data:`training.shapes.HELD_OUT`):
  accuracy of shape colour, shape, background, and size/position over the prompts that name them;
* autoencoder reconstruction PSNR on fresh renders, and the shape the analyzer reads in them;
* img2img: a rendered scene re-prompted with another shape colour at strength 0.75;
* inpainting: a square hole in a plain background, prompted with a shape; the prompted colour must
  fill part of the hole and every pixel outside it must be unchanged;
* speed: one image after loading, and the whole ``ldm txt2img`` command;
* CLIP score of the generated images with their prompts, when the image tower is installed.
"""
from __future__ import annotations

import dataclasses
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.shapes import COLOURS, HELD_OUT, PALETTE, POSITIONS, SIZES, Caption, analyze, \
    is_held_out, nearest_colour, sample_spec, training_pairs

from .vae import EVAL_SEED_OFFSET

BARS = {"trained": {"colour": 0.97, "shape": 0.95, "background": 0.97, "position": 0.90, "size": 0.90},
        "held_out": {"colour": 0.85, "shape": 0.85, "background": 0.95},
        "img2img": {"new_colour": 0.90, "shape_kept": 0.90},
        "inpaint": {"colour_in_mask": 0.90, "outside_unchanged": 1.0},
        "psnr_db": 30.0, "seconds_per_image": 1.0, "cli_seconds": 10.0}
MENTION_P = 0.5  # chance that a prompt names the size, and (independently) the position
INPAINT_BOX = (16, 16, 48, 48)  # the hole: a 32×32 square in the middle
INPAINT_MIN_PIXELS = 40  # pixels of the prompted colour inside the hole that count as "it appears"


@dataclass
class EvalOptions:
    checkpoint: Path | None = None  # None: the shipped default model
    images: int = 200  # per group (the trained group gets twice as many: its size/position subsets)
    seed: int = 1234
    steps: int | None = None  # None: the pipeline's defaults, as a user gets them
    guidance_scale: float | None = None
    scheduler: str | None = None
    batch: int = 50
    psnr_images: int = 512
    cli: bool = True


def _prompts(rng: random.Random, pairs: list[tuple[str, str]], count: int) -> list[Caption]:
    out = []
    for i in range(count):
        colour, shape = pairs[i % len(pairs)]
        background = rng.choice([c for c in COLOURS if c != colour])
        size = rng.choice(tuple(SIZES)) if rng.random() < MENTION_P else None
        position = rng.choice(tuple(POSITIONS)) if rng.random() < MENTION_P else None
        out.append(Caption(colour, shape, background, size, position))
    return out


def _accuracy(results: list[dict[str, bool]]) -> dict:
    keys = sorted({k for r in results for k in r})
    return {k: {"accuracy": sum(r[k] for r in results if k in r) / sum(k in r for r in results),
                "count": sum(k in r for r in results)} for k in keys}


def _sampling(opts: EvalOptions) -> dict:
    kwargs = {"steps": opts.steps, "guidance_scale": opts.guidance_scale, "scheduler": opts.scheduler}
    out = {"num_inference_steps" if k == "steps" else k: v for k, v in kwargs.items() if v is not None}
    return dict(out, progress=False)


def txt2img_group(pipe, captions: list[Caption], opts: EvalOptions, seed: int, clip=None) -> dict:
    results, scores = [], []
    texts = [c.text for c in captions]
    for start in range(0, len(texts), opts.batch):
        chunk = texts[start:start + opts.batch]
        # one seed per prompt: prompt j of the chunk is image j of a seed + start call
        images = pipe.txt2img(chunk, seed=seed + start, **_sampling(opts)).images
        results += [analyze(im).matches(c) for im, c in zip(images, captions[start:start + opts.batch])]
        if clip is not None:
            scores += clip(images, chunk)
    summary = _accuracy(results)
    if scores:
        summary["clip_score"] = statistics.fmean(scores)
    return summary


def img2img_group(pipe, count: int, opts: EvalOptions, seed: int) -> dict:
    rng = random.Random(seed)
    results = []
    for i in range(count):
        spec = sample_spec(rng, allow_held_out=False)
        colour = rng.choice([c for c in COLOURS if c not in (spec.colour, spec.background)
                             and not is_held_out(c, spec.shape)])
        prompt = Caption(colour, spec.shape, spec.background).text
        image = pipe.img2img(prompt, spec.render(), strength=0.75, seed=seed + i, **_sampling(opts)).images[0]
        found = analyze(image)
        results.append({"new_colour": found.colour == colour, "shape_kept": found.shape == spec.shape})
    return _accuracy(results)


def inpaint_group(pipe, count: int, opts: EvalOptions, seed: int) -> dict:
    rng = random.Random(seed)
    x0, y0, x1, y1 = INPAINT_BOX
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, INPAINT_BOX)
    hole = np.asarray(mask) > 0
    results = []
    for i in range(count):
        colour, shape = rng.choice(training_pairs())
        background = rng.choice([c for c in COLOURS if c != colour])
        plain = Image.new("RGB", (64, 64), PALETTE[background])
        prompt = Caption(colour, shape, background, "small", "in the center").text
        image = pipe.inpaint(prompt, plain, mask, seed=seed + i, **_sampling(opts)).images[0]
        arr, before = np.asarray(image), np.asarray(plain)
        inside = arr[y0:y1, x0:x1].reshape(-1, 3)
        hits = sum(nearest_colour(px) == colour for px in inside)
        results.append({"colour_in_mask": hits >= INPAINT_MIN_PIXELS,
                        "outside_unchanged": bool((arr[~hole] == before[~hole]).all())})
    return _accuracy(results)


def _autoencoder(pipe, count: int, seed: int) -> tuple[float, dict]:
    """Reconstruction PSNR, and the analyzer's shape accuracy on the reconstructions (a blunt
    corner turns a triangle into a circle while barely moving the PSNR)."""
    import copy

    import torch

    from .vae import reconstruction_figures

    vae = copy.deepcopy(pipe.model.first_stage_model).to("cpu", torch.float32)
    figures = reconstruction_figures(vae, count, seed)
    return figures.pop("psnr_db"), figures


def _seconds_per_image(pipe, opts: EvalOptions, repeats: int = 5) -> float:
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        pipe.txt2img("a red circle on a blue background", seed=i, **_sampling(opts))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first call warms caches


def _cli_seconds(opts: EvalOptions, out_dir: Path) -> float:
    command = [sys.executable, "-m", "cli", "txt2img", "a red circle on a blue background",
               "-o", str(out_dir / "cli.png"), "--seed", "0"]
    if opts.checkpoint is not None:
        command += ["--checkpoint", str(opts.checkpoint)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"ldm txt2img failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def _clip_scorer(pipe):
    from ldm.resources import shipped_file

    path = shipped_file("weights", "tiny-shapes-clip-image.safetensors")
    if not path.is_file():
        return None
    import copy

    import torch

    from pipelines.preprocess import image_to_tensor

    from .clip import clip_score, load_clip

    text = copy.deepcopy(pipe.model.cond_stage_model).to("cpu", torch.float32)
    model = load_clip(text, path)

    def score(images, captions):
        batch = torch.stack([image_to_tensor(im, im.height, im.width)[0] for im in images])
        return clip_score(model, batch, captions).tolist()

    return score


def run(opts: EvalOptions, out_dir: Path) -> dict:
    from pipelines.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(opts.checkpoint, device="cpu")
    rng = random.Random(opts.seed)
    trained_pairs = training_pairs()
    rng.shuffle(trained_pairs)
    clip = _clip_scorer(pipe)
    used = pipe.sampling_settings(opts.steps, opts.guidance_scale, opts.scheduler)
    report = {"checkpoint": str(pipe.model_path), "bars": BARS, "sampling": dataclasses.asdict(used)}
    report["trained"] = txt2img_group(pipe, _prompts(rng, trained_pairs, 2 * opts.images), opts,
                                      opts.seed, clip)
    report["held_out"] = txt2img_group(pipe, _prompts(rng, sorted(HELD_OUT), opts.images), opts,
                                       opts.seed + 100_000, clip)
    report["img2img"] = img2img_group(pipe, opts.images, opts, opts.seed + 200_000)
    report["inpaint"] = inpaint_group(pipe, opts.images, opts, opts.seed + 300_000)
    report["psnr_db"], report["reconstruction_shapes"] = _autoencoder(
        pipe, opts.psnr_images, opts.seed + EVAL_SEED_OFFSET)
    report["seconds_per_image"] = _seconds_per_image(pipe, opts)
    if opts.cli:
        report["cli_seconds"] = _cli_seconds(opts, out_dir)
    report["passed"] = passed(report)
    return report


def passed(report: dict) -> dict[str, bool]:
    """Each bar: met or not (absent figures are not judged)."""
    out = {}
    for group in ("trained", "held_out", "img2img", "inpaint"):
        for key, bar in BARS[group].items():
            if key in report.get(group, {}):
                out[f"{group}.{key}"] = report[group][key]["accuracy"] >= bar
    for key in ("psnr_db",):
        if key in report:
            out[key] = report[key] >= BARS[key]
    for key in ("seconds_per_image", "cli_seconds"):
        if key in report:
            out[key] = report[key] <= BARS[key]
    return out


def format_report(report: dict) -> str:
    lines = [f"model: {report['checkpoint']}"]
    if "sampling" in report:
        lines.append("sampling: " + ", ".join(f"{k} {v}" for k, v in report["sampling"].items()))
    for group in ("trained", "held_out", "img2img", "inpaint"):
        if group not in report:
            continue
        parts = [f"{k} {v['accuracy']:.1%} (n={v['count']})" for k, v in report[group].items()
                 if isinstance(v, dict)]
        if "clip_score" in report[group]:
            parts.append(f"CLIP score {report[group]['clip_score']:.1f}")
        lines.append(f"{group}: " + ", ".join(parts))
    for key, unit in (("psnr_db", "dB"), ("seconds_per_image", "s"), ("cli_seconds", "s")):
        if key in report:
            lines.append(f"{key}: {report[key]:.2f} {unit}")
    if "reconstruction_shapes" in report:
        lines.append("autoencoder shape kept: " + ", ".join(
            f"{k.removeprefix('shape_')} {v:.1%}" for k, v in report["reconstruction_shapes"].items()))
    failed = [k for k, ok in report["passed"].items() if not ok]
    lines.append("all bars met" if not failed else "below the bar: " + ", ".join(failed))
    return "\n".join(lines)
