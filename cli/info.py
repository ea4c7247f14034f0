"""``ldm info``: an image's stored generation parameters, or a checkpoint's family and contents."""
from __future__ import annotations

from pathlib import Path

from cli.args import CommandError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def add_parser(sub) -> None:
    info = sub.add_parser("info", help="show an image's generation parameters or a checkpoint's family",
                          description="For a PNG: print the stored generation parameters (A1111 "
                          "text). For a checkpoint: print its detected family and contents.")
    info.add_argument("path", metavar="PATH", help="an image written by ldm (or A1111), or a checkpoint")
    info.add_argument("--json", action="store_true", help="print parsed fields as JSON")


def _is_image(path: Path) -> bool:
    if path.is_dir() or path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return False
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError):
        return False


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _image_info(path: Path, as_json: bool) -> int:
    from pipelines.images import parse_parameters, read_parameters
    text = read_parameters(path)
    if text is None:
        raise CommandError(f"image {path}: no generation parameters stored in it "
                           "(no 'parameters' text chunk)")
    if as_json:
        import json
        print(json.dumps(parse_parameters(text), indent=2, ensure_ascii=False))
    else:
        print(text)
    return 0


def _checkpoint_info(path: Path, as_json: bool) -> int:
    from ldm.controlnet_loading import is_controlnet, is_controlnet_folder
    if is_controlnet_folder(path):  # a diffusers ControlNet folder
        return _print_checkpoint(*_controlnet_info(path), as_json)
    from ldm.detect import detect
    from ldm.weights_io import CheckpointError, read_state_dict
    state = read_state_dict(path)  # not a checkpoint at all: CheckpointError, reported as the error
    from ldm.config import ConfigError
    config_rules: list[str] = []
    if is_controlnet(state):
        return _print_checkpoint(*_controlnet_info(path), as_json)
    try:
        found = detect(state, path=path)
        family, rules = found.family, list(found.rules)
    except CheckpointError as exc:  # readable, but not an SD1/SD2 model: still worth describing
        family, rules = "unknown", [str(exc)]
    from ldm.checkpoint import resolve_config
    try:  # the config loading would use, and where it comes from
        cfg, config, found_family = resolve_config(None, path, state)
        if config.startswith("inferred"):
            from ldm.config import builtin_config
            from ldm.infer_config import infer_config
            config_rules = infer_config(state, builtin_config(found_family.config_name), path=path)[1]
    except (CheckpointError, ConfigError) as exc:
        config = f"none ({exc})"
    return _print_checkpoint(path, state, family, rules, config, config_rules, as_json)


def _controlnet_info(path: Path) -> tuple[Path, dict, str, list[str], str, list[str]]:
    """A ControlNet file's or folder's weight file, tensors (our names), family, the rule that
    told it, its config's source and rules."""
    from ldm.config import ConfigError
    from ldm.controlnet_loading import (controlnet_family, infer_controlnet_config, read_controlnet,
                                        resolve_controlnet_config)
    from ldm.weights_io import CheckpointError
    found = read_controlnet(path)  # a broken file or folder: CheckpointError, reported as the error
    state = found.state
    kind = controlnet_family(state)
    family = f"controlnet ({kind or 'unknown'})"
    rules = [found.layout]
    if kind == "sdxl":
        rules.append("label_emb keys (the vector conditioning only SDXL has): sdxl")
    elif kind:
        rules.append(f"cross-attention context width {768 if kind == 'sd1' else 1024}: {kind}")
    config_rules: list[str] = []
    try:
        if found.config_source:
            config = found.config_source
        else:
            _, config = resolve_controlnet_config(None, found.file, state)
            if config.startswith("inferred"):  # a header or YAML config needs no shape rules
                config_rules = infer_controlnet_config(state, path=found.file)[1]
    except (CheckpointError, ConfigError) as exc:
        config = f"none ({exc})"
    return found.file, state, family, rules, config, config_rules


def _print_checkpoint(path: Path, state, family: str, rules: list[str], config: str,
                      config_rules: list[str], as_json: bool) -> int:
    from collections import Counter

    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in state.values())
    size = path.stat().st_size
    fields = {"file": str(path), "family": family, "rules": rules, "config": config, "config_rules": config_rules, "keys": len(state),
              "dtype": ", ".join(f"{d} ({c} tensors)" for d, c in dtypes.most_common()) or "none",
              "size": size}
    if as_json:
        import json
        print(json.dumps(fields, indent=2))
        return 0
    print(f"file:   {path}")
    print(f"family: {family}")
    for rule in rules:
        print(f"  - {rule}")
    print(f"config: {config}")
    for rule in config_rules:
        print(f"  - {rule}")
    print(f"keys:   {len(state)}")
    print(f"dtype:  {fields['dtype']}")
    print(f"size:   {_human_size(size)} ({size} bytes)")
    return 0


def run(args) -> int:
    """Describe ``args.path``; returns the exit status."""
    path = Path(args.path)
    if not path.exists():
        raise CommandError(f"{path}: no such file")
    if _is_image(path):
        return _image_info(path, args.json)
    return _checkpoint_info(path, args.json)
