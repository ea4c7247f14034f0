"""The LoRA training loop behind ``ldm train-lora`` (Accelerate: devices, mixed precision, gradient
accumulation, data parallelism, resumable states).

Determinism: all randomness of micro-batch ``m`` on process ``p`` (posterior sample, noise, noise
offset, timesteps) comes from a generator seeded by (seed, m, p), and the data stream is a function
of the position in it (:mod:`training.data`). A run stopped at step k and resumed therefore
continues exactly as the uninterrupted run would; a state holds only the adapter, the optimizer,
the LR schedule and the step (the frozen base model is not copied).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from torch import nn

ADAPTER = "default"
STATE_FILE = "train_state.json"
ADAPTER_FILE = "lora.safetensors"
STEP_DIR = re.compile(r"^step-(\d+)$")
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "fp32": torch.float32}


class TrainingError(ValueError):
    """A training run that cannot start or continue."""


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


# ------------------------------------------------------------------------------ paths and states

def output_paths(args) -> tuple[Path, Path, Path]:
    """(LoRA file, states folder, validation folder)."""
    out = Path(args.output)
    states = Path(args.checkpoints_dir) if args.checkpoints_dir else out.with_name(f"{out.stem}-checkpoints")
    return out, states, out.with_name(f"{out.stem}-validation")


def saved_states(folder: Path) -> list[tuple[int, Path]]:
    """Complete states (their train_state.json is written last), oldest first."""
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume(args, states: Path, note) -> Path | None:
    existing = saved_states(states)
    if args.resume is None:
        if existing:
            raise TrainingError(f"{states} holds states of an earlier run; pass --resume latest to "
                                "continue it, or remove the folder")
        return None
    if args.resume == "latest":
        if not existing:
            note(f"--resume latest: no state in {states} yet; starting at step 0")
            return None
        return existing[-1][1]
    path = Path(args.resume)
    if not (path / STATE_FILE).is_file():
        raise TrainingError(f"--resume {path}: not a training state folder (no {STATE_FILE} in it)")
    return path


def load_base_model(args):
    """The model to adapt: --checkpoint, or the shipped default model."""
    from ldm.checkpoint import load_model

    path, config = args.checkpoint, args.config
    if path is None:
        from pipelines.pipeline import DEFAULT_CHECKPOINT, DEFAULT_CONFIG, DefaultModelMissing

        if not DEFAULT_CHECKPOINT.is_file():
            raise DefaultModelMissing(f"no default model is installed ({DEFAULT_CHECKPOINT.parent.name}/"
                                      f"{DEFAULT_CHECKPOINT.name}); pass --checkpoint PATH")
        path = DEFAULT_CHECKPOINT
        if config is None and DEFAULT_CONFIG.is_file():
            config = DEFAULT_CONFIG
    model = load_model(path, config, dtype=torch.float32, device="cpu")
    if model.config.is_inpainting:
        raise TrainingError(f"{path}: an inpainting model; LoRA training takes text-to-image models")
    return model, Path(path)


def _run_facts(args, unet_targets, text_targets, processes: int) -> dict:
    return {"rank": args.rank, "alpha": args.alpha if args.alpha is not None else args.rank,
            "unet_targets": list(unet_targets), "text_targets": list(text_targets),
            "seed": args.seed, "batch_size": args.batch_size, "processes": processes,
            "gradient_accumulation_steps": args.gradient_accumulation_steps}


# ------------------------------------------------------------------------------------ the loss

def _generator(seed: int, micro: int, process: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + micro) * 131 + process)


def micro_batch_loss(model, denoiser, batch: dict, gen: torch.Generator, args, device,
                     train_text: bool) -> torch.Tensor:
    """Diffusion loss of one micro-batch: ε or v target (the model's parameterisation),
    optionally min-SNR-γ weighted (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy") and with offset noise (Guttenberg 2023)."""
    with torch.no_grad():
        if "pixels" in batch:
            vae = model.first_stage_model
            posterior = vae.encode(batch["pixels"].to(device, next(vae.parameters()).dtype))
            mean, std = posterior.mean.float(), posterior.std.float()
        else:
            mean, std = batch["mean"].to(device), batch["std"].to(device)
        eps = torch.randn(mean.shape, generator=gen).to(device)
        z = (mean + std * eps) * model.scale_factor
        b = z.shape[0]
        noise = torch.randn(z.shape, generator=gen).to(device)
        if args.noise_offset:
            noise = noise + args.noise_offset * torch.randn((b, z.shape[1], 1, 1), generator=gen).to(device)
        t = torch.randint(0, model.config.timesteps, (b,), generator=gen).to(device)
        x_t = model.q_sample(z, t, noise)
        target = model.training_target(z, t, noise).float()
        tokens = model.tokenize(batch["caption"]).to(device)
        context = None if train_text else model.cond_stage_model(tokens)
    pred = denoiser(x_t, t, tokens=tokens if train_text else None, context=context)
    per_sample = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))
    if args.min_snr_gamma:
        ac = model.alphas_cumprod.to(device)[t]
        snr = ac / (1 - ac)
        clipped = torch.clamp(snr, max=args.min_snr_gamma)
        per_sample = per_sample * (clipped / (snr + 1 if model.config.parameterization == "v" else snr))
    if "weight" in batch:  # regularisation images count --prior-loss-weight times
        per_sample = per_sample * batch["weight"].to(device)
    return per_sample.mean()


