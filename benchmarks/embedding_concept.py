"""Concept benchmark for textual inversion: teach the shipped default model a new word, ``sqz``, for
"square" with ``ldm train-embedding`` on the CPU, and measure what a user would see.

    python -m benchmarks.embedding_concept [--images 40] [--vectors 2] [--init-word shape]
                                           [--steps 400] [--learning-rate 5e-3] [--batch-size 8]
                                           [--samples 104] [--eval-seed 90000] [--seed 0]
                                           [--workdir /tmp/ldm-embedding-concept]
                                           [--json benchmarks/out/embedding_concept.json]

1. Data: ``--images`` squares rendered by ``training.shapes`` (any size and position) in six colours
   on random backgrounds, captioned ``a <colour> sqz on a <colour> background``; purple and orange
   squares are left out, to measure colours the word never saw.
2. Before: the square share for the evaluation prompts with the base model alone (``sqz`` is two
   BPE pieces, ``sq`` + ``z``, that the tiny model's captions never used), and with the embedding
   at its initial vectors (the init word ``shape``: not the answer).
3. Training: ``ldm train-embedding --token sqz --init-word shape`` (only the word's vectors train).
4. After: ``--samples`` prompts ``a <colour> sqz on a <colour> background`` over all eight colours
   (equal shares), image i with seed ``--eval-seed`` + i, the embedding loaded from its file as a
   user would (``Pipeline.load_embedding``); the analyzer reads the shape back. Printed: the mean
   square share and the worst colour's (bar: mean ≥ 90 %), per colour, and the training seconds.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "sqz"
TRAIN_COLOURS = ("red", "green", "blue", "yellow", "white", "black")
UNSEEN_COLOURS = ("purple", "orange")


def make_data(folder: Path, count: int, seed: int) -> None:
    from training.shapes import sample_spec

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(count):
        spec = sample_spec(rng, colour=TRAIN_COLOURS[i % len(TRAIN_COLOURS)], shape="square")
        spec.render().save(folder / f"sq-{i:03d}.png")
        (folder / f"sq-{i:03d}.txt").write_text(f"a {spec.colour} {TOKEN} on a {spec.background} "
                                                "background\n")


def prompts(count: int, seed: int) -> list[str]:
    """``count`` prompts cycling through all eight colours, random other-colour backgrounds."""
    from training.shapes import COLOURS

    rng = random.Random(seed)
    out = []
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        background = rng.choice([c for c in COLOURS if c != colour])
        out.append(f"a {colour} {TOKEN} on a {background} background")
    return out


def square_shares(pipe, texts: list[str], seed: int) -> dict[str, float]:
    """Share of squares per prompt colour, and ``mean`` over all images."""
    from training.shapes import analyze

    hits: dict[str, list[bool]] = {}
    for i, text in enumerate(texts):
        image = pipe.txt2img(text, seed=seed + i, progress=False).images[0]
        hits.setdefault(text.split()[1], []).append(analyze(image).shape == "square")
    out = {c: sum(h) / len(h) for c, h in hits.items()}
    out["mean"] = sum(sum(h) for h in hits.values()) / len(texts)
    return out


def summary(shares: dict[str, float]) -> dict:
    per_colour = {k: v for k, v in shares.items() if k != "mean"}
    worst = min(per_colour, key=per_colour.get)
    return {"mean": round(shares["mean"], 4), "worst": round(per_colour[worst], 4),
            "worst_colour": worst, "unseen_colours": round(
                sum(per_colour[c] for c in UNSEEN_COLOURS) / len(UNSEEN_COLOURS), 4),
            "per_colour": {k: round(v, 4) for k, v in per_colour.items()}}


def run(args) -> dict:
    import torch

    from cli.train_embedding import run as train_embedding
    from ldm.embeddings import TextualInversion, token_embedding
    from ldm.modules.tokenizer import tokenizer_for
    from pipelines.pipeline import Pipeline
    from training.embedding import init_vectors

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    data, out = work / "squares", work / f"{TOKEN}.safetensors"
    make_data(data, args.images, args.seed)
    pipe = Pipeline.from_checkpoint(device="cpu")
    texts = prompts(args.samples, args.eval_seed)
    text = pipe.model.cond_stage_model
    figures: dict = {}
    if not args.skip_before:
        figures["before_base_model"] = summary(square_shares(pipe, texts, args.eval_seed))
        print("before, base model:", figures["before_base_model"], flush=True)
        start = init_vectors(text, tokenizer_for(pipe.model.config.text), args.init_word, args.vectors)
        pipe.embeddings[TOKEN] = TextualInversion(TOKEN, start)
        figures["before_init_vectors"] = summary(square_shares(pipe, texts, args.eval_seed))
        print("before, initial vectors:", figures["before_init_vectors"], flush=True)
        del pipe.embeddings[TOKEN]

    shutil.rmtree(work / f"{TOKEN}-checkpoints", ignore_errors=True)
    argv = ["--data", str(data), "--token", TOKEN, "--init-word", args.init_word,
            "--vectors", str(args.vectors), "--output", str(out), "--max-steps", str(args.steps),
            "--learning-rate", str(args.learning_rate), "--batch-size", str(args.batch_size),
            "--cache-latents", "--flip", "--checkpointing-steps", "100000", "--seed", str(args.seed),
            "-q"]
    started = time.perf_counter()
    train_embedding(argv)
    figures["training_seconds"] = round(time.perf_counter() - started, 1)
    figures["training"] = " ".join(argv)
    print(f"trained in {figures['training_seconds']} s", flush=True)

    before = token_embedding(text).weight.detach().clone()
    assert pipe.load_embedding(out) == TOKEN
    figures["after"] = summary(square_shares(pipe, texts, args.eval_seed))
    figures["base_weights_untouched"] = bool(torch.equal(before, token_embedding(text).weight))
    figures.update(images=args.images, samples=args.samples, eval_seed=args.eval_seed)
    figures["passed"] = figures["after"]["mean"] >= 0.9
    return figures


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=40, help="training images (default 40)")
    p.add_argument("--vectors", type=int, default=2, help="vectors per token (default 2)")
    p.add_argument("--init-word", default="shape", help="init word (default: shape)")
    p.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    p.add_argument("--learning-rate", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=104, help="evaluation images (default 104)")
    p.add_argument("--eval-seed", type=int, default=90000,
                   help="seed of the evaluation prompts and images (default 90000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training run")
    p.add_argument("--skip-before", action="store_true", help="measure only after training")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy 2-core machine more threads spin)")
    p.add_argument("--workdir", default="/tmp/ldm-embedding-concept")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "embedding_concept.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    figures = run(args)
    for key, value in figures.items():
        print(f"{key}: {value}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
