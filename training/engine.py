"""The one training engine behind every trainer (the default-model stages, LoRA, ...).

It owns the Accelerate run: devices and data parallelism, mixed precision (trainers keep their
trainable weights in float32), gradient accumulation and clipping, the AdamW optimizer and its
learning rate per step, the data stream, where random draws come from, resumable states on disk
(save, ``--resume latest`` or a folder, a total limit), the progress bar, an optional loss log,
periodic validation and the summary line. A trainer hands :meth:`Engine.fit` a :class:`Task`: its
module, trainable parameters, loss and data, plus optional hooks.

Determinism: micro-batch ``m`` of process ``p`` reads stream positions ``(m·P + p)·B … +B``
(:class:`training.data.KeyBatches`), the learning rate is a function of the optimizer step, and
every random draw of a loss comes from the generator :class:`Randomness` hands it; a run stopped
at step k and resumed therefore continues exactly as the uninterrupted run would.

A state is a folder ``step-NNNNNN`` holding Accelerate's state (optimizer, RNG states, and the
module's weights unless the task saves its own), the task's extra files and ``train_state.json``,
which is written last: a folder without it is incomplete and ignored.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

STATE_FILE = "train_state.json"
STATE_DIR = re.compile(r"^step-(\d+)$")
EMA_FILE = "ema.safetensors"
LOSS_SMOOTHING = 0.02  # weight of the newest step in the smoothed loss


class TrainingError(ValueError):
    """A training run that cannot start or continue."""


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights take under Accelerate's ``mixed_precision`` (no/fp16/bf16)."""
    from ldm.weights_io import parse_dtype

    return parse_dtype("fp32" if mixed_precision == "no" else mixed_precision)


# --------------------------------------------------------------------------------- states on disk

def saved_states(folder: Path) -> list[tuple[int, Path]]:
    """Complete states in ``folder`` (their state file is written last), oldest first."""
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = STATE_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume(folder: Path, resume: str | None, note: Callable[[str], None] = print,
                missing_ok: bool = False) -> Path | None:
    """The state to continue from: None for a fresh run (refused while ``folder`` holds states of
    an earlier one), the newest state for ``latest`` (with ``missing_ok``, none yet means a fresh
    start), else the named state folder."""
    existing = saved_states(folder)
    if resume is None:
        if existing:
            raise TrainingError(f"{folder} holds states of an earlier run; pass --resume latest to "
                                "continue it, or remove the folder")
        return None
    if resume == "latest":
        if existing:
            return existing[-1][1]
        if not missing_ok:
            raise TrainingError(f"--resume latest: no checkpoint in {folder}")
        note(f"--resume latest: no checkpoint in {folder} yet; starting at step 0")
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise TrainingError(f"--resume {path}: not a training state folder (no {STATE_FILE} in it)")
    return path


def prune_states(folder: Path, keep: int | None) -> None:
    """Remove all but the newest ``keep`` complete states (None: keep all)."""
    if keep is None:
        return
    for _, path in saved_states(folder)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------ randomness

