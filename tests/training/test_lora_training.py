"""``ldm train-lora`` on tiny models: the file it writes, exact resume, states, data layouts, errors,
and (slow) two processes through ``accelerate launch``."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from cli.main import main
from training.shapes import sample_spec
from reference.tiny import tiny_tree

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Each run builds its own Accelerator; Accelerate keeps process-wide state between them."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _checkpoint(folder: Path, kind: str) -> Path:
    from ldm.checkpoint import save_checkpoint
    from ldm.model import LatentDiffusion
    from reference.models import randomize_
    from reference.tiny import tiny_config

    path = folder / f"tiny-{kind}.safetensors"
    save_checkpoint(randomize_(LatentDiffusion(tiny_config(kind)), seed=1), path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_tree(kind)))  # sidecar config
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny SD1 and SD2-v checkpoints and a folder of 6 captioned ring images."""
    root = tmp_path_factory.mktemp("lora-train")
    data = root / "rings"
    data.mkdir()
    rng = random.Random(0)
    for i in range(6):
        spec = sample_spec(rng, shape="ring")
        spec.render(32).save(data / f"ring{i}.png")
        (data / f"ring{i}.txt").write_text(f"a {spec.colour} ring on a {spec.background} background")
    return {"sd1": _checkpoint(root, "sd1"), "sd2-v": _checkpoint(root, "sd2-v"), "data": data}


def train(files, out: Path, *extra, kind="sd1", capsys=None):
    argv = ["train-lora", "--data", files["data"], "--checkpoint", files[kind], "--output", out,
            "--resolution", 16, "--batch-size", 2, "-q", *extra]
    code = main([str(a) for a in argv])
    if capsys is not None:
        return code, *capsys.readouterr()
    return code


def read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), f.metadata()


# ------------------------------------------------------------------------------- a training run

def test_training_writes_a_kohya_lora_that_applies(files, tmp_path, capsys):
    from ldm.checkpoint import load_model
    from ldm.weights_io import file_hash
    from ldm.lora import apply_lora, lora_adapters

    out = tmp_path / "ring.safetensors"
    code, stdout, err = train(files, out, "--max-steps", 3, "--rank", 2, "--alpha", 1,
                              "--targets", "attention", "conv", "text-attention", "text-mlp",
                              "--train-text-encoder",
                              "--learning-rate", "1e-3", "--validation-prompt", "a red ring",
                              "--validation-steps", 3, capsys=capsys)
    assert code == 0, err
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith("trained 3 steps") and str(out) in summary
    tensors, meta = read(out)
    assert meta["steps"] == "3" and meta["rank"] == meta["ss_network_dim"] == "2"
    assert meta["alpha"] == "1" and meta["resolution"] == "16" and meta["family"] == "sd1"
    assert meta["base_model_hash"] == file_hash(files["sd1"])[:10]
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_mlp_fc1") for k in tensors)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    assert any("resnets_0_conv1.lora_down" in k for k in tensors)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert all(v.dtype == torch.float32 for v in ups) and all(v.abs().max() > 0 for v in ups)
    assert (tmp_path / "ring-validation" / "step-000003-0.png").is_file()
    model = load_model(files["sd1"])
    apply_lora(model, out)
    assert list(lora_adapters(model)) == ["ring"]


def test_v_prediction_with_min_snr_and_bf16(files, tmp_path):
    out = tmp_path / "v.safetensors"
    assert train(files, out, "--max-steps", 2, "--min-snr-gamma", 5, "--noise-offset", 0.1,
                 "--mixed-precision", "bf16", "--save-precision", "fp16", kind="sd2-v") == 0
    tensors, meta = read(out)
    assert meta["family"] == "sd2-v"
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if not k.endswith(".alpha"))


def test_resumed_run_equals_the_uninterrupted_run(files, tmp_path):
    """Stopped after the state at step 3 was written (later states lost), resumed: the same final
    step count and bit-identical LoRA weights."""
    common = ["--max-steps", 7, "--checkpointing-steps", 3, "--gradient-accumulation-steps", 2,
              "--flip", "--caption-dropout", 0.3, "--lr-scheduler", "cosine", "--lr-warmup-steps", 2,
              "--min-snr-gamma", 5, "--noise-offset", 0.05, "--learning-rate", "1e-3", "--seed", 3]
    assert train(files, tmp_path / "a" / "r.safetensors", *common) == 0
    b = tmp_path / "b" / "r.safetensors"
    assert train(files, b, *common) == 0
    states = tmp_path / "b" / "r-checkpoints"
    assert sorted(p.name for p in states.iterdir()) == ["step-000003", "step-000006"]
    import shutil

    shutil.rmtree(states / "step-000006")
    b.unlink()
    assert train(files, b, *common, "--resume", "latest") == 0
    full, meta_a = read(tmp_path / "a" / "r.safetensors")
    resumed, meta_b = read(b)
    assert meta_b["steps"] == meta_a["steps"] == "7"
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    state = json.loads((states / "step-000006" / "train_state.json").read_text())
    assert state["step"] == 6


