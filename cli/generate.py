"""``ldm txt2img``, ``img2img`` and ``inpaint``: their options, the checks made before the model
loads (inputs, outputs, model arguments), and one pipeline call per prompt. Images are written
atomically as soon as they exist, so a failed run leaves no file behind. torch and the model code
are imported only inside the handlers."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import a1111_args, control_args
from cli.args import CommandError, UsageError, number

DTYPES = ("fp32", "fp16", "bf16")
ATTENTION = ("sdpa", "xformers", "math")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds
MODES = ("txt2img", "img2img", "inpaint")
_PARSERS: dict[str, argparse.ArgumentParser] = {}  # each command's parser, for its defaults


# ---------------------------------------------------------------- options
def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value == -1:  # A1111's spelling of "pick one at random"
        return -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64-1 (or -1 for random), got {value}")
    return value


def _lora(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` (a trailing ``:number`` is the scale; default 1)."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def _input_options(p: argparse.ArgumentParser, strength: float | None, mask: bool) -> None:
    p.add_argument("prompt", nargs="?", metavar="PROMPT",
                   help="what to draw; A1111 emphasis such as (word:1.3) is understood")
    p.add_argument("--from-file", metavar="TXT",
                   help="one prompt per line instead of PROMPT (blank lines and # comments skipped); "
                        "outputs are numbered")
    p.add_argument("-o", "--output", default="out.png", metavar="OUT.png",
                   help="output PNG (default: out.png; several images become out-0.png, out-1.png, ...)")
    if strength is not None:
        p.add_argument("--image", required=True, metavar="IN.png", help="the starting image")
    if mask:
        p.add_argument("--mask", required=True, metavar="MASK.png",
                       help="white = repaint, black = keep; resized to the image if its size differs")
        p.add_argument("--mask-blur", type=number(int, 0), default=0, metavar="PX",
                       help="soften the mask edge by this many pixels (default: 0)")
    if strength is not None:
        p.add_argument("--strength", type=number(float, 0.0, 1.0), default=strength, metavar="S",
                       help=f"how much to change the image, 0 to 1 (default: {strength:g})")


def _model_options(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", metavar="PATH",
                   help="single-file checkpoint (.safetensors/.ckpt); default: the shipped model")
    m.add_argument("--config", metavar="YAML", help="CompVis inference YAML (default: detected)")
    m.add_argument("--ema", action="store_true", help="use the EMA weights stored in the checkpoint")
    m.add_argument("--prediction", choices=("eps", "v"), help="override the detected prediction type")
    m.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    m.add_argument("--dtype", choices=DTYPES, help="default: fp16 on CUDA, fp32 on CPU")
    m.add_argument("--attention", choices=ATTENTION, default="sdpa",
                   help="attention kernel (default: sdpa; xformers falls back to sdpa when unusable)")
    m.add_argument("--lora", action="append", type=_lora, default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (kohya or diffusers file) at SCALE (default 1); repeatable")
    m.add_argument("--vae", metavar="PATH",
                   help="a separate autoencoder (VAE file, a checkpoint's, or a diffusers vae/ "
                        "folder) instead of the checkpoint's own (A1111's 'SD VAE')")
    m.add_argument("--embeddings-dir", metavar="DIR",
                   help="textual-inversion files (.pt/.safetensors) whose file names become prompt "
                        "words (default: embeddings/ beside the checkpoint)")
    m.add_argument("--vae-tiling", action="store_true",
                   help="decode large images in overlapping tiles to save memory")


def _sampling_options(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("sampling")
    s.add_argument("--negative-prompt", default="", metavar="TEXT", help="what to steer away from")
    # None: the model config's sampling section (tiny-shapes recommends its own guidance scale)
    s.add_argument("--steps", type=number(int, 1), default=None, metavar="N",
                   help="denoising steps (default: the model's, else 25)")
    s.add_argument("--guidance-scale", type=number(float, 0.0), default=None, metavar="G",
                   help="classifier-free guidance scale; 1 or less turns guidance off (default: the "
                        "model's, else 7.5; the default model's is 2.5)")
    s.add_argument("--scheduler", default=None, metavar="NAME",
                   help="ddim, ddpm, pndm, lms, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_karras, "
                        "dpmpp_sde_karras, unipc (default: the model's, else dpmpp_2m)")
    s.add_argument("--seed", type=_seed, metavar="S",
                   help="random seed; image i of a batch uses S+i (default: random, printed)")
    s.add_argument("--subseed", type=_seed, metavar="S",
                   help="variation seed: image i's noise moves towards that of S+i (A1111's; "
                        "default with --subseed-strength: random)")
    s.add_argument("--subseed-strength", type=number(float, 0.0, 1.0), default=0.0, metavar="X",
                   help="how far towards the variation seed's noise, 0 to 1 (default: 0)")
    s.add_argument("--seed-resize-from-w", type=number(int, 0), default=0, metavar="W",
                   help="draw the seed's noise as for this width and paste it centred (A1111's "
                        "'resize seed from'; with --seed-resize-from-h)")
    s.add_argument("--seed-resize-from-h", type=number(int, 0), default=0, metavar="H")
    s.add_argument("--width", type=number(int, 1), metavar="W", help="default: the model's size")
    s.add_argument("--height", type=number(int, 1), metavar="H", help="default: the model's size")
    s.add_argument("--num-images", type=number(int, 1), default=1, metavar="N",
                   help="images per prompt (default: 1)")
    s.add_argument("--eta", type=number(float, 0.0), default=0.0, metavar="E",
                   help="DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like noise (default: 0)")
    s.add_argument("--clip-skip", type=number(int, 0), default=0, metavar="N",
                   help="skip the last N text-encoder blocks (A1111's 'Clip skip' N+1; default: 0)")


def add_parsers(sub) -> None:
    """The three generation commands, on the ``ldm`` parser's subcommands."""
    for command, helps, description, strength, mask in (
            ("txt2img", "generate images from a prompt", "Generate images from a text prompt.",
             None, False),
            ("img2img", "redraw an image guided by a prompt",
             "Redraw --image guided by a text prompt.", 0.75, False),
            ("inpaint", "repaint the masked part of an image",
             "Repaint the white part of --mask in --image.", 1.0, True)):
        p = sub.add_parser(command, help=helps, description=description)
        _input_options(p, strength, mask)
        _model_options(p)
        _sampling_options(p)
        control_args.add_options(p)
        a1111_args.add_options(p, command)
        _PARSERS[command] = p
        p.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bar or notes; only the written files are printed")


