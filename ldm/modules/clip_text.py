"""OpenAI CLIP's text transformer (SD1's text encoder) in plain torch, named as the checkpoints name it.

It follows ``transformers.CLIPTextModel`` (5.x with its default SDPA attention) operation for
operation, so that outputs, gradients and even the random initialisation equal it bit for bit
(tests/ldm/test_text_towers.py); importing this module costs nothing beyond torch. Radford et al.
2021: a pre-norm GPT-2-style decoder stack (causal self-attention, QuickGELU MLP) over 77 tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig

LAYER_NORM_EPS = 1e-5
INITIALIZER_RANGE = 0.02  # CLIPTextConfig's defaults, which the towers were built with
INITIALIZER_FACTOR = 1.0


class QuickGELU(nn.Module):
    """x·σ(1.702x), the GELU approximation OpenAI CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()  # the exact erf form, as transformers' "gelu"
    raise ValueError(f"text encoder activation must be quick_gelu or gelu, got {name!r}")


class Embedding(nn.Embedding):
    """``nn.Embedding`` that leaves a meta-device weight alone in ``reset_parameters``: a model
    built to be loaded (weights on meta) then draws nothing, and PyTorch's meta ``normal_``, which
    imports torch._dynamo (~1 s), is never called. On a real device it draws as ``nn.Embedding``."""

    # (mask (B, n) bool, vectors (k, width)): rows that replace the looked-up ones for one call
    # (textual-inversion words, set by ldm.embeddings.overridden); None = a plain lookup
    overrides: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        if self.overrides is None:
            return out
        mask, vectors = self.overrides
        if mask.shape != input_ids.shape:
            raise ValueError(f"embedding overrides are for ids of shape {tuple(mask.shape)}, "
                             f"got {tuple(input_ids.shape)}")
        # out of place, so that gradients reach the vectors when they are being trained
        return out.index_put(mask.to(out.device).nonzero(as_tuple=True), vectors.to(out))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, max_length: int):
        super().__init__()
        self.token_embedding = Embedding(vocab_size, width)
        self.position_embedding = Embedding(max_length, width)
        # not saved (older files carry it; loaders ignore it); a lookup keeps transformers' backward
        self.register_buffer("position_ids", torch.arange(max_length).expand((1, -1)), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[-1]
        if n > self.position_embedding.weight.shape[0]:
            raise ValueError(f"{n} tokens; the text encoder has {self.position_embedding.weight.shape[0]} "
                             "positions")
        return self.token_embedding(input_ids) + self.position_embedding(self.position_ids[:, :n])


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention through SDPA's ``is_causal`` (no mask tensor), as transformers
    runs it when no padding mask is given."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.embed_dim, self.num_heads = width, heads
        self.head_dim = width // heads
        self.scale = self.head_dim ** -0.5
        # k, v, q, out: transformers' construction order, which fixes the random numbers each one draws
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scale,
                                             is_causal=q.shape[2] > 1)
        out = out.transpose(1, 2).contiguous().reshape(*x.shape[:-1], -1).contiguous()
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, inner: int, act: str):
        super().__init__()
        self.activation_fn = activation(act)
        self.fc1 = nn.Linear(width, inner)
        self.fc2 = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, inner: int, act: str):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(width, inner, act)
        self.layer_norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, inner: int, act: str):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(width, heads, inner, act) for _ in range(layers)])


class CLIPTextOutput(NamedTuple):
    """The fields of transformers' ``BaseModelOutputWithPooling`` that a CLIP text model fills."""

    last_hidden_state: torch.Tensor  # after the final layer norm
    pooler_output: torch.Tensor  # last_hidden_state at each sequence's first end token
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then each block's output


class CLIPTextTransformer(nn.Module):
    """``encode``: token ids → hidden states through the final layer norm, optionally from an earlier
    block (``skip`` > 0: CLIP skip), running only the blocks needed. Calling the module gives
    transformers' CLIPTextModel outputs, for code written against that class."""

    def __init__(self, cfg: TextEncoderConfig, eos_token_id: int = 49407):
        super().__init__()
        self.eos_token_id = eos_token_id
        self.embeddings = CLIPTextEmbeddings(cfg.vocab_size, cfg.width, cfg.max_length)
        self.encoder = CLIPEncoder(cfg.layers, cfg.width, cfg.heads, int(cfg.width * cfg.mlp_ratio), cfg.act)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.init_weights()

    def encode(self, input_ids: torch.Tensor, skip: int = 0) -> torch.Tensor:
        layers = self.encoder.layers
        if not 0 <= skip <= len(layers):
            raise ValueError(f"cannot skip {skip} of the text encoder's {len(layers)} blocks")
        x = self.embeddings(input_ids)
        for layer in layers[: len(layers) - skip]:
            x = layer(x)
        return self.final_layer_norm(x)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> CLIPTextOutput:
        x = self.embeddings(input_ids)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        last = self.final_layer_norm(x)
        hidden_states = tuple(states) if output_hidden_states else None
        return CLIPTextOutput(last, self.pooled(last, input_ids), hidden_states)

    def pooled(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The state at each sequence's first end-of-text token (transformers' ``pooler_output``)."""
        ids = input_ids.to(dtype=torch.int, device=hidden.device)
        first_eos = (ids == self.eos_token_id).int().argmax(dim=-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first_eos]

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' ``post_init`` for CLIPTextModel: every module, children before parents, gets
        the generic init (normal(0.02) weights, zero biases, unit norms), then CLIP's own standard
        deviations. Most values are drawn more than once; only the last draw stays, but every draw
        advances the random generator, and later modules' values depend on it."""
        if any(p.is_meta for p in self.parameters()):
            return

        def visit(module: nn.Module) -> None:
            for child in module.children():
                visit(child)
            _generic_init(module)
            _clip_init(module, len(self.encoder.layers))

        visit(self)


def _generic_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=INITIALIZER_RANGE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=INITIALIZER_RANGE)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _clip_init(module: nn.Module, layers: int) -> None:
    factor = INITIALIZER_FACTOR
    if isinstance(module, CLIPTextEmbeddings):
        nn.init.normal_(module.token_embedding.weight, mean=0.0, std=factor * 0.02)
        nn.init.normal_(module.position_embedding.weight, mean=0.0, std=factor * 0.02)
    elif isinstance(module, CLIPAttention):
        in_std = (module.embed_dim ** -0.5) * ((2 * layers) ** -0.5) * factor
        out_std = (module.embed_dim ** -0.5) * factor
        for proj, std in ((module.q_proj, in_std), (module.k_proj, in_std), (module.v_proj, in_std),
                          (module.out_proj, out_std)):
            nn.init.normal_(proj.weight, mean=0.0, std=std)
    elif isinstance(module, CLIPMLP):
        width = module.fc1.in_features
        in_std = (width ** -0.5) * ((2 * layers) ** -0.5) * factor
        fc_std = (2 * width) ** -0.5 * factor
        nn.init.normal_(module.fc1.weight, mean=0.0, std=fc_std)
        nn.init.normal_(module.fc2.weight, mean=0.0, std=in_std)
