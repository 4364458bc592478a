"""Lazy package attributes (PEP 562), so that importing a package does not import torch.

A core install (exporter, API, rules, dashboards, status) has no torch; a package whose
top-level names include torch-backed ones lists them here and they load on first access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `table` maps a name to the module defining it.

    The value is cached in the package's namespace, so the hook runs once per name.
    """

    def getattr_hook(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return getattr_hook


# The optional dependencies by the extra that brings them (pyproject.toml); the core install has
# none of them, and a command that needs one says which extra to install.
EXTRA_OF: dict[str, str] = {
    "torch": "worker",
    "transformers": "worker",
    "tokenizers": "worker",
    "matplotlib": "report",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra that provides the missing module; None for any other module."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF.get(module)
    if extra is None:
        return None
    return (
        f"this command needs {module}, which the core install leaves out: "
        f"pip install 'collapse-monitor[{extra}]' (or 'collapse-monitor[all]')"
    )
