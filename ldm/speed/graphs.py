"""CUDA graphs of a UNet run: captured once per input signature (shapes, dtypes, device) and model
structure, then replayed. Inputs are copied into the graph's static tensors; the output is copied
out, since the next replay overwrites it."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

Run = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CudaGraphs:
    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.graphs: dict = {}
        self.run_structure: tuple | None = None  # fixed for the length of a sampling run

    @contextlib.contextmanager
    def sampling_run(self, unet: nn.Module):
        """Check the model's structure once for a sampling run instead of on every step (the
        walk over all parameters costs ~1 ms for SD's UNet)."""
        self.run_structure = self._structure(unet)
        try:
            yield
        finally:
            self.run_structure = None

    @staticmethod
    def _structure(unet: nn.Module) -> tuple:
        # a LoRA wrapper or a swapped parameter changes what the graph would have to run
        return tuple((id(m), id(p), p.data_ptr()) for m in unet.modules()
                     for p in m.parameters(recurse=False))

    def __call__(self, run: Run, unet: nn.Module, x: torch.Tensor, t: torch.Tensor,
                 context: torch.Tensor) -> torch.Tensor:
        """``run(unet, x, t, context)``, from a graph where one can be captured or replayed."""
        if torch.is_grad_enabled() or x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return run(unet, x, t, context)
        t = (t[None] if t.dim() == 0 else t).expand(x.shape[0])
        key = (tuple(x.shape), x.dtype, t.dtype, tuple(context.shape), context.dtype, x.device,
               torch.is_inference_mode_enabled())
        structure = self.run_structure if self.run_structure is not None else self._structure(unet)
        entry = self.graphs.get(key)
        if entry is None or entry[0] != structure:
            entry = self.graphs[key] = (structure, *self._capture(run, unet, x, t, context))
        _, graph, static, out = entry
        for dst, src in zip(static, (x, t, context)):
            dst.copy_(src)
        graph.replay()
        return out.clone()

    def _capture(self, run: Run, unet: nn.Module, x, t, context):
        static = (x.clone(), t.clone(), context.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy inits, cuDNN autotuning
            for _ in range(self.warmup):
                run(unet, *static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(unet, *static)
        return graph, static, out

    def reset(self) -> None:
        self.graphs.clear()
