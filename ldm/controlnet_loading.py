"""ControlNet weight files → a :class:`~ldm.modules.controlnet.ControlNet`, checked strictly.

Files in the original layout (lllyasviel's ``cldm``: ``input_hint_block``, ``zero_convs``,
``input_blocks``, ``middle_block``, ``middle_block_out``, ``time_embed``), with or without the
training model's ``control_model.`` prefix, as safetensors or weights-only pickles; and diffusers'
``ControlNetModel`` layout, as one weight file or a folder with its ``config.json``, renamed on
reading (:mod:`ldm.controlnet_diffusers`). The config is the caller's (a :class:`ControlNetConfig`,
a cldm YAML or a built-in cldm config stem), else the folder's ``config.json``, else read from the
tensor shapes: everything but the attention heads, which no shape depends on and which come from
the base model when one is given, else from the family's rule (context width 768: SD1, 8 heads;
1024: SD2, 64-wide heads; 2048: SDXL, 64-wide heads). An SDXL ControlNet is told by its
``label_emb`` (diffusers: ``add_embedding``), the vector conditioning's input, and has a transformer
depth per level as the SDXL UNet, or fewer blocks (no residual's shape depends on them).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping, NamedTuple

import torch

from .checkpoint import CONFIG_METADATA_KEY, assert_materialised, cast_weights, check_keys
from .config import ConfigError, ModelConfig, builtin_config
from .controlnet_config import (ControlNetConfig, builtin_cldm_config, load_cldm_config,
                                parse_cldm_config)
from .controlnet_diffusers import (DIFFUSERS_MARKERS, config_from_diffusers, from_diffusers,
                                  skeleton_config)
from .infer_config import Shapes, attention_resolutions, head_rule, read_encoder
from .modules.controlnet import STATE_PREFIX, ControlNet, strip_prefix
from .weights_io import MappedFile, file_error, parse_dtype, read_safetensors_metadata, read_weights

__all__ = ["load_controlnet", "infer_controlnet_config", "resolve_controlnet_config",
           "controlnet_family", "check_fits_base", "is_controlnet", "is_diffusers_controlnet",
           "is_controlnet_folder", "read_controlnet", "ControlNetWeights"]

# keys only a ControlNet has (original layout)
CONTROL_MARKERS = ("input_hint_block.", "zero_convs.", "middle_block_out.")
# a diffusers ControlNet folder's weight files, in the order they are looked for (fp16 first in fp16)
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
# context width → (family, built-in config whose head rule it follows)
FAMILIES = {768: ("sd1", "v1-inference"), 1024: ("sd2", "v2-inference"), 2048: ("sdxl", "sd_xl_base")}
ADM_KEY = "label_emb.0.0.weight"  # SDXL's vector input (its width: adm_in_channels)


def _bare(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return strip_prefix(dict(state_dict))


def _is_original(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.removeprefix(STATE_PREFIX).startswith(CONTROL_MARKERS) for k in state_dict)


def is_controlnet(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """ControlNet keys: the original layout (with or without ``control_model.``) or diffusers'."""
    return _is_original(state_dict) or is_diffusers_controlnet(state_dict)


