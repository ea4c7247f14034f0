"""OpenCLIP's text tower (SD2's text encoder, ViT-H/14's text half; SDXL's second, ViT-bigG/14's)
in plain torch.

Module names, construction order and forward operations follow ``open_clip.transformer`` (3.x):
``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` (fused ``in_proj``), open_clip's
``LayerNorm`` and ``Transformer``, so the state-dict keys, the random initialisation from a given
seed and the outputs equal the open_clip-built tower bit for bit (tests/ldm/test_text_towers.py),
without importing open_clip (and with it torchvision and timm).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig
from .clip_text import Embedding, QuickGELU


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: the result is cast back to the input's dtype (which matters under
    autocast, where layer_norm itself runs in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.to(orig_type)


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)) with an additive causal mask, then x + mlp(ln_2(x)); no layer scale."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        inner = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, inner)), ("gelu", act()),
                                              ("c_proj", nn.Linear(inner, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        mask = attn_mask.to(y.dtype) if attn_mask is not None else None
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, act)
                                        for _ in range(layers)])


class OpenCLIPTextTower(nn.Module):
    """Token embedding, learned positions, causal blocks, ``ln_final``; ``text_projection`` and
    ``logit_scale`` are kept because SD2 files carry them (the UNet reads token states only)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        act = nn.GELU if cfg.act == "gelu" else QuickGELU
        self.token_embedding = Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, act)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        mask = torch.full((cfg.max_length, cfg.max_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.positional_embedding.is_meta:
            return
        # open_clip's initialisation of the tensors it owns outside nn.Linear/LayerNorm; the blocks
        # keep torch's defaults, as the open_clip-built tower did
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
        nn.init.constant_(self.logit_scale, torch.log(torch.tensor(1 / 0.07)).item())

    def forward(self, tokens: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """Token states after all but the last ``skip`` blocks, through ``ln_final``."""
        blocks = self.transformer.resblocks
        if not 0 <= skip <= len(blocks):
            raise ValueError(f"cannot skip {skip} of the text encoder's {len(blocks)} blocks")
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        mask = self.attn_mask[:n, :n].to(x.dtype)
        for block in blocks[: len(blocks) - skip]:
            x = block(x, attn_mask=mask)
        return self.ln_final(x)

    def hidden_and_pooled(self, tokens: torch.Tensor, skip: int = 1,
                          normed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's two outputs of one pass: the token states after all but the last ``skip`` blocks
        (through ``ln_final`` only when ``normed``: sgm's non-legacy bigG skips it), and the
        pooled projection of the final, normed state at each end token (``encode_text``)."""
        blocks = self.transformer.resblocks
        if not 0 <= skip <= len(blocks):
            raise ValueError(f"cannot skip {skip} of the text encoder's {len(blocks)} blocks")
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        mask = self.attn_mask[:n, :n].to(x.dtype)
        hidden = x
        for i, block in enumerate(blocks):
            x = block(x, attn_mask=mask)
            if i == len(blocks) - skip - 1:
                hidden = x
        if normed:
            hidden = self.ln_final(hidden)
        last = self.ln_final(x)
        pooled = last[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return hidden, pooled @ self.text_projection

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's ``encode_text`` (unnormalised): the final state at each sequence's highest
        token id (its end token), times ``text_projection``."""
        x = self.forward(tokens)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection
