"""Image I/O: A1111 parameters text, atomic PNG writes, input images and masks."""
from __future__ import annotations

import hashlib
import os

import pytest
from PIL import Image, PngImagePlugin

from pipelines import images
from pipelines.images import (SAMPLER_NAMES, format_parameters, load_image, load_mask,
                              numbered_paths, parse_parameters, read_parameters, save_png)

PARAMS = dict(prompt="a red circle, (on blue:1.2)", negative_prompt="blurry", steps=25,
              sampler="dpmpp_2m", cfg_scale=7.5, seed=42, width=512, height=768, model="tiny-shapes",
              model_path=None, strength=None, clip_skip=0, eta=0.0, mode="txt2img")


def stored(params: dict) -> dict:
    """What the text keeps of a parameters dict: everything but the file path and zero defaults."""
    out = {k: v for k, v in params.items() if k not in ("model_path",) and v is not None}
    for k in ("clip_skip", "eta"):
        if not out.get(k):
            out.pop(k, None)
    return out


def test_format_matches_a1111_layout():
    text = format_parameters(PARAMS)
    assert text == ("a red circle, (on blue:1.2)\n"
                    "Negative prompt: blurry\n"
                    "Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 512x768, "
                    "Model: tiny-shapes")


def test_img2img_and_inpaint_fields():
    p = dict(PARAMS, mode="img2img", strength=0.6, clip_skip=1, eta=0.25, cfg_scale=7.0,
             sampler="euler_a", model_hash="0123456789")
    line = format_parameters(p).splitlines()[-1]
    assert line == ("Steps: 25, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, "
                    "Model hash: 0123456789, Model: tiny-shapes, Denoising strength: 0.6, "
                    "Clip skip: 2, Eta: 0.25")
    back = parse_parameters(format_parameters(p))
    assert back == stored(p)
    inpaint = dict(p, mode="inpaint", mask_blur=4)
    back = parse_parameters(format_parameters(inpaint))
    assert back["mode"] == "inpaint" and back["mask_blur"] == 4 and back["strength"] == 0.6


@pytest.mark.parametrize("name", sorted(SAMPLER_NAMES))
def test_every_sampler_round_trips(name):
    back = parse_parameters(format_parameters(dict(PARAMS, sampler=name)))
    assert back["sampler"] == name


def test_round_trip_hard_prompts():
    p = dict(PARAMS, prompt='line one, "quoted", colon: here\nline two: Steps: 3, Seed: 4, x: 5',
             negative_prompt="bad, ugly\nNegative prompt: twice", model='odd: "name", v2',
             seed=2**63 + 5, cfg_scale=0.123456789)
    assert parse_parameters(format_parameters(p)) == stored(p)


def test_unicode_prompt_round_trips_through_png(tmp_path):
    p = dict(PARAMS, prompt="ein Bär am Fluss — 川の熊 🐻")
    save_png(Image.new("RGB", (16, 8), "red"), tmp_path / "u.png", p)
    assert parse_parameters(read_parameters(tmp_path / "u.png")) == stored(p)


def test_parse_text_written_by_a1111():
    text = ("masterpiece, 1girl, (smile:1.1)\n"
            "Negative prompt: lowres, bad anatomy\n"
            "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, "
            "Size: 640x896, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, "
            'Clip skip: 2, Lora hashes: "detail: 1a2b3c4d5e6f, style: 0f9e8d7c6b5a", Hires upscale: 2, '
            "Version: v1.10.1")
    p = parse_parameters(text)
    assert p == {"prompt": "masterpiece, 1girl, (smile:1.1)", "negative_prompt": "lowres, bad anatomy",
                 "steps": 30, "sampler": "dpmpp_2m_karras", "cfg_scale": 6.5, "seed": 3141592653,
                 "width": 640, "height": 896, "model_hash": "6ce0161689", "model": "v1-5-pruned-emaonly",
                 "strength": 0.45, "clip_skip": 1,
                 "Lora hashes": "detail: 1a2b3c4d5e6f, style: 0f9e8d7c6b5a", "Hires upscale": "2",
                 "Version": "v1.10.1", "mode": "txt2img"}
    # Unknown fields survive a write: nothing of someone else's file is lost.
    again = parse_parameters(format_parameters(p))
    assert again == p


def test_parse_without_settings_line():
    assert parse_parameters("just a prompt: with a colon") == {
        "prompt": "just a prompt: with a colon", "negative_prompt": ""}
    only = parse_parameters("Steps: 5, Sampler: DDIM, CFG scale: 3, Seed: 1, Size: 64x64")
    assert only["prompt"] == "" and only["sampler"] == "ddim" and only["mode"] == "txt2img"


