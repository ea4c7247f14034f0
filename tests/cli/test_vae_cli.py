"""``--vae``: a separate autoencoder on the command line (the shipped default model)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.images import read_parameters
from tests.cli.common import assert_one_error, run

pytestmark = pytest.mark.usefixtures("single_thread")


def test_vae_file_is_used_and_recorded(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from pipelines.pipeline import Pipeline

    monkeypatch.chdir(tmp_path)
    vae = Pipeline.from_checkpoint().model.first_stage_model.state_dict()
    save_file({k: v.contiguous() for k, v in vae.items()}, tmp_path / "own.safetensors")
    common = ["txt2img", "a red circle", "--seed", "3", "--steps", "3", "-q"]
    assert run(common + ["-o", "plain.png"], capsys)[0] == 0
    code, out, err = run(common + ["--vae", "own.safetensors", "-o", "v.png"], capsys)
    assert code == 0, err
    assert "VAE: own.safetensors" in read_parameters(tmp_path / "v.png")
    # the model's own autoencoder, loaded from a file: the same pixels
    assert np.array_equal(np.asarray(Image.open("v.png").convert("RGB")),
                          np.asarray(Image.open("plain.png").convert("RGB")))
    code, out, err = run(common + ["--vae", "missing.safetensors", "-o", "m.png"], capsys)
    assert code == 1
    assert_one_error(err, "VAE missing.safetensors: no such file")
    assert not (tmp_path / "m.png").exists()
