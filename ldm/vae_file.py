"""Autoencoders as files of their own (A1111's "SD VAE"): a model's ``first_stage_model`` replaced
by the weights of another VAE file.

Read as people have them: CompVis-layout files (``encoder.*``, ``decoder.*``, ``quant_conv``,
``post_quant_conv``; e.g. ``vae-ft-mse-840000-ema-pruned.safetensors`` or its ``.ckpt``, read with
``weights_only``), a whole checkpoint's ``first_stage_model.*``, diffusers ``AutoencoderKL`` single
files and ``vae/`` folders (renamed through the same table as diffusers pipeline folders). Extra
training leftovers (``loss.*``, ``model_ema.*``) are ignored; a missing key or a tensor of another
shape is refused, naming it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .weights_io import file_error, read_state_dict

PREFIX = "first_stage_model."
COMPVIS_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
DIFFUSERS_MARKERS = ("decoder.up_blocks.", "encoder.down_blocks.", "decoder.mid_block.")


def _diffusers(vae: torch.nn.Module, tensors: dict, file: Path) -> dict[str, torch.Tensor]:
    from .diffusers_folder import DiffusersFolderError, _component_state_dict
    from .diffusers_names import vae_module_map
    from .weights_io import CheckpointError

    try:
        return _component_state_dict("vae", vae, vae_module_map(vae), tensors, file)
    except DiffusersFolderError as exc:
        raise CheckpointError(str(exc).replace("does not match its config.json",
                                               "does not fit this model's autoencoder")) from None


def read_vae(path, vae: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict in ``vae``'s names, the layout found) for a VAE file or diffusers folder."""
    path = Path(path)
    if path.is_dir():
        from .diffusers_folder import read_weights, weight_file

        file = weight_file(path, "vae", torch.float32)
        return _diffusers(vae, read_weights(file), file), "diffusers folder"
    if not path.is_file():
        raise file_error(path, "no such file")
    tensors = read_state_dict(path)
    if any(k.startswith(PREFIX) for k in tensors):
        tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items() if k.startswith(PREFIX)}
        layout = "a checkpoint's first_stage_model"
    else:
        layout = "CompVis autoencoder"
    if any(k.startswith(DIFFUSERS_MARKERS) for k in tensors):
        return _diffusers(vae, tensors, path), "diffusers AutoencoderKL"
    state = {k: v for k, v in tensors.items() if k.startswith(COMPVIS_ROOTS)}
    expected = vae.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise file_error(path, f"not an autoencoder for this model: {len(missing)} keys missing "
                         f"(first: {', '.join(missing[:3])})")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise file_error(path, f"not an autoencoder for this model: unexpected keys "
                         f"({', '.join(unexpected[:3])})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise file_error(path, f"made for another model: {key} is {list(tensor.shape)} here but "
                             f"{list(expected[key].shape)} in the model's autoencoder")
    return state, layout


def load_vae_into(model, path) -> str:
    """Replace ``model``'s autoencoder weights by those of ``path`` (kept in the autoencoder's
    current dtype and device); returns the layout found."""
    vae = model.first_stage_model
    state, layout = read_vae(path, vae)
    param = next(vae.parameters())
    with torch.no_grad():
        for key, target in vae.state_dict().items():
            target.copy_(state[key].to(device=param.device, dtype=target.dtype))
    return layout


def fp16_safe(path) -> bool:
    """Whether a VAE says it decodes in float16 without overflowing: a diffusers folder (or a
    file beside its ``config.json``) with ``force_upcast: false``, as the fp16-fix VAEs have."""
    import json

    path = Path(path)
    config = path / "config.json" if path.is_dir() else path.with_name("config.json")
    try:
        return json.loads(config.read_text()).get("force_upcast") is False
    except (OSError, ValueError, AttributeError):
        return False
