"""Family detection from tensor shapes: full-size layouts (built on the meta device, cross-checked
against diffusers' own model-type inference), tiny layouts, the v-prediction sources, and errors."""
from __future__ import annotations

import functools

import pytest
import torch
import yaml

from ldm.config import builtin_config
from ldm.detect import CONTEXT_KEY, INPUT_KEY, V_PROBE_KEY, Detection, detect
from ldm.weights_io import CheckpointError
from ldm.model import LatentDiffusion
from reference.tiny import tiny_config, tiny_tree

# diffusers' names for the same families (single_file_utils.infer_diffusers_model_type)
DIFFUSERS_TYPE = {"sd1": "v1", "sd1-inpaint": "inpainting", "sd2": "v2", "sd2-inpaint": "inpainting_v2"}


@functools.lru_cache(maxsize=None)
def _meta_state(config_name: str) -> dict[str, torch.Tensor]:
    """Full-size CompVis state dict with shapes only (no memory, no 2 GB file)."""
    with torch.device("meta"):
        model = LatentDiffusion(builtin_config(config_name))
    return dict(model.state_dict())


@functools.lru_cache(maxsize=None)
def _tiny_meta_state(kind: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = LatentDiffusion(tiny_config(kind))
    return dict(model.state_dict())


@pytest.mark.parametrize("config_name,family,expected_rules", [
    ("v1-inference", "sd1", ["context dim 768 (attn2.to_k in_features) -> SD1",
                             "proj_in is 4-D -> 1x1 conv projection (SD1)",
                             "input_blocks.0.0.weight has 4 input channels -> text-to-image"]),
    ("v1-inpainting-inference", "sd1-inpaint",
     ["context dim 768 (attn2.to_k in_features) -> SD1",
      "input_blocks.0.0.weight has 9 input channels -> inpainting"]),
    ("v2-inference", "sd2", ["context dim 1024 (attn2.to_k in_features) -> SD2",
                             "text encoder keys cond_stage_model.model.* -> OpenCLIP (SD2)",
                             "proj_in is 2-D -> linear projection (SD2)"]),
    ("v2-inpainting-inference", "sd2-inpaint",
     ["context dim 1024 (attn2.to_k in_features) -> SD2",
      "input_blocks.0.0.weight has 9 input channels -> inpainting"]),
])
def test_full_size_families(config_name, family, expected_rules):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    sd = _meta_state(config_name)
    found = detect(sd)
    assert found.family == family
    assert found.config_name == config_name
    for rule in expected_rules:
        assert rule in found.rules, found.rules
    # an independent implementation reads the same family from the same shapes
    assert infer_diffusers_model_type(sd) == DIFFUSERS_TYPE[family]


def test_full_size_v_heuristic_on_meta_is_unknown_then_decides_with_real_values():
    sd = dict(_meta_state("v2-inference-v"))
    found = detect(sd)  # meta tensor: the heuristic must not crash, and falls back to epsilon
    assert found.family == "sd2"
    assert any("heuristic unavailable" in r for r in found.rules)

    gen = torch.Generator().manual_seed(0)
    channels = sd[V_PROBE_KEY].shape[0]
    sd[V_PROBE_KEY] = 0.2 * torch.randn(channels, generator=gen)
    found = detect(sd)
    assert (found.family, found.config_name) == ("sd2-v", "v2-inference-v")
    assert any("> 0.09 -> v-prediction (heuristic)" in r for r in found.rules)

    sd[V_PROBE_KEY] = 0.02 * torch.randn(channels, generator=gen)
    assert detect(sd).family == "sd2"


def test_heuristic_not_applied_to_inpainting_or_sd1():
    for name in ("v2-inpainting-inference", "v1-inference"):
        sd = dict(_meta_state(name))
        sd[V_PROBE_KEY] = 0.5 * torch.randn(sd[V_PROBE_KEY].shape[0])
        assert not detect(sd).family.endswith("-v")


@pytest.mark.parametrize("kind,family", [("sd1", "sd1"), ("sd1-inpaint", "sd1-inpaint"), ("sd2", "sd2"),
                                         ("sd2-v", "sd2"), ("sd2-inpaint", "sd2-inpaint")])
def test_tiny_families(kind, family):
    # shapes cannot reveal v-prediction on a tiny model (no output_blocks.11): epsilon unless told
    found = detect(_tiny_meta_state(kind))
    assert found.family == family
    assert "context dim 32 (attn2.to_k in_features) is not a full-size width -> decided by other keys" \
        in found.rules


def test_v_prediction_sources(tmp_path):
    sd = dict(_tiny_meta_state("sd2-v"))
    # explicit override
    found = detect(sd, prediction="v")
    assert found.family == "sd2-v" and "prediction override 'v' -> v-prediction" in found.rules
    # v_pred marker key
    found = detect({**sd, "v_pred": torch.tensor([])})
    assert found.family == "sd2-v" and "file has a v_pred key -> v-prediction" in found.rules
    # sidecar YAML next to the checkpoint
    ckpt = tmp_path / "model.safetensors"
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(tiny_tree("sd2-v")))
    found = detect(sd, path=ckpt)
    assert found.family == "sd2-v" and "sidecar model.yaml says parameterization v" in found.rules
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(tiny_tree("sd2")))
    found = detect({**sd, "v_pred": torch.tensor([])}, path=ckpt)
    assert found.family == "sd2" and "sidecar model.yaml says parameterization eps" in found.rules
    # an explicit argument is the most specific statement and beats the sidecar
    assert detect(sd, path=ckpt, prediction="v").family == "sd2-v"
    # the override does not turn an SD1 model into another family, and says so
    found = detect(_tiny_meta_state("sd1"), prediction="v")
    assert found.family == "sd1" and any("does not change" in r for r in found.rules)


def test_detection_is_a_frozen_record():
    found = detect(_tiny_meta_state("sd1"))
    assert isinstance(found, Detection) and isinstance(found.rules, tuple)
    with pytest.raises(AttributeError):
        found.family = "sd2"
    assert found.prediction == "eps"


def _message(sd, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        detect(sd, **kw)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_errors():
    assert _message({"encoder.weight": torch.zeros(2)}, path="x.safetensors") == \
        "x.safetensors: not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)"
    sd1 = _meta_state("v1-inference")
    assert "SDXL" in _message({**sd1, "conditioner.embedders.0.transformer.x": torch.zeros(1)})
    text = _message({**sd1, "cond_stage_model.model.token_embedding.weight": torch.zeros(1)})
    assert "inconsistent layout" in text and "OpenCLIP" in text and "context dim 768" in text
    odd = {**sd1, INPUT_KEY: torch.empty(320, 8, 3, 3, device="meta")}
    assert "takes 8 input channels" in _message(odd)
    assert "cannot tell SD1 from SD2" in _message({INPUT_KEY: sd1[INPUT_KEY]})
    no_input = {k: v for k, v in sd1.items() if k != INPUT_KEY}
    assert INPUT_KEY in _message(no_input)
    assert _message({CONTEXT_KEY: sd1[CONTEXT_KEY]}).startswith("state dict: missing ")
    with pytest.raises(ValueError, match="prediction must be 'eps' or 'v'"):
        detect(sd1, prediction="x0")
