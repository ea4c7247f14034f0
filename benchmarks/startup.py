"""Start-up benchmark: the ``ldm`` command from the shell to its first image (wall time, peak RSS)
against a diffusers process that loads the same file and makes the same image.

    python -m benchmarks.startup [--runs 3] [--workdir /tmp/ldm-bench] [--out benchmarks/out]
                                 [--only default,sd15,sd21,fromfile] [--quick] [--write-results]

Every figure comes from fresh processes (cold imports), the two sides alternating, medians over
``--runs``. Wall time runs from spawning a process to reaping it; peak RSS is that one process's
``ru_maxrss`` as ``/usr/bin/time -f %M`` reports it (a small fork/``wait4`` wrapper where GNU time
is missing), so each child is measured on its own. The OS page cache is warm: before the timed runs
each side's default command runs once untimed (library files) and every checkpoint is read once.

Sections:

- ``default``: ``ldm --help``; ``ldm txt2img PROMPT -o OUT.png`` with the shipped default model;
  a diffusers process that builds ``StableDiffusionPipeline.from_single_file`` from the same file
  (offline config folder) and writes the same-sized image with the same settings; and the sampling
  time alone on both sides (a separate process per side: load, one warm-up image, then the median
  of timed images).
- ``sd15`` / ``sd21``: a full-size SD1.5 / SD2.1-v (768, v-prediction) fp16 file with random weights,
  process start to the first image written: ``ldm txt2img --checkpoint FILE --config YAML --steps 1
  --width 64 --height 64 --dtype D`` (guidance 7.5) against diffusers' ``from_single_file`` and the
  same image, loaded as fp32 and as fp16 (``--dtypes``).
- ``fromfile``: ``ldm txt2img --from-file`` with 40 prompts on the default model: the time per
  extra image beyond sampling it, as a percentage of the sampling time (see ``section_fromfile``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("default", "sd15", "sd21", "fromfile")
PROMPT = "a red circle on a blue background"
FULL_PROMPT = "a photograph of an astronaut riding a horse on the moon"
HEADING = "## Start-up and time to first image (`startup.py`)"
GB = 1e9
# (config stem, checkpoint file, diffusers config folder) per full-size section
FULL_SIZE = {"sd15": ("v1-inference", "sd15-random-fp16.safetensors", "sd15-diffusers-config"),
             "sd21": ("v2-inference-v", "sd21v-random-fp16.safetensors", "sd21v-diffusers-config")}
DEFAULT_FOLDER = "tiny-shapes-diffusers-config"
BARS = {"default_wall_s": 3.0, "full_time_ratio": 0.7, "full_rss_ratio": 1.0, "fromfile_pct": 5.0}


# ----------------------------------------------------------------------------- measuring a process

# Peak RSS must be read from a process forked by a small one: Linux carries the forking process's
# high-water RSS into the child's ru_maxrss (fork and exec keep it), so a child forked by this
# (torch-importing) script would report at least our own peak. GNU time forks from ~2 MB; the
# fallback wrapper forks from a bare Python interpreter (~10 MB floor).
GNU_TIME = Path("/usr/bin/time")
_WRAPPER = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execvp(sys.argv[2], sys.argv[2:])\n"
            "_, status, u = os.wait4(pid, 0)\n"
            "open(sys.argv[1], 'w').write(f'{u.ru_maxrss} {u.ru_utime} {u.ru_stime}')\n"
            "sys.exit(os.waitstatus_to_exitcode(status))")


def run_process(cmd: list[str], *, cwd=ROOT, env: dict | None = None) -> dict:
    """Run ``cmd`` to completion: wall seconds from spawn to exit, the peak RSS and CPU seconds
    (user + system) of that process alone (``/usr/bin/time -f "%M %U %S"``, else a small
    fork/``wait4`` wrapper), when its "wrote" lines arrived, and what a child of this script
    reported. Raises if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        rss_file, err_file = Path(tmp) / "rss", Path(tmp) / "stderr"
        wrap = ([str(GNU_TIME), "-f", "%M %U %S", "-o", str(rss_file)] if GNU_TIME.is_file()
                else [sys.executable, "-c", _WRAPPER, str(rss_file)])
        with open(err_file, "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(wrap + cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err,
                                    text=True)
            lines, wrote = [], []  # arrival times of the "wrote FILE" lines
            for line in proc.stdout:
                if line.startswith("wrote "):
                    wrote.append(time.perf_counter() - start)
                lines.append(line.rstrip("\n"))
            code = proc.wait()
            wall = time.perf_counter() - start
        stderr = err_file.read_text(errors="replace")
        usage = (rss_file.read_text().splitlines() or [""])[-1].split() if rss_file.exists() else []
    if code != 0 or len(usage) != 3:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}):\n{stderr[-3000:]}")
    result = {"wall_s": wall, "peak_rss_bytes": int(usage[0]) * 1024,
              "cpu_s": float(usage[1]) + float(usage[2]), "wrote_times": wrote}
    reported = [ln for ln in lines if ln.startswith("RESULT ")]
    if reported:  # a child of this script reports its own phase times
        result.update(json.loads(reported[-1].removeprefix("RESULT ")))
    return result


