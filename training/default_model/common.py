"""What every stage of the default-model recipe shares: settings, the Accelerate training loop with
checkpoints and resume, the learning-rate schedule, EMA weights and file helpers."""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ldm.config import CONFIG_DIR, ModelConfig, load_config

CONFIG_PATH = CONFIG_DIR / "tiny-shapes.yaml"
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


class RecipeError(RuntimeError):
    """A stage cannot run: missing input from an earlier stage, bad resume path, bad setting."""


@dataclass
class Settings:
    """Options of one stage's run (the command line fills them; stages give the defaults)."""

    out: Path = Path("runs/tiny-shapes")
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 500
    keep: int = 2  # checkpoints kept on disk
    resume: str | None = None  # "latest" or a checkpoint folder
    mixed_precision: str = "no"
    cpu: bool = False
    num_workers: int = 0
    config: Path = CONFIG_PATH
    quiet: bool = False

    def check(self) -> None:
        for name in ("steps", "batch_size", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise RecipeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise RecipeError("--lr must be positive")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise RecipeError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")


def model_config(settings: Settings) -> ModelConfig:
    return load_config(settings.config)


def make_accelerator(settings: Settings):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=settings.mixed_precision, cpu=settings.cpu)


def lr_at(step: int, settings: Settings, floor: float = 0.1) -> float:
    """Linear warm-up, then a cosine decay to ``floor`` × the peak rate (Loshchilov & Hutter 2017)."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(settings.steps - settings.warmup, 1)
    return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class EMA:
    """Exponential moving average of a model's parameters (weights for sampling, as in LDM)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short warm-up of the average
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach().float(), 1 - decay)
            else:
                self.shadow[k].copy_(v)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path))

    def load(self, path: Path) -> None:
        self.shadow = load_weights(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise RecipeError(f"{path} not found")
    return load_file(str(path))


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def require(path: Path, stage: str) -> Path:
    """An output of an earlier stage, or a clear error naming the stage to run."""
    if not path.is_file():
        raise RecipeError(f"{path} not found; run the '{stage}' stage first")
    return path


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path, stage: str) -> dict:
    return json.loads(require(path, stage).read_text())


def find_checkpoint(stage_dir: Path, resume: str) -> tuple[Path, int]:
    """``latest`` → the newest ``step-N`` folder under ``stage_dir/checkpoints``; else a folder."""
    if resume == "latest":
        found = sorted((int(m.group(1)), p) for p in (stage_dir / "checkpoints").glob("step-*")
                       if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir())
        if not found:
            raise RecipeError(f"--resume latest: no checkpoint in {stage_dir / 'checkpoints'}")
        step, path = found[-1]
        return path, step
    path = Path(resume)
    match = CHECKPOINT_RE.match(path.name)
    if not path.is_dir() or match is None:
        raise RecipeError(f"--resume {resume}: not a checkpoint folder (expected …/step-N)")
    return path, int(match.group(1))


def _prune(stage_dir: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in (stage_dir / "checkpoints").glob("step-*")
                   if (m := CHECKPOINT_RE.match(p.name)))
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


StepFn = Callable[[nn.Module, dict, torch.Generator], torch.Tensor]


def train(settings: Settings, stage: str, model: nn.Module, dataset, step_fn: StepFn, accelerator,
          collate_fn=None, ema: EMA | None = None, grad_clip: float | None = 1.0) -> nn.Module:
    """Train ``model`` for ``settings.steps`` optimizer steps with ``step_fn(model, batch, gen)`` → loss.

    ``gen`` is a CPU generator for all the step's random draws (noise, timesteps, caption dropout):
    it is saved with each checkpoint, unlike the global RNG, which data loading also draws from.

    Checkpoints (Accelerate ``save_state`` plus EMA weights) go to ``out/<stage>/checkpoints/step-N``
    every ``save_every`` steps; with ``resume`` the run continues from one — the same batches,
    learning rates and random streams, since data and rates are functions of the step. Returns the
    unwrapped model; the EMA (when given) is updated in place.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    stage_dir = settings.out / stage
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, drop_last=True,
                        num_workers=settings.num_workers, collate_fn=collate_fn)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    gen = torch.Generator().manual_seed(settings.seed + 1_000_003 * (1 + accelerator.process_index))
    start = 0
    log_path = stage_dir / "loss.jsonl"
    if not settings.resume and any((stage_dir / "checkpoints").glob("step-*")):
        raise RecipeError(f"{stage_dir / 'checkpoints'} holds checkpoints of an earlier run; pass "
                          f"--resume latest to continue it, or remove the folder")
    if settings.resume:
        path, start = find_checkpoint(stage_dir, settings.resume)
        accelerator.load_state(str(path))
        if ema is not None:
            ema.load(path / "ema.safetensors")
        gen.set_state(load_weights(path / f"noise-rng-{accelerator.process_index}.safetensors")["state"])
        accelerator.print(f"{stage}: resumed from {path} at step {start}")
    if start >= settings.steps:
        accelerator.print(f"{stage}: already at step {start} of {settings.steps}")
        return accelerator.unwrap_model(model)
    batches = accelerator.skip_first_batches(loader, start) if start else loader
    progress = tqdm(total=settings.steps, initial=start, desc=stage, dynamic_ncols=True,
                    disable=settings.quiet or not accelerator.is_local_main_process)
    if accelerator.is_main_process:
        stage_dir.mkdir(parents=True, exist_ok=True)
        if not start:
            log_path.write_text("")
    model.train()
    step, running, t0 = start, None, time.perf_counter()
    for batch in batches:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        loss = step_fn(model, batch, gen)
        accelerator.backward(loss)
        if grad_clip:
            accelerator.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step)
        value = loss.detach().float().item()
        running = value if running is None else 0.98 * running + 0.02 * value
        progress.update(1)
        progress.set_postfix(loss=f"{running:.4g}")
        if accelerator.is_main_process and (step % 10 == 0 or step == settings.steps):
            with log_path.open("a") as f:
                f.write(json.dumps({"step": step, "loss": value, "smoothed": running,
                                    "lr": lr_at(step - 1, settings)}) + "\n")
        if step % settings.save_every == 0 or step == settings.steps:
            _save(accelerator, stage_dir, step, ema, gen, settings.keep)
        if step >= settings.steps:
            break
    progress.close()
    wall = time.perf_counter() - t0
    done = step - start
    accelerator.print(f"{stage}: {done} steps in {wall:.1f} s ({wall / max(done, 1):.3f} s/step), "
                      f"final smoothed loss {running:.4g}")
    return accelerator.unwrap_model(model)


def _save(accelerator, stage_dir: Path, step: int, ema: EMA | None, gen: torch.Generator,
          keep: int) -> None:
    path = stage_dir / "checkpoints" / f"step-{step:06d}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    save_weights({"state": gen.get_state()}, path / f"noise-rng-{accelerator.process_index}.safetensors")
    if accelerator.is_main_process:
        if ema is not None:
            ema.save(path / "ema.safetensors")
        _prune(stage_dir, keep)
    accelerator.wait_for_everyone()
