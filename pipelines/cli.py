"""The ``ldm`` command: txt2img, img2img, inpaint and info.

Every failure a user can cause ends as one ``error: ...`` line on stderr and a non-zero exit status
(2 for a malformed command line, 1 otherwise), never a traceback; ``LDM_DEBUG=1`` shows the traceback.
Arguments and input files are checked before the model loads, and images are written atomically, so a
failed run leaves no file behind. torch and the model code are imported only inside the handlers.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pipelines.cli_args import MAX_SEED, UsageError, build_parser, check

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class CommandError(Exception):
    """A problem with the user's input, reported as one line (exit status 1)."""


def _note(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"note: {message}", file=sys.stderr)


# ---------------------------------------------------------------- inputs, checked before loading
def _read_prompts(path: str) -> list[str]:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CommandError(f"prompts file {file}: no such file") from None
    except IsADirectoryError:
        raise CommandError(f"prompts file {file}: is a folder, not a text file") from None
    except UnicodeDecodeError:
        raise CommandError(f"prompts file {file}: not UTF-8 text") from None
    except OSError as exc:
        raise CommandError(f"prompts file {file}: cannot read ({exc.strerror or exc})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise CommandError(f"prompts file {file}: no prompts in it "
                           "(blank lines and lines starting with # are skipped)")
    return prompts


def _check_model_args(args) -> None:
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise CommandError(f"checkpoint {args.checkpoint}: no such file")
    for path, _ in args.lora:
        if not Path(path).is_file():
            raise CommandError(f"LoRA {path}: no such file")
    if args.config is not None:
        from ldm.config import load_config
        load_config(args.config)  # ConfigError names the file and the field
    from pipelines.schedulers import SCHEDULERS
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise UsageError(f"argument --scheduler: unknown scheduler {args.scheduler!r}; "
                         f"choose from {', '.join(SCHEDULERS)}")
    if args.device is not None:
        import torch
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"argument --device: not a device name: {args.device!r} "
                             "(try cpu, cuda or cuda:0)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CommandError(f"--device {args.device}: CUDA is not available on this machine")


def _output_paths(args, count: int) -> list[Path]:
    from pipelines.images import numbered_paths
    out = Path(args.output)
    if out.is_dir():
        raise CommandError(f"output {out}: is a folder; give a file name such as {out / 'out.png'}")
    return numbered_paths(out, count)


# ---------------------------------------------------------------- generation
def _load_pipeline(args):
    from pipelines.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(args.checkpoint, config=args.config, device=args.device,
                                    dtype=args.dtype, attention=args.attention, use_ema=args.ema,
                                    prediction=args.prediction)
    if args.vae_tiling:
        pipe.enable_vae_tiling(True)
    if args.lora:
        from ldm.lora import apply_lora
        for path, scale in args.lora:
            apply_lora(pipe.model, path, scale=scale)
    return pipe


def generate(args) -> int:
    import warnings

    with warnings.catch_warnings():
        # Library warnings (e.g. "image size rounded to a multiple of 8") become one-line notes.
        warnings.showwarning = lambda message, *rest, **kw: _note(args, str(message))
        return _generate(args)


