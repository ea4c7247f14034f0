"""``txt2img --from-file`` over several processes: each prompt keeps its index, so its seeds and file
names are those a single process gives it, whichever process makes it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli import generate
from cli.main import main
from tests.cli.common import ROOT

PROMPTS = "a red circle\na blue square\n# skipped\na green triangle on the left\n"
ARGS = ["--num-images", "2", "--seed", "7", "--steps", "3", "-q"]


@pytest.mark.parametrize("count,world", [(0, 2), (1, 2), (5, 2), (6, 3), (7, 4), (3, 8)])
def test_shard_gives_every_prompt_to_exactly_one_process(count, world):
    shares = [generate.shard(count, rank, world) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # even work


def test_a_single_run_does_not_start_accelerate(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert generate._processes(None) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert generate._processes("cpu") is None


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The files one process writes for PROMPTS (default model)."""
    folder = tmp_path_factory.mktemp("dist")
    (folder / "prompts.txt").write_text(PROMPTS)
    assert main(["txt2img", "--from-file", str(folder / "prompts.txt"), *ARGS,
                 "-o", str(folder / "one" / "img.png")]) == 0
    return folder, _files(folder / "one")


def test_process_two_of_two_writes_its_share_with_single_process_bytes(single, monkeypatch, capsys):
    """The loop's split, in-process: process 1 of 2 makes prompt 1 only (images 2 and 3)."""
    folder, one = single
    state = SimpleNamespace(process_index=1, num_processes=2, is_main_process=False, device="cpu")
    monkeypatch.setattr(generate, "_processes", lambda device: state)
    assert main(["txt2img", "--from-file", str(folder / "prompts.txt"), *ARGS,
                 "-o", str(folder / "rank1" / "img.png")]) == 0
    assert "seed 9" in capsys.readouterr().out
    got = _files(folder / "rank1")
    assert sorted(got) == ["img-2.png", "img-3.png"]
    assert all(got[name] == one[name] for name in got)


@pytest.mark.slow
def test_two_processes_through_accelerate_launch_write_the_single_process_files(single):
    """``accelerate launch --multi_gpu --num_processes 2 -m cli txt2img --from-file``: two CPU
    processes joined over gloo (Accelerate's ``--cpu`` launcher would start only one) write the
    same file names and bytes as one process."""
    folder, one = single
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "cli", "txt2img", "--from-file",
           str(folder / "prompts.txt"), *ARGS, "-o", str(folder / "two" / "img.png")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote") == 6, done.stdout  # each image written once, by one process
    two = _files(folder / "two")
    assert sorted(two) == sorted(one) == [f"img-{i}.png" for i in range(6)]
    assert all(two[name] == one[name] for name in one), "pixels or metadata differ"