def check(args: argparse.Namespace) -> None:
    """Cross-argument rules argparse cannot express; raises UsageError."""
    if args.prompt is not None and args.from_file:
        raise UsageError("give either PROMPT or --from-file, not both")
    if args.prompt is None and not args.from_file and not args.parameters_from:
        raise UsageError(f"missing PROMPT (or --from-file TXT) (see 'ldm {args.command} --help')")
    if bool(args.seed_resize_from_w) != bool(args.seed_resize_from_h):
        raise UsageError("give both --seed-resize-from-w and --seed-resize-from-h, or neither")
    for name in ("width", "height", "seed_resize_from_w", "seed_resize_from_h"):
        value = getattr(args, name)
        if value is not None and value % 8:  # the autoencoder works on multiples of 8 pixels
            raise UsageError(f"argument --{name.replace('_', '-')}: must be a multiple of 8, "
                             f"got {value}")
    if not args.output.lower().endswith(".png"):
        raise UsageError(f"--output must name a .png file, got {args.output!r}")


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
    if args.vae is not None and not Path(args.vae).exists():
        raise CommandError(f"VAE {args.vae}: no such file")
    if args.embeddings_dir is not None and not Path(args.embeddings_dir).is_dir():
        raise CommandError(f"--embeddings-dir {args.embeddings_dir}: no such folder")
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


def _image_inputs(args) -> dict:
    """The image (and mask) arguments of img2img / inpaint, read and checked."""
    from pipelines import images

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
    return extra


def _seed_for(args, count: int) -> int:
    import secrets

    seed = args.seed
    if seed is None or seed == -1:
        seed = secrets.randbelow(2**32)
        _note(args, f"seed {seed} (random; pass --seed {seed} to reproduce)")
    elif seed + count - 1 > MAX_SEED:  # image i uses seed + i
        raise UsageError(f"argument --seed: {seed} + {count - 1} images exceeds 2**64-1")
    return seed


# ---------------------------------------------------------------- several processes
def shard(count: int, rank: int, world: int) -> list[int]:
    """The prompt indices process ``rank`` of ``world`` makes: every ``world``-th from ``rank``.
    Each prompt keeps its index, hence its seeds and file names, whoever makes it."""
    return list(range(rank, count, world))


