"""The pipeline speed benchmark runs end to end in its quick mode (so the script cannot rot): both
sides generate, and the report holds every figure the full run writes. No timing is checked."""
from __future__ import annotations

import json


def test_pipeline_speed_quick_mode(tmp_path):
    from benchmarks.pipeline_speed import main

    report = main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)])
    assert [r["structure"] for r in report["results"]] == ["default"]
    result = report["results"][0]
    for side in ("ours", "diffusers"):
        assert result[side]["s_per_image"] > 0 and result[side]["images_per_s"] > 0
        assert result[side]["its"] > 0 and result["unet_ms"][side] > 0
        assert len(result["raw"]["e2e"][side]["seconds"]) == 2
    assert set(result["ratio"]) == {"unet", "e2e", "e2e_paired_median", "e2e_process"}
    env = report["environment"]
    assert env["threads"] == 1 and env["torch"] and env["diffusers"] and env["date"]
    saved = json.loads((tmp_path / "pipeline_speed-cpu-quick.json").read_text())
    assert saved["results"][0]["steps"] == 2
    table = (tmp_path / "pipeline_speed-cpu-quick.md").read_text()
    assert "| default (" in table and "ours / diffusers" in table


def test_text_composition_reads_the_shipped_tower(tmp_path):
    """The default model conditions on the first of its tower's three blocks because that block
    still tells an unseen "orange circle" from the shapes orange was trained on; the last does not."""
    from benchmarks.text_composition import main

    assert main(["--train", "600", "--held-out", "40", "--json", str(tmp_path / "t.json")]) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["blocks"] == 3 and report["conditioning_blocks"] == 1
    first, last = report["after_block_1"], report["after_block_3"]
    assert first["orange circle"] >= 0.8 > last["orange circle"], (first, last)
    assert first["held_out"] > last["held_out"]


def test_startup_measures_each_process_alone_and_reports(tmp_path, monkeypatch):
    """The start-up benchmark's pieces (its full run takes minutes): the peak RSS of a child that
    allocates 200 MB is that child's, not this (torch-importing) process's, with GNU time and with
    the fallback wrapper; the table marks bars; its RESULTS.md section is replaced in place."""
    import sys
    from pathlib import Path

    import torch  # noqa: F401  (this process is then far above 200 MB: a leak would show)

    from benchmarks import startup

    child = [sys.executable, "-c", "x = b'1' * 200_000_000; print('RESULT {\"n\": 1}')"]
    for wrapper in (startup.GNU_TIME, Path(tmp_path / "no-time")):
        monkeypatch.setattr(startup, "GNU_TIME", wrapper)
        run = startup.run_process(child)
        assert 200e6 < run["peak_rss_bytes"] < 260e6 and run["n"] == 1 and run["wall_s"] > 0

    proc = {"wall_s": 12.0, "peak_rss_bytes": 1.1e9, "import_s": 5.0, "load_s": 1.0,
            "first_image_s": 2.0, "sample_s": 0.4}
    full = {"file_bytes": 2.1e9, "cases": {"fp32": {
        "medians": {"ours": dict(proc, wall_s=7.0), "diffusers": proc},
        "time_ratio": 7 / 12, "rss_ratio": 1.0}}}
    report = {"runs": 1, "environment": {
        "machine": "m", "torch": "t", "diffusers": "d", "transformers": "x", "python": "p",
        "date": "today", "commit": "abc", "dirty": True},
        "conditions": {"loadavg_before": [1, 1, 1], "loadavg_after": [2, 2, 2]},
        "sections": {
            "default": {"settings": dict(steps=25, guidance=2.5, width=64, height=64),
                        "medians": {k: proc for k in ("help", "ours", "diffusers", "ours_api",
                                                      "diffusers_api")}},
            "sd15": full,
            "fromfile": {"prompts": 40, "medians": {"single": proc, "fromfile": proc},
                         "per_image_s": 0.41, "sample_s": 0.4, "overhead_pct": 2.5,
                         "gap_s": 0.5, "gap_overhead_pct": 25.0}}}
    table = startup.markdown(report)
    assert "ours ≤ 3 s: **NOT met**" in table and "| 0.58 | ≤ 0.7: met |" in table
    assert "| 0.410; 2.5 % | – | – | ≤ 5 %: met |" in table
    assert "| 0.500; 25.0 % | – | – | ≤ 5 %: **NOT met** |" in table
    assert "(with uncommitted changes)" in table

    before = "# R\n\nintro\n\n## A\n\na\n\n## B\n\nb\n"
    once = startup.replace_section(before, "new 1")
    assert once == before + "\n" + startup.HEADING + "\n\nnew 1\n"
    middle = once.replace("## B", startup.HEADING + "\n\nold\n\n## B", 1).replace(
        "\n\n" + startup.HEADING + "\n\nnew 1\n", "\n")
    assert startup.replace_section(middle, "new 2") == \
        "# R\n\nintro\n\n## A\n\na\n\n" + startup.HEADING + "\n\nnew 2\n\n## B\n\nb\n"