def _generate(args) -> int:
    import secrets

    from pipelines import images

    # 1. everything the user gave, checked before the (slow) model load
    prompts = [args.prompt] if args.from_file is None else _read_prompts(args.from_file)
    n = args.num_images
    paths = _output_paths(args, len(prompts) * n)
    extra: dict = {}
    if args.command in ("img2img", "inpaint"):
        extra["image"] = images.load_image(args.image)
        extra["strength"] = args.strength
    if args.command == "inpaint":
        mask = images.load_mask(args.mask, extra["image"].size)
        for message in images.describe_mask(mask, args.mask):
            _note(args, message)
        extra["mask"] = mask
        extra["mask_blur"] = args.mask_blur
    _check_model_args(args)
    seed = args.seed
    if seed is None or seed == -1:
        seed = secrets.randbelow(2**32)
        _note(args, f"seed {seed} (random; pass --seed {seed} to reproduce)")
    elif seed + len(paths) - 1 > MAX_SEED:  # image i uses seed + i
        raise UsageError(f"argument --seed: {seed} + {len(paths) - 1} images exceeds 2**64-1")

    # 2. the model (the file's hash for the PNG metadata is computed once, on first use)
    pipe = _load_pipeline(args)
    run = getattr(pipe, args.command)
    steps = pipe.sampling_settings(args.steps).num_inference_steps
    if "strength" in extra and int(steps * args.strength) == 0:
        # diffusers' img2img rule: only the last int(steps * strength) timesteps run
        _note(args, f"--steps {steps} with --strength {args.strength:g} runs no denoising step; "
                    "raise --steps or --strength to change the image")
    size = {k: v for k, v in (("width", args.width), ("height", args.height)) if v is not None}

    # 3. one call per prompt; each prompt's images are written as soon as they exist
    for j, prompt in enumerate(prompts):
        result = run(prompt, **extra, negative_prompt=args.negative_prompt,
                     num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                     scheduler=args.scheduler, seed=seed + j * n, num_images=n, eta=args.eta,
                     clip_skip=args.clip_skip, progress=not args.quiet, **size)
        for k, (image, params) in enumerate(zip(result.images, result.parameters)):
            params = dict(params)
            if args.command == "inpaint":
                params.setdefault("mask_blur", args.mask_blur)
            path = paths[j * n + k]
            images.save_png(image, path, params)
            print(f"wrote {path} (seed {params.get('seed', result.seeds[k])})")
    return 0


# ---------------------------------------------------------------- info
def _is_image(path: Path) -> bool:
    if path.is_dir() or path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return False
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError):
        return False


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _image_info(path: Path, as_json: bool) -> int:
    from pipelines.images import parse_parameters, read_parameters
    text = read_parameters(path)
    if text is None:
        raise CommandError(f"image {path}: no generation parameters stored in it "
                           "(no 'parameters' text chunk)")
    if as_json:
        import json
        print(json.dumps(parse_parameters(text), indent=2, ensure_ascii=False))
    else:
        print(text)
    return 0


def _checkpoint_info(path: Path, as_json: bool) -> int:
    from collections import Counter

    from ldm.checkpoint import CheckpointError, detect, read_state_dict
    state = read_state_dict(path)  # not a checkpoint at all: CheckpointError, reported as the error
    try:
        found = detect(state, path=path)
        family, rules = f"{found.family} (config {found.config_name})", list(found.rules)
    except CheckpointError as exc:  # readable, but not an SD1/SD2 model: still worth describing
        family, rules = "unknown", [str(exc)]
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in state.values())
    size = path.stat().st_size
    fields = {"file": str(path), "family": family, "rules": rules, "keys": len(state),
              "dtype": ", ".join(f"{d} ({c} tensors)" for d, c in dtypes.most_common()) or "none",
              "size": size}
    if as_json:
        import json
        print(json.dumps(fields, indent=2))
        return 0
    print(f"file:   {path}")
    print(f"family: {family}")
    for rule in rules:
        print(f"  - {rule}")
    print(f"keys:   {len(state)}")
    print(f"dtype:  {fields['dtype']}")
    print(f"size:   {_human_size(size)} ({size} bytes)")
    return 0


def info(args) -> int:
    path = Path(args.path)
    if not path.exists():
        raise CommandError(f"{path}: no such file")
    if _is_image(path):
        return _image_info(path, args.json)
    return _checkpoint_info(path, args.json)


# ---------------------------------------------------------------- entry point
def _known_errors() -> tuple[type[BaseException], ...]:
    """The project's own exception types, for the modules that are already imported."""
    kinds: list[type[BaseException]] = [CommandError, ValueError, OSError]
    for module, name in (("ldm.config", "ConfigError"), ("ldm.checkpoint", "CheckpointError"),
                         ("pipelines.pipeline", "DefaultModelMissing")):
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None:
            kinds.append(kind)
    return tuple(kinds)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("LDM_DEBUG", "") not in ("", "0")
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        if argv[:1] == ["train-lora"]:  # training has its own parser; imported only when asked for
            from training.lora import run
            return run(argv[1:])
        args = build_parser().parse_args(argv)
        check(args)
        return info(args) if args.command == "info" else generate(args)
    except SystemExit as exc:  # --help, or argparse exiting on its own
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except UsageError as exc:
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, _known_errors()):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        else:
            print(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} "
                  "(rerun with LDM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
