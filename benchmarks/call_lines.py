"""How much of ``ldm/`` and ``pipelines/`` one text-to-image call goes through: the source files it
loads (and their lines) and the distinct lines it executes, from the import of the pipeline to the
finished image, on the shipped default model.

    python -m benchmarks.call_lines [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PACKAGES = ("ldm", "pipelines")


def _tracer(roots: tuple[str, ...], seen: set):
    def local(frame, event, arg):
        if event == "line":
            seen.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    def trace(frame, event, arg):
        if frame.f_code.co_filename.startswith(roots):
            seen.add((frame.f_code.co_filename, frame.f_lineno))
            return local
        return None

    return trace


def measure(root: Path, prompt: str, seed: int) -> dict:
    roots = tuple(str(root / p) + "/" for p in PACKAGES)
    seen: set = set()
    sys.settrace(_tracer(roots, seen))
    try:
        from pipelines.pipeline import Pipeline

        Pipeline.from_checkpoint().txt2img(prompt, seed=seed, progress=False)
    finally:
        sys.settrace(None)
    loaded = sorted({m.__file__ for m in list(sys.modules.values())
                     if getattr(m, "__file__", None) and m.__file__.startswith(roots)})
    per_file = {str(Path(f).relative_to(root)): sum(1 for s in seen if s[0] == f) for f in loaded}
    return {"files_loaded": len(loaded),
            "lines_in_loaded_files": sum(len(Path(f).read_text().splitlines()) for f in loaded),
            "lines_executed": len(seen), "executed_per_file": per_file}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import pipelines

    root = Path(pipelines.__file__).resolve().parent.parent
    report = measure(root, args.prompt, args.seed)
    print(f"{report['files_loaded']} files of {'/'.join(PACKAGES)} loaded "
          f"({report['lines_in_loaded_files']} lines); {report['lines_executed']} distinct lines executed")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
