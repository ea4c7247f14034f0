"""The one number check for every parameter, given as a Python value or as command-line text.

A Python value must already be a number (``bool`` is not one) and the error names the parameter in
the API's words ("steps must be >= 1"); text is parsed first and the error is worded for a command
line ("must be at least 1"; argparse puts "argument --steps:" in front). NaN is never in range.
"""
from __future__ import annotations


def check_number(value, name: str = "", low: float | None = None, high: float | None = None, *,
                 integer: bool = False, strict_low: bool = False):
    """``value`` (a number, or text to parse) if it is a number in range, else ``ValueError``.

    ``integer`` asks for a whole number; ``low``/``high`` are inclusive bounds (``strict_low``:
    ``value`` must be greater than ``low``). Text gives ``int(text)`` or ``float(text)``."""
    text = value if isinstance(value, str) else None
    if text is not None:
        value = _parse(text, integer)
    elif isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or value != value:
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value != value or (low is not None and (value <= low if strict_low else value < low)) \
            or (high is not None and value > high):
        if text is None:
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
