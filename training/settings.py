"""What every trainer's settings dataclass checks the same way: paths given as strings, number
options within bounds, options from a list of choices. Each raises a ValueError naming the option
(the command line turns it into one ``error:`` line)."""
from __future__ import annotations

from pathlib import Path

from pipelines.validate import check_number


def as_paths(settings, names) -> None:
    """Turn the named fields of a frozen dataclass that are set into ``Path``s."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and not isinstance(value, Path):
            object.__setattr__(settings, name, Path(value))


def check_fields(settings, numbers, choices) -> None:
    """``numbers``: (field, low, high, integer, strict_low) of each number option (None = unset
    is allowed); ``choices``: (field, allowed values)."""
    for name, low, high, integer, strict in numbers:
        if getattr(settings, name) is not None:
            check_number(getattr(settings, name), name, low, high, integer=integer, strict_low=strict)
    for name, allowed in choices:
        if getattr(settings, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(settings, name)!r}")
