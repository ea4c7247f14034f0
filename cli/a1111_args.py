"""Options that carry AUTOMATIC1111 habits into the generation commands: the hires fix
(``--hr-*``, txt2img), saved styles (``--style`` from a ``styles.csv``) and repeating a generation
from its PNG parameters (``--parameters-from``). Nothing heavy is imported here."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from cli.args import CommandError, UsageError, number

HR_FLAGS = ("hr_scale", "hr_resize_x", "hr_resize_y")


def add_options(p: argparse.ArgumentParser, command: str) -> None:
    if command == "txt2img":
        h = p.add_argument_group("hires fix (a second pass at a larger size, as A1111's)")
        h.add_argument("--hr-scale", type=number(float, 1.0, 8.0), metavar="X",
                       help="upscale the first pass by X (turns the hires fix on)")
        h.add_argument("--hr-resize-x", type=number(int, 0), default=0, metavar="W",
                       help="or upscale to this width (and/or --hr-resize-y; both: cover and crop)")
        h.add_argument("--hr-resize-y", type=number(int, 0), default=0, metavar="H")
        h.add_argument("--hr-upscaler", default="Latent", metavar="NAME",
                       help="Latent (default), 'Latent (antialiased)', 'Latent (bicubic)', "
                            "'Latent (bicubic antialiased)', 'Latent (nearest)', "
                            "'Latent (nearest-exact)', Lanczos, Nearest")
        h.add_argument("--hr-denoising-strength", type=number(float, 0.0, 1.0), default=0.7,
                       metavar="S", help="the second pass's strength (default: 0.7)")
        h.add_argument("--hr-steps", type=number(int, 0), default=0, metavar="N",
                       help="the second pass's steps (default 0: the first pass's)")
        h.add_argument("--hr-sampler", metavar="NAME", help="the second pass's scheduler")
        h.add_argument("--hr-prompt", metavar="TEXT", help="the second pass's prompt")
        h.add_argument("--hr-negative-prompt", metavar="TEXT")
        r = p.add_argument_group("refiner (a second model finishes the denoising)")
        r.add_argument("--refiner", metavar="PATH",
                       help="a checkpoint (e.g. SDXL's refiner) that takes the still-noisy latents "
                            "over at --refiner-switch and finishes them (A1111's Refiner)")
        r.add_argument("--refiner-switch", type=number(float, 0.0, 1.0), default=0.8, metavar="F",
                       help="the fraction of the schedule after which the refiner takes over "
                            "(default: 0.8; diffusers' denoising_end / denoising_start)")
    a = p.add_argument_group("styles and saved parameters")
    a.add_argument("--style", action="append", default=[], metavar="NAME",
                   help="apply a saved style (repeatable): its prompt replaces {prompt} in it, or "
                        "is appended after a comma; the same for its negative prompt")
    a.add_argument("--styles-file", default="styles.csv", metavar="CSV",
                   help="A1111's styles file: name,prompt,negative_prompt (default: styles.csv)")
    a.add_argument("--parameters-from", metavar="PNG|TXT",
                   help="repeat a generation from an image's parameters (or a text file in A1111's "
                        "layout); options given on the command line win")


def hires_from(args):
    """The ``HiresFix`` the ``--hr-*`` options ask for, or None."""
    if getattr(args, "hr_scale", None) is None and not getattr(args, "hr_resize_x", 0) \
            and not getattr(args, "hr_resize_y", 0):
        return None
    from pipelines.hires import HiresFix

    try:
        return HiresFix(scale=args.hr_scale or 2.0, resize_x=args.hr_resize_x,
                        resize_y=args.hr_resize_y, upscaler=args.hr_upscaler,
                        denoising_strength=args.hr_denoising_strength, steps=args.hr_steps,
                        sampler=args.hr_sampler, prompt=args.hr_prompt,
                        negative_prompt=args.hr_negative_prompt)
    except ValueError as exc:
        raise UsageError(f"hires fix: {exc}") from None


def check_refiner(args) -> None:
    if not getattr(args, "refiner", None):
        return
    if not Path(args.refiner).exists():
        raise CommandError(f"refiner {args.refiner}: no such file")
    if hires_from(args) is not None:
        raise UsageError("--refiner and the hires fix (--hr-*) cannot be combined")


def refined(base, refiner, prompt, kwargs: dict, switch: float):
    """The base's txt2img stopped at ``switch``, finished by ``refiner``'s img2img from there; the
    parameters are the base's, with A1111's Refiner fields."""
    import dataclasses

    from ldm.weights_io import file_hash

    first = base.txt2img(prompt, **dict(kwargs, output_type="latent", denoising_end=switch))
    used = first.parameters[0]
    second = refiner.img2img(prompt, first.latents, denoising_start=switch, seed=first.seeds[0],
                             negative_prompt=kwargs.get("negative_prompt", ""),
                             num_inference_steps=used["steps"], guidance_scale=used["cfg_scale"],
                             scheduler=used["sampler"], num_images=kwargs.get("num_images", 1),
                             eta=kwargs.get("eta", 0.0), progress=kwargs.get("progress", True))
    label = f"{refiner.model_name} [{file_hash(refiner.model_path)[:10]}]"
    params = [dict(p, **{"Refiner": label, "Refiner switch at": switch}) for p in first.parameters]
    return dataclasses.replace(second, seeds=first.seeds, parameters=params)


# ---------------------------------------------------------------- styles
def read_styles(path) -> dict[str, tuple[str, str]]:
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise CommandError(f"styles file {path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CommandError(f"styles file {path}: cannot read ({exc})") from None
    if rows and "name" not in rows[0]:
        raise CommandError(f"styles file {path}: no 'name' column (expected name,prompt,negative_prompt)")
    return {r["name"]: (r.get("prompt") or "", r.get("negative_prompt") or "") for r in rows
            if r.get("name")}


def merge_style(style: str, prompt: str) -> str:
    """A1111's rule: ``{prompt}`` in the style is replaced; otherwise the style follows the
    prompt after a comma (empty parts left out)."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


