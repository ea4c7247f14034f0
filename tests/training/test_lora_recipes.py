"""What ``ldm train-lora`` offers to make a concept stick on data nobody tuned it for: pivotal tuning
(the word's vectors trained with the LoRA, written beside it, loaded with it, read by diffusers),
DreamBooth class images drawn by the base model, kohya's ``N_name`` repeats and caption shuffling,
learning-rate schedules and separate rates for the text encoder and the word."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.shapes import sample_spec
from tests.training.test_lora_training import fresh_accelerate, files, read, train  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")
WORD = "zwx"


# ----------------------------------------------------------------------------------- the data

def test_kohya_repeat_folders_and_their_captions(tmp_path):
    from training.data import scan_folder

    (tmp_path / "3_zwx ring").mkdir()
    (tmp_path / "plain").mkdir()
    for name in ("3_zwx ring/a.png", "3_zwx ring/b.png", "plain/c.png"):
        sample_spec(random.Random(len(name)), shape="ring").render(16).save(tmp_path / name)
    (tmp_path / "3_zwx ring" / "b.txt").write_text("a red zwx ring\n")
    (tmp_path / "plain" / "c.txt").write_text("a circle")
    got = [(e.path.name, e.caption) for e in scan_folder(tmp_path)]
    assert got == [("a.png", "zwx ring")] * 3 + [("b.png", "a red zwx ring")] * 3 + [("c.png", "a circle")]
    (tmp_path / "plain" / "c.txt").unlink()  # outside an N_name folder a caption is still needed
    with pytest.raises(ValueError, match="1 images have no caption file"):
        scan_folder(tmp_path)


def test_repeated_images_are_encoded_once_and_cached_in_place(tmp_path):
    from ldm.model import LatentDiffusion
    from reference.models import randomize_
    from reference.tiny import tiny_config
    from training.data import Augment, CachedLatents, ImageCaptions, encode_posteriors, scan_folder

    (tmp_path / "2_ring").mkdir()
    for i in range(2):
        sample_spec(random.Random(i), shape="ring").render(16).save(tmp_path / "2_ring" / f"{i}.png")
    vae = randomize_(LatentDiffusion(tiny_config("sd1")), seed=1).first_stage_model.eval()
    source = ImageCaptions(scan_folder(tmp_path), Augment(16, flip=True))
    calls = []
    vae.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    vae.encode = (lambda encode: lambda x: (calls.append(x.shape[0]), encode(x))[1])(vae.encode)
    mean, std = encode_posteriors(source, vae, "cpu")
    assert sum(calls) == 4  # 2 images × (plain, mirrored), not 8
    assert mean.shape[0] == 8 and torch.equal(mean[0], mean[1]) and torch.equal(mean[4], mean[5])
    assert not torch.equal(mean[0], mean[4])  # the mirrored block follows
    cached = CachedLatents(source, mean, std)
    assert cached[0]["caption"] == "ring"


def test_shuffled_captions_keep_their_first_parts(tmp_path):
    from training.data import Augment, Example, ImageCaptions, shuffled_caption

    caption = "zwx, red ring, blue background, large, on the left"
    seen = {shuffled_caption(caption, 1, random.Random(k)) for k in range(40)}
    assert len(seen) > 5
    for text in seen:
        parts = text.split(", ")
        assert parts[0] == "zwx" and sorted(parts) == sorted(caption.split(", "))
    examples = [Example(tmp_path / "a.png", caption)]
    shuffled = ImageCaptions(examples, Augment(16, shuffle_caption=True, keep_tokens=2, seed=1))
    plain = ImageCaptions(examples, Augment(16, seed=1))
    assert {shuffled.caption(k, 0, False) for k in range(30)} > {caption}
    assert all(shuffled.caption(k, 0, False).startswith("zwx, red ring, ") for k in range(30))
    assert shuffled.caption(7, 0, False) == shuffled.caption(7, 0, False)  # a function of the key
    assert [plain.choices(k)[2:] for k in range(30)] == [shuffled.choices(k)[2:] for k in range(30)]
    assert plain.caption(3, 0, False) == caption and shuffled.caption(3, 0, True) == ""


# ------------------------------------------------------------------------------ rates

def test_cosine_with_restarts_follows_diffusers_schedule(files, tmp_path):
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    from training.lora import LoraSettings, learning_rate

    settings = LoraSettings(data=files["data"], output=tmp_path / "x.safetensors", max_steps=40,
                            learning_rate=2e-3, lr_scheduler="cosine_with_restarts",
                            lr_warmup_steps=5, lr_num_cycles=3)
    rate = learning_rate(settings)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
    sched = get_cosine_with_hard_restarts_schedule_with_warmup(opt, 5, 40, num_cycles=3)
    expected = []
    for _ in range(40):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [rate(k) for k in range(40)] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert rate(0) == 0 and max(expected) == pytest.approx(2e-3)
    assert sum(expected[k + 1] > expected[k] * 1.5 for k in range(6, 39)) == 2  # two restarts


def test_text_encoder_and_word_rates_are_their_own(files, tmp_path):
    """A vanishing --text-encoder-lr leaves the text encoder's LoRA at its zero start, and a
    vanishing --embedding-lr the word at its init rows, while the UNet's LoRA trains."""
    from ldm.embeddings import load_embedding
    from ldm.checkpoint import load_model
    from ldm.modules.tokenizer import tokenizer_for
    from training.embedding import init_vectors

    out = tmp_path / "r.safetensors"
    assert train(files, out, "--max-steps", 3, "--learning-rate", "1e-2", "--train-text-encoder",
                 "--targets", "attention", "text-attention", "--text-encoder-lr", "1e-30",
                 "--token", WORD, "--init-word", "circle", "--vectors", 2,
                 "--embedding-lr", "1e-30") == 0
    tensors, _ = read(out)
    text_ups = [v for k, v in tensors.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    unet_ups = [v for k, v in tensors.items() if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert text_ups and max(v.abs().max().item() for v in text_ups) < 1e-20
    assert min(v.abs().max().item() for v in unet_ups) > 1e-4
    model = load_model(files["sd1"])
    start = init_vectors(model.cond_stage_model, tokenizer_for(model.config.text), "circle", 2)
    vectors = load_embedding(out.with_name("r_emb.safetensors")).vectors
    torch.testing.assert_close(vectors, start, atol=1e-20, rtol=0)


# ------------------------------------------------------------------------------ pivotal tuning

def test_pivotal_tuning_writes_the_word_beside_the_lora_and_resumes_exactly(files, tmp_path):
    common = ["--max-steps", 5, "--checkpointing-steps", 2, "--learning-rate", "1e-2", "--token", WORD,
              "--init-word", "circle", "--vectors", 2, "--embedding-lr", "5e-2", "--flip",
              "--shuffle-caption", "--seed", 2]
    a, b = tmp_path / "a" / "r.safetensors", tmp_path / "b" / "r.safetensors"
    assert train(files, a, *common) == 0
    assert train(files, b, *common) == 0
    shutil.rmtree(tmp_path / "b" / "r-checkpoints" / "step-000004")
    b.unlink()
    b.with_name("r_emb.safetensors").unlink()
    assert train(files, b, *common, "--resume", "latest") == 0
    full, meta = read(a)
    resumed, _ = read(b)
    assert meta["ldm_embedding_token"] == WORD and meta["ldm_embedding_file"] == "r_emb.safetensors"
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    emb_a = load_file(str(a.with_name("r_emb.safetensors")))
    emb_b = load_file(str(b.with_name("r_emb.safetensors")))
    assert emb_a["emb_params"].shape == (2, 32) and torch.equal(emb_a["emb_params"], emb_b["emb_params"])
    with safe_open(str(a.with_name("r_emb.safetensors")), "pt") as f:
        assert f.metadata()["name"] == WORD


def _diffusers_default_model(folder: Path):
    """The shipped default model converted by diffusers' own single-file code (offline config)."""
    from diffusers import StableDiffusionPipeline

    from benchmarks.load_checkpoint import write_diffusers_config_folder
    from pipelines.pipeline import DEFAULT_CHECKPOINT, DEFAULT_CONFIG

    write_diffusers_config_folder(folder, yaml.safe_load(Path(DEFAULT_CONFIG).read_text()))
    pipe = StableDiffusionPipeline.from_single_file(str(DEFAULT_CHECKPOINT), config=str(folder),
                                                    local_files_only=True, safety_checker=None)
    from reference.pipelines import reference_scheduler

    pipe.scheduler = reference_scheduler("ddim")  # SD's DDIM settings, as ours
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pivotal_lora_gives_diffusers_image_on_the_default_model(tmp_path):
    """Trained on the shipped default model: the LoRA file in diffusers' ``load_lora_weights`` and
    the embedding in its ``load_textual_inversion`` give our image (≤ 1/255 mean); at scale 0 the
    word keeps its base meaning, so the image is the base model's bit for bit."""
    from cli.main import main
    from pipelines.pipeline import Pipeline
    data = tmp_path / "rings"
    data.mkdir()
    for i in range(4):
        spec = sample_spec(random.Random(i), shape="ring", size="large")
        spec.render().save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {spec.colour} {WORD} on a {spec.background} background")
    out = tmp_path / "ring.safetensors"
    assert main(["train-lora", "--data", str(data), "--output", str(out), "--max-steps", "3",
                 "--batch-size", "2", "--learning-rate", "2e-2", "--token", WORD, "--vectors", "2",
                 "--init-word", "circle", "--embedding-lr", "0.1", "--train-text-encoder",
                 "--targets", "attention", "text-attention", "-q"]) == 0
    prompt, kw = f"a purple {WORD} on a white background", dict(num_inference_steps=6, guidance_scale=2.5)
    pipe = Pipeline.from_checkpoint(device="cpu")
    base = pipe.txt2img(prompt, seed=5, scheduler="ddim", progress=False, return_latents=True, **kw)
    name = pipe.load_lora(out, scale=0.0)
    zero = pipe.txt2img(prompt, seed=5, scheduler="ddim", progress=False, return_latents=True, **kw)
    assert torch.equal(base.latents, zero.latents)
    pipe.set_lora_scale(name, 1.0)
    ours = pipe.txt2img(prompt, seed=5, scheduler="ddim", progress=False, **kw).images[0]
    assert "TI hashes" in pipe.txt2img(prompt, seed=5, progress=False, **kw).parameters[0]

    ref = _diffusers_default_model(tmp_path / "diffusers-config")
    ref.load_lora_weights(str(out))
    ref.load_textual_inversion(str(out.with_name("ring_emb.safetensors")), token=WORD)
    theirs = ref(prompt, generator=torch.Generator("cpu").manual_seed(5), height=64, width=64,
                 **kw).images[0]
    a, b = (np.asarray(im.convert("RGB")).astype(np.int16) for im in (ours, theirs))
    base_u8 = np.asarray(base.images[0].convert("RGB")).astype(np.int16)
    assert np.abs(a - b).mean() <= 1.0, np.abs(a - b).mean()
    assert np.abs(a - base_u8).mean() > 4.0, "the LoRA and word hardly changed the image"


def test_a1111_bundled_embedding_in_a_lora_file_is_a_prompt_word(files, tmp_path):
    from pipelines.pipeline import Pipeline

    out = tmp_path / "r.safetensors"
    assert train(files, out, "--max-steps", 1, "--learning-rate", "1e-2") == 0
    tensors, meta = read(out)
    vectors = torch.randn(2, 32)
    tensors[f"bundle_emb.{WORD}.string_to_param.*"] = vectors
    bundled = tmp_path / "bundled.safetensors"
    save_file(tensors, str(bundled), metadata=meta)
    pipe = Pipeline.from_checkpoint(files["sd1"], device="cpu")
    name = pipe.load_lora(bundled)
    assert torch.equal(pipe.embeddings[WORD].vectors, vectors)
    pipe.unload_lora(name)
    assert WORD not in pipe.embeddings
    tensors[f"bundle_emb.{WORD}.string_to_param.*"] = torch.randn(2, 48)
    save_file(tensors, str(bundled), metadata=meta)
    from ldm.lora import lora_adapters
    from ldm.weights_io import CheckpointError

    with pytest.raises(CheckpointError, match=r"bundled.safetensors.*48 wide.*32 wide"):
        pipe.load_lora(bundled)
    assert lora_adapters(pipe.model) == {} and WORD not in pipe.embeddings  # nothing applied


def test_a_missing_embedding_file_is_one_error_line(files, tmp_path, capsys):
    from cli.main import main

    out = tmp_path / "r.safetensors"
    assert train(files, out, "--max-steps", 1, "--token", WORD) == 0
    out.with_name("r_emb.safetensors").unlink()
    code = main(["txt2img", f"a {WORD}", "--checkpoint", str(files["sd1"]), "--lora", str(out),
                 "--width", "16", "--height", "16", "--steps", "1", "--seed", "1", "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "r_emb.safetensors" in err[0] and "missing" in err[0]
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------ class images

def test_class_images_are_drawn_by_the_base_model_once(files, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    args = ["--max-steps", 1, "--class-prompt", "a red circle", "--class-prompt", "a blue square",
            "--num-class-images", 3]
    code, stdout, _ = train(files, out, *args, capsys=capsys)
    assert code == 0
    folder = tmp_path / "r-class-images"
    captions = [(folder / f"class-{i:05d}.txt").read_text().strip() for i in range(3)]
    assert captions == ["a red circle", "a blue square", "a red circle"]
    _, meta = read(out)
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("6", "3")
    stamps = [(folder / f"class-{i:05d}.png").stat().st_mtime_ns for i in range(3)]
    code, stdout, _ = train(files, out, *args, "--num-class-images", 4, capsys=capsys)
    assert code == 0 and "drew 1 class images" not in stdout  # -q: nothing printed ...
    assert [(folder / f"class-{i:05d}.png").stat().st_mtime_ns for i in range(3)] == stamps
    assert (folder / "class-00003.png").is_file()  # ... only the missing one was drawn


def test_class_word_pairs_the_training_captions(files, tmp_path):
    """--class-word: class images for the training captions with the token swapped for the class
    word, so each class image differs from a training image in the word only."""
    from training.class_images import prompts_from_captions

    captions = ["a red ring on a blue background", "rings: a ring", "a red ring on a blue background",
                "no concept here"]
    assert prompts_from_captions(captions, "ring", "circle") == (
        "a red circle on a blue background", "rings: a circle")
    with pytest.raises(ValueError, match="no training caption holds the word 'zwx'"):
        prompts_from_captions(captions, "zwx", "circle")
    out = tmp_path / "r.safetensors"
    assert train(files, out, "--max-steps", 1, "--token", "ring", "--class-word", "circle",
                 "--num-class-images", 2) == 0
    folder = tmp_path / "r-class-images"
    expected = [t.read_text().strip().replace(" ring ", " circle ")
                for t in sorted(files["data"].glob("*.txt"))]
    got = [(folder / f"class-{i:05d}.txt").read_text().strip() for i in range(2)]
    assert got == list(dict.fromkeys(expected))[:2]


@pytest.mark.parametrize("extra,fragment", [
    (["--reg-data", "REG", "--class-prompt", "a circle"], "drop --reg-data or them"),
    (["--class-word", "circle"], "--class-word needs --token"),
    (["--token", "ring", "--class-word", "circle", "--class-prompt", "a circle"], "not both"),
    (["--init-word", "circle"], "--init-word needs --token"),
    (["--embedding-lr", "1e-3"], "--embedding-lr needs --token"),
    (["--text-encoder-lr", "1e-3"], "--text-encoder-lr needs --train-text-encoder"),
    (["--keep-tokens", "1"], "--keep-tokens needs --shuffle-caption"),
    (["--lr-num-cycles", "0"], "--lr-num-cycles: must be at least 1"),
])
def test_bad_recipe_options_give_one_error_line(files, tmp_path, capsys, extra, fragment):
    from cli.main import main

    reg = tmp_path / "reg"
    reg.mkdir()
    argv = ["train-lora", "--data", str(files["data"]), "--checkpoint", str(files["sd1"]),
            "--output", str(tmp_path / "r.safetensors"), *[str(reg) if a == "REG" else a for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "r.safetensors").exists()
