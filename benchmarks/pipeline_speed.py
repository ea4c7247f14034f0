"""Speed benchmark: our Pipeline against diffusers' StableDiffusionPipeline, in one process, on the
same random weights (see benchmarks/speed_models.py), the same scheduler and settings.

    python -m benchmarks.pipeline_speed                       # CUDA if present, else the CPU plan
    python -m benchmarks.pipeline_speed --device cpu --structures default,sd1-small --threads 1
    python -m benchmarks.pipeline_speed --device cuda --dtypes fp16,bf16 --batches 1,4,16 --compile
    python -m benchmarks.pipeline_speed --quick               # seconds: the smoke test's run

Per (structure, dtype, batch): UNet step latency (the CFG batch of 2·batch; CUDA events on a GPU,
warm-up excluded), end-to-end seconds per image and images/s for ``--steps`` steps, denoising
iterations/s, and on CUDA the peak GPU memory of each side (its weights plus what the run
allocated on top). The two sides alternate run by run; medians are reported with the ratio
ours / diffusers. Each speed switch is also timed alone on the UNet. Results go to
``--out``/pipeline_speed-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

from benchmarks.speed_models import STRUCTURES, diffusers_pipeline, our_model, structure  # noqa: E402
from ldm.weights_io import parse_dtype  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 4k"
NEGATIVE = "blurry, low quality"
SCHEDULER = "dpmpp_2m"
GIB = 1 << 30


# ------------------------------------------------------------------------------------ timing

class Timer:
    """Wall time of a region: CUDA events on a GPU (no sync inside the region), perf_counter on
    the CPU. ``process_s`` is the process CPU time (steadier than wall time on a shared CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0
        self.process_s = time.process_time() - self.c0


def step_marks(device: torch.device):
    """A list that a step callback appends a mark to, and a function giving iterations/s between
    the first and the last mark (CUDA events, so the callbacks do not synchronise)."""
    marks: list = []

    def mark():
        if device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            marks.append(e)
        else:
            marks.append(time.perf_counter())

    def its() -> float | None:
        if len(marks) < 2:
            return None
        if device.type == "cuda":
            torch.cuda.synchronize()
            seconds = marks[0].elapsed_time(marks[-1]) / 1000
        else:
            seconds = marks[-1] - marks[0]
        return (len(marks) - 1) / seconds if seconds > 0 else None

    return marks, mark, its


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------- the sides

class Sides:
    """Our pipeline and diffusers' on one weight set, with the calls the benchmark times."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, speed):
        from pipelines.pipeline import Pipeline
        from pipelines.schedulers import make_scheduler

        self.structure = structure(name)
        self.device, self.dtype = device, dtype
        model = our_model(self.structure, device)
        self.prediction = model.config.parameterization
        # diffusers first, from the float32 weights; then ours is cast in place
        self.theirs = diffusers_pipeline(model, self.structure, make_scheduler(SCHEDULER, self.prediction),
                                         device, dtype)
        self.ours = Pipeline(model, device=device, dtype=dtype, speed=speed, model_name=name)
        self.speed = self.ours.speed
        self.weight_bytes = {"ours": _bytes(self.ours.model), "diffusers": sum(
            _bytes(m) for m in (self.theirs.unet, self.theirs.vae, self.theirs.text_encoder))}

    # the UNet alone, on the classifier-free-guidance batch
    def unet_inputs(self, batch: int, size: int):
        cfg = self.ours.model.config
        f = cfg.autoencoder.downscale
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2 * batch, cfg.unet.in_channels, size // f, size // f, generator=gen)
        ctx = torch.randn(2 * batch, 77, cfg.unet.context_dim, generator=gen)
        t = torch.full((2 * batch,), 501)
        return [v.to(self.device) for v in (x, t)] + [ctx.to(self.device, self.dtype)]

    def unet_call(self, who: str, x, t, ctx):
        if who == "ours":  # as the sampling loop calls it: the latents once, [uncond, cond] context
            n = x.shape[0] // 2 if self.ours.model.speed.shared_cfg_prefix else x.shape[0]
            return self.ours.model.apply_model(x[:n].to(self.dtype), t[:n], ctx)
        return self.theirs.unet(x.to(self.dtype), t, encoder_hidden_states=ctx).sample

    # the whole pipeline
    def generate(self, who: str, batch: int, size: int, steps: int, seed: int, mark) -> None:
        if who == "ours":
            self.ours.txt2img(PROMPT, negative_prompt=NEGATIVE, num_images=batch, height=size,
                              width=size, num_inference_steps=steps, scheduler=SCHEDULER, seed=seed,
                              guidance_scale=7.5, progress=False, callback=lambda *a: mark())
        else:
            def on_step(pipe, i, t, kwargs):
                mark()
                return kwargs

            gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
            self.theirs(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=batch, height=size,
                        width=size, num_inference_steps=steps, generator=gens, guidance_scale=7.5,
                        callback_on_step_end=on_step)


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def time_unet(sides: Sides, who: str, inputs, reps: int, warmup: int = 2) -> list[float]:
    from ldm.speed import sampling_scope

    times = []
    with torch.inference_mode(), sampling_scope(sides.ours.model):
        for i in range(warmup + reps):
            with Timer(sides.device) as timer:
                sides.unet_call(who, *inputs)
            if i >= warmup:
                times.append(timer.seconds)
    return times


def unet_flops(sides: Sides, inputs) -> int | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            sides.unet_call("ours", *inputs)
        return counter.get_total_flops()
    except Exception:  # an operator without a flop formula: report no utilisation
        return None


def run_pair(sides: Sides, batch: int, size: int, steps: int, runs: int, unet_reps: int) -> dict:
    """Alternating measurements of both sides for one setting."""
    dev = sides.device
    inputs = sides.unet_inputs(batch, size)
    unet = {"ours": [], "diffusers": []}
    for _ in range(max(1, unet_reps // 5)):  # alternate in blocks of five calls
        for who in unet:
            unet[who] += time_unet(sides, who, inputs, min(5, unet_reps))
    e2e = {who: {"seconds": [], "process_s": [], "its": [], "peak_bytes": []} for who in unet}
    for who in unet:  # warm-up run of each side (kernel selection, allocator growth)
        marks, mark, _ = step_marks(dev)
        sides.generate(who, batch, size, steps, 0, mark)
    for r in range(runs):
        for who in unet:
            marks, mark, its = step_marks(dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            with Timer(dev) as timer:
                sides.generate(who, batch, size, steps, 1000 * r, mark)
            e2e[who]["seconds"].append(timer.seconds)
            e2e[who]["process_s"].append(timer.process_s)
            e2e[who]["its"].append(its())
            if dev.type == "cuda":  # own weights + what this run allocated on top of everything
                extra = torch.cuda.max_memory_allocated() - before
                e2e[who]["peak_bytes"].append(sides.weight_bytes[who] + extra)
    out = {"batch": batch, "size": size, "steps": steps, "runs": runs,
           "unet_ms": {w: 1000 * median(v) for w, v in unet.items()}, "raw": {"unet_s": unet, "e2e": e2e}}
    for who, r in e2e.items():
        total = median(r["seconds"])
        out[who] = {"s_per_image": total / batch, "images_per_s": batch / total,
                    "process_s_per_image": median(r["process_s"]) / batch, "its": median(r["its"]),
                    "peak_gib": median(r["peak_bytes"]) / GIB if r["peak_bytes"] else None}
    pairs = [a / b for a, b in zip(e2e["ours"]["seconds"], e2e["diffusers"]["seconds"])]
    out["ratio"] = {"unet": out["unet_ms"]["ours"] / out["unet_ms"]["diffusers"],
                    "e2e": out["ours"]["s_per_image"] / out["diffusers"]["s_per_image"],
                    "e2e_paired_median": median(pairs),
                    "e2e_process": out["ours"]["process_s_per_image"] / out["diffusers"]["process_s_per_image"]}
    from ldm.speed import is_compiled

    flops = None if is_compiled(sides.ours.model.model.diffusion_model) else unet_flops(sides, inputs)
    if flops:
        out["unet_tflops_per_s"] = flops / (out["unet_ms"]["ours"] / 1000) / 1e12
    return out


def switch_ablation(sides: Sides, batch: int, size: int, reps: int, compile_too: bool) -> dict:
    """UNet latency with every switch off, with each switch alone, and with the defaults; the
    variants take turns in rounds (so a change of machine load hits them all alike)."""
    from ldm.speed import SpeedOptions, apply_speed

    base = SpeedOptions.off()
    variants = {"all off": base, "fused_qkv": base.replace(fused_qkv=True),
                "channels_last": base.replace(channels_last=True),
                "text_kv_cache": base.replace(text_kv_cache=True),
                "shared_cfg_prefix": base.replace(shared_cfg_prefix=True)}
    if sides.device.type == "cpu":
        variants["channels_last+cpu_prepack"] = base.replace(channels_last=True, cpu_prepack=True)
        variants["sdpa_kernel=math"] = base.replace(sdpa_kernel="math")
    else:
        variants["cuda_graphs"] = base.replace(cuda_graphs=True)
        for kernel in ("flash", "efficient", "cudnn", "math"):
            variants[f"sdpa_kernel={kernel}"] = base.replace(sdpa_kernel=kernel)
    variants["defaults"] = sides.speed
    inputs = sides.unet_inputs(batch, size)
    times: dict[str, list] = {name: [] for name in variants}
    rounds = max(1, reps // 3)
    for _ in range(rounds):
        for name, options in variants.items():
            if isinstance(times[name], str):
                continue
            try:
                apply_speed(sides.ours.model, options)
                times[name] += time_unet(sides, "ours", inputs, 3, warmup=1)
            except Exception as exc:  # e.g. a kernel this GPU does not have
                times[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if compile_too:  # compiled once, outside the rounds
        apply_speed(sides.ours.model, base.replace(compile=True))
        times["compile"] = time_unet(sides, "ours", inputs, reps, warmup=3)
    apply_speed(sides.ours.model, sides.speed)
    return {name: v if isinstance(v, str) else 1000 * median(v) for name, v in times.items()}


def big_image(sides: Sides, size: int, steps: int) -> dict:
    """One image at ``size``² (ours only): seconds and peak GPU memory."""
    dev = sides.device
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with Timer(dev) as timer:
        sides.generate("ours", 1, size, steps, 0, lambda: None)
    peak = sides.weight_bytes["ours"] + torch.cuda.max_memory_allocated() - before
    return {"size": size, "steps": steps, "seconds": timer.seconds, "peak_gib": peak / GIB}


# --------------------------------------------------------------------------------- reporting

def load_results() -> str | None:
    """The checkpoint-load figures measured by benchmarks/load_checkpoint.py, when present."""
    path = ROOT / "benchmarks" / "out" / "load_checkpoint.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())["summary"]["medians"]
    o, d = s["ours"], s["diffusers"]
    return (f"Checkpoint load (benchmarks/load_checkpoint.py, SD1.5 fp16 file, CPU): load call "
            f"{o['load_s']:.2f} s vs {d['load_s']:.2f} s, peak RSS {o['peak_rss_bytes'] / 1e9:.2f} GB vs "
            f"{d['peak_rss_bytes'] / 1e9:.2f} GB (ours vs diffusers).")


def _f(value, fmt="{:.3g}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Pipeline speed: ours vs diffusers ({env['device_name']})", "",
             f"{env['date']}; torch {env['torch']}, diffusers {env['diffusers']}, Python "
             f"{env['python']}; {env['threads']} torch threads; scheduler {SCHEDULER}, guidance 7.5; "
             f"load average before/after: {env['load_before']} / {env['load_after']}.",
             f"Speed options (ours): {env['speed']}.", "",
             "| structure (weights) | size | dtype | batch | UNet ms ours / diffusers (ratio) | "
             "s per image ours / diffusers (ratio; paired median) | images/s ours / diffusers | "
             "it/s ours / diffusers | peak GiB ours / diffusers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        o, d, q = r["ours"], r["diffusers"], r["ratio"]
        lines.append(
            f"| {r['structure']} ({r['weights']}) | {r['size']}² | {r['dtype']} | {r['batch']} | "
            f"{_f(r['unet_ms']['ours'])} / {_f(r['unet_ms']['diffusers'])} ({q['unet']:.2f}) | "
            f"{_f(o['s_per_image'])} / {_f(d['s_per_image'])} ({q['e2e']:.2f}; {_f(q['e2e_paired_median'], '{:.2f}')}) | "
            f"{_f(o['images_per_s'])} / {_f(d['images_per_s'])} | {_f(o['its'])} / {_f(d['its'])} | "
            f"{_f(o['peak_gib'], '{:.2f}')} / {_f(d['peak_gib'], '{:.2f}')} |")
    lines += ["", f"End-to-end: {report['settings']['steps']} steps, median of {report['settings']['runs']} "
              "runs per side, alternating; ratio = ours / diffusers (below 1: ours faster). CPU process "
              "time ratios (steadier under load): " + ", ".join(
                  f"{r['structure']} b{r['batch']} {r['ratio']['e2e_process']:.2f}" for r in report["results"]) + "."]
    peak = report["settings"]["peak_tflops"] if env["device"] == "cuda" else None
    for r in report["results"]:
        if r.get("unet_tflops_per_s"):
            share = f" ({100 * r['unet_tflops_per_s'] / peak:.0f} % of {peak:g})" if peak else ""
            lines.append(f"- {r['structure']} {r['dtype']} batch {r['batch']}: UNet "
                         f"{r['unet_tflops_per_s']:.3g} TFLOP/s of work done{share}")
    for key, ablation in report.get("ablation", {}).items():
        lines += ["", f"UNet ms per call with each switch alone ({key}):", "",
                  "| switches | UNet ms |", "|---|---|"]
        lines += [f"| {k} | {_f(v) if not isinstance(v, str) else v} |" for k, v in ablation.items()]
    for b in report.get("big", []):
        lines.append(f"\n{b['size']}² txt2img ({b['structure']}, {b['dtype']}, {b['steps']} steps): "
                     f"{b['seconds']:.1f} s, peak {b['peak_gib']:.2f} GiB.")
    if report.get("load"):
        lines += ["", report["load"]]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- driver

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--structures", default=None, help=f"comma list of {', '.join(STRUCTURES)}")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, fp16, bf16")
    p.add_argument("--batches", default=None, help="comma list of images per prompt")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: the structure's own: 64, 256, 512, 768)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--runs", type=int, default=5, help="end-to-end runs per side (alternating)")
    p.add_argument("--unet-reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch threads, the same for both sides")
    p.add_argument("--speed", default=None,
                   help="our speed options as JSON, e.g. '{\"channels_last\": false}' (default: defaults)")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    p.add_argument("--no-ablation", action="store_true", help="skip timing each switch alone")
    p.add_argument("--big", type=int, default=None, help="also one image of this side (CUDA; sd15)")
    p.add_argument("--big-steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16/fp16 peak, for utilisation (H100 SXM: 989)")
    p.add_argument("--quick", action="store_true", help="default model, 2 steps, 2 runs: seconds")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    return p.parse_args(argv)


def plan(args) -> tuple[torch.device, list[str], list[str], list[int]]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is available")
    gpu = device.type == "cuda"
    structures = (args.structures or ("sd15,sd21v" if gpu else "default,sd1-small")).split(",")
    dtypes = (args.dtypes or ("fp16,bf16" if gpu else "fp32")).split(",")
    batches = [int(b) for b in (args.batches or ("1,4,16" if gpu else "1")).split(",")]
    for s in structures:
        if s not in STRUCTURES:
            raise SystemExit(f"error: unknown structure {s!r}; choose from {', '.join(STRUCTURES)}")
    for d in dtypes:
        try:
            parse_dtype(d)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
    return device, structures, dtypes, batches


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.big is None and not args.quick and plan(args)[0].type == "cuda":
        args.big = 2048
    if args.quick:
        args.structures, args.dtypes, args.batches = args.structures or "default", args.dtypes or "fp32", "1"
        args.steps, args.runs, args.unet_reps = 2, 2, 3
    device, structures, dtypes, batches = plan(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    speed = json.loads(args.speed) if args.speed else None
    import diffusers
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    dlogging.set_verbosity_error()  # "modules that should be kept in float32: []" on every cast
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "python": platform.python_version(),
           "device": device.type, "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU {platform.machine()}, {os.cpu_count()} cores",
           "load_before": [round(v, 2) for v in os.getloadavg()]}
    report = {"environment": env, "settings": vars(args) | {"out": str(args.out)}, "results": [],
              "ablation": {}, "big": []}
    for name in structures:
        for dname in dtypes:
            sides = Sides(name, device, parse_dtype(dname), speed)
            env["speed"] = str(sides.speed)
            for batch in batches:
                size = args.size or sides.structure.size
                r = run_pair(sides, batch, size, args.steps, args.runs, args.unet_reps)
                r.update(structure=name, weights=sides.structure.weights, dtype=dname)
                report["results"].append(r)
                print(f"{name} {dname} b{batch} {size}²: UNet {r['unet_ms']['ours']:.2f} / "
                      f"{r['unet_ms']['diffusers']:.2f} ms, s/img {r['ours']['s_per_image']:.3f} / "
                      f"{r['diffusers']['s_per_image']:.3f} (ratio {r['ratio']['e2e']:.2f})", flush=True)
                if args.compile:
                    from ldm.speed import apply_speed

                    apply_speed(sides.ours.model, sides.speed.replace(compile=True))
                    c = run_pair(sides, batch, size, args.steps, args.runs, args.unet_reps)
                    c.update(structure=f"{name} compiled", weights=sides.structure.weights, dtype=dname)
                    report["results"].append(c)
                    apply_speed(sides.ours.model, sides.speed)
            if not args.no_ablation and not args.quick:
                report["ablation"][f"{name} {dname} batch {batches[0]}"] = switch_ablation(
                    sides, batches[0], args.size or sides.structure.size, args.unet_reps, args.compile)
            if args.big and device.type == "cuda" and name == "sd15":
                report["big"].append(big_image(sides, args.big, args.big_steps) | {"structure": name,
                                                                                   "dtype": dname})
            del sides
            if device.type == "cuda":
                torch.cuda.empty_cache()
    env["load_after"] = [round(v, 2) for v in os.getloadavg()]
    report["load"] = load_results()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"pipeline_speed-{device.type}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
