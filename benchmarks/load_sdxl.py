"""SDXL load benchmark: ``ldm.checkpoint.load_model`` against diffusers'
``StableDiffusionXLPipeline.from_single_file`` on a full-size SDXL base fp16 safetensors file.

    python -m benchmarks.load_sdxl [--workdir /tmp/ldm-bench-sdxl] [--runs 2] [--dtype fp16|fp32]
                                   [--out benchmarks/out] [--keep]

The checkpoint (random weights in Stability's layout, ~6.9 GB) and an offline diffusers config
folder are written to the work folder once; a first, untimed diffusers load checks that diffusers
reads the file with that folder without a warning and holds the file's weights. Every measurement
runs in a fresh Python process (the measuring code is ``benchmarks.load_checkpoint``'s); the two
loaders alternate in ABBA order and medians are reported. The file is deleted at the end unless
``--keep``; a run is stopped (and the case reported as skipped) when the machine's available
memory falls below ``--min-available-gb``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.load_checkpoint import _measure, measure_ours, write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "sd_xl_base"
CHECKPOINT_NAME = "sdxl-base-random-fp16.safetensors"
FOLDER_NAME = "sdxl-diffusers-config"
TIME_BAR = 0.8  # ours ≤ 0.8 × diffusers' time; peak RSS ≤ diffusers'


def write_sdxl_config_folder(folder, tree: dict) -> Path:
    """What ``StableDiffusionXLPipeline.from_single_file(config=...)`` needs offline, from an sgm
    YAML tree (base model: CLIP-L and bigG): model_index.json; UNet and VAE configs derived by
    diffusers' own ``create_*_diffusers_config_from_ldm`` (the ``text_time`` embedding set
    explicitly, as diffusers does only for full-width files); ``text_encoder`` (CLIPTextModel) and
    ``text_encoder_2`` (CLIPTextModelWithProjection) configs from our tower configs; both
    tokenizers (the second pads with "!"); an Euler discrete scheduler, as SDXL ships."""
    import diffusers
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    from ldm.config import parse_config
    from ldm.model import LatentDiffusion
    from reference.sdxl import _hf_config
    from reference.tokenizer import clip_tokenizer

    cfg = parse_config(tree, "benchmark config")
    texts = cfg.conditioner.texts
    if len(texts) != 2:
        raise ValueError("an SDXL base tree (two text towers) is needed")
    with torch.device("meta"):
        shapes = LatentDiffusion(cfg).state_dict()
    folder = Path(folder)
    unet = create_unet_diffusers_config_from_ldm(tree, shapes)
    outdim = next(e.outdim for e in cfg.conditioner.embedders if e.text is None)
    unet.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=outdim)
    vae = create_vae_diffusers_config_from_ldm(tree, shapes, scaling_factor=cfg.scale_factor)
    with init_empty_weights():
        UNet2DConditionModel(**unet).save_config(folder / "unet")
        AutoencoderKL(**vae).save_config(folder / "vae")
    for name, text, arch in (("text_encoder", texts[0], "CLIPTextModel"),
                             ("text_encoder_2", texts[1], "CLIPTextModelWithProjection")):
        hf = _hf_config(text)
        hf.architectures = [arch]
        hf.save_pretrained(folder / name)
    clip_tokenizer("<|endoftext|>", texts[0].max_length).save_pretrained(folder / "tokenizer")
    clip_tokenizer("!", texts[1].max_length).save_pretrained(folder / "tokenizer_2")
    EulerDiscreteScheduler(
        beta_start=cfg.linear_start, beta_end=cfg.linear_end, beta_schedule="scaled_linear",
        num_train_timesteps=cfg.timesteps, steps_offset=1, timestep_spacing="leading",
        interpolation_type="linear", use_karras_sigmas=False,
        prediction_type="v_prediction" if cfg.parameterization == "v" else "epsilon",
    ).save_config(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def load_diffusers_sdxl(path, folder, dtype):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=dtype)


def measure_diffusers_sdxl(path, folder, *, dtype=None, t0: float | None = None) -> dict:
    start = time.perf_counter()
    import diffusers.loaders.single_file_utils  # noqa: F401
    import torch
    from diffusers import StableDiffusionXLPipeline  # noqa: F401
    from diffusers.utils import logging
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401
    imports_s = time.perf_counter() - start

    logging.disable_progress_bar()
    dtype = dtype or torch.float16

    def load():
        pipe = load_diffusers_sdxl(path, folder, dtype)
        return [pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]

    return _measure(load, t0, imports_s)


_BENIGN = "that should be kept in float32"


def check_diffusers_load(path, folder, dtype=None) -> dict:
    """Load with diffusers, catching every warning its and transformers' loggers (and Python's
    warnings) emit; then compare every tensor diffusers holds with the file, through diffusers'
    own converters. Raises on a warning (but diffusers' empty float32 notice), on a parameter
    left on the meta device, and on one the converters do not give or give with other values."""
    import logging as pylogging
    import warnings

    import torch
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    from ldm.weights_io import read_weights

    dtype = dtype or torch.float16
    records: list[str] = []

    class Keep(pylogging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()}")

    for lib in (dlogging, tlogging):
        lib.set_verbosity_warning()
        lib.get_logger().addHandler(Keep(pylogging.WARNING))
    dlogging.disable_progress_bar()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_diffusers_sdxl(path, folder, dtype)
    records += [f"{w.category.__name__}: {w.message}" for w in caught]
    # diffusers 0.42 casts each model with .to(dtype) after a single-file load and then warns
    # about the modules to keep in float32 even when there are none ("... float32: []"): kept in
    # the report, not an error; any other warning (missing or unexpected keys above all) is
    bad = [r for r in records if not (_BENIGN in r and "float32: []." in r)]
    if bad:
        raise RuntimeError("diffusers warned while loading:\n" + "\n".join(bad))

    sd, _ = read_weights(path)
    expected = {
        "unet": convert_ldm_unet_checkpoint(sd, dict(pipe.unet.config)),
        "vae": convert_ldm_vae_checkpoint(sd, dict(pipe.vae.config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(
            {k: v for k, v in sd.items() if k.startswith("conditioner.embedders.0.")}).items()},
        "text_encoder_2": convert_open_clip_checkpoint(pipe.text_encoder_2, sd,
                                                       prefix="conditioner.embedders.1.model."),
    }
    counts = {}
    for name, ref in expected.items():
        state = getattr(pipe, name).state_dict()
        params = dict(getattr(pipe, name).named_parameters())
        bad = [(k, "meta" if p.is_meta else "absent" if k not in ref else "unequal")
               for k, p in params.items()
               if p.is_meta or k not in ref or not torch.equal(p, ref[k].to(p.dtype))]
        if bad:
            raise RuntimeError(f"{name}: {len(bad)} parameters differ from the file: {bad[:5]}")
        counts[name] = {"tensors": len(state), "parameters": sum(p.numel() for p in params.values())}
    return {"components": counts, "dtype": str(next(pipe.unet.parameters()).dtype),
            "warnings": records}


# ------------------------------------------------------------------------------------- driver

def _child(args) -> None:
    from ldm.weights_io import parse_dtype  # imports torch, as either side does

    dtype = parse_dtype(args.dtype)
    if args.child == "ours":
        result = measure_ours(args.checkpoint, config=CONFIG, dtype=dtype, t0=args.t0)
    elif args.child == "diffusers":
        result = measure_diffusers_sdxl(args.checkpoint, args.folder, dtype=dtype, t0=args.t0)
    else:
        result = check_diffusers_load(args.checkpoint, args.folder, dtype)
    print("RESULT " + json.dumps(result), flush=True)


class MemoryGuard(RuntimeError):
    """A child was stopped because the machine's available memory fell below the floor."""


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _spawn(which: str, checkpoint: Path, folder: Path, dtype: str, min_available: float = 0) -> dict:
    """Run one measurement in a fresh process; it is killed (MemoryGuard) if the machine's
    available memory falls below ``min_available`` bytes, so a load that would not fit cannot
    push other work on a shared machine into the OOM killer."""
    cmd = [sys.executable, "-m", "benchmarks.load_sdxl", "--child", which, "--checkpoint",
           str(checkpoint), "--folder", str(folder), "--dtype", dtype]
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd + ["--t0", repr(t0)], stdout=out, stderr=err, text=True, cwd=ROOT)
        lowest = _available_bytes()
        while proc.poll() is None:
            lowest = min(lowest, _available_bytes())
            if lowest < min_available:
                proc.kill()
                proc.wait()
                raise MemoryGuard(f"{which} ({dtype}) stopped: available memory fell to "
                                  f"{lowest / 2**30:.1f} GiB (floor {min_available / 2**30:.1f} GiB)")
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{which} run failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return dict(json.loads(lines[-1].removeprefix("RESULT ")), lowest_available_bytes=lowest)


