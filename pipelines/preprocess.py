"""PIL inputs → model tensors, and decoded tensors → PIL (with the inpainting composite).

Conventions follow diffusers' ``VaeImageProcessor`` so that the same PIL input gives the same tensor:
pixels/255 mapped linearly to [-1, 1], sizes rounded *down* to a multiple of 8 with a Lanczos resize,
masks binarised at 0.5 for the model.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image, ImageFilter

MULTIPLE = 8


def check_side(name: str, value: int) -> None:
    """An image height or width: a positive multiple of 8 (the autoencoder's downscale)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value % MULTIPLE:
        raise ValueError(f"{name} must be a multiple of {MULTIPLE}, got {value}")


def check_size(height: int, width: int) -> None:
    check_side("height", height)
    check_side("width", width)


def target_size(image: Image.Image, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) to generate at for an input image.

    Explicit sizes must be multiples of 8. Otherwise the image's own size is rounded down to a
    multiple of 8 (as diffusers does), with a warning (``warnings.warn``, shown on stderr) when that
    changes the size.
    """
    w, h = image.size
    rounded_h, rounded_w = h - h % MULTIPLE, w - w % MULTIPLE
    if height is None and width is None:
        if rounded_h == 0 or rounded_w == 0:
            raise ValueError(f"image is {w}x{h}; it must be at least {MULTIPLE}x{MULTIPLE} pixels")
        if (rounded_w, rounded_h) != (w, h):
            warnings.warn(f"image size {w}x{h} is not a multiple of {MULTIPLE}; resized to "
                          f"{rounded_w}x{rounded_h}", stacklevel=3)
    height = rounded_h if height is None else height
    width = rounded_w if width is None else width
    check_size(height, width)
    return height, width


def check_image(image, what: str = "image") -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} must be a PIL.Image.Image, got {type(image).__name__}")
    return image


def image_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """RGB image resized to (width, height) → (1, 3, H, W) float32 in [-1, 1]."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return (2.0 * x - 1.0).permute(2, 0, 1)[None]


def prepare_mask(mask, image_size: tuple[int, int], blur: int) -> Image.Image:
    """The user's mask as an "L" image of ``image_size`` (white = repaint), Gaussian-blurred by
    ``blur`` pixels. A mask of a different size is stretched to the image if its aspect ratio
    matches within 2 %; an empty mask is an error (there would be nothing to repaint)."""
    mask = check_image(mask, "mask")
    if isinstance(blur, bool) or not isinstance(blur, int) or blur < 0:
        raise ValueError(f"mask_blur must be an integer >= 0, got {blur!r}")
    iw, ih = image_size
    mw, mh = mask.size
    if (mw, mh) != (iw, ih):
        if abs(mw * ih - mh * iw) > 0.02 * iw * mh:
            raise ValueError(f"mask is {mw}x{mh} but the image is {iw}x{ih}: different aspect "
                             f"ratios, so the mask cannot be fitted to the image")
        mask = mask.resize((iw, ih), Image.LANCZOS)
    mask = mask.convert("L")
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    if mask.getbbox() is None:
        raise ValueError("mask is empty (all black): nothing to repaint; white marks the area to redraw")
    return mask


def mask_to_tensor(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W) float32 mask in {0, 1} at the generation size (binarised at 0.5, as diffusers)."""
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return (m >= 0.5).float()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoder output (B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8, rounded as diffusers does."""
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def composite(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Paste the generated image into the original through the (blurred) mask: where the mask is 0
    the original's pixels come back unchanged, bit for bit; the result has the original's size."""
    original = original.convert("RGB")
    if generated.size != original.size:
        generated = generated.resize(original.size, Image.LANCZOS)
    if mask.size != original.size:
        mask = mask.resize(original.size, Image.LANCZOS)
    return Image.composite(generated, original, mask)
