"""One worker thread per device over one FIFO queue: jobs run one at a time on each device, with
A1111's progress state, interrupt and skip, and the model switched between jobs.

A job is a function of the device's pipeline and its :class:`Control`; the HTTP side waits for its
future. A job still in the queue can be withdrawn (its client went away) and then costs nothing.
"""
from __future__ import annotations

import collections
import gc
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class QueueFull(Exception):
    """The queue holds ``--max-queue`` jobs already (answered with 503)."""


class ShuttingDown(Exception):
    """The server is stopping; queued jobs are cancelled with this."""


class Control:
    """What a running job reports to /progress and reads back: interrupt (stop the job) and skip
    (stop the current batch, go on with the next)."""

    def __init__(self, state: "State"):
        self.state = state
        self.interrupted = False
        self.skipped = False
        self.latents = None  # the last step's latents, for the preview
        self.step_key = None

    def begin_iteration(self, number: int, count: int, steps: int) -> None:
        with self.state.lock:
            self.skipped = False
            self.state.job_no, self.state.job_count = number, count
            self.state.sampling_step, self.state.sampling_steps = 0, steps

    def callback(self, step: int, total: int, latents) -> bool:
        """The pipeline's step callback: records progress; False stops the loop."""
        with self.state.lock:
            self.state.sampling_step, self.state.sampling_steps = step + 1, total
            self.latents, self.step_key = latents, (id(self), self.state.job_no, step)
        return not (self.interrupted or self.skipped)


@dataclass
class Job:
    name: str  # "txt2img", "img2img", "load"...
    run: Callable[[Any, Control], Any]
    checkpoint: Path
    future: Future = field(default_factory=Future)
    id: str = ""
    control: Control | None = None  # set when it starts


@dataclass
class State:
    """A1111's ``shared.state`` for one device: what /progress reports."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float = 0.0
    job_timestamp: str = "0"
    current: Job | None = None

    def as_dict(self) -> dict:
        control = self.current.control if self.current else None
        return {"skipped": bool(control and control.skipped),
                "interrupted": bool(control and control.interrupted),
                "stopping_generation": False, "job": self.job, "job_count": self.job_count,
                "job_timestamp": self.job_timestamp, "job_no": self.job_no,
                "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}


class Worker:
    """``loader(checkpoint, device)`` makes a pipeline; one thread per device takes jobs in order."""

    def __init__(self, loader: Callable[[Path, str | None], Any], devices: list[str | None],
                 max_queue: int = 0):
        self.loader = loader
        self.max_queue = max_queue  # 0: unlimited
        self.queue: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.ids = itertools.count(1)
        self.pipes: list[Any] = [None] * len(devices)
        self.states = [State() for _ in devices]
        self.threads = [threading.Thread(target=self._loop, args=(i, d), name=f"ldm-worker-{i}",
                                         daemon=True) for i, d in enumerate(devices)]
        self.devices = devices

    def start(self) -> None:
        for t in self.threads:
            t.start()

    # ------------------------------------------------------------------ the HTTP side
    def submit(self, name: str, run: Callable, checkpoint: Path) -> Job:
        job = Job(name, run, Path(checkpoint))
        with self.cond:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if self.max_queue and len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); try again later")
            job.id = f"task({next(self.ids)})"
            self.queue.append(job)
            self.cond.notify()
        return job

    def withdraw(self, job: Job) -> bool:
        """Take a job out of the queue (True), or interrupt it if it is running already."""
        with self.cond:
            if job in self.queue:
                self.queue.remove(job)
                job.future.cancel()
                return True
        if job.control is not None:
            job.control.interrupted = True
        return False

    def queued(self) -> int:
        with self.cond:
            return len(self.queue)

    def running(self) -> list[State]:
        return [s for s in self.states if s.current is not None]

    def interrupt(self) -> None:
        for s in self.running():
            if s.current.control:
                s.current.control.interrupted = True

    def skip(self) -> None:
        for s in self.running():
            if s.current.control:
                s.current.control.skipped = True

    def pipeline(self, index: int = 0):
        return self.pipes[index]

    def close(self) -> None:
        """Refuse new jobs and cancel the queued ones; the running ones go on."""
        with self.cond:
            self.stopping = True
            while self.queue:
                job = self.queue.popleft()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(ShuttingDown("the server is shutting down"))
            self.cond.notify_all()

    def stop(self, cancel_running: bool = False, timeout: float | None = None) -> None:
        """:meth:`close`, then interrupt the running jobs if asked, and wait for the threads."""
        self.close()
        if cancel_running:
            self.interrupt()
        for t in self.threads:
            if t.is_alive():
                t.join(timeout)

    # ------------------------------------------------------------------ the device side
    def _loop(self, index: int, device) -> None:
        state = self.states[index]
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if not self.queue:
                    return
                job = self.queue.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue
                job.control = Control(state)
                with state.lock:
                    state.current, state.job = job, job.name
                    state.job_count, state.job_no = 1, 0
                    state.sampling_step = state.sampling_steps = 0
                    state.time_start = time.time()
                    state.job_timestamp = time.strftime("%Y%m%d%H%M%S")
            try:
                pipe = self._ensure(index, device, job.checkpoint)
                job.future.set_result(job.run(pipe, job.control))
            except BaseException as exc:  # the job's error belongs to its client
                job.future.set_exception(exc)
            finally:
                with state.lock:
                    state.current, state.job = None, ""
                    state.job_count = state.job_no = 0
                    state.sampling_step = state.sampling_steps = 0

    def _ensure(self, index: int, device, checkpoint: Path):
        """The device's pipeline on ``checkpoint``, switching models between jobs: the old one is
        dropped first so that two never share the memory."""
        pipe = self.pipes[index]
        if pipe is not None and Path(pipe.model_path).resolve() == checkpoint.resolve():
            return pipe
        self.pipes[index] = pipe = None
        gc.collect()
        self.pipes[index] = self.loader(checkpoint, device)
        return self.pipes[index]
