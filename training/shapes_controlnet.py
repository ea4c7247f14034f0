"""Recipe of the shipped canny ControlNet of the default model (``weights/tiny-shapes-canny.safetensors``).

    python -m training.shapes_controlnet data       # render the training folder (folder layout)
    python -m training.shapes_controlnet train      # ldm train-controlnet on it (resumable)
    python -m training.shapes_controlnet evaluate   # IoU of generated vs hinted shapes, colours
    python -m training.shapes_controlnet all        # the three, then copies the file to weights/

Scenes: one filled shape of the shapes world at a random centre and a random size of 12–48 px
(sizes and positions the captions do not name, so only the hint can tell them), colours and
backgrounds from the world, captions ``a <colour> <shape> on a <colour> background``. The world's
held-out colour/shape pairs never appear in the training data; evaluation reports them apart. The
hint is the canny edge map (thresholds 100/200) of the rendered scene, made by
:func:`pipelines.annotators.run`, the preprocessor users run.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

from .shapes.captions import Caption
from .shapes.scenes import ShapeSpec
from .shapes.world import BORDER, COLOURS, IMAGE_SIZE, SIZE_SPLIT, SHAPES, is_held_out, training_pairs

SIDES = (12, 48)  # bounding-box sides of the scenes, in pixels of a 64×64 image
CANNY = {"low_threshold": 100, "high_threshold": 200}
RUN = Path("runs/tiny-shapes-canny")
SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "tiny-shapes-canny.safetensors"
TRAIN_SEED, TUNE_SEED, REPORT_SEED = 0, 10_000_000, 20_000_000  # disjoint scene seed ranges


class FreeSpec(ShapeSpec):
    """A scene whose side may be anywhere in :data:`SIDES` (the world's ``small``/``large`` bands
    leave gaps); ``size`` and ``position`` hold the words the analyzer would read for it."""

    def __post_init__(self):
        Caption(self.colour, self.shape, self.background)  # validates the words


def free_scene(rng: random.Random, pair: tuple[str, str] | None = None,
               held_out: bool = False) -> FreeSpec:
    """A random scene: a training colour/shape pair (or ``pair``, or with ``held_out`` a held-out
    one), another colour as background, side and centre uniform so that the shape fits."""
    if pair is None:
        pairs = [(c, s) for c in COLOURS for s in SHAPES if is_held_out(c, s)] if held_out \
            else training_pairs()
        pair = rng.choice(pairs)
    colour, shape = pair
    background = rng.choice([c for c in COLOURS if c != colour])
    side = rng.randint(*SIDES)
    reach = IMAGE_SIZE / 2 - side / 2 - BORDER
    dx, dy = (round(rng.uniform(-reach, reach) * 4) / 4 for _ in range(2))
    return FreeSpec(colour, shape, background, "small" if side < SIZE_SPLIT else "large",
                    "in the center", side, dx, dy)


def caption(spec: ShapeSpec) -> str:
    return Caption(spec.colour, spec.shape, spec.background).text


def canny_hint(image):
    from pipelines.annotators import run

    return run("canny", image, **CANNY)


# ------------------------------------------------------------------------------------------ data

def write_data(folder: Path, count: int, seed: int = TRAIN_SEED) -> Path:
    """``count`` scenes in the trainer's folder layout: name.png, name.txt, conditioning/name.png."""
    hints = folder / "conditioning"
    hints.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = f"{i:06d}"
        if (hints / f"{name}.png").is_file():
            continue  # written by an earlier, interrupted call
        spec = free_scene(random.Random(seed + i))
        image = spec.render()
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption(spec))
        canny_hint(image).save(hints / f"{name}.png")  # last: marks the example complete
    return folder


# ------------------------------------------------------------------------------------- training

