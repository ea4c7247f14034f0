"""The ControlNet trainer (Zhang, Rao & Agrawala 2023): teach a ControlNet to steer a frozen base
model with hint images (what ``ldm train-controlnet`` runs), on :mod:`training.engine` with the
diffusion loss of :mod:`training.loss`.

The ControlNet starts as the paper's "trainable copy": the base UNet's encoder weights, with the
zero convolutions (and the hint encoder's last layer) zeroed, so before training the residuals are
zero and the model draws exactly what the base draws. UNet, autoencoder and text encoder stay
frozen (in the mixed-precision dtype); only the ControlNet, in float32, is optimised. Captions are
dropped with probability 0.5 by default, as the paper does, so the ControlNet learns to read the hint
without the prompt. States hold the ControlNet, the optimizer and the step; the output file holds
the ControlNet in the original layout (``input_hint_block``, ``zero_convs``, ..., without the
``control_model.`` prefix) with the cldm config tree in its header (``ldm_config``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


from .engine import Engine, PerStep, RunSettings, Schedule, Summary, Task, TrainingError, weight_dtype
from .settings import as_paths, check_fields
from .loss import DiffusionLoss, noised_batch

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
CLDM_TARGET = "cldm.cldm.ControlNet"
_NUMBERS = (("max_steps", 1, None, True, False), ("learning_rate", 0, None, False, True),
            ("lr_warmup_steps", 0, None, True, False), ("weight_decay", 0, None, False, False),
            ("batch_size", 1, None, True, False), ("gradient_accumulation_steps", 1, None, True, False),
            ("max_grad_norm", 0, None, False, False), ("min_snr_gamma", 0, None, False, True),
            ("noise_offset", 0, None, False, False), ("seed", 0, None, True, False),
            ("resolution", 8, None, True, False), ("caption_dropout", 0, 1, False, False),
            ("num_workers", 0, None, True, False), ("checkpointing_steps", 1, None, True, False),
            ("checkpoints_total_limit", 1, None, True, False), ("validation_steps", 1, None, True, False),
            ("validation_seed", 0, None, True, False))


@dataclass(frozen=True)
class ControlNetSettings:
    """One ControlNet training run; the fields are ``ldm train-controlnet``'s options, checked
    when built (``ValueError`` naming the option)."""

    data: Path  # targets, hints and captions (see training.controlnet_data)
    output: Path  # the .safetensors file to write
    checkpoint: Path | None = None  # base model; None: the shipped default model
    config: Path | None = None
    max_steps: int = 1000
    learning_rate: float = 1e-5  # the paper's rate for SD-sized models
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    seed: int = 0
    resolution: int | None = None  # None: the model's
    caption_dropout: float = 0.5  # the paper replaces 50 % of prompts with the empty string
    cache_latents: bool = False
    latents_file: Path | None = None  # with cache_latents: kept here, reused when its count matches
    num_workers: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    checkpoints_dir: Path | None = None
    resume: str | None = None
    validation_prompt: tuple[str, ...] = ()
    validation_image: tuple[Path, ...] = ()  # one hint per prompt (or one for all)
    validation_steps: int = 100
    validation_seed: int = 0
    save_precision: str = "fp32"
    cpu: bool = False
    quiet: bool = False

    def __post_init__(self):
        as_paths(self, ("data", "output", "checkpoint", "config", "checkpoints_dir", "latents_file"))
        object.__setattr__(self, "validation_prompt", tuple(self.validation_prompt))
        object.__setattr__(self, "validation_image", tuple(Path(p) for p in self.validation_image))
        check_fields(self, _NUMBERS, (("lr_scheduler", LR_SCHEDULERS),
                                      ("mixed_precision", MIXED_PRECISIONS),
                                      ("save_precision", SAVE_PRECISIONS)))
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.output.suffix.lower() != ".safetensors":
            raise ValueError(f"--output must name a .safetensors file, got {str(self.output)!r}")
        if self.output.is_dir():
            raise ValueError(f"--output {self.output} is a folder; give a file name")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"argument --resolution: must be a multiple of 8, got {self.resolution}")
        if self.checkpoint is not None and not self.checkpoint.exists():
            raise ValueError(f"--checkpoint {self.checkpoint}: no such file or folder")
        if not all(t.strip() for t in self.validation_prompt):
            raise ValueError("--validation-prompt must not be empty")
        if self.validation_prompt and len(self.validation_image) not in (1, len(self.validation_prompt)):
            raise ValueError(f"--validation-image: give one hint, or one per --validation-prompt "
                             f"({len(self.validation_prompt)}), got {len(self.validation_image)}")
        missing = [str(p) for p in self.validation_image if not p.is_file()]
        if missing:
            raise ValueError(f"--validation-image {missing[0]}: no such file")


def output_paths(settings: ControlNetSettings) -> tuple[Path, Path, Path]:
    """(ControlNet file, states folder, validation folder)."""
    out = settings.output
    states = settings.checkpoints_dir or out.with_name(f"{out.stem}-checkpoints")
    return out, states, out.with_name(f"{out.stem}-validation")


# ------------------------------------------------------------------------------- the model parts

def init_controlnet(model, hint_channels: int = 3):
    """The ControlNet for ``model``'s UNet: its encoder's weights, zero convolutions zeroed."""
    from ldm.controlnet_config import ControlNetConfig
    from ldm.modules.controlnet import ControlNet

    unet = model.unet
    cfg = ControlNetConfig.from_unet(model.config.unet, hint_channels=hint_channels)
    net = ControlNet(cfg).to(next(unet.parameters()).device)
    net.copy_encoder_from(unet)
    net.reset_parameters()
    return net


class ControlledUNet(nn.Module):
    """What Accelerate wraps (and DDP synchronises): the ControlNet only. The frozen UNet is held
    outside the module tree, so states and gradient syncs carry the ControlNet alone."""

    def __init__(self, controlnet: nn.Module, wrapper: nn.Module):
        super().__init__()
        self.controlnet = controlnet
        self._frozen = (wrapper,)  # a tuple: not registered as a submodule

    def forward(self, x_t, t, context, hint):
        control = self.controlnet(x_t, hint, t, context)
        return self._frozen[0](x_t, t, context, control=control)


class ControlLoss:
    """Diffusion loss of one micro-batch: the frozen UNet's prediction with the residuals of the
    ControlNet for the batch's hints, against the ε or v target."""

    def __init__(self, model, settings: ControlNetSettings, device):
        self.model, self.device, self.noise_offset = model, device, settings.noise_offset
        self.diffusion = DiffusionLoss(model.alphas_cumprod, model.prediction, settings.min_snr_gamma)

    def __call__(self, module, batch: dict, gen: torch.Generator) -> torch.Tensor:
        model, device = self.model, self.device
        x_t, t, target = noised_batch(model, self.diffusion, batch, gen, device, self.noise_offset)
        with torch.no_grad():
            context = model.cond_stage_model(model.tokenize(batch["caption"]).to(device))
        pred = module(x_t, t, context, batch["hint"].to(device))
        return self.diffusion(pred, target, t)


