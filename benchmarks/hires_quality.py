"""Does a 2× hires-fix pass keep what the first pass drew? The shipped default model, prompts of
its trained colour/shape pairs, one seed per prompt; each 128² result is box-filtered back to 64²
and read by the shapes analyzer, then compared with the analysis of the first pass (the same seed
without hires) and with the prompt.

    python -m benchmarks.hires_quality --count 200 --seed 5000      # report
    python -m benchmarks.hires_quality --count 50 --seed 0          # the draws settings were tried on
"""
from __future__ import annotations

import argparse
import json
import random

from PIL import Image


def captions(count: int, seed: int) -> list:
    from training.shapes.captions import Caption
    from training.shapes.world import COLOURS, HELD_OUT, SHAPES

    rng = random.Random(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]
    out = []
    for _ in range(count):
        colour, shape = rng.choice(pairs)
        background = rng.choice([c for c in COLOURS if c != colour])
        out.append(Caption(colour, shape, background, None, None))
    return out


def measure(count: int, seed: int, upscaler: str = "Latent", strength: float = 0.7,
            batch: int = 25) -> dict:
    from pipelines.hires import HiresFix
    from pipelines.pipeline import Pipeline
    from training.shapes.analyze import analyze

    pipe = Pipeline.from_checkpoint()
    hires = HiresFix(scale=2.0, upscaler=upscaler, denoising_strength=strength)
    caps = captions(count, seed)
    kept = {"shape": 0, "colour": 0, "background": 0}
    prompt_ok = {"shape": 0, "colour": 0, "background": 0}
    base_ok = dict(prompt_ok)
    for start in range(0, count, batch):
        chunk = caps[start:start + batch]
        texts = [c.text for c in chunk]
        base = pipe.txt2img(texts, seed=seed + start, progress=False).images
        high = pipe.txt2img(texts, seed=seed + start, hires=hires, progress=False).images
        for cap, lo, hi in zip(chunk, base, high):
            a, b = analyze(lo), analyze(hi.resize(lo.size, Image.BOX))
            for key in kept:
                kept[key] += getattr(a, key) == getattr(b, key)
                prompt_ok[key] += b.matches(cap)[key]
                base_ok[key] += a.matches(cap)[key]
    rate = lambda d: {k: v / count for k, v in d.items()}  # noqa: E731
    return {"count": count, "seed": seed, "upscaler": upscaler, "denoising_strength": strength,
            "kept_from_first_pass": rate(kept), "hires_matches_prompt": rate(prompt_ok),
            "first_pass_matches_prompt": rate(base_ok)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=5000)
    p.add_argument("--upscaler", default="Latent")
    p.add_argument("--strength", type=float, default=0.7)
    args = p.parse_args(argv)
    report = measure(args.count, args.seed, args.upscaler, args.strength)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
