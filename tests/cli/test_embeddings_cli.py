"""``--embeddings-dir``: textual-inversion words on the command line (the shipped default model,
text width 128)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldm.embeddings import save_embedding
from pipelines.images import read_parameters
from tests.cli.common import assert_one_error, files_under, run

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emb").mkdir()
    save_embedding(tmp_path / "emb" / "xqshape.pt", "xqshape",
                   torch.randn(2, 128, generator=torch.Generator().manual_seed(0)))
    save_file({"emb_params": torch.zeros(2, 768)}, tmp_path / "emb" / "xqwide.safetensors")
    return tmp_path


def test_embedding_word_is_used_and_recorded(folder, capsys):
    base = ["txt2img", "--seed", "2", "--steps", "3", "-q", "--embeddings-dir", "emb"]
    code, out, err = run(base + ["a red xqshape", "-o", "a.png"], capsys)
    assert code == 0, err
    assert 'TI hashes: "xqshape: ' in read_parameters(folder / "a.png")


def test_wrong_width_and_missing_folder_are_one_line_errors(folder, capsys):
    before = files_under(folder)
    code, out, err = run(["txt2img", "a xqwide circle", "--seed", "1", "--embeddings-dir", "emb",
                          "-o", "b.png"], capsys)
    assert code == 1
    assert_one_error(err, "embedding 'xqwide'")
    code, out, err = run(["txt2img", "a circle", "--embeddings-dir", "nowhere", "-o", "b.png"], capsys)
    assert code == 1
    assert_one_error(err, "--embeddings-dir nowhere: no such folder")
    assert files_under(folder) == before


def _sdxl_file(path, widths=(768, 1280)):
    g = torch.Generator().manual_seed(1)
    save_file({"clip_l": torch.randn(2, widths[0], generator=g),
               "clip_g": torch.randn(2, widths[1], generator=g)}, path)


@pytest.fixture
def sdxl_checkpoint(folder):
    from ldm.checkpoint import save_checkpoint
    from reference.sdxl import random_sdxl_model

    save_checkpoint(random_sdxl_model("sdxl"), folder / "xl.safetensors")
    return folder / "xl.safetensors"


def test_an_sdxl_file_on_a_one_tower_model_is_one_line(folder, capsys):
    _sdxl_file(folder / "emb" / "xqxl.safetensors")
    before = files_under(folder)
    code, out, err = run(["txt2img", "a xqxl circle", "--seed", "1", "--steps", "1",
                          "--embeddings-dir", "emb", "-o", "c.png"], capsys)
    assert code == 1
    line = assert_one_error(err, "embedding 'xqxl'")
    assert "xqxl.safetensors" in line and "clip_l 768 and clip_g 1280" in line and "128 wide" in line
    assert files_under(folder) == before


def test_sdxl_files_on_an_sdxl_model(folder, sdxl_checkpoint, capsys):
    """The tiny SDXL model's towers are 32 wide each: an SDXL file of those widths is a word (and
    recorded), a one-tower file is one error line."""
    _sdxl_file(folder / "emb" / "xqxs.safetensors", (32, 32))
    save_file({"emb_params": torch.zeros(2, 32)}, folder / "emb" / "xqone.safetensors")
    base = ["--checkpoint", sdxl_checkpoint, "--seed", "2", "--steps", "2", "--width", "32",
            "--height", "32", "-q", "--embeddings-dir", "emb"]
    code, out, err = run(["txt2img", "a red xqxs", "-o", "a.png", *base], capsys)
    assert code == 0, err
    assert 'TI hashes: "xqxs: ' in read_parameters(folder / "a.png")
    before = files_under(folder)
    code, out, err = run(["txt2img", "a red circle", "--negative-prompt", "xqone", "-o", "b.png",
                          *base], capsys)
    assert code == 1
    line = assert_one_error(err, "embedding 'xqone'")
    assert "xqone.safetensors" in line and "one set of vectors, 32 wide" in line
    assert "clip_l 32 and clip_g 32" in line and files_under(folder) == before