def apply_styles(args, prompts: list[str]) -> list[str]:
    """``prompts`` with the ``--style`` prompts merged in (``args.negative_prompt`` too)."""
    if not args.style:
        return prompts
    styles = read_styles(args.styles_file)
    for name in args.style:
        if name not in styles:
            known = ", ".join(sorted(styles)) or "none"
            raise CommandError(f"style {name!r} is not in {args.styles_file} (styles: {known})")
        positive, negative = styles[name]
        prompts = [merge_style(positive, p) for p in prompts]
        args.negative_prompt = merge_style(negative, args.negative_prompt)
    return prompts


# ---------------------------------------------------------------- parameters from an image
# parsed key → (our option, how to read it)
_SIMPLE = {"steps": "steps", "cfg_scale": "guidance_scale", "seed": "seed", "width": "width",
           "height": "height", "clip_skip": "clip_skip", "eta": "eta", "sampler": "scheduler",
           "guidance_rescale": "guidance_rescale", "negative_prompt": "negative_prompt",
           "mask_blur": "mask_blur", "strength": "strength"}
_IGNORED = {"prompt", "mode", "model", "model_hash", "Model", "Version", "TI hashes", "Lora hashes",
            "Schedule type"}  # used elsewhere, or only describe the run


def read_parameters_file(path) -> dict:
    from pipelines import images

    path = Path(path)
    if not path.is_file():
        raise CommandError(f"--parameters-from {path}: no such file")
    if path.suffix.lower() == ".png":
        text = images.read_parameters(path)
        if not text:
            raise CommandError(f"--parameters-from {path}: the image has no parameters")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"--parameters-from {path}: cannot read ({exc})") from None
    return images.parse_parameters(text)


def apply_parameters(args, defaults: argparse.Namespace) -> list[str]:
    """Fill every option still at its default from ``--parameters-from``; returns the names of
    the fields this installation cannot honour (for the caller to report)."""
    params = read_parameters_file(args.parameters_from)
    unused = []

    def put(dest: str, value) -> None:
        if hasattr(args, dest) and getattr(args, dest) == getattr(defaults, dest, None):
            setattr(args, dest, value)

    if args.prompt is None and args.from_file is None:
        args.prompt = params.get("prompt", "")
    for key, value in params.items():
        if key == "strength" and hasattr(args, "hr_scale"):  # txt2img: the hires pass's
            put("hr_denoising_strength", value)
        elif key in _SIMPLE and hasattr(args, _SIMPLE[key]):
            put(_SIMPLE[key], value)
        elif key == "Variation seed":
            put("subseed", int(value))
        elif key == "Variation seed strength":
            put("subseed_strength", float(value))
        elif key == "Seed resize from":
            w, h = str(value).lower().split("x")
            put("seed_resize_from_w", int(w))
            put("seed_resize_from_h", int(h))
        elif key.startswith("Hires") and hasattr(args, "hr_scale"):
            _hires_field(args, put, key, value, unused)
        elif key not in _IGNORED:
            unused.append(key)
    return unused


def _hires_field(args, put, key: str, value, unused: list) -> None:
    if key == "Hires upscale":
        put("hr_scale", float(value))
    elif key == "Hires resize":
        w, h = str(value).lower().split("x")
        put("hr_resize_x", int(w))
        put("hr_resize_y", int(h))
    elif key == "Hires steps":
        put("hr_steps", int(value))
    elif key == "Hires upscaler":
        from pipelines.hires import UPSCALERS

        if value in UPSCALERS:
            put("hr_upscaler", value)
        else:
            unused.append(f"Hires upscaler ({value})")
    elif key == "Hires sampler":
        from pipelines.images import scheduler_from_display

        put("hr_sampler", scheduler_from_display(value))
    elif key == "Hires prompt":
        put("hr_prompt", value)
    elif key == "Hires negative prompt":
        put("hr_negative_prompt", value)
    else:
        unused.append(key)
