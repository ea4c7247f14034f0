"""The LoRA trainer: fine-tune a LoRA on a folder of captioned images (what ``ldm train-lora`` runs),
on :mod:`training.engine` with the diffusion loss of :mod:`training.loss`.

The frozen base model (UNet and text encoder in the mixed-precision dtype) gets a float32 adapter;
states hold only the adapter, the optimizer and the step (the base is on disk). All randomness of
micro-batch ``m`` on process ``p`` (posterior sample, noise, noise offset, timesteps) comes from a
generator seeded by (seed, m, p), and the data stream is a function of the position in it
(:mod:`training.data`), so a resumed run continues exactly as the uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


from .engine import Engine, PerStep, RunSettings, Schedule, Summary, Task, TrainingError, weight_dtype
from .settings import as_paths, check_fields
from .loss import DiffusionLoss, noised_batch

ADAPTER = "default"
ADAPTER_FILE = "lora.safetensors"
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut")  # the ``conv`` preset: resnet convolutions (LoCon)
# (field, low, high, integer, strict_low) of every number setting
_NUMBERS = (("rank", 1, None, True, False), ("alpha", 0, None, False, True),
            ("max_steps", 1, None, True, False), ("learning_rate", 0, None, False, True),
            ("lr_warmup_steps", 0, None, True, False), ("weight_decay", 0, None, False, False),
            ("batch_size", 1, None, True, False), ("gradient_accumulation_steps", 1, None, True, False),
            ("max_grad_norm", 0, None, False, False), ("min_snr_gamma", 0, None, False, True),
            ("noise_offset", 0, None, False, False), ("seed", 0, None, True, False),
            ("resolution", 8, None, True, False), ("prior_loss_weight", 0, None, False, False),
            ("caption_dropout", 0, 1, False, False), ("num_workers", 0, None, True, False),
            ("checkpointing_steps", 1, None, True, False), ("checkpoints_total_limit", 1, None, True, False),
            ("validation_steps", 1, None, True, False), ("validation_seed", 0, None, True, False))


@dataclass(frozen=True)
class LoraSettings:
    """One LoRA training run; the fields are ``ldm train-lora``'s options. Checked when built
    (``ValueError`` naming the option)."""

    data: Path  # images with captions (name.png + name.txt, or a metadata.jsonl)
    output: Path  # the .safetensors file to write
    # base model
    checkpoint: Path | None = None  # None: the shipped default model
    config: Path | None = None
    # adapter
    rank: int = 4
    alpha: float | None = None  # None: the rank
    targets: tuple[str, ...] = ("attention",)
    train_text_encoder: bool | str = False  # SDXL: "te1" or "te2" for one of its towers
    # optimisation
    max_steps: int = 1000
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    seed: int = 0
    # data
    resolution: int | None = None  # None: the model's
    reg_data: Path | None = None
    prior_loss_weight: float = 1.0
    caption_dropout: float = 0.0
    flip: bool = False
    random_crop: bool = False
    cache_latents: bool = False
    num_workers: int = 0
    # states and validation
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    checkpoints_dir: Path | None = None
    resume: str | None = None  # "latest" or a state folder
    validation_prompt: tuple[str, ...] = ()
    validation_steps: int = 100
    validation_seed: int = 0
    save_precision: str = "fp32"
    cpu: bool = False
    quiet: bool = False

    def __post_init__(self):
        as_paths(self, ("data", "output", "checkpoint", "config", "reg_data", "checkpoints_dir"))
        for name in ("targets", "validation_prompt"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
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
        if self.cache_latents and self.random_crop:
            raise ValueError("--cache-latents needs fixed crops; drop --random-crop or the cache")
        if self.checkpoint is not None and not self.checkpoint.exists():
            raise ValueError(f"--checkpoint {self.checkpoint}: no such file or folder")
        if not all(t.strip() for t in self.validation_prompt):
            raise ValueError("--validation-prompt must not be empty")
        if self.reg_data and self.reg_data.resolve() == self.data.resolve():
            raise ValueError("--reg-data must be another folder than --data")
        resolve_targets(self.targets, self.train_text_encoder)


def resolve_targets(targets, train_text_encoder: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(UNet layer names, text-encoder layer names) from target presets or layer names."""
    from ldm.lora import TARGET_PRESETS

    presets = dict(TARGET_PRESETS, conv=CONV_TARGETS)
    unet: list[str] = []
    text: list[str] = []
    for item in targets:
        names = presets.get(item, (item,))
        (text if item.startswith("text-") else unet).extend(names)
    if text and not train_text_encoder:
        raise ValueError("text-encoder targets need --train-text-encoder")
    if train_text_encoder and not text:
        text = list(TARGET_PRESETS["text-attention"])
    return tuple(dict.fromkeys(unet)), tuple(dict.fromkeys(text))


def output_paths(settings: LoraSettings) -> tuple[Path, Path, Path]:
    """(LoRA file, states folder, validation folder)."""
    out = settings.output
    states = settings.checkpoints_dir or out.with_name(f"{out.stem}-checkpoints")
    return out, states, out.with_name(f"{out.stem}-validation")


