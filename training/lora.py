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
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


from .engine import Engine, PerStep, RunSettings, Schedule, Summary, Task, TrainingError, weight_dtype
from .settings import as_paths, check_fields
from .loss import DiffusionLoss, noised_batch

ADAPTER = "default"
ADAPTER_FILE = "lora.safetensors"
EMBEDDING_LR = 1e-2  # pivotal tuning's word rate unless --embedding-lr (benchmarks/RESULTS.md)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut")  # the ``conv`` preset: resnet convolutions (LoCon)
# (field, low, high, integer, strict_low) of every number setting
_NUMBERS = (("rank", 1, None, True, False), ("alpha", 0, None, False, True),
            ("max_steps", 1, None, True, False), ("learning_rate", 0, None, False, True),
            ("lr_warmup_steps", 0, None, True, False), ("lr_num_cycles", 1, None, True, False),
            ("text_encoder_lr", 0, None, False, True), ("embedding_lr", 0, None, False, True),
            ("vectors", 1, None, True, False), ("num_class_images", 1, None, True, False),
            ("keep_tokens", 0, None, True, False), ("weight_decay", 0, None, False, False),
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
    # pivotal tuning: new vectors for this caption word, trained with the LoRA
    token: str | None = None
    init_word: str | None = None  # None: the token's own rows
    vectors: int = 4
    # optimisation
    max_steps: int = 1000
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1  # cosine_with_restarts: hard restarts
    text_encoder_lr: float | None = None  # None: --learning-rate
    embedding_lr: float | None = None  # None: EMBEDDING_LR
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
    class_prompt: tuple[str, ...] = ()  # DreamBooth class images drawn by the base model
    class_word: str | None = None  # ... or for the training captions with --token → this word
    num_class_images: int = 100
    class_data: Path | None = None  # None: <output>-class-images
    caption_dropout: float = 0.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
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
        as_paths(self, ("data", "output", "checkpoint", "config", "reg_data", "checkpoints_dir",
                        "class_data"))
        for name in ("targets", "validation_prompt", "class_prompt"):
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
        if self.reg_data and (self.class_prompt or self.class_word):
            raise ValueError("--class-prompt/--class-word draw the regularisation images; drop "
                             "--reg-data or them")
        if self.class_prompt and self.class_word:
            raise ValueError("give --class-prompt or --class-word, not both")
        if self.class_word is not None and (self.token is None or not self.class_word.strip()):
            raise ValueError("--class-word needs --token (the word it stands in for) and a word")
        if not all(t.strip() for t in self.class_prompt):
            raise ValueError("--class-prompt must not be empty")
        if self.token is not None and not self.token.strip():
            raise ValueError("--token must not be empty")
        if self.init_word is not None and self.token is None:
            raise ValueError("--init-word needs --token (the word whose vectors it starts)")
        if self.embedding_lr is not None and self.token is None:
            raise ValueError("--embedding-lr needs --token")
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            raise ValueError("--text-encoder-lr needs --train-text-encoder")
        if self.keep_tokens and not self.shuffle_caption:
            raise ValueError("--keep-tokens needs --shuffle-caption")
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
    """What Accelerate wraps (and DDP synchronises): the UNet, the text encoder when it trains, and
    the concept word's vectors under pivotal tuning."""

    def __init__(self, model, vectors: torch.Tensor | None = None):
        super().__init__()
        self.wrapper = model.model
        self.text = model.text_encoder
        self.vectors = nn.Parameter(vectors.float()) if vectors is not None else None

    def forward(self, x_t, t, tokens=None, context=None, mask=None, rows=None):
        if context is None and self.vectors is not None:  # the word's positions take its vectors
            from ldm.embeddings import overridden

            with overridden(self.text, mask, self.vectors[rows]):
                context = self.text(tokens)
            context = context.reshape(x_t.shape[0], -1, context.shape[-1])
        elif context is None:
            context = self.text(tokens)
        return self.wrapper(x_t, t, context)


class LoraLoss:
    """Diffusion loss of one micro-batch of images (or cached posteriors) with their captions."""

    def __init__(self, model, settings: LoraSettings, device, train_text: bool, pivot=None):
        self.model, self.device, self.train_text, self.pivot = model, device, train_text, pivot
        self.noise_offset = settings.noise_offset
        self.diffusion = DiffusionLoss(model.alphas_cumprod, model.prediction, settings.min_snr_gamma)

    def __call__(self, denoiser, batch: dict, gen: torch.Generator) -> torch.Tensor:
        model, device = self.model, self.device
        x_t, t, target = noised_batch(model, self.diffusion, batch, gen, device, self.noise_offset)
        if self.pivot is not None:
            tokens, mask, rows = (v.to(device) for v in self.pivot.inputs(batch["caption"]))
            pred = denoiser(x_t, t, tokens=tokens, mask=mask, rows=rows)
            weight = batch["weight"].to(device) if "weight" in batch else None
            return self.diffusion(pred, target, t, weight)
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
    cycles = {"num_cycles": settings.lr_num_cycles} if settings.lr_scheduler == "cosine_with_restarts" \
        else {}
    factor = get_scheduler(settings.lr_scheduler, dummy, num_warmup_steps=settings.lr_warmup_steps,
                           num_training_steps=settings.max_steps, **cycles).lr_lambdas[0]
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
                                             settings.caption_dropout, settings.seed,
                                             settings.shuffle_caption, settings.keep_tokens))
    if not settings.cache_latents:
        return source
    progress = engine.accelerator.is_local_main_process and not settings.quiet
    mean, std = encode_posteriors(source, model.first_stage_model, engine.device, progress=progress)
    return CachedLatents(source, mean, std)


