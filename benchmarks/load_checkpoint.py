"""Load benchmark: ``ldm.checkpoint.load_model`` against diffusers'
``StableDiffusionPipeline.from_single_file`` on a full-size SD1.5-shaped fp16 safetensors file.

    python -m benchmarks.load_checkpoint [--workdir /tmp/ldm-bench] [--runs 3] [--out benchmarks/out]
                                         [--dtype fp16|fp32]

The checkpoint (random weights, ~2.1 GB) and an offline diffusers config folder are written to the
work folder once. Every measurement runs in a fresh Python process, so imports and peak RSS are
those of a cold start; the two loaders alternate and medians are reported.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = "v1-inference"
CHECKPOINT_NAME = "sd15-random-fp16.safetensors"
FOLDER_NAME = "sd15-diffusers-config"


# ------------------------------------------------------------------------------------ fixtures

def write_random_checkpoint(path, cfg, *, dtype=None, seed: int = 0) -> Path:
    """A CompVis-layout safetensors file with random weights for ``cfg``: the model is built on the
    meta device (shapes only) and each tensor is generated just before it is written."""
    import torch

    from ldm.weights_io import write_safetensors
    from ldm.model import LatentDiffusion

    dtype = dtype or torch.float16
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    specs = {k: (dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)

    def produce(name: str) -> torch.Tensor:
        t = torch.empty(specs[name][1], dtype=torch.float32)
        return t.normal_(0.0, 0.02, generator=gen).to(dtype)

    write_safetensors(path, specs, produce, {"format": "pt"})
    return Path(path)


def write_diffusers_config_folder(folder, tree: dict) -> Path:
    """What ``from_single_file(config=...)`` needs offline, from a CompVis YAML tree: model_index.json,
    the component configs (derived by diffusers' own functions; heads given per channel are
    converted), scheduler and tokenizer files. SD2's OpenCLIP text tower becomes a CLIPTextModel
    without its last block (SD2 conditions on the penultimate one) and its tokenizer pads with "!"."""
    import diffusers
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextConfig

    from benchmarks.speed_models import _diffusers_tree
    from ldm.config import parse_config
    from ldm.model import LatentDiffusion
    from ldm.modules.tokenizer import EOT, SOT
    from reference.tokenizer import clip_tokenizer

    cfg = parse_config(tree, "benchmark config")
    with torch.device("meta"):
        shapes = LatentDiffusion(cfg).state_dict()
    folder, dtree = Path(folder), _diffusers_tree(tree)
    with init_empty_weights():
        UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(dtree, shapes)).save_config(
            folder / "unet")
        AutoencoderKL(**create_vae_diffusers_config_from_ldm(dtree, shapes)).save_config(folder / "vae")
    t = cfg.text
    text_config = CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, num_hidden_layers=t.layers - t.skip_layers(),
        num_attention_heads=t.heads, intermediate_size=int(t.width * t.mlp_ratio),
        max_position_embeddings=t.max_length, hidden_act=t.act, projection_dim=t.projection_dim,
        bos_token_id=SOT, eos_token_id=EOT, pad_token_id=t.pad_token_id)
    text_config.architectures = ["CLIPTextModel"]
    text_config.save_pretrained(folder / "text_encoder")
    pad = "<|endoftext|>" if t.pad_token_id == EOT else "!"  # SD1's and SD2's padding
    clip_tokenizer(pad, t.max_length).save_pretrained(folder / "tokenizer")
    DPMSolverMultistepScheduler(
        beta_start=cfg.linear_start, beta_end=cfg.linear_end, beta_schedule="scaled_linear",
        num_train_timesteps=cfg.timesteps, steps_offset=1, timestep_spacing="leading",
        prediction_type="v_prediction" if cfg.parameterization == "v" else "epsilon",
    ).save_config(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# -------------------------------------------------------------------------------- measurements

def _memory() -> dict:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    out = {"peak_rss_bytes": peak}
    status = Path("/proc/self/status")
    if status.exists():  # how much of the resident set is file-backed (mapped weights) vs private
        for line in status.read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                name, value = line.split(":")
                out[name.lower() + "_bytes"] = int(value.split()[0]) * 1024
    return out


def _touch(modules) -> float:
    """Read every page of every weight once (a memory-mapped model is read lazily); seconds."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                flat = p.detach().reshape(-1)
                flat[:: max(1, 4096 // flat.element_size())].float().sum()
    return time.perf_counter() - start


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(load, t0: float | None, imports_s: float) -> dict:
    start = time.perf_counter()
    modules = load()
    load_s = time.perf_counter() - start
    result = {"imports_s": imports_s, "load_s": load_s, **_memory()}
    if t0 is not None:
        result["total_s"] = time.time() - t0  # process start (spawn) to model ready
    # CPU seconds of the process so far (imports included): robust when other work shares the CPUs
    result["cpu_s"] = _cpu_s()
    result["touch_s"] = _touch(modules)
    result["peak_rss_after_touch_bytes"] = _memory()["peak_rss_bytes"]
    return result


# Each loader's libraries are imported before its load is timed, so "load" is loading work alone;
# "total" counts everything.

def measure_ours(path, *, config=CONFIG, dtype=None, t0: float | None = None) -> dict:
    start = time.perf_counter()
    import accelerate  # noqa: F401
    import torch

    from ldm.checkpoint import load_model
    imports_s = time.perf_counter() - start

    dtype = dtype or torch.float16
    return _measure(lambda: [load_model(path, config, dtype=dtype)], t0, imports_s)


def measure_diffusers(path, folder, *, dtype=None, t0: float | None = None) -> dict:
    start = time.perf_counter()
    import diffusers.loaders.single_file_utils  # noqa: F401
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging
    from transformers import CLIPTextModel  # noqa: F401
    imports_s = time.perf_counter() - start

    logging.disable_progress_bar()
    dtype = dtype or torch.float16

    def load():
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=dtype)
        return [pipe.unet, pipe.vae, pipe.text_encoder]

    return _measure(load, t0, imports_s)


# ------------------------------------------------------------------------------------- driver

def _child(args) -> None:
    from ldm.weights_io import parse_dtype  # imports torch, as either side does

    if args.child == "ours":
        result = measure_ours(args.checkpoint, dtype=parse_dtype(args.dtype), t0=args.t0)
    else:
        result = measure_diffusers(args.checkpoint, args.folder, dtype=parse_dtype(args.dtype), t0=args.t0)
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(which: str, checkpoint: Path, folder: Path, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.load_checkpoint", "--child", which, "--checkpoint",
           str(checkpoint), "--folder", str(folder), "--dtype", dtype]
    t0 = time.time()
    proc = subprocess.run(cmd + ["--t0", repr(t0)], capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{which} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def summarise(runs: dict[str, list[dict]], file_size: int) -> dict:
    med = {who: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for who, rs in runs.items()}
    ours, theirs = med["ours"], med["diffusers"]
    return {
        "file_bytes": file_size, "medians": med,
        "time_ratio_total": ours["total_s"] / theirs["total_s"],
        "time_ratio_load": ours["load_s"] / theirs["load_s"],
        "cpu_ratio": ours["cpu_s"] / theirs["cpu_s"],
        "ours_peak_rss_over_file": ours["peak_rss_bytes"] / file_size,
        "diffusers_peak_rss_over_file": theirs["peak_rss_bytes"] / file_size,
        "bar_time_met": ours["total_s"] <= theirs["total_s"],
        "bar_rss_met": ours["peak_rss_bytes"] <= 1.3 * file_size,
    }


def markdown(summary: dict, runs: dict, env: str, dtype: str = "fp16") -> str:
    gb = 1e9
    med = summary["medians"]
    rows = [
        ("process start → model ready (s)", "total_s", 1, "{:.2f}"),
        ("imports (s)", "imports_s", 1, "{:.2f}"),
        ("load call, libraries already imported (s)", "load_s", 1, "{:.2f}"),
        ("process CPU time, imports included (s)", "cpu_s", 1, "{:.2f}"),
        ("peak RSS after load (GB)", "peak_rss_bytes", gb, "{:.2f}"),
        ("  of which file-backed at the end (GB)", "rssfile_bytes", gb, "{:.2f}"),
        ("first read of every weight (s)", "touch_s", 1, "{:.2f}"),
        ("peak RSS after that read (GB)", "peak_rss_after_touch_bytes", gb, "{:.2f}"),
    ]
    lines = [f"File: {summary['file_bytes'] / gb:.2f} GB fp16 SD1.5-shaped safetensors, loaded as {dtype} "
             f"on CPU. Medians of {len(runs['ours'])} fresh processes each, alternating. {env}", "",
             "| metric | ours | diffusers from_single_file | ours / diffusers |", "|---|---|---|---|"]
    for label, key, scale, fmt in rows:
        if key not in med["ours"] or key not in med["diffusers"]:
            continue
        a, b = med["ours"][key] / scale, med["diffusers"][key] / scale
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f} |" if b else
                     f"| {label} | {fmt.format(a)} | {fmt.format(b)} | - |")
    lines += ["", f"Our peak RSS / file size: {summary['ours_peak_rss_over_file']:.2f} "
                  f"(diffusers: {summary['diffusers_peak_rss_over_file']:.2f}).",
              f"Bar: time ours ≤ diffusers: {'met' if summary['bar_time_met'] else 'NOT met'}; "
              f"peak RSS ≤ 1.3 × file: {'met' if summary['bar_rss_met'] else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ldm-bench"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16",
                   help="dtype to load as (the file is fp16)")
    p.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    import platform

    import torch
    import yaml

    from ldm.config import CONFIG_DIR, builtin_config

    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint, folder = args.workdir / CHECKPOINT_NAME, args.workdir / FOLDER_NAME
    if not checkpoint.exists():
        start = time.perf_counter()
        write_random_checkpoint(checkpoint, builtin_config(CONFIG), dtype=torch.float16)
        print(f"wrote {checkpoint} ({checkpoint.stat().st_size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - start:.1f} s")
    if not (folder / "model_index.json").exists():
        write_diffusers_config_folder(folder, yaml.safe_load((CONFIG_DIR / f"{CONFIG}.yaml").read_text()))
    size = checkpoint.stat().st_size

    runs: dict[str, list[dict]] = {"ours": [], "diffusers": []}
    for i in range(args.runs):
        for which in ("ours", "diffusers"):
            runs[which].append(_spawn(which, checkpoint, folder, args.dtype))
            r = runs[which][-1]
            print(f"run {i + 1} {which:9s} total {r['total_s']:6.2f} s  load {r['load_s']:6.2f} s  "
                  f"peak RSS {r['peak_rss_bytes'] / 1e9:5.2f} GB", flush=True)
    summary = summarise(runs, size)
    env = (f"torch {torch.__version__}, Python {platform.python_version()}, "
           f"{platform.machine()} with {__import__('os').cpu_count()} CPUs.")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "load_checkpoint" if args.dtype == "fp16" else f"load_checkpoint-{args.dtype}"
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"dtype": args.dtype, "summary": summary, "runs": runs, "environment": env}, indent=2))
    table = markdown(summary, runs, env, args.dtype)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