# ----------------------------------------------------------------------------------- the run

def _dataset(args, examples, model, resolution, device, accelerator):
    from training.data import Augment, CachedLatents, ImageCaptions, encode_posteriors

    source = ImageCaptions(examples, Augment(resolution, args.random_crop, args.flip,
                                             args.caption_dropout, args.seed))
    if not args.cache_latents:
        return source
    mean, std = encode_posteriors(source, model.first_stage_model, device,
                                  progress=accelerator.is_local_main_process and not args.quiet)
    return CachedLatents(source, mean, std)


def _validate(model, params, args, step: int, folder: Path, weight_dtype, device) -> None:
    """Draw the validation prompts with a fixed seed. The pipeline runs in float32 (an upcast of the
    frozen half-precision weights is exact, so is casting them back); the LoRA tensors the
    optimizer holds are put back untouched."""
    from pipelines.images import save_png
    from pipelines.pipeline import Pipeline

    kept = [(p, p.data) for p in params]
    pipe = Pipeline(model, device=device, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for k, prompt in enumerate(args.validation_prompt):
        result = pipe.txt2img(prompt, seed=args.validation_seed, progress=False)
        params_k = dict(result.parameters[0], model=model_name(args))
        save_png(result.images[0], folder / f"step-{step:06d}-{k}.png", params_k)
    model.model.to(weight_dtype)
    model.cond_stage_model.to(weight_dtype)
    for p, data in kept:
        p.data = data
        p.requires_grad_(True)
    model.model.train()
    model.cond_stage_model.train()


def model_name(args) -> str:
    return Path(args.checkpoint).stem if args.checkpoint else "tiny-shapes"


def _prune(states: Path, limit: int | None) -> None:
    if limit is None:
        return
    for _, path in saved_states(states)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)


