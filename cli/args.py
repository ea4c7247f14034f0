"""What every ``ldm`` command shares: the parser that reports one ``error:`` line, the two error
types behind the exit statuses, and argparse types for numbers. Imports nothing heavy: ``ldm
--help`` must be instant."""
from __future__ import annotations

import argparse

from pipelines.validate import check_number


class UsageError(Exception):
    """A malformed command line (exit status 2, like argparse's own errors)."""


class CommandError(Exception):
    """A problem with the user's input, reported as one line (exit status 1)."""


class Parser(argparse.ArgumentParser):
    """argparse prints usage plus ``prog: error:`` and exits; we want one ``error:`` line instead."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def number(kind: type = float, low: float | None = None, high: float | None = None, *,
           strict_low: bool = False):
    """An argparse ``type`` for an ``int`` or ``float`` option within bounds
    (:func:`pipelines.validate.check_number`); argparse reports "argument --x: must be ..."."""
    def parse(text: str):
        try:
            return check_number(text, low=low, high=high, integer=kind is int, strict_low=strict_low,
                                from_text=True)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def settings_from(args: argparse.Namespace, settings_class):
    """A trainer's settings dataclass from the parsed options of the same names (fields without
    an option keep their defaults); a broken rule of the settings is a usage error."""
    import dataclasses

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings_class)
              if hasattr(args, f.name)}
    try:
        return settings_class(**fields)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def add_state_options(group) -> None:
    """The resumable-state options every training command has (the engine's states)."""
    group.add_argument("--checkpointing-steps", type=number(int, 1), default=500, metavar="N",
                       help="save a resumable state every N steps (default: 500)")
    group.add_argument("--checkpoints-total-limit", type=number(int, 1), metavar="N",
                       help="keep only the newest N states (default: all)")
    group.add_argument("--checkpoints-dir", metavar="DIR",
                       help="where states go (default: <output>-checkpoints next to the output)")
    group.add_argument("--resume", metavar="latest|PATH",
                       help="continue from the newest state (latest) or a state folder")
