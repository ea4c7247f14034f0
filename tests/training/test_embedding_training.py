"""``ldm train-embedding`` on tiny models: only the word's vectors train, their A1111 initialisation,
the captions, exact resume, the files (ours, A1111's layouts, diffusers' ``load_textual_inversion``),
errors, and (slow) two processes through ``accelerate launch``."""
from __future__ import annotations

import copy
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cli.main import main
from ldm.embeddings import load_embedding
from ldm.modules.tokenizer import clean_text, clip_tokenizer
from reference.tiny import tiny_tree
from training.shapes import sample_spec

ROOT = Path(__file__).resolve().parents[2]
WORD = "xqsqz"  # several BPE pieces, none a word of the tiny captions
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Each run builds its own Accelerator; Accelerate keeps process-wide state between them."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SD1 checkpoint and 6 square images; two captions lack the word, one uses [name]."""
    from ldm.checkpoint import save_checkpoint
    from ldm.model import LatentDiffusion
    from reference.models import randomize_
    from reference.tiny import tiny_config

    root = tmp_path_factory.mktemp("embedding-train")
    ckpt = root / "tiny-sd1.safetensors"
    save_checkpoint(randomize_(LatentDiffusion(tiny_config("sd1")), seed=1), ckpt)
    ckpt.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_tree("sd1")))
    data = root / "squares"
    data.mkdir()
    rng = random.Random(0)
    for i in range(6):
        spec = sample_spec(rng, shape="square")
        spec.render(32).save(data / f"sq{i}.png")
        word = {0: "square", 1: "square", 2: "[name]"}.get(i, WORD)
        (data / f"sq{i}.txt").write_text(f"a {spec.colour} {word} on a {spec.background} background")
    return {"checkpoint": ckpt, "data": data}


def train(files, out: Path, *extra, capsys=None, data=None):
    argv = ["train-embedding", "--data", data or files["data"], "--checkpoint", files["checkpoint"],
            "--token", WORD, "--init-word", "red square", "--output", out, "--resolution", 16,
            "--batch-size", 2, "-q", *extra]
    code = main([str(a) for a in argv])
    if capsys is not None:
        return code, *capsys.readouterr()
    return code


def _load(files):
    from ldm.checkpoint import load_model

    return load_model(files["checkpoint"], dtype=torch.float32, device="cpu")


# ----------------------------------------------------------------------------- words and rows

def test_init_vectors_spread_the_init_words_rows_as_a1111():
    from training.embedding import init_vectors

    tok = clip_tokenizer()
    encoder = torch.nn.Module()
    encoder.token_embedding = torch.nn.Embedding(49408, 4)
    rows = encoder.token_embedding.weight.detach()
    one, two = tok.encode(clean_text("red")), tok.encode(clean_text("red square"))
    assert len(one) == 1 and len(two) == 2
    assert torch.equal(init_vectors(encoder, tok, "red", 3), rows[[one[0]] * 3])
    # row i takes token i·T // N: two tokens over three vectors → 0, 0, 1
    assert torch.equal(init_vectors(encoder, tok, "red square", 3), rows[[two[0], two[0], two[1]]])
    # more tokens than vectors: the first N
    assert torch.equal(init_vectors(encoder, tok, "red square", 1), rows[[two[0]]])
    from training.engine import TrainingError

    with pytest.raises(TrainingError, match="has no tokens"):
        init_vectors(encoder, tok, "\x00", 1)  # cleaned away entirely


def test_captions_hold_the_word():
    from training.embedding import contains_word, with_word

    tok = clip_tokenizer()
    assert with_word(tok, f"a red {WORD} on blue", WORD) == f"a red {WORD} on blue"
    assert with_word(tok, "a red [name] on blue", WORD) == f"a red {WORD} on blue"
    assert with_word(tok, "a red square", WORD) == f"{WORD}, a red square"
    assert with_word(tok, "", WORD) == WORD
    assert not contains_word(tok, f"a red {WORD}x", WORD)  # part of a longer word is not the word


# ------------------------------------------------------------------------------ a training run

