"""Import a module of this repository as it was at an earlier git revision, for the A/B
scripts (`ab_*.py`) that time a fix against the code before it in one process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def module_at(revision: str, relpath: str, tmp: Path) -> ModuleType:
    """`relpath` (e.g. monitor/metrics/nc4.py) at `revision`, loaded as `<stem>_before`."""
    source = subprocess.run(
        ["git", "show", f"{revision}:{relpath}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    name = f"{Path(relpath).stem}_before"
    path = tmp / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
