"""Faster q/k/v for the UNet's attention layers, installed in ``CrossAttention.projections``.

``fused_qkv``: a layer's q, k and v weights live in one flat buffer (the parameters become views
into it, so state-dict keys, values and memory use stay as they are); self-attention projects with
one matmul, cross-attention computes the text keys and values with one (k|v) matmul.
``text_kv_cache``: during a sampling run the text keys and values are computed at the first step
and reused (the text conditioning does not change between steps).

Both step aside by themselves where they would change the result: a LoRA (peft) wrapping a
projection, weights replaced since fusing (``.to()``, ``load_state_dict(assign=True)``), gradients
that must reach the separate parameters, or a context other than the cached one.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.attention import CrossAttention


def _plain(*layers: nn.Module) -> bool:
    # exactly nn.Linear: a peft LoRA layer wrapping one (which LoRA files target) must be called
    return all(type(layer) is nn.Linear for layer in layers)


class FastProjections:
    """One layer's fused weights and text key/value cache; called as the layer's ``projections``."""

    def __init__(self):
        self.fused: torch.Tensor | None = None  # flat [q | k | v] weights, see fuse()
        self.cache: list | None = None  # [context, k, v] while a sampling run keeps them

    @torch.no_grad()
    def fuse(self, layer: CrossAttention) -> bool:
        """Store the layer's q, k and v weights in one flat buffer. Refused (False) when a LoRA
        layer wraps one of the projections."""
        if not _plain(layer.to_q, layer.to_k, layer.to_v):
            return False
        if self.fused_weight(layer, True) is not None or self.fused_weight(layer, False) is not None:
            return True
        weights = [layer.to_q.weight, layer.to_k.weight, layer.to_v.weight]
        flat = torch.cat([w.detach().reshape(-1) for w in weights])
        start = 0
        for w in weights:
            w.data = flat[start:start + w.numel()].view_as(w)
            start += w.numel()
        self.fused = flat
        return True

    @torch.no_grad()
    def unfuse(self, layer: CrossAttention) -> None:
        """Give each projection its own storage again."""
        if self.fused is not None:
            for proj in (layer.to_q, layer.to_k, layer.to_v):
                base = getattr(proj, "base_layer", proj)  # also under a LoRA wrapper
                if base.weight.untyped_storage().data_ptr() == self.fused.untyped_storage().data_ptr():
                    base.weight.data = base.weight.detach().clone()
            self.fused = None

    def fused_weight(self, layer: CrossAttention, self_attention: bool) -> torch.Tensor | None:
        """The fused (3·inner, dim) qkv weight, or the (2·inner, context_dim) kv weight, when the
        projections are still plain layers whose weights are views into ``fused``; None when
        anything has replaced them since (a LoRA wrapper, ``.to()``, ``load_state_dict(assign=True)``),
        and whenever gradients would have to reach the separate parameters."""
        flat = self.fused
        if flat is None or not _plain(layer.to_q, layer.to_k, layer.to_v):
            return None
        q, k, v = layer.to_q.weight, layer.to_k.weight, layer.to_v.weight
        if (torch.is_grad_enabled() and q.requires_grad) or q.device != flat.device or q.dtype != flat.dtype:
            return None
        if not torch.compiler.is_compiling():  # (data pointers cannot be traced; checked when eager)
            base, size = flat.data_ptr(), flat.element_size()
            if (q.data_ptr() != base or k.data_ptr() != base + q.numel() * size
                    or v.data_ptr() != base + (q.numel() + k.numel()) * size):
                return None
        if self_attention:
            if q.shape[1] != k.shape[1]:
                return None
            return flat.view(-1, q.shape[1])
        return flat[q.numel():].view(-1, k.shape[1])

    def _keys_values(self, layer: CrossAttention, context: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        if cache and cache[0] is context:
            return cache[1], cache[2]
        kv = self.fused_weight(layer, False)
        if kv is not None:
            k, v = F.linear(context, kv).chunk(2, dim=-1)
        else:
            k, v = layer.to_k(context), layer.to_v(context)
        if cache is not None and not torch.compiler.is_compiling():
            cache[:] = [context, k, v]
        return k, v

    def __call__(self, layer: CrossAttention, x: torch.Tensor, context: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.fused_weight(layer, True) if context is None else None
        if qkv is not None:
            q, k, v = F.linear(x, qkv).chunk(3, dim=-1)
            return q, k, v
        if context is None:
            return layer.to_q(x), layer.to_k(x), layer.to_v(x)
        q = layer.to_q(x)
        k, v = self._keys_values(layer, context)
        return q, k, v


def attention_layers(module: nn.Module) -> list[CrossAttention]:
    return [m for m in module.modules() if isinstance(m, CrossAttention)]


def fuse_qkv(module: nn.Module, enabled: bool = True) -> int:
    """Fuse (or unfuse) the q/k/v projections of every attention layer in ``module``; returns how
    many layers are fused. Layers whose projections a LoRA wraps are skipped with a warning (LoRA
    targets ``to_q``/``to_k``/``to_v``; fusing would bypass it)."""
    layers = attention_layers(module)
    if not enabled:
        for layer in layers:
            if layer.projections is not None:
                layer.projections.unfuse(layer)
        return 0
    fused = 0
    for layer in layers:
        if layer.projections is None:
            layer.projections = FastProjections()
        fused += layer.projections.fuse(layer)
    if fused < len(layers):
        warnings.warn(f"fused_qkv: {len(layers) - fused} attention layers hold LoRA layers and stay "
                      "unfused", stacklevel=2)
    return fused


def set_projections(module: nn.Module, fused: bool, text_cache: bool) -> None:
    """Install (or, with both off, remove) the fast projections of every attention layer."""
    fuse_qkv(module, fused)
    for layer in attention_layers(module):
        if not (fused or text_cache):
            layer.projections = None
        elif layer.projections is None:
            layer.projections = FastProjections()


@contextlib.contextmanager
def text_kv_caches(module: nn.Module):
    """Keep each attention layer's text keys/values for the length of the ``with`` block."""
    layers = [m.projections for m in attention_layers(module) if m.projections is not None]
    for projections in layers:
        projections.cache = []
    try:
        yield
    finally:
        for projections in layers:
            projections.cache = None