def is_diffusers_controlnet(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """diffusers' ``ControlNetModel`` keys."""
    return any(k.startswith(DIFFUSERS_MARKERS) for k in state_dict)


def _context_key(sd: Mapping[str, torch.Tensor]) -> str | None:
    keys = sorted(k for k in sd if k.endswith("transformer_blocks.0.attn2.to_k.weight")
                  and k.startswith(("input_blocks.", "middle_block.")))
    return keys[0] if keys else None


def controlnet_family(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """``"sdxl"`` when it has ``label_emb`` (the vector conditioning only SDXL has), else ``"sd1"`` /
    ``"sd2"`` from the cross-attention's context width (768 / 1024), else None."""
    sd = _bare(state_dict)
    if ADM_KEY in sd:
        return "sdxl"
    key = _context_key(sd)
    if key is None or sd[key].dim() != 2:
        return None
    family = FAMILIES.get(int(sd[key].shape[1]))
    return family[0] if family else None


def _family_label(sdxl: bool, context_dim: int | None) -> str | None:
    """A family's name for error messages: SDXL, SD1, SD2, "SD1/SD2" for another width without
    label_emb (None when nothing tells)."""
    if sdxl:
        return "SDXL"
    family = FAMILIES.get(context_dim)
    return family[0].upper() if family and family[0] != "sdxl" else None


def _depths(sh: Shapes, enc, nrb: int) -> tuple[dict[int, int], int]:
    """Transformer blocks per attention level (one count per level, else an error) and in the
    middle block; ``enc.transformers`` lists ``nrb`` transformers per attention level, in order."""
    per_level: dict[int, set[int]] = {}
    for j, (prefix, _) in enumerate(enc.transformers):
        level = enc.attn_levels[j // nrb]
        count = len(sh.indices(prefix + "transformer_blocks."))
        per_level.setdefault(level, set()).add(count)
    uneven = [lv for lv, counts in per_level.items() if len(counts) != 1]
    if uneven:
        raise sh.error(f"ControlNet level {uneven[0]} has transformers of different depths "
                       f"{sorted(per_level[uneven[0]])}; not a layout this loader knows")
    middle = len(sh.indices("middle_block.1.transformer_blocks."))
    return {lv: counts.pop() for lv, counts in per_level.items()}, middle


def _depth_fields(levels: dict[int, int], middle: int, count: int, template) -> dict:
    """``transformer_depth`` (one number when every transformer agrees and the template has one,
    else one per level, levels without attention taking the template's unused value) and
    ``transformer_depth_middle`` (-1 when it is the last level's, sgm's rule)."""
    if isinstance(template.transformer_depth, int) and len(set(levels.values()) | {middle}) == 1:
        return {"transformer_depth": middle, "transformer_depth_middle": -1}
    fill = [template.depth_at(i) if isinstance(template.transformer_depth, int)
            or i < len(template.transformer_depth) else 1 for i in range(count)]
    depth = tuple(levels.get(i, fill[i]) for i in range(count))
    return {"transformer_depth": depth,
            "transformer_depth_middle": -1 if middle == depth[-1] else middle}


# ------------------------------------------------------------------------------- config inference

def infer_controlnet_config(state_dict: Mapping[str, torch.Tensor], base: ModelConfig | None = None,
                            *, path=None) -> tuple[ControlNetConfig, list[str]]:
    """The ControlNet's config from its tensor shapes, and the one-line rules that decided it.
    Heads (and the fields no weight depends on) come from ``base.unet`` when given, else from the
    family's built-in config chosen by the context width."""
    sh = Shapes(_bare(state_dict), str(path) if path is not None else "state dict")
    rules: list[str] = []
    mc, in_ch = sh("input_blocks.0.0.weight")[:2]
    hint = sh("input_hint_block.0.weight")[1]
    rules.append(f"model_channels = {mc}, in_channels = {in_ch} (input_blocks.0.0.weight)")
    rules.append(f"hint_channels = {hint} (input_hint_block.0.weight has {hint} input channels)")

    enc = read_encoder(sh, "", mc, "ControlNet")
    nrb, mult, attn_levels = enc.num_res_blocks, enc.channel_mult, enc.attn_levels
    rules.append(f"channel_mult = {mult}, num_res_blocks = {nrb} (ResBlock widths of "
                 f"input_blocks, levels split at the Downsample blocks)")
    if not sh.has("middle_block.1.proj_in.weight"):
        raise sh.error("middle_block.1 is not a SpatialTransformer (no proj_in); "
                       "not a ControlNet layout this loader knows")
    adm = sh(ADM_KEY)[1] if sh.has(ADM_KEY) else 0
    if adm:
        rules.append(f"adm_in_channels = {adm} ({ADM_KEY}: SDXL's vector conditioning)")
    context_dim, use_linear = _context_and_projection(sh, mc * mult[-1], enc.transformers)
    if context_dim is None:  # only depth-0 transformers: no key holds the context width
        if base is None:
            raise sh.error("no transformer block tells the context width; pass the base model "
                           "or a config")
        context_dim = base.unet.context_dim
    levels, middle = _depths(sh, enc, nrb)
    rules.append(f"transformer depths per attention level {levels}, middle {middle}, context_dim = "
                 f"{context_dim} (attn2.to_k.weight), use_linear_in_transformer = {use_linear} "
                 f"(proj_in.weight is {'2-D' if use_linear else '4-D'})")

    if base is not None:
        template, heads_from = base.unet, "the base model's"
    elif context_dim in FAMILIES:
        family, name = FAMILIES[context_dim]
        template, heads_from = builtin_config(name).unet, f"the {family} family's ({name})"
    else:
        raise sh.error(f"cannot tell the attention heads: context width {context_dim} is not "
                       "SD1's (768), SD2's (1024) or SDXL's (2048) and heads cannot be read from "
                       "shapes; pass the base model or a config")
    widths = sorted({mc * mult[i] for i in attn_levels} | {mc * mult[-1]})
    rule, bad = head_rule(template, widths)
    if bad:
        raise sh.error(f"ambiguous attention heads: {heads_from} rule {rule} does not divide "
                       f"attention width {bad[0]}; pass a config")
    rules.append(f"{rule} (heads cannot be read from shapes: {heads_from} rule)")
    resolutions = attention_resolutions(attn_levels, template)
    rules.append(f"attention_resolutions = {resolutions} (levels {attn_levels} have "
                 "proj_in keys)")
    unet = dataclasses.replace(
        template, in_channels=in_ch, model_channels=mc, attention_resolutions=resolutions,
        num_res_blocks=nrb, channel_mult=mult, context_dim=context_dim,
        use_linear_in_transformer=use_linear, adm_in_channels=adm,
        **_depth_fields(levels, middle, len(mult), template))
    return ControlNetConfig.from_unet(unet, hint_channels=hint), rules


def _context_and_projection(sh: Shapes, middle_width: int, transformers) -> tuple[int, bool]:
    """The context width and projection kind every transformer shares (depths may differ per
    level: SDXL)."""
    contexts, linear = set(), set()
    for prefix, ch in [("middle_block.1.", middle_width), *transformers]:
        if sh.has(prefix + "transformer_blocks.0.attn2.to_k.weight"):  # none in a depth-0 one
            contexts.add(sh(prefix + "transformer_blocks.0.attn2.to_k.weight")[1])
        proj = sh(prefix + "proj_in.weight")
        linear.add(len(proj) == 2)
        if proj[0] != ch:
            raise sh.error(f"{prefix}proj_in maps {ch} channels to an attention width of "
                           f"{proj[0]}: the head layout cannot be read from shapes; pass a config")
    if len(contexts) > 1 or len(linear) != 1:
        raise sh.error("ControlNet transformers disagree on context width or projection kind; "
                       "not a layout this loader knows")
    return (contexts.pop() if contexts else None), linear.pop()


def resolve_controlnet_config(config, path, state_dict: Mapping[str, torch.Tensor],
                              base: ModelConfig | None = None) -> tuple[ControlNetConfig, str]:
    """(config, where it came from): ``config`` (a :class:`ControlNetConfig`, a cldm YAML path or
    a built-in cldm stem such as ``cldm_v15``), else inferred from the shapes."""
    if isinstance(config, ControlNetConfig):
        return config, "ControlNetConfig given by the caller"
    if config is not None:
        text = str(config)
        if text.endswith((".yaml", ".yml")) or os.sep in text or Path(text).is_file():
            return load_cldm_config(text)[1], f"config file {text}"
        return builtin_cldm_config(text)[1], f"built-in config {text}"
    embedded = _embedded_cldm_config(path)
    if embedded is not None:
        return embedded, f"the file's {CONFIG_METADATA_KEY} header"
    cfg, _ = infer_controlnet_config(state_dict, base, path=path)
    if base is not None:
        return cfg, "inferred from the tensor shapes (heads from the base model)"
    family, name = FAMILIES[cfg.context_dim]
    return cfg, f"inferred from the tensor shapes ({family}; heads from built-in config {name})"


def _embedded_cldm_config(path) -> ControlNetConfig | None:
    """The ControlNet config a safetensors file carries in its header (a cldm tree as JSON, as
    ``ldm train-controlnet`` writes it), or None."""
    if path is None or Path(path).is_dir() or Path(path).suffix.lower() != ".safetensors":
        return None
    text = read_safetensors_metadata(path).get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        return parse_cldm_config(json.loads(text), f"its {CONFIG_METADATA_KEY} metadata")[1]
    except (ValueError, ConfigError) as exc:
        raise file_error(path, str(exc) if isinstance(exc, ConfigError)
                         else f"its {CONFIG_METADATA_KEY} metadata is not valid JSON") from None


# ---------------------------------------------------------------------------------------- loading

def _blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix):].split(".")[0] for key in sd if key.startswith(prefix)})


