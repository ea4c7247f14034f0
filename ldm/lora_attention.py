"""LoRA on OpenCLIP's fused attention (SDXL's bigG tower).

``nn.MultiheadAttention`` keeps q, k and v as one ``in_proj_weight`` and reads its own weights
directly, so there is no linear layer for an adapter to wrap. While a LoRA adapts such an attention
it is replaced by :class:`SplitAttention`: the same parameters, with the input projection held by an
``nn.Linear`` (``in_proj``) and the output projection called as a module, which peft can wrap.
Without an active, unmerged adapter it runs the original module (bit-identical outputs); removing
the last adapter puts the original back (:func:`restore_attention`).

Files name q, k and v separately (kohya ``lora_te2_..._self_attn_q_proj``, diffusers'
``text_encoder_2...self_attn.q_proj``, as transformers' CLIPTextModelWithProjection has them);
:mod:`ldm.lora_formats` fuses them into one adapter on ``in_proj`` and splits it again on writing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitAttention(nn.Module):
    """Self-attention of an ``nn.MultiheadAttention`` (batch first, no dropout) through two
    wrappable linear layers; holds the original module's parameters, not copies."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not (mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None):
            raise ValueError("only batch-first self-attention with fused q/k/v can take a LoRA")
        self.in_proj = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None,
                                 device="meta")
        self.in_proj.weight = mha.in_proj_weight
        self.in_proj.bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.num_heads = mha.num_heads
        self.__dict__["original"] = mha  # not a submodule: its parameters are listed once

    def _adapting(self) -> bool:
        for layer in (self.in_proj, self.out_proj):
            lora_a = getattr(layer, "lora_A", None)  # a peft LoRA layer
            if (lora_a is not None and not layer.disable_adapters and not layer.merged
                    and any(a in lora_a for a in layer.active_adapters)):
                return True
        return False

    def forward(self, query, key, value, need_weights: bool = False, attn_mask=None):
        if not self._adapting():
            return self.original(query, key, value, need_weights=need_weights, attn_mask=attn_mask)
        if not (query is key is value) or need_weights:
            raise ValueError("SplitAttention computes self-attention without weights only")
        b, n, width = query.shape
        q, k, v = (t.reshape(b, n, self.num_heads, -1).transpose(1, 2)
                   for t in self.in_proj(query).chunk(3, dim=-1))
        mask = attn_mask.to(q.dtype) if attn_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width)), None


def fused_attention_weight(model: nn.Module, path: str) -> torch.Tensor | None:
    """The weight of ``<attention>.in_proj`` when ``path`` names a fused attention's input
    projection (before or after splitting), else None."""
    parent, _, child = path.rpartition(".")
    if child != "in_proj":
        return None
    module = model.get_submodule(parent)
    if isinstance(module, (nn.MultiheadAttention, SplitAttention)):
        return module.original.in_proj_weight if isinstance(module, SplitAttention) else module.in_proj_weight
    return None


def split_attention(model: nn.Module, paths) -> None:
    """Replace every ``nn.MultiheadAttention`` that is the parent of one of ``paths`` by a
    :class:`SplitAttention`."""
    for path in paths:
        parent = path.rpartition(".")[0]
        if not parent:
            continue
        module = model.get_submodule(parent)
        if isinstance(module, nn.MultiheadAttention):
            grand, _, name = parent.rpartition(".")
            setattr(model.get_submodule(grand) if grand else model, name, SplitAttention(module))


def restore_attention(model: nn.Module) -> None:
    """Put back the original attention where neither projection holds an adapter any more."""
    for path, module in list(model.named_modules()):
        if isinstance(module, SplitAttention) and not any(
                hasattr(m, "lora_A") for m in (module.in_proj, module.out_proj)):
            grand, _, name = path.rpartition(".")
            setattr(model.get_submodule(grand) if grand else model, name, module.original)
