"""Command line of the default-model recipe (``python -m training.default_model``)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ..engine import TrainingError
from .common import CONFIG_PATH, RecipeError, Settings

STAGES = ("vae", "clip", "unet", "assemble", "evaluate", "all")


def _stage_defaults(stage: str) -> dict:
    from . import clip, unet, vae

    return {"vae": vae.DEFAULTS, "clip": clip.DEFAULTS, "unet": unet.DEFAULTS}.get(stage, {})


def _add_run_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    base = Settings(**defaults)
    p.add_argument("--steps", type=int, default=base.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=base.batch_size,
                   help="per-process batch size (default %(default)s)")
    p.add_argument("--lr", type=float, default=base.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=base.warmup, help="warm-up steps (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=base.weight_decay)
    p.add_argument("--save-every", type=int, default=base.save_every,
                   help="checkpoint interval in steps (default %(default)s)")
    p.add_argument("--keep", type=int, default=base.keep, help="checkpoints kept (default %(default)s)")
    p.add_argument("--resume", metavar="latest|DIR", help="continue from a checkpoint")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading processes")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/tiny-shapes"),
                   help="run folder: per-stage checkpoints and outputs (default %(default)s)")
    p.add_argument("--config", type=Path, default=CONFIG_PATH, help="model config (CompVis YAML)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="autocast precision (default: the stage's; bf16 for vae, where CPUs with "
                        "AMX run it 1.8x faster, else no)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.default_model",
        description="Train the tiny-shapes default model from scratch, one stage at a time.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    helps = {"vae": "1. KL autoencoder (f=8, 4 latent channels); PSNR and scale_factor",
             "clip": "2. CLIP-trained text encoder and image tower",
             "unet": "3. UNet on precomputed latents with 10%% empty captions",
             "assemble": "4. write weights/tiny-shapes.safetensors and the config's scale_factor",
             "evaluate": "5. measure a shapes model (default: the shipped one) against its bars",
             "all": "stages 1-4 with their default settings, each in its own process"}
    for stage in STAGES:
        p = sub.add_parser(stage, help=helps[stage], description=helps[stage].replace("%%", "%"))
        _add_common(p)
        if stage in ("vae", "clip", "unet"):
            _add_run_options(p, _stage_defaults(stage))
        if stage == "vae":
            p.add_argument("--kl-weight", type=float, default=1e-6)
            p.add_argument("--edge-weight", type=float, default=0.5)
            p.add_argument("--pyramid-weight", type=float, default=1.0,
                           help="L1 weight at 1/2 and 1/4 resolution: shape outlines over edge "
                                "detail (default %(default)s)")
            p.add_argument("--shape-weight", type=float, default=10.0,
                           help="extra L1 weight on and around the shape (default %(default)s)")
            p.add_argument("--scale-images", type=int, default=2048,
                           help="renders over which the latent std is measured")
        if stage in ("vae", "clip"):
            p.add_argument("--eval-images", type=int, default=512, help="fresh renders for evaluation")
        if stage == "clip":
            p.add_argument("--text-layers", type=int, default=3,
                           help="blocks the text tower is trained with; the config's layers (the "
                                "first ones) condition the UNet (default %(default)s)")
        if stage == "unet":
            p.add_argument("--latents", type=int, default=30000, help="scenes encoded once")
            p.add_argument("--caption-dropout", type=float, default=0.1)
            p.add_argument("--ema-decay", type=float, default=0.999)
        if stage in ("assemble", "all"):
            p.add_argument("--weights-dir", type=Path, default=None,
                           help="where the model files go (default: the project's weights/)")
            p.add_argument("--write-config", type=Path, default=None,
                           help="YAML whose scale_factor is set (default: --config)")
        if stage == "evaluate":
            p.add_argument("--checkpoint", type=Path, default=None,
                           help="model to measure (default: the shipped default model)")
            p.add_argument("--images", type=int, default=200,
                           help="generated images per group (trained combinations: twice this)")
            p.add_argument("--sample-steps", type=int, default=None,
                           help="sampler steps (default: the pipeline's)")
            p.add_argument("--guidance-scale", type=float, default=None)
            p.add_argument("--scheduler", default=None)
            p.add_argument("--no-cli", action="store_true", help="skip timing the ldm command")
    return parser


def _settings(args, stage: str) -> Settings:
    fields = dict(_stage_defaults(stage), out=args.out, config=args.config, seed=args.seed,
                  cpu=args.cpu, quiet=args.quiet)
    if args.mixed_precision is not None:
        fields["mixed_precision"] = args.mixed_precision
    if stage != "assemble":
        fields.update(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      weight_decay=args.weight_decay, save_every=args.save_every, keep=args.keep,
                      resume=args.resume, num_workers=args.num_workers)
    return Settings(**fields)


def _run_all(args) -> None:
    """Each stage in its own process: Accelerate's state (e.g. mixed precision) is per process."""
    shared = ["--out", str(args.out), "--config", str(args.config), "--seed", str(args.seed)]
    shared += ["--cpu"] * args.cpu + ["--quiet"] * args.quiet
    if args.mixed_precision is not None:
        shared += ["--mixed-precision", args.mixed_precision]
    for stage in ("vae", "clip", "unet", "assemble"):
        extra = []
        if stage == "assemble":
            extra += ["--weights-dir", str(args.weights_dir)] if args.weights_dir else []
            extra += ["--write-config", str(args.write_config)] if args.write_config else []
        command = [sys.executable, "-m", "training.default_model", stage, *shared, *extra]
        if subprocess.run(command).returncode != 0:
            raise RecipeError(f"stage '{stage}' failed; fix it and rerun that stage (with --resume "
                              f"latest), then the later ones")


