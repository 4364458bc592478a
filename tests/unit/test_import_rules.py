"""docs/architecture.md's folder table, held: what each part of the data flow may import.

Every `import` statement of the package is read (module level and inside functions: a lazy
import is still knowledge of the other part), so a new dependency that breaks a layer fails
here with the file and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MONITOR = Path(__file__).resolve().parents[2] / "monitor"

# part -> prefixes it must not import (module names, dotted).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "stats": ("redis", "celery", "kombu", "monitor.store", "monitor.pipeline", "monitor.metrics"),
    "metrics": ("redis", "celery", "kombu", "monitor.store", "monitor.pipeline", "monitor.worker"),
    "store": ("celery", "kombu", "torch", "monitor.stats", "monitor.metrics", "monitor.pipeline"),
    "data": ("redis", "celery", "kombu", "monitor.metrics", "monitor.store", "monitor.pipeline"),
    "capture": ("redis", "celery", "kombu", "monitor.store", "monitor.worker"),
    "evaluate": ("celery", "kombu", "monitor.worker", "monitor.offline", "monitor.exporter"),
    "alerts": ("redis", "celery", "kombu", "monitor.evaluate", "monitor.store", "monitor.worker"),
    "offline": ("celery", "kombu", "monitor.worker"),
    "report": ("celery", "kombu", "monitor.worker"),
    "exporter": ("celery", "torch", "monitor.worker", "monitor.evaluate"),
    "api": ("torch", "monitor.evaluate", "monitor.metrics"),
}
# The exporter reads key names and texts, never formulas (it runs without torch).
EXPORTER_METRICS = ("monitor.metrics.keys", "monitor.metrics.catalogue", "monitor.metrics.options")
# The one place outside the worker wing that builds a Celery app: senders, lazily, to send.
SENDERS = {("pipeline", "client.py"), ("api", "ingress.py")}


def imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def part_files(part: str) -> list[Path]:
    return sorted((MONITOR / part).rglob("*.py"))


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_each_part_imports_only_what_its_layer_allows(part: str) -> None:
    broken = []
    for path in part_files(part):
        for line, module in imports(path):
            for prefix in FORBIDDEN[part]:
                sender = (part, path.name) in SENDERS and prefix in ("celery", "monitor.worker")
                if under(module, prefix) and not sender:
                    broken.append(f"{path.relative_to(MONITOR.parent)}:{line} imports {module}")
            formulas = not any(under(module, allowed) for allowed in EXPORTER_METRICS)
            if part == "exporter" and under(module, "monitor.metrics") and formulas:
                broken.append(f"{path.relative_to(MONITOR.parent)}:{line} imports {module}")
    assert broken == []


def test_no_cycles_between_the_parts_of_the_data_flow() -> None:
    """A part that imports another is never imported back by it (the CLI, the demo and the
    package root sit above everything and are left out)."""
    top = {"cli", "demo", "__init__"}
    parts = sorted(p.name for p in MONITOR.iterdir() if p.is_dir() and p.name not in top)
    parts = [p for p in parts if not p.startswith("_")]
    uses = {
        part: {
            module.split(".")[1]
            for path in part_files(part)
            for _, module in imports(path)
            if module.startswith("monitor.") and module.split(".")[1] != part
        }
        for part in parts
    }
    # The senders' lazy import of the worker's app factory is the one allowed way back.
    uses["pipeline"].discard("worker")
    cycles = sorted(
        f"{a} <-> {b}" for a in parts for b in uses[a] if a < b and a in uses.get(b, ())
    )
    assert cycles == []
