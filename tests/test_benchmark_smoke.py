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