def train(args) -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ldm.lora import add_lora, lora_parameters, read_lora, save_lora, set_lora_weights
    from training.data import KeyBatches, collate, scan_folder
    from training.lora import resolve_targets

    # 1. inputs, before anything heavy
    unet_targets, text_targets = resolve_targets(args)
    examples = scan_folder(args.data)
    n_train = len(examples)
    if args.reg_data:
        from dataclasses import replace

        examples += [replace(ex, weight=args.prior_loss_weight) for ex in scan_folder(args.reg_data)]
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise TrainingError("--mixed-precision fp16 needs a GPU; on the CPU use bf16 or no")
    out, states, validation = output_paths(args)
    resume = find_resume(args, states, accelerator.print)

    # 2. the base model, frozen (UNet and text encoder in the mixed-precision dtype), + the adapter
    model, base_path = load_base_model(args)
    resolution = args.resolution or model.config.default_image_size
    if resolution % model.config.autoencoder.downscale:
        raise TrainingError(f"--resolution {resolution}: must be a multiple of "
                            f"{model.config.autoencoder.downscale} for this model")
    device, weight_dtype = accelerator.device, _DTYPES[args.mixed_precision]
    model.requires_grad_(False)
    model.to(device)
    model.model.to(weight_dtype)
    model.cond_stage_model.to(weight_dtype)
    set_seed(args.seed)  # the same adapter initialisation on every process
    add_lora(model, ADAPTER, rank=args.rank, alpha=args.alpha, targets=unet_targets,
             text_targets=text_targets, dtype=torch.float32)
    train_text = bool(text_targets)
    if args.gradient_checkpointing:
        model.unet.set_gradient_checkpointing(True)
    params = lora_parameters(model, ADAPTER)

    # 3. optimizer, schedule, Accelerate; states hold the adapter only (the base is on disk)
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                             num_training_steps=args.max_steps)
    denoiser = Denoiser(model)
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)

    def save_hook(models, weights, output_dir):
        weights.clear()
        if accelerator.is_main_process:
            save_lora(model, Path(output_dir) / ADAPTER_FILE, ADAPTER)

    def load_hook(models, input_dir):
        models.clear()
        set_lora_weights(model, ADAPTER, read_lora(Path(input_dir) / ADAPTER_FILE, model))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    facts = _run_facts(args, unet_targets, text_targets, accelerator.num_processes)
    step = 0
    if resume is not None:
        saved = json.loads((resume / STATE_FILE).read_text())
        for key in ("rank", "alpha", "unet_targets", "text_targets"):
            if saved["facts"].get(key) != facts[key]:
                raise TrainingError(f"--resume {resume}: the state was trained with {key} "
                                    f"{saved['facts'].get(key)}, this run asks for {facts[key]}")
        accelerator.load_state(str(resume))
        schedule.load_state_dict(saved["lr_scheduler"])
        step = int(saved["step"])
        accelerator.print(f"resumed from {resume} at step {step}")

    def save_state() -> None:
        final = states / f"step-{step:06d}"
        partial = states / f".step-{step:06d}.partial"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / STATE_FILE).write_text(json.dumps(
                {"step": step, "lr_scheduler": schedule.state_dict(), "facts": facts}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _prune(states, args.checkpoints_total_limit)
        accelerator.wait_for_everyone()

    # 4. data: this process's share of the stream, from the resumed position on
    dataset = _dataset(args, examples, model, resolution, device, accelerator)
    accum = args.gradient_accumulation_steps
    batches = KeyBatches(len(dataset), args.batch_size, args.seed, step * accum, args.max_steps * accum,
                         accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                        num_workers=args.num_workers)

    # 5. the loop
    progress = tqdm(total=args.max_steps, initial=step, desc="train-lora", unit="step",
                    dynamic_ncols=True, disable=args.quiet or not accelerator.is_local_main_process)
    denoiser.train()
    micro, done, losses, smoothed = step * accum, 0, [], None
    started = time.perf_counter()
    for batch in loader:
        gen = _generator(args.seed, micro, accelerator.process_index)
        with accelerator.accumulate(denoiser):
            loss = micro_batch_loss(model, denoiser, batch, gen, args, device, train_text)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {loss.item()} at step {step + 1}; lower "
                                    "--learning-rate or use --mixed-precision bf16/no")
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        losses.append(loss.detach().float().item())
        if not accelerator.sync_gradients:
            continue
        if not accelerator.optimizer_step_was_skipped:
            schedule.step()
        step, done = step + 1, done + 1
        value = sum(losses) / len(losses)
        losses.clear()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        progress.update(1)
        progress.set_postfix(loss=f"{smoothed:.4g}", lr=f"{schedule.get_last_lr()[0]:.3g}")
        if step % args.checkpointing_steps == 0 and step < args.max_steps:
            save_state()
        if args.validation_prompt and step % args.validation_steps == 0:
            if accelerator.is_main_process:
                _validate(model, params, args, step, validation, weight_dtype, device)
            accelerator.wait_for_everyone()
        if step >= args.max_steps:
            break
    progress.close()
    wall = time.perf_counter() - started

    # 6. the file
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_lora(model, out, ADAPTER, dtype=_DTYPES[args.save_precision], steps=step,
                  resolution=resolution, base_model_path=base_path,
                  extra={"learning_rate": args.learning_rate, "batch_size": args.batch_size,
                         "gradient_accumulation_steps": accum,
                         "processes": accelerator.num_processes,
                         "targets": ",".join(unet_targets + text_targets),
                         "ss_learning_rate": args.learning_rate,
                         "ss_num_train_images": n_train,
                         "ss_num_reg_images": len(examples) - n_train,
                         "ss_prior_loss_weight": args.prior_loss_weight})
        rate = f", {done / wall:.2f} steps/s" if done and wall > 0 else ""
        last = f", loss {smoothed:.4g}" if smoothed is not None else ""
        print(f"trained {step} steps ({done} in this run, {wall:.1f} s{rate}{last}); wrote {out}")
    accelerator.end_training()