class Randomness:
    """Where the random draws of a loss come from (noise, timesteps, posterior samples, caption
    dropout): a CPU generator per micro-batch, as diffusers draws its noise."""

    def __init__(self, seed: int, process: int):
        self.seed, self.process = seed, process

    def generator(self, micro: int) -> torch.Generator:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Write what a resumed run needs to continue the draws (nothing by default)."""

    def load(self, folder: Path) -> None:
        """Read what :meth:`save` wrote."""


class PerStep(Randomness):
    """A fresh generator seeded by (seed, micro-batch, process): the draws are a function of the
    position in the run, and a state needs to hold nothing for them."""

    def generator(self, micro: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + micro) * 131 + self.process)


class Stream(Randomness):
    """One generator per process, seeded once with seed + 1_000_003·(1 + process) and drawn from in
    order; every state saves its position (``noise-rng-<process>.safetensors``). The default-model
    recipe draws this way: the shipped weights were made so, and stay reproducible."""

    def __init__(self, seed: int, process: int):
        super().__init__(seed, process)
        self.gen = torch.Generator().manual_seed(seed + 1_000_003 * (1 + process))

    def _file(self, folder: Path) -> Path:
        return folder / f"noise-rng-{self.process}.safetensors"

    def generator(self, micro: int) -> torch.Generator:
        return self.gen

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({"state": self.gen.get_state()}, str(self._file(folder)))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        self.gen.set_state(load_file(str(self._file(folder)))["state"])


# ------------------------------------------------------------------------------------------- EMA

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
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise TrainingError(f"{path} not found")
        self.shadow = load_file(str(path))


# ----------------------------------------------------------------------------- settings and task

@dataclass(frozen=True)
class RunSettings:
    """How to run: what every trainer's settings turn into."""

    name: str  # progress-bar label
    steps: int  # optimizer steps of the whole run
    batch_size: int  # per micro-batch and process
    states: Path  # folder of the resumable states
    save_every: int  # a state every N steps
    seed: int = 0
    keep: int | None = None  # newest states kept (None: all)
    resume: str | None = None  # "latest" or a state folder
    resume_missing_ok: bool = False  # "latest" with no state yet starts at step 0
    state_at_end: bool = True  # a state after the last step too
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: str = "no"
    cpu: bool = False
    num_workers: int = 0
    quiet: bool = False
    loss_log: Path | None = None  # a JSON line every ``log_every`` steps and at the end
    log_every: int = 10
    validate_every: int = 0  # steps between calls of Task.validate (0: never)


@dataclass(frozen=True)
class Schedule:
    """The learning rate of optimizer step k (0-based). ``skip_aware``: k counts the updates the
    optimizer applied, so a step a float16 loss scaler skipped does not advance it (Accelerate's
    rule); otherwise k is the step number."""

    rate: Callable[[int], float]
    skip_aware: bool = True


@dataclass
class Task:
    """What a trainer hands the engine."""

    module: nn.Module  # what Accelerate wraps (DDP synchronises its gradients)
    parameters: list[nn.Parameter]  # what the optimizer updates, in float32
    loss: Callable[[nn.Module, dict, torch.Generator], torch.Tensor]  # (wrapped module, batch, gen)
    dataset: Dataset  # indexed by stream key (see training.data.KeyBatches)
    schedule: Schedule
    weight_decay: float = 0.0
    # optional learning-rate factors of parameter groups: (first index in ``parameters``, factor)
    # pairs in order; parameters before the first pair take factor 1 (one AdamW group each)
    rate_groups: tuple[tuple[int, float], ...] = ()
    collate: Callable | None = None
    shuffle: bool = False  # a fresh permutation of the dataset each epoch, else keys in order
    randomness: type[Randomness] = PerStep
    ema: EMA | None = None  # updated after every step, saved in the states
    save_weights: Callable[[Path], None] | None = None  # own weight files instead of the module's
    load_weights: Callable[[Path], None] | None = None
    validate: Callable[[int], None] | None = None  # called on the main process with the step
    facts: dict = field(default_factory=dict)  # recorded in each state
    checked_facts: tuple[str, ...] = ()  # facts a resumed run must share with its state


@dataclass(frozen=True)
class Summary:
    """What :meth:`Engine.fit` reports; ``str()`` is the summary line."""

    step: int  # the run's step count at the end
    done: int  # steps taken by this process's run (the rest were resumed)
    seconds: float
    loss: float | None  # smoothed loss of the last step

    def __str__(self) -> str:
        rate = f", {self.done / self.seconds:.2f} steps/s" if self.done and self.seconds > 0 else ""
        last = f", loss {self.loss:.4g}" if self.loss is not None else ""
        return f"trained {self.step} steps ({self.done} in this run, {self.seconds:.1f} s{rate}{last})"


# ------------------------------------------------------------------------------------ the engine

