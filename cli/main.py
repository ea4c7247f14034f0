"""The ``ldm`` command's entry point: the parser of every command, dispatch to the command's
module, and the error contract.

Every failure a user can cause ends as one ``error: ...`` line on stderr and a non-zero exit status
(2 for a malformed command line, 1 otherwise), never a traceback; ``LDM_DEBUG=1`` shows the traceback.
Arguments and input files are checked before the model loads. Nothing heavy is imported here, so
``ldm --help`` is instant.
"""
from __future__ import annotations

import os
import sys

from cli import generate, info, preprocess, serve
from cli.args import CommandError, Parser, UsageError


def build_parser() -> Parser:
    parser = Parser(prog="ldm", description="Latent diffusion text-to-image: generate images, "
                    "inspect images and checkpoints.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generate.add_parsers(sub)
    # parsed by cli.train_lora (the entry point hands it the rest of the command line)
    sub.add_parser("train-lora", add_help=False, help="fine-tune a LoRA on a folder of captioned "
                   "images (see 'ldm train-lora --help')")
    sub.add_parser("train-controlnet", add_help=False, help="train a ControlNet on images, hint "
                   "images and captions (see 'ldm train-controlnet --help')")
    sub.add_parser("train-embedding", add_help=False, help="learn a textual-inversion word from "
                   "captioned images (see 'ldm train-embedding --help')")
    info.add_parser(sub)
    preprocess.add_parser(sub)
    serve.add_parser(sub)
    return parser


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["train-lora"]:  # training has its own parser; imported only when asked for
        from cli import train_lora
        return train_lora.run(argv[1:])
    if argv[:1] == ["train-controlnet"]:
        from cli import train_controlnet
        return train_controlnet.run(argv[1:])
    if argv[:1] == ["train-embedding"]:
        from cli import train_embedding
        return train_embedding.run(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return info.run(args)
    if args.command == "preprocess":
        return preprocess.run(args)
    if args.command == "serve":
        return serve.run(args)
    generate.check(args)
    return generate.run(args)


def _known_errors() -> tuple[type[BaseException], ...]:
    """The project's own exception types, for the modules that are already imported."""
    kinds: list[type[BaseException]] = [CommandError, ValueError, OSError]
    for module, name in (("ldm.config", "ConfigError"), ("ldm.weights_io", "CheckpointError"),
                         ("pipelines.pipeline", "DefaultModelMissing")):
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None:
            kinds.append(kind)
    return tuple(kinds)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("LDM_DEBUG", "") not in ("", "0")
    try:
        return _dispatch(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # --help, or argparse exiting on its own
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except UsageError as exc:
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, _known_errors()):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        else:
            print(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} "
                  "(rerun with LDM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
