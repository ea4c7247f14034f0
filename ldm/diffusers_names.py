"""Module names of our CompVis-layout models in the diffusers / transformers layout.

The table is derived from the model itself: the UNet's and autoencoder's block lists are walked in
order (a Downsample closes a down level, an Upsample an up level), each block is anchored to its
diffusers block (``input_blocks.4.1`` → ``down_blocks.1.attentions.0``) and every module under it
is renamed by a small per-block-type table of local names. Mapping runs one way only (ours →
diffusers); the reverse is the inverted dict. Uses: loading diffusers folders, and kohya LoRA names
(``lora_unet_`` + diffusers path with dots as underscores).
"""
from __future__ import annotations

from torch import nn

from .modules.autoencoder import AttnBlock, AutoencoderKL, ResnetBlock
from .modules.autoencoder import Downsample as VAEDownsample
from .modules.autoencoder import Upsample as VAEUpsample
from .modules.attention import SpatialTransformer
from .modules.unet import Downsample, ResBlock, UNetModel, Upsample

# Local names inside one block, ours → diffusers. ``None``: same names on both sides.
_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
# the autoencoder's single-head attention: 1×1 convolutions here, linear layers in diffusers
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_DOWNSAMPLE = {"op": "conv"}
_RESAMPLE_CONV = {"conv": "conv"}
_TIME_EMBED = {"0": "linear_1", "2": "linear_2"}
_UNET_OUT = {"0": "conv_norm_out", "2": "conv_out"}
# one OpenCLIP residual block ↔ one transformers CLIPEncoderLayer (q/k/v are fused in ``attn``)
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "attn": "self_attn", "attn.out_proj": "self_attn.out_proj",
                   "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}

# our block path → (diffusers block path, local-name table or None for "same names")
Anchors = dict[str, tuple[str, dict[str, str] | None]]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _apply_anchors(root: nn.Module, anchors: Anchors) -> dict[str, str]:
    """Map every anchor and every parameter-owning module below one to its diffusers path.

    A parameter-owning module outside all anchors, or with a local name its block's table does not
    know, means the model has a structure this table was not built for: that is an error, so no
    weight can be skipped silently.
    """
    out: dict[str, str] = {}
    for name, module in root.named_modules():
        if name in anchors:
            if anchors[name][0]:  # a root with no module of its own on the diffusers side is left out
                out[name] = anchors[name][0]
            continue
        if not _owns_parameters(module):
            continue
        parts = name.split(".")
        for cut in range(len(parts), -1, -1):
            prefix = ".".join(parts[:cut])
            if prefix in anchors:
                break
        else:
            raise ValueError(f"{type(root).__name__}: no diffusers name for module '{name}'")
        target, table = anchors[prefix]
        local = ".".join(parts[cut:])
        if table is not None:
            if local not in table:
                raise ValueError(f"{type(root).__name__}: no diffusers name for '{local}' in "
                                 f"'{prefix}' ({type(root.get_submodule(prefix)).__name__})")
            local = table[local]
        out[name] = _join(target, local)
    return out


def _unet_anchors(unet: UNetModel) -> Anchors:
    anchors: Anchors = {"time_embed": ("time_embedding", _TIME_EMBED), "out": ("", _UNET_OUT),
                        "input_blocks.0.0": ("conv_in", None)}
    if hasattr(unet, "label_emb"):  # SDXL's vector input: diffusers' text_time add_embedding
        anchors["label_emb.0"] = ("add_embedding", _TIME_EMBED)

    def block_layers(kind: str, level: int, index: int, our_block: str, block: nn.Module) -> bool:
        """Anchor the layers of one TimestepEmbedSequential; True when it closes the level."""
        closes = False
        for k, layer in enumerate(block):
            ours, theirs = f"{our_block}.{k}", f"{kind}.{level}"
            if isinstance(layer, ResBlock):
                anchors[ours] = (f"{theirs}.resnets.{index}", _RESBLOCK)
            elif isinstance(layer, SpatialTransformer):
                anchors[ours] = (f"{theirs}.attentions.{index}", None)
            elif isinstance(layer, Downsample):
                anchors[ours] = (f"{theirs}.downsamplers.0", _DOWNSAMPLE)
                closes = True
            elif isinstance(layer, Upsample):
                anchors[ours] = (f"{theirs}.upsamplers.0", _RESAMPLE_CONV)
                closes = True
            else:
                raise ValueError(f"UNetModel: unexpected {type(layer).__name__} at '{ours}'")
        return closes

    level = index = 0
    for i, block in enumerate(unet.input_blocks):
        if i == 0:
            continue
        if block_layers("down_blocks", level, index, f"input_blocks.{i}", block):
            level, index = level + 1, 0
        else:
            index += 1
    resnets = attentions = 0
    for k, layer in enumerate(unet.middle_block):
        if isinstance(layer, ResBlock):
            anchors[f"middle_block.{k}"] = (f"mid_block.resnets.{resnets}", _RESBLOCK)
            resnets += 1
        else:
            anchors[f"middle_block.{k}"] = (f"mid_block.attentions.{attentions}", None)
            attentions += 1
    # the top up level (last output blocks) has no Upsample: it ends with the list
    level = index = 0
    for i, block in enumerate(unet.output_blocks):
        if block_layers("up_blocks", level, index, f"output_blocks.{i}", block):
            level, index = level + 1, 0
        else:
            index += 1
    return anchors


def unet_module_map(unet: UNetModel) -> dict[str, str]:
    """Our module path (relative to the UNet) → diffusers ``UNet2DConditionModel`` module path."""
    return _apply_anchors(unet, _unet_anchors(unet))


