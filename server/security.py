"""What keeps a server that others can reach safe: HTTP Basic credentials, limits on what one
request may ask for, images decoded under a pixel budget, and model/LoRA/ControlNet names looked
up only among the files of the configured folders (a client never supplies a path)."""
from __future__ import annotations

import base64
import binascii
import io
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin")


class Refused(Exception):
    """A request refused with ``status`` (413, 422, 401...) and a message naming what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 << 20  # a few base64 images of 2048² fit
    max_pixels: int = 2048 * 2048  # width × height of an image to make
    max_images: int = 64  # batch_size × n_iter
    max_steps: int = 150  # A1111's slider maximum
    max_input_pixels: int = 4096 * 4096  # an uploaded image, checked before it is decoded

    def check(self, *, width: int, height: int, images: int, steps: int) -> None:
        if width * height > self.max_pixels:
            raise Refused(422, f"width x height: {width}x{height} is more than the limit of "
                          f"{self.max_pixels} pixels")
        if images > self.max_images:
            raise Refused(422, f"batch_size x n_iter: {images} images is more than the limit of "
                          f"{self.max_images}")
        if steps > self.max_steps:
            raise Refused(422, f"steps: {steps} is more than the limit of {self.max_steps}")


def parse_credentials(text: str | None) -> dict[str, str]:
    """``USER:PASS[,USER:PASS...]`` → {user: password}; ValueError for a malformed entry."""
    if not text:
        return {}
    out = {}
    for entry in text.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth entries must be USER:PASS, got {entry.strip()!r}")
        out[user] = password
    return out


def check_basic_auth(header: str | None, credentials: dict[str, str]) -> bool:
    """Whether an ``Authorization: Basic ...`` header names a user with the right password; the
    comparison takes the same time for any wrong password."""
    if not credentials:
        return True
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = credentials.get(user, "")
    ok = secrets.compare_digest(password.encode(), expected.encode())
    return ok and user in credentials


def decode_image(data: str, field: str, limits: Limits):
    """A base64 image (a ``data:image/...;base64,`` URL too) → a fully loaded PIL image. URLs are
    not fetched; the pixel count is checked from the header before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or not data.strip():
        raise Refused(422, f"{field}: expected a base64-encoded image")
    text = data.strip()
    if text.startswith(("http://", "https://")):
        raise Refused(422, f"{field}: image URLs are not fetched; send the image as base64")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(422, f"{field}: not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            w, h = im.size
            if w * h > limits.max_input_pixels:
                raise Refused(413, f"{field}: image is {w}x{h}, more than the limit of "
                              f"{limits.max_input_pixels} pixels")
            im.load()
    except Refused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Refused(413, f"{field}: image too large ({exc})") from None
    except UnidentifiedImageError:
        raise Refused(422, f"{field}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise Refused(422, f"{field}: cannot decode the image ({exc})") from None
    return im


class Folder:
    """Files with ``suffixes`` under ``root`` (subfolders included), by name: a client names a
    file as ``sub/name.safetensors``, ``name.safetensors`` or ``name``, never by path."""

    def __init__(self, root, suffixes: tuple[str, ...], what: str, extra: list[Path] = ()):
        self.root = Path(root).expanduser().resolve() if root else None
        self.suffixes = suffixes
        self.what = what
        self.extra = [Path(p).resolve() for p in extra]  # files the operator named on the command line
        self.files: dict[str, Path] = {}
        self.refresh()

    def refresh(self) -> None:
        files: dict[str, Path] = {p.name: p for p in self.extra}
        if self.root is not None and self.root.is_dir():
            for p in sorted(self.root.rglob("*")):
                if p.suffix.lower() in self.suffixes and p.is_file():
                    files[p.relative_to(self.root).as_posix()] = p
        self.files = files

    def resolve(self, name: str, field: str) -> Path:
        """The file a client's name means, looked up among the listed files only."""
        if not isinstance(name, str) or not name.strip():
            raise Refused(422, f"{field}: expected the name of a {self.what}")
        key = name.strip()
        if key.endswith("]") and " [" in key:  # A1111's title: "name.safetensors [hash]"
            key = key[: key.rindex(" [")]
        if ".." in Path(key).parts or key.startswith(("/", "\\")) or ":" in key:
            raise Refused(422, f"{field}: {name!r} is a path; give the name of a {self.what} "
                          f"from the list")
        for rel, path in self.files.items():
            if key in (rel, Path(rel).stem, Path(rel).with_suffix("").as_posix()):
                return path
        raise Refused(422, f"{field}: no {self.what} named {name!r}")

    def name_of(self, path: Path) -> str:
        for rel, p in self.files.items():
            if p == Path(path).resolve():
                return rel
        return Path(path).name
