"""``ldm train-lora``: fine-tune a LoRA on a folder of captioned images, through Accelerate.

Runs as ``ldm train-lora ...`` or, for several processes or GPUs, ``accelerate launch
[--num_processes N] -m cli train-lora ...``. This module holds the command line: it parses and
checks the options, builds a :class:`training.lora.LoraSettings` and hands it to the trainer
(imported only then, so ``--help`` stays instant). Errors end as one ``error:`` line.
"""
from __future__ import annotations

import argparse

from cli.args import Parser, add_state_options, number, settings_from as args_settings


RECIPE = """\
recipe for a new concept (an object or shape the model does not know), measured on datasets
nobody tuned it for (benchmarks/lora_draws.py, benchmarks/RESULTS.md):
  ldm train-lora --data rings/ --reg-data shapes/ --output ring.safetensors \\
      --token ring --init-word circle \\
      --targets attn2.to_k attn2.to_v --rank 8 --learning-rate 3e-3 \\
      --batch-size 8 --max-steps 1600 --min-snr-gamma 5 --cache-latents --flip
  --token: pivotal tuning, the caption word the concept is called by (4 vectors at 1e-2 by
  default); --init-word: the closest thing the model already draws; the LoRA on the
  cross-attention keys and values only; --reg-data: pictures of what the model already draws
  (or --class-prompt TEXT to have the model draw them).
"""


def build_parser(prog: str = "ldm train-lora") -> Parser:
    p = Parser(prog=prog, description="Fine-tune a LoRA on a folder of images with captions "
               "(name.png + name.txt, or a diffusers metadata.jsonl) and write it as a kohya-format "
               ".safetensors file that diffusers, A1111 and ComfyUI load.",
               epilog=RECIPE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DIR",
                   help="training images and captions (kohya's N_name sub-folders repeat their "
                        "images N times)")
    p.add_argument("--output", required=True, metavar="FILE.safetensors", help="the LoRA file to write")
    m = p.add_argument_group("base model")
    m.add_argument("--checkpoint", metavar="PATH",
                   help="single-file checkpoint or diffusers folder (default: the shipped model)")
    m.add_argument("--config", metavar="YAML", help="CompVis inference YAML (default: detected)")
    _adapter_options(p.add_argument_group("adapter"))
    _optimisation_options(p.add_argument_group("optimisation"))
    _data_options(p.add_argument_group("data"))
    _state_options(p.add_argument_group("checkpoints and validation"))
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _adapter_options(a) -> None:
    a.add_argument("--rank", type=number(int, 1), default=4, metavar="R", help="LoRA rank (default: 4)")
    a.add_argument("--alpha", type=number(float, 0, strict_low=True), metavar="A",
                   help="LoRA alpha; the update is scaled by alpha/rank (default: the rank)")
    a.add_argument("--targets", nargs="+", default=["attention"], metavar="T",
                   help="layers to adapt: presets attention (to_q/k/v/out), ff, proj, conv "
                        "(resnet convolutions, LoCon), text-attention, text-mlp, or layer names "
                        "as diffusers spells them (default: attention)")
    a.add_argument("--train-text-encoder", nargs="?", const=True, default=False, choices=("te1", "te2"),
                   help="adapt the text encoder too (text-attention unless --targets names text layers); "
                        "SDXL: both towers, or only te1 (CLIP-L) or te2 (bigG)")
    a.add_argument("--token", metavar="WORD",
                   help="pivotal tuning: learn new vectors for this caption word together with the "
                        "LoRA (captions without it get it in front); written beside the LoRA as "
                        "<output>_emb.safetensors and loaded with it")
    a.add_argument("--init-word", metavar="WORD",
                   help="the --token vectors start as this word's (default: the token's own)")
    a.add_argument("--vectors", type=number(int, 1), default=4, metavar="N",
                   help="vectors of the --token word (default: 4)")


