"""What every stage of the default-model recipe shares: settings, the learning-rate schedule, how a
stage runs on :mod:`training.engine`, and file helpers."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ldm.config import CONFIG_DIR, ModelConfig, load_config
from pipelines.validate import check_number

from ..engine import EMA, Engine, RunSettings, Schedule, Stream, Summary, Task, TrainingError

CONFIG_PATH = CONFIG_DIR / "tiny-shapes.yaml"


class RecipeError(TrainingError):
    """A stage cannot run: missing input from an earlier stage, bad setting."""


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
        """The settings' rules, worded for the recipe's command line ("--steps must be at least 1")."""
        try:
            for name in ("steps", "batch_size", "save_every", "keep"):
                check_number(str(getattr(self, name)), _flag(name), low=1, integer=True, from_text=True)
            check_number(str(self.lr), "--lr", low=0, strict_low=True, from_text=True)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise RecipeError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def model_config(settings: Settings) -> ModelConfig:
    return load_config(settings.config)


def lr_at(step: int, settings: Settings, floor: float = 0.1) -> float:
    """Linear warm-up, then a cosine decay to ``floor`` × the peak rate (Loshchilov & Hutter 2017)."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(settings.steps - settings.warmup, 1)
    return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


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


def stage_engine(settings: Settings, stage: str) -> Engine:
    """The engine of one stage: states in ``out/<stage>/checkpoints``, a loss log in
    ``out/<stage>/loss.jsonl``, a state after the last step too."""
    stage_dir = settings.out / stage
    return Engine(RunSettings(
        name=stage, steps=settings.steps, batch_size=settings.batch_size,
        states=stage_dir / "checkpoints", save_every=settings.save_every, seed=settings.seed,
        keep=settings.keep, resume=settings.resume, mixed_precision=settings.mixed_precision,
        cpu=settings.cpu, num_workers=settings.num_workers, quiet=settings.quiet,
        loss_log=stage_dir / "loss.jsonl"))


StepFn = Callable[[nn.Module, dict, torch.Generator], torch.Tensor]


def fit(engine: Engine, settings: Settings, model: nn.Module, dataset, step_fn: StepFn,
        ema: EMA | None = None) -> Summary:
    """Train ``model``'s trainable parameters with ``step_fn(model, batch, gen)`` → loss.

    ``gen`` is the stage's one CPU generator per process for all random draws (noise, timesteps,
    caption dropout), saved with each checkpoint (:class:`training.engine.Stream`); the learning
    rate follows :func:`lr_at` by step. The EMA (when given) is updated in place.
    """
    task = Task(module=model, parameters=[p for p in model.parameters() if p.requires_grad],
                loss=step_fn, dataset=dataset, weight_decay=settings.weight_decay,
                schedule=Schedule(lambda step: lr_at(step, settings), skip_aware=False),
                randomness=Stream, ema=ema)
    summary = engine.fit(task)
    engine.accelerator.print(f"{engine.settings.name}: {summary}")
    return summary
