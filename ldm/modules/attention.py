"""Cross-attention and the SpatialTransformer of the Stable Diffusion UNet (CompVis key layout).

Attention runs through one of three interchangeable backends, chosen per model at run time
(``set_attention_backend``): PyTorch SDPA (flash / memory-efficient kernels on CUDA), xformers'
``memory_efficient_attention`` when it imports and runs on the device, and an explicit "math"
reference that the other two are tested against.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

BACKENDS = ("sdpa", "xformers", "math")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention over (batch, heads, tokens, dim) tensors, scaled by 1/sqrt(dim)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "math":
        scale = 1.0 / math.sqrt(q.shape[-1])
        weights = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)
        return (weights @ v.float()).to(q.dtype)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


_xformers_ok: dict[str, bool] = {}


def xformers_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether xformers runs here: decided by one tiny real call, since its kernels may not load."""
    key = f"{device.type}:{dtype}"
    if key not in _xformers_ok:
        try:
            import xformers.ops as xops

            x = torch.zeros(1, 8, 1, 8, device=device, dtype=dtype)
            xops.memory_efficient_attention(x, x, x)
            _xformers_ok[key] = True
        except Exception:  # ImportError, NotImplementedError (no kernel), RuntimeError
            _xformers_ok[key] = False
    return _xformers_ok[key]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Validate a backend name; xformers falls back to SDPA with a warning where it cannot run."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "xformers" and not xformers_available(device, dtype):
        warnings.warn("xformers is not installed or has no kernel for this device/dtype; using sdpa",
                      stacklevel=3)
        return "sdpa"
    return name


def set_attention_backend(module: nn.Module, name: str) -> str:
    """Select the attention backend for every attention layer inside ``module``."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    backend = resolve_backend(name, device, dtype)
    for sub in module.modules():
        if hasattr(sub, "attention_backend"):
            sub.attention_backend = backend
    return backend


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no ``context`` is given (CompVis CrossAttention)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.attention_backend = "sdpa"

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, h = x.shape[0], self.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v, self.attention_backend)
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3])
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU unit (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text tokens, then a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.gradient_checkpointing = False

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (Rombach et al. 2022, LDM §3.3).

    SD1 projects in and out with 1×1 convolutions, SD2 with linear layers (``use_linear``).
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # b (h w) c
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual
