"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the UNet's encoder that reads a
hint image (edges, depth, pose...) and returns one residual per skip connection of the UNet plus
one for its middle block, each through a zero-initialised 1×1 convolution ("zero convolution",
§3.1), so that an untrained ControlNet leaves the UNet's output unchanged.

Attribute paths equal the keys of the original ControlNet checkpoints (without their optional
``control_model.`` prefix): ``time_embed``, ``input_blocks``, ``zero_convs``, ``input_hint_block``,
``middle_block``, ``middle_block_out``. The encoder is built by the UNet's own builder, so its keys
and shapes are those of ``model.diffusion_model``. An SDXL ControlNet also has its own copy of the
UNet's ``label_emb`` (registered after ``time_embed``, as ComfyUI's ``cldm`` and sgm's UNet order
it), which reads the same vector ``y`` as the UNet: diffusers' ``add_embedding`` of a
``ControlNetModel`` with ``addition_embed_type="text_time"``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..controlnet_config import ControlNetConfig
from .unet import UNetModel, build_encoder, check_vector, embed_time, label_embedding

STATE_PREFIX = "control_model."
# channels of the hint encoder's convolutions; a stride-2 convolution ends each group but the last,
# taking the hint from pixel to latent resolution (8×)
HINT_CHANNELS = (16, 32, 96, 256)


def hint_encoder(in_channels: int, out_channels: int) -> nn.Sequential:
    """The hint image's encoder: 3×3 convolutions with SiLU between them (``input_hint_block``;
    the last convolution is zero-initialised by :meth:`ControlNet.reset_parameters`)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, HINT_CHANNELS[0], 3, padding=1), nn.SiLU()]
    for ch, next_ch in zip(HINT_CHANNELS, HINT_CHANNELS[1:]):
        layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(),
                   nn.Conv2d(ch, next_ch, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(HINT_CHANNELS[-1], out_channels, 3, padding=1))
    return nn.Sequential(*layers)


def zero_conv(channels: int) -> nn.Sequential:
    """A 1×1 convolution in a one-slot Sequential (the checkpoints' ``zero_convs.{i}.0``)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 1))


class ControlNet(nn.Module):
    """Control residuals c(x_t, hint, t, context) for :meth:`UNetModel.forward`'s ``control``."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        time_embed, input_blocks, middle_block, skip_channels = build_encoder(cfg)
        # registered in the original's order, so state_dict() lists keys as its checkpoints do
        self.time_embed = time_embed
        if cfg.adm_in_channels:  # SDXL: the vector conditioning y, as the UNet's label_emb
            self.label_emb = label_embedding(cfg)
        self.input_blocks = input_blocks
        self.zero_convs = nn.ModuleList(zero_conv(ch) for ch in skip_channels)
        self.input_hint_block = hint_encoder(cfg.hint_channels, cfg.model_channels)
        self.middle_block = middle_block
        self.middle_block_out = zero_conv(skip_channels[-1])
        self.reset_parameters()
        if cfg.use_checkpoint:
            self.set_gradient_checkpointing(True)

    def zero_layers(self) -> list[nn.Conv2d]:
        """The zero convolutions: every output projection and the hint encoder's last layer."""
        return ([seq[0] for seq in self.zero_convs] + [self.middle_block_out[0]]
                + [self.input_hint_block[-1]])

    def reset_parameters(self) -> None:
        """Zero the zero convolutions (the other layers keep PyTorch's initialisation, or the
        UNet's weights after :meth:`copy_encoder_from`)."""
        with torch.no_grad():
            for conv in self.zero_layers():
                conv.weight.zero_()
                conv.bias.zero_()

    def copy_encoder_from(self, unet: UNetModel) -> None:
        """Start from the base UNet's encoder (the paper's "trainable copy"): ``time_embed``,
        ``input_blocks`` and ``middle_block`` (and SDXL's ``label_emb``) take the UNet's weights."""
        for name in ("time_embed", "label_emb", "input_blocks", "middle_block"):
            if not hasattr(self, name):
                continue
            getattr(self, name).load_state_dict(getattr(unet, name).state_dict())

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (trades compute for memory in training)."""
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One residual per input block (after its zero convolution) and one for the middle block.

        ``x``: latents (B, in_channels, h, w); ``hint``: images (B or 1, hint_channels, 8h, 8w),
        in [0, 1] as the original ControlNets were trained; ``timesteps``: one, or one per sample;
        ``context``: the text conditioning, one row per sample of ``x``; ``y``: an SDXL
        ControlNet's vector conditioning (pooled text and size features), one row per sample, the
        same the UNet gets (diffusers adds ``add_embedding`` of it to the time embedding).
        """
        emb = embed_time(self.time_embed, self.config.model_channels, timesteps, x)
        if self.config.adm_in_channels:
            emb = emb + self.label_emb(check_vector(
                y, x, self.config.adm_in_channels, "this SDXL ControlNet").to(emb.dtype))
        context = context.to(x.dtype)
        guided_hint = self.input_hint_block(hint.to(x.dtype))
        residuals = []
        h = x
        for i, (block, out) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                if guided_hint.shape[-2:] != h.shape[-2:]:
                    raise ValueError(
                        f"hint of size {tuple(hint.shape[-2:])} encodes to "
                        f"{tuple(guided_hint.shape[-2:])}, not the latents' {tuple(h.shape[-2:])}: "
                        f"the hint must be 8 times the latent size")
                h = h + guided_hint
            residuals.append(out(h))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h))
        return residuals


def strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ControlNet file's tensors under this module's names: without ``control_model.``, which
    files saved from the training model (``cldm.cldm.ControlLDM``) put before every key."""
    if any(k.startswith(STATE_PREFIX) for k in state_dict):
        return {k.removeprefix(STATE_PREFIX): v for k, v in state_dict.items()
                if k.startswith(STATE_PREFIX)}
    return dict(state_dict)