def test_lora_draws_vary_the_dataset_and_summarise(tmp_path):
    """The concept benchmark's draws differ in what users' folders differ in, render what their
    captions say, and a summary is over all draws (mean and worst)."""
    from PIL import Image

    from benchmarks.lora_draws import draw, make_data, summarize
    from training.shapes import analyze

    draws = [draw(s) for s in range(1, 9)]
    assert draw(3) == draws[2]  # a function of the seed
    assert len({d.colours for d in draws}) == 8 and {len(d.colours) for d in draws} <= {4, 5, 6}
    assert {d.placement for d in draws} == {"named", "random"} and len({d.style for d in draws}) > 2
    assert {d.word for d in draws} & {"ring"} and {d.word for d in draws} - {"ring"}
    d = draws[0]
    assert set(d.colours).isdisjoint(d.unseen) and len(d.colours) + len(d.unseen) == 8
    make_data(d, tmp_path / "data", tmp_path / "priors", prior_count=6)
    captions = sorted((tmp_path / "data").glob("*.txt"))
    assert len(captions) == d.images and len(list((tmp_path / "priors").glob("*.png"))) == 6
    for path in captions[:10]:
        text = path.read_text().strip()
        assert f" {d.word}" in f" {text}" and any(f"{c} {d.word}" in text for c in d.colours)
        assert analyze(Image.open(path.with_suffix(".png")).convert("RGB")).shape == "ring"
    row = {"draw": {"seed": 1}, "trained_colours": 0.9, "unseen_colours": 0.5, "old_shapes": 1.0,
           "training_s": 100.0, "training_cpu_s": 90.0, "scale0_bit_identical": True}
    summary = summarize([row, dict(row, unseen_colours=0.8, trained_colours=0.8)])
    assert summary["unseen_colours"] == {"mean": 0.65, "worst": 0.5}
    assert summary["trained_colours"]["worst"] == 0.8 and summary["passed"]
    assert not summarize([row])["passed"]  # unseen 50 % < 60 %


def test_sdxl_load_benchmark_pieces_on_a_tiny_sdxl_file(tmp_path):
    """The SDXL load benchmark's config folder lets diffusers' StableDiffusionXLPipeline read a tiny
    SDXL base file offline, without a warning and with every weight equal to the file's (checked
    through diffusers' own converters), and our side of the measurement runs on it. The bigG tower
    is made wider than CLIP-L's here: at equal widths diffusers loads CLIP-L's weights into
    text_encoder_2 (it tells the towers apart by width), which full-size files never have."""
    import torch

    from benchmarks.load_checkpoint import write_random_checkpoint
    from benchmarks.load_sdxl import check_diffusers_load, measure_ours, write_sdxl_config_folder
    from ldm.config import parse_config
    from reference.tiny import tiny_sdxl_tree

    tree = tiny_sdxl_tree()
    p = tree["model"]["params"]
    p["conditioner_config"]["params"]["emb_models"][1]["params"].update(width=48, projection_dim=48)
    p["network_config"]["params"].update(context_dim=32 + 48, adm_in_channels=48 + 6 * 8)
    cfg = parse_config(tree, "tiny sdxl, wider bigG")
    path = write_random_checkpoint(tmp_path / "tiny-sdxl.safetensors", cfg, dtype=torch.float16)
    folder = write_sdxl_config_folder(tmp_path / "cfg", tree)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    check = check_diffusers_load(path, folder)
    assert set(check["components"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert check["dtype"] == "torch.float16"
    result = measure_ours(path, config=cfg, dtype=torch.float16)
    assert result["load_s"] > 0 and result["peak_rss_bytes"] > 0
