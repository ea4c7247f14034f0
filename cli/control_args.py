"""The ControlNet options of the generation commands: ``--control MODEL:HINT[,key=value...]``
(repeatable: one unit each), ``--control-preprocess NAME`` and ``--controlnet-dir DIR``.

Each unit's text is checked before the model loads; a malformed one is a usage error naming the
unit and the key. Nothing heavy is imported until a unit is actually given."""
from __future__ import annotations

import argparse
from pathlib import Path

from cli.args import CommandError, UsageError

# short keys of a unit → ControlUnit fields
FIELDS = {"weight": "weight", "start": "guidance_start", "end": "guidance_end",
          "mode": "control_mode", "resize": "resize_mode", "preprocess": "preprocessor"}
RESIZE_SHORT = {"just": "just_resize", "crop": "crop_and_resize", "fill": "resize_and_fill"}
PARAM_SHORT = {"low": "low_threshold", "high": "high_threshold", "rate": "down_sampling_rate"}
SYNTAX = "MODEL:HINT[,weight=W][,start=S][,end=E][,mode=balanced|prompt|control]" \
         "[,resize=just|crop|fill][,preprocess=NAME][,low=N][,high=N][,threshold=N][,rate=X]"


def add_options(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("ControlNet")
    c.add_argument("--control", action="append", default=[], metavar="MODEL:HINT[,key=value...]",
                   help="a ControlNet unit: MODEL is a ControlNet file, folder or name (looked up "
                        "in --controlnet-dir, then the shipped weights, e.g. tiny-shapes-canny), "
                        "HINT the control image; keys: weight (default 1), start/end (fractions "
                        "of the steps, default 0/1), mode (balanced, prompt = 'my prompt is more "
                        "important', control = 'ControlNet is more important'), resize (just, "
                        "crop (default), fill), preprocess (none, canny, scribble_xdog, "
                        "lineart_standard, threshold, invert, tile_resample) and its low/high/"
                        "threshold/rate; repeatable, the units' effects add up")
    c.add_argument("--control-preprocess", metavar="NAME",
                   help="preprocessor for units that name none (e.g. canny to pass photos)")
    c.add_argument("--controlnet-dir", metavar="DIR", help="where ControlNet names are looked up")


def _value(unit: str, key: str, text: str):
    if key in ("weight", "start", "end") or key in PARAM_SHORT.values() or key == "threshold":
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"--control {unit!r}: {key} must be a number, got {text!r}") from None
    if key == "resize":
        return RESIZE_SHORT.get(text, text)
    return text


def parse_unit(text: str, default_preprocess: str | None) -> dict:
    """One ``--control`` value → the keyword arguments of a ControlUnit (with ``image`` still a
    path). Raises UsageError naming the problem."""
    head, *pairs = text.split(",")
    model, sep, hint = head.partition(":")
    if not sep or not model or not hint:
        raise UsageError(f"--control {text!r}: expected {SYNTAX}")
    unit: dict = {"model": model, "image": hint, "preprocessor_params": {}}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip().lower()
        key = PARAM_SHORT.get(key, key)
        if not eq or not value:
            raise UsageError(f"--control {text!r}: {pair!r} is not key=value")
        if key in FIELDS:
            unit[FIELDS[key]] = _value(text, key, value.strip())
        elif key in ("threshold", *PARAM_SHORT.values()):
            number = _value(text, key, value.strip())
            unit["preprocessor_params"][key] = int(number) if number.is_integer() and \
                key != "down_sampling_rate" else number
        else:
            raise UsageError(f"--control {text!r}: unknown key {key!r} (keys: "
                             f"{', '.join(list(FIELDS) + ['low', 'high', 'threshold', 'rate'])})")
    if "preprocessor" not in unit and default_preprocess:
        unit["preprocessor"] = default_preprocess
    return unit


def read_units(args) -> list:
    """The ``--control`` units as ControlUnits, hint images read and every value checked (before
    the model loads); the ControlNet files are found but loaded by the pipeline."""
    if not args.control:
        if args.control_preprocess:
            raise UsageError("--control-preprocess needs a --control unit")
        return []
    from pipelines import images
    from pipelines.control import ControlUnit, find_controlnet

    dirs = [args.controlnet_dir] if args.controlnet_dir else []
    if args.controlnet_dir and not Path(args.controlnet_dir).is_dir():
        raise CommandError(f"--controlnet-dir {args.controlnet_dir}: no such folder")
    units = []
    for text in args.control:
        fields = parse_unit(text, args.control_preprocess)
        try:
            fields["model"] = find_controlnet(fields["model"], dirs)
        except FileNotFoundError as exc:
            raise CommandError(str(exc)) from None
        fields["image"] = images.load_image(fields["image"])
        try:
            units.append(ControlUnit(**fields))
        except ValueError as exc:
            raise UsageError(f"--control {text!r}: {exc}") from None
    return units
