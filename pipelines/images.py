"""Image files in and out: loading inputs and masks, atomic PNG output, A1111 ``parameters`` text.

The ``parameters`` text chunk follows the layout AUTOMATIC1111's web UI writes and reads, so images made
here open in the tools people already use (A1111 "PNG Info", ComfyUI, civitai):

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>
    Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789, ...

The last line is a comma-separated list of ``Key: value`` pairs; a value holding a comma, colon, quote
or newline is written as a JSON string. Pillow is imported inside the functions, so importing this
module costs nothing on the command line's start-up path.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

# Our scheduler names → the sampler names A1111 shows (its "DPM++ 2M Karras" style, one field).
SAMPLER_NAMES = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "pndm": "PLMS",  # diffusers' SD PNDM skips the Runge-Kutta warm-up: the PLMS of the LDM paper
    "lms": "LMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_sde_karras": "DPM++ SDE Karras",
    "unipc": "UniPC",
}
_SAMPLER_BY_DISPLAY = {v.lower(): k for k, v in SAMPLER_NAMES.items()}


def scheduler_from_display(name: str) -> str:
    """Our scheduler name for an A1111 sampler name ("DPM++ 2M Karras" → dpmpp_2m_karras); an
    unknown name comes back unchanged."""
    return _SAMPLER_BY_DISPLAY.get(name.strip().lower(), name)

_NEGATIVE = "Negative prompt:"
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/+.()]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NEEDS_QUOTES = re.compile(r'[,:"\n]')


# ---------------------------------------------------------------- loading
def _open(path, what: str):
    """Open and fully decode an image file; every failure becomes one ValueError naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} {path}: no such file")
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a folder, not an image file")
    try:
        with Image.open(path) as im:
            im.load()
            # Phone photos store "rotate 90°" in EXIF; apply it so the pixels are upright.
            return ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise ValueError(f"{what} {path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{what} {path}: too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data, unreadable file
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ValueError(f"{what} {path}: cannot read image ({reason})") from None


def load_image(path) -> "Image.Image":
    """An RGB image, EXIF rotation applied.

    Transparent pixels are composited on white (what flattening in an image editor gives); a bare
    ``convert("RGB")`` would expose whatever colour hides under alpha 0, often black.
    """
    from PIL import Image

    im = _open(path, "image")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        im = flat
    return im.convert("RGB")


def load_mask(path, size: tuple[int, int]) -> "Image.Image":
    """A grayscale ("L") inpainting mask of ``size`` (width, height): white = repaint, black = keep.

    A mask of another size is resized with NEAREST (no new grey levels at the edge); then
    ``mask.info["resized_from"]`` holds the original size so callers can say so.
    """
    from PIL import Image

    im = _open(path, "mask")
    mask = im.convert("L")
    size = (int(size[0]), int(size[1]))
    if mask.size != size:
        original = mask.size
        mask = mask.resize(size, Image.NEAREST)
        mask.info["resized_from"] = original
    return mask


def describe_mask(mask, path) -> list[str]:
    """Notes worth telling a user about a mask returned by :func:`load_mask`."""
    notes = []
    if "resized_from" in mask.info:
        (w, h), (tw, th) = mask.info["resized_from"], mask.size
        stretched = abs(w / h - tw / th) > 0.01 * (tw / th)
        notes.append(f"mask {path} is {w}x{h}; resized to the image's {tw}x{th}"
                     + (" (aspect ratio differs: stretched)" if stretched else ""))
    low, high = mask.getextrema()
    if high < 128:
        notes.append(f"mask {path} is black everywhere: nothing will be repainted")
    return notes


# ---------------------------------------------------------------- saving
def numbered_paths(path, n: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png`` … ``out-{n-1}.png`` for several."""
    path = Path(path)
    if n < 1:
        raise ValueError(f"number of images must be at least 1, got {n}")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def save_png(image, path, params: dict | None = None) -> None:
    """Write ``image`` as PNG with an A1111 ``parameters`` chunk, atomically.

    The bytes go to a temporary file in the destination folder, which then replaces ``path`` in one
    rename: a reader (or a crash) never sees half a file. Missing parent folders are created.
    """
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path}: is a folder; give a file name such as {path / 'out.png'}")
    info = None
    if params:
        info = PngInfo()
        info.add_text("parameters", format_parameters(params))  # falls back to iTXt for non-Latin-1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"output {path}: cannot create folder {path.parent} "
                         f"({exc.strerror or exc})") from None
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with 0o666 lets the umask decide permissions, as for any newly written file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ValueError(f"output {path}: cannot write ({exc.strerror or exc})") from None
        raise


def read_parameters(path) -> str | None:
    """The ``parameters`` text stored in an image file, or None when it has none."""
    im = _open(path, "image")
    text = im.info.get("parameters")
    return text if isinstance(text, str) else None


# ---------------------------------------------------------------- parameters text
def model_hash(path) -> str | None:
    """A1111's short model hash: the first 10 hex digits of the file's sha256 (None without a file)."""
    if not path or not Path(path).is_file():  # no path, or a diffusers folder: nothing to hash
        return None
    from ldm.weights_io import file_hash  # cached per file version: each file is read once
    return file_hash(path)[:10]


def _num(x) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if _NEEDS_QUOTES.search(value) else value


def _fields(params: dict) -> list[tuple[str, str]]:
    """The ``Key: value`` pairs of the last line, in A1111's order, skipping what is unknown."""
    p = params
    out: list[tuple[str, str]] = []

    def put(key, value):
        if value is not None and value != "":
            out.append((key, value))

    put("Steps", None if p.get("steps") is None else str(int(p["steps"])))
    sampler = p.get("sampler")
    put("Sampler", SAMPLER_NAMES.get(sampler, sampler))
    put("CFG scale", None if p.get("cfg_scale") is None else _num(p["cfg_scale"]))
    put("Seed", None if p.get("seed") is None else str(int(p["seed"])))
    if p.get("width") is not None and p.get("height") is not None:
        put("Size", f"{int(p['width'])}x{int(p['height'])}")
    put("Model hash", p.get("model_hash") or model_hash(p.get("model_path")))
    put("Model", p.get("model"))
    if p.get("strength") is not None:
        put("Denoising strength", _num(p["strength"]))
    if p.get("mode") == "inpaint":
        put("Mask blur", str(int(p.get("mask_blur") or 0)))
    # A1111 counts CLIP layers from 1 ("Clip skip: 2" = penultimate); ours counts skipped blocks.
    if p.get("clip_skip"):
        put("Clip skip", str(int(p["clip_skip"]) + 1))
    if p.get("eta"):
        put("Eta", _num(p["eta"]))
    if p.get("guidance_rescale"):
        put("CFG rescale", _num(p["guidance_rescale"]))
    # Keys already in A1111 spelling (from a parsed text) pass through unchanged.
    for key, value in p.items():
        if key[:1].isupper() and value is not None:
            put(key, str(value))
    return out


def format_parameters(params: dict) -> str:
    """The A1111 ``parameters`` text for one image (keys as in ``GenerationResult.parameters``)."""
    prompt = str(params.get("prompt") or "")
    negative = str(params.get("negative_prompt") or "")
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in _fields(params))
    text = prompt + (f"\n{_NEGATIVE} {negative}" if negative else "")
    return f"{text}\n{line}".strip("\n") if line else text


def _pairs(line: str) -> list[tuple[str, str]]:
    pairs = []
    for key, value in _PAIR.findall(line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        pairs.append((key.strip(), value))
    return pairs


def parse_parameters(text: str) -> dict[str, Any]:
    """Read an A1111 ``parameters`` text back into the keys :func:`format_parameters` takes.

    Known fields come back typed under our names (``steps``, ``sampler`` as our scheduler name,
    ``cfg_scale``, ``seed``, ``width``/``height``, ``strength``, ``clip_skip`` in our counting, …);
    any other ``Key: value`` pair is kept under its own name, so nothing is lost. ``mode`` is
    inferred: a mask blur means inpainting, a denoising strength alone means img2img.
    """
    lines = text.strip("\n").split("\n")
    pairs: list[tuple[str, str]] = []
    # The last line holds the settings only if it parses as several pairs (as A1111 decides too);
    # otherwise a prompt line with a colon in it would be mistaken for settings.
    if lines and len(_pairs(lines[-1])) >= 3:
        pairs = _pairs(lines.pop())
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in lines:
        if target is prompt and line.startswith(_NEGATIVE):
            target = negative
            line = line[len(_NEGATIVE):].lstrip(" ")
        target.append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}

    raw = dict(pairs)
    number = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
              "Denoising strength": ("strength", float), "Mask blur": ("mask_blur", int),
              "Eta": ("eta", float), "CFG rescale": ("guidance_rescale", float)}
    for key, value in raw.items():
        try:
            if key in number:
                name, kind = number[key]
                out[name] = kind(value)
            elif key == "Size":
                w, h = value.lower().split("x")
                out["width"], out["height"] = int(w), int(h)
            elif key == "Clip skip":
                out["clip_skip"] = max(int(value) - 1, 0)
            elif key == "Sampler":
                out["sampler"] = _SAMPLER_BY_DISPLAY.get(value.lower(), value)
            elif key == "Model hash":
                out["model_hash"] = value
            elif key == "Model":
                out["model"] = value
            elif key != "Schedule type":
                out[key] = value
        except ValueError:
            out[key] = value  # keep a malformed value as text rather than fail on someone's file
    # Newer A1111 writes the sigma schedule in its own field: "Sampler: DPM++ 2M, Schedule type: Karras".
    schedule = raw.get("Schedule type", "").lower()
    if schedule and schedule not in ("automatic", "uniform"):
        display = f"{raw.get('Sampler', '')} {raw['Schedule type']}".lower()
        out["sampler"] = _SAMPLER_BY_DISPLAY.get(display, out.get("sampler"))
        if display not in _SAMPLER_BY_DISPLAY:
            out["Schedule type"] = raw["Schedule type"]
    if pairs:
        out["mode"] = ("inpaint" if "mask_blur" in out else
                       "img2img" if "strength" in out and not any(k.startswith("Hires") for k in out)
                       else "txt2img")
    return out
