"""``ldm serve`` on the command line: no heavy import on the way to ``--help``, the --listen
warning, and its input checks as one error line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ldm(*args):
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_help_imports_neither_fastapi_nor_torch():
    code = ("import sys, cli.main\n"
            "try:\n    cli.main.build_parser().parse_args(['serve', '--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'torch', 'server.app') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_listen_without_credentials_warns_and_bad_input_is_one_line(tmp_path):
    r = _ldm("serve", "--listen", "--checkpoint", str(tmp_path / "missing.safetensors"))
    assert "warning: listening on 0.0.0.0 without --api-auth" in r.stderr
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: checkpoint")
    r = _ldm("serve", "--api-auth", "nopassword")
    assert r.returncode == 1 and r.stderr.strip() == \
        "error: --api-auth entries must be USER:PASS, got 'nopassword'"
    r = _ldm("serve", "--models-dir", str(tmp_path / "nothere"))
    assert r.returncode == 1 and "no such folder" in r.stderr