def test_only_the_vectors_train_and_the_file_loads(files, tmp_path, capsys, monkeypatch):
    """The base model after training is bit-identical to a fresh load; the vectors moved from the
    init word's rows; the .pt file is A1111's layout with name and step; validation images exist."""
    import training.lora
    from training.embedding import init_vectors

    kept = {}
    real = training.lora.load_base_model

    def capture(*args):
        kept["model"], path = real(*args)
        return kept["model"], path
    monkeypatch.setattr(training.lora, "load_base_model", capture)
    out = tmp_path / f"{WORD}.pt"
    code, stdout, err = train(files, out, "--max-steps", 3, "--vectors", 2, "--learning-rate", "0.05",
                              "--validation-prompt", f"a red {WORD}", "--validation-steps", 3,
                              capsys=capsys)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1].startswith("trained 3 steps") and str(out) in stdout
    fresh = _load(files).state_dict()
    trained = kept["model"].state_dict()
    assert fresh.keys() == trained.keys()
    assert all(torch.equal(fresh[k], trained[k].cpu()) for k in fresh)
    data = torch.load(out, weights_only=True)
    assert data["name"] == WORD and data["step"] == 3 and list(data["string_to_param"]) == ["*"]
    emb = load_embedding(out, 32)
    start = init_vectors(kept["model"].cond_stage_model, clip_tokenizer(), "red square", 2)
    assert emb.vectors.shape == (2, 32) and (emb.vectors - start).abs().max() > 1e-3
    assert (tmp_path / f"{WORD}-validation" / "step-000003-0.png").is_file()


def test_zero_learning_rate_keeps_the_init_rows(files, tmp_path):
    """With nothing learnt, the file holds exactly the init word's rows (A1111's spread)."""
    from training.embedding import init_vectors

    out = tmp_path / f"{WORD}.safetensors"
    assert train(files, out, "--max-steps", 1, "--vectors", 3, "--learning-rate", "1e-30") == 0
    start = init_vectors(_load(files).cond_stage_model, clip_tokenizer(), "red square", 3)
    assert torch.equal(load_embedding(out, 32).vectors, start)