# ------------------------------------------------------------------------------------- the file

def cldm_tree(model_config, net_config) -> dict:
    """The cldm YAML tree (base model + ``control_stage_config``) of a ControlNet for a model."""
    import dataclasses

    from ldm.config import config_tree

    tree = config_tree(model_config)
    params = {f.name: list(v) if isinstance(v := getattr(net_config, f.name), tuple) else v
              for f in dataclasses.fields(net_config)}
    if params.get("adm_in_channels"):  # SDXL: sgm's spelling of a UNet with label_emb
        params["num_classes"] = "sequential"
    tree["model"]["params"]["control_stage_config"] = {"target": CLDM_TARGET, "params": params}
    return tree


def save_controlnet(net: nn.Module, path, model_config, *, dtype=torch.float32,
                    metadata: dict[str, str] | None = None) -> None:
    """Write ``net`` in the original layout (bare keys), floats in ``dtype``, the cldm config tree
    as ``ldm_config`` and ``metadata`` in the header."""
    from ldm.checkpoint import CONFIG_METADATA_KEY
    from ldm.weights_io import write_safetensors

    meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(cldm_tree(model_config, net.config)),
            **(metadata or {})}
    state = {k: v.detach() for k, v in net.state_dict().items()}
    specs = {k: (dtype if v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in state.items()}
    write_safetensors(path, specs, lambda k: state[k].to("cpu", specs[k][0]).contiguous(), meta)


# ------------------------------------------------------------------------------------- the run

def _learning_rate(settings: ControlNetSettings):
    from .lora import learning_rate

    return learning_rate(settings)  # reads only the rate, schedule, warm-up and step fields


def _run_settings(settings: ControlNetSettings, states: Path) -> RunSettings:
    return RunSettings(
        name="train-controlnet", steps=settings.max_steps, batch_size=settings.batch_size,
        states=states, save_every=settings.checkpointing_steps, seed=settings.seed,
        keep=settings.checkpoints_total_limit, resume=settings.resume, resume_missing_ok=True,
        state_at_end=False, gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_grad_norm=settings.max_grad_norm, mixed_precision=settings.mixed_precision,
        cpu=settings.cpu, num_workers=settings.num_workers, quiet=settings.quiet,
        validate_every=settings.validation_steps if settings.validation_prompt else 0)


def _validator(model, net, settings: ControlNetSettings, folder: Path, device):
    """Draw the validation prompts with their hints through the pipeline's ControlUnit; the frozen
    weights are upcast for it (exact) and cast back afterwards."""
    frozen_dtype = weight_dtype(settings.mixed_precision)
    from PIL import Image

    hints = [Image.open(p).convert("RGB") for p in settings.validation_image]

    def validate(step: int) -> None:
        from pipelines.control import ControlUnit
        from pipelines.images import save_png
        from pipelines.pipeline import Pipeline

        pipe = Pipeline(model, device=device, dtype=torch.float32)
        folder.mkdir(parents=True, exist_ok=True)
        net.eval()
        for k, prompt in enumerate(settings.validation_prompt):
            unit = ControlUnit(model=net, image=hints[k % len(hints)])
            result = pipe.txt2img(prompt, control=[unit], seed=settings.validation_seed, progress=False)
            save_png(result.images[0], folder / f"step-{step:06d}-{k}.png", result.parameters[0])
        net.train()
        for part in (model.model, model.cond_stage_model):
            part.to(frozen_dtype)
    return validate


def _freeze(engine: Engine, model, settings: ControlNetSettings):
    """Freeze the base (UNet and text encoder in the mixed-precision dtype; the autoencoder stays
    float32, as LoRA training keeps it); the float32 ControlNet, alike on every process."""
    frozen_dtype = weight_dtype(settings.mixed_precision)
    model.requires_grad_(False)
    model.eval()
    model.to(engine.device)
    net = init_controlnet(model)  # copied from the float32 weights, before the cast
    for part in (model.model, model.cond_stage_model):
        part.to(frozen_dtype)
    if settings.gradient_checkpointing:
        net.set_gradient_checkpointing(True)
    return net


def _posteriors(data, model, engine: Engine, settings: ControlNetSettings):
    """(mean, std) of every target image, from ``settings.latents_file`` when it holds as many."""
    from safetensors.torch import load_file, save_file

    from .controlnet_data import encode_all

    path = settings.latents_file
    if path is not None and path.is_file():
        cached = load_file(str(path))
        if len(cached["mean"]) == len(data):
            return cached["mean"], cached["std"]
    progress = engine.accelerator.is_local_main_process and not settings.quiet
    mean, std = encode_all(data, model.first_stage_model, engine.device, progress=progress)
    if path is not None and engine.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"mean": mean, "std": std}, str(path))
    return mean, std


