"""Captions of the shapes world: what a caption says (:class:`Caption`), its one grammar
``a [small|large ]<colour> <shape>[ <position>][ on a <colour> background]``, and its parser."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .world import ALL_SHAPES, COLOURS, POSITIONS, SIZES


@dataclass(frozen=True)
class Caption:
    """What a caption says. ``None`` fields are not mentioned (the attribute is then random)."""

    colour: str
    shape: str
    background: str | None = None
    size: str | None = None
    position: str | None = None

    def __post_init__(self):
        _check("colour", self.colour, COLOURS)
        _check("shape", self.shape, ALL_SHAPES)
        _check("background", self.background, COLOURS, optional=True)
        _check("size", self.size, SIZES, optional=True)
        _check("position", self.position, POSITIONS, optional=True)
        if self.background is not None and self.background == self.colour:
            raise ValueError(f"shape colour and background are both {self.colour!r}")

    @property
    def text(self) -> str:
        """``a [small|large ]<colour> <shape>[ <position>][ on a <colour> background]``."""
        words = ["a"]
        if self.size:
            words.append(self.size)
        words += [self.colour, self.shape]
        if self.position:
            words.append(self.position)
        if self.background:
            words += ["on a", self.background, "background"]
        return " ".join(words)

    def __str__(self) -> str:
        return self.text


def _check(field: str, value, allowed, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise ValueError(f"unknown {field} {value!r}; expected one of {', '.join(allowed)}")


_CAPTION_RE = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour>\w+) (?P<shape>\w+)"
    r"(?: (?P<position>on the left|on the right|at the top|at the bottom|in the center))?"
    r"(?: on an? (?P<background>\w+) background)?$")


def parse_caption(text: str) -> Caption:
    """Parse a caption of the shapes grammar (case and surrounding space or full stop ignored)."""
    clean = " ".join(text.strip().rstrip(".").lower().split())
    match = _CAPTION_RE.match(clean)
    if match is None:
        raise ValueError(f"not a shapes caption: {text!r} (expected e.g. "
                         f"'a small red circle on the left on a blue background')")
    return Caption(**match.groupdict())