def test_bf16_keeps_the_vectors_in_float32(files, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / f"{WORD}.safetensors"
    assert train(files, out, "--max-steps", 2, "--mixed-precision", "bf16", "--cpu") == 0
    assert load_file(str(out))["emb_params"].dtype == torch.float32


def test_resumed_run_equals_the_uninterrupted_run(files, tmp_path):
    common = ["--max-steps", 5, "--checkpointing-steps", 2, "--gradient-accumulation-steps", 2,
              "--flip", "--lr-scheduler", "cosine", "--lr-warmup-steps", 1, "--learning-rate", "0.02",
              "--vectors", 2, "--seed", 3, "--max-grad-norm", 1]
    assert train(files, tmp_path / "a" / "e.safetensors", *common) == 0
    b = tmp_path / "b" / "e.safetensors"
    assert train(files, b, *common) == 0
    states = tmp_path / "b" / "e-checkpoints"
    assert sorted(p.name for p in states.iterdir()) == ["step-000002", "step-000004"]
    assert sorted(p.name for p in (states / "step-000002").iterdir()) == \
        ["embedding.safetensors", "optimizer.bin", "random_states_0.pkl", "train_state.json"]
    shutil.rmtree(states / "step-000004")
    b.unlink()
    assert train(files, b, *common, "--resume", "latest") == 0
    full = load_embedding(tmp_path / "a" / "e.safetensors").vectors
    assert torch.equal(full, load_embedding(b).vectors)
    assert (states / "step-000004" / "train_state.json").is_file()


def test_diffusers_loads_the_trained_file(files, tmp_path):
    """diffusers' ``load_textual_inversion`` reads both written layouts: the same vectors, and the
    same text-encoder output as ours for a prompt using the word."""
    from pipelines.prompts import encode_prompts
    from reference import pipelines as dp

    out = tmp_path / f"{WORD}.safetensors"
    assert train(files, out, "--max-steps", 2, "--vectors", 2, "--learning-rate", "0.05") == 0
    torch.save({"string_to_param": {"*": load_embedding(out).vectors}, "name": WORD, "step": 2},
               tmp_path / "other.pt")
    model = _load(files).eval()
    ours = {WORD: load_embedding(out, 32)}
    prompt = f"a red {WORD} on a blue background"
    with torch.no_grad():
        cond, _ = encode_prompts(model, [prompt], [""], embeddings=ours)
        plain, _ = encode_prompts(model, [prompt], [""])
    assert (cond - plain).abs().max() > 1e-3
    for path in (out, tmp_path / "other.pt"):
        parts = dp.components(model, tiny_tree("sd1"))
        parts["tokenizer"] = copy.deepcopy(parts["tokenizer"])  # a shared one would keep the word
        pipe = dp.pipeline("txt2img", parts, dp.reference_scheduler("ddim"))
        pipe.load_textual_inversion(str(path), token=WORD)
        ids = pipe.tokenizer.convert_tokens_to_ids([WORD, f"{WORD}_1"])
        rows = pipe.text_encoder.get_input_embeddings().weight[ids]
        assert torch.equal(rows, ours[WORD].vectors)
        with torch.no_grad():
            theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        torch.testing.assert_close(cond, theirs, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("case,fragment,status", [
    ("empty", "no images in it", 1),
    ("vectors", "argument --vectors: must be at least 1, got 0", 2),
    ("init", "--init-word must not be empty", 2),
    ("token", "--token must not be empty", 2),
    ("suffix", "--output must name a .safetensors or .pt file", 2),
    ("resume", "not a training state folder", 1),
])
def test_bad_inputs_give_one_error_line(files, tmp_path, capsys, case, fragment, status):
    data = files["data"]
    if case == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    out = tmp_path / ("e.bin" if case == "suffix" else "e.safetensors")
    argv = ["train-embedding", "--data", data, "--checkpoint", files["checkpoint"], "--output", out,
            "--max-steps", 1, "-q", "--token", "" if case == "token" else WORD,
            "--init-word", " " if case == "init" else "square"]
    argv += {"vectors": ["--vectors", 0], "resume": ["--resume", tmp_path]}.get(case, [])
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == status
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert fragment in err, err
    assert not out.exists() and not (tmp_path / "e-checkpoints").exists()


def test_a_vocabulary_word_as_token_warns(files, tmp_path, capsys):
    out = tmp_path / "square.safetensors"
    argv = ["train-embedding", "--data", files["data"], "--checkpoint", files["checkpoint"],
            "--output", out, "--max-steps", 1, "-q", "--token", "square", "--init-word", "square",
            "--resolution", 16]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: --token 'square' is a single word") and err.count("\n") == 1
    assert out.is_file()


def test_help_is_the_training_parser(capsys):
    assert main(["train-embedding", "--help"]) == 0
    assert "usage: ldm train-embedding" in capsys.readouterr().out


# ------------------------------------------------------------------------------ two processes

@pytest.mark.slow
def test_two_processes_through_accelerate_launch(files, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m cli train-embedding --cpu`` over gloo:
    one file, and both processes' random states in the state."""
    out = tmp_path / "ddp.safetensors"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "cli", "train-embedding", "--cpu",
           "--data", str(files["data"]), "--checkpoint", str(files["checkpoint"]), "--output", str(out),
           "--token", WORD, "--init-word", "square", "--vectors", "2", "--resolution", "16",
           "--batch-size", "2", "--max-steps", "3", "--checkpointing-steps", "2", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote") == 1
    assert load_embedding(out, 32).vectors.shape == (2, 32)
    assert sorted(p.name for p in (tmp_path / "ddp-checkpoints" / "step-000002").iterdir()) == \
        ["embedding.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
         "train_state.json"]


# ------------------------------------------------------------------ the concept, on the real model

@pytest.mark.slow
def test_an_embedding_teaches_the_default_model_a_word_for_square(tmp_path):
    """benchmarks/embedding_concept.py: 40 rendered squares, a few minutes of CPU training; then
    prompts naming ``sqz`` draw squares ≥ 90 % of the time, unseen colours included."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("embedding_concept",
                                                  ROOT / "benchmarks" / "embedding_concept.py")
    concept = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(concept)
    figures = concept.run(concept.parse_args(["--workdir", str(tmp_path), "--skip-before",
                                              "--json", str(tmp_path / "figures.json")]))
    assert figures["after"]["mean"] >= 0.9, figures
    assert figures["training_seconds"] <= 600, figures


# ------------------------------------------------------------------------------ A1111 templates

def test_prompt_templates_with_filewords(files, tmp_path, capsys):
    """A1111's prompt templates: each item's caption is one of the lines, chosen by its key,
    ``[name]`` the word and ``[filewords]`` the caption, or the file name without leading digits
    where there is no caption file."""
    from training.data import Augment, ImageCaptions, read_templates, scan_folder

    data = tmp_path / "named"
    data.mkdir()
    for i, stem in enumerate(("0001-a red square", "0002-a blue square")):
        sample_spec(random.Random(i), shape="square").render(16).save(data / f"{stem}.png")
    template = tmp_path / "style.txt"
    template.write_text("a photo of [name], [filewords]\n\n[filewords] in the style of [name]\n")
    examples = scan_folder(data, names=True)
    assert [e.caption for e in examples] == ["a red square", "a blue square"]
    lines = tuple(t.replace("[name]", WORD) for t in read_templates(template))
    items = ImageCaptions(examples, Augment(16, seed=3, templates=lines))
    captions = {items.caption(k, k % 2, False) for k in range(40)}
    assert captions == {f"a photo of {WORD}, a red square", f"a photo of {WORD}, a blue square",
                        f"a red square in the style of {WORD}", f"a blue square in the style of {WORD}"}
    assert items.caption(5, 1, False) == items.caption(5, 1, False)
    assert train(files, tmp_path / "e.safetensors", "--max-steps", 2, "--template", template,
                 data=data) == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    code, _, err = train(files, tmp_path / "f.safetensors", "--template", empty, capsys=capsys)
    assert code == 1 and err.strip().splitlines() == [f"error: --template {empty}: no template lines in it"]
