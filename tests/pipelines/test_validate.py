"""The one number check, for Python values (API wording) and command-line text (CLI wording)."""
from __future__ import annotations

import math

import pytest

from pipelines.validate import check_number


@pytest.mark.parametrize("value, kwargs, message", [
    (0, dict(name="steps", low=1, integer=True), "steps must be >= 1, got 0"),
    (1.5, dict(name="strength", low=0, high=1), r"strength must be in \[0, 1\], got 1.5"),
    (2.0, dict(name="steps", low=1, integer=True), "steps must be an integer, got 2.0"),
    (True, dict(name="eta", low=0), "eta must be a number, got True"),
    (math.nan, dict(name="eta", low=0), "eta must be a number, got nan"),
    ("7", dict(name="eta", low=0), "eta must be a number, got '7'"),  # text only with from_text
    (0.0, dict(name="lr", low=0, strict_low=True), "lr must be > 0, got 0.0"),
    (3, dict(name="n", high=2), "n must be <= 2, got 3"),
])
def test_values(value, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_number(value, **kwargs)


@pytest.mark.parametrize("text, kwargs, message", [
    ("0", dict(low=1, integer=True), "must be at least 1, got 0"),
    ("ten", dict(low=1, integer=True), "expected a whole number, got 'ten'"),
    ("x", dict(low=0), "expected a number, got 'x'"),
    ("1.5", dict(low=0.0, high=1.0), "must be between 0 and 1, got 1.5"),
    ("nan", dict(low=0.0), "must be at least 0, got nan"),
    ("0", dict(low=0, strict_low=True), "must be greater than 0, got 0"),
    ("9", dict(high=8), "must be at most 8, got 9"),
    ("9", dict(name="--size", high=8), "--size must be at most 8, got 9"),
])
def test_text(text, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_number(text, from_text=True, **kwargs)


def test_returns_the_number_in_range():
    assert check_number(3, "n", 1, 3, integer=True) == 3
    assert check_number(0.5, "p", 0, 1) == 0.5
    assert check_number("12", low=1, integer=True, from_text=True) == 12
    assert isinstance(check_number("12", integer=True, from_text=True), int)
    assert check_number("0.25", low=0.0, high=1.0, from_text=True) == 0.25
    assert check_number("1e-4", low=0, strict_low=True, from_text=True) == 1e-4
