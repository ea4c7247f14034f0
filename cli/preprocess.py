"""``ldm preprocess``: turn an image into a ControlNet hint (edges, scribble, line art, ...) with one of
the weight-free preprocessors of :mod:`pipelines.annotators`."""
from __future__ import annotations

import argparse

from cli.args import CommandError, UsageError, number
from pipelines.annotators import PARAMETERS, PREPROCESSORS

# command-line flag → the preprocessor parameter it sets (the same flag may mean different ranges)
FLAGS = {
    "--low-threshold": "low_threshold",
    "--high-threshold": "high_threshold",
    "--threshold": "threshold",
    "--rate": "down_sampling_rate",
}


def _flag_of(param: str) -> str:
    return next(flag for flag, name in FLAGS.items() if name == param)


def add_parser(sub) -> None:
    p = sub.add_parser("preprocess", help="make a ControlNet hint image (canny edges, scribble, ...)",
                       description="Turn INPUT into a ControlNet hint image with a preprocessor "
                       "that needs no model weights (as sd-webui-controlnet computes it).")
    p.add_argument("name", metavar="NAME", choices=PREPROCESSORS,
                   help="preprocessor: " + ", ".join(PREPROCESSORS))
    p.add_argument("input", metavar="INPUT", help="the image to preprocess")
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="the hint image to write")
    # Ranges depend on the preprocessor; run() checks them, so parse plain numbers here.
    p.add_argument("--low-threshold", type=number(int), metavar="N",
                   help="canny: low threshold (1..255, default 100)")
    p.add_argument("--high-threshold", type=number(int), metavar="N",
                   help="canny: high threshold (1..255, default 200)")
    p.add_argument("--threshold", type=number(int), metavar="N",
                   help="scribble_xdog (1..64, default 32) or threshold (0..255, default 127)")
    p.add_argument("--rate", type=number(float), metavar="X",
                   help="tile_resample: down-sampling rate (1..8, default 1: unchanged)")


def _params(args: argparse.Namespace) -> dict:
    """The preprocessor parameters the flags give, validated; raises UsageError."""
    from pipelines.annotators import check

    allowed = {p.name for p in PARAMETERS[args.name]}
    params = {}
    for flag, name in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if name not in allowed:
            options = ", ".join(_flag_of(p.name) for p in PARAMETERS[args.name]) or "none"
            raise UsageError(f"argument {flag}: not an option of the {args.name} preprocessor "
                             f"(its options: {options})")
        try:  # one flag at a time, so the error names the flag
            check(args.name, {name: value})
        except ValueError as exc:
            raise UsageError(f"argument {flag}: {exc}") from None
        params[name] = value
    try:  # rules between flags (canny: low <= high)
        return check(args.name, params)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Read INPUT, preprocess it, write the hint as PNG atomically; returns the exit status."""
    if not args.output.lower().endswith(".png"):
        raise UsageError(f"--output must name a .png file, got {args.output!r}")
    params = _params(args)

    from pipelines import annotators, images
    image = images.load_image(args.input)  # ValueError naming the file: one error line, exit 1
    try:
        hint = annotators.run(args.name, image, **params)
    except annotators.OpenCVMissing as exc:
        raise CommandError(str(exc)) from None
    images.save_png(hint, args.output)
    print(args.output)
    return 0
