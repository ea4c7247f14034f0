"""The training engine on a toy task: exact resume for both randomness schemes, states on disk
(layout, limit, resume points), the data stream, the learning rate per step and the summary."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from training.data import KeyBatches
from training.engine import (EMA, STATE_FILE, Engine, PerStep, RunSettings, Schedule, Stream, Summary,
                             Task, TrainingError, find_resume, prune_states, saved_states, weight_dtype)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Each run builds its own Accelerator; Accelerate keeps process-wide state between them."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


class Points(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, key):
        return {"x": torch.full((3,), float(key % 5)), "key": key}


def _loss(module, batch, gen):
    noise = torch.randn(batch["x"].shape, generator=gen)
    return ((module(batch["x"] + noise) - batch["x"]) ** 2).mean()


def _run(states: Path, randomness, steps=6, resume=None, keep=None, ema=False, log=None, **task):
    """A toy run: 2 micro-batches of 2 per step, a state every 2 steps; ``task`` changes Task fields."""
    settings = RunSettings(name="toy", steps=steps, batch_size=2, states=states, save_every=2, seed=3,
                           keep=keep, resume=resume, cpu=True, quiet=True, loss_log=log,
                           gradient_accumulation_steps=2, state_at_end=False)
    engine = Engine(settings)
    engine.seed()
    model = nn.Linear(3, 3)
    average = EMA(model, 0.9) if ema else None
    rates = []
    fields = dict(module=model, parameters=list(model.parameters()), loss=_loss, dataset=Points(),
                  schedule=Schedule(lambda k: rates.append(k) or 0.1 / (k + 1)), shuffle=True,
                  randomness=randomness, ema=average, facts={"width": 3}, checked_facts=("width",))
    summary = engine.fit(Task(**dict(fields, **task)))
    return model, summary, rates, average


@pytest.mark.parametrize("randomness", [PerStep, Stream])
def test_a_resumed_run_ends_with_the_weights_of_the_uninterrupted_run(tmp_path, randomness):
    full, summary, rates, ema_full = _run(tmp_path / "a", randomness, ema=True)
    assert (summary.step, summary.done) == (6, 6) and summary.loss is not None
    assert sorted(set(rates)) == list(range(6))  # the rate of update k, for each of its micro-batches
    _run(tmp_path / "b", randomness, ema=True)
    assert [s for s, _ in saved_states(tmp_path / "b")] == [2, 4]  # none after the last step
    shutil.rmtree(tmp_path / "b" / "step-000004")
    resumed, summary, _, ema_resumed = _run(tmp_path / "b", randomness, resume="latest", ema=True)
    assert (summary.step, summary.done) == (6, 4)
    assert torch.equal(full.weight, resumed.weight) and torch.equal(full.bias, resumed.bias)
    assert all(torch.equal(ema_full.shadow[k], ema_resumed.shadow[k]) for k in ema_full.shadow)
    state = json.loads((tmp_path / "b" / "step-000004" / STATE_FILE).read_text())
    assert state == {"step": 4, "updates": 4, "facts": {"width": 3}}
    files = sorted(p.name for p in (tmp_path / "b" / "step-000004").iterdir())
    extra = ["noise-rng-0.safetensors"] if randomness is Stream else []
    assert files == sorted(["ema.safetensors", "model.safetensors", "optimizer.bin",
                            "random_states_0.pkl", STATE_FILE, *extra])


def test_per_step_draws_are_a_function_of_seed_micro_batch_and_process():
    a = PerStep(seed=3, process=0)
    assert torch.equal(torch.randn(4, generator=a.generator(7)), torch.randn(4, generator=a.generator(7)))
    assert not torch.equal(torch.randn(4, generator=a.generator(7)),
                           torch.randn(4, generator=PerStep(3, 1).generator(7)))
    stream = Stream(seed=3, process=0)
    assert stream.generator(0) is stream.generator(5)  # one generator, drawn from in order


def test_states_limit_fresh_runs_and_resume_points(tmp_path, capsys):
    _run(tmp_path, PerStep, steps=8, keep=2)
    assert [s for s, _ in saved_states(tmp_path)] == [4, 6]
    with pytest.raises(TrainingError, match="holds states of an earlier run"):
        _run(tmp_path, PerStep)
    (tmp_path / "step-000009").mkdir()  # incomplete (no state file): ignored
    assert find_resume(tmp_path, "latest") == tmp_path / "step-000006"
    assert find_resume(tmp_path, str(tmp_path / "step-000004")) == tmp_path / "step-000004"
    with pytest.raises(TrainingError, match="not a training state folder"):
        find_resume(tmp_path, str(tmp_path / "step-000009"))
    with pytest.raises(TrainingError, match="no checkpoint in"):
        find_resume(tmp_path / "empty", "latest")
    notes = []
    assert find_resume(tmp_path / "empty", "latest", notes.append, missing_ok=True) is None
    assert "starting at step 0" in notes[0]
    prune_states(tmp_path, 1)
    assert [s for s, _ in saved_states(tmp_path)] == [6]


def test_a_resumed_state_must_share_the_checked_facts(tmp_path):
    _run(tmp_path, PerStep, steps=3)
    state = tmp_path / "step-000002" / STATE_FILE
    saved = json.loads(state.read_text())
    state.write_text(json.dumps(dict(saved, facts={"width": 4})))
    with pytest.raises(TrainingError, match="trained with width 4, this run asks for 3"):
        _run(tmp_path, PerStep, steps=4, resume="latest")


def test_resuming_at_the_last_step_trains_nothing(tmp_path):
    _run(tmp_path, PerStep, steps=5)
    _, summary, rates, _ = _run(tmp_path, PerStep, steps=4, resume=str(tmp_path / "step-000004"))
    assert (summary.step, summary.done) == (4, 0) and set(rates) <= {0}  # no update asked for a rate
    assert str(summary) == "trained 4 steps (0 in this run, 0.0 s)"


def test_the_loss_log_and_a_non_finite_loss(tmp_path):
    log = tmp_path / "loss.jsonl"
    _run(tmp_path / "s", PerStep, steps=3, log=log)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["step"] for line in lines] == [3]  # every 10 steps and at the end
    assert lines[0]["lr"] == pytest.approx(0.1 / 3)
    with pytest.raises(TrainingError, match="the loss became nan at step 1"):
        _run(tmp_path / "t", PerStep, loss=lambda module, batch, gen: module(batch["x"]).sum() / 0 * 0)


def test_key_batches_in_order_or_shuffled():
    ordered = list(KeyBatches(100, 2, seed=0, start=1, stop=3, process=1, processes=2, shuffle=False))
    assert ordered == [[6, 7], [10, 11]]  # micro-batch m of process p: positions (m·P + p)·B …
    shuffled = list(KeyBatches(4, 2, seed=0, start=0, stop=2))
    assert sorted(k for b in shuffled for k in b) == [0, 1, 2, 3] and shuffled != [[0, 1], [2, 3]]


def test_weight_dtypes_and_the_summary_line():
    assert weight_dtype("no") is torch.float32 and weight_dtype("bf16") is torch.bfloat16
    assert weight_dtype("fp16") is torch.float16
    assert str(Summary(10, 4, 2.0, 0.12345)) == \
        "trained 10 steps (4 in this run, 2.0 s, 2.00 steps/s, loss 0.1235)"