def _run_stage(stage: str, args) -> None:
    if stage == "evaluate":
        return _evaluate(args)
    from . import assemble, clip, unet, vae

    settings = _settings(args, stage)
    if stage == "vae":
        vae.run(settings, vae.VAEOptions(kl_weight=args.kl_weight, edge_weight=args.edge_weight,
                                         pyramid_weight=args.pyramid_weight,
                                         shape_weight=args.shape_weight, eval_images=args.eval_images,
                                         scale_images=args.scale_images))
    elif stage == "clip":
        clip.run(settings, clip.CLIPOptions(eval_images=args.eval_images, text_layers=args.text_layers))
    elif stage == "unet":
        unet.run(settings, unet.UNetOptions(latents=args.latents, caption_dropout=args.caption_dropout,
                                            ema_decay=args.ema_decay))
    else:
        opts = assemble.AssembleOptions(write_config=args.write_config)
        if args.weights_dir is not None:
            opts.weights_dir = args.weights_dir
        assemble.run(settings, opts)


class _EvaluateErrors(Exception):
    """What evaluating a model can raise that is the user's to fix (one line, exit 2)."""


def _evaluate(args) -> None:
    from . import evaluate
    from .common import write_json

    opts = evaluate.EvalOptions(checkpoint=args.checkpoint, images=args.images, seed=args.seed,
                                steps=args.sample_steps, guidance_scale=args.guidance_scale,
                                scheduler=args.scheduler, cli=not args.no_cli)
    out = args.out / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    from ldm.weights_io import CheckpointError
    from pipelines.pipeline import DefaultModelMissing

    try:
        report = evaluate.run(opts, out)
    except (CheckpointError, DefaultModelMissing, FileNotFoundError) as exc:
        raise _EvaluateErrors(str(exc)) from None
    write_json(out / "report.json", report)
    print(evaluate.format_report(report))
    print(f"report: {out / 'report.json'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ldm.config import ConfigError

    start = time.perf_counter()
    try:
        if not args.config.is_file():
            raise RecipeError(f"--config {args.config}: no such file")
        if args.stage == "all":
            _run_all(args)
        else:
            _run_stage(args.stage, args)
    except (TrainingError, ConfigError, _EvaluateErrors) as exc:  # RecipeError is one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # once per distributed run
        print(f"{args.stage}: done in {time.perf_counter() - start:.1f} s wall time")
    return 0