def _own_depths(sd: Mapping[str, torch.Tensor], unet) -> dict:
    """The ControlNet's transformer depths at ``unet``'s attention levels: no residual's shape
    depends on them, and diffusers' smaller SDXL ControlNets have fewer blocks
    than the UNet they steer (or none: a transformer of norm and projections only)."""
    per_block, levels = unet.num_res_blocks + 1, {}  # ResBlocks then a Downsample per level
    attn = {i for i in range(len(unet.channel_mult)) if 2 ** i in unet.attention_resolutions}
    for level in attn:
        found = {_blocks(sd, f"input_blocks.{level * per_block + j + 1}.1.transformer_blocks.")
                 for j in range(unet.num_res_blocks)}
        if len(found) != 1:
            return {}  # uneven: the keys are compared as they are
        levels[level] = found.pop()
    return _depth_fields(levels, _blocks(sd, "middle_block.1.transformer_blocks."),
                         len(unet.channel_mult), unet)


def check_fits_base(sd: Mapping[str, torch.Tensor], base: ModelConfig, path) -> None:
    """Refuse a ControlNet (original keys, no prefix; only shapes are read, meta tensors do) whose
    residuals cannot fit ``base``'s UNet: one layer and both shapes named."""
    if "input_blocks.0.0.weight" not in sd or "input_hint_block.0.weight" not in sd:
        return  # strict key checking names what is missing
    # the ControlNet's own input convolution and hint encoder need not match the base (e.g. an
    # inpainting base UNet reads 9 channels, its ControlNets 4)
    unet = dataclasses.replace(base.unet, in_channels=sd["input_blocks.0.0.weight"].shape[1],
                               **_own_depths(sd, base.unet))
    want = ControlNetConfig.from_unet(unet, hint_channels=sd["input_hint_block.0.weight"].shape[1])
    with torch.device("meta"):
        expected = ControlNet(want).state_dict()
    encoder = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")  # the UNet's copy
    differ = [k for k in expected if k.startswith(encoder) and k in sd
              and tuple(sd[k].shape) != tuple(expected[k].shape)]
    absent = [k for k in expected if k not in sd and k.startswith(("input_blocks.", "middle_block."))]
    extra = [k for k in sd if k not in expected and k.startswith(("input_blocks.", "middle_block."))]
    here_ctx = _context_key(sd)
    ours = _family_label(ADM_KEY in sd, int(sd[here_ctx].shape[1])
                         if here_ctx and sd[here_ctx].dim() == 2 else None)
    theirs = _family_label(base.is_sdxl, base.unet.context_dim)
    if (ours == "SDXL") != (theirs == "SDXL"):  # label_emb tells SDXL at any width
        ours, theirs = ours or "SD1/SD2", theirs or "SD1/SD2"
    guess = (f" (an {ours} ControlNet on an {theirs} model?)" if ours and theirs and ours != theirs
             else "")
    if ADM_KEY in expected and ADM_KEY not in sd:
        absent.insert(0, ADM_KEY)
    if differ:
        key = next((k for k in differ if ".attn2.to_k." in k), differ[0])
        raise file_error(path, f"made for another model: {key} is {list(sd[key].shape)} here but "
                         f"{list(expected[key].shape)} in the model{guess}")
    if absent or extra:
        key, where = (absent[0], "missing here but present in the model") if absent else \
            (extra[0], "present here but not in the model")
        raise file_error(path, f"made for another model: {key} is {where} (the ControlNet's "
                         f"levels or blocks differ from the base UNet's){guess}")


