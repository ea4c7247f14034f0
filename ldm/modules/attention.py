"""Cross-attention and the SpatialTransformer of the Stable Diffusion UNet (CompVis key layout).

Attention runs through one of three interchangeable backends, chosen per model at run time
(``set_attention_backend``): PyTorch SDPA (flash / memory-efficient kernels on CUDA), xformers'
``memory_efficient_attention`` when it imports and runs on the device, and an explicit "math"
reference that the other two are tested against. The math path (and SDPA when only its math
kernel is allowed) works through the queries in chunks, so no N×N score matrix larger than
``MAX_SCORES`` elements is ever held at high resolution.

One extension point: :attr:`CrossAttention.projections`, None for the plain q/k/v projections;
:mod:`ldm.speed` puts a strategy there that computes them faster at inference (one fused matmul,
the text keys/values kept for a sampling run).
"""
from __future__ import annotations

import math
import warnings
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

BACKENDS = ("sdpa", "xformers", "math")

# Largest q·kᵀ block (batch × heads × queries × keys) the math paths materialise at once: 2**26
# fp32 scores are 256 MiB. SD's VAE mid-block at 2048 px has 65536² scores per image (16 GiB).
MAX_SCORES = 2**26


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    weights = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)
    return (weights @ v.float()).to(q.dtype)


def _by_query_chunks(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``fn`` over slices of the queries small enough that each score block fits ``MAX_SCORES``
    (softmax runs along the keys, so query rows are independent and the result is the same)."""
    rows = q.shape[-2]
    per_row = max(1, q.numel() // q.shape[-1] // rows * k.shape[-2])
    step = max(1, MAX_SCORES // per_row)
    if step >= rows:
        return fn(q, k, v)
    return torch.cat([fn(q[..., i:i + step, :], k, v) for i in range(0, rows, step)], dim=-2)


def _sdpa_math_only() -> bool:
    """True when every fused SDPA kernel is switched off (``sdpa_kernel(SDPBackend.MATH)``), so SDPA
    would build the whole score matrix."""
    b = torch.backends.cuda
    return not (b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled() or b.cudnn_sdp_enabled())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention over (batch, heads, tokens, dim) tensors, scaled by 1/sqrt(dim)."""
    if backend == "sdpa":
        if not torch.compiler.is_compiling() and _sdpa_math_only():
            return _by_query_chunks(F.scaled_dot_product_attention, q, k, v)
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "math":
        return _by_query_chunks(_math, q, k, v)
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


def pointwise(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution; on a channels-last input it runs as a matmul over the pixels. (PyTorch's
    CPU heuristics send small-batch 1×1 convolutions to its slow reference kernel; the matmul is
    the same arithmetic, ~4× faster there.) LoRA-wrapped layers are called as they are."""
    if (type(conv) is nn.Conv2d and not torch.is_grad_enabled()
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
        w = conv.weight
        out = F.linear(x.permute(0, 2, 3, 1), w.view(w.shape[0], w.shape[1]), conv.bias)
        return out.permute(0, 3, 1, 2)
    return conv(x)


class Projections(Protocol):
    """Computes a :class:`CrossAttention` layer's (q, k, v) in place of its separate projections:
    the same function (up to float rounding), computed another way. Installed in its
    ``projections``; ``context`` is None for self-attention."""

    def __call__(self, layer: CrossAttention, x: torch.Tensor, context: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


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
        # how q, k and v are computed instead of by to_q/to_k/to_v (ldm.speed installs one)
        self.projections: Projections | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.projections is not None:
            q, k, v = self.projections(self, x, context)
        else:
            source = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        b, h = x.shape[0], self.heads
        q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
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
        if torch.is_grad_enabled():
            return x * F.gelu(gate)
        # inference: multiply into the activation's own buffer, one (tokens × dim_out) tensor
        # less at the feed-forward's peak
        return F.gelu(gate).mul_(x)


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

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn1(self.norm1(x)) + x

    def text_attention_and_mlp(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The rest of the block, from the first use of the text on."""
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.text_attention_and_mlp(self.self_attention(x), context)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (Rombach et al. 2022, LDM §3.3).

    SD1 projects in and out with 1×1 convolutions, SD2 with linear layers (``use_linear``).
    The output keeps the input's memory layout: a channels-last feature map is read as tokens and
    written back without a copy, and a contiguous one stays contiguous (a mixed layout would make
    oneDNN reorder the next convolution's weights on every call).
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
        tokens = self.tokens_in(x)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.tokens_out(tokens, x)

    def tokens_in(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised, projected feature map as tokens: (b, c, h, w) → (b, h·w, inner)."""
        b, _, h, w = x.shape
        x = self.norm(x)
        if not self.use_linear:
            x = pointwise(self.proj_in, x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # b (h w) c; a view when channels-last
        return self.proj_in(x) if self.use_linear else x

    def tokens_out(self, tokens: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Tokens projected back to a feature map shaped and laid out like ``residual``, plus it."""
        b, _, h, w = residual.shape
        if self.use_linear:
            tokens = self.proj_out(tokens)
        x = tokens.view(b, h, w, -1).permute(0, 3, 1, 2)  # a channels-last view
        if not residual.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()
        if not self.use_linear:
            x = pointwise(self.proj_out, x)
        return x + residual
