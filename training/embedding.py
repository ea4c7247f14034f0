"""The textual-inversion trainer (Gal et al. 2022, "An Image is Worth One Word"): learn the vectors of
a new prompt word from a folder of captioned images (what ``ldm train-embedding`` runs), on
:mod:`training.engine` with the diffusion loss of :mod:`training.loss`.

The whole base model is frozen; the only trainable tensor is the word's ``(N, width)`` vectors. They
enter the text encoder as at inference: the caption is tokenised by :func:`pipelines.prompts.
tokenize_prompt` with the word as an embedding, and :func:`ldm.embeddings.overridden` puts the
vectors at its positions, so gradients reach only them. The vectors start as the init word's token
rows, spread over N as A1111's ``create_embedding`` does: row i copies token ``i·T // N`` of the
init word's first N tokens (one token repeated N times; more tokens than N: the first N).

Captions: the token word as it appears in the caption files; ``[name]`` is replaced by it (A1111's
template placeholder), and a caption that lacks the word gets ``"NAME, "`` in front, so every image
teaches it. All randomness of micro-batch ``m`` on process ``p`` comes from a generator seeded by
(seed, m, p) and the data stream is a function of its position, so a resumed run continues exactly
as the uninterrupted one. The output is an A1111 embedding file (``.safetensors`` with
``emb_params``, or ``.pt`` with ``string_to_param``), which ``ldm``, A1111 and diffusers'
``load_textual_inversion`` read.
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
from .lora import Denoiser
from .words import (NAME_PLACEHOLDER, _row_numbers, check_token, contains_word,  # noqa: F401
                    init_vectors, token_inputs, with_word)

STATE_FILE = "embedding.safetensors"  # the vectors inside a training state
OUTPUT_SUFFIXES = (".safetensors", ".pt")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
_NUMBERS = (("vectors", 1, None, True, False), ("max_steps", 1, None, True, False),
            ("learning_rate", 0, None, False, True), ("lr_warmup_steps", 0, None, True, False),
            ("weight_decay", 0, None, False, False), ("batch_size", 1, None, True, False),
            ("gradient_accumulation_steps", 1, None, True, False), ("max_grad_norm", 0, None, False, False),
            ("seed", 0, None, True, False), ("resolution", 8, None, True, False),
            ("num_workers", 0, None, True, False), ("checkpointing_steps", 1, None, True, False),
            ("checkpoints_total_limit", 1, None, True, False), ("validation_steps", 1, None, True, False),
            ("validation_seed", 0, None, True, False))


@dataclass(frozen=True)
class EmbeddingSettings:
    """One textual-inversion run; the fields are ``ldm train-embedding``'s options. Checked when
    built (``ValueError`` naming the option)."""

    data: Path  # images with captions (name.png + name.txt, or a metadata.jsonl)
    token: str  # the new prompt word
    init_word: str  # its vectors start as this word's token rows
    output: Path  # .safetensors (emb_params) or .pt (string_to_param)
    vectors: int = 1  # vectors per token
    checkpoint: Path | None = None  # None: the shipped default model
    config: Path | None = None
    # optimisation (A1111's defaults: AdamW at 5e-3, no weight decay, no clipping)
    max_steps: int = 1000
    learning_rate: float = 5e-3
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0
    mixed_precision: str = "no"
    seed: int = 0
    # data
    resolution: int | None = None  # None: the model's
    flip: bool = False
    template: Path | None = None  # A1111 prompt template: [name] and [filewords] lines
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
    cpu: bool = False
    quiet: bool = False

    def __post_init__(self):
        as_paths(self, ("data", "output", "checkpoint", "config", "checkpoints_dir", "template"))
        object.__setattr__(self, "validation_prompt", tuple(self.validation_prompt))
        object.__setattr__(self, "token", str(self.token).strip())
        object.__setattr__(self, "init_word", str(self.init_word).strip())
        check_fields(self, _NUMBERS, (("lr_scheduler", LR_SCHEDULERS), ("mixed_precision", MIXED_PRECISIONS)))
        if not self.token:
            raise ValueError("--token must not be empty")
        if not self.init_word:
            raise ValueError("--init-word must not be empty")
        if self.output.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"--output must name a .safetensors or .pt file, got {str(self.output)!r}")
        if self.output.is_dir():
            raise ValueError(f"--output {self.output} is a folder; give a file name")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"argument --resolution: must be a multiple of 8, got {self.resolution}")
        if self.checkpoint is not None and not self.checkpoint.exists():
            raise ValueError(f"--checkpoint {self.checkpoint}: no such file or folder")
        if not all(t.strip() for t in self.validation_prompt):
            raise ValueError("--validation-prompt must not be empty")


def output_paths(settings: EmbeddingSettings) -> tuple[Path, Path, Path]:
    """(embedding file, states folder, validation folder)."""
    out = settings.output
    states = settings.checkpoints_dir or out.with_name(f"{out.stem}-checkpoints")
    return out, states, out.with_name(f"{out.stem}-validation")


# ----------------------------------------------------------------------------------- the loss

class Inversion(Denoiser):
    """What Accelerate wraps (and DDP synchronises): the learned vectors, with the frozen text
    encoder and UNet they pass through (the LoRA trainer's pivotal-tuning module, no adapter)."""

    def forward(self, x_t, t, ids, mask, rows):
        """``ids`` (B·k, 77): k chunk rows per caption; ``mask`` marks the word's positions and
        ``rows`` the learned row for each of them, in row-major order."""
        return super().forward(x_t, t, tokens=ids, mask=mask, rows=rows)


class InversionLoss:
    """Diffusion loss of one micro-batch of images (or cached posteriors) with their captions."""

    def __init__(self, model, settings: EmbeddingSettings, device):
        from ldm.modules.tokenizer import tokenizer_for

        self.model, self.device = model, device
        self.tokenizer = tokenizer_for(model.config.text)
        self.words = _row_numbers(settings.token, settings.vectors)
        self.diffusion = DiffusionLoss(model.alphas_cumprod, model.prediction)

    def token_inputs(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return token_inputs(self.model.config.text, self.tokenizer, self.words, captions)

    def __call__(self, inversion, batch: dict, gen: torch.Generator) -> torch.Tensor:
        model, device = self.model, self.device
        x_t, t, target = noised_batch(model, self.diffusion, batch, gen, device)
        with torch.no_grad():
            ids, mask, rows = self.token_inputs(batch["caption"])
        pred = inversion(x_t, t, ids.to(device), mask.to(device), rows.to(device))
        return self.diffusion(pred, target, t)


# ----------------------------------------------------------------------------------- the run

def _dataset(settings: EmbeddingSettings, examples, model, resolution: int, engine: Engine):
    from training.data import Augment, CachedLatents, ImageCaptions, encode_posteriors

    templates = ()
    if settings.template is not None:  # [name] is the word; [filewords] the image's caption
        from training.data import read_templates

        templates = tuple(t.replace(NAME_PLACEHOLDER, settings.token)
                          for t in read_templates(settings.template))
    source = ImageCaptions(examples, Augment(resolution, flip=settings.flip, seed=settings.seed,
                                             templates=templates))
    if not settings.cache_latents:
        return source
    progress = engine.accelerator.is_local_main_process and not settings.quiet
    mean, std = encode_posteriors(source, model.first_stage_model, engine.device, progress=progress)
    return CachedLatents(source, mean, std)


def _validator(model, vectors: nn.Parameter, settings: EmbeddingSettings, folder: Path, device,
               model_name: str):
    """Draw the validation prompts with a fixed seed, the word holding the current vectors; the
    pipeline runs in float32 and the frozen weights go back to their training dtype afterwards."""
    frozen_dtype = weight_dtype(settings.mixed_precision)

    def validate(step: int) -> None:
        from ldm.embeddings import TextualInversion
        from pipelines.images import save_png
        from pipelines.pipeline import Pipeline

        pipe = Pipeline(model, device=device, dtype=torch.float32)
        pipe.embeddings[settings.token] = TextualInversion(settings.token,
                                                           vectors.detach().float().cpu().clone())
        folder.mkdir(parents=True, exist_ok=True)
        for k, prompt in enumerate(settings.validation_prompt):
            result = pipe.txt2img(prompt, seed=settings.validation_seed, progress=False)
            save_png(result.images[0], folder / f"step-{step:06d}-{k}.png",
                     dict(result.parameters[0], model=model_name))
        model.model.to(frozen_dtype)
        model.cond_stage_model.to(frozen_dtype)
        model.model.train()
        model.cond_stage_model.train()
    return validate


def _run_settings(settings: EmbeddingSettings, states: Path) -> RunSettings:
    return RunSettings(
        name="train-embedding", steps=settings.max_steps, batch_size=settings.batch_size,
        states=states, save_every=settings.checkpointing_steps, seed=settings.seed,
        keep=settings.checkpoints_total_limit, resume=settings.resume, resume_missing_ok=True,
        state_at_end=False, gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_grad_norm=settings.max_grad_norm, mixed_precision=settings.mixed_precision,
        cpu=settings.cpu, num_workers=settings.num_workers, quiet=settings.quiet,
        validate_every=settings.validation_steps if settings.validation_prompt else 0)


def _freeze(engine: Engine, model, settings: EmbeddingSettings) -> None:
    """Everything frozen; UNet and text encoder in the mixed-precision dtype."""
    frozen_dtype = weight_dtype(settings.mixed_precision)
    model.requires_grad_(False)
    model.to(engine.device)
    model.model.to(frozen_dtype)
    model.cond_stage_model.to(frozen_dtype)


def _task(engine: Engine, model, settings: EmbeddingSettings, inversion: Inversion, dataset,
          folder: Path, model_name: str) -> Task:
    from ldm.embeddings import load_embedding, save_embedding
    from training.data import collate
    from training.lora import learning_rate

    def load(state: Path) -> None:
        with torch.no_grad():
            inversion.vectors.copy_(load_embedding(state / STATE_FILE, inversion.vectors.shape[1]).vectors)

    facts = {"token": settings.token, "vectors": settings.vectors, "init_word": settings.init_word,
             "seed": settings.seed, "batch_size": settings.batch_size,
             "processes": engine.accelerator.num_processes,
             "gradient_accumulation_steps": settings.gradient_accumulation_steps}
    return Task(
        module=inversion, parameters=[inversion.vectors], dataset=dataset, collate=collate,
        shuffle=True, loss=InversionLoss(model, settings, engine.device),
        schedule=Schedule(learning_rate(settings)), weight_decay=settings.weight_decay,
        randomness=PerStep, facts=facts, checked_facts=("token", "vectors"),
        save_weights=lambda state: save_embedding(state / STATE_FILE, settings.token, inversion.vectors),
        load_weights=load,
        validate=_validator(model, inversion.vectors, settings, folder, engine.device, model_name)
        if settings.validation_prompt else None)


def train(settings: EmbeddingSettings) -> Summary:
    """Learn the word's vectors and write ``settings.output`` (an A1111 embedding file)."""
    from ldm.modules.tokenizer import tokenizer_for
    from training.lora import load_base_model

    from training.data import scan_folder

    out, states, validation = output_paths(settings)
    # 1. inputs, before anything heavy; with a template, [filewords] may come from file names
    examples = scan_folder(settings.data, names=settings.template is not None)
    if settings.template is not None:
        from training.data import read_templates

        read_templates(settings.template)
    engine = Engine(_run_settings(settings, states))
    model, base_path = load_base_model(settings.checkpoint, settings.config)
    if model.config.is_sdxl:
        raise TrainingError(f"{base_path}: an SDXL model; embedding training takes one-tower models")
    tokenizer = tokenizer_for(model.config.text)
    check_token(tokenizer, settings.token,
                note=lambda m: print(m, file=sys.stderr) if engine.is_main else None)
    if settings.template is None:  # with a template, its lines place the word
        examples = [dataclasses.replace(ex, caption=with_word(tokenizer, ex.caption, settings.token))
                    for ex in examples]
    resolution = settings.resolution or model.config.default_image_size
    if resolution % model.config.autoencoder.downscale:
        raise TrainingError(f"--resolution {resolution}: must be a multiple of "
                            f"{model.config.autoencoder.downscale} for this model")
    vectors = init_vectors(model.cond_stage_model, tokenizer, settings.init_word, settings.vectors)
    _freeze(engine, model, settings)  # 2. the frozen base and the one trainable tensor
    inversion = Inversion(model, vectors.to(engine.device))
    dataset = _dataset(settings, examples, model, resolution, engine)  # 3. data, then the run
    summary = engine.fit(_task(engine, model, settings, inversion, dataset, validation,
                               settings.checkpoint.stem if settings.checkpoint else "tiny-shapes"))
    engine.accelerator.wait_for_everyone()  # 4. the file
    if engine.is_main:
        from ldm.embeddings import save_embedding

        out.parent.mkdir(parents=True, exist_ok=True)
        save_embedding(out, settings.token, inversion.vectors, step=summary.step)
        note = "" if out.stem == settings.token else \
            f" (prompts call it {out.stem!r}: the file's name, as in A1111)"
        print(f"{summary}; wrote {out}{note}")
    engine.accelerator.end_training()
    return summary
