"""Typed ControlNet configuration, read from the ``control_stage_config`` section of the original
ControlNet YAML (``cldm_v15.yaml`` / ``cldm_v21.yaml``: ``cldm.cldm.ControlNet`` with the UNet's
params plus ``hint_channels``). The base model of such a file is read by :func:`ldm.config.
parse_config`; ``target:`` strings are recognised, never imported. For SDXL the tree is the base
model's sgm tree with the same section beside ``network_config``, whose params are the sgm UNet's
(``num_classes: sequential``, ``adm_in_channels``, per-level ``transformer_depth``) plus
``hint_channels``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .config import (CONFIG_DIR, ConfigError, ModelConfig, UNetConfig, _check_target, _section,
                     _unet_config, parse_config, read_config_tree)

_CONTROL_TARGETS = ("cldm.cldm.ControlNet",)
_CONTROL_PATH = "model.params.control_stage_config"


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """The UNet encoder's fields (``out_channels`` is unused) plus the hint image's channels."""

    hint_channels: int = 3

    @classmethod
    def from_unet(cls, unet: UNetConfig, hint_channels: int = 3) -> "ControlNetConfig":
        """The ControlNet for a base UNet: the same encoder, reading a ``hint_channels`` image."""
        return cls(**dataclasses.asdict(unet), hint_channels=hint_channels)

    def unet_fields(self) -> UNetConfig:
        """The base UNet's fields of this config."""
        values = dataclasses.asdict(self)
        values.pop("hint_channels")
        return UNetConfig(**values)


def validate_controlnet(cfg: ControlNetConfig, base: ModelConfig | None = None,
                        source: str = "config") -> None:
    """Field ranges; with ``base``, that the ControlNet fits the base model it steers."""
    def bad(msg):
        raise ConfigError(f"{source}: {_CONTROL_PATH}.params: {msg}")

    if cfg.hint_channels < 1:
        bad(f"hint_channels must be >= 1, got {cfg.hint_channels}")
    if cfg.num_head_channels == -1 and cfg.num_heads < 1:
        bad("needs num_heads or num_head_channels")
    for i, mult in enumerate(cfg.channel_mult):
        if (cfg.model_channels * mult) % 32:
            bad(f"channels at level {i} must be a multiple of 32 (GroupNorm)")
    if base is not None:
        u = base.unet
        for name in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                     "context_dim", "adm_in_channels"):
            if getattr(cfg, name) != getattr(u, name):
                bad(f"{name} is {getattr(cfg, name)!r}, the UNet's is {getattr(u, name)!r} (the "
                    f"residuals must match the UNet's skip connections)")


def parse_controlnet_config(tree: dict, source: str = "config") -> ControlNetConfig:
    """The :class:`ControlNetConfig` of a cldm YAML tree; errors name the offending field."""
    try:
        section = _section(tree, _CONTROL_PATH, mapping=True)
        _check_target(section, _CONTROL_PATH, _CONTROL_TARGETS)
        path = _CONTROL_PATH + ".params"
        params = dict(_section(tree, path, mapping=True))
        hint = params.pop("hint_channels", 3)
        if isinstance(hint, bool) or not isinstance(hint, int):
            raise ConfigError(f"'{path}.hint_channels' must be an integer, got {hint!r}")
        # the UNet's reader: sgm's list-valued transformer_depth and num_classes "sequential" too
        cfg = ControlNetConfig.from_unet(_unet_config(params, path), hint_channels=hint)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    validate_controlnet(cfg, source=source)
    return cfg


def parse_cldm_config(tree: dict, source: str = "config") -> tuple[ModelConfig, ControlNetConfig]:
    """The base model and the ControlNet of a cldm YAML tree, checked to fit each other."""
    base = parse_config(tree, source)
    control = parse_controlnet_config(tree, source)
    validate_controlnet(control, base, source)
    return base, control


def load_cldm_config(path: str | Path) -> tuple[ModelConfig, ControlNetConfig]:
    """:func:`parse_cldm_config` of a YAML file."""
    return parse_cldm_config(read_config_tree(path, "ControlNet configuration"), str(path))


def builtin_cldm_config(name: str) -> tuple[ModelConfig, ControlNetConfig]:
    """A ControlNet config shipped in ``configs/`` by file stem: ``cldm_v15`` or ``cldm_v21``."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("cldm*.yaml"))
        raise ConfigError(f"no built-in ControlNet config {name!r}; known: {', '.join(known)}")
    return load_cldm_config(path)
