"""ControlNet generation speed and memory, ours against diffusers' StableDiffusionControlNetPipeline
on the same weights, in the same process, runs alternating.

Both sides hold one weight set (``benchmarks/speed_models.py``: random weights for the SD
structures, the shipped model for ``default``) and one ControlNet copied from the UNet's encoder
with random zero convolutions, converted for diffusers by its own converter. Reported per side:
denoising iterations per second (median over runs, between the first and the last step callback)
and, on CUDA, the peak allocated memory of a run.

    python -m benchmarks.controlnet_speed --structure sd15 --device cuda --dtype fp16
    python -m benchmarks.controlnet_speed --structure default --runs 5        # CPU, seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from PIL import Image, ImageDraw

from benchmarks.pipeline_speed import step_marks
from benchmarks.speed_models import STRUCTURES, _diffusers_tree, our_model, random_weights_, structure

PROMPT, NEGATIVE = "a red square on a white background", "blurry"


def controlnet_pair(model, tree: dict, device, dtype):
    """Our ControlNet (the UNet's encoder, random zero convolutions) and diffusers' copy."""
    from ldm.controlnet_config import ControlNetConfig
    from ldm.modules.controlnet import ControlNet
    from reference.models import diffusers_controlnet

    ours = ControlNet(ControlNetConfig.from_unet(model.config.unet)).to(device)
    ours.copy_encoder_from(model.unet)
    random_weights_(ours.input_hint_block, seed=1)
    for i, conv in enumerate(ours.zero_layers()):
        random_weights_(conv, seed=10 + i)
    tree = _diffusers_tree(tree)
    params = tree["model"]["params"]
    params["control_stage_config"] = {"target": "cldm.cldm.ControlNet",
                                      "params": dict(params["unet_config"]["params"], hint_channels=3)}
    sd = {f"control_model.{k}": v.float().cpu() for k, v in ours.state_dict().items()}
    theirs = diffusers_controlnet(tree, sd).to(device=device, dtype=dtype)
    return ours.eval(), theirs


def hint_image(size: int) -> Image.Image:
    im = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(im).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), outline="white",
                                 width=max(1, size // 64))
    return im


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--structure", default="default", choices=STRUCTURES)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    from ldm.weights_io import parse_dtype
    from pipelines.control import ControlUnit
    from pipelines.pipeline import Pipeline
    from pipelines.schedulers import make_scheduler
    from reference import pipelines as dp

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype or ("fp16" if device.type == "cuda" else "fp32"))
    s = structure(args.structure)
    model = our_model(s, device)
    net, their_net = controlnet_pair(model, s.tree, device, dtype)
    parts = dp.components(model, _diffusers_tree(s.tree))
    theirs = diffusers.StableDiffusionControlNetPipeline(
        **parts, controlnet=their_net, scheduler=make_scheduler("dpmpp_2m", model.config.parameterization),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(device, dtype)
    theirs.set_progress_bar_config(disable=True)
    ours = Pipeline(model, device=device, dtype=dtype, model_name=s.name)
    hint = hint_image(s.size)
    unit = ControlUnit(net, hint, resize_mode="just_resize")
    common = dict(negative_prompt=NEGATIVE, height=s.size, width=s.size, guidance_scale=7.5,
                  num_inference_steps=args.steps)

    def run(who: str):
        marks, mark, its = step_marks(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if who == "ours":
            ours.txt2img(PROMPT, seed=0, scheduler="dpmpp_2m", progress=False, control=unit,
                         callback=lambda *a: mark(), **common)
        else:
            def on_step(pipe, i, t, kwargs):
                mark()
                return kwargs

            theirs(PROMPT, image=hint, generator=torch.Generator("cpu").manual_seed(0),
                   callback_on_step_end=on_step, **common)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return its(), peak

    for who in ("ours", "diffusers"):  # warm-up (kernels, caches, prepacking)
        run(who)
    results = {"ours": [], "diffusers": []}
    for _ in range(args.runs):
        for who in ("ours", "diffusers"):
            results[who].append(run(who))
    report = {"structure": s.name, "weights": s.weights, "size": s.size, "device": str(device),
              "dtype": str(dtype).removeprefix("torch."), "steps": args.steps, "runs": args.runs,
              "threads": torch.get_num_threads()}
    for who, values in results.items():
        report[f"{who}_its"] = statistics.median(v[0] for v in values)
        peaks = [v[1] for v in values if v[1] is not None]
        report[f"{who}_peak_gib"] = max(peaks) if peaks else None
    report["its_ratio"] = report["ours_its"] / report["diffusers_its"]
    json.dump(report, sys.stdout, indent=1)
    print()
    return report


if __name__ == "__main__":
    main()