def _validator(model, params, settings: LoraSettings, folder: Path, device, vectors=None):
    """Draw the validation prompts with a fixed seed. The pipeline runs in float32 (an upcast of the
    frozen half-precision weights is exact, so is casting them back); the LoRA tensors the
    optimizer holds are put back untouched."""
    frozen_dtype = weight_dtype(settings.mixed_precision)

    def validate(step: int) -> None:
        from pipelines.images import save_png
        from pipelines.pipeline import Pipeline

        kept = [(p, p.data) for p in params]
        pipe = Pipeline(model, device=device, dtype=torch.float32)
        if vectors is not None:  # pivotal tuning: the word holds the current vectors
            from ldm.embeddings import TextualInversion

            pipe.embeddings[settings.token] = TextualInversion(
                settings.token, vectors.detach().float().cpu().clone())
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


def _parameters(model, params: list, settings: LoraSettings, denoiser: Denoiser):
    """(what the optimizer trains, its rate groups): the UNet's and text encoder's LoRA weights,
    then the word's vectors; ``--text-encoder-lr`` / ``--embedding-lr`` as factors of the rate."""
    groups = []
    if settings.text_encoder_lr is not None:
        text = {id(p) for p in model.text_encoder.parameters()}
        unet_params = [p for p in params if id(p) not in text]
        params = unet_params + [p for p in params if id(p) in text]
        groups.append((len(unet_params), settings.text_encoder_lr / settings.learning_rate))
    if denoiser.vectors is not None:
        rate = settings.embedding_lr if settings.embedding_lr is not None else EMBEDDING_LR
        groups.append((len(params), rate / settings.learning_rate))
        params = params + [denoiser.vectors]
    return params, tuple(groups)


