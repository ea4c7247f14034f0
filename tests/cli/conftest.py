"""A tiny checkpoint as a user would have it, and a work folder with good and bad input files."""
from __future__ import annotations

import pytest
import yaml
from PIL import Image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD1 checkpoint saved as a user would have it, with its YAML next to it elsewhere."""
    import torch

    from ldm.checkpoint import save_checkpoint
    from ldm.model import LatentDiffusion
    from reference.tiny import tiny_config, tiny_tree

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_checkpoint(LatentDiffusion(tiny_config("sd1")), folder / "tiny.safetensors")
    (folder / "tiny-config.yaml").write_text(yaml.safe_dump(tiny_tree("sd1")))
    return folder


@pytest.fixture
def inputs(tmp_path):
    """A work folder with a valid image and mask and some bad files; cwd is the folder."""
    Image.new("RGB", (24, 16), "red").save(tmp_path / "in.png")
    Image.new("L", (24, 16), 255).save(tmp_path / "mask.png")
    (tmp_path / "notes.txt").write_text("not an image at all\n")
    (tmp_path / "fake.png").write_text("a text file named .png\n")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n   \n")
    (tmp_path / "garbage.safetensors").write_text("hello, I am not a checkpoint\n")
    (tmp_path / "bad.yaml").write_text("model:\n  params:\n    unet_config: [1, 2\n")
    (tmp_path / "wrong.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
                                         "  params:\n    unet_config: {}\n")
    (tmp_path / "outdir.png").mkdir()
    return tmp_path
