"""SDXL's conditioner (Podell et al. 2023, §2.1-2.2), named as generative-models' GeneralConditioner
so that the single-file keys ``conditioner.embedders.N.*`` load as they are.

The text towers give token states, concatenated along the width into the cross-attention context
(CLIP ViT-L 768 + OpenCLIP bigG 1280 = 2048 for the base model); the pooled bigG projection and the
Fourier features of the size, crop and aesthetic-score numbers are concatenated into the UNet's
vector input ``y``, in embedder order.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..config import ConditionerConfig, EmbedderConfig, TextEncoderConfig
from .clip_text import CLIPTextTransformer
from .openclip_text import OpenCLIPTextTower
from .tokenizer import EOT
from .unet import timestep_embedding


class _TextModelHolder(nn.Module):
    """Gives the CLIP model the ``transformer.text_model.*`` key prefix."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


class CLIPEmbedder(nn.Module):
    """sgm's FrozenCLIPEmbedder: CLIP ViT-L's ``hidden_states[layer_idx]`` (no final norm)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.transformer = _TextModelHolder(CLIPTextTransformer(cfg, eos_token_id=EOT))

    def forward(self, tokens: torch.Tensor, clip_skip: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tm = self.transformer.text_model
        layers = tm.encoder.layers
        skip = self.config.skip_layers() + clip_skip
        if not 0 <= skip <= len(layers):
            raise ValueError(f"cannot skip {skip} of the text encoder's {len(layers)} blocks")
        x = tm.embeddings(tokens)
        for layer in layers[: len(layers) - skip]:
            x = layer(x)
        if self.config.normed:
            x = tm.final_layer_norm(x)
        return x, None


class OpenCLIPEmbedder(nn.Module):
    """sgm's FrozenOpenCLIPEmbedder2: bigG's penultimate states and its pooled projection."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.model = OpenCLIPTextTower(cfg)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = self.model.hidden_and_pooled(
            tokens, self.config.skip_layers() + clip_skip, self.config.normed)
        return hidden, pooled if self.config.pooled else None


class ConcatTimestepEmbedderND(nn.Module):
    """Each number of a (batch, n) input as an ``outdim``-wide [cos | sin] embedding, concatenated
    to (batch, n·outdim). No weights."""

    def __init__(self, cfg: EmbedderConfig):
        super().__init__()
        self.outdim = cfg.outdim

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        values = values.reshape(values.shape[0], -1)
        emb = timestep_embedding(values.flatten(), self.outdim)
        return emb.reshape(values.shape[0], -1)


def _build(cfg: EmbedderConfig) -> nn.Module:
    if cfg.text is None:
        return ConcatTimestepEmbedderND(cfg)
    return CLIPEmbedder(cfg.text) if cfg.text.kind == "clip" else OpenCLIPEmbedder(cfg.text)


class GeneralConditioner(nn.Module):
    def __init__(self, cfg: ConditionerConfig):
        super().__init__()
        self.config = cfg
        self.embedders = nn.ModuleList(_build(e) for e in cfg.embedders)

    @property
    def text_embedders(self) -> list[nn.Module]:
        return [m for m, e in zip(self.embedders, self.config.embedders) if e.text is not None]

    def forward(self, tokens: Sequence[torch.Tensor], clip_skip: int = 0
                ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Token ids, one tensor per text tower in order → (each tower's token states, pooled).
        ``clip_skip`` > 0 takes that many blocks earlier in every tower, as diffusers' SDXL
        ``clip_skip``. (A forward, so that offload hooks see the towers run.)"""
        towers = self.text_embedders
        if len(tokens) != len(towers):
            raise ValueError(f"{len(tokens)} token tensors for {len(towers)} text encoders")
        states, pooled = [], None
        for tower, ids in zip(towers, tokens):
            device = next(tower.parameters()).device
            hidden, p = tower(ids.to(device), clip_skip)
            states.append(hidden)
            pooled = p if p is not None else pooled
        return states, pooled

    def encode_text(self, tokens: Sequence[torch.Tensor], clip_skip: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context: the towers' token states side by side, pooled)."""
        states, pooled = self(tokens, clip_skip)
        dtype = states[-1].dtype
        return torch.cat([s.to(dtype) for s in states], dim=-1), pooled

    def vector(self, pooled: torch.Tensor | None, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The UNet's ``y``: pooled text then each number embedder's features, in embedder order.
        ``values``: (batch, n) tensors by sgm input key (``original_size_as_tuple`` …)."""
        parts = []
        for module, e in zip(self.embedders, self.config.embedders):
            if e.text is not None:
                if e.text.pooled:
                    if pooled is None:
                        raise ValueError("the pooled text embedding is missing")
                    parts.append(pooled)
                continue
            if e.input_key not in values:
                raise ValueError(f"the SDXL conditioning needs {e.input_key!r}")
            ref = parts[0] if parts else None
            v = torch.as_tensor(values[e.input_key], device=None if ref is None else ref.device)
            parts.append(module(v).to(ref.dtype if ref is not None else torch.float32))
        return torch.cat(parts, dim=-1)