def _task(engine: Engine, model, settings: LoraSettings, targets, params, dataset, folder,
          denoiser: Denoiser, pivot=None) -> Task:
    from ldm.lora import save_lora, set_lora_weights
    from ldm.lora_formats import read_lora
    from training import pivotal
    from training.data import collate

    def save(state: Path) -> None:
        save_lora(model, state / ADAPTER_FILE, ADAPTER)
        if denoiser.vectors is not None:
            pivotal.save_vectors(state / pivotal.STATE_FILE, settings.token, denoiser.vectors)

    def load(state: Path) -> None:
        set_lora_weights(model, ADAPTER, read_lora(state / ADAPTER_FILE, model))
        if denoiser.vectors is not None:
            pivotal.load_vectors(state / pivotal.STATE_FILE, denoiser.vectors)

    unet_targets, text_targets = targets
    facts = {"rank": settings.rank,
             "alpha": settings.alpha if settings.alpha is not None else settings.rank,
             "unet_targets": list(unet_targets), "text_targets": list(text_targets),
             "seed": settings.seed, "batch_size": settings.batch_size,
             "processes": engine.accelerator.num_processes,
             "gradient_accumulation_steps": settings.gradient_accumulation_steps}
    checked = ("rank", "alpha", "unet_targets", "text_targets")
    if pivot is not None:
        facts.update(token=settings.token, vectors=settings.vectors)
        checked += ("token", "vectors")
    if model.config.is_sdxl:  # two towers and the vector conditioning: training/lora_sdxl.py
        from .lora_sdxl import sdxl_parts

        module, loss = sdxl_parts(model, settings, engine.device, bool(text_targets))
    else:
        module, loss = denoiser, LoraLoss(model, settings, engine.device, bool(text_targets), pivot)
    trained, groups = _parameters(model, params, settings, denoiser)
    return Task(
        module=module, parameters=trained, rate_groups=groups, dataset=dataset, collate=collate,
        shuffle=True, loss=loss,
        schedule=Schedule(learning_rate(settings)), weight_decay=settings.weight_decay,
        randomness=PerStep, facts=facts, checked_facts=checked, save_weights=save, load_weights=load,
        validate=_validator(model, params, settings, folder, engine.device, denoiser.vectors)
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
    examples += _class_examples(settings, engine, model, examples)
    pivot = None
    if settings.token is not None and model.config.is_sdxl:
        raise TrainingError(f"{base_path}: --token (pivotal tuning) takes one-tower models; this is SDXL")
    if settings.token is not None:  # pivotal tuning: the word in every training caption
        from training.pivotal import Pivot

        note = (lambda m: print(m, file=sys.stderr)) if engine.is_main else (lambda m: None)
        pivot = Pivot(model, settings.token, settings.init_word, settings.vectors, note=note)
        examples = pivot.captions(examples[:n_train]) + examples[n_train:]
    params = _adapt(engine, model, settings, *targets)
    denoiser = Denoiser(model, pivot.initial.to(engine.device) if pivot else None)
    dataset = _dataset(settings, examples, model, resolution, engine)  # 3. data, then the run
    summary = engine.fit(_task(engine, model, settings, targets, params, dataset, validation,
                               denoiser, pivot))
    engine.accelerator.wait_for_everyone()  # 4. the files
    if engine.is_main:
        _write(settings, engine, model, denoiser, summary, resolution, base_path, targets,
               n_train, len(examples) - n_train)
    engine.accelerator.end_training()
    return summary


def _class_examples(settings: LoraSettings, engine: Engine, model, examples) -> list:
    """DreamBooth class images for ``--class-prompt`` (or the training captions with the token
    replaced by ``--class-word``), drawn now by the unadapted base model."""
    if not settings.class_prompt and not settings.class_word:
        return []
    from training import class_images

    prompts = settings.class_prompt or class_images.prompts_from_captions(
        [ex.caption for ex in examples], settings.token, settings.class_word)

    folder = settings.class_data or settings.output.with_name(f"{settings.output.stem}-class-images")
    if engine.is_main:
        drawn = class_images.fill(folder, model, prompts, settings.num_class_images,
                                  engine.device, progress=not settings.quiet)
        if drawn and not settings.quiet:
            print(f"drew {drawn} class images into {folder}")
    engine.accelerator.wait_for_everyone()
    return class_images.examples(folder, prompts, settings.num_class_images, settings.prior_loss_weight)


def _write(settings: LoraSettings, engine: Engine, model, denoiser: Denoiser, summary, resolution,
           base_path, targets, n_train: int, n_reg: int) -> None:
    """The LoRA file, and under pivotal tuning the embedding beside it."""
    from ldm.lora import save_lora
    from training import pivotal

    out = settings.output
    out.parent.mkdir(parents=True, exist_ok=True)
    header = pivotal.header(out, settings.token) if denoiser.vectors is not None else None
    save_lora(model, out, ADAPTER, dtype=weight_dtype(settings.save_precision), steps=summary.step,
              resolution=resolution, base_model_path=base_path, metadata=header,
              extra=_file_facts(settings, engine, targets, n_train, n_reg))
    wrote = str(out)
    if denoiser.vectors is not None:
        pivotal.save_vectors(pivotal.embedding_path(out), settings.token, denoiser.vectors,
                             step=summary.step)
        wrote += f" and {pivotal.embedding_path(out)}"
    print(f"{summary}; wrote {wrote}")


def _file_facts(settings: LoraSettings, engine: Engine, targets, n_train: int, n_reg: int) -> dict:
    """The run's settings in the file's metadata (kohya's ``ss_`` names where they exist)."""
    return {"learning_rate": settings.learning_rate, "batch_size": settings.batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
            "processes": engine.accelerator.num_processes, "targets": ",".join(targets[0] + targets[1]),
            "ss_learning_rate": settings.learning_rate, "ss_num_train_images": n_train,
            "ss_num_reg_images": n_reg, "ss_prior_loss_weight": settings.prior_loss_weight}
