"""``ldm train-controlnet`` on tiny models: the zero start, a frozen base, the file it writes (ours
and diffusers' loaders), exact resume, data layouts, errors, and (slow) two processes through
``accelerate launch``."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from cli.main import main
from reference.tiny import tiny_tree
from training.shapes import sample_spec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Each run builds its own Accelerator; Accelerate keeps process-wide state between them."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _tiny_model():
    from ldm.model import LatentDiffusion
    from reference.models import randomize_
    from reference.tiny import tiny_config

    return randomize_(LatentDiffusion(tiny_config("sd1")), seed=1)


def _write_pairs(folder: Path, count: int, hints: bool = True) -> Path:
    """Rendered shapes (16 px: the tiny autoencoder is f=2) with captions and edge hints."""
    from PIL import ImageFilter

    (folder / "conditioning").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        spec = sample_spec(rng)
        image = spec.render(16)
        image.save(folder / f"s{i}.png")
        (folder / f"s{i}.txt").write_text(f"a {spec.colour} {spec.shape} on a {spec.background} background")
        if hints:
            image.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB").save(
                folder / "conditioning" / f"s{i}.png")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from ldm.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("controlnet-train")
    path = root / "tiny-sd1.safetensors"
    save_checkpoint(_tiny_model(), path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_tree("sd1")))
    return {"sd1": path, "data": _write_pairs(root / "pairs", 6)}


def train(files, out: Path, *extra, capsys=None, data=None):
    argv = ["train-controlnet", "--data", data or files["data"], "--checkpoint", files["sd1"],
            "--output", out, "--resolution", 16, "--batch-size", 2, "-q", *extra]
    code = main([str(a) for a in argv])
    if capsys is not None:
        return code, *capsys.readouterr()
    return code


# ------------------------------------------------------------------------------- the zero start

def test_the_trainable_copy_starts_with_zero_residuals():
    from training.controlnet import init_controlnet

    model = _tiny_model().eval()
    net = init_controlnet(model)
    unet = model.unet.state_dict()
    assert all(torch.equal(v, unet[k]) for k, v in net.state_dict().items()
               if k.startswith(("time_embed.", "input_blocks.", "middle_block.")))
    gen = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, 3, 64, 64, generator=gen)
    t, context = torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        residuals = net(x, hint, t, context)
        assert len(residuals) == len(net.input_blocks) + 1
        assert all(r.abs().max() == 0 for r in residuals)
        assert torch.equal(model.apply_model(x, t, context, control=residuals),
                           model.apply_model(x, t, context))


# ------------------------------------------------------------------------------- a training run

def test_only_the_controlnet_trains_and_its_file_loads(files, tmp_path):
    from ldm.checkpoint import CONFIG_METADATA_KEY
    from ldm.controlnet_config import parse_cldm_config
    from ldm.controlnet_loading import load_controlnet
    from training.controlnet import ControlNetSettings, init_controlnet
    from training.controlnet import train as train_api

    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = init_controlnet(_tiny_model()).state_dict()
    out = tmp_path / "cn.safetensors"
    settings = ControlNetSettings(data=files["data"], output=out, max_steps=3, learning_rate=1e-3,
                                  batch_size=2, resolution=16, save_precision="fp16", quiet=True)
    assert train_api(settings, model=model).step == 3
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the base model changed"
    tensors = load_file(str(out))
    assert sorted(tensors) == sorted(start) and all(v.dtype == torch.float16 for v in tensors.values())
    changed = [k for k in start if not torch.equal(tensors[k], start[k].half())]
    assert "zero_convs.0.0.weight" in changed and "middle_block_out.0.weight" in changed
    assert "input_hint_block.14.weight" in changed
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["steps"] == "3" and meta["resolution"] == "16"
    base_cfg, control_cfg = parse_cldm_config(json.loads(meta[CONFIG_METADATA_KEY]))
    assert base_cfg.unet == model.config.unet and control_cfg.hint_channels == 3
    net = load_controlnet(out, base=model.config)
    assert all(torch.equal(v, tensors[k].float()) for k, v in net.state_dict().items())


def test_diffusers_loads_the_file_offline(files, tmp_path):
    """``ControlNetModel.from_single_file`` with a local config folder (no hub) reads the file, and
    its residuals equal ours."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from ldm.controlnet_loading import load_controlnet
    from training.controlnet import cldm_tree

    out = tmp_path / "cn.safetensors"
    assert train(files, out, "--max-steps", 2, "--lr", "1e-3") == 0
    ours = load_controlnet(out, base=_tiny_model().config)
    tensors = load_file(str(out))
    tree = cldm_tree(_tiny_model().config, ours.config)
    unet = create_unet_diffusers_config_from_ldm(tree, {f"model.diffusion_model.{k}": v
                                                        for k, v in tensors.items()})
    config = {"conditioning_channels": 3, **{k: unet[k] for k in (
        "in_channels", "down_block_types", "block_out_channels", "layers_per_block",
        "cross_attention_dim", "attention_head_dim", "use_linear_projection")}}
    folder = tmp_path / "diffusers-config"
    ControlNetModel(**config).save_config(folder)
    ref = ControlNetModel.from_single_file(str(out), config=str(folder), local_files_only=True,
                                           torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    x, hint = torch.randn(1, 4, 8, 8, generator=gen), torch.rand(1, 3, 64, 64, generator=gen)
    t, context = torch.tensor([500]), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        mine = ours(x, hint, t, context)
        down, mid = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    assert any(r.abs().max() > 0 for r in mine)
    for a, b in zip(mine, [*down, mid], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_resumed_run_equals_the_uninterrupted_run(files, tmp_path):
    common = ["--max-steps", 5, "--checkpointing-steps", 2, "--gradient-accumulation-steps", 2,
              "--caption-dropout", 0.5, "--lr-scheduler", "cosine", "--lr-warmup-steps", 1,
              "--noise-offset", 0.05, "--lr", "1e-3", "--seed", 3]
    assert train(files, tmp_path / "a" / "c.safetensors", *common) == 0
    b = tmp_path / "b" / "c.safetensors"
    assert train(files, b, *common) == 0
    states = tmp_path / "b" / "c-checkpoints"
    assert sorted(p.name for p in states.iterdir()) == ["step-000002", "step-000004"]
    shutil.rmtree(states / "step-000004")
    b.unlink()
    assert train(files, b, *common, "--resume", "latest") == 0
    full, resumed = load_file(str(tmp_path / "a" / "c.safetensors")), load_file(str(b))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


# ----------------------------------------------------------------------------------- the data

def test_metadata_layout_and_caption_dropout(tmp_path):
    from training.controlnet_data import ControlPairs, scan_control_folder

    _write_pairs(tmp_path, 2)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(
        {"image": f"s{i}.png", "conditioning_image": f"conditioning/s{i}.png", "text": f"t{i}"}) + "\n"
        for i in range(2)))
    examples = scan_control_folder(tmp_path)
    assert [(e.image.name, e.hint.parent.name, e.caption) for e in examples] == \
        [("s0.png", "conditioning", "t0"), ("s1.png", "conditioning", "t1")]
    data = ControlPairs(examples, 16, 64, caption_dropout=0.5, seed=1)
    item = data[3]
    assert item["pixels"].shape == (3, 16, 16) and item["hint"].shape == (3, 64, 64)
    assert 0 <= item["hint"].min() and item["hint"].max() <= 1
    assert {data[k]["caption"] for k in range(30)} == {"", "t0", "t1"}
    assert data[7]["caption"] == data[7]["caption"]


