"""Inference speed and memory switches for a :class:`ldm.model.LatentDiffusion`.

How they attach: the architecture (``ldm.modules``) declares two extension points, each a plain
attribute that defaults to None (the plain path) and takes a strategy object from this package —
``UNetModel.runner`` (:class:`~ldm.speed.runner.UNetRunner`: how the UNet is walked) and
``CrossAttention.projections`` (:class:`~ldm.speed.projections.FastProjections`: how q, k and v
are computed). Both are named by protocols in the modules that call them. :func:`apply_speed`
installs or removes them and records the options in force in the model's ``speed`` field;
:func:`sampling_scope` opens the per-run caches they keep. Nothing else of the model is touched:
the checkpoint keys and the modules stay as they are, and every switch computes the same function
(up to float rounding), so parity tests hold with any of them on:

- ``fused_qkv``: each attention layer keeps its q/k/v weights in one buffer (the parameters become
  views into it) and self-attention projects with a single matmul; the text keys and values of
  cross-attention come from one (k|v) matmul. Layers wrapped by a LoRA (peft) are left unfused,
  and a layer whose weights were replaced since (``.to()``, a LoRA fused with a cast) falls back
  to its separate projections by itself.
- ``channels_last``: the UNet and autoencoder run in NHWC layout (oneDNN on CPU and cuDNN's
  tensor-core kernels are fastest there; the SpatialTransformer then needs no layout copies).
- ``text_kv_cache``: during one sampling run the text keys/values of every cross-attention layer
  are computed at the first step and reused (the text conditioning does not change between steps).
- ``shared_cfg_prefix``: the sampling loop gives the model the latents once with the [uncond, cond]
  text, and the layers before the UNet's first cross-attention run once instead of twice (without
  it, ``LatentDiffusion.apply_model`` repeats the latents).
- ``cpu_prepack``: on the CPU, each UNet convolution's weight is reordered into oneDNN's blocked
  layout once per model and input shape (PyTorch's eager convolution reorders it on every call;
  inductor's "freezing" does the same prepacking), and packed again when the weight changes; runs
  too short to pay a new pack back do without (see ``ldm.speed.runner``).
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
from dataclasses import dataclass, fields

import torch
from torch import nn

from .projections import set_projections, text_kv_caches
from .runner import UNetRunner, prepack_available

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


def set_channels_last(model: nn.Module, enabled: bool = True) -> None:
    """Convert the UNet's and autoencoder's 4-D weights to (or back from) NHWC, and make the
    autoencoder take and return ordinary NCHW tensors around an NHWC interior (the UNet's runner
    does the same for the UNet)."""
    fmt = torch.channels_last if enabled else torch.contiguous_format
    for part in (model.model.diffusion_model, model.first_stage_model):
        with torch.no_grad():
            part.to(memory_format=fmt)
    model.first_stage_model.channels_last = enabled


def is_compiled(unet: nn.Module) -> bool:
    return getattr(unet, "_compiled_call_impl", None) is not None


def _check_device(options: SpeedOptions, device: torch.device) -> None:
    if options.cuda_graphs and device.type != "cuda":
        raise ValueError(f"SpeedOptions.cuda_graphs needs the model on a CUDA device; it is on {device}")
    if options.sdpa_kernel in ("efficient", "cudnn") and device.type != "cuda":
        raise ValueError(f"SpeedOptions.sdpa_kernel={options.sdpa_kernel!r} is a CUDA kernel; the model "
                         f"is on {device} (there: None, 'flash' or 'math')")


def _runner(options: SpeedOptions) -> UNetRunner | None:
    """The UNet's runner for these options; None where the plain forward computes the same."""
    graphs = options.cuda_graphs and not options.compile  # with compile: inductor's own graphs
    if not (options.channels_last or options.shared_cfg_prefix or graphs):
        return None
    return UNetRunner(channels_last=options.channels_last, cuda_graphs=graphs)


def apply_speed(model: nn.Module, options: SpeedOptions | dict | None = None,
                device: torch.device | str | None = None) -> SpeedOptions:
    """Switch ``model`` (a LatentDiffusion, already in its dtype) to ``options``; ``device`` is
    where it runs (default: where its weights are; offloading keeps them in CPU memory for a GPU).
    Returns the options in force (also kept in ``model.speed``); calling it again with other
    options switches over."""
    options = as_speed_options(options)
    unet = model.model.diffusion_model
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    _check_device(options, device)
    set_projections(model, options.fused_qkv, options.text_kv_cache)
    set_channels_last(model, options.channels_last)
    unet.runner = _runner(options)
    if options.compile:
        mode = options.compile_mode
        if options.cuda_graphs:
            mode = "reduce-overhead"  # inductor's own CUDA graphs
        unet.compile(dynamic=False, mode=mode, backend=options.compile_backend)
    elif is_compiled(unet):
        unet._compiled_call_impl = None  # back to eager
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


def _cpu_prepackable(unet: nn.Module, runner: UNetRunner) -> bool:
    p = next(unet.parameters())
    return (p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16)
            and runner.channels_last and prepack_available(p.dtype))


@contextlib.contextmanager
def sampling_scope(model: nn.Module, calls: int | None = None):
    """Around one sampling run (``calls`` UNet calls on the same conditioning; None: unknown): the
    SDPA kernel choice and, in eager mode, the caches (text keys/values per run, prepacked
    convolutions). Yields a :class:`SamplingRun`."""
    options = getattr(model, "speed", None)
    if options is None:  # the plain model (or not a LatentDiffusion): nothing to switch
        yield SamplingRun()
        return
    unet = model.model.diffusion_model
    runner = unet.runner
    graphs = runner.graphs if runner is not None else None
    # graphs and compiled code bake the projections in; the caches are for eager runs only
    eager = graphs is None and not is_compiled(unet)
    with contextlib.ExitStack() as stack:
        if options.sdpa_kernel is not None:
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel(_sdpa_backends(options.sdpa_kernel)))
        if eager and options.text_kv_cache:
            stack.enter_context(text_kv_caches(unet))
        if eager and options.cpu_prepack and runner is not None and _cpu_prepackable(unet, runner):
            stack.enter_context(runner.prepacking(calls))
        if graphs is not None:
            stack.enter_context(graphs.sampling_run(unet))
        yield SamplingRun(options.compile and options.cuda_graphs)
