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