def _bad_folder(root: Path, kind: str) -> Path:
    folder = root / kind
    folder.mkdir()
    if kind == "missing-hints":
        _write_pairs(folder, 3)
        for i in (0, 2):
            (folder / "conditioning" / f"s{i}.png").unlink()
    elif kind == "not-json":
        (folder / "metadata.jsonl").write_text('{"image": "a.png", \n')
    elif kind == "no-conditioning":
        _write_pairs(folder, 1)
        (folder / "metadata.jsonl").write_text('{"image": "s0.png", "text": "x"}\n')
    elif kind == "listed-missing":
        (folder / "metadata.jsonl").write_text(
            '{"image": "gone.png", "conditioning_image": "gone-hint.png", "text": "x"}\n')
    return folder


@pytest.mark.parametrize("case,fragment,status", [
    ("empty", "no images in it", 1),
    ("missing-hints", "2 images have no hint in conditioning/ (same name, any image suffix): s0.png, s2.png", 1),
    ("not-json", "line 1 is not JSON", 1),
    ("no-conditioning", 'line 1 has no "conditioning_image" string', 1),
    ("listed-missing", "2 listed images do not exist: gone.png, gone-hint.png", 1),
    ("suffix", "--output must name a .safetensors file", 2),
    ("dropout", "argument --caption-dropout: must be between 0 and 1, got 2", 2),
    ("validation", "--validation-image: give one hint, or one per --validation-prompt", 2),
])
def test_bad_inputs_give_one_error_line(files, tmp_path, capsys, case, fragment, status):
    data = files["data"] if case in ("suffix", "dropout", "validation") else _bad_folder(tmp_path, case)
    out = tmp_path / ("c.ckpt" if case == "suffix" else "c.safetensors")
    extra = {"dropout": ["--caption-dropout", 2],
             "validation": ["--validation-prompt", "a", "--validation-prompt", "b",
                            "--validation-image", files["data"] / "s0.png",
                            "--validation-image", files["data"] / "s1.png",
                            "--validation-image", files["data"] / "s2.png"]}.get(case, [])
    code, _, err = train(files, out, "--max-steps", 1, *extra, capsys=capsys, data=data)
    assert code == status
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert fragment in err, err
    assert not out.exists() and not out.with_name("c-checkpoints").exists()


