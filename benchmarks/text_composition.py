"""How well each block of the default model's CLIP text tower keeps a caption's shape word apart from
its colour word, for colour–shape pairs the tower never saw together.

    python -m benchmarks.text_composition [--train 3000] [--held-out 400] [--json PATH]

The shipped model conditions on the first block of the 3-block tower its recipe trains; the other
two blocks travel in ``weights/tiny-shapes-clip-image.safetensors`` (for CLIP scores), so the whole
tower is rebuilt here. For the output after each block (with the final layer norm, as the model
reads it), a linear classifier of the shape is fitted on the end-of-text states of training
captions and tested on captions of the held-out pairs (:data:`training.shapes.HELD_OUT`). A block
whose held-out accuracy is low maps e.g. "orange circle" onto the shapes orange was seen with, and a
UNet conditioned on it draws those instead.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch


def end_of_text_states(encoder, captions: list[str], clip_skip: int) -> torch.Tensor:
    from ldm.modules.tokenizer import EOT, tokenize

    tokens = tokenize(encoder.config, captions)
    with torch.no_grad():
        hidden = encoder(tokens, clip_skip=clip_skip).float()
    return hidden[torch.arange(len(tokens)), (tokens == EOT).int().argmax(1)]


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    return head


def run(train: int = 3000, held_out: int = 400, seed: int = 0) -> dict:
    from ldm.resources import shipped_file
    from pipelines.pipeline import Pipeline
    from training.shapes import COLOURS, HELD_OUT, SHAPES, Caption, training_example
    from training.default_model.clip import load_clip

    pipe = Pipeline.from_checkpoint(None, device="cpu", dtype=torch.float32)
    image_tower = shipped_file("weights", "tiny-shapes-clip-image.safetensors")
    tower = load_clip(pipe.model.cond_stage_model, image_tower).text
    shapes = list(SHAPES)
    examples = [training_example(seed + i) for i in range(train)]
    train_captions = [caption for _, caption in examples]
    train_y = torch.tensor([shapes.index(spec.shape) for spec, _ in examples])
    rng = random.Random(seed)
    pairs = sorted(HELD_OUT)
    test = [Caption(c, s, rng.choice([b for b in COLOURS if b != c]))
            for c, s in (pairs[i % len(pairs)] for i in range(held_out))]
    test_y = torch.tensor([shapes.index(c.shape) for c in test])
    blocks = tower.config.layers
    report = {"blocks": blocks, "conditioning_blocks": pipe.model.cond_stage_model.config.layers}
    for depth in range(1, blocks + 1):
        x_train = end_of_text_states(tower, train_captions, blocks - depth)
        x_test = end_of_text_states(tower, [c.text for c in test], blocks - depth)
        mean, std = x_train.mean(0), x_train.std(0) + 1e-5
        head = fit_linear((x_train - mean) / std, train_y, len(shapes))
        right = (head((x_test - mean) / std).argmax(1) == test_y).tolist()
        per_pair = {f"{c} {s}": sum(r for r, t in zip(right, test) if (t.colour, t.shape) == (c, s))
                    / sum((t.colour, t.shape) == (c, s) for t in test) for c, s in pairs}
        report[f"after_block_{depth}"] = {"held_out": sum(right) / len(right), **per_pair}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=3000, help="training captions for the classifier")
    parser.add_argument("--held-out", type=int, default=400, help="held-out captions tested")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = run(args.train, args.held_out)
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}: " + ", ".join(f"{k} {v:.1%}" for k, v in value.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
