"""Independent reference models: diffusers / transformers built from the same CompVis config tree,
with weights converted from our state dict by diffusers' own single-file converters."""
from __future__ import annotations

import torch

from torch import nn

from ldm.config import TextEncoderConfig
from ldm.model import LatentDiffusion


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values (zero-initialised layers would hide key mix-ups)."""
    gen = torch.Generator().manual_seed(seed)
    # norm layers by type too: the UNet's GroupNorms sit in nn.Sequential slots ("in_layers.0"),
    # and a near-zero gain there shrinks every residual branch until parity tests stop seeing it
    norms = {f"{prefix}.{p}".lstrip(".") for prefix, mod in model.named_modules()
             if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm))
             for p, _ in mod.named_parameters(recurse=False)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            if name in norms or "norm" in name or name.split(".")[-2].startswith("ln"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) * scale / max(fan_in, 1) ** 0.5 * 2)
    return model


def diffusers_unet(tree: dict, state_dict: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)

    config = create_unet_diffusers_config_from_ldm(tree, state_dict)
    unet = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(state_dict, dict(unet.config))
    unet.load_state_dict(converted, strict=True)
    return unet.eval()


def diffusers_vae(tree: dict, state_dict: dict):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     create_vae_diffusers_config_from_ldm)

    config = create_vae_diffusers_config_from_ldm(tree, state_dict)
    vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(state_dict, dict(vae.config))
    vae.load_state_dict(converted, strict=True)
    return vae.eval()


def transformers_text_model(model: LatentDiffusion, state_dict: dict):
    """A ``transformers.CLIPTextModel`` holding our text tower's weights, converted by diffusers."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint,
                                                     convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = model.config.text
    hf = CLIPTextModel(CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=int(cfg.width * cfg.mlp_ratio),
        max_position_embeddings=cfg.max_length, hidden_act=cfg.act, projection_dim=cfg.projection_dim))
    if cfg.kind == "clip":
        converted = convert_ldm_clip_checkpoint(state_dict)
    else:
        converted = convert_open_clip_checkpoint(hf, state_dict)
    # transformers 5 keeps CLIPTextModel keys without the "text_model." prefix
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()
                 if k.startswith(("text_model.", "embeddings.", "encoder.", "final_layer_norm."))}
    hf.load_state_dict(converted, strict=True)
    return hf.eval()


class TransformersCLIPEmbedder(nn.Module):
    """SD1's text encoder as built before ``ldm.modules.clip_text``: transformers' ``CLIPTextModel``
    under ``transformer.text_model`` (the same keys; built from the same seed, the same values)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.config = cfg
        hf_config = CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, intermediate_size=int(cfg.width * cfg.mlp_ratio),
            max_position_embeddings=cfg.max_length, hidden_act=cfg.act,
            projection_dim=cfg.projection_dim, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=cfg.pad_token_id)
        self.transformer = nn.Module()
        self.transformer.text_model = CLIPTextModel(hf_config)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        model = self.transformer.text_model
        skip = self.config.skip_layers() + clip_skip
        out = model(input_ids=tokens, output_hidden_states=skip > 0)
        if skip == 0:
            return out.last_hidden_state
        return model.final_layer_norm(out.hidden_states[-1 - skip])


class OpenCLIPBlocksEmbedder(nn.Module):
    """SD2's text encoder as built before ``ldm.modules.openclip_text``: open_clip's own
    ``Transformer`` and ``LayerNorm`` under ``model.*`` (the same keys; from the same seed, the same
    values), conditioning on all blocks but the last ``skip_layers() + clip_skip``, then ln_final."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from open_clip.transformer import LayerNorm, QuickGELU, Transformer

        self.config = cfg
        m = self.model = nn.Module()
        m.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        m.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.width))
        m.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio,
                                    act_layer=nn.GELU if cfg.act == "gelu" else QuickGELU,
                                    norm_layer=LayerNorm, batch_first=True)
        m.ln_final = LayerNorm(cfg.width)
        m.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
        m.logit_scale = nn.Parameter(torch.empty(()))
        mask = torch.full((cfg.max_length, cfg.max_length), float("-inf")).triu_(1)
        m.register_buffer("attn_mask", mask, persistent=False)
        torch.nn.init.normal_(m.token_embedding.weight, std=0.02)
        torch.nn.init.normal_(m.positional_embedding, std=0.01)
        torch.nn.init.normal_(m.text_projection, std=cfg.width ** -0.5)
        torch.nn.init.constant_(m.logit_scale, torch.log(torch.tensor(1 / 0.07)).item())

    def forward(self, tokens: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        m = self.model
        n = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:n].to(m.token_embedding.weight.dtype)
        mask = m.attn_mask[:n, :n].to(x.dtype)
        blocks = m.transformer.resblocks
        for block in blocks[: len(blocks) - self.config.skip_layers() - clip_skip]:
            x = block(x, attn_mask=mask)
        return m.ln_final(x)


def reference_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    """The transformers / open_clip-built text encoder of ``cfg`` (what ``build_text_encoder`` is
    compared against)."""
    return TransformersCLIPEmbedder(cfg) if cfg.kind == "clip" else OpenCLIPBlocksEmbedder(cfg)


def random_tiny_model(kind: str, seed: int = 0, scale: float = 0.5) -> LatentDiffusion:
    """Our tiny model of ``kind`` (see tests/tiny.py) with random weights, in eval mode.

    ``scale`` 0.5 gives weights of std 1/sqrt(fan_in), which keeps activations of order one
    through the network: every attention and residual path then moves the output by far more
    than a 1e-4 tolerance (swapping one attention's keys and values changes it by ~0.1).
    """
    from reference.tiny import tiny_config

    return randomize_(LatentDiffusion(tiny_config(kind)), seed=seed, scale=scale).eval()


def max_error(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(largest absolute difference, largest absolute value of the reference), in float64."""
    ours, reference = ours.double().cpu(), reference.double().cpu()
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    return (ours - reference).abs().max().item(), reference.abs().max().item()


def controlnet_model(tree: dict, unet: dict):
    """An empty diffusers ControlNetModel for a cldm ``tree``, its config taken from ``unet`` (a
    ``create_unet_diffusers_config_from_ldm`` dict) as ``create_controlnet_diffusers_config_from_ldm``
    takes it."""
    from diffusers import ControlNetModel

    hint = tree["model"]["params"]["control_stage_config"]["params"]["hint_channels"]
    config = {"conditioning_channels": hint, **{k: unet[k] for k in (
        "in_channels", "down_block_types", "block_out_channels", "layers_per_block",
        "cross_attention_dim", "attention_head_dim", "use_linear_projection", "class_embed_type",
        "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
        "transformer_layers_per_block")}}
    return ControlNetModel(**config)


def diffusers_controlnet(tree: dict, state_dict: dict):
    """diffusers' ControlNetModel holding ``state_dict`` (original keys), converted by diffusers.

    The config is ``create_controlnet_diffusers_config_from_ldm``'s, built from
    ``create_unet_diffusers_config_from_ldm`` as that function does: in diffusers 0.42.1 it calls
    the latter without the checkpoint and raises a TypeError (FACTS.md).."""
    from diffusers.loaders.single_file_utils import (convert_controlnet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)

    model = controlnet_model(tree, create_unet_diffusers_config_from_ldm(tree, state_dict))
    converted = convert_controlnet_checkpoint(state_dict, dict(model.config))
    model.load_state_dict(converted, strict=True)
    return model.eval()