def test_an_sdxl_base_is_one_error_line(files, tmp_path, capsys):
    """SDXL ControlNets load and generate; training one is not supported yet, and says so."""
    from ldm.checkpoint import save_checkpoint
    from reference.sdxl import random_sdxl_model

    save_checkpoint(random_sdxl_model(), tmp_path / "xl.safetensors")
    out = tmp_path / "c.safetensors"
    code = main([str(a) for a in ["train-controlnet", "--data", files["data"], "--checkpoint",
                                  tmp_path / "xl.safetensors", "--output", out, "--resolution", 16,
                                  "--max-steps", 1, "-q"]])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and "SDXL base" in err, err
    assert not out.exists()


def test_help_is_the_training_parser(capsys):
    assert main(["train-controlnet", "--help"]) == 0
    assert "usage: ldm train-controlnet" in capsys.readouterr().out


# ------------------------------------------------------------------------------ two processes

@pytest.mark.slow
def test_two_processes_through_accelerate_launch(files, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m cli train-controlnet --cpu``: two
    processes joined over gloo write one file and one state per step with both RNG states."""
    out = tmp_path / "ddp.safetensors"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "cli", "train-controlnet", "--cpu",
           "--data", str(files["data"]), "--checkpoint", str(files["sd1"]), "--output", str(out),
           "--resolution", "16", "--batch-size", "2", "--max-steps", "3", "--checkpointing-steps", "2",
           "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote") == 1
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["processes"] == "2" and meta["steps"] == "3"
    names = sorted(p.name for p in (tmp_path / "ddp-checkpoints" / "step-000002").iterdir())
    assert "random_states_0.pkl" in names and "random_states_1.pkl" in names


def test_validation_draws_through_the_pipelines_control_unit(files, tmp_path):
    """Validation images come from the pipeline with a ControlUnit. The pipeline fits hints to
    the image size, so this base has an f=8 autoencoder (the tiny configs' is f=2)."""
    pytest.importorskip("pipelines.control", reason="the pipeline's ControlUnit is not there yet")
    from ldm.checkpoint import save_checkpoint
    from ldm.config import parse_config
    from ldm.model import LatentDiffusion
    from reference.models import randomize_

    tree = tiny_tree("sd1")
    tree["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"] = [1, 1, 1, 1]
    base = tmp_path / "f8.safetensors"
    save_checkpoint(randomize_(LatentDiffusion(parse_config(tree, "f8")), seed=2), base)
    out = tmp_path / "v.safetensors"
    argv = ["train-controlnet", "--data", files["data"], "--checkpoint", base, "--output", out,
            "--resolution", 64, "--batch-size", 1, "--max-steps", 2, "-q",
            "--validation-prompt", "a red circle", "--validation-steps", 2,
            "--validation-image", files["data"] / "conditioning" / "s0.png"]
    assert main([str(a) for a in argv]) == 0
    assert (tmp_path / "v-validation" / "step-000002-0.png").is_file()


def test_the_shapes_recipe_renders_its_own_folder(tmp_path):
    """Scenes of 12–48 px that fit the image, no held-out pair in the training data, canny hints,
    and a folder the trainer reads."""
    import numpy as np

    from training.controlnet_data import scan_control_folder
    from training.shapes import analyze, is_held_out
    from training.shapes_controlnet import free_scene, write_data

    scenes = [free_scene(random.Random(i)) for i in range(200)]
    assert {s.side for s in scenes} <= set(range(12, 49)) and min(s.side for s in scenes) < 16
    assert max(s.side for s in scenes) > 44
    assert not any(is_held_out(s.colour, s.shape) for s in scenes)
    assert all(is_held_out(s.colour, s.shape) for s in
               (free_scene(random.Random(i), held_out=True) for i in range(20)))
    for s in scenes[:20]:
        found = analyze(s.render())
        assert (found.colour, found.background) == (s.colour, s.background)
        x0, y0, x1, y1 = found.bbox
        assert x0 >= 1 and y0 >= 1 and x1 <= 63 and y1 <= 63
    from PIL import Image

    examples = scan_control_folder(write_data(tmp_path / "data", 3))
    first = free_scene(random.Random(0))
    assert examples[0].caption == f"a {first.colour} {first.shape} on a {first.background} background"
    hint = np.asarray(Image.open(examples[0].hint))
    assert hint.shape == (64, 64, 3) and set(np.unique(hint)) == {0, 255}


def test_the_shipped_canny_controlnet_draws_the_hinted_shape():
    """weights/tiny-shapes-canny.safetensors loads strictly for the default model, fp16 with its
    cldm config in the header, and puts the shape where the edges are (a few tuning-range scenes;
    the full figures are `python -m training.shapes_controlnet evaluate`'s)."""
    import statistics

    from ldm.checkpoint import CONFIG_METADATA_KEY
    from ldm.controlnet_loading import load_controlnet
    from pipelines.control import ControlUnit
    from pipelines.pipeline import Pipeline
    from training.shapes.analyze import shape_mask
    from training.shapes_controlnet import SHIPPED, TUNE_SEED, caption, canny_hint, free_scene, iou

    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} is not installed")
    with safe_open(str(SHIPPED), "pt") as f:
        assert CONFIG_METADATA_KEY in f.metadata()
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    pipe = Pipeline.from_checkpoint()
    net = load_controlnet(SHIPPED, base=pipe.model.config)
    scores = []
    for s in range(TUNE_SEED, TUNE_SEED + 4):
        spec = free_scene(random.Random(s))
        scene = spec.render()
        image = pipe.txt2img(caption(spec), control=[ControlUnit(model=net, image=canny_hint(scene))],
                             seed=s, num_inference_steps=15, progress=False).images[0]
        scores.append(iou(shape_mask(image), shape_mask(scene)))
    assert statistics.median(scores) >= 0.75, scores