def test_state_limit_and_resume_paths(files, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    code, _, err = train(files, out, "--max-steps", 4, "--checkpointing-steps", 1,
                         "--checkpoints-total-limit", 2, capsys=capsys)
    assert code == 0, err
    states = tmp_path / "r-checkpoints"
    assert sorted(p.name for p in states.iterdir()) == ["step-000002", "step-000003"]
    assert sorted(p.name for p in (states / "step-000003").iterdir()) == \
        ["lora.safetensors", "optimizer.bin", "random_states_0.pkl", "train_state.json"]
    # a new run into the same states folder must say so instead of mixing runs
    code, _, err = train(files, out, "--max-steps", 4, capsys=capsys)
    assert code == 1 and "holds states of an earlier run" in err and err.count("\n") == 1
    # resuming at a step that is already the last one rewrites the file, trains nothing
    code, stdout, err = train(files, out, "--max-steps", 3, "--resume", states / "step-000003",
                              capsys=capsys)
    assert code == 0, err
    assert "trained 3 steps (0 in this run" in stdout
    # a state of another adapter shape is refused, naming the difference
    code, _, err = train(files, out, "--max-steps", 5, "--rank", 8, "--resume", "latest", capsys=capsys)
    assert code == 1 and "rank" in err and err.count("\n") == 1, err


def test_regularisation_images_are_weighted_by_the_prior_loss_weight(files, tmp_path):
    """Each sample's loss is multiplied by its weight before the batch mean (kohya's
    prior_loss_weight): checked against the per-sample losses of the same draw."""
    from ldm.model import LatentDiffusion
    from reference.models import randomize_
    from reference.tiny import tiny_config
    from training.lora import Denoiser, LoraLoss, LoraSettings

    model = randomize_(LatentDiffusion(tiny_config("sd1")), seed=1).eval()
    denoiser = Denoiser(model)
    settings = LoraSettings(data=files["data"], output=tmp_path / "unused.safetensors",
                            noise_offset=0.0, min_snr_gamma=None)
    lora_loss = LoraLoss(model, settings, "cpu", train_text=False)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1

    def loss(weights):
        batch = {"pixels": pixels, "caption": ["a red ring", "a blue square"],
                 "weight": torch.tensor(weights)}
        with torch.no_grad():
            return lora_loss(denoiser, batch, torch.Generator().manual_seed(3)).item()

    first, second = 2 * loss([1.0, 0.0]), 2 * loss([0.0, 1.0])
    assert first > 0 and second > 0 and abs(first - second) > 1e-6
    assert loss([1.0, 1.0]) == pytest.approx((first + second) / 2, rel=1e-5)
    assert loss([1.0, 0.25]) == pytest.approx((first + 0.25 * second) / 2, rel=1e-5)

    reg = tmp_path / "reg"
    reg.mkdir()
    for i in range(3):
        spec = sample_spec(random.Random(10 + i), shape="circle")
        spec.render(32).save(reg / f"prior{i}.png")
        (reg / f"prior{i}.txt").write_text(f"a {spec.colour} circle on a {spec.background} background")
    out = tmp_path / "ring.safetensors"
    assert train(files, out, "--max-steps", 2, "--reg-data", reg, "--prior-loss-weight", 0.5) == 0
    _, meta = read(out)
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("6", "3")
    assert meta["ss_prior_loss_weight"] == "0.5"


def test_cached_latents_train_the_same_adapter(files, tmp_path):
    common = ["--max-steps", 3, "--flip", "--learning-rate", "1e-3"]
    assert train(files, tmp_path / "plain.safetensors", *common) == 0
    assert train(files, tmp_path / "cached.safetensors", *common, "--cache-latents") == 0
    plain, _ = read(tmp_path / "plain.safetensors")
    cached, _ = read(tmp_path / "cached.safetensors")
    assert max((plain[k] - cached[k]).abs().max().item() for k in plain) < 1e-4


# ----------------------------------------------------------------------------------- the data

def test_folder_layouts_and_the_key_stream(tmp_path):
    from training.data import (Augment, ImageCaptions, KeyBatches, crop_box, scan_folder)

    sample_spec(random.Random(1), shape="ring").render(32).save(tmp_path / "a.png")
    sample_spec(random.Random(2)).render(40).save(tmp_path / "b.jpg")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a ring"}) + "\n\n" +
        json.dumps({"file_name": "b.jpg", "text": "a shape"}) + "\n")
    examples = scan_folder(tmp_path)
    assert [(e.path.name, e.caption) for e in examples] == [("a.png", "a ring"), ("b.jpg", "a shape")]
    assert crop_box(40, 80, 16, None) == (16, 32, 0, 8)
    items = ImageCaptions(examples, Augment(16, random_crop=True, flip=True, caption_dropout=0.5))
    assert items[5]["pixels"].shape == (3, 16, 16)
    assert torch.equal(items[5]["pixels"], items[5]["pixels"]) and items[7]["caption"] == items[7]["caption"]
    assert {items[k]["caption"] for k in range(40)} == {"", "a ring", "a shape"}
    # two processes split each micro-batch position; together they walk whole permutations
    shards = [list(KeyBatches(5, 2, seed=4, start=0, stop=5, process=p, processes=2)) for p in range(2)]
    stream = [k for m in range(5) for p in range(2) for k in shards[p][m]]
    assert len(stream) == 20
    for epoch in range(4):
        assert sorted(k % 5 for k in stream[epoch * 5:(epoch + 1) * 5]) == list(range(5))
        assert all(k // 5 == epoch for k in stream[epoch * 5:(epoch + 1) * 5])
    assert list(KeyBatches(5, 2, 4, 3, 5, 1, 2)) == shards[1][3:]


def _bad_folder(root: Path, kind: str) -> Path:
    folder = root / kind
    folder.mkdir()
    if kind == "uncaptioned":
        for name in ("x.png", "y.png"):
            sample_spec(random.Random(0)).render(16).save(folder / name)
        (folder / "x.txt").write_text("a shape")
    elif kind == "broken":
        (folder / "z.png").write_bytes(b"not a png at all")
        (folder / "z.txt").write_text("a shape")
    elif kind == "bad-jsonl":
        (folder / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    return folder


@pytest.mark.parametrize("case,fragment,status", [
    ("empty", "no images in it", 1),
    ("uncaptioned", "1 images have no caption file (same name, .txt): y.png", 1),
    ("broken", "1 images cannot be read: z.png", 1),
    ("bad-jsonl", "listed images do not exist: gone.png", 1),
    ("rank", "argument --rank: must be at least 1, got 0", 2),
    ("suffix", "--output must name a .safetensors file", 2),
    ("resume", "not a training state folder", 1),
    ("text-targets", "text-encoder targets need --train-text-encoder", 2),
    ("no-default-model", "no default model is installed", 1),
    ("fp16-on-cpu", "--mixed-precision fp16 needs a GPU", 1),
    ("reg-empty", "no images in it", 1),
    ("reg-same", "--reg-data must be another folder than --data", 2),
])
def test_bad_inputs_give_one_error_line(files, tmp_path, capsys, monkeypatch, case, fragment, status):
    data = files["data"] if case in ("rank", "suffix", "resume", "text-targets", "no-default-model",
                                     "fp16-on-cpu", "reg-empty", "reg-same") \
        else _bad_folder(tmp_path, case)
    out = tmp_path / ("r.ckpt" if case == "suffix" else "r.safetensors")
    argv = ["train-lora", "--data", data, "--output", out, "--max-steps", 1, "-q"]
    if case != "no-default-model":
        argv += ["--checkpoint", files["sd1"]]
    else:
        import pipelines.pipeline

        monkeypatch.setattr(pipelines.pipeline, "DEFAULT_CHECKPOINT", tmp_path / "absent.safetensors")
    argv += {"rank": ["--rank", 0], "resume": ["--resume", tmp_path], "text-targets":
             ["--targets", "text-mlp"], "fp16-on-cpu": ["--mixed-precision", "fp16", "--cpu"],
             "reg-same": ["--reg-data", data]}.get(case, [])
    if case == "reg-empty":
        argv += ["--reg-data", _bad_folder(tmp_path, "empty")]
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == status
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert fragment in err, err
    assert not out.exists()


def test_help_is_the_training_parser(capsys):
    assert main(["train-lora", "--help"]) == 0
    assert "usage: ldm train-lora" in capsys.readouterr().out


# ------------------------------------------------------------------------------ two processes

@pytest.mark.slow
def test_two_processes_through_accelerate_launch(files, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m cli train-lora --cpu``: torchrun-style
    processes joined over gloo (Accelerate's own ``--cpu`` launcher starts only one process)."""
    out = tmp_path / "ddp.safetensors"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "cli", "train-lora", "--cpu", "--data", str(files["data"]),
           "--checkpoint", str(files["sd1"]), "--output", str(out), "--resolution", "16",
           "--batch-size", "2", "--max-steps", "3", "--checkpointing-steps", "2", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote") == 1
    _, meta = read(out)
    assert meta["processes"] == "2" and meta["steps"] == "3"
    assert sorted(p.name for p in (tmp_path / "ddp-checkpoints" / "step-000002").iterdir()) == \
        ["lora.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
         "train_state.json"]
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["ddp.safetensors"]


# ------------------------------------------------------------------ the concept, on the real model

@pytest.mark.slow
def test_lora_teaches_the_default_model_a_ring(tmp_path):
    """benchmarks/lora_concept.py: ≤ 40 rendered rings, ≤ 10 minutes of CPU training; then most
    ring prompts (unseen colours included) draw rings, old shapes stay right, scale 0 is exact."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lora_concept", ROOT / "benchmarks" / "lora_concept.py")
    concept = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(concept)
    figures = concept.run(concept.parse_args(["--workdir", str(tmp_path),
                                              "--threads", str(torch.get_num_threads() or 2)]))
    assert figures["rings_before"] <= 0.05, figures
    assert figures["scale0_bit_identical"], figures
    assert figures["rings_after"] >= 0.80, figures
    assert figures["old_shapes_after"] >= 0.85, figures
    assert figures["training_seconds"] <= 600, figures
