"""The UNet's inference runner, installed in ``UNetModel.runner``: the UNet's forward walked again
with three changes that keep the function (up to float rounding) and the checkpoint keys:

- channels-last: the input is converted to NHWC once (the weights already are, see
  ``ldm.speed.set_channels_last``), and the output back to NCHW;
- the shared classifier-free-guidance prefix: a ``context`` with k times as many rows as ``x``
  evaluates ``x`` under each of the k conditionings, and everything before the first
  cross-attention (the input convolution, the first ResBlock and self-attention, at full
  resolution among the costliest layers) runs once for all k;
- prepacked convolutions: while a sampling run has opened :meth:`UNetRunner.prepacking` (CPU,
  channels-last), each 3×3 convolution's weight is reordered into oneDNN's blocked layout once per
  model and input shape instead of on every call (the reorder is ~30 % of a small convolution's
  time; inductor's "freezing" does the same). A pack is kept while its weight keeps its storage and
  version counter, so weights changed in place (``copy_``, ``load_state_dict``) or replaced
  (``.to()``, ``.data =``) are packed again. Packing a layer costs about one to three of its calls,
  so a run of fewer than ``PREPACK_MIN_CALLS`` UNet calls makes no new packs (it uses those that
  exist).

Layers in training mode run as the architecture defines them; peft LoRA wrappers are called as
modules, so they apply.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.attention import SpatialTransformer, pointwise
from ..modules.unet import (Downsample, ResBlock, TimestepEmbedSequential, UNetModel, Upsample,
                            upsample_nearest)
from .graphs import CudaGraphs

_prepack_ok: dict[torch.dtype, bool] = {}
# Below this many UNet calls in a run, packing a layer costs more than it saves (a 1280-channel 3×3
# convolution on an 8×8 latent: the reorder takes ~3 calls' worth of saved time; 320 channels at 64×64
# about 1.5; benchmarks/README.md "prepacking").
PREPACK_MIN_CALLS = 4


def prepack_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build and CPU run oneDNN's prepacked convolution in ``dtype`` (probed
    once per dtype with a real call: bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    if dtype not in _prepack_ok:
        try:
            x = torch.ones(1, 8, 4, 4, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.ones(8, 8, 3, 3, dtype=dtype)
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1,
                                                               list(x.shape))
            y = torch.ops.mkldnn._convolution_pointwise(x, packed, None, [1, 1], [1, 1], [1, 1], 1,
                                                        "none", [], "")
            _prepack_ok[dtype] = bool(torch.allclose(y.float(), F.conv2d(x, w, padding=1).float()))
        except Exception:  # no oneDNN, no kernel for this dtype on this CPU, or the private ops changed
            _prepack_ok[dtype] = False
    return _prepack_ok[dtype]


def guidance_copies(x: torch.Tensor, context: torch.Tensor) -> int:
    """k, when ``context`` holds k rows per sample of ``x`` (classifier-free guidance: k = 2)."""
    copies = context.shape[0] // x.shape[0] if x.shape[0] else 1
    if context.shape[0] != copies * x.shape[0]:
        raise ValueError(f"context has {context.shape[0]} rows, not a multiple of the batch "
                         f"{x.shape[0]}")
    return copies


def _has_transformer(block: nn.Module) -> bool:
    return any(isinstance(layer, SpatialTransformer) for layer in block)


class UNetRunner:
    """See the module docstring. ``cuda_graphs``: replay captured CUDA graphs of the walk."""

    def __init__(self, channels_last: bool = False, cuda_graphs: bool = False):
        self.channels_last = channels_last
        self.graphs = CudaGraphs() if cuda_graphs else None
        # conv layer → {input shape: (weight stamp, oneDNN weight)}, kept across runs
        self.packs: weakref.WeakKeyDictionary[nn.Conv2d, dict] = weakref.WeakKeyDictionary()
        self.prepack: bool | None = None  # in a run: None no packing, False reuse only, True pack

    def __call__(self, unet: UNetModel, x: torch.Tensor, timesteps: torch.Tensor,
                 context: torch.Tensor, control: list[torch.Tensor] | None = None,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        # a call with control residuals or a vector y runs eagerly (the captured graphs take x, t
        # and context)
        if self.graphs is not None and control is None and y is None \
                and not torch.compiler.is_compiling():
            return self.graphs(self.walk, unet, x, timesteps, context)
        return self.walk(unet, x, timesteps, context, control, y)

    @contextlib.contextmanager
    def prepacking(self, calls: int | None = None):
        """Use prepacked convolution weights for the length of the ``with`` block (one sampling run
        of ``calls`` UNet calls; None: unknown). New packs are made only for runs long enough to pay
        them back (see the module docstring)."""
        self.prepack = calls is None or calls >= PREPACK_MIN_CALLS
        try:
            yield
        finally:
            self.prepack = None

    def __getstate__(self) -> dict:
        # packs are a cache of oneDNN tensors (which cannot be copied or pickled): a copied model
        # packs its own weights again
        state = dict(self.__dict__)
        state["packs"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.packs = weakref.WeakKeyDictionary()

    def forget_packs(self) -> None:
        """Drop every kept pack (their memory too). Needed only after writing a weight in place
        through ``.data``, which PyTorch's version counter does not see."""
        self.packs = weakref.WeakKeyDictionary()

    def walk(self, unet: UNetModel, x: torch.Tensor, timesteps: torch.Tensor,
             context: torch.Tensor, control: list[torch.Tensor] | None = None,
             y: torch.Tensor | None = None) -> torch.Tensor:
        """``UNetModel.forward``, with the changes of the module docstring. ``control`` residuals
        have one row per row of ``context``: a skip from the shared prefix is repeated to that
        batch before its residual is added. ``y`` (SDXL) has one row per row of ``context``: it
        makes the time embedding differ per conditioning, so nothing is shared then."""
        copies = guidance_copies(x, context)
        if y is not None and copies > 1:
            x = torch.cat([x] * copies)
            timesteps = torch.cat([timesteps] * copies) if timesteps.dim() else timesteps
            copies = 1
        emb = unet.embed_time(timesteps, x, y)
        context = context.to(x.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        h = x
        for block in unet.input_blocks:
            if copies > 1 and _has_transformer(block):
                h = self.block(block, h, emb, context, copies=copies)
                emb, copies = torch.cat([emb] * copies), 1
            else:
                h = self.block(block, h, emb, context)
            skips.append(h)
        if copies > 1:  # no cross-attention before the middle block
            h, emb = torch.cat([h] * copies), torch.cat([emb] * copies)
        h = self.block(unet.middle_block, h, emb, context)
        residuals = list(control) if control is not None else []
        if residuals:
            h = h + residuals.pop().to(h.dtype)
        for block in unet.output_blocks:
            skip = skips.pop()
            if skip.shape[0] != h.shape[0]:  # a skip from the shared part
                skip = torch.cat([skip] * (h.shape[0] // skip.shape[0]))
            if residuals:
                skip = skip + residuals.pop().to(skip.dtype)
            h = torch.cat([h, skip], dim=1)
            up_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = self.block(block, h, emb, context, up_size)
        norm, _, out = unet.out
        return self.conv(out, F.silu(norm(h))).contiguous()

    def block(self, block: TimestepEmbedSequential, x: torch.Tensor, emb: torch.Tensor,
              context: torch.Tensor, upsample_size: tuple[int, int] | None = None,
              copies: int = 1) -> torch.Tensor:
        """``TimestepEmbedSequential.forward``; ``copies`` > 1: ``x`` stands for that many identical
        batches, which the first cross-attention makes differ."""
        for layer in block:
            if isinstance(layer, ResBlock):
                x = self.res_block(layer, x, emb)
            elif isinstance(layer, SpatialTransformer) and copies > 1:
                x = shared_prefix_transformer(layer, x, context, copies)
                emb, copies = torch.cat([emb] * copies), 1
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = self.conv(layer.conv, upsample_nearest(x, upsample_size))
            elif isinstance(layer, Downsample):
                x = self.conv(layer.op, x)
            else:
                x = self.conv(layer, x)
        return x

    def res_block(self, block: ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``ResBlock.forward`` at inference, without the Sequential wrappers and the (identity)
        dropout; convolutions and linears are still called as modules, so LoRA wrappers apply."""
        if block.training:
            return block(x, emb)
        norm1, _, conv1 = block.in_layers
        norm2, _, _, conv2 = block.out_layers
        h = self.conv(conv1, F.silu(norm1(x)))
        h = h + block.emb_layers[1](F.silu(emb))[:, :, None, None].to(h.dtype)
        h = self.conv(conv2, F.silu(norm2(h)))
        return pointwise(block.skip_connection, x) + h

    def conv(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)``, prepacked while a run has opened ``prepacked`` (a plain 3×3 convolution
        with zero padding on a channels-last CPU input, without gradients)."""
        if (self.prepack is None or type(layer) is not nn.Conv2d or layer.kernel_size == (1, 1)
                or layer.padding_mode != "zeros" or x.device.type != "cpu" or torch.is_grad_enabled()
                or not x.is_contiguous(memory_format=torch.channels_last)):
            return layer(x)
        args = (list(layer.padding), list(layer.stride), list(layer.dilation), layer.groups)
        key = tuple(x.shape)
        stamp = (layer.weight.data_ptr(), layer.weight._version)
        packed = self.packs.setdefault(layer, {})
        entry = packed.get(key)
        if entry is None or entry[0] != stamp:
            if not self.prepack:
                return layer(x)
            entry = packed[key] = (stamp, torch._C._nn.mkldnn_reorder_conv2d_weight(
                layer.weight.to_mkldnn(), *args[:3], args[3], list(key)))
        return torch.ops.mkldnn._convolution_pointwise(x, entry[1], layer.bias, *args, "none", [], "")


def shared_prefix_transformer(layer: SpatialTransformer, x: torch.Tensor, context: torch.Tensor,
                              copies: int) -> torch.Tensor:
    """``layer(torch.cat([x] * copies), context)``, with the part before the text (the first
    block's self-attention) computed once."""
    tokens = layer.tokens_in(x)
    first, *rest = layer.transformer_blocks
    tokens = torch.cat([first.self_attention(tokens)] * copies)
    tokens = first.text_attention_and_mlp(tokens, context)
    for block in rest:
        tokens = block(tokens, context)
    return layer.tokens_out(tokens, torch.cat([x] * copies))  # cat keeps the layout