def test_model_hash_is_sha256_prefix(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(os.urandom(3000))
    expected = hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    text = format_parameters(dict(PARAMS, model_path=str(f)))
    assert f"Model hash: {expected}, Model: tiny-shapes" in text
    assert "Model hash" not in format_parameters(dict(PARAMS, model_path=None))


def test_numbered_paths(tmp_path):
    assert numbered_paths(tmp_path / "out.png", 1) == [tmp_path / "out.png"]
    assert numbered_paths("a/out.png", 3) == [images.Path(f"a/out-{i}.png") for i in range(3)]
    with pytest.raises(ValueError, match="at least 1"):
        numbered_paths("out.png", 0)


# ---------------------------------------------------------------- saving
def test_save_png_creates_folder_and_leaves_no_temp(tmp_path):
    out = tmp_path / "new" / "deeper" / "x.png"
    save_png(Image.new("RGB", (24, 16), (10, 20, 30)), out, PARAMS)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (24, 16) and im.getpixel((0, 0)) == (10, 20, 30)
        assert im.info["parameters"] == format_parameters(PARAMS)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_png_failure_keeps_old_file_and_no_temp(tmp_path):
    out = tmp_path / "x.png"
    save_png(Image.new("RGB", (8, 8), "white"), out)
    before = out.read_bytes()

    class Broken:
        def save(self, f, **kw):
            f.write(b"\x89PNG half")
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        save_png(Broken(), out, PARAMS)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    with pytest.raises(ValueError, match="is a folder"):
        save_png(Image.new("RGB", (8, 8)), tmp_path)


def test_save_without_params_has_no_chunk(tmp_path):
    save_png(Image.new("RGB", (8, 8)), tmp_path / "p.png", None)
    assert read_parameters(tmp_path / "p.png") is None


# ---------------------------------------------------------------- loading
def test_load_image_flattens_alpha_on_white(tmp_path):
    im = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (0, 0, 255, 128))
    im.save(tmp_path / "a.png")
    rgb = load_image(tmp_path / "a.png")
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (255, 0, 0)
    assert rgb.getpixel((2, 0)) in {(127, 127, 255), (128, 128, 255)}


def test_load_image_applies_exif_rotation(tmp_path):
    im = Image.new("RGB", (6, 3), "black")
    im.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    upright = load_image(tmp_path / "r.jpg")
    assert upright.size == (3, 6)
    assert upright.getpixel((2, 0))[0] > 200  # the top-left pixel ends at the top right


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.write_text("hello, not pixels"), "not an image file"),
    (lambda p: p.write_bytes(_png_bytes()[:60]), "cannot read image"),
])
def test_load_image_errors(tmp_path, make, message):
    path = tmp_path / "in.png"
    make(path)
    with pytest.raises(ValueError, match=message) as err:
        load_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def _png_bytes() -> bytes:
    import io
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, format="PNG")
    return buf.getvalue()


def test_load_mask_resizes_with_nearest_and_says_so(tmp_path):
    m = Image.new("L", (4, 4), 0)
    m.paste(255, (2, 0, 4, 4))  # right half white
    m.save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", (16, 8))
    assert mask.mode == "L" and mask.size == (16, 8)
    assert set(mask.tobytes()) == {0, 255}  # NEAREST: no grey edge
    assert mask.getpixel((7, 3)) == 0 and mask.getpixel((8, 3)) == 255
    assert mask.info["resized_from"] == (4, 4)
    notes = images.describe_mask(mask, "m.png")
    assert notes == ["mask m.png is 4x4; resized to the image's 16x8 (aspect ratio differs: stretched)"]
    same = load_mask(tmp_path / "m.png", (4, 4))
    assert "resized_from" not in same.info and images.describe_mask(same, "m.png") == []


def test_load_mask_rgb_and_black(tmp_path):
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "k.png")
    mask = load_mask(tmp_path / "k.png", (8, 8))
    assert images.describe_mask(mask, "k.png") == ["mask k.png is black everywhere: nothing will be repainted"]
    (tmp_path / "t.txt").write_text("no")
    with pytest.raises(ValueError, match=r"^mask .*t.txt: not an image file"):
        load_mask(tmp_path / "t.txt", (8, 8))


def test_pngs_written_by_pillow_elsewhere_are_read(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x\nSteps: 1, Sampler: Euler, CFG scale: 1, Seed: 0, Size: 8x8")
    Image.new("RGB", (8, 8)).save(tmp_path / "o.png", pnginfo=info)
    assert parse_parameters(read_parameters(tmp_path / "o.png"))["sampler"] == "euler"
