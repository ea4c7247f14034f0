"""A separate autoencoder (A1111's "SD VAE"): the layouts people have, and what is refused."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm.weights_io import CheckpointError
from pipelines.images import format_parameters
from pipelines.pipeline import Pipeline
from reference import pipelines as dp
from reference.models import diffusers_vae, randomize_
from reference.tiny import tiny_tree

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def source():
    """A tiny SD1 model whose autoencoder the files hold, and a second one to load them into."""
    donor = randomize_(dp.random_model("sd1"), seed=21)
    return donor, {k: v.contiguous() for k, v in donor.first_stage_model.state_dict().items()}


def _target():
    return Pipeline(dp.random_model("sd1"), device="cpu")


def _same(pipe, vae_state):
    got = pipe.model.first_stage_model.state_dict()
    return all(torch.equal(got[k], v) for k, v in vae_state.items())


def test_compvis_file_checkpoint_and_pickle(source, tmp_path):
    donor, vae = source
    save_file(vae, tmp_path / "vae.safetensors")
    whole = {f"first_stage_model.{k}": v for k, v in vae.items()}
    whole["model.diffusion_model.out.0.weight"] = torch.zeros(3)  # the rest of a checkpoint
    save_file(whole, tmp_path / "whole.safetensors")
    torch.save({"state_dict": dict(vae, **{"loss.logvar": torch.zeros(())}), "global_step": 840000},
               tmp_path / "vae-ft.ckpt")
    for name in ("vae.safetensors", "whole.safetensors", "vae-ft.ckpt"):
        pipe = _target()
        assert not _same(pipe, vae)
        pipe.load_vae(tmp_path / name)
        assert _same(pipe, vae), name


def test_diffusers_folder_and_single_file(source, tmp_path):
    donor, vae = source
    sd = {k: v.float() for k, v in donor.state_dict().items()}
    diffusers_vae(tiny_tree("sd1"), sd).save_pretrained(tmp_path / "vae")
    for path in (tmp_path / "vae", tmp_path / "vae" / "diffusion_pytorch_model.safetensors"):
        pipe = _target()
        pipe.load_vae(path)
        assert _same(pipe, vae), path


def test_images_decode_with_the_new_autoencoder_and_say_so(source, tmp_path):
    donor, vae = source
    save_file(vae, tmp_path / "mine.safetensors")
    pipe = _target()
    kw = dict(seed=2, num_inference_steps=2, height=32, width=32, progress=False)
    before = pipe.txt2img("a red circle", **kw)
    pipe.load_vae(tmp_path / "mine.safetensors")
    after = pipe.txt2img("a red circle", return_latents=True, **kw)
    assert not (before.images[0].tobytes() == after.images[0].tobytes())
    with torch.no_grad():  # the latents are the same; the decode is the donor's autoencoder
        expected = donor.decode_first_stage(after.latents)
    got = torch.from_numpy(np.asarray(after.images[0])).permute(2, 0, 1).float()
    ref = ((expected[0].clamp(-1, 1) + 1) * 127.5)
    assert (got - ref).abs().mean() < 1.0
    text = format_parameters(after.parameters[0])
    assert "VAE hash: " in text and "VAE: mine.safetensors" in text


def test_an_autoencoder_of_another_shape_is_refused(tmp_path):
    tree = copy.deepcopy(tiny_tree("sd1"))
    tree["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch"] = 64
    from ldm.config import parse_config
    from ldm.model import LatentDiffusion

    other = LatentDiffusion(parse_config(tree)).first_stage_model.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, tmp_path / "big.safetensors")
    with pytest.raises(CheckpointError, match="made for another model: decoder.conv_in.bias is \\[128\\] here but \\[64\\]"):
        _target().load_vae(tmp_path / "big.safetensors")
    save_file({"something.else": torch.zeros(2)}, tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="keys missing"):
        _target().load_vae(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        _target().load_vae(tmp_path / "none.safetensors")


def test_sdxl_decodes_in_float32_unless_the_vae_is_made_for_float16(tmp_path):
    """diffusers' force_upcast: SDXL's stock VAE overflows in fp16, the fp16-fix VAE does not."""
    import json

    from reference.sdxl import random_sdxl_model

    pipe = Pipeline(random_sdxl_model("sdxl"), device="cpu", dtype="fp16")
    assert next(pipe.model.first_stage_model.parameters()).dtype == torch.float32
    assert next(pipe.model.unet.parameters()).dtype == torch.float16
    vae = {k: v.float().contiguous() for k, v in pipe.model.first_stage_model.state_dict().items()}
    (tmp_path / "fix").mkdir()
    save_file(vae, tmp_path / "fix" / "vae.safetensors")
    (tmp_path / "fix" / "config.json").write_text(json.dumps({"force_upcast": False}))
    pipe.load_vae(tmp_path / "fix" / "vae.safetensors")
    assert next(pipe.model.first_stage_model.parameters()).dtype == torch.float16
    sd1 = Pipeline(dp.random_model("sd1"), device="cpu", dtype="fp16")
    assert next(sd1.model.first_stage_model.parameters()).dtype == torch.float16
