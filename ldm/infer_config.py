"""Read a model's architecture from the tensor shapes of a CompVis-layout state dict.

:func:`infer_config` starts from the built-in config of the detected family (``base``) and replaces
every field that the weights' shapes decide: the UNet's widths, levels, attention placement and
transformer depth, the autoencoder's widths and levels, and the text tower's size. Only ``.shape``
is read, so the tensors may be on the meta device or memory-mapped. Fields no weight depends on
(the noise schedule, scale factor, parameterization, sampling defaults, padding rules, the text
layer the UNet reads) stay as ``base`` has them.

Attention head counts change no weight's shape (every head layout of a width has the same
projections), so they follow the family's rule taken from ``base``: SD1's fixed number of heads,
SD2's fixed head width, and 64-wide heads in the text towers. Where that rule does not fit a width
the file has, there is no way to tell from the file, and the error says to pass a config.
Every decision is recorded as a one-line rule.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Mapping

import torch

from .config import ConfigError, ModelConfig, validate
from .weights_io import CheckpointError, file_error

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPENCLIP = "cond_stage_model.model."

_PASS_CONFIG = "pass a config (--config FILE.yaml)"


class Shapes:
    """Shape look-ups on a state dict; missing keys become one-line CheckpointErrors."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], where: str):
        self.sd = state_dict
        self.where = where

    def error(self, problem: str) -> CheckpointError:
        return file_error(self.where, problem)

    def has(self, key: str) -> bool:
        return key in self.sd

    def __call__(self, key: str) -> tuple[int, ...]:
        if key not in self.sd:
            raise self.error(f"missing {key}; cannot infer the model's configuration from its shapes")
        return tuple(self.sd[key].shape)

    def indices(self, prefix: str) -> list[int]:
        """Sorted distinct integers N of keys ``prefix + "N." ...``."""
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        found = {int(m.group(1)) for key in self.sd if (m := pattern.match(key))}
        return sorted(found)


def dense_count(sh: Shapes, indices: list[int], what: str) -> int:
    if indices != list(range(len(indices))):
        raise sh.error(f"{what} are numbered {indices}, not 0..{len(indices) - 1}; "
                       "not a layout this loader knows")
    return len(indices)


# ------------------------------------------------------------------------------------------ UNet

@dataclasses.dataclass
class Encoder:
    """The encoder half of a UNet (or a ControlNet's copy of it), read from shapes."""

    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attn_levels: list[int]  # levels whose ResBlocks are followed by a SpatialTransformer
    transformers: list[tuple[str, int]]  # (key prefix, channels) of each input-side transformer