def _processes(device: str | None):
    """Accelerate's PartialState under ``accelerate launch`` with several processes, else None.
    WORLD_SIZE (set by the launcher) is read first so a single run never imports accelerate."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # Accelerate joins CPU processes (gloo) only when told to; otherwise it would run N lone copies
    cpu = device == "cpu" or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


# ---------------------------------------------------------------- generation
def _load_pipeline(args):
    from pipelines.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(args.checkpoint, config=args.config, device=args.device,
                                    dtype=args.dtype, attention=args.attention, use_ema=args.ema,
                                    prediction=args.prediction, scheduler=args.scheduler)
    if args.embeddings_dir:
        pipe.embeddings_dir = Path(args.embeddings_dir)
    if args.vae:
        pipe.load_vae(args.vae)
    if args.vae_tiling:
        pipe.enable_vae_tiling(True)
    for path, scale in args.lora or ():
        pipe.load_lora(path, scale=scale)  # with the embeddings a LoRA file brings
    return pipe


def run(args) -> int:
    """Generate and write the images ``args`` ask for; returns the exit status."""
    import warnings

    with warnings.catch_warnings():
        # Library warnings (e.g. "image size rounded to a multiple of 8") become one-line notes.
        warnings.showwarning = lambda message, *rest, **kw: _note(args, str(message))
        # deprecations inside libraries (numpy, diffusers) are for their developers, not notes
        # for the user; Python hides them by default, test runners do not
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return _generate(args)


def _generate(args) -> int:
    from pipelines import images

    state = _processes(args.device)
    if state is not None:
        if args.device is None:  # one device per process (cuda:LOCAL_RANK, or the CPU)
            args.device = str(state.device)
        if not state.is_main_process:  # one progress bar and one set of notes
            args.quiet = True

    # 1. everything the user gave, checked before the (slow) model load
    if args.parameters_from:
        parser = _PARSERS[args.command]
        unused = a1111_args.apply_parameters(args, argparse.Namespace(**{
            k: parser.get_default(k) for k in vars(args)}))
        if unused:
            _note(args, f"{args.parameters_from}: not repeated here: {', '.join(unused)}")
    prompts = [args.prompt] if args.from_file is None else _read_prompts(args.from_file)
    prompts = a1111_args.apply_styles(args, prompts)
    hires = {"hires": a1111_args.hires_from(args)} if args.command == "txt2img" else {}
    a1111_args.check_refiner(args)
    n = args.num_images
    paths = _output_paths(args, len(prompts) * n)
    extra = _image_inputs(args)
    units = control_args.read_units(args)
    _check_model_args(args)
    seed = _seed_for(args, len(paths))
    if state is not None and args.seed in (None, -1):  # a random seed: process 0's, for all
        from accelerate.utils import broadcast_object_list
        seed = broadcast_object_list([seed])[0]

    # 2. the model (the file's hash for the PNG metadata is computed once, on first use)
    pipe = _load_pipeline(args)
    for unit in units:  # a ControlNet for another model is refused before any image is made
        pipe.controlnet(unit.model)
    generate = getattr(pipe, args.command)
    if getattr(args, "refiner", None):  # base then refiner, per prompt
        from pipelines.pipeline import Pipeline

        refiner = Pipeline.from_checkpoint(args.refiner, device=args.device, dtype=args.dtype,
                                           attention=args.attention)
        # one embeddings folder for both models, as A1111's: the refiner takes an SDXL file's clip_g
        refiner.embeddings_dir = pipe.embeddings_dir
        generate = lambda prompt, **kw: a1111_args.refined(  # noqa: E731
            pipe, refiner, prompt, kw, args.refiner_switch)
    steps = pipe.sampling_settings(args.steps).num_inference_steps
    if "strength" in extra and int(steps * args.strength) == 0:
        # diffusers' img2img rule: only the last int(steps * strength) timesteps run
        _note(args, f"--steps {steps} with --strength {args.strength:g} runs no denoising step; "
                    "raise --steps or --strength to change the image")
    size = {k: v for k, v in (("width", args.width), ("height", args.height)) if v is not None}

    # 3. one call per prompt (this process's share of them); images written as soon as they exist
    mine = range(len(prompts)) if state is None else \
        shard(len(prompts), state.process_index, state.num_processes)
    for j in mine:
        prompt = prompts[j]
        result = generate(prompt, **extra, negative_prompt=args.negative_prompt,
                          num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                          scheduler=args.scheduler, seed=seed + j * n, num_images=n, eta=args.eta,
                          clip_skip=args.clip_skip, progress=not args.quiet, control=units,
                          subseed=None if args.subseed in (None, -1) else args.subseed + j * n,
                          subseed_strength=args.subseed_strength,
                          seed_resize_from_h=args.seed_resize_from_h,
                          seed_resize_from_w=args.seed_resize_from_w, **hires,
                          **size)
        for k, (image, params) in enumerate(zip(result.images, result.parameters)):
            params = dict(params)
            if args.command == "inpaint":
                params.setdefault("mask_blur", args.mask_blur)
            path = paths[j * n + k]
            images.save_png(image, path, params)
            print(f"wrote {path} (seed {params.get('seed', result.seeds[k])})")
    return 0
