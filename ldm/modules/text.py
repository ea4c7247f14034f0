"""Text conditioning: the two text towers of Stable Diffusion (the tokenizer is :mod:`.tokenizer`).

SD1 uses OpenAI CLIP ViT-L/14's text model (:mod:`.clip_text`, transformers' ``CLIPTextModel`` in
plain torch) and conditions on its last hidden state. SD2 uses OpenCLIP ViT-H/14's text tower
(:mod:`.openclip_text`) and conditions on the penultimate block's output followed by ``ln_final``.
The towers import torch only.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import TextEncoderConfig
from .clip_text import CLIPTextTransformer
from .openclip_text import OpenCLIPTextTower

from .tokenizer import EOT, SOT


class _TextModelHolder(nn.Module):
    """Gives the CLIP model the ``transformer.text_model.*`` key prefix of SD1 checkpoints."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


class FrozenCLIPEmbedder(nn.Module):
    """SD1 text encoder: CLIP text transformer, conditioning on the last hidden state."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.transformer = _TextModelHolder(CLIPTextTransformer(cfg, eos_token_id=EOT))

    def forward(self, tokens: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """Token ids → (batch, tokens, width). ``clip_skip`` > 0 takes an earlier block's output
        and applies the final layer norm to it, as A1111 and diffusers do."""
        return self.transformer.text_model.encode(tokens, self.config.skip_layers() + clip_skip)


class FrozenOpenCLIPEmbedder(nn.Module):
    """SD2 text encoder: OpenCLIP text tower, conditioning on the penultimate block + ``ln_final``."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.model = OpenCLIPTextTower(cfg)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        return self.model(tokens, self.config.skip_layers() + clip_skip)


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    if cfg.kind == "clip":
        return FrozenCLIPEmbedder(cfg)
    if cfg.kind == "openclip":
        return FrozenOpenCLIPEmbedder(cfg)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r}")
