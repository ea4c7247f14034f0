"""``ldm txt2img --refiner``: a tiny SDXL base hands its latents to a tiny refiner, as the Python
hand-off does (tests/pipelines/test_refiner.py compares that with diffusers)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.images import read_parameters
from pipelines.pipeline import Pipeline
from reference.sdxl import random_sdxl_model
from tests.cli.common import assert_one_error, run

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from ldm.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("xl")
    save_checkpoint(random_sdxl_model("sdxl"), folder / "base.safetensors")
    save_checkpoint(random_sdxl_model("sdxl-refiner"), folder / "refiner.safetensors")
    return folder


def test_refiner_finishes_the_base_image(files, tmp_path, capsys):
    argv = ["txt2img", "a red circle", "--checkpoint", files / "base.safetensors", "--refiner",
            files / "refiner.safetensors", "--refiner-switch", "0.6", "--steps", "5", "--seed", "4",
            "--width", "32", "--height", "32", "--scheduler", "euler", "-q", "-o", tmp_path / "r.png"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    text = read_parameters(tmp_path / "r.png")
    assert "Refiner: refiner [" in text and "Refiner switch at: 0.6" in text and "Seed: 4" in text
    base = Pipeline.from_checkpoint(files / "base.safetensors", device="cpu")
    refiner = Pipeline.from_checkpoint(files / "refiner.safetensors", device="cpu")
    kw = dict(num_inference_steps=5, scheduler="euler", progress=False)
    latents = base.txt2img("a red circle", seed=4, height=32, width=32, denoising_end=0.6,
                           output_type="latent", **kw).latents
    expected = refiner.img2img("a red circle", latents, seed=4, denoising_start=0.6, **kw).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r.png").convert("RGB")), np.asarray(expected))


def test_refiner_errors(files, tmp_path, capsys):
    base = ["txt2img", "x", "--checkpoint", files / "base.safetensors", "-o", tmp_path / "e.png"]
    code, out, err = run(base + ["--refiner", tmp_path / "none.safetensors"], capsys)
    assert code == 1
    assert_one_error(err, "none.safetensors: no such file")
    code, out, err = run(base + ["--refiner", files / "refiner.safetensors", "--hr-scale", "2"], capsys)
    assert code == 2
    assert_one_error(err, "cannot be combined")
    assert not (tmp_path / "e.png").exists()


def test_the_refiner_reads_the_same_embeddings_folder(files, tmp_path, capsys):
    """An SDXL embedding in --embeddings-dir reaches both models (the refiner takes its clip_g), as
    A1111's one embeddings folder does."""
    import torch
    from safetensors.torch import save_file

    (tmp_path / "emb").mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)},
              tmp_path / "emb" / "xqxl.safetensors")
    argv = ["txt2img", "a xqxl circle", "--checkpoint", files / "base.safetensors", "--refiner",
            files / "refiner.safetensors", "--refiner-switch", "0.6", "--steps", "5", "--seed", "4",
            "--width", "32", "--height", "32", "--scheduler", "euler", "-q", "--embeddings-dir",
            tmp_path / "emb", "-o", tmp_path / "r.png"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    base = Pipeline.from_checkpoint(files / "base.safetensors", device="cpu")
    refiner = Pipeline.from_checkpoint(files / "refiner.safetensors", device="cpu")
    base.embeddings_dir = tmp_path / "emb"
    kw = dict(num_inference_steps=5, scheduler="euler", progress=False)
    latents = base.txt2img("a xqxl circle", seed=4, height=32, width=32, denoising_end=0.6,
                           output_type="latent", **kw).latents
    plain = refiner.img2img("a xqxl circle", latents, seed=4, denoising_start=0.6, **kw).images[0]
    refiner.embeddings_dir = tmp_path / "emb"
    expected = refiner.img2img("a xqxl circle", latents, seed=4, denoising_start=0.6, **kw).images[0]
    image = np.asarray(Image.open(tmp_path / "r.png").convert("RGB"))
    assert np.array_equal(image, np.asarray(expected))
    assert not np.array_equal(image, np.asarray(plain))  # the refiner's bigG took the vectors