def train(settings: ControlNetSettings, model=None) -> Summary:
    """Train a ControlNet for the base model (``model``, else ``settings.checkpoint`` or the
    shipped model) and write ``settings.output``."""
    from .controlnet_data import ControlPairs, collate, scan_control_folder
    from .lora import load_base_model

    examples = scan_control_folder(settings.data)  # 1. inputs, before anything heavy
    out, states, validation = output_paths(settings)
    engine = Engine(_run_settings(settings, states))
    if model is None:  # 2. base model and the trainable copy
        model, _ = load_base_model(settings.checkpoint, settings.config)
    downscale = model.config.autoencoder.downscale
    resolution = settings.resolution or model.config.default_image_size
    if resolution % downscale:
        raise TrainingError(f"--resolution {resolution}: must be a multiple of {downscale} for this model")
    if model.config.is_inpainting:
        raise TrainingError("an inpainting base model; ControlNet training takes text-to-image models")
    if model.config.is_sdxl:  # SDXL ControlNets load and generate; training needs y per batch
        raise TrainingError("an SDXL base model; ControlNet training takes SD1/SD2 models for now")
    engine.seed()
    net = _freeze(engine, model, settings)
    data = ControlPairs(examples, resolution, resolution // downscale * 8, settings.caption_dropout,
                        settings.seed)  # 3. data (the hint at 8× the latent size)
    if settings.cache_latents:
        data.posteriors = _posteriors(data, model, engine, settings)
    facts = {"seed": settings.seed, "batch_size": settings.batch_size,
             "processes": engine.accelerator.num_processes, "resolution": resolution,
             "gradient_accumulation_steps": settings.gradient_accumulation_steps}
    task = Task(module=ControlledUNet(net, model.model), parameters=list(net.parameters()),
                loss=ControlLoss(model, settings, engine.device), dataset=data, collate=collate,
                shuffle=True, schedule=Schedule(_learning_rate(settings)),
                weight_decay=settings.weight_decay, randomness=PerStep, facts=facts,
                checked_facts=("resolution",),
                validate=_validator(model, net, settings, validation, engine.device)
                if settings.validation_prompt else None)
    summary = engine.fit(task)
    engine.accelerator.wait_for_everyone()  # 4. the file
    if engine.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_controlnet(net, out, model.config, dtype=weight_dtype(settings.save_precision),
                        metadata={"steps": str(summary.step), "resolution": str(resolution),
                                  "learning_rate": str(settings.learning_rate),
                                  "caption_dropout": str(settings.caption_dropout),
                                  "processes": str(engine.accelerator.num_processes),
                                  "examples": str(len(examples))})
        print(f"{summary}; wrote {out}")
    engine.accelerator.end_training()
    return summary
