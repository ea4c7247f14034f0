"""Stage 4: put the three trained parts into one ``LatentDiffusion`` and ship it.

Writes ``weights/tiny-shapes.safetensors`` (single file, fp16, CompVis keys), the CLIP image tower
``weights/tiny-shapes-clip-image.safetensors`` for CLIP scores (with the text tower's blocks that the
model's shallower text encoder leaves out), and the measured ``scale_factor``
into ``configs/tiny-shapes.yaml``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import save_checkpoint
from ldm.config import load_config
from ldm.model import LatentDiffusion

from . import clip as clip_stage
from . import unet as unet_stage
from . import vae as vae_stage
from .common import RecipeError, Settings, load_weights, read_json, require, save_weights, write_json

STAGE = "assemble"
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
MAX_BYTES = 40 * 2 ** 20
_SCALE_RE = re.compile(r"^(\s*scale_factor:[ \t]*)([^\s#]+)", re.MULTILINE)


@dataclass
class AssembleOptions:
    weights_dir: Path = WEIGHTS_DIR
    write_config: Path | None = None  # default: the config the stages read (settings.config)


def set_scale_factor(config_path: Path, scale_factor: float) -> None:
    """Rewrite the ``scale_factor:`` line of a CompVis YAML in place, keeping its comments."""
    text = config_path.read_text()
    new, count = _SCALE_RE.subn(lambda m: f"{m.group(1)}{scale_factor:.6g}", text, count=1)
    if count != 1:
        raise RecipeError(f"{config_path}: no 'scale_factor:' line under model.params")
    config_path.write_text(new)


def assemble_model(settings: Settings, scale_factor: float) -> LatentDiffusion:
    cfg = load_config(settings.config).replace(scale_factor=scale_factor)
    model = LatentDiffusion(cfg)
    vae, _ = vae_stage.load_trained(settings)
    model.first_stage_model.load_state_dict(vae.state_dict())
    model.cond_stage_model.load_state_dict(clip_stage.load_text_encoder(settings).state_dict())
    model.model.diffusion_model.load_state_dict(unet_stage.load_trained(settings).state_dict())
    return model.eval()


def run(settings: Settings, opts: AssembleOptions | None = None) -> dict:
    opts = opts or AssembleOptions()
    vae_stats = read_json(settings.out / vae_stage.STAGE / "stats.json", vae_stage.STAGE)
    scale_factor = float(vae_stats["scale_factor"])
    model = assemble_model(settings, scale_factor)
    opts.weights_dir.mkdir(parents=True, exist_ok=True)
    path = opts.weights_dir / "tiny-shapes.safetensors"
    save_checkpoint(model, path, half=True, metadata={"model": "tiny-shapes",
                                                      "scale_factor": f"{scale_factor:.6g}"})
    state = model.state_dict()
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise RecipeError(f"{path}: {size / 2 ** 20:.1f} MiB, over the {MAX_BYTES / 2 ** 20:.0f} MiB budget")
    image_tower = load_weights(require(settings.out / clip_stage.STAGE / "clip-image.safetensors",
                                       clip_stage.STAGE))
    tower = load_weights(settings.out / clip_stage.STAGE / "text_encoder.safetensors")
    image_tower.update(clip_stage.tail_blocks(tower, model.cond_stage_model.config.layers))
    save_weights({k: v.to(torch.float16) for k, v in image_tower.items()},
                 opts.weights_dir / "tiny-shapes-clip-image.safetensors")
    set_scale_factor(opts.write_config or settings.config, scale_factor)
    stats = {"weights": str(path), "bytes": size, "tensors": len(state),
             "parameters": sum(v.numel() for v in state.values()), "scale_factor": scale_factor}
    write_json(settings.out / STAGE / "stats.json", stats)
    print(f"{STAGE}: wrote {path} ({size / 2 ** 20:.1f} MiB, {stats['parameters'] / 1e6:.2f} M "
          f"parameters), scale_factor {scale_factor:.5f}")
    return stats
