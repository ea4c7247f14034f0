"""Proves a change of code changed no output: the same seeds give the same bits.

    python -m benchmarks.same_bits make OUT_DIR [--ldm CMD] [--recipe CMD] [--threads N]
    python -m benchmarks.same_bits compare A B

``make`` runs, on the CPU with fixed seeds, the ``ldm`` command (txt2img, img2img, inpaint,
train-lora), the default-model recipe (``python -m training.default_model``) and the Pipeline's speed
switches, and writes images, latents and trained weights under OUT_DIR. Run it from the repository
root (the shipped model and configs are used), once at the old commit and once at the new one, on
the same kind of machine with the same --threads (the thread count changes float rounding), then
``compare`` the two folders: one line per file, exit 1 on any difference or missing file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

P1 = "a red circle on a blue background"
P2 = "a small green triangle at the top on a yellow background"
P3 = "a large purple square on the left on a white background"
DATA = ["a large red circle in the center on a white background",
        "a small red circle on the left on a white background",
        "a large red circle at the bottom on a white background",
        "a small red circle at the top on a blue background",
        "a large red circle on the right on a yellow background",
        "a small red circle in the center on a black background",
        "a large blue square in the center on a white background",
        "a small blue square on the right on a white background",
        "a large green triangle in the center on a white background",
        "a small orange triangle at the bottom on a purple background",
        "a large yellow circle on the left on a black background",
        "a small white square at the top on a green background"]
REG = ["a large green circle in the center on a white background",
       "a small blue triangle on the right on a yellow background",
       "a large orange square at the top on a black background",
       "a small purple circle at the bottom on a white background"]
SWITCHES = ("fused_qkv", "channels_last", "text_kv_cache", "shared_cfg_prefix", "cpu_prepack")
SKIP_DIRS = re.compile(r"(^|-)checkpoints$")  # resumable training states (Accelerate, optimizer)
TIMING = re.compile(r"(^|_)(seconds|wall|time|elapsed|duration|wall_s|s_per_step|steps_per_s)$")


class Maker:
    def __init__(self, out: Path, ldm: list[str], recipe: list[str], threads: int):
        self.out, self.ldm, self.recipe = out, ldm, recipe
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                        CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", HF_HUB_OFFLINE="1")
        self.times: list[tuple[str, float]] = []

    def run(self, name: str, cmd: list) -> None:
        cmd = [str(c) for c in cmd]
        start = time.perf_counter()
        done = subprocess.run(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        took = time.perf_counter() - start
        self.times.append((name, took))
        print(f"{took:7.1f} s  {name}", flush=True)
        if done.returncode:
            sys.exit(f"failed ({done.returncode}): {shlex.join(cmd)}\n{done.stdout[-4000:]}")

    def gen(self, name: str, mode: str, prompt: str | None, out: str, *opts) -> None:
        first = [] if prompt is None else [prompt]
        self.run(name, [*self.ldm, mode, *first, "-o", self.out / out, "--device", "cpu", "-q", *opts])

    def stage(self, name: str, stage: str, out: Path, *opts) -> None:
        self.run(name, [*self.recipe, stage, "--out", out, "--config", self.out / "recipe-config.yaml",
                        "--seed", "0", "--cpu", "--quiet", *opts])


def make(args) -> int:
    out = Path(args.out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out}: not empty")
    m = Maker(out, shlex.split(args.ldm), shlex.split(args.recipe), args.threads)
    start = time.perf_counter()
    _inputs(m)
    _images(m)
    m.run("speed latents", [sys.executable, __file__, "_latents", out / "speed"])
    _lora(m)
    _recipe(m)
    total = time.perf_counter() - start
    print(f"{total:7.1f} s  total; {sum(1 for p in out.rglob('*') if p.is_file())} files in {out}")
    return 0


def _inputs(m: Maker) -> None:
    """The mask, the prompt files and the training data (PNG + same-name caption, drawn by the
    default model)."""
    from PIL import Image, ImageDraw

    out = m.out
    inputs = out / "inputs"
    inputs.mkdir(parents=True)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((16, 20, 48, 52), fill=255)
    mask.save(inputs / "mask.png")
    (inputs / "two-prompts.txt").write_text(f"# two prompts\n{P2}\n(red:1.3) circle on a white background\n")
    (inputs / "data.txt").write_text("\n".join(DATA) + "\n")
    (inputs / "reg.txt").write_text("\n".join(REG) + "\n")

    # training data: PNG + same-name caption, drawn by the default model
    for folder, prompts, seed in (("data", DATA, 100), ("reg", REG, 200)):
        m.gen(f"{folder} images", "txt2img", None, f"{folder}/img.png",
              "--from-file", inputs / f"{folder}.txt", "--seed", seed)
        for i, caption in enumerate(prompts):
            (out / folder / f"img-{i}.txt").write_text(caption + "\n")


def _images(m: Maker) -> None:
    """Images from the shipped default model."""
    out, inputs = m.out, m.out / "inputs"
    m.gen("txt2img", "txt2img", P1, "images/t2i.png", "--seed", 1)
    m.gen("txt2img negative", "txt2img", P2, "images/t2i-negative.png", "--seed", 2,
          "--negative-prompt", "a large square")
    m.gen("txt2img 2 images", "txt2img", P3, "images/t2i-two.png", "--seed", 3, "--num-images", 2)
    m.gen("txt2img from file", "txt2img", None, "images/t2i-file.png", "--seed", 4,
          "--from-file", inputs / "two-prompts.txt")
    m.gen("txt2img euler_a", "txt2img", P1, "images/t2i-euler_a.png", "--seed", 5, "--scheduler", "euler_a")
    m.gen("txt2img ddim eta", "txt2img", P2, "images/t2i-ddim-eta.png", "--seed", 6,
          "--scheduler", "ddim", "--eta", 0.5, "--steps", 20)
    m.gen("txt2img guidance 1", "txt2img", P1, "images/t2i-g1.png", "--seed", 7, "--guidance-scale", 1.0)
    m.gen("txt2img guidance 6", "txt2img", P3, "images/t2i-g6.png", "--seed", 7, "--guidance-scale", 6)
    start_image = out / "images/t2i.png"
    m.gen("img2img", "img2img", P3, "images/i2i.png", "--seed", 8, "--image", start_image,
          "--strength", 0.6)
    m.gen("inpaint", "inpaint", P2, "images/inpaint.png", "--seed", 9, "--image", start_image,
          "--mask", inputs / "mask.png")
    m.gen("inpaint blur", "inpaint", P2, "images/inpaint-blur.png", "--seed", 9, "--image", start_image,
          "--mask", inputs / "mask.png", "--mask-blur", 4, "--strength", 0.9)


def _lora(m: Maker) -> None:
    """20-step LoRA runs (plain, every loss option, resumed) and images with the first."""
    out = m.out
    lora = [*m.ldm, "train-lora", "--cpu", "-q", "--rank", 4, "--seed", 0]
    m.run("lora a", [*lora, "--data", out / "data", "--output", out / "lora-a.safetensors",
                     "--max-steps", 20, "--checkpointing-steps", 10])
    m.run("lora b", [*lora, "--data", out / "data", "--output", out / "lora-b.safetensors",
                     "--max-steps", 20, "--train-text-encoder", "--targets", "attention", "ff",
                     "--min-snr-gamma", 5, "--noise-offset", 0.05, "--gradient-accumulation-steps", 2,
                     "--batch-size", 2, "--cache-latents", "--caption-dropout", 0.2, "--flip",
                     "--reg-data", out / "reg", "--prior-loss-weight", 0.5, "--lr-scheduler", "cosine",
                     "--lr-warmup-steps", 3])
    states = ["--data", out / "data", "--checkpoints-dir", out / "lora-resume-checkpoints"]
    m.run("lora resume: 10 steps", [*lora, *states, "--output", out / "lora-resume-10.safetensors",
                                    "--max-steps", 10, "--checkpointing-steps", 5])
    m.run("lora resume: to 20", [*lora, *states, "--output", out / "lora-resume-20.safetensors",
                                 "--max-steps", 20, "--resume", "latest"])
    with_lora = ["--lora", f"{out / 'lora-a.safetensors'}:0.8"]
    m.gen("txt2img lora", "txt2img", P1, "images/lora-t2i.png", "--seed", 10, *with_lora)
    m.gen("img2img lora", "img2img", P1, "images/lora-i2i.png", "--seed", 11, *with_lora,
          "--image", out / "images/t2i-negative.png", "--strength", 0.6)


def _recipe(m: Maker) -> None:
    """The default-model recipe with tiny settings, on a copy of the config (assemble rewrites its
    scale_factor), and a resumed UNet stage."""
    out = m.out
    shutil.copyfile(Path.cwd() / "configs/tiny-shapes.yaml", out / "recipe-config.yaml")
    run = ["--steps", 6, "--save-every", 3, "--warmup", 2]
    rec, res = out / "recipe", out / "recipe-resume"
    m.stage("recipe vae", "vae", rec, *run, "--batch-size", 4, "--eval-images", 8, "--scale-images", 16)
    m.stage("recipe clip", "clip", rec, *run, "--batch-size", 4, "--eval-images", 8)
    m.stage("recipe unet", "unet", rec, *run, "--batch-size", 8, "--latents", 64)
    for stage in ("vae", "clip"):  # the resumed unet run needs the earlier stages' outputs
        (res / stage).mkdir(parents=True)
        for f in (rec / stage).glob("*.*"):
            shutil.copyfile(f, res / stage / f.name)
    unet = ["--save-every", 3, "--warmup", 2, "--batch-size", 8, "--latents", 64]
    m.stage("recipe unet: 3 steps", "unet", res, "--steps", 3, *unet)
    m.stage("recipe unet: resume to 6", "unet", res, "--steps", 6, "--resume", "latest", *unet)
    m.stage("recipe assemble", "assemble", rec, "--weights-dir", rec / "weights",
            "--write-config", out / "recipe-config.yaml")


def latents(args) -> int:
    from safetensors.torch import save_file

    from pipelines.pipeline import Pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = {"off": dict.fromkeys(SWITCHES, False), "defaults": None}
    for name in SWITCHES:
        variants[f"only-{name}"] = {s: s == name for s in SWITCHES}
    for name, speed in variants.items():
        pipe = Pipeline.from_checkpoint(None, device="cpu", speed=speed)
        result = pipe.txt2img([P1, P2], seed=21, output_type="latent", progress=False)
        save_file({"latents": result.latents.detach().cpu().contiguous()}, str(out / f"{name}.safetensors"),
                  metadata={"speed": json.dumps(speed)})
    return 0


# ---------------------------------------------------------------- compare
def _text(s: str, root: Path) -> str:
    return s.replace(str(root), "<OUT>")


def _clean(value, root: Path):
    if isinstance(value, dict):
        return {k: _clean(v, root) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [_clean(v, root) for v in value]
    return _text(value, root) if isinstance(value, str) else value


def _safetensors(a: Path, b: Path, ra: Path, rb: Path) -> str | None:
    from safetensors import safe_open
    import torch

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        if ka != kb:
            return f"keys differ: only in A {sorted(ka - kb)[:5]}, only in B {sorted(kb - ka)[:5]}"
        diff = []
        for k in sorted(ka):
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape:
                diff.append(f"{k} {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
            elif not torch.equal(x, y):
                d = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else "?"
                diff.append(f"{k} (max |diff| {d})")
        why = [f"{len(diff)} of {len(ka)} tensors differ: " + "; ".join(diff[:3])] if diff else []
        ma, mb = _clean(fa.metadata() or {}, ra), _clean(fb.metadata() or {}, rb)
        keys = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
        if keys:
            why.append(f"metadata differs: {', '.join(keys[:8])}" + (" ..." if len(keys) > 8 else ""))
    return "; ".join(why) or None


def _png(a: Path, b: Path, ra: Path, rb: Path) -> str | None:
    from PIL import Image

    with Image.open(a) as x, Image.open(b) as y:
        if (x.mode, x.size) != (y.mode, y.size):
            return f"{x.mode} {x.size} vs {y.mode} {y.size}"
        if x.tobytes() != y.tobytes():
            return "pixels differ"
        pa, pb = x.info.get("parameters"), y.info.get("parameters")
        if (pa and _text(pa, ra)) != (pb and _text(pb, rb)):
            return f"parameters text differs: {pa!r} vs {pb!r}"
    return None


def _json(a: Path, b: Path, ra: Path, rb: Path) -> str | None:
    def load(p, root):
        lines = p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]
        return [_clean(json.loads(line), root) for line in lines if line.strip()]
    x, y = load(a, ra), load(b, rb)
    return None if x == y else f"content differs: {json.dumps(x)[:200]} vs {json.dumps(y)[:200]}"


def _plain(a: Path, b: Path, ra: Path, rb: Path) -> str | None:
    x, y = a.read_bytes(), b.read_bytes()
    if x == y:
        return None
    try:
        if _text(x.decode(), ra) == _text(y.decode(), rb):
            return None
    except UnicodeDecodeError:
        pass
    return "bytes differ"


CHECKS = {".safetensors": _safetensors, ".png": _png, ".json": _json, ".jsonl": _json}


def _files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not SKIP_DIRS.search(d))
        found += [Path(dirpath, f).relative_to(root) for f in sorted(filenames)]
    return found


def compare(args) -> int:
    ra, rb = Path(args.a).resolve(), Path(args.b).resolve()
    same = different = missing = 0
    files = _files(ra)
    for rel in files:
        b = rb / rel
        if not b.is_file():
            print(f"{rel}: MISSING in B")
            missing += 1
            continue
        try:
            why = CHECKS.get(rel.suffix, _plain)(ra / rel, b, ra, rb)
        except Exception as exc:  # an unreadable file is a difference, not a crash
            why = f"cannot compare ({type(exc).__name__}: {exc})"
        print(f"{rel}: same" if why is None else f"{rel}: DIFFERENT: {why}")
        same, different = (same + 1, different) if why is None else (same, different + 1)
    extra = sorted(set(_files(rb)) - set(files))
    for rel in extra:
        print(f"{rel}: extra in B")
    print(f"{same} same, {different} different, {missing} missing" + (f", {len(extra)} extra" if extra else ""))
    return 1 if different or missing or not files else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make", help="write the outputs of fixed-seed runs under OUT_DIR")
    p.add_argument("out_dir")
    default_ldm = shutil.which("ldm", path=str(Path(sys.executable).parent)) or "ldm"
    p.add_argument("--ldm", default=shlex.quote(default_ldm),
                   help="command prefix of the ldm command line (default: %(default)s)")
    p.add_argument("--recipe", default=f"{shlex.quote(sys.executable)} -m training.default_model",
                   help="command prefix of the default-model recipe (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of every run (default %(default)s; must match between runs)")
    p = sub.add_parser("compare", help="compare two folders written by make")
    p.add_argument("a")
    p.add_argument("b")
    p = sub.add_parser("_latents")  # internal: the speed-switch latents, in their own process
    p.add_argument("out")
    args = parser.parse_args(argv)
    return {"make": make, "compare": compare, "_latents": latents}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
