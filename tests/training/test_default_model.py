"""The default-model recipe: every stage runs a few steps, checkpoints, resumes exactly, and the
assembled file is a CompVis-layout checkpoint of the shipped config."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import load_model
from ldm.config import load_config
from ldm.model import LatentDiffusion
from training.default_model import clip, common, unet, vae
from training.default_model.cli import main
from training.default_model.common import Settings
from training.engine import TrainingError, find_resume

SMOKE = dict(steps=2, batch_size=2, warmup=1, save_every=1, quiet=True, cpu=True)


def _config_with_text_layers(path: Path, layers: int) -> Path:
    """A copy of the shipped config whose text encoder keeps ``layers`` blocks."""
    text, count = re.subn(r"(?m)^(\s+layers:\s*)\d+", rf"\g<1>{layers}", common.CONFIG_PATH.read_text())
    assert count == 1
    path.write_text(text)
    return path


def _settings(out: Path, config: Path | None = None, **changes) -> Settings:
    fields = dict(SMOKE, out=out, **changes)
    if config is not None:
        fields["config"] = config
    return Settings(**fields)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One smoke run of the three training stages, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("recipe")
    # the model conditions on the first block of the tower the clip stage trains (3 blocks)
    config = _config_with_text_layers(out / "tiny-shapes.yaml", 1)
    vae.run(_settings(out, config), vae.VAEOptions(eval_images=4, scale_images=8))
    clip.run(_settings(out, config), clip.CLIPOptions(eval_images=4))
    unet.run(_settings(out, config), unet.UNetOptions(latents=6))
    return out


def test_stages_write_their_outputs(run_dir):
    stats = json.loads((run_dir / "vae" / "stats.json").read_text())
    assert math.isfinite(stats["psnr_db"]) and stats["scale_factor"] > 0
    clip_stats = json.loads((run_dir / "clip" / "stats.json").read_text())
    assert set(clip_stats["attribute_accuracy"]) == {"colour", "shape", "background", "size", "position"}
    for stage, name in (("vae", "autoencoder"), ("clip", "text_encoder"), ("clip", "clip-image"),
                        ("unet", "unet"), ("unet", "latents")):
        assert (run_dir / stage / f"{name}.safetensors").is_file(), (stage, name)
    # checkpoints every step, only the newest `keep` (2) kept
    for stage in ("vae", "clip", "unet"):
        assert sorted(p.name for p in (run_dir / stage / "checkpoints").iterdir()) == \
            ["step-000001", "step-000002"]
        losses = [json.loads(line) for line in (run_dir / stage / "loss.jsonl").read_text().splitlines()]
        assert losses[-1]["step"] == 2 and math.isfinite(losses[-1]["loss"])


def test_assembled_checkpoint_loads_into_the_shipped_config(run_dir, tmp_path):
    config = tmp_path / "tiny-shapes.yaml"
    shutil.copy(run_dir / "tiny-shapes.yaml", config)
    assert main(["assemble", "--out", str(run_dir), "--config", str(config),
                 "--weights-dir", str(tmp_path)]) == 0
    stats = json.loads((run_dir / "assemble" / "stats.json").read_text())
    scale = json.loads((run_dir / "vae" / "stats.json").read_text())["scale_factor"]
    cfg = load_config(config)
    assert cfg.scale_factor == pytest.approx(scale, rel=1e-5)
    assert "# 1 / std of the autoencoder's latents" in config.read_text()  # comments kept

    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "tiny-shapes.safetensors"))
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state
    assert stats["bytes"] <= 40 * 2 ** 20
    model = LatentDiffusion(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    loaded = load_model(tmp_path / "tiny-shapes.safetensors", config=config)
    assert loaded.scale_factor == pytest.approx(scale, rel=1e-5)
    # the parts equal what the stages trained
    trained_unet = load_file(str(run_dir / "unet" / "unet.safetensors"))
    key = "out.2.weight"
    assert torch.allclose(model.unet.state_dict()[key], trained_unet[key].half().float())
    # the model keeps the tower's first block; the image-tower file carries the other two, so the
    # CLIP score is the trained tower's
    assert cfg.text.layers == 1
    assert not any(".encoder.layers.1." in k for k in state)
    image_tower = load_file(str(tmp_path / "tiny-shapes-clip-image.safetensors"))
    assert "visual.head.3.weight" in image_tower and "logit_scale" in image_tower
    assert "text.transformer.text_model.encoder.layers.2.mlp.fc2.weight" in image_tower
    scorer = clip.load_clip(model.cond_stage_model, tmp_path / "tiny-shapes-clip-image.safetensors")
    trained = clip.ShapesCLIP(dataclasses.replace(cfg.text, layers=3))
    trained.text.load_state_dict(load_file(str(run_dir / "clip" / "text_encoder.safetensors")))
    trained.load_state_dict(load_file(str(run_dir / "clip" / "clip-image.safetensors")), strict=False)
    images, _ = vae.render_batch(0, 0, 2)
    captions = ["a red circle", "a small blue square on the left on a red background"]
    scores = clip.clip_score(scorer, images, captions)
    expected = clip.clip_score(trained.eval(), images, captions)
    assert torch.allclose(scores, expected, atol=0.5), (scores, expected)  # fp16 weights
    assert not torch.allclose(scores, clip.clip_score(trained, images, captions[::-1]), atol=0.5)


def test_resume_continues_exactly(tmp_path):
    """Two steps, then a resumed third step, end with the weights of three uninterrupted steps."""
    opts = vae.VAEOptions(eval_images=2, scale_images=2)
    vae.run(_settings(tmp_path / "a", steps=3), opts)
    vae.run(_settings(tmp_path / "b", steps=3, save_every=2), opts)
    shutil.rmtree(tmp_path / "b" / "vae" / "checkpoints" / "step-000003")
    vae.run(_settings(tmp_path / "b", steps=3, resume="latest"), opts)
    a = common.load_weights(tmp_path / "a" / "vae" / "autoencoder.safetensors")
    b = common.load_weights(tmp_path / "b" / "vae" / "autoencoder.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_vae_loss_falls():
    torch.manual_seed(0)
    model = vae.AutoencoderKL(load_config(common.CONFIG_PATH).autoencoder)
    images, _ = vae.render_batch(0, 0, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = vae.vae_loss(model, images, vae.VAEOptions())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_shape_region_weights_cover_the_shape_and_its_margin_only():
    from training.shapes import ShapeSpec
    from training.shapes.datasets import render_tensor

    spec = ShapeSpec("red", "square", "blue", "small", "in the center", side=16, dx=0, dy=0)
    image = render_tensor(spec)[None]
    w = vae.shape_region_weights(image, 10.0, margin=3)[0, 0]
    inside = (image[0] - image[0, :, :1, :1]).abs().amax(0) > 0.1  # pixels unlike the corner
    ys, xs = inside.nonzero(as_tuple=True)
    y0, y1, x0, x1 = ys.min().item(), ys.max().item(), xs.min().item(), xs.max().item()
    assert torch.all(w[inside] == 11.0)
    assert torch.all(w[y0 - 3:y1 + 4, x0 - 3:x1 + 4] == 11.0)  # a square's margin is its box + 3
    ring = torch.ones_like(w, dtype=torch.bool)
    ring[y0 - 3:y1 + 4, x0 - 3:x1 + 4] = False
    assert torch.all(w[ring] == 1.0)


def test_vae_loss_weights_the_shape_region():
    """The weighted L1 term equals the hand-computed weighted mean; the pyramid term adds the L1 of
    2×- and 4×-pooled images."""

    class Echo(torch.nn.Module):  # recon = input + fixed error; KL 0
        def __init__(self, error):
            super().__init__()
            self.error = error

        def forward(self, x, generator=None):
            class Post:
                @staticmethod
                def kl():
                    return torch.zeros(len(x))
            return x + self.error, Post()

    images, _ = vae.render_batch(0, 0, 2)
    error = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 0.2
    model = Echo(error)
    w = vae.shape_region_weights(images, 4.0)
    expect = (error * w).mean() / w.mean()
    got = vae.vae_loss(model, images, vae.VAEOptions(edge_weight=0, pyramid_weight=0, shape_weight=4.0))
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    plain = vae.vae_loss(model, images, vae.VAEOptions(edge_weight=0, pyramid_weight=0, shape_weight=0))
    assert plain.item() == pytest.approx(error.mean().item(), rel=1e-5)
    pooled = sum(torch.nn.functional.avg_pool2d(error, f).mean() for f in (2, 4))
    both = vae.vae_loss(model, images, vae.VAEOptions(edge_weight=0, pyramid_weight=0.5, shape_weight=0))
    assert both.item() == pytest.approx((error.mean() + 0.5 * pooled).item(), rel=1e-5)


def test_reconstruction_shape_accuracy_reads_reconstructions_with_the_analyzer():
    class Perfect(torch.nn.Module):  # decode(encode(x)) == x
        def encode(self, x):
            class Post:
                @staticmethod
                def mode():
                    return x
            return Post()

        def decode(self, z):
            return z

    class Blur(Perfect):  # a 9×9 box blur rounds every corner
        def decode(self, z):
            return torch.nn.functional.avg_pool2d(z, 9, stride=1, padding=4, count_include_pad=False)

    Perfect.parameters = Blur.parameters = lambda self: iter([torch.zeros(1)])
    perfect = vae.reconstruction_shapes(Perfect(), 24, seed=5, batch=12)
    assert perfect["shape_all"] == 1.0 and set(perfect) == {"shape_circle", "shape_square",
                                                           "shape_triangle", "shape_all"}
    blurred = vae.reconstruction_shapes(Blur(), 24, seed=5, batch=12)
    assert blurred["shape_all"] < 1.0


def test_contrastive_loss_counts_identical_captions_as_matches():
    def grad(captions):
        logits = torch.tensor([[5.0, 5.0, 0.0], [5.0, 5.0, 0.0], [0.0, 0.0, 5.0]], requires_grad=True)
        clip.contrastive_loss(logits, captions).backward()
        return logits.grad

    # two images with the same caption: nothing pushes their similarities apart
    assert grad(["a red circle", "a red circle", "a blue square"]).abs().max() < 0.01
    assert grad(["a red circle", "a green circle", "a blue square"])[0, 1] > 0.1
    # with all captions distinct it is CLIP's symmetric cross-entropy on the diagonal
    logits = torch.randn(4, 4)
    labels = torch.arange(4)
    expected = 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                      + torch.nn.functional.cross_entropy(logits.T, labels))
    assert clip.contrastive_loss(logits, list("abcd")).item() == pytest.approx(expected.item())


def test_text_pooling_is_the_end_of_text_state_and_ignores_padding():
    cfg = load_config(common.CONFIG_PATH).text
    model = clip.ShapesCLIP(cfg).eval()
    tokens = clip.tokenize(cfg, ["a red circle", "a small blue square on the left on a red background"])
    with torch.no_grad():
        pooled = model.encode_text(tokens)
        hidden = model.text(tokens)  # the full 77-token sequence, as the UNet sees it
        eot = (tokens == clip.EOT).int().argmax(1)
        full = torch.nn.functional.normalize(model.text_projection(hidden[torch.arange(2), eot]), dim=-1)
    assert torch.allclose(pooled, full, atol=1e-5)


def test_first_blocks_are_the_tower_with_clip_skip():
    """A text encoder of the first block of a trained 3-block tower computes what transformers'
    CLIPTextModel gives two blocks from the end (hidden state after block 1, then the final layer
    norm: diffusers' ``clip_skip=2``, A1111's CLIP skip 3)."""
    cfg = dataclasses.replace(load_config(common.CONFIG_PATH).text, layers=3)
    torch.manual_seed(0)
    tower = clip.FrozenCLIPEmbedder(cfg).eval()
    shallow = clip.FrozenCLIPEmbedder(dataclasses.replace(cfg, layers=1)).eval()
    shallow.load_state_dict(clip.first_blocks(tower.state_dict(), 1))  # strict: no key left over
    tokens = clip.tokenize(cfg, ["a orange circle on a blue background"])
    hf = tower.transformer.text_model
    with torch.no_grad():
        hidden = hf(input_ids=tokens, output_hidden_states=True).hidden_states
        expected = hf.final_layer_norm(hidden[1])
        assert torch.allclose(shallow(tokens), expected, atol=1e-5)
        assert not torch.allclose(shallow(tokens), tower(tokens), atol=1e-2)
    assert clip.tail_blocks(tower.state_dict(), 1).keys() == {
        f"text.{k}" for k in tower.state_dict() if ".encoder.layers.1." in k or ".encoder.layers.2." in k}


def test_clip_stage_needs_at_least_the_conditioning_blocks(tmp_path, capsys):
    config = _config_with_text_layers(tmp_path / "c.yaml", 2)
    assert main(["clip", "--out", str(tmp_path), "--config", str(config), "--steps", "1",
                 "--text-layers", "1", "--quiet"]) == 2
    assert "conditions on 2 blocks" in capsys.readouterr().err


def test_unet_starts_with_a_zero_prediction():
    cfg = load_config(common.CONFIG_PATH)
    model = unet.zero_init_(unet.UNetModel(cfg.unet))
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, cfg.text.width))
    assert out.abs().max() == 0


def test_learning_rate_schedule():
    s = Settings(steps=100, warmup=10, lr=1.0)
    assert common.lr_at(0, s) == pytest.approx(0.1)
    assert common.lr_at(9, s) == pytest.approx(1.0)
    assert common.lr_at(10, s) == pytest.approx(1.0)
    assert common.lr_at(100, s) == pytest.approx(0.1)
    assert all(common.lr_at(i, s) >= common.lr_at(i + 1, s) for i in range(10, 100))


def test_resume_and_missing_inputs_give_clear_errors(tmp_path, capsys):
    with pytest.raises(TrainingError, match="no checkpoint"):
        find_resume(tmp_path / "checkpoints", "latest")
    with pytest.raises(TrainingError, match="not a training state folder"):
        find_resume(tmp_path / "checkpoints", str(tmp_path))
    code = main(["unet", "--out", str(tmp_path), "--steps", "1", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "run the 'vae' stage first" in err and "Traceback" not in err
    assert main(["vae", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert main(["vae", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_fresh_run_refuses_to_mix_with_old_checkpoints(tmp_path):
    opts = vae.VAEOptions(eval_images=2, scale_images=2)
    vae.run(_settings(tmp_path, steps=1), opts)
    with pytest.raises(TrainingError, match="--resume latest"):
        vae.run(_settings(tmp_path, steps=1), opts)


def test_all_runs_each_stage_in_its_own_process(monkeypatch, tmp_path):
    import subprocess

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert main(["all", "--out", str(tmp_path), "--seed", "3", "--weights-dir", str(tmp_path / "w")]) == 0
    assert [c[3] for c in calls] == ["vae", "clip", "unet", "assemble"]
    assert all(c[1:3] == ["-m", "training.default_model"] and "--seed" in c for c in calls)
    assert "--weights-dir" in calls[-1] and "--weights-dir" not in calls[0]
    assert "--mixed-precision" not in calls[0]  # each stage keeps its own default

    calls.clear()
    monkeypatch.setattr(subprocess, "run", lambda c, **k: calls.append(c) or
                        subprocess.CompletedProcess(c, 1 if c[3] == "clip" else 0))
    assert main(["all", "--out", str(tmp_path)]) == 2
    assert [c[3] for c in calls] == ["vae", "clip"]


def test_stage_defaults_reach_the_settings():
    from training.default_model.cli import _settings, build_parser

    args = build_parser().parse_args(["vae"])
    assert _settings(args, "vae").mixed_precision == "bf16"
    assert _settings(build_parser().parse_args(["unet"]), "unet").mixed_precision == "no"
    args = build_parser().parse_args(["vae", "--mixed-precision", "no", "--steps", "7"])
    settings = _settings(args, "vae")
    assert (settings.mixed_precision, settings.steps, settings.batch_size) == ("no", 7, 32)
