"""The one number check for every parameter, given as a Python value or as command-line text.

A Python value must already be a number (``bool`` is not one) and the error names the parameter in
the API's words ("steps must be >= 1"); text (``from_text=True``) is parsed first and the error is
worded for a command line ("must be at least 1"; argparse puts "argument --steps:" in front). NaN
is never in range.
"""
from __future__ import annotations


def check_number(value, name: str = "", low: float | None = None, high: float | None = None, *,
                 integer: bool = False, strict_low: bool = False, from_text: bool = False):
    """``value`` if it is a number in range, else ``ValueError``; with ``from_text``, ``value``
    is text and the number it spells (``int(text)`` or ``float(text)``) is returned.

    ``integer`` asks for a whole number; ``low``/``high`` are inclusive bounds (``strict_low``:
    the value must be greater than ``low``)."""
    if from_text:
        text, value = value, _parse(value, integer)
    elif isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or value != value:
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value != value or (low is not None and (value <= low if strict_low else value < low)) \
            or (high is not None and value > high):
        if not from_text:
            raise ValueError(f"{name} must be {_api_range(low, high, strict_low)}, got {value}")
        prefix = f"{name} " if name else ""
        raise ValueError(f"{prefix}must be {_text_range(low, high, strict_low)}, got {text}")
    return value


def _parse(text: str, integer: bool):
    try:
        return int(text) if integer else float(text)
    except ValueError:
        raise ValueError(f"expected {'a whole number' if integer else 'a number'}, got {text!r}") from None


def _api_range(low, high, strict_low: bool) -> str:
    if low is not None and high is not None:
        return f"in ({low}, {high}]" if strict_low else f"in [{low}, {high}]"
    if low is not None:
        return f"> {low}" if strict_low else f">= {low}"
    return f"<= {high}"


def _text_range(low, high, strict_low: bool) -> str:
    if low is not None and high is not None:
        return f"between {low:g} and {high:g}" + (f" (not {low:g})" if strict_low else "")
    if low is not None:
        return f"greater than {low:g}" if strict_low else f"at least {low:g}"
    return f"at most {high:g}"
