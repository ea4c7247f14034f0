"""Inference speed and memory switches for a :class:`ldm.model.LatentDiffusion`.

Every switch computes the same function (up to float rounding) and leaves the checkpoint keys as
they are, so parity tests hold with any of them on:

- ``fused_qkv``: each attention layer keeps its q/k/v weights in one buffer (the parameters become
  views into it) and self-attention projects with a single matmul; the text keys and values of
  cross-attention come from one (k|v) matmul. Layers wrapped by a LoRA (peft) are left unfused,
  and a layer whose weights were replaced since (``.to()``, a LoRA fused with a cast) falls back
  to its separate projections by itself.
- ``channels_last``: the UNet and autoencoder run in NHWC layout (oneDNN on CPU and cuDNN's
  tensor-core kernels are fastest there; the SpatialTransformer then needs no layout copies).
- ``text_kv_cache``: during one sampling run the text keys/values of every cross-attention layer
  are computed at the first step and reused (the text conditioning does not change between steps).
- ``shared_cfg_prefix``: the sampling loop gives the UNet the latents once with the [uncond, cond]
  text, so the layers before the first cross-attention run once instead of twice (see
  ``UNetModel.run``).
- ``cpu_prepack``: on the CPU, each UNet convolution's weight is reordered into oneDNN's blocked
  layout once per sampling run and input shape (PyTorch's eager convolution reorders it on every
  call; inductor's "freezing" does the same prepacking). Per run, so weights changed between runs
  (a LoRA fused in place) are always picked up.
- ``sdpa_kernel``: restrict PyTorch SDPA to "flash", "efficient", "cudnn" or "math" in the UNet.
- ``compile``: ``torch.compile`` of the UNet with static shapes (one compilation per input shape;
  new seeds and prompts of the same length do not recompile).
- ``cuda_graphs``: capture the UNet once per input shape and replay it (CUDA only; with
  ``compile`` this is inductor's "reduce-overhead" mode instead).
- ``offload``: keep the model in CPU memory and only the working component on the GPU (a pipeline
  option, see ``pipelines.offload``).

Memory savers that need no switch: the math attention paths work in query chunks (no N×N score
matrix above ``attention.MAX_SCORES``), inference GEGLU multiplies in place, and the autoencoder
codes a batch sample by sample when its activations would exceed ``AutoencoderKL.slice_bytes``.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, fields

import torch
from torch import nn

from .modules.attention import CrossAttention

SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class SpeedOptions:
    fused_qkv: bool = True
    channels_last: bool = True
    text_kv_cache: bool = True
    shared_cfg_prefix: bool = True
    cpu_prepack: bool = True
    sdpa_kernel: str | None = None  # None: PyTorch picks (flash / memory-efficient on CUDA)
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    cuda_graphs: bool = False
    offload: bool = False  # low-VRAM mode, applied by pipelines.offload (CUDA only)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"SpeedOptions.{f.name} must be True or False, got {value!r}")
        if self.sdpa_kernel not in (None, *SDPA_KERNELS):
            raise ValueError(f"SpeedOptions.sdpa_kernel must be None or one of {', '.join(SDPA_KERNELS)}, "
                             f"got {self.sdpa_kernel!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"SpeedOptions.compile_mode must be one of "
                             f"{', '.join(map(str, COMPILE_MODES))}, got {self.compile_mode!r}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(f"SpeedOptions.compile_backend must be a backend name, "
                             f"got {self.compile_backend!r}")

    @classmethod
    def off(cls) -> "SpeedOptions":
        """The plain eager model: every switch off."""
        return cls(fused_qkv=False, channels_last=False, text_kv_cache=False, shared_cfg_prefix=False,
                   cpu_prepack=False)

    def replace(self, **changes) -> "SpeedOptions":
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"SpeedOptions has no option {', '.join(map(repr, unknown))}")
        return SpeedOptions(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def as_speed_options(value) -> SpeedOptions:
    """None → the defaults; a SpeedOptions; or a dict of its fields."""
    if value is None:
        return SpeedOptions()
    if isinstance(value, SpeedOptions):
        return value
    if isinstance(value, dict):
        return SpeedOptions().replace(**value)
    raise ValueError(f"speed must be a SpeedOptions, a dict of its fields or None, got {type(value).__name__}")


def _attention_layers(module: nn.Module) -> list[CrossAttention]:
    return [m for m in module.modules() if isinstance(m, CrossAttention)]


def fuse_qkv(module: nn.Module, enabled: bool = True) -> int:
    """Fuse (or unfuse) the q/k/v projections of every attention layer in ``module``; returns how
    many layers are fused. Layers whose projections a LoRA wraps are skipped with a warning (LoRA
    targets ``to_q``/``to_k``/``to_v``; fusing would bypass it)."""
    layers = _attention_layers(module)
    if not enabled:
        for layer in layers:
            layer.unfuse_projections()
        return 0
    fused = sum(layer.fuse_projections() for layer in layers)
    if fused < len(layers):
        warnings.warn(f"fused_qkv: {len(layers) - fused} attention layers hold LoRA layers and stay "
                      "unfused", stacklevel=2)
    return fused


def set_channels_last(model: nn.Module, enabled: bool = True) -> None:
    """Convert the UNet's and autoencoder's 4-D weights to (or back from) NHWC, and make them take
    and return ordinary NCHW tensors around an NHWC interior."""
    fmt = torch.channels_last if enabled else torch.contiguous_format
    for part in (model.model.diffusion_model, model.first_stage_model):
        with torch.no_grad():
            part.to(memory_format=fmt)
        part.channels_last = enabled


def is_compiled(unet: nn.Module) -> bool:
    return getattr(unet, "_compiled_call_impl", None) is not None


class CudaGraphUNet:
    """Replays a CUDA graph of ``unet.run`` captured once per input signature (shapes, dtypes,
    device) and model structure. Inputs are copied into the graph's static tensors; the output is
    copied out, since the next replay overwrites it."""

    def __init__(self, unet: nn.Module, warmup: int = 2):
        self.unet = unet
        self.warmup = warmup
        self.graphs: dict = {}
        self.run_structure: tuple | None = None  # fixed for the length of a sampling run

    def begin_run(self) -> None:
        """Check the model's structure once for a sampling run instead of on every step (the
        walk over all parameters costs ~1 ms for SD's UNet)."""
        self.run_structure = self._structure()

    def end_run(self) -> None:
        self.run_structure = None

    def _structure(self) -> tuple:
        # a LoRA wrapper or a swapped parameter changes what the graph would have to run
        return tuple((id(m), id(p), p.data_ptr()) for m in self.unet.modules()
                     for p in m.parameters(recurse=False))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return self.unet.run(x, t, context)
        t = (t[None] if t.dim() == 0 else t).expand(x.shape[0])
        key = (tuple(x.shape), x.dtype, t.dtype, tuple(context.shape), context.dtype, x.device,
               torch.is_inference_mode_enabled())
        structure = self.run_structure if self.run_structure is not None else self._structure()
        entry = self.graphs.get(key)
        if entry is None or entry[0] != structure:
            entry = self.graphs[key] = (structure, *self._capture(x, t, context))
        _, graph, static, out = entry
        for dst, src in zip(static, (x, t, context)):
            dst.copy_(src)
        graph.replay()
        return out.clone()

    def _capture(self, x, t, context):
        static = (x.clone(), t.clone(), context.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy inits, cuDNN autotuning
            for _ in range(self.warmup):
                self.unet.run(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.unet.run(*static)
        return graph, static, out

    def reset(self) -> None:
        self.graphs.clear()


def apply_speed(model: nn.Module, options: SpeedOptions | dict | None = None,
                device: torch.device | str | None = None) -> SpeedOptions:
    """Switch ``model`` (a LatentDiffusion, already in its dtype) to ``options``; ``device`` is
    where it runs (default: where its weights are; offloading keeps them in CPU memory for a GPU).
    Returns the options in force; calling it again with other options switches over."""
    options = as_speed_options(options)
    unet = model.model.diffusion_model
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    if options.cuda_graphs and device.type != "cuda":
        raise ValueError(f"SpeedOptions.cuda_graphs needs the model on a CUDA device; it is on {device}")
    if options.sdpa_kernel in ("efficient", "cudnn") and device.type != "cuda":
        raise ValueError(f"SpeedOptions.sdpa_kernel={options.sdpa_kernel!r} is a CUDA kernel; the model "
                         f"is on {device} (there: None, 'flash' or 'math')")
    fuse_qkv(model, options.fused_qkv)
    set_channels_last(model, options.channels_last)
    unet.text_kv_cache = options.text_kv_cache
    unet.cpu_prepack = options.cpu_prepack
    unet.sdpa_kernel = options.sdpa_kernel
    unet.graphed = None
    if options.compile:
        mode = options.compile_mode
        if options.cuda_graphs:
            mode = "reduce-overhead"  # inductor's own CUDA graphs
        unet.compile(dynamic=False, mode=mode, backend=options.compile_backend)
    else:
        if is_compiled(unet):
            unet._compiled_call_impl = None  # back to eager
        if options.cuda_graphs:
            unet.graphed = CudaGraphUNet(unet)
    model.speed = options
    return options


def _sdpa_backends(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": [SDPBackend.FLASH_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION],
            "cudnn": [SDPBackend.CUDNN_ATTENTION], "math": [SDPBackend.MATH]}[name]


class SamplingRun:
    """What a sampling loop calls once per step (inside :func:`sampling_scope`)."""

    def __init__(self, cuda_graph_steps: bool = False):
        self.cuda_graph_steps = cuda_graph_steps

    def begin_step(self) -> None:
        if self.cuda_graph_steps:  # inductor's CUDA graphs reuse output memory from step to step
            torch.compiler.cudagraph_mark_step_begin()


@contextlib.contextmanager
def sampling_scope(model: nn.Module):
    """Around one sampling run (many UNet calls on the same conditioning): the SDPA kernel choice
    and, in eager mode, the per-run cache of the text keys/values. Yields a :class:`SamplingRun`."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    with contextlib.ExitStack() as stack:
        if unet is None:  # not a LatentDiffusion: nothing to switch
            yield SamplingRun()
            return
        kernel = getattr(unet, "sdpa_kernel", None)
        if kernel is not None:
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel(_sdpa_backends(kernel)))
        layers, convs = [], []
        # graphs and compiled code bake the projections in; the caches are for eager runs only
        eager = unet.graphed is None and not is_compiled(unet)
        if eager and getattr(unet, "text_kv_cache", False):
            layers = _attention_layers(unet)
            for layer in layers:
                layer.kv_cache = []
        if eager and getattr(unet, "cpu_prepack", False) and _cpu_prepackable(unet):
            convs = [m for m in unet.modules() if type(m) is nn.Conv2d and m.kernel_size != (1, 1)
                     and m.padding_mode == "zeros"]
            for layer in convs:
                layer.prepacked = {}
        graphed = unet.graphed
        if graphed is not None:
            graphed.begin_run()
        speed = getattr(model, "speed", None)
        try:
            yield SamplingRun(bool(speed and speed.compile and speed.cuda_graphs))
        finally:
            if graphed is not None:
                graphed.end_run()
            for layer in layers:
                layer.kv_cache = None
            for layer in convs:
                del layer.prepacked


def _cpu_prepackable(unet: nn.Module) -> bool:
    from .modules.unet import prepack_available

    p = next(unet.parameters())
    return (p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16)
            and getattr(unet, "channels_last", False) and prepack_available(p.dtype))