def model_name(settings: LoraSettings) -> str:
    return settings.checkpoint.stem if settings.checkpoint else "tiny-shapes"


def load_base_model(checkpoint: Path | None, config: Path | None):
    """The model to adapt: ``checkpoint``, or the shipped default model."""
    from ldm.checkpoint import load_model

    path = checkpoint
    if path is None:
        from pipelines.pipeline import default_model

        path, config = default_model(config)
    model = load_model(path, config, dtype=torch.float32, device="cpu")
    if model.config.is_inpainting:
        raise TrainingError(f"{path}: an inpainting model; LoRA training takes text-to-image models")
    return model, Path(path)


class Denoiser(nn.Module):
    """What Accelerate wraps (and DDP synchronises): the UNet, and the text encoder when it trains."""

    def __init__(self, model):
        super().__init__()
        self.wrapper = model.model
        self.text = model.cond_stage_model

    def forward(self, x_t, t, tokens=None, context=None):
        if context is None:
            context = self.text(tokens)
        return self.wrapper(x_t, t, context)


class LoraLoss:
    """Diffusion loss of one micro-batch of images (or cached posteriors) with their captions."""

    def __init__(self, model, settings: LoraSettings, device, train_text: bool):
        self.model, self.device, self.train_text = model, device, train_text
        self.noise_offset = settings.noise_offset
        self.diffusion = DiffusionLoss(model.alphas_cumprod, model.prediction, settings.min_snr_gamma)

    def __call__(self, denoiser, batch: dict, gen: torch.Generator) -> torch.Tensor:
        model, device = self.model, self.device
        x_t, t, target = noised_batch(model, self.diffusion, batch, gen, device, self.noise_offset)
        with torch.no_grad():
            tokens = model.tokenize(batch["caption"]).to(device)
            context = None if self.train_text else model.cond_stage_model(tokens)
        pred = denoiser(x_t, t, tokens=tokens if self.train_text else None, context=context)
        weight = batch["weight"].to(device) if "weight" in batch else None  # --prior-loss-weight
        return self.diffusion(pred, target, t, weight)


def learning_rate(settings: LoraSettings):
    """The rate of optimizer step k: the peak rate times diffusers' schedule factor (the factor
    function of the ``LambdaLR`` diffusers builds, so the rates are exactly diffusers')."""
    from diffusers.optimization import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=settings.learning_rate)
    factor = get_scheduler(settings.lr_scheduler, dummy, num_warmup_steps=settings.lr_warmup_steps,
                           num_training_steps=settings.max_steps).lr_lambdas[0]
    peak = settings.learning_rate
    return lambda step: peak * factor(step)


# ----------------------------------------------------------------------------------- the run

def _examples(settings: LoraSettings):
    """(training and regularisation examples, how many are training examples)."""
    from training.data import scan_folder

    examples = scan_folder(settings.data)
    n_train = len(examples)
    if settings.reg_data:
        examples += [dataclasses.replace(ex, weight=settings.prior_loss_weight)
                     for ex in scan_folder(settings.reg_data)]
    return examples, n_train


def _dataset(settings: LoraSettings, examples, model, resolution: int, engine: Engine):
    from training.data import Augment, CachedLatents, ImageCaptions, encode_posteriors

    source = ImageCaptions(examples, Augment(resolution, settings.random_crop, settings.flip,
                                             settings.caption_dropout, settings.seed))
    if not settings.cache_latents:
        return source
    progress = engine.accelerator.is_local_main_process and not settings.quiet
    mean, std = encode_posteriors(source, model.first_stage_model, engine.device, progress=progress)
    return CachedLatents(source, mean, std)


def _validator(model, params, settings: LoraSettings, folder: Path, device):
    """Draw the validation prompts with a fixed seed. The pipeline runs in float32 (an upcast of the
    frozen half-precision weights is exact, so is casting them back); the LoRA tensors the
    optimizer holds are put back untouched."""
    frozen_dtype = weight_dtype(settings.mixed_precision)

    def validate(step: int) -> None:
        from pipelines.images import save_png
        from pipelines.pipeline import Pipeline

        kept = [(p, p.data) for p in params]
        pipe = Pipeline(model, device=device, dtype=torch.float32)
        folder.mkdir(parents=True, exist_ok=True)
        for k, prompt in enumerate(settings.validation_prompt):
            result = pipe.txt2img(prompt, seed=settings.validation_seed, progress=False)
            params_k = dict(result.parameters[0], model=model_name(settings))
            save_png(result.images[0], folder / f"step-{step:06d}-{k}.png", params_k)
        model.model.to(frozen_dtype)
        model.text_encoder.to(frozen_dtype)
        for p, data in kept:
            p.data = data
            p.requires_grad_(True)
        model.model.train()
        model.text_encoder.train()
    return validate