def ldm_command() -> list[str]:
    """The venv's ``ldm`` script (what a user runs), else ``python -m cli``."""
    script = Path(sys.executable).parent / "ldm"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cli"]


def child_command(kind: str, spec: dict) -> list[str]:
    return [sys.executable, "-m", "benchmarks.startup", "--child", kind, "--spec", json.dumps(spec)]


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# ------------------------------------------------------------------------ child processes (timed)

def _ours_api(spec: dict) -> dict:
    """Sampling alone: our Pipeline loaded as ``ldm`` loads it, one warm-up image, then ``calls``
    timed images (cycling through ``prompts`` when given, seeds counting up as ``ldm`` counts)."""
    t0 = time.perf_counter()
    from pipelines.pipeline import Pipeline
    t1 = time.perf_counter()
    pipe = Pipeline.from_checkpoint(spec.get("checkpoint"), config=spec.get("config"),
                                    dtype=spec.get("dtype"))
    t2 = time.perf_counter()
    kw = dict(num_inference_steps=spec["steps"], guidance_scale=spec["guidance"],
              width=spec["width"], height=spec["height"], progress=False)
    pipe.txt2img(spec["prompt"], seed=spec["seed"], **kw)
    t3 = time.perf_counter()
    times, prompts = [], spec.get("prompts") or [spec["prompt"]]
    for i in range(spec["calls"]):
        start = time.perf_counter()
        pipe.txt2img(prompts[i % len(prompts)], seed=spec["seed"] + i, **kw)
        times.append(time.perf_counter() - start)
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t2, "sample_times": times}


def _diffusers(spec: dict) -> dict:
    """The diffusers equivalent of the command: import, ``from_single_file`` with an offline config
    folder, the same scheduler (DPM++ 2M) and settings, one image written as PNG; then, when
    ``calls`` > 0, that many more images timed (the sampling time alone)."""
    t0 = time.perf_counter()
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    t1 = time.perf_counter()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, None: torch.float32}[spec.get("dtype")]
    pipe = StableDiffusionPipeline.from_single_file(spec["checkpoint"], config=spec["folder"],
                                                    local_files_only=True, torch_dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=spec["calls"] > 0)  # the command shows one, as ldm does
    t2 = time.perf_counter()

    def image(seed: int):
        return pipe(spec["prompt"], num_inference_steps=spec["steps"], guidance_scale=spec["guidance"],
                    width=spec["width"], height=spec["height"],
                    generator=torch.Generator().manual_seed(seed)).images[0]

    image(spec["seed"]).save(spec["output"])
    t3 = time.perf_counter()
    times = []
    for i in range(spec["calls"]):
        start = time.perf_counter()
        image(spec["seed"] + 1 + i)
        times.append(time.perf_counter() - start)
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t2, "sample_times": times}


# ------------------------------------------------------------------------------------- fixtures