def machine_load() -> str:
    load = os.getloadavg()
    mem = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":")
        mem[name] = int(value.split()[0]) * 1024
    return (f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} CPUs, "
            f"{mem.get('MemAvailable', 0) / 2**30:.1f} GiB of "
            f"{mem.get('MemTotal', 0) / 2**30:.1f} GiB available")


ROWS = [("process start → model ready (s)", "total_s", 1, "{:.2f}"),
        ("imports (s)", "imports_s", 1, "{:.2f}"),
        ("load call, libraries already imported (s)", "load_s", 1, "{:.2f}"),
        ("process CPU time, imports included (s)", "cpu_s", 1, "{:.2f}"),
        ("peak RSS after load (GB)", "peak_rss_bytes", 1e9, "{:.2f}"),
        ("  of which file-backed at the end (GB)", "rssfile_bytes", 1e9, "{:.2f}"),
        ("first read of every weight (s)", "touch_s", 1, "{:.2f}"),
        ("peak RSS after that read (GB)", "peak_rss_after_touch_bytes", 1e9, "{:.2f}")]
BARS = {"total_s": TIME_BAR, "load_s": TIME_BAR, "cpu_s": TIME_BAR, "peak_rss_bytes": 1.0,
        "peak_rss_after_touch_bytes": 1.0}