def _run_settings(settings: LoraSettings, states: Path) -> RunSettings:
    return RunSettings(
        name="train-lora", steps=settings.max_steps, batch_size=settings.batch_size, states=states,
        save_every=settings.checkpointing_steps, seed=settings.seed,
        keep=settings.checkpoints_total_limit, resume=settings.resume, resume_missing_ok=True,
        state_at_end=False, gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_grad_norm=settings.max_grad_norm, mixed_precision=settings.mixed_precision,
        cpu=settings.cpu, num_workers=settings.num_workers, quiet=settings.quiet,
        validate_every=settings.validation_steps if settings.validation_prompt else 0)


def _adapt(engine: Engine, model, settings: LoraSettings, unet_targets, text_targets) -> list:
    """Freeze the base (UNet and text encoder in the mixed-precision dtype) and add the float32
    adapter, initialised alike on every process; returns its parameters."""
    from ldm.lora import add_lora, lora_parameters
    from .lora_sdxl import text_components

    frozen_dtype = weight_dtype(settings.mixed_precision)
    model.requires_grad_(False)
    model.to(engine.device)
    model.model.to(frozen_dtype)
    model.text_encoder.to(frozen_dtype)
    engine.seed()
    add_lora(model, ADAPTER, rank=settings.rank, alpha=settings.alpha, targets=unet_targets,
             text_targets=text_targets, dtype=torch.float32,
             text_components=text_components(model, settings.train_text_encoder))
    if settings.gradient_checkpointing:
        model.unet.set_gradient_checkpointing(True)
    return lora_parameters(model, ADAPTER)


def _task(engine: Engine, model, settings: LoraSettings, targets, params, dataset, folder) -> Task:
    from ldm.lora import save_lora, set_lora_weights
    from ldm.lora_formats import read_lora
    from training.data import collate

    unet_targets, text_targets = targets
    facts = {"rank": settings.rank,
             "alpha": settings.alpha if settings.alpha is not None else settings.rank,
             "unet_targets": list(unet_targets), "text_targets": list(text_targets),
             "seed": settings.seed, "batch_size": settings.batch_size,
             "processes": engine.accelerator.num_processes,
             "gradient_accumulation_steps": settings.gradient_accumulation_steps}
    if model.config.is_sdxl:  # two towers and the vector conditioning: training/lora_sdxl.py
        from .lora_sdxl import sdxl_parts

        module, loss = sdxl_parts(model, settings, engine.device, bool(text_targets))
    else:
        module, loss = Denoiser(model), LoraLoss(model, settings, engine.device, bool(text_targets))
    return Task(
        module=module, parameters=params, dataset=dataset, collate=collate, shuffle=True, loss=loss,
        schedule=Schedule(learning_rate(settings)), weight_decay=settings.weight_decay,
        randomness=PerStep, facts=facts, checked_facts=("rank", "alpha", "unet_targets", "text_targets"),
        save_weights=lambda folder: save_lora(model, folder / ADAPTER_FILE, ADAPTER),
        load_weights=lambda folder: set_lora_weights(model, ADAPTER,
                                                     read_lora(folder / ADAPTER_FILE, model)),
        validate=_validator(model, params, settings, folder, engine.device)
        if settings.validation_prompt else None)


def train(settings: LoraSettings) -> Summary:
    """Train the adapter and write ``settings.output`` (a kohya-format LoRA file)."""
    targets = resolve_targets(settings.targets, settings.train_text_encoder)
    examples, n_train = _examples(settings)  # 1. inputs, before anything heavy
    out, states, validation = output_paths(settings)
    engine = Engine(_run_settings(settings, states))
    model, base_path = load_base_model(settings.checkpoint, settings.config)  # 2. base + adapter
    resolution = settings.resolution or model.config.default_image_size
    if resolution % model.config.autoencoder.downscale:
        raise TrainingError(f"--resolution {resolution}: must be a multiple of "
                            f"{model.config.autoencoder.downscale} for this model")
    params = _adapt(engine, model, settings, *targets)
    dataset = _dataset(settings, examples, model, resolution, engine)  # 3. data, then the run
    summary = engine.fit(_task(engine, model, settings, targets, params, dataset, validation))
    engine.accelerator.wait_for_everyone()  # 4. the file
    if engine.is_main:
        from ldm.lora import save_lora

        out.parent.mkdir(parents=True, exist_ok=True)
        save_lora(model, out, ADAPTER, dtype=weight_dtype(settings.save_precision), steps=summary.step,
                  resolution=resolution, base_model_path=base_path,
                  extra=_file_facts(settings, engine, targets, n_train, len(examples) - n_train))
        print(f"{summary}; wrote {out}")
    engine.accelerator.end_training()
    return summary


def _file_facts(settings: LoraSettings, engine: Engine, targets, n_train: int, n_reg: int) -> dict:
    """The run's settings in the file's metadata (kohya's ``ss_`` names where they exist)."""
    return {"learning_rate": settings.learning_rate, "batch_size": settings.batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
            "processes": engine.accelerator.num_processes, "targets": ",".join(targets[0] + targets[1]),
            "ss_learning_rate": settings.learning_rate, "ss_num_train_images": n_train,
            "ss_num_reg_images": n_reg, "ss_prior_loss_weight": settings.prior_loss_weight}
