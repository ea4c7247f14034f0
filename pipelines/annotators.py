"""ControlNet preprocessors ("annotators") that need no model weights: photo → hint image.

Names, parameters and arithmetic follow AUTOMATIC1111's sd-webui-controlnet extension, so a hint made
here matches the one its preview shows for the same image and sliders, except that no resizing is done
here (the extension first resizes to its "Processor Res"; our generation path resizes hints itself).
Hints are white lines on black, the convention the ControlNet models were trained on.

OpenCV (``opencv-python-headless``) and numpy are imported inside the functions: the generation path
imports this module only when a preprocessor other than "none" is asked for, and ``ldm --help`` never.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PREPROCESSORS = ("none", "canny", "scribble_xdog", "lineart_standard", "threshold", "invert",
                 "tile_resample")

# Those whose arithmetic uses OpenCV (Gaussian blurs, Canny, area resizing).
_NEEDS_OPENCV = frozenset({"canny", "scribble_xdog", "lineart_standard", "tile_resample"})


@dataclass(frozen=True)
class Param:
    """One preprocessor parameter: an ``int`` when ``default`` is an int, else a ``float``.

    ``a1111_label`` is the slot the extension stores it in ("Threshold A" / "Threshold B", its API's
    ``threshold_a`` / ``threshold_b``, written that way in its PNG infotext); ``description`` is the
    slider's caption in its UI.
    """
    name: str
    default: int | float
    low: int | float
    high: int | float
    a1111_label: str
    description: str = ""

    @property
    def kind(self) -> type:
        return int if isinstance(self.default, int) else float


PARAMETERS: dict[str, tuple[Param, ...]] = {
    "none": (),
    "canny": (Param("low_threshold", 100, 1, 255, "Threshold A", "Canny Low Threshold"),
              Param("high_threshold", 200, 1, 255, "Threshold B", "Canny High Threshold")),
    "scribble_xdog": (Param("threshold", 32, 1, 64, "Threshold A", "XDoG Threshold"),),
    "lineart_standard": (),
    "threshold": (Param("threshold", 127, 0, 255, "Threshold A", "Binarization Threshold"),),
    "invert": (),
    "tile_resample": (Param("down_sampling_rate", 1.0, 1.0, 8.0, "Threshold A",
                            "Down Sampling Rate"),),
}


class OpenCVMissing(RuntimeError):
    """OpenCV is not installed; the message says which preprocessor needs it and how to install it."""


def _check_name(name: str) -> None:
    if name not in PARAMETERS:
        raise ValueError(f"unknown preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}")


def _check_value(name: str, p: Param, value: Any) -> int | float:
    # bool is an int subclass, but "threshold=True" is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: {p.name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: {p.name} must be a finite number, got {value!r}")
    if p.kind is int:
        if value != int(value):
            raise ValueError(f"{name}: {p.name} must be a whole number, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if not p.low <= value <= p.high:
        raise ValueError(f"{name}: {p.name} must be between {p.low} and {p.high}, got {value!r}")
    return value


def check(name: str, params: dict) -> dict:
    """``params`` validated for preprocessor ``name``, with the defaults filled in.

    Raises ValueError (one line naming the problem) for an unknown preprocessor or parameter, a value
    that is not a number or out of range, and canny's low threshold above its high one.
    """
    _check_name(name)
    known = {p.name: p for p in PARAMETERS[name]}
    unknown = [k for k in params if k not in known]
    if unknown:
        allowed = ", ".join(known) if known else "none"
        raise ValueError(f"{name}: unknown parameter {unknown[0]!r} (its parameters: {allowed})")
    out = {p.name: _check_value(name, p, params[p.name]) if p.name in params else p.default
           for p in PARAMETERS[name]}
    if name == "canny" and out["low_threshold"] > out["high_threshold"]:
        raise ValueError(f"canny: low_threshold ({out['low_threshold']}) is above high_threshold "
                         f"({out['high_threshold']})")
    return out


def _cv2(name: str):
    try:
        import cv2
    except ImportError:
        raise OpenCVMissing(f"OpenCV is needed for the {name} preprocessor: "
                            "pip install opencv-python-headless") from None
    return cv2


def _rgb(mask):
    """A 2-D uint8 array as an H×W×3 array: hints are RGB images."""
    import numpy as np
    return np.repeat(mask[:, :, None], 3, axis=2)


def _canny(x, cv2, low_threshold, high_threshold):
    return _rgb(cv2.Canny(x, low_threshold, high_threshold))


def _scribble_xdog(x, cv2, threshold):
    import numpy as np
    x = x.astype(np.float32)
    # Difference of Gaussians: positive where a pixel is darker than its wide surroundings (a line).
    fine = cv2.GaussianBlur(x, (0, 0), 0.5)
    wide = cv2.GaussianBlur(x, (0, 0), 5.0)
    darkness = np.clip((wide - fine).min(axis=2), 0, 255)
    return _rgb(np.where(2 * darkness > threshold, 255, 0).astype(np.uint8))


def _lineart_standard(x, cv2):
    import numpy as np
    x = x.astype(np.float32)
    blur = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.clip((blur - x).min(axis=2), 0, 255)
    # Normalise by the typical line strength so faint and bold drawings give similar hints;
    # 16 keeps noise on a flat image from being stretched to full lines.
    lines = intensity[intensity > 8]
    scale = max(16.0, float(np.median(lines))) if lines.size else 16.0
    return _rgb(np.clip(intensity / scale * 127, 0, 255).astype(np.uint8))


def _threshold(x, cv2, threshold):
    import numpy as np
    # The extension compares the darkest channel (not luma): white only where every channel is bright.
    return _rgb(np.where(x.min(axis=2) > threshold, 255, 0).astype(np.uint8))


def _tile_resample(x, cv2, down_sampling_rate):
    if down_sampling_rate < 1.1:  # the extension's cut-off: below it the image is passed through
        return x
    h, w = x.shape[:2]
    size = (max(1, int(w / down_sampling_rate)), max(1, int(h / down_sampling_rate)))
    return cv2.resize(x, size, interpolation=cv2.INTER_AREA)


_FUNCTIONS = {
    "canny": _canny,
    "scribble_xdog": _scribble_xdog,
    "lineart_standard": _lineart_standard,
    "threshold": _threshold,
    "invert": lambda x, cv2: 255 - x,
    "tile_resample": _tile_resample,
}


def run(name: str, image, **params):
    """The hint image of preprocessor ``name`` for ``image`` (converted to RGB first).

    The result is an RGB image of the input's size, except for ``tile_resample``: it returns the image
    shrunk by ``down_sampling_rate`` (area interpolation; a rate below 1.1 leaves it as is) so the
    ControlNet tile model sees a blurrier version once the hint is resized back to the output size.
    Parameters are checked with :func:`check`.
    """
    import numpy as np
    from PIL import Image

    values = check(name, params)
    image = image.convert("RGB")
    if name == "none":
        return image.copy()
    cv2 = _cv2(name) if name in _NEEDS_OPENCV else None
    x = np.asarray(image, dtype=np.uint8)
    return Image.fromarray(np.ascontiguousarray(_FUNCTIONS[name](x, cv2, **values)), "RGB")
