"""Inpainting "only masked" (A1111's ``inpaint_full_res``) and its "fill" start.

Only masked: the mask's bounding box, grown by ``padding`` pixels and then to the aspect ratio of
the size asked for, is cut out, scaled to that size, inpainted there (so a small region gets the
model's full resolution), scaled back and pasted into the untouched original through the mask.

Fill (A1111's ``inpainting_fill`` 0): the masked pixels are replaced by the colours around them
before the image is encoded, so the old content does not steer the new one.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from .pipeline import GenerationResult, Pipeline
from .preprocess import MULTIPLE, prepare_mask


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple | None:
    """(x1, y1, x2, y2) to cut out for a mask, or None when the mask is empty. The box holds the
    mask's white pixels plus ``padding``, grown (inside the image where it can) to width:height."""
    box = mask.convert("L").point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    w, h = mask.size
    x1, y1 = max(box[0] - padding, 0), max(box[1] - padding, 0)
    x2, y2 = min(box[2] + padding, w), min(box[3] + padding, h)
    # grow the short side to the target aspect ratio, centred, shifted back inside the image
    bw, bh = x2 - x1, y2 - y1
    if bw * height < bh * width:
        x1, x2 = _grow(x1, x2, round(bh * width / height), w)
    else:
        y1, y2 = _grow(y1, y2, round(bw * height / width), h)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    size = min(size, limit)
    lo = max(lo - (size - (hi - lo)) // 2, 0)
    hi = lo + size
    if hi > limit:
        lo, hi = limit - size, limit
    return lo, hi


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` with the pixels where ``mask`` is fully white replaced by a smooth blend of the
    unmasked colours around them (normalised blurs at shrinking radii, widest first)."""
    from scipy.ndimage import gaussian_filter

    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    hole = np.asarray(mask.convert("L")) == 255
    if not hole.any() or hole.all():
        return image.convert("RGB")
    keep = (~hole).astype(np.float64)
    out = rgb.copy()
    for sigma in (max(image.size) / 4, max(image.size) / 16, 4, 1):
        weight = gaussian_filter(keep, sigma)
        for c in range(3):
            blurred = gaussian_filter(rgb[..., c] * keep, sigma)
            filled = np.where(weight > 1e-6, blurred / np.maximum(weight, 1e-6), out[..., c])
            out[..., c] = np.where(hole, filled, out[..., c])
    return Image.fromarray(np.clip(out.round(), 0, 255).astype(np.uint8))


def soft_mask(mask: Image.Image, blur: int) -> Image.Image:
    mask = mask.convert("L")
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask


def inpaint_only_masked(pipe: Pipeline, prompt, image: Image.Image, mask: Image.Image, *,
                        width: int, height: int, padding: int = 0, mask_blur: int = 0,
                        fill: bool = False, **kwargs) -> GenerationResult | None:
    """Inpaint the mask's region at width × height and paste it back; the result has the
    original's size. None when the mask is empty (nothing to cut out). ``kwargs`` go to
    :meth:`Pipeline.inpaint` (seed, steps, scheduler, strength, callback...)."""
    if width % MULTIPLE or height % MULTIPLE:
        raise ValueError(f"width and height must be multiples of {MULTIPLE}, got {width}x{height}")
    image = image.convert("RGB")
    mask = mask.convert("L").resize(image.size, Image.LANCZOS) if mask.size != image.size else mask.convert("L")
    box = crop_region(mask, padding, width, height)
    if box is None:
        return None
    blurred = soft_mask(mask, mask_blur)
    crop = image.crop(box).resize((width, height), Image.LANCZOS)
    crop_mask = blurred.crop(box).resize((width, height), Image.LANCZOS)
    if fill:
        crop = fill_masked(crop, crop_mask)
    result = pipe.inpaint(prompt, crop, crop_mask, width=width, height=height, **kwargs)
    size = (box[2] - box[0], box[3] - box[1])
    region = blurred.crop(box)
    images = []
    for generated in result.images:
        patch = generated.resize(size, Image.LANCZOS)
        out = image.copy()
        out.paste(Image.composite(patch, image.crop(box), region), box[:2])
        images.append(out)
    for p in result.parameters:
        p.update({"mask_blur": mask_blur, "Inpaint area": "Only masked",
                  "Masked area padding": padding})
    result.images = images
    return result


def inpaint_whole(pipe: Pipeline, prompt, image: Image.Image, mask: Image.Image, *,
                  mask_blur: int = 0, fill: bool = False, **kwargs) -> GenerationResult:
    """Inpaint at the image's own size; with ``fill`` the fully masked pixels start from the
    surrounding colours (the pipeline composites through the blurred mask, where the filled and
    original pixels agree, so the unmasked ones still come back unchanged)."""
    image = image.convert("RGB")
    start = fill_masked(image, prepare_mask(mask, image.size, mask_blur)) if fill else image
    return pipe.inpaint(prompt, start, mask, mask_blur=mask_blur, **kwargs)