def _vae_side_anchors(side: str, coder: nn.Module, levels: list[tuple[int, int]]) -> Anchors:
    """Anchors of one side of the autoencoder; ``levels`` pairs our level index with diffusers'."""
    group = "down_blocks" if side == "encoder" else "up_blocks"
    ours_group = "down" if side == "encoder" else "up"
    anchors: Anchors = {f"{side}.conv_in": (f"{side}.conv_in", None),
                        f"{side}.norm_out": (f"{side}.conv_norm_out", None),
                        f"{side}.conv_out": (f"{side}.conv_out", None),
                        f"{side}.mid.block_1": (f"{side}.mid_block.resnets.0", _VAE_RESNET),
                        f"{side}.mid.attn_1": (f"{side}.mid_block.attentions.0", _VAE_ATTN),
                        f"{side}.mid.block_2": (f"{side}.mid_block.resnets.1", _VAE_RESNET)}
    for ours_i, theirs_i in levels:
        level = getattr(coder, ours_group)[ours_i]
        ours, theirs = f"{side}.{ours_group}.{ours_i}", f"{side}.{group}.{theirs_i}"
        for name, child in level.named_children():
            if name in ("block", "attn"):
                kind, table = ("resnets", _VAE_RESNET) if name == "block" else ("attentions", _VAE_ATTN)
                for j, sub in enumerate(child):
                    expected = ResnetBlock if name == "block" else AttnBlock
                    if not isinstance(sub, expected):
                        raise ValueError(f"AutoencoderKL: unexpected {type(sub).__name__} at "
                                         f"'{ours}.{name}.{j}'")
                    anchors[f"{ours}.{name}.{j}"] = (f"{theirs}.{kind}.{j}", table)
            elif isinstance(child, (VAEDownsample, VAEUpsample)):
                resample = "downsamplers" if isinstance(child, VAEDownsample) else "upsamplers"
                anchors[f"{ours}.{name}"] = (f"{theirs}.{resample}.0", _RESAMPLE_CONV)
            else:
                raise ValueError(f"AutoencoderKL: unexpected '{ours}.{name}'")
    return anchors


def vae_module_map(vae: AutoencoderKL) -> dict[str, str]:
    """Our module path (relative to the autoencoder) → diffusers ``AutoencoderKL`` module path.

    Our decoder keeps CompVis indexing (``up[0]`` is the full-resolution level, run last); diffusers
    numbers up blocks in the order they run, so ``decoder.up.(n-1-i)`` ↔ ``decoder.up_blocks.i``.
    """
    n_enc, n_dec = len(vae.encoder.down), len(vae.decoder.up)
    anchors: Anchors = {"quant_conv": ("quant_conv", None),
                        "post_quant_conv": ("post_quant_conv", None)}
    anchors.update(_vae_side_anchors("encoder", vae.encoder, [(i, i) for i in range(n_enc)]))
    anchors.update(_vae_side_anchors("decoder", vae.decoder, [(n_dec - 1 - i, i) for i in range(n_dec)]))
    return _apply_anchors(vae, anchors)


def text_module_map(text_encoder: nn.Module) -> dict[str, str]:
    """Our text-encoder module path → ``transformers.CLIPTextModel`` module path (transformers 5
    layout, without the ``text_model.`` prefix that older saved files carry).

    SD1's tower (:mod:`ldm.modules.clip_text`) has CLIPTextModel's module names under
    ``transformer.text_model``, so the names carry over unchanged. SD2's OpenCLIP tower maps
    block by block; its fused attention input projection (``attn.in_proj_weight``) corresponds to
    ``self_attn.{q,k,v}_proj`` together, and the tower's own tensors (``positional_embedding``,
    ``text_projection``, ``logit_scale``) are parameters rather than modules and are not listed.
    """
    if hasattr(text_encoder, "transformer") and hasattr(text_encoder.transformer, "text_model"):
        return _apply_anchors(text_encoder, {"transformer.text_model": ("", None)})
    tower = text_encoder.model
    anchors: Anchors = {"model.token_embedding": ("embeddings.token_embedding", None),
                        "model.ln_final": ("final_layer_norm", None),
                        "model": ("", {})}  # the tower root: no other module of its own
    for i, _ in enumerate(tower.transformer.resblocks):
        anchors[f"model.transformer.resblocks.{i}"] = (f"encoder.layers.{i}", _OPENCLIP_BLOCK)
    return _apply_anchors(text_encoder, anchors)


COMPONENTS = {"unet": "model.diffusion_model", "vae": "first_stage_model",
              "text_encoder": "cond_stage_model"}


def diffusers_module_map(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Full module path in our LatentDiffusion → (diffusers component, module path inside it)."""
    out: dict[str, tuple[str, str]] = {}
    for component, fn in (("unet", unet_module_map), ("vae", vae_module_map),
                          ("text_encoder", text_module_map)):
        prefix = COMPONENTS[component]
        for ours, theirs in fn(model.get_submodule(prefix)).items():
            out[_join(prefix, ours)] = (component, theirs)
    return out


def kohya_lora_name(component: str, diffusers_path: str) -> str:
    """The kohya-ss LoRA module name: ``lora_unet_`` / ``lora_te_text_model_`` + path with '_'."""
    if component == "unet":
        return "lora_unet_" + diffusers_path.replace(".", "_")
    if component == "text_encoder":
        # kohya names follow the older transformers layout, which kept the text_model prefix
        return "lora_te_text_model_" + diffusers_path.replace(".", "_")
    raise ValueError(f"kohya LoRA names exist for unet and text_encoder, not {component!r}")
