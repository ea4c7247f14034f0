"""Placing a model for a pipeline: on its device with the speed options applied, or — the low-VRAM
mode, ``SpeedOptions(offload=True)`` — kept in CPU memory with only the component at work on the GPU.

The offload mode chains Accelerate's ``cpu_offload_with_hook`` over the three stages in the order a
generation uses them, text encoder → UNet → autoencoder: each component moves to the GPU when it is
called and sends the previous one back to the CPU. The text encoder's hook also sends the
autoencoder back, so the chain is a cycle and consecutive generations keep one component resident.
The autoencoder's ``encode``/``decode`` are not ``forward``; AutoencoderKL runs the hook's
pre-forward itself. Peak GPU memory is then the largest component plus its activations (the UNet:
1.7 GB in fp16 for SD1.5) instead of the whole model (2.1 GB), at the price of host↔device copies
of each component per generation.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ldm.speed import SpeedOptions, apply_speed, as_speed_options

# model → its offload hooks (text, UNet, autoencoder); this module alone writes it
_HOOKS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def _execution_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # Accelerate compares devices with ==; "cuda" != "cuda:0" would move the weights every call
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def enable_model_offload(model: nn.Module, device) -> list:
    """Keep ``model`` (a LatentDiffusion) on the CPU and bring each component to ``device`` only
    while it runs. Returns the Accelerate hooks (text, UNet, autoencoder)."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    device = _execution_device(device)
    disable_model_offload(model)
    model.to("cpu")
    _, text = cpu_offload_with_hook(model.text_encoder, device)  # SDXL: the conditioner
    # prompt encoding reads the encoder's device once and calls it several times; CpuOffload only
    # moves the inputs of the call that brings the weights in, so move every call's token ids
    add_hook_to_module(model.text_encoder, AlignDevicesHook(execution_device=device), append=True)
    _, unet = cpu_offload_with_hook(model.model, device, prev_module_hook=text)
    _, vae = cpu_offload_with_hook(model.first_stage_model, device, prev_module_hook=unet)
    text.hook.prev_module_hook = vae  # close the cycle (see the module docstring)
    _HOOKS[model] = [text, unet, vae]
    return [text, unet, vae]


def offload_hooks(model: nn.Module) -> list:
    """The hooks :func:`enable_model_offload` put on ``model`` (text, UNet, autoencoder), or []."""
    return list(_HOOKS.get(model, []))


def disable_model_offload(model: nn.Module) -> None:
    """Remove the offload hooks; the components stay where they are (call ``model.to(device)``)."""
    for hook in _HOOKS.pop(model, []):
        hook.remove()


def place_model(model: nn.Module, device: torch.device, dtype: torch.dtype, speed=None
                ) -> tuple[nn.Module, SpeedOptions]:
    """Cast ``model`` to ``dtype`` in eval mode without gradients, put it on ``device`` (or offload
    it there) and apply the speed options. Returns the model and the options in force."""
    options = as_speed_options(speed)
    if options.offload:
        if device.type != "cuda":
            raise ValueError(f"SpeedOptions.offload keeps the model in CPU memory for a CUDA device; "
                             f"the pipeline runs on {device}")
        if options.cuda_graphs:
            raise ValueError("SpeedOptions.offload and cuda_graphs exclude each other (a captured "
                             "graph needs its weights to stay where they were)")
    target = "cpu" if options.offload else device
    model = model.to(device=target, dtype=dtype).eval().requires_grad_(False)
    options = apply_speed(model, options, device)
    if options.offload:
        enable_model_offload(model, device)
    return model, options