def _optimisation_options(o) -> None:
    o.add_argument("--max-steps", type=number(int, 1), default=1000, metavar="N",
                   help="optimizer steps (default: 1000)")
    o.add_argument("--learning-rate", type=number(float, 0, strict_low=True), default=1e-4,
                   metavar="LR", help="AdamW learning rate (default: 1e-4)")
    o.add_argument("--lr-scheduler", default="constant",
                   choices=("constant", "constant_with_warmup", "linear", "cosine",
                            "cosine_with_restarts"),
                   help="learning-rate schedule, as diffusers' get_scheduler (default: constant)")
    o.add_argument("--lr-warmup-steps", type=number(int, 0), default=0, metavar="N",
                   help="steps of linear warm-up from 0 (default: 0)")
    o.add_argument("--lr-num-cycles", type=number(int, 1), default=1, metavar="N",
                   help="hard restarts of cosine_with_restarts (default: 1)")
    o.add_argument("--text-encoder-lr", type=number(float, 0, strict_low=True), metavar="LR",
                   help="learning rate of the text encoder's LoRA (default: --learning-rate)")
    o.add_argument("--embedding-lr", type=number(float, 0, strict_low=True), metavar="LR",
                   help="learning rate of the --token vectors (default: 1e-2)")
    o.add_argument("--weight-decay", type=number(float, 0), default=1e-2, metavar="W")
    o.add_argument("--batch-size", type=number(int, 1), default=1, metavar="B",
                   help="images per step and process (default: 1)")
    o.add_argument("--gradient-accumulation-steps", type=number(int, 1), default=1, metavar="N")
    o.add_argument("--max-grad-norm", type=number(float, 0), default=1.0, metavar="X",
                   help="clip the gradient norm (0: off; default: 1)")
    o.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="autocast with the frozen weights in half precision; LoRA weights stay fp32")
    o.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, slower)")
    o.add_argument("--min-snr-gamma", type=number(float, 0, strict_low=True), metavar="G",
                   help="min-SNR loss weighting (Hang et al. 2023); 5 is usual")
    o.add_argument("--noise-offset", type=number(float, 0), default=0.0, metavar="X",
                   help="add X times per-channel noise to the noise (darker/brighter images)")
    o.add_argument("--seed", type=number(int, 0), default=0, metavar="S")


def _data_options(d) -> None:
    d.add_argument("--resolution", type=number(int, 8), metavar="PX",
                   help="training size, a multiple of 8 (default: the model's)")
    d.add_argument("--reg-data", metavar="DIR",
                   help="regularisation images with captions in the same layouts (prior "
                        "preservation, as kohya's reg_data_dir): mixed into the stream so that the "
                        "LoRA keeps what the base model drew for their captions")
    d.add_argument("--prior-loss-weight", type=number(float, 0), default=1.0, metavar="W",
                   help="loss weight of the --reg-data or class images (default: 1.0)")
    d.add_argument("--class-prompt", action="append", default=[], metavar="TEXT",
                   help="DreamBooth prior preservation without a folder: the base model draws "
                        "--num-class-images images of this prompt (repeatable: the prompts in turn) "
                        "and trains them alongside, captioned with their prompt")
    d.add_argument("--class-word", metavar="WORD",
                   help="with --token: class images for the training captions with the token "
                        "replaced by WORD (pairs that differ in the word only)")
    d.add_argument("--num-class-images", type=number(int, 1), default=100, metavar="N",
                   help="class images to draw (default: 100)")
    d.add_argument("--class-data", metavar="DIR",
                   help="where the class images are kept and reused (default: <output>-class-images)")
    d.add_argument("--shuffle-caption", action="store_true",
                   help="shuffle the comma-separated parts of each caption every time (kohya)")
    d.add_argument("--keep-tokens", type=number(int, 0), default=0, metavar="N",
                   help="with --shuffle-caption: the first N parts stay in front (default: 0)")
    d.add_argument("--caption-dropout", type=number(float, 0, 1), default=0.0, metavar="P",
                   help="probability of training on the empty caption (default: 0)")
    d.add_argument("--flip", action="store_true", help="mirror images at random")
    d.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    d.add_argument("--cache-latents", action="store_true",
                   help="encode every image once before training (not with --random-crop)")
    d.add_argument("--num-workers", type=number(int, 0), default=0, metavar="N",
                   help="data-loading processes (default: 0)")


def _state_options(c) -> None:
    add_state_options(c)
    c.add_argument("--validation-prompt", action="append", default=[], metavar="TEXT",
                   help="draw this prompt (repeatable) every --validation-steps steps")
    c.add_argument("--validation-steps", type=number(int, 1), default=100, metavar="N")
    c.add_argument("--validation-seed", type=number(int, 0), default=0, metavar="S")
    c.add_argument("--save-precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the weights in the written file (default: fp32)")


def settings_from(args):
    """The parsed options as checked :class:`training.lora.LoraSettings`."""
    from training.lora import LoraSettings

    return args_settings(args, LoraSettings)


def run(argv: list[str]) -> int:
    """Parse, check and train; exceptions go to the caller (the ``ldm`` entry point reports them)."""
    settings = settings_from(build_parser().parse_args(argv))
    from training.lora import train

    train(settings)
    return 0