def prepare(section: str, workdir: Path) -> tuple[Path, Path, Path]:
    """(checkpoint, diffusers config folder, CompVis YAML) for a section, written once."""
    import yaml

    from benchmarks import load_checkpoint
    from ldm.config import CONFIG_DIR, builtin_config
    from pipelines.pipeline import DEFAULT_CHECKPOINT, DEFAULT_CONFIG

    workdir.mkdir(parents=True, exist_ok=True)
    if section not in FULL_SIZE:
        folder = workdir / DEFAULT_FOLDER
        if not (folder / "model_index.json").exists():
            tree = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())
            load_checkpoint.write_diffusers_config_folder(folder, tree)
        return Path(DEFAULT_CHECKPOINT), folder, Path(DEFAULT_CONFIG)
    stem, name, folder_name = FULL_SIZE[section]
    checkpoint, folder, yaml_path = workdir / name, workdir / folder_name, CONFIG_DIR / f"{stem}.yaml"
    if not checkpoint.exists():
        import torch

        start, partial = time.perf_counter(), checkpoint.with_name(checkpoint.name + ".partial")
        load_checkpoint.write_random_checkpoint(partial, builtin_config(stem), dtype=torch.float16)
        partial.rename(checkpoint)
        print(f"wrote {checkpoint} ({checkpoint.stat().st_size / GB:.2f} GB) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    if not (folder / "model_index.json").exists():
        tree = yaml.safe_load(yaml_path.read_text())
        load_checkpoint.write_diffusers_config_folder(folder, tree)
    return checkpoint, folder, yaml_path


# ------------------------------------------------------------------------------------- sections

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summary(runs: list[dict]) -> dict:
    keys = ("wall_s", "cpu_s", "peak_rss_bytes", "import_s", "load_s", "first_image_s")
    out = {k: median([r.get(k) for r in runs]) for k in keys if any(k in r for r in runs)}
    samples = [median(r["sample_times"]) for r in runs if r.get("sample_times")]
    if samples:
        out["sample_s"] = median(samples)
    return out


def section_default(args, out: Path, settings: dict, calls: int) -> dict:
    checkpoint, folder, _ = prepare("default", args.workdir)
    spec = dict(settings, prompt=PROMPT, seed=1, checkpoint=str(checkpoint), folder=str(folder))
    raw: dict[str, list[dict]] = {k: [] for k in ("help", "ours", "diffusers", "ours_api",
                                                  "diffusers_api")}
    for i in range(args.runs):
        raw["help"].append(run_process(ldm_command() + ["--help"]))
        raw["ours"].append(run_process(ldm_command() + ["txt2img", PROMPT, "-o",
                                                        str(out / "default-ours.png")]))
        raw["diffusers"].append(run_process(child_command(
            "diffusers", dict(spec, calls=0, output=str(out / "default-diffusers.png")))))
        raw["ours_api"].append(run_process(child_command("ours-api", dict(spec, checkpoint=None,
                                                                           calls=calls))))
        raw["diffusers_api"].append(run_process(child_command(
            "diffusers", dict(spec, calls=calls, output=str(out / "default-diffusers-api.png")))))
        print(f"default run {i + 1}: ours {raw['ours'][-1]['wall_s']:.2f} s, diffusers "
              f"{raw['diffusers'][-1]['wall_s']:.2f} s", flush=True)
    return {"settings": settings, "medians": {k: summary(v) for k, v in raw.items()}, "raw": raw}


def section_full(name: str, args, out: Path) -> dict:
    checkpoint, folder, yaml_path = prepare(name, args.workdir)
    warm_page_cache(checkpoint)
    settings = dict(steps=1, guidance=7.5, width=64, height=64)
    cases = {}
    for dtype in args.dtypes:
        raw: dict[str, list[dict]] = {"ours": [], "diffusers": []}
        for i in range(args.runs):
            cmd = ldm_command() + [
                "txt2img", FULL_PROMPT, "--checkpoint", str(checkpoint), "--config", str(yaml_path),
                "--steps", "1", "--width", "64", "--height", "64", "--guidance-scale", "7.5",
                "--seed", "1", "--dtype", dtype, "-o", str(out / f"{name}-{dtype}-ours.png")]
            raw["ours"].append(run_process(cmd))
            raw["diffusers"].append(run_process(child_command("diffusers", dict(
                settings, prompt=FULL_PROMPT, seed=1, checkpoint=str(checkpoint), folder=str(folder),
                dtype=dtype, calls=0, output=str(out / f"{name}-{dtype}-diffusers.png")))))
            print(f"{name} -> {dtype} run {i + 1}: " + ", ".join(
                f"{k} {r[-1]['wall_s']:.2f} s {r[-1]['peak_rss_bytes'] / GB:.2f} GB"
                for k, r in raw.items()), flush=True)
        med = {k: summary(v) for k, v in raw.items()}
        ours, theirs = med["ours"], med["diffusers"]
        cases[dtype] = {"medians": med, "raw": raw,
                        "time_ratio": ours["wall_s"] / theirs["wall_s"],
                        "rss_ratio": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"]}
    return {"checkpoint": str(checkpoint), "file_bytes": checkpoint.stat().st_size,
            "config": yaml_path.name, "settings": settings, "cases": cases}


def section_fromfile(args, out: Path, settings: dict) -> dict:
    """Per-image overhead of --from-file, two ways, each against the median sampling time of the
    same n prompts through our API (one warm process): (T(n prompts) - T(1 prompt)) / (n - 1), the
    command's time per extra image from whole-process wall times; and the median gap between
    consecutive "wrote" lines of the n-prompt run (stdout unbuffered), steadier on a busy machine."""
    colours = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    shapes = ("circle", "square", "triangle", "star", "ring")
    prompts = [f"a {c} {s} on a {colours[(i + 3) % 8]} background"
               for i, (c, s) in enumerate((c, s) for s in shapes for c in colours)][:args.prompts]
    path = args.workdir / f"prompts-{len(prompts)}.txt"
    path.write_text("\n".join(prompts) + "\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # "wrote" lines arrive as they are printed
    raw: dict[str, list[dict]] = {"single": [], "fromfile": [], "ours_api": []}
    for i in range(args.runs):
        raw["single"].append(run_process(ldm_command() + [
            "txt2img", prompts[0], "--seed", "1", "-o", str(out / "single.png")], env=env))
        raw["fromfile"].append(run_process(ldm_command() + [
            "txt2img", "--from-file", str(path), "--seed", "1", "-o", str(out / "batch.png")], env=env))
        raw["ours_api"].append(run_process(child_command("ours-api", dict(
            settings, prompt=prompts[0], prompts=prompts, seed=1, calls=len(prompts)))))
        print(f"fromfile run {i + 1}: 1 prompt {raw['single'][-1]['wall_s']:.2f} s, {len(prompts)} "
              f"prompts {raw['fromfile'][-1]['wall_s']:.2f} s", flush=True)
    med = {k: summary(v) for k, v in raw.items()}
    n, sample = len(prompts), med["ours_api"]["sample_s"]
    per_image = (med["fromfile"]["wall_s"] - med["single"]["wall_s"]) / (n - 1)
    gaps = [median([b - a for a, b in zip(r["wrote_times"], r["wrote_times"][1:])])
            for r in raw["fromfile"] if len(r["wrote_times"]) == n]
    gap = median(gaps)
    return {"prompts": n, "settings": settings, "medians": med, "raw": raw,
            "per_image_s": per_image, "sample_s": sample,
            "overhead_pct": 100 * (per_image - sample) / sample,
            "gap_s": gap, "gap_overhead_pct": None if gap is None else 100 * (gap - sample) / sample}


# ------------------------------------------------------------------------------------- reporting

def _f(value, fmt="{:.2f}", scale=1.0) -> str:
    return "–" if value is None else fmt.format(value / scale)


def _met(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def markdown(report: dict) -> str:
    env, cond, s = report["environment"], report["conditions"], report["sections"]
    lines = [
        f"Machine: {env['machine']}; torch {env['torch']}, diffusers {env['diffusers']}, transformers "
        f"{env['transformers']}, Python {env['python']}; {env['date']}; commit `{env['commit']}`"
        f"{' (with uncommitted changes)' if env['dirty'] else ''}. Load average (1/5/15 min) before "
        f"{cond['loadavg_before']}, after {cond['loadavg_after']}.", "",
        f"Each figure: median of {report['runs']} fresh processes, ours and diffusers alternating. "
        "Wall time = spawning the process to reaping it; peak RSS and CPU time (user + system) = "
        "that process's own (`/usr/bin/time -f \"%M %U %S\"`). Page cache warm (each command ran once "
        "untimed, each checkpoint was read once before its runs); imports cold in every process. "
        "diffusers: `StableDiffusionPipeline.from_single_file(FILE, config=<offline folder>, "
        "local_files_only=True, torch_dtype=...)`, DPM++ 2M, same steps, guidance, size, PNG written.",
        "", "| case | measurement | ours | diffusers | ours / diffusers | bar |", "|---|---|---|---|---|---|"]

    def row(case, label, ours, theirs=None, key=None, fmt="{:.2f}", scale=1.0, bar=""):
        """A row of two medians (``key`` of two dicts) and their ratio, or of given text."""
        a, b = (ours.get(key), theirs.get(key)) if key else (ours, theirs)
        ratio = f"{a / b:.2f}" if key and a is not None and b else "–"
        cells = (_f(a, fmt, scale), _f(b, fmt, scale)) if key else (a, b or "–")
        lines.append(f"| {case} | {label} | {cells[0]} | {cells[1]} | {ratio} | {bar} |")

    phases = ("import_s", "load_s", "first_image_s")
    if "default" in s:
        m, st = s["default"]["medians"], s["default"]["settings"]
        case = f"default model ({st['steps']} steps, guidance {st['guidance']:g}, {st['width']}²)"
        row(case, "`ldm --help` wall (s)", _f(m["help"]["wall_s"]))
        wall, limit = m["ours"]["wall_s"], BARS["default_wall_s"]
        row(case, "`ldm txt2img PROMPT -o OUT.png` wall (s)", m["ours"], m["diffusers"], "wall_s",
            bar=f"ours ≤ {limit:g} s: {_met(wall <= limit)}")
        row(case, "CPU time (s)", m["ours"], m["diffusers"], "cpu_s")
        row(case, "peak RSS (GB)", m["ours"], m["diffusers"], "peak_rss_bytes", scale=GB)
        row(case, "sampling one image, warm, API (s)", m["ours_api"], m["diffusers_api"], "sample_s",
            "{:.3f}")
        row(case, "in-process: imports / load / first image (s)",
            " / ".join(_f(m["ours_api"].get(k)) for k in phases),
            " / ".join(_f(m["diffusers"].get(k)) for k in phases))
    for name, label in (("sd15", "SD1.5"), ("sd21", "SD2.1-v 768")):
        for dtype, c in s.get(name, {}).get("cases", {}).items():
            case = f"{label} fp16 file ({s[name]['file_bytes'] / GB:.2f} GB) → {dtype}"
            o, d = c["medians"]["ours"], c["medians"]["diffusers"]
            t, r = BARS["full_time_ratio"], BARS["full_rss_ratio"]
            row(case, "process start → first image written (s)", o, d, "wall_s",
                bar=f"≤ {t}: {_met(c['time_ratio'] <= t)}")
            row(case, "CPU time (s)", o, d, "cpu_s")
            row(case, "peak RSS (GB)", o, d, "peak_rss_bytes", scale=GB,
                bar=f"≤ {r}: {_met(c['rss_ratio'] <= r)}")
            row(case, "diffusers in-process: imports / load / first image (s)", "–",
                " / ".join(_f(d.get(k)) for k in phases))
    if "fromfile" in s:
        f = s["fromfile"]
        m, case = f["medians"], f"`--from-file`, {f['prompts']} prompts, default model"
        row(case, "1-prompt / n-prompt command wall (s)",
            f"{_f(m['single']['wall_s'])} / {_f(m['fromfile']['wall_s'])}")
        row(case, "sampling one image, warm, API, median of the n prompts (s)",
            _f(f["sample_s"], "{:.3f}"))
        for label, value, pct in (
                ("per extra image (T(n) − T(1)) / (n − 1) (s); overhead % of sampling",
                 f["per_image_s"], f["overhead_pct"]),
                ("median gap between written images (s); overhead % of sampling",
                 f["gap_s"], f["gap_overhead_pct"])):
            limit = BARS["fromfile_pct"]
            row(case, label, f"{_f(value, '{:.3f}')}; {_f(pct, '{:.1f}')} %",
                bar="" if pct is None else f"≤ {limit:g} %: {_met(pct <= limit)}")
    return "\n".join(lines) + "\n"


def replace_section(text: str, body: str, heading: str = HEADING) -> str:
    """``text`` with the section under ``heading`` (up to the next ``## `` heading) replaced by
    ``heading`` + ``body``, or that section appended; everything else unchanged."""
    new = f"{heading}\n\n{body.rstrip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + new
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + new + ("\n" + tail if tail else "")


def environment() -> dict:
    from importlib.metadata import version

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    info = Path("/proc/cpuinfo")
    cpu = next((ln.split(":", 1)[1].strip() for ln in (info.read_text() if info.exists() else "")
                .splitlines() if ln.startswith("model name")), platform.processor())
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu})",
            "python": platform.python_version(), "torch": version("torch"),
            "diffusers": version("diffusers"), "transformers": version("transformers"),
            "date": datetime.date.today().isoformat(),
            "commit": git("log", "-1", "--format=%h %s")[:80],
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


# ------------------------------------------------------------------------------------- driver

def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=None, help="processes per side (default 3; --quick 1)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ldm-bench"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ",".join(SECTIONS))
    p.add_argument("--dtypes", default="fp32,fp16", help="full-size sections: dtypes to load as")
    p.add_argument("--prompts", type=int, default=None, help="--from-file prompts (default 40)")
    p.add_argument("--quick", action="store_true", help="1 run, 1 timed API image, 10 prompts")
    p.add_argument("--write-results", action="store_true",
                   help="replace this benchmark's section of benchmarks/RESULTS.md")
    p.add_argument("--child", choices=("ours-api", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = (_ours_api if args.child == "ours-api" else _diffusers)(json.loads(args.spec))
        print("RESULT " + json.dumps(result), flush=True)
        return None
    only = [x for x in args.only.split(",") if x]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    args.runs = args.runs or (1 if args.quick else 3)
    args.prompts = args.prompts or (10 if args.quick else 40)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    calls = 1 if args.quick else 3

    from ldm.config import load_config
    from pipelines.pipeline import DEFAULT_CONFIG

    sampling = load_config(DEFAULT_CONFIG).sampling
    default_settings = dict(steps=sampling.num_inference_steps, guidance=sampling.guidance_scale,
                            width=64, height=64)
    images = args.workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    checkpoint, folder, _ = prepare("default", args.workdir)
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    # page-cache warm-up (untimed): each side's libraries read once
    run_process(ldm_command() + ["txt2img", PROMPT, "-q", "-o", str(images / "warmup.png")])
    run_process(child_command("diffusers", dict(
        default_settings, prompt=PROMPT, seed=1, calls=0, output=str(images / "warmup-d.png"),
        checkpoint=str(checkpoint), folder=str(folder))))

    sections: dict = {}
    for name in only:
        if name == "default":
            sections[name] = section_default(args, images, default_settings, calls)
        elif name in FULL_SIZE:
            sections[name] = section_full(name, args, images)
        else:
            sections[name] = section_fromfile(args, images, default_settings)
    report = {"runs": args.runs, "environment": environment(), "sections": sections,
              "conditions": {"loadavg_before": loadavg_before,
                             "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                             "page_cache": "warm (untimed warm-up runs; checkpoints read once)",
                             "peak_rss": "ru_maxrss of each process alone (/usr/bin/time -f %M)"}}
    table = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(report, indent=2))
    (args.out / "startup.md").write_text(table)
    print(table)
    if args.write_results:
        results = ROOT / "benchmarks" / "RESULTS.md"
        results.write_text(replace_section(results.read_text(), table))
    return report


if __name__ == "__main__":
    main()
