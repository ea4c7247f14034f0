"""``ldm train-embedding``: learn a textual-inversion word from a folder of captioned images.

Runs as ``ldm train-embedding ...`` or, for several processes or GPUs, ``accelerate launch
[--num_processes N] -m cli train-embedding ...``. This module holds the command line: it parses the
options, builds a :class:`training.embedding.EmbeddingSettings` and hands it to the trainer (imported
only then, so ``--help`` stays instant). Errors end as one ``error:`` line.
"""
from __future__ import annotations

from cli.args import Parser, add_state_options, number, settings_from as args_settings


def build_parser(prog: str = "ldm train-embedding") -> Parser:
    p = Parser(prog=prog, description="Learn the vectors of a new prompt word (textual inversion) "
               "from images with captions (name.png + name.txt, or a diffusers metadata.jsonl) and "
               "write an A1111 embedding file that ldm, A1111 and diffusers load. Captions should "
               "contain the word; '[name]' is replaced by it, and a caption without it gets "
               "'WORD, ' in front.")
    p.add_argument("--data", required=True, metavar="DIR", help="training images and captions")
    p.add_argument("--token", required=True, metavar="WORD",
                   help="the new prompt word; best one the tokenizer splits into meaningless pieces")
    p.add_argument("--init-word", required=True, metavar="WORD",
                   help="the vectors start as this word's token rows (e.g. the concept's class)")
    p.add_argument("--vectors", type=number(int, 1), default=1, metavar="N",
                   help="vectors per token (default: 1)")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="the embedding to write: .safetensors (emb_params) or .pt (string_to_param); "
                        "prompts use the file's name as the word")
    m = p.add_argument_group("base model")
    m.add_argument("--checkpoint", metavar="PATH",
                   help="single-file checkpoint or diffusers folder (default: the shipped model)")
    m.add_argument("--config", metavar="YAML", help="CompVis inference YAML (default: detected)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=number(int, 1), default=1000, metavar="N",
                   help="optimizer steps (default: 1000)")
    o.add_argument("--learning-rate", "--lr", type=number(float, 0, strict_low=True), default=5e-3,
                   metavar="LR", help="AdamW learning rate (default: 5e-3, as A1111)")
    o.add_argument("--lr-scheduler", default="constant",
                   choices=("constant", "constant_with_warmup", "linear", "cosine"))
    o.add_argument("--lr-warmup-steps", type=number(int, 0), default=0, metavar="N")
    o.add_argument("--weight-decay", type=number(float, 0), default=0.0, metavar="W")
    o.add_argument("--batch-size", type=number(int, 1), default=1, metavar="B",
                   help="images per step and process (default: 1)")
    o.add_argument("--gradient-accumulation-steps", type=number(int, 1), default=1, metavar="N")
    o.add_argument("--max-grad-norm", type=number(float, 0), default=0.0, metavar="X",
                   help="clip the gradient norm (default 0: off)")
    o.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="autocast with the frozen weights in half precision; the vectors stay fp32")
    o.add_argument("--seed", type=number(int, 0), default=0, metavar="S")
    d = p.add_argument_group("data")
    d.add_argument("--resolution", type=number(int, 8), metavar="PX",
                   help="training size, a multiple of 8 (default: the model's)")
    d.add_argument("--flip", action="store_true", help="mirror images at random")
    d.add_argument("--template", metavar="FILE",
                   help="A1111 prompt template: each step's caption is a random line of FILE, "
                        "[name] the word and [filewords] the image's own caption")
    d.add_argument("--cache-latents", action="store_true", help="encode every image once first")
    d.add_argument("--num-workers", type=number(int, 0), default=0, metavar="N")
    c = p.add_argument_group("checkpoints and validation")
    add_state_options(c)
    c.add_argument("--validation-prompt", action="append", default=[], metavar="TEXT",
                   help="draw this prompt (repeatable; may use the word) every --validation-steps")
    c.add_argument("--validation-steps", type=number(int, 1), default=100, metavar="N")
    c.add_argument("--validation-seed", type=number(int, 0), default=0, metavar="S")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def settings_from(args):
    """The parsed options as checked :class:`training.embedding.EmbeddingSettings`."""
    from training.embedding import EmbeddingSettings

    return args_settings(args, EmbeddingSettings)


def run(argv: list[str]) -> int:
    """Parse, check and train; exceptions go to the caller (the ``ldm`` entry point reports them)."""
    settings = settings_from(build_parser().parse_args(argv))
    from training.embedding import train

    train(settings)
    return 0
