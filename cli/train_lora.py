"""``ldm train-lora``: fine-tune a LoRA on a folder of captioned images, through Accelerate.

Runs as ``ldm train-lora ...``, ``python -m training.lora ...`` or, for several processes or GPUs,
``accelerate launch [--num_processes N] -m training.lora ...``. Errors end as one ``error:`` line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.cli_args import Parser, UsageError

PRESETS = ("attention", "ff", "proj", "conv", "text-attention", "text-mlp")


def _number(kind, low=None, high=None, strict_low=False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if value != value or (low is not None and (value <= low if strict_low else value < low)) \
                or (high is not None and value > high):
            span = (f"greater than {low:g}" if strict_low else f"at least {low:g}") if high is None \
                else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value
    return parse


def build_parser(prog: str = "ldm train-lora") -> Parser:
    p = Parser(prog=prog, description="Fine-tune a LoRA on a folder of images with captions "
               "(name.png + name.txt, or a diffusers metadata.jsonl) and write it as a kohya-format "
               ".safetensors file that diffusers, A1111 and ComfyUI load.")
    p.add_argument("--data", required=True, metavar="DIR", help="training images and captions")
    p.add_argument("--output", required=True, metavar="FILE.safetensors", help="the LoRA file to write")
    m = p.add_argument_group("base model")
    m.add_argument("--checkpoint", metavar="PATH",
                   help="single-file checkpoint or diffusers folder (default: the shipped model)")
    m.add_argument("--config", metavar="YAML", help="CompVis inference YAML (default: detected)")
    a = p.add_argument_group("adapter")
    a.add_argument("--rank", type=_number(int, 1), default=4, metavar="R", help="LoRA rank (default: 4)")
    a.add_argument("--alpha", type=_number(float, 0, strict_low=True), metavar="A",
                   help="LoRA alpha; the update is scaled by alpha/rank (default: the rank)")
    a.add_argument("--targets", nargs="+", default=["attention"], metavar="T",
                   help="layers to adapt: presets attention (to_q/k/v/out), ff, proj, conv "
                        "(resnet convolutions, LoCon), text-attention, text-mlp, or layer names "
                        "as diffusers spells them (default: attention)")
    a.add_argument("--train-text-encoder", action="store_true",
                   help="adapt the text encoder too (text-attention unless --targets names text layers)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=_number(int, 1), default=1000, metavar="N",
                   help="optimizer steps (default: 1000)")
    o.add_argument("--learning-rate", type=_number(float, 0, strict_low=True), default=1e-4,
                   metavar="LR", help="AdamW learning rate (default: 1e-4)")
    o.add_argument("--lr-scheduler", default="constant",
                   choices=("constant", "constant_with_warmup", "linear", "cosine"),
                   help="learning-rate schedule (default: constant)")
    o.add_argument("--lr-warmup-steps", type=_number(int, 0), default=0, metavar="N")
    o.add_argument("--weight-decay", type=_number(float, 0), default=1e-2, metavar="W")
    o.add_argument("--batch-size", type=_number(int, 1), default=1, metavar="B",
                   help="images per step and process (default: 1)")
    o.add_argument("--gradient-accumulation-steps", type=_number(int, 1), default=1, metavar="N")
    o.add_argument("--max-grad-norm", type=_number(float, 0), default=1.0, metavar="X",
                   help="clip the gradient norm (0: off; default: 1)")
    o.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="autocast with the frozen weights in half precision; LoRA weights stay fp32")
    o.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, slower)")
    o.add_argument("--min-snr-gamma", type=_number(float, 0, strict_low=True), metavar="G",
                   help="min-SNR loss weighting (Hang et al. 2023); 5 is usual")
    o.add_argument("--noise-offset", type=_number(float, 0), default=0.0, metavar="X",
                   help="add X times per-channel noise to the noise (darker/brighter images)")
    o.add_argument("--seed", type=_number(int, 0), default=0, metavar="S")
    d = p.add_argument_group("data")
    d.add_argument("--resolution", type=_number(int, 8), metavar="PX",
                   help="training size, a multiple of 8 (default: the model's)")
    d.add_argument("--reg-data", metavar="DIR",
                   help="regularisation images with captions in the same layouts (prior "
                        "preservation, as kohya's reg_data_dir): mixed into the stream so that the "
                        "LoRA keeps what the base model drew for their captions")
    d.add_argument("--prior-loss-weight", type=_number(float, 0), default=1.0, metavar="W",
                   help="loss weight of the --reg-data images (default: 1.0)")
    d.add_argument("--caption-dropout", type=_number(float, 0, 1), default=0.0, metavar="P",
                   help="probability of training on the empty caption (default: 0)")
    d.add_argument("--flip", action="store_true", help="mirror images at random")
    d.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    d.add_argument("--cache-latents", action="store_true",
                   help="encode every image once before training (not with --random-crop)")
    d.add_argument("--num-workers", type=_number(int, 0), default=0, metavar="N",
                   help="data-loading processes (default: 0)")
    c = p.add_argument_group("checkpoints and validation")
    c.add_argument("--checkpointing-steps", type=_number(int, 1), default=500, metavar="N",
                   help="save a resumable state every N steps (default: 500)")
    c.add_argument("--checkpoints-total-limit", type=_number(int, 1), metavar="N",
                   help="keep only the newest N states (default: all)")
    c.add_argument("--checkpoints-dir", metavar="DIR",
                   help="where states go (default: <output>-checkpoints next to the output)")
    c.add_argument("--resume", metavar="latest|PATH",
                   help="continue from the newest state (latest) or a state folder")
    c.add_argument("--validation-prompt", action="append", default=[], metavar="TEXT",
                   help="draw this prompt (repeatable) every --validation-steps steps")
    c.add_argument("--validation-steps", type=_number(int, 1), default=100, metavar="N")
    c.add_argument("--validation-seed", type=_number(int, 0), default=0, metavar="S")
    c.add_argument("--save-precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the weights in the written file (default: fp32)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def resolve_targets(args) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(UNet layer names, text-encoder layer names) from --targets and --train-text-encoder."""
    from ldm.lora import TARGET_PRESETS

    presets = dict(TARGET_PRESETS, conv=("conv1", "conv2", "conv_shortcut"))
    unet: list[str] = []
    text: list[str] = []
    for item in args.targets:
        names = presets.get(item, (item,))
        (text if item.startswith("text-") else unet).extend(names)
    if text and not args.train_text_encoder:
        raise UsageError("text-encoder targets need --train-text-encoder")
    if args.train_text_encoder and not text:
        text = list(TARGET_PRESETS["text-attention"])
    return tuple(dict.fromkeys(unet)), tuple(dict.fromkeys(text))


def check(args) -> None:
    """Cross-argument rules, before anything heavy is loaded."""
    out = Path(args.output)
    if out.suffix.lower() != ".safetensors":
        raise UsageError(f"--output must name a .safetensors file, got {args.output!r}")
    if out.is_dir():
        raise UsageError(f"--output {out} is a folder; give a file name")
    if args.resolution is not None and args.resolution % 8:
        raise UsageError(f"argument --resolution: must be a multiple of 8, got {args.resolution}")
    if args.cache_latents and args.random_crop:
        raise UsageError("--cache-latents needs fixed crops; drop --random-crop or the cache")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file or folder")
    if args.validation_prompt and not all(t.strip() for t in args.validation_prompt):
        raise UsageError("--validation-prompt must not be empty")
    if args.reg_data and Path(args.reg_data).resolve() == Path(args.data).resolve():
        raise UsageError("--reg-data must be another folder than --data")
    resolve_targets(args)


def run(argv: list[str]) -> int:
    """Parse, check and train; exceptions go to the caller (the ``ldm`` entry point reports them)."""
    args = build_parser().parse_args(argv)
    check(args)
    from training.lora_loop import train

    train(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import main as ldm_main

    return ldm_main(["train-lora", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