def markdown(med: dict, n: int, file_bytes: int, dtype: str, env: str, loads: list[str]) -> str:
    lines = [f"File: {file_bytes / 1e9:.2f} GB fp16 SDXL base safetensors (random weights), loaded as "
             f"{dtype} on CPU. Medians of {n} fresh processes each, in ABBA order. {env}",
             "Machine load during the runs: " + "; ".join(loads), "",
             "| metric | ours | diffusers from_single_file | ours / diffusers | bar |",
             "|---|---|---|---|---|"]
    for label, key, scale, fmt in ROWS:
        if key not in med["ours"] or key not in med["diffusers"]:
            continue
        a, b = med["ours"][key] / scale, med["diffusers"][key] / scale
        ratio = a / b if b else float("nan")
        bar = (f"≤ {BARS[key]:g}: {'met' if ratio <= BARS[key] else 'NOT met'}" if key in BARS else "")
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f} | {bar} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ldm-bench-sdxl"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16",
                   help="dtype to load as (the file is fp16)")
    p.add_argument("--keep", action="store_true", help="keep the 6.9 GB file for another run")
    p.add_argument("--min-available-gb", type=float, default=3.0,
                   help="stop a run when the machine's available memory falls below this (GiB)")
    p.add_argument("--skip-check", action="store_true", help="skip the untimed diffusers check")
    p.add_argument("--child", choices=["ours", "diffusers", "check"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    import torch
    import yaml

    from ldm.config import CONFIG_DIR, builtin_config

    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint, folder = args.workdir / CHECKPOINT_NAME, args.workdir / FOLDER_NAME
    if not checkpoint.exists():
        start = time.perf_counter()
        write_random_checkpoint(checkpoint, builtin_config(CONFIG), dtype=torch.float16)
        print(f"wrote {checkpoint} ({checkpoint.stat().st_size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    if not (folder / "model_index.json").exists():
        write_sdxl_config_folder(folder, yaml.safe_load((CONFIG_DIR / f"{CONFIG}.yaml").read_text()))
    size, floor = checkpoint.stat().st_size, args.min_available_gb * 2**30
    try:
        check = None if args.skip_check else _spawn("check", checkpoint, folder, args.dtype, floor)
        if check is not None:
            print("diffusers check: no warnings, every parameter equals the file's: "
                  + json.dumps(check["components"]), flush=True)
        runs: dict[str, list[dict]] = {"ours": [], "diffusers": []}
        loads = []
        for i in range(args.runs):
            # ABBA order: the first load after a pause pays the most for fresh memory on this VM
            # (tens of seconds at fp32), so neither side always comes first
            for which in ("ours", "diffusers")[:: 1 if i % 2 == 0 else -1]:
                loads.append(f"{os.getloadavg()[0]:.2f}")
                runs[which].append(_spawn(which, checkpoint, folder, args.dtype, floor))
                r = runs[which][-1]
                print(f"run {i + 1} {which:9s} total {r['total_s']:6.2f} s  load {r['load_s']:6.2f} s  "
                      f"cpu {r['cpu_s']:6.2f} s  peak RSS {r['peak_rss_bytes'] / 1e9:5.2f} GB  "
                      f"(1-min load avg before: {loads[-1]})", flush=True)
    except MemoryGuard as exc:  # not enough memory on this machine now: say so, measure nothing
        print(f"skipped: {exc}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"load_sdxl-{args.dtype}.json").write_text(json.dumps(
            {"dtype": args.dtype, "skipped": str(exc), "machine": machine_load()}, indent=2))
        return 2
    finally:
        if not args.keep:
            checkpoint.unlink(missing_ok=True)
    med = {who: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for who, rs in runs.items()}
    env = (f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, Python "
           f"{platform.python_version()}, {platform.machine()}; "
           f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; at the end: {machine_load()}.")
    table = markdown(med, args.runs, size, args.dtype, env,
                     [f"1-min load average before each run: {', '.join(loads)}"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"load_sdxl-{args.dtype}"
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"dtype": args.dtype, "file_bytes": size, "medians": med, "runs": runs, "check": check,
         "load_averages": loads, "environment": env}, indent=2))
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