def read_encoder(sh: Shapes, prefix: str, mc: int, what: str) -> Encoder:
    """``prefix + input_blocks.*``: ResBlocks (+ transformer) grouped into levels by the Downsample
    blocks; the config schema needs the same ResBlock count, one width and all-or-no attention
    per level."""
    n_in = dense_count(sh, sh.indices(prefix + "input_blocks."), "input_blocks")
    levels: list[list[tuple[int, bool]]] = [[]]
    transformers: list[tuple[str, int]] = []
    for k in range(1, n_in):
        p = f"{prefix}input_blocks.{k}."
        if sh.has(p + "0.op.weight"):
            levels.append([])
        elif sh.has(p + "0.in_layers.2.weight"):
            ch = sh(p + "0.in_layers.2.weight")[0]
            attn = sh.has(p + "1.proj_in.weight")
            if attn:
                transformers.append((p + "1.", ch))
            levels[-1].append((ch, attn))
        else:
            raise sh.error(f"input_blocks.{k} is neither a ResBlock nor a Downsample; "
                           f"not a {what} layout this loader knows")
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise sh.error(f"{what} levels have {[len(lv) for lv in levels]} ResBlocks each; this config "
                       "schema needs the same number at every level")
    mult, attn_levels = [], []
    for i, level in enumerate(levels):
        widths, flags = {ch for ch, _ in level}, {a for _, a in level}
        if len(widths) != 1 or next(iter(widths)) % mc:
            raise sh.error(f"{what} level {i} has ResBlock widths {sorted(widths)}, not one multiple "
                           f"of model_channels {mc}")
        if len(flags) != 1:
            raise sh.error(f"{what} level {i} has cross-attention in some ResBlocks but not all; "
                           "this config schema cannot express that")
        mult.append(next(iter(widths)) // mc)
        if flags.pop():
            attn_levels.append(i)
    return Encoder(counts.pop(), tuple(mult), attn_levels, transformers)


def read_transformers(sh: Shapes, transformers: list[tuple[str, int]], strip: str, what: str
                      ) -> tuple[int, int, bool]:
    """(depth, context width, linear projections) shared by every transformer of the list."""
    depths, contexts, linear = set(), set(), set()
    for prefix, ch in transformers:
        depths.add(dense_count(sh, sh.indices(prefix + "transformer_blocks."),
                               prefix.removeprefix(strip) + "transformer_blocks"))
        contexts.add(sh(prefix + "transformer_blocks.0.attn2.to_k.weight")[1])
        proj = sh(prefix + "proj_in.weight")
        linear.add(len(proj) == 2)
        if proj[0] != ch:
            raise sh.error(f"{prefix.removeprefix(strip)}proj_in maps {ch} channels to an attention "
                           f"width of {proj[0]}: the head layout cannot be read from shapes; "
                           f"{_PASS_CONFIG}")
    if len(depths) != 1:
        raise sh.error(f"{what} transformers have different depths {sorted(depths)}; this config "
                       "schema has one transformer_depth for all levels")
    if len(contexts) != 1 or len(linear) != 1:
        raise sh.error(f"{what} transformers disagree on context width or projection kind; "
                       "not a layout this loader knows")
    return depths.pop(), contexts.pop(), linear.pop()


def head_rule(template, widths: list[int]) -> tuple[str, list[int]]:
    """The head rule of ``template`` (a UNetConfig) and the attention widths it cannot split."""
    if template.num_head_channels == -1:
        return f"num_heads = {template.num_heads}", [w for w in widths if w % template.num_heads]
    return (f"num_head_channels = {template.num_head_channels}",
            [w for w in widths if w % template.num_head_channels])


def attention_resolutions(attn_levels: list[int], template) -> tuple[int, ...]:
    """Level i is resolution 2**i; the template's order is kept when the set is the same (only
    membership counts)."""
    found = tuple(2 ** i for i in attn_levels)
    return template.attention_resolutions if set(found) == set(template.attention_resolutions) else found


def _unet(sh: Shapes, base: ModelConfig, rules: list[str]):
    cfg = base.unet
    mc, in_ch = sh(UNET + "input_blocks.0.0.weight")[:2]
    out_ch = sh(UNET + "out.2.weight")[0]
    rules.append(f"unet.model_channels = {mc} (input_blocks.0.0.weight has {mc} output channels)")
    rules.append(f"unet.in_channels = {in_ch} (input_blocks.0.0.weight has {in_ch} input channels)")
    rules.append(f"unet.out_channels = {out_ch} (out.2.weight has {out_ch} output channels)")

    enc = read_encoder(sh, UNET, mc, "UNet")
    nrb, mult, attn_levels, transformers = (enc.num_res_blocks, enc.channel_mult, enc.attn_levels,
                                            list(enc.transformers))
    levels = len(mult)
    rules.append(f"unet.channel_mult = {mult} (ResBlock output widths / {mc}, levels split "
                 f"at the {levels - 1} Downsample input blocks)")
    rules.append(f"unet.num_res_blocks = {nrb} (ResBlocks per level of input_blocks)")
    resolutions = attention_resolutions(attn_levels, cfg)

    # output blocks must mirror the input side: nrb + 1 per level, attention where the input has it
    n_out = dense_count(sh, sh.indices(UNET + "output_blocks."), "output_blocks")
    if n_out != levels * (nrb + 1):
        raise sh.error(f"{n_out} output_blocks, expected {levels * (nrb + 1)} for "
                       f"{levels} levels of {nrb} ResBlocks; not a layout this loader knows")
    for k in range(n_out):
        level = levels - 1 - k // (nrb + 1)
        p = f"{UNET}output_blocks.{k}."
        if not sh.has(p + "0.in_layers.2.weight"):
            raise sh.error(f"output_blocks.{k} has no ResBlock; not a layout this loader knows")
        attn = sh.has(p + "1.proj_in.weight")
        if attn != (level in attn_levels):
            raise sh.error(f"output_blocks.{k} {'has' if attn else 'lacks'} cross-attention but "
                           f"input level {level} {'lacks' if attn else 'has'} it; this config schema "
                           "cannot express that")
        if attn:
            transformers.append((p + "1.", mc * mult[level]))
    rules.append(f"unet.attention_resolutions = {resolutions} (levels "
                 f"{attn_levels} have proj_in keys; level i is resolution 2**i)")

    mid = UNET + "middle_block.1."
    if not sh.has(mid + "proj_in.weight"):
        raise sh.error("middle_block.1 is not a SpatialTransformer (no proj_in); "
                       "not a Stable Diffusion UNet layout")
    transformers.insert(0, (mid, mc * mult[-1]))

    # transformer internals: depth, context width, projection kind, inner width
    depth, context_dim, use_linear = read_transformers(sh, transformers, UNET, "UNet")
    rules.append(f"unet.transformer_depth = {depth} (middle_block.1 has {depth} transformer_blocks, "
                 "as every transformer does)")
    rules.append(f"unet.context_dim = {context_dim} (attn2.to_k.weight has {context_dim} input "
                 "features)")
    rules.append(f"unet.use_linear_in_transformer = {use_linear} (proj_in.weight is "
                 f"{'2-D: linear' if use_linear else '4-D: 1x1 conv'})")

    # heads: no shape depends on them; the family's rule from base must fit every attention width
    widths = sorted({mc * mult[i] for i in attn_levels} | {mc * mult[-1]})
    rule, bad = head_rule(cfg, widths)
    if bad:
        raise sh.error(f"ambiguous UNet attention heads: the family's rule {rule} does not divide "
                       f"attention width {bad[0]} and heads cannot be read from shapes; "
                       f"{_PASS_CONFIG}")
    rules.append(f"unet.{rule} (heads cannot be read from shapes: the family's rule, which "
                 f"divides attention widths {widths})")

    return dataclasses.replace(
        cfg, in_channels=in_ch, out_channels=out_ch, model_channels=mc,
        attention_resolutions=resolutions, num_res_blocks=nrb, channel_mult=mult,
        transformer_depth=depth, context_dim=context_dim, use_linear_in_transformer=use_linear)


# ----------------------------------------------------------------------------------- autoencoder

def _autoencoder(sh: Shapes, base: ModelConfig, rules: list[str]):
    cfg = base.autoencoder
    enc, dec = VAE + "encoder.", VAE + "decoder."
    ch, in_ch = sh(enc + "conv_in.weight")[:2]
    out_ch = sh(dec + "conv_out.weight")[0]
    z, embed = sh(VAE + "post_quant_conv.weight")[:2]
    moments = sh(enc + "conv_out.weight")[0]
    if moments not in (z, 2 * z):
        raise sh.error(f"encoder.conv_out has {moments} output channels for {z} latent channels; "
                       "not a KL autoencoder layout")
    double_z = moments == 2 * z
    rules.append(f"autoencoder.ch = {ch}, in_channels = {in_ch} (encoder.conv_in.weight)")
    rules.append(f"autoencoder.out_ch = {out_ch} (decoder.conv_out.weight has {out_ch} outputs)")
    rules.append(f"autoencoder.z_channels = {z}, embed_dim = {embed} (post_quant_conv.weight "
                 f"maps {embed} to {z} channels)")
    rules.append(f"autoencoder.double_z = {double_z} (encoder.conv_out has {moments} outputs)")

    n_levels = dense_count(sh, sh.indices(enc + "down."), "encoder.down levels")
    if dense_count(sh, sh.indices(dec + "up."), "decoder.up levels") != n_levels or not n_levels:
        raise sh.error("the autoencoder's encoder and decoder have different numbers of levels")
    mult, attn_levels, blocks = [], [], set()
    for i in range(n_levels):
        p = f"{enc}down.{i}."
        blocks.add(dense_count(sh, sh.indices(p + "block."), f"encoder.down.{i}.block"))
        width = sh(p + "block.0.conv1.weight")[0]
        if width % ch:
            raise sh.error(f"encoder.down.{i} is {width} channels wide, not a multiple of ch {ch}")
        mult.append(width // ch)
        n_attn = len(sh.indices(p + "attn."))
        if n_attn:
            attn_levels.append(i)
        dec_attn = len(sh.indices(f"{dec}up.{i}.attn."))
        if bool(dec_attn) != bool(n_attn):
            raise sh.error(f"autoencoder level {i} has attention on one side only; "
                           "not a layout this loader knows")
    if len(blocks) != 1:
        raise sh.error(f"autoencoder levels have {sorted(blocks)} ResnetBlocks; this config schema "
                       "needs the same number at every level")
    nrb = blocks.pop()
    if not sh.has(enc + "mid.attn_1.q.weight") or not sh.has(dec + "mid.attn_1.q.weight"):
        raise sh.error("the autoencoder has no mid-block attention (mid.attn_1); "
                       "not a layout this loader knows")
    attn_res = tuple(cfg.resolution // 2 ** i for i in attn_levels)
    rules.append(f"autoencoder.ch_mult = {tuple(mult)} (encoder.down.i.block.0 widths / {ch})")
    rules.append(f"autoencoder.num_res_blocks = {nrb} (ResnetBlocks per encoder level)")
    where = (f"levels {attn_levels} have attn blocks, at resolution {cfg.resolution} / 2**level"
             if attn_levels else "no level has attn blocks")
    rules.append(f"autoencoder.attn_resolutions = {attn_res} ({where}; mid-block attention "
                 "present)")
    return dataclasses.replace(
        cfg, embed_dim=embed, z_channels=z, in_channels=in_ch, out_ch=out_ch, ch=ch,
        ch_mult=tuple(mult), num_res_blocks=nrb, attn_resolutions=attn_res, double_z=double_z)


# ------------------------------------------------------------------------------------------ text

def _mlp_ratio(width: int, inner: int) -> float:
    ratio = inner / width
    if int(width * ratio) != inner:  # the towers build int(width * mlp_ratio) units
        ratio = (inner + 0.5) / width
    return ratio


def _text(sh: Shapes, base: ModelConfig, rules: list[str]):
    cfg = base.text
    has_clip = any(k.startswith(CLIP) for k in sh.sd)
    has_openclip = any(k.startswith(OPENCLIP) for k in sh.sd)
    if has_clip == has_openclip:
        raise sh.error("cannot tell the text encoder: expected keys under exactly one of "
                       f"{CLIP}* (CLIP) and {OPENCLIP}* (OpenCLIP)")
    kind = "clip" if has_clip else "openclip"
    if kind != cfg.kind:
        raise sh.error(f"the text encoder is {kind} but the base config's is {cfg.kind}; "
                       "the detected family does not match the file")
    if kind == "clip":
        vocab, width = sh(CLIP + "embeddings.token_embedding.weight")
        max_length = sh(CLIP + "embeddings.position_embedding.weight")[0]
        layers = dense_count(sh, sh.indices(CLIP + "encoder.layers."), "text encoder layers")
        inner = sh(CLIP + "encoder.layers.0.mlp.fc1.weight")[0]
        projection = width
        rules.append(f"text.kind = clip (keys {CLIP}*)")
        rules.append(f"text.vocab_size = {vocab}, width = {width} (token_embedding.weight)")
        rules.append(f"text.max_length = {max_length} (position_embedding.weight has "
                     f"{max_length} rows)")
        rules.append(f"text.layers = {layers} (encoder.layers.0..{layers - 1})")
        rules.append(f"text.projection_dim = {width} (CLIP text model files have no projection: "
                     "the width, as the SD configs set it)")
    else:
        vocab, width = sh(OPENCLIP + "token_embedding.weight")
        max_length = sh(OPENCLIP + "positional_embedding")[0]
        layers = dense_count(sh, sh.indices(OPENCLIP + "transformer.resblocks."), "text encoder blocks")
        inner = sh(OPENCLIP + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        projection = sh(OPENCLIP + "text_projection")[1]
        rules.append(f"text.kind = openclip (keys {OPENCLIP}*)")
        rules.append(f"text.vocab_size = {vocab}, width = {width} (token_embedding.weight)")
        rules.append(f"text.max_length = {max_length} (positional_embedding has {max_length} rows)")
        rules.append(f"text.layers = {layers} (transformer.resblocks.0..{layers - 1})")
        rules.append(f"text.projection_dim = {projection} (text_projection is {width}x{projection})")
    ratio = _mlp_ratio(width, inner)
    rules.append(f"text.mlp_ratio = {ratio:g} (MLP of {inner} units at width {width})")
    # heads: no shape depends on them; the base tower's head width (64 in CLIP and OpenCLIP)
    head_width = cfg.width // cfg.heads
    if width % head_width:
        raise sh.error(f"ambiguous text encoder attention heads: width {width} is not a multiple of "
                       f"the family's head width {head_width} and heads cannot be read from shapes; "
                       f"{_PASS_CONFIG}")
    heads = width // head_width
    rules.append(f"text.heads = {heads} (heads cannot be read from shapes: width {width} / the "
                 f"family's {head_width} per head)")
    return dataclasses.replace(
        cfg, max_length=max_length, vocab_size=vocab, width=width, layers=layers, heads=heads,
        mlp_ratio=ratio, projection_dim=projection)


# ------------------------------------------------------------------------------------------- API

def infer_config(state_dict: Mapping[str, torch.Tensor], base: ModelConfig, *,
                 path: str | Path | None = None) -> tuple[ModelConfig, list[str]]:
    """``base`` with every architecture field set from the shapes of ``state_dict`` (CompVis keys),
    and the one-line rules that decided them. ``base`` is the built-in config of the detected family
    (``builtin_config(detection.config_name)``); its other fields are kept. Raises
    :class:`~ldm.weights_io.CheckpointError` (``"<path>: <problem>"``) where the shapes do not fit
    the schema or the family's head rule."""
    sh = Shapes(state_dict, str(path) if path is not None else "state dict")
    if not any(k.startswith(UNET) for k in state_dict):
        raise sh.error("not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)")
    rules: list[str] = []
    unet = _unet(sh, base, rules)
    autoencoder = _autoencoder(sh, base, rules)
    text = _text(sh, base, rules)
    cfg = base.replace(unet=unet, autoencoder=autoencoder, text=text, channels=autoencoder.embed_dim)
    rules.append(f"channels = {autoencoder.embed_dim} (the autoencoder's latent channels)")
    if unet.out_channels != autoencoder.embed_dim:
        raise sh.error(f"the UNet predicts {unet.out_channels} channels but the autoencoder's "
                       f"latents have {autoencoder.embed_dim}; the parts do not belong together")
    try:
        validate(cfg, sh.where)
    except ConfigError as exc:  # already "<where>: <problem>"
        raise CheckpointError(f"{exc} (configuration inferred from the file's shapes)") from None
    return cfg, rules