class ControlNetWeights(NamedTuple):
    """A ControlNet's tensors under our names (no prefix), as read by :func:`read_controlnet`."""

    state: dict[str, torch.Tensor]
    mapped: MappedFile | None  # the memory map the tensors live in, to release after casting
    config: ControlNetConfig | None  # from a diffusers folder's config.json
    config_source: str | None
    layout: str  # one line: which layout the keys are in
    file: Path  # the weight file read


def is_controlnet_folder(path) -> bool:
    """A folder holding a ``config.json`` (a diffusers model folder; its class is checked on loading)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _folder_config(folder: Path) -> ControlNetConfig:
    import json

    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise file_error(path, f"not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise file_error(path, "expected a JSON object")
    if data.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise file_error(path, f"a {data['_class_name']}, not a ControlNetModel")
    return config_from_diffusers(data, path)


def _folder_weights(folder: Path, dtype: torch.dtype) -> Path:
    names = sorted(WEIGHT_NAMES, key=lambda n: ".fp16." not in n) if dtype == torch.float16 \
        else WEIGHT_NAMES
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise file_error(folder, f"no weights (looked for {', '.join(names)})")


def read_controlnet(path, dtype=torch.float32) -> ControlNetWeights:
    """A ControlNet file (either layout) or diffusers folder, its keys renamed to ours; not yet
    checked against a config. ``dtype`` only picks a folder's fp16 weight variant."""
    path = Path(path)
    cfg = source = None
    if path.is_dir():
        if not is_controlnet_folder(path):
            raise file_error(path, "a folder without config.json (expected a diffusers "
                             "ControlNetModel folder)")
        cfg, source = _folder_config(path), f"config file {path / 'config.json'}"
        file = _folder_weights(path, dtype)
    else:
        file = path
    sd, mapped = read_weights(file)
    if _is_original(sd):
        return ControlNetWeights(_bare(sd), mapped, cfg, source, "input_hint_block.* / "
                                 "zero_convs.* keys: an original-layout ControlNet", file)
    if is_diffusers_controlnet(sd):
        # names depend only on the block structure; without config.json it is read off the keys
        sd = from_diffusers(sd, cfg or skeleton_config(sd, file), path=file)
        return ControlNetWeights(sd, mapped, cfg, source, "controlnet_cond_embedding.* / "
                                 "controlnet_down_blocks.* keys: a diffusers-layout ControlNet", file)
    what = ("a Stable Diffusion model, not a ControlNet" if any(
        k.startswith("model.diffusion_model.") for k in sd) else "not a ControlNet")
    raise file_error(file, f"{what} (no input_hint_block.* / zero_convs.* or "
                     "controlnet_cond_embedding.* keys)")


