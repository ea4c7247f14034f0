"""Running the ``ldm`` command in-process and checking its one-line errors."""
from __future__ import annotations

from pathlib import Path

from cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def model_args(tiny) -> list[str]:
    return ["--checkpoint", str(tiny / "tiny.safetensors"), "--config", str(tiny / "tiny-config.yaml")]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(err: str, fragment: str = "") -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]
    return lines[0]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}
