"""The denoising loop: classifier-free guidance around a diffusers scheduler's ``step``.

Nothing in the loop reads a value back to the host (no ``.item()``, no Python branching on tensor
values), so on a GPU the steps queue without waiting; the only per-step host work is what the
diffusers scheduler itself does.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ldm.speed import sampling_scope

Generators = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators, device, dtype) -> torch.Tensor:
    """Gaussian noise drawn exactly as diffusers' pipelines draw it (``randn_tensor``): on the
    generator's device (a CPU generator gives the same numbers on any device), one draw per
    generator when given a list, then moved to ``device``."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", §3.4, eq. 15-16): scale the guided prediction to the per-sample standard deviation of
    the conditional one, then mix by ``phi`` to keep some of the guided contrast."""
    dims = list(range(1, guided.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def step_kwargs(scheduler, generator: Generators, eta: float) -> dict:
    """The optional arguments this scheduler's ``step`` takes: ``eta`` (DDIM, Song et al. 2021
    eq. 16) and the generator for the noise of stochastic samplers."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


@dataclass
class KnownRegion:
    """Inpainting with an ordinary (4-channel) model: after every step the latents outside the mask
    are replaced by the input image's latents noised to the next timestep with the initial noise
    (the RePaint-style blending of diffusers' legacy inpainting and A1111, Lugmayr et al. 2022)."""

    image_latents: torch.Tensor  # (B, 4, h, w)
    noise: torch.Tensor  # the initial noise, (B, 4, h, w)
    mask: torch.Tensor  # (B, 1, h, w), 1 = repaint

    def blend(self, scheduler, latents: torch.Tensor, next_t: torch.Tensor | None) -> torch.Tensor:
        known = self.image_latents
        if next_t is not None:
            known = scheduler.add_noise(known, self.noise, next_t)
        return (1 - self.mask) * known + self.mask * latents


@dataclass
class Guidance:
    """Classifier-free guidance (Ho & Salimans 2022): ε = ε_u + g·(ε_c − ε_u), optionally
    rescaled. With ``scale == 1`` the unconditional half would cancel out and is not computed."""

    scale: float
    rescale: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.scale != 1.0

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return out
        uncond, cond = out.chunk(2)
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale > 0:
            guided = rescale_guidance(guided, cond, self.rescale)
        return guided


@dataclass(frozen=True)
class Schedule:
    """The timesteps a generation runs and the scheduler that steps through them.

    ``timesteps`` may be the tail of the scheduler's (img2img/inpaint strength); ``step_kwargs``
    are the optional arguments of the scheduler's ``step`` (:func:`step_kwargs`)."""

    scheduler: object  # a diffusers scheduler
    timesteps: torch.Tensor
    step_kwargs: dict = field(default_factory=dict)

    @property
    def init_noise_sigma(self) -> float:
        return self.scheduler.init_noise_sigma

    def noised(self, init: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Image latents noised to the first timestep that will run (none run: unchanged)."""
        if len(self.timesteps) == 0:
            return init
        return self.scheduler.add_noise(init, noise, self.timesteps[:1].repeat(init.shape[0]))


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on: the text (with guidance the rows [uncond, cond] for
    latents given once), an inpainting model's extra input channels (mask and masked-image
    latents), or, for inpainting with an ordinary model, the known region blended in each step;
    ``control``: the ControlNet units (a ``pipelines.control.ControlStack``); ``y``: SDXL's vector
    conditioning, in the rows of ``context``."""

    context: torch.Tensor
    concat: torch.Tensor | None = None
    known: KnownRegion | None = None
    control: object | None = None
    y: torch.Tensor | None = None


@dataclass(frozen=True)
class Progress:
    """A tqdm bar over the steps (``show``), labelled ``desc``."""

    show: bool = True
    desc: str | None = None


def denoise(model, latents: torch.Tensor, schedule: Schedule, conditioning: Conditioning,
            guidance: Guidance, callback: Callable | None = None,
            progress: Progress = Progress()) -> tuple[torch.Tensor, bool]:
    """Run ``schedule``; returns the final latents and whether ``callback`` stopped the loop early
    (it is called as ``callback(i, total, latents)`` after step ``i`` of ``total``, counting from
    0, and a return value of ``False`` stops)."""
    # with guidance the context holds [uncond, cond] rows for the latents given once; the model
    # decides whether the layers before the first cross-attention run once or per conditioning
    scheduler, timesteps = schedule.scheduler, schedule.timesteps
    context, concat, known = conditioning.context, conditioning.concat, conditioning.known
    control = conditioning.control
    dtype = context.dtype
    total = len(timesteps)
    interrupted = False
    # the speed options' sampling scope: SDPA kernel choice, text keys/values computed once per run,
    # convolution weights prepacked when the run is long enough to pay for it
    with sampling_scope(model, total) as run, \
            tqdm(total=total, disable=not progress.show, desc=progress.desc, leave=False) as bar:
        for i, t in enumerate(timesteps):
            run.begin_step()
            x = scheduler.scale_model_input(latents, t).to(dtype)
            residuals = None if control is None else control.residuals(i, x, t, context,
                                                                       conditioning.y)
            extra = {} if conditioning.y is None else {"y": conditioning.y}
            out = model.apply_model(x, t.expand(x.shape[0]), context, concat=concat,
                                    control=residuals, **extra)
            latents = scheduler.step(guidance(out), t, latents, **schedule.step_kwargs,
                                     return_dict=False)[0]
            if known is not None:
                latents = known.blend(scheduler, latents, timesteps[i + 1:i + 2] if i + 1 < total else None)
            bar.update()
            if callback is not None and callback(i, total, latents) is False:
                interrupted = True
                break
    return latents, interrupted