def train_settings(args):
    from .controlnet import ControlNetSettings

    return ControlNetSettings(
        data=args.out / "data", output=args.out / "tiny-shapes-canny.safetensors",
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler="constant_with_warmup",
        lr_warmup_steps=min(100, args.steps // 10), batch_size=args.batch_size, seed=args.seed,
        caption_dropout=args.caption_dropout, cache_latents=True,
        latents_file=args.out / "latents.safetensors", checkpointing_steps=args.save_every,
        checkpoints_total_limit=2, resume="latest" if args.resume else None, save_precision="fp16",
        mixed_precision=args.mixed_precision, cpu=True, quiet=args.quiet)


def export_state(state: Path, dest: Path) -> Path:
    """The ControlNet of a training state folder (``step-NNNNNN``) as a fp16 ControlNet file, to
    measure a run while it trains."""
    import torch
    from safetensors.torch import load_file

    from ldm.checkpoint import embedded_config
    from ldm.config import load_config
    from ldm.controlnet_config import ControlNetConfig
    from ldm.modules.controlnet import ControlNet
    from pipelines.pipeline import default_model

    from .controlnet import save_controlnet

    path, config = default_model()
    cfg = load_config(config) if config else embedded_config(path)
    net = ControlNet(ControlNetConfig.from_unet(cfg.unet))
    weights = load_file(str(state / "model.safetensors"))
    net.load_state_dict({k.removeprefix("controlnet."): v for k, v in weights.items()}, strict=True)
    save_controlnet(net, dest, cfg, dtype=torch.float16, metadata={"state": state.name})
    return dest


# ------------------------------------------------------------------------------------ evaluation

def iou(a, b) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def _stats(values: list[float]) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {"n": int(v.size), "mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
            "p10": round(float(np.percentile(v, 10)), 4), "worst": round(float(v.min()), 4),
            "share_iou_ge_0.6": round(float((v >= 0.6).mean()), 4)}


def _rate(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else float("nan")


def evaluate(path: Path, count: int, held_out: int, seed: int, out: Path, steps: int | None = None,
             weight: float = 1.0, threads: int | None = None) -> dict:
    """Generate ``count`` trained-pair and ``held_out`` held-out-pair scenes from their canny hints
    (scene ``i`` from ``random.Random(seed + i)``, sampling seed ``seed + i``) and compare each
    with its hint's scene: IoU of the shape masks, colour and background by the analyzer."""
    import torch
    from PIL import Image

    from ldm.controlnet_loading import load_controlnet
    from pipelines.control import ControlUnit
    from pipelines.pipeline import Pipeline

    from .shapes.analyze import analyze, shape_mask

    if threads:
        torch.set_num_threads(threads)
    pipe = Pipeline.from_checkpoint()
    net = load_controlnet(path, base=pipe.model.config)
    groups: dict[str, dict] = {}
    started = time.perf_counter()
    for group, n, offset in (("trained", count, 0), ("held_out", held_out, 1_000_000)):
        ious, colour, background, worst = [], [], [], []
        for i in range(n):
            s = seed + offset + i
            spec = free_scene(random.Random(s), held_out=group == "held_out")
            scene = spec.render()
            unit = ControlUnit(model=net, image=canny_hint(scene), weight=weight)
            image = pipe.txt2img(caption(spec), control=[unit], seed=s, num_inference_steps=steps,
                                 progress=False).images[0]
            found = analyze(image)
            if i < 8:  # a few (hint, render, generated) triples to look at
                samples = out.parent / "samples"
                samples.mkdir(parents=True, exist_ok=True)
                strip = Image.new("RGB", (3 * scene.width, scene.height))
                for j, im in enumerate((unit.image, scene, image)):
                    strip.paste(im, (j * scene.width, 0))
                strip.save(samples / f"{group}-{s}.png")
            ious.append(iou(shape_mask(image), shape_mask(scene)))
            colour.append(found.colour == spec.colour)
            background.append(found.background == spec.background)
            worst.append((ious[-1], s, caption(spec), spec.side))
        groups[group] = {"iou": _stats(ious), "colour": _rate(colour), "background": _rate(background),
                         "worst": [{"iou": round(v, 3), "seed": s, "prompt": p, "side": side}
                                   for v, s, p, side in sorted(worst)[:5]]}
    report = {"file": str(path), "seed": seed, "steps": steps, "weight": weight, **groups,
              "seconds": round(time.perf_counter() - started, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


# ------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.shapes_controlnet",
                                description="Train and measure the canny ControlNet of tiny-shapes.")
    sub = p.add_subparsers(dest="stage", required=True)
    for name in ("data", "train", "evaluate", "all", "export"):
        s = sub.add_parser(name)
        s.add_argument("--out", type=Path, default=RUN, help="run folder (default %(default)s)")
        s.add_argument("--examples", type=int, default=20000, help="rendered training scenes")
        s.add_argument("--steps", type=int, default=2000)
        s.add_argument("--batch-size", type=int, default=32)
        s.add_argument("--lr", type=float, default=2e-4)
        s.add_argument("--caption-dropout", type=float, default=0.5)
        s.add_argument("--mixed-precision", choices=("no", "bf16"), default="bf16",
                       help="bf16: the frozen UNet in bfloat16 (1.75x faster on this AMX CPU)")
        s.add_argument("--save-every", type=int, default=100)
        s.add_argument("--resume", action="store_true", help="continue the run in --out")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--quiet", action="store_true")
        s.add_argument("--file", type=Path, help="evaluate: the ControlNet (default: the shipped "
                       "one); export: the file to write")
        s.add_argument("--state", type=Path, help="export: a training state folder")
        s.add_argument("--count", type=int, default=200, help="evaluate: trained-pair samples")
        s.add_argument("--held-out", type=int, default=100, help="evaluate: held-out-pair samples")
        s.add_argument("--eval-seed", type=int, default=REPORT_SEED,
                       help=f"evaluate: first scene seed ({TUNE_SEED} for tuning)")
        s.add_argument("--sample-steps", type=int, help="evaluate: sampling steps (default: the model's)")
        s.add_argument("--weight", type=float, default=1.0, help="evaluate: control weight")
        s.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1: on a shared 2-core machine two threads "
                            "stalled each other, 5.7 s/step against 1.0 s/step with one)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.stage == "export":
        print(export_state(args.state, args.file))
        return 0
    if args.stage in ("data", "all"):
        write_data(args.out / "data", args.examples, TRAIN_SEED + args.seed * 1_000_000)
    if args.stage in ("train", "all"):
        from .controlnet import train

        started = time.perf_counter()
        summary = train(train_settings(args))
        (args.out / "train-time.json").write_text(json.dumps(
            {"steps": summary.step, "seconds_this_run": round(time.perf_counter() - started, 1)}))
    if args.stage == "all":
        SHIPPED.parent.mkdir(exist_ok=True)
        shutil.copyfile(args.out / "tiny-shapes-canny.safetensors", SHIPPED)
    if args.stage in ("evaluate", "all"):
        path = args.file or SHIPPED
        report = evaluate(path, args.count, args.held_out, args.eval_seed,
                          args.out / "evaluate" / f"report-{args.eval_seed}.json", args.sample_steps,
                          args.weight)
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
