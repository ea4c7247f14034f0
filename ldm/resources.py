"""Where the project's shipped files live: ``configs/`` (CompVis YAML) and ``weights/`` (the default model).

A source checkout or editable install reads them next to the packages. A wheel installs them as data
files under ``<prefix>/share/ldm-pipeline/`` (see ``[tool.setuptools.data-files]`` in pyproject.toml);
the prefix is the environment's (``sys.prefix``) or the user base of a ``pip install --user``.
"""
from __future__ import annotations

import site
import sys
import sysconfig
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent
DATA_NAME = "ldm-pipeline"


def data_roots() -> list[Path]:
    """Candidate folders holding ``configs/`` and ``weights/``, most specific first."""
    roots = [SOURCE_ROOT]
    bases = [sys.prefix, sysconfig.get_path("data"), getattr(site, "USER_BASE", None)]
    for base in bases:
        if base:
            root = Path(base) / "share" / DATA_NAME
            if root not in roots:
                roots.append(root)
    return roots


def shipped_file(kind: str, name: str) -> Path:
    """``<root>/<kind>/<name>`` from the first root that has it; the source-tree path when none does
    (so an error message names where the file was expected)."""
    for root in data_roots():
        path = root / kind / name
        if path.is_file():
            return path
    return SOURCE_ROOT / kind / name


def config_dir() -> Path:
    """The folder of the built-in CompVis configs (the one holding ``v1-inference.yaml``)."""
    return shipped_file("configs", "v1-inference.yaml").parent
