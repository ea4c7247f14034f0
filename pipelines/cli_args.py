"""Argument parsing for the ``ldm`` command. Imports nothing heavy: ``ldm --help`` must be instant."""
from __future__ import annotations

import argparse

DTYPES = ("fp32", "fp16", "bf16")
ATTENTION = ("sdpa", "xformers", "math")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds


class UsageError(Exception):
    """A malformed command line (exit status 2, like argparse's own errors)."""


class Parser(argparse.ArgumentParser):
    """argparse prints usage plus ``prog: error:`` and exits; we want one ``error:`` line instead."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value == value or value < low or (high is not None and value > high):  # NaN fails too
            span = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value
    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value == -1:  # A1111's spelling of "pick one at random"
        return -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64-1 (or -1 for random), got {value}")
    return value


def _lora(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` (a trailing ``:number`` is the scale; default 1)."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def _generation_options(p: argparse.ArgumentParser, strength: float | None, mask: bool) -> None:
    p.add_argument("prompt", nargs="?", metavar="PROMPT",
                   help="what to draw; A1111 emphasis such as (word:1.3) is understood")
    p.add_argument("--from-file", metavar="TXT",
                   help="one prompt per line instead of PROMPT (blank lines and # comments skipped); "
                        "outputs are numbered")
    p.add_argument("-o", "--output", default="out.png", metavar="OUT.png",
                   help="output PNG (default: out.png; several images become out-0.png, out-1.png, ...)")
    if strength is not None:
        p.add_argument("--image", required=True, metavar="IN.png", help="the starting image")
    if mask:
        p.add_argument("--mask", required=True, metavar="MASK.png",
                       help="white = repaint, black = keep; resized to the image if its size differs")
        p.add_argument("--mask-blur", type=_int_at_least(0), default=0, metavar="PX",
                       help="soften the mask edge by this many pixels (default: 0)")
    if strength is not None:
        p.add_argument("--strength", type=_float_in(0.0, 1.0), default=strength, metavar="S",
                       help=f"how much to change the image, 0 to 1 (default: {strength:g})")
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", metavar="PATH",
                   help="single-file checkpoint (.safetensors/.ckpt); default: the shipped model")
    m.add_argument("--config", metavar="YAML", help="CompVis inference YAML (default: detected)")
    m.add_argument("--ema", action="store_true", help="use the EMA weights stored in the checkpoint")
    m.add_argument("--prediction", choices=("eps", "v"), help="override the detected prediction type")
    m.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    m.add_argument("--dtype", choices=DTYPES, help="default: fp16 on CUDA, fp32 on CPU")
    m.add_argument("--attention", choices=ATTENTION, default="sdpa",
                   help="attention kernel (default: sdpa; xformers falls back to sdpa when unusable)")
    m.add_argument("--lora", action="append", type=_lora, default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (kohya or diffusers file) at SCALE (default 1); repeatable")
    m.add_argument("--vae-tiling", action="store_true",
                   help="decode large images in overlapping tiles to save memory")
    s = p.add_argument_group("sampling")
    s.add_argument("--negative-prompt", default="", metavar="TEXT", help="what to steer away from")
    # None: the model config's sampling section (tiny-shapes recommends its own guidance scale)
    s.add_argument("--steps", type=_int_at_least(1), default=None, metavar="N",
                   help="denoising steps (default: the model's, else 25)")
    s.add_argument("--guidance-scale", type=_float_in(0.0), default=None, metavar="G",
                   help="classifier-free guidance scale; 1 or less turns guidance off (default: the "
                        "model's, else 7.5; the default model's is 2.5)")
    s.add_argument("--scheduler", default=None, metavar="NAME",
                   help="ddim, ddpm, pndm, lms, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_karras, "
                        "dpmpp_sde_karras, unipc (default: the model's, else dpmpp_2m)")
    s.add_argument("--seed", type=_seed, metavar="S",
                   help="random seed; image i of a batch uses S+i (default: random, printed)")
    s.add_argument("--width", type=_int_at_least(1), metavar="W", help="default: the model's size")
    s.add_argument("--height", type=_int_at_least(1), metavar="H", help="default: the model's size")
    s.add_argument("--num-images", type=_int_at_least(1), default=1, metavar="N",
                   help="images per prompt (default: 1)")
    s.add_argument("--eta", type=_float_in(0.0), default=0.0, metavar="E",
                   help="DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like noise (default: 0)")
    s.add_argument("--clip-skip", type=_int_at_least(0), default=0, metavar="N",
                   help="skip the last N text-encoder blocks (A1111's 'Clip skip' N+1; default: 0)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar or notes; only the written files are printed")


def build_parser() -> Parser:
    parser = Parser(prog="ldm", description="Latent diffusion text-to-image: generate images, "
                    "inspect images and checkpoints.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _generation_options(sub.add_parser("txt2img", help="generate images from a prompt",
                                       description="Generate images from a text prompt."),
                        strength=None, mask=False)
    _generation_options(sub.add_parser("img2img", help="redraw an image guided by a prompt",
                                       description="Redraw --image guided by a text prompt."),
                        strength=0.75, mask=False)
    _generation_options(sub.add_parser("inpaint", help="repaint the masked part of an image",
                                       description="Repaint the white part of --mask in --image."),
                        strength=1.0, mask=True)
    # parsed by training.lora (the ldm entry point hands it the rest of the command line)
    sub.add_parser("train-lora", add_help=False, help="fine-tune a LoRA on a folder of captioned "
                   "images (see 'ldm train-lora --help')")
    info = sub.add_parser("info", help="show an image's generation parameters or a checkpoint's family",
                          description="For a PNG: print the stored generation parameters (A1111 "
                          "text). For a checkpoint: print its detected family and contents.")
    info.add_argument("path", metavar="PATH", help="an image written by ldm (or A1111), or a checkpoint")
    info.add_argument("--json", action="store_true", help="print parsed fields as JSON")
    return parser


def check(args: argparse.Namespace) -> None:
    """Cross-argument rules argparse cannot express; raises UsageError."""
    if args.command == "info":
        return
    if args.prompt is not None and args.from_file:
        raise UsageError("give either PROMPT or --from-file, not both")
    if args.prompt is None and not args.from_file:
        raise UsageError(f"missing PROMPT (or --from-file TXT) (see 'ldm {args.command} --help')")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and value % 8:  # the autoencoder works on multiples of 8 pixels
            raise UsageError(f"argument --{name}: must be a multiple of 8, got {value}")
    if not args.output.lower().endswith(".png"):
        raise UsageError(f"--output must name a .png file, got {args.output!r}")