def load_controlnet(path, base: ModelConfig | None = None, *, config=None,
                    dtype=torch.float32, device="cpu") -> ControlNet:
    """A ready :class:`ControlNet` (eval mode) from a ControlNet file in the original layout
    (safetensors, or a weights-only ``.pth``/``.ckpt``; with or without ``control_model.``) or in
    diffusers' layout (a weight file, or a folder with ``config.json`` and
    ``diffusion_pytorch_model[.fp16].safetensors``/``.bin``).
    ``base``: the model it will steer; a ControlNet for another family or width is refused.
    ``config``: see :func:`resolve_controlnet_config`; a folder's ``config.json`` comes next.
    Errors are one-line CheckpointErrors (``"<path>: <problem>"``), or ConfigErrors for a bad
    ``config``."""
    dtype = parse_dtype(dtype)
    found = read_controlnet(path, dtype)
    sd, mapped, path = found.state, found.mapped, found.file
    if base is not None:
        check_fits_base(sd, base, path)
    if config is None and found.config is not None:
        cfg, source = found.config, found.config_source
    else:
        cfg, source = resolve_controlnet_config(config, path, sd, base)
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device: no memory, no init
        net = ControlNet(cfg)
    check_keys(sd, net.state_dict(keep_vars=True), path=path, what="the ControlNet config",
               hint=f" (config: {source})")
    weights = cast_weights(sd, dtype, release=mapped.release if mapped is not None else None)
    del sd, mapped, found
    net.load_state_dict(weights, strict=True, assign=True)
    assert_materialised(net, path)
    net.eval()
    if torch.device(device).type != "cpu":
        net.to(device)
    net.config_source = source
    return net