def _groups(task: Task) -> list:
    """The optimizer's parameter groups: all parameters as one (the plain case, as before groups
    existed), or split at ``task.rate_groups`` with their rate factors."""
    if not task.rate_groups:
        return task.parameters
    bounds = [(0, 1.0)] if task.rate_groups[0][0] > 0 else []
    bounds += list(task.rate_groups)
    ends = [b[0] for b in bounds[1:]] + [len(task.parameters)]
    return [{"params": task.parameters[start:end], "rate_factor": factor}
            for (start, factor), end in zip(bounds, ends) if end > start]


class Engine:
    """An Accelerate run. Built first: it checks the precision and the resume point before a
    trainer loads anything heavy; then the trainer seeds (:meth:`seed`), builds and calls :meth:`fit`."""

    def __init__(self, settings: RunSettings):
        from accelerate import Accelerator

        self.settings = settings
        self.accelerator = Accelerator(mixed_precision=settings.mixed_precision, cpu=settings.cpu,
                                       gradient_accumulation_steps=settings.gradient_accumulation_steps)
        if settings.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            raise TrainingError("--mixed-precision fp16 needs a GPU; on the CPU use bf16 or no")
        self.resume = find_resume(settings.states, settings.resume, self.accelerator.print,
                                  settings.resume_missing_ok)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def seed(self) -> None:
        """Seed every global RNG with the run's seed: the same initial weights on every process."""
        from accelerate.utils import set_seed

        set_seed(self.settings.seed)

    def fit(self, task: Task) -> Summary:
        """Train ``task`` up to ``settings.steps`` optimizer steps, from the resume point on."""
        acc, s = self.accelerator, self.settings
        optimizer = torch.optim.AdamW(_groups(task), lr=task.schedule.rate(0),
                                      weight_decay=task.weight_decay)
        module, optimizer = acc.prepare(task.module, optimizer)
        self._register_weight_hooks(task)
        randomness = task.randomness(s.seed, acc.process_index)
        step, updates = self._resume(task, randomness) if self.resume is not None else (0, 0)
        if step >= s.steps:
            return Summary(step, 0, 0.0, None)
        run = _Loop(self, task, module, optimizer, randomness, step, updates)
        return run.train(self._loader(task, step))

    # -- parts of fit

    def _register_weight_hooks(self, task: Task) -> None:
        if task.save_weights is None:
            return

        def save_hook(models, weights, output_dir):
            weights.clear()  # the task writes its own files instead
            if self.is_main:
                task.save_weights(Path(output_dir))

        def load_hook(models, input_dir):
            models.clear()
            task.load_weights(Path(input_dir))

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def _resume(self, task: Task, randomness: Randomness) -> tuple[int, int]:
        saved = json.loads((self.resume / STATE_FILE).read_text())
        for key in task.checked_facts:
            if saved["facts"].get(key) != task.facts[key]:
                raise TrainingError(f"--resume {self.resume}: the state was trained with {key} "
                                    f"{saved['facts'].get(key)}, this run asks for {task.facts[key]}")
        self.accelerator.load_state(str(self.resume))
        randomness.load(self.resume)
        if task.ema is not None:
            task.ema.load(self.resume / EMA_FILE)
        step = int(saved["step"])
        self.accelerator.print(f"{self.settings.name}: resumed from {self.resume} at step {step}")
        return step, int(saved["updates"])

    def _loader(self, task: Task, step: int):
        """This process's share of the stream from the resumed micro-batch on (not prepared by
        Accelerate: the sampler already shards it; batches are moved to the device here)."""
        from torch.utils.data import DataLoader

        from training.data import KeyBatches

        s, acc = self.settings, self.accelerator
        accum = s.gradient_accumulation_steps
        batches = KeyBatches(len(task.dataset), s.batch_size, s.seed, step * accum, s.steps * accum,
                             acc.process_index, acc.num_processes, shuffle=task.shuffle)
        return DataLoader(task.dataset, batch_sampler=batches, collate_fn=task.collate,
                          num_workers=s.num_workers)

    def save_state(self, task: Task, randomness: Randomness, step: int, updates: int) -> None:
        """Write ``step-NNNNNN`` through a hidden partial folder, the state file last, then prune."""
        acc, s = self.accelerator, self.settings
        final = s.states / f"step-{step:06d}"
        partial = s.states / f".step-{step:06d}.partial"
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        randomness.save(partial)
        acc.wait_for_everyone()
        if self.is_main:
            if task.ema is not None:
                task.ema.save(partial / EMA_FILE)
            (partial / STATE_FILE).write_text(json.dumps(
                {"step": step, "updates": updates, "facts": task.facts}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            prune_states(s.states, s.keep)
        acc.wait_for_everyone()


class _Loop:
    """The step loop of one :meth:`Engine.fit` call and its running figures."""

    def __init__(self, engine: Engine, task: Task, module, optimizer, randomness: Randomness,
                 step: int, updates: int):
        self.engine, self.task, self.module, self.optimizer = engine, task, module, optimizer
        self.randomness, self.step, self.updates = randomness, step, updates
        self.smoothed: float | None = None
        self.lr = 0.0

    def train(self, loader) -> Summary:
        from accelerate.utils import send_to_device
        from tqdm.auto import tqdm

        engine, s = self.engine, self.engine.settings
        acc = engine.accelerator
        progress = tqdm(total=s.steps, initial=self.step, desc=s.name, unit="step", dynamic_ncols=True,
                        disable=s.quiet or not acc.is_local_main_process)
        self._start_log()
        self.module.train()
        micro, start, losses = self.step * s.gradient_accumulation_steps, self.step, []
        started = time.perf_counter()
        for batch in loader:
            losses.append(self._micro_step(send_to_device(batch, engine.device), micro))
            micro += 1
            if not acc.sync_gradients:
                continue
            self._end_step(sum(losses) / len(losses))
            losses.clear()
            progress.update(1)
            progress.set_postfix(loss=f"{self.smoothed:.4g}", lr=f"{self.lr:.3g}")
            if self.step >= s.steps:
                break
        progress.close()
        return Summary(self.step, self.step - start, time.perf_counter() - started, self.smoothed)

    def _micro_step(self, batch: dict, micro: int) -> float:
        acc, s, task = self.engine.accelerator, self.engine.settings, self.task
        rate_step = self.updates if task.schedule.skip_aware else self.step
        self.lr = task.schedule.rate(rate_step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("rate_factor", 1.0)
        with acc.accumulate(self.module):
            loss = task.loss(self.module, batch, self.randomness.generator(micro))
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {loss.item()} at step {self.step + 1}; lower the "
                                    "learning rate, or use mixed precision bf16 or no")
            acc.backward(loss)
            if acc.sync_gradients and s.max_grad_norm > 0:
                acc.clip_grad_norm_(task.parameters, s.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float().item()

    def _end_step(self, value: float) -> None:
        engine, s, task = self.engine, self.engine.settings, self.task
        if not engine.accelerator.optimizer_step_was_skipped:
            self.updates += 1
        self.step += 1
        if task.ema is not None:
            task.ema.update(engine.accelerator.unwrap_model(self.module), self.step)
        self.smoothed = value if self.smoothed is None else \
            (1 - LOSS_SMOOTHING) * self.smoothed + LOSS_SMOOTHING * value
        final = self.step >= s.steps
        if engine.is_main and s.loss_log is not None and (self.step % s.log_every == 0 or final):
            with s.loss_log.open("a") as f:
                f.write(json.dumps({"step": self.step, "loss": value, "smoothed": self.smoothed,
                                    "lr": self.lr}) + "\n")
        if (self.step % s.save_every == 0 and not final) or (final and s.state_at_end):
            engine.save_state(task, self.randomness, self.step, self.updates)
        if task.validate is not None and s.validate_every and self.step % s.validate_every == 0:
            if engine.is_main:
                task.validate(self.step)
            engine.accelerator.wait_for_everyone()

    def _start_log(self) -> None:
        log = self.engine.settings.loss_log
        if log is not None and self.engine.is_main:
            log.parent.mkdir(parents=True, exist_ok=True)
            if not self.step:
                log.write_text("")
