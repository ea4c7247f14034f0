"""``ldm train-controlnet``: train a ControlNet for a base model on target images, hint images and
captions, through Accelerate.

Runs as ``ldm train-controlnet ...`` or, for several processes or GPUs, ``accelerate launch
[--num_processes N] -m cli train-controlnet ...``. This module holds the command line; the trainer
(:mod:`training.controlnet`) is imported only after the options are checked, so ``--help`` stays
instant. Errors end as one ``error:`` line.
"""
from __future__ import annotations

from cli.args import Parser, add_state_options, number, settings_from as args_settings


def build_parser(prog: str = "ldm train-controlnet") -> Parser:
    p = Parser(prog=prog, description="Train a ControlNet (a trainable copy of the base UNet's "
               "encoder that reads hint images) with the base model frozen, and write it in the "
               "original ControlNet layout as .safetensors. Data: DIR/name.png + DIR/name.txt "
               "(caption) + DIR/conditioning/name.png (hint), or a diffusers metadata.jsonl with "
               "image, conditioning_image and text.")
    p.add_argument("--data", required=True, metavar="DIR", help="targets, hints and captions")
    p.add_argument("--output", required=True, metavar="FILE.safetensors", help="the ControlNet file to write")
    m = p.add_argument_group("base model")
    m.add_argument("--checkpoint", metavar="PATH",
                   help="single-file checkpoint or diffusers folder (default: the shipped model)")
    m.add_argument("--config", metavar="YAML", help="CompVis inference YAML (default: detected)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=number(int, 1), default=1000, metavar="N",
                   help="optimizer steps (default: 1000)")
    o.add_argument("--lr", "--learning-rate", dest="learning_rate", default=1e-5, metavar="LR",
                   type=number(float, 0, strict_low=True), help="AdamW learning rate (default: 1e-5)")
    o.add_argument("--lr-scheduler", default="constant",
                   choices=("constant", "constant_with_warmup", "linear", "cosine"))
    o.add_argument("--lr-warmup-steps", type=number(int, 0), default=0, metavar="N")
    o.add_argument("--weight-decay", type=number(float, 0), default=1e-2, metavar="W")
    o.add_argument("--batch-size", type=number(int, 1), default=4, metavar="B",
                   help="examples per step and process (default: 4)")
    o.add_argument("--gradient-accumulation-steps", type=number(int, 1), default=1, metavar="N")
    o.add_argument("--max-grad-norm", type=number(float, 0), default=1.0, metavar="X",
                   help="clip the gradient norm (0: off; default: 1)")
    o.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="autocast with the frozen weights in half precision; the ControlNet stays fp32")
    o.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the ControlNet's activations in the backward pass")
    o.add_argument("--min-snr-gamma", type=number(float, 0, strict_low=True), metavar="G")
    o.add_argument("--noise-offset", type=number(float, 0), default=0.0, metavar="X")
    o.add_argument("--seed", type=number(int, 0), default=0, metavar="S")
    d = p.add_argument_group("data")
    d.add_argument("--resolution", type=number(int, 8), metavar="PX",
                   help="training size, a multiple of 8 (default: the model's)")
    d.add_argument("--caption-dropout", type=number(float, 0, 1), default=0.5, metavar="P",
                   help="probability of training on the empty caption (default: 0.5, as the paper)")
    d.add_argument("--cache-latents", action="store_true",
                   help="encode every target image once before training")
    d.add_argument("--num-workers", type=number(int, 0), default=0, metavar="N")
    c = p.add_argument_group("checkpoints and validation")
    add_state_options(c)
    c.add_argument("--validation-prompt", action="append", default=[], metavar="TEXT",
                   help="draw this prompt (repeatable) with its --validation-image every "
                        "--validation-steps steps")
    c.add_argument("--validation-image", action="append", default=[], metavar="HINT",
                   help="hint image for the validation prompts (one, or one per prompt)")
    c.add_argument("--validation-steps", type=number(int, 1), default=100, metavar="N")
    c.add_argument("--validation-seed", type=number(int, 0), default=0, metavar="S")
    c.add_argument("--save-precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the weights in the written file (default: fp32)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def settings_from(args):
    """The parsed options as checked :class:`training.controlnet.ControlNetSettings`."""
    from training.controlnet import ControlNetSettings

    return args_settings(args, ControlNetSettings)


def run(argv: list[str]) -> int:
    settings = settings_from(build_parser().parse_args(argv))
    from training.controlnet import train

    train(settings)
    return 0
