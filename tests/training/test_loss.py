"""The one diffusion loss: the noising equals the model's own (ε and v), the reductions and
weightings are the documented formulas, and the draws come in a fixed order from the generator.
Also the LoRA trainer's settings and learning rates."""
from __future__ import annotations

import pytest
import torch

from ldm.model import LatentDiffusion
from reference.tiny import tiny_config
from training.loss import DiffusionLoss, draw_noise, draw_timesteps, randn


@pytest.fixture(scope="module", params=["sd1", "sd2-v"])
def model(request):
    return LatentDiffusion(tiny_config(request.param))


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    return z, noise, torch.tensor([1, 500, 999])


def test_noising_follows_the_models_schedule_and_parameterisation(model):
    loss = DiffusionLoss.for_config(model.config)
    assert torch.equal(loss.alphas_cumprod, model.alphas_cumprod)
    z, noise, t = _batch()
    x_t, target = loss.noised(z, t, noise)
    a = model.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - model.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.equal(x_t, a * z + s * noise)
    v = model.config.parameterization == "v"
    assert torch.equal(target, a * noise - s * z if v else noise)  # Salimans & Ho 2022, §4


def test_reductions_and_weights(model):
    z, noise, t = _batch(1)
    out = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    plain = DiffusionLoss(model.alphas_cumprod, model.prediction)
    x_t, target = plain.noised(z, t, noise)
    per_sample = ((out - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.equal(plain(out, target, t), ((out - target) ** 2).mean())
    weight = torch.tensor([1.0, 0.5, 0.0])
    assert torch.equal(plain(out, target, t, weight), (per_sample * weight).mean())
    gamma = 5.0
    snr = model.alphas_cumprod[t] / (1 - model.alphas_cumprod[t])
    v = model.config.parameterization == "v"
    expected = (per_sample * (torch.clamp(snr, max=gamma) / (snr + 1 if v else snr))).mean()
    min_snr = DiffusionLoss(model.alphas_cumprod, model.prediction, min_snr_gamma=gamma)
    assert torch.equal(min_snr(out, target, t), expected)
    assert min_snr(out, target, t) < plain(out, target, t)  # t=1 has a huge SNR, clipped to γ


def test_draws_come_in_a_fixed_order():
    gen = torch.Generator().manual_seed(4)
    noise = draw_noise((2, 4, 3, 3), gen, "cpu", offset=0.1)
    t = draw_timesteps(2, 1000, gen, "cpu")
    ref = torch.Generator().manual_seed(4)
    plain = torch.randn((2, 4, 3, 3), generator=ref)
    offset = torch.randn((2, 4, 1, 1), generator=ref)
    assert torch.equal(noise, plain + 0.1 * offset)
    assert torch.equal(t, torch.randint(0, 1000, (2,), generator=ref))
    no_offset = torch.Generator().manual_seed(4)
    assert torch.equal(draw_noise((2, 4, 3, 3), no_offset, "cpu"), plain)
    assert torch.equal(randn((2,), torch.Generator().manual_seed(9), "cpu"),
                       torch.randn((2,), generator=torch.Generator().manual_seed(9)))


# ------------------------------------------------------------------------- the LoRA trainer's settings

def test_lora_learning_rates_are_diffusers_rates(tmp_path):
    from diffusers.optimization import get_scheduler

    from training.lora import LoraSettings, learning_rate

    for name in ("constant", "constant_with_warmup", "linear", "cosine"):
        settings = LoraSettings(data=tmp_path, output=tmp_path / "x.safetensors", learning_rate=3e-4,
                                lr_scheduler=name, lr_warmup_steps=3, max_steps=12)
        rate = learning_rate(settings)
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=settings.learning_rate)
        schedule = get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=12)
        for step in range(12):
            assert rate(step) == opt.param_groups[0]["lr"], (name, step)
            opt.step()
            schedule.step()


@pytest.mark.parametrize("change, message", [
    (dict(rank=0), "rank must be >= 1, got 0"),
    (dict(caption_dropout=1.5), "caption_dropout must be in [0, 1], got 1.5"),
    (dict(learning_rate=0.0), "learning_rate must be > 0, got 0.0"),
    (dict(max_steps=2.5), "max_steps must be an integer, got 2.5"),
    (dict(lr_scheduler="step"), "lr_scheduler must be one of constant, constant_with_warmup"),
    (dict(output="x.ckpt"), "--output must name a .safetensors file"),
    (dict(resolution=20), "must be a multiple of 8"),
    (dict(cache_latents=True, random_crop=True), "--cache-latents needs fixed crops"),
    (dict(targets=["text-mlp"]), "text-encoder targets need --train-text-encoder"),
    (dict(validation_prompt=[" "]), "--validation-prompt must not be empty"),
])
def test_lora_settings_are_checked_when_built(tmp_path, change, message):
    from training.lora import LoraSettings

    fields = dict(dict(data=tmp_path, output=tmp_path / "x.safetensors"), **change)
    with pytest.raises(ValueError) as info:
        LoraSettings(**fields)
    assert message in str(info.value)


def test_lora_settings_from_the_command_line(tmp_path):
    from cli.args import UsageError
    from cli.train_lora import build_parser, settings_from
    from training.lora import LoraSettings, resolve_targets

    args = build_parser().parse_args(["--data", str(tmp_path), "--output", str(tmp_path / "a.safetensors"),
                                      "--targets", "attention", "conv", "--validation-prompt", "a ring"])
    settings = settings_from(args)
    assert isinstance(settings, LoraSettings) and settings.data == tmp_path
    assert settings.targets == ("attention", "conv") and settings.validation_prompt == ("a ring",)
    assert settings == LoraSettings(data=str(tmp_path), output=tmp_path / "a.safetensors",
                                    targets=["attention", "conv"], validation_prompt=["a ring"])
    unet, text = resolve_targets(settings.targets, train_text_encoder=True)
    assert "conv_shortcut" in unet and text  # text-attention by default with the text encoder
    args.reg_data = str(tmp_path)
    with pytest.raises(UsageError, match="--reg-data must be another folder than --data"):
        settings_from(args)
