"""The worker on its own, with stand-in pipelines: FIFO order, one job at a time per device, model
switches between jobs, withdrawal from the queue, --max-queue, several devices, shutdown."""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from server.worker import QueueFull, ShuttingDown, Worker


class FakePipe:
    def __init__(self, checkpoint, device):
        self.model_path, self.device = str(checkpoint), device


def _worker(devices=(None,), max_queue=0):
    loads = []

    def loader(checkpoint, device):
        loads.append((Path(checkpoint).name, device))
        return FakePipe(checkpoint, device)

    w = Worker(loader, list(devices), max_queue)
    w.start()
    return w, loads


def _job(log, name, gate=None):
    def run(pipe, control):
        if gate is not None:
            gate.wait(10)
        log.append((name, Path(pipe.model_path).name, pipe.device))
        return name
    return run


def test_jobs_run_in_order_and_models_switch_between_them(tmp_path):
    w, loads = _worker()
    log, gate = [], threading.Event()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    jobs = [w.submit("1", _job(log, 1, gate), a), w.submit("2", _job(log, 2), b),
            w.submit("3", _job(log, 3), b), w.submit("4", _job(log, 4), a)]
    gate.set()
    assert [j.future.result(10) for j in jobs] == [1, 2, 3, 4]
    assert [x[:2] for x in log] == [(1, "a.safetensors"), (2, "b.safetensors"),
                                    (3, "b.safetensors"), (4, "a.safetensors")]
    assert [x[0] for x in loads] == ["a.safetensors", "b.safetensors", "a.safetensors"]
    w.stop()


def test_withdrawn_jobs_never_run_and_the_queue_has_a_limit(tmp_path):
    w, _ = _worker(max_queue=2)
    log, gate = [], threading.Event()
    first = w.submit("1", _job(log, 1, gate), tmp_path / "m")
    while not w.running():
        time.sleep(0.01)
    second = w.submit("2", _job(log, 2), tmp_path / "m")
    w.submit("3", _job(log, 3), tmp_path / "m")
    with pytest.raises(QueueFull):
        w.submit("4", _job(log, 4), tmp_path / "m")
    assert w.withdraw(second) is True and w.queued() == 1
    with pytest.raises(CancelledError):
        second.future.result(1)
    gate.set()
    first.future.result(10)
    w.stop(timeout=10)
    assert [x[0] for x in log] == [1, 3]


def test_one_worker_per_device_and_shutdown(tmp_path):
    w, loads = _worker(devices=("cpu:0", "cpu:1"))
    gate, log = threading.Barrier(2, timeout=10), []

    def both(pipe, control):  # two jobs can only pass the barrier together: both devices busy
        gate.wait()
        log.append(pipe.device)

    jobs = [w.submit("x", both, tmp_path / "m") for _ in range(2)]
    for j in jobs:
        j.future.result(10)
    assert sorted(log) == ["cpu:0", "cpu:1"] and sorted(d for _, d in loads) == ["cpu:0", "cpu:1"]
    hold = threading.Event()
    running = w.submit("long", lambda pipe, control: hold.wait(10) and "done", tmp_path / "m")
    while not w.running():
        time.sleep(0.01)
    queued = [w.submit("q", lambda p, c: "ran", tmp_path / "m") for _ in range(3)]
    w.close()
    with pytest.raises(ShuttingDown):
        w.submit("late", lambda p, c: None, tmp_path / "m")
    hold.set()
    assert running.future.result(10) == "done"  # the running job finishes
    for j in queued:  # queued ones either ran on the free device or were cancelled
        assert j.future.exception(10) is None or isinstance(j.future.exception(), ShuttingDown)
    w.stop(timeout=10)
