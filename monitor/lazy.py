"""Lazy package attributes (PEP 562), so that importing a package does not import torch.

A core install (exporter, API, rules, dashboards, status) has no torch; a package whose
top-level names include torch-backed ones lists them here and they load on first access.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


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


class ProcessLocal(Generic[T]):
    """One value per process, built by `factory` on first use.

    Under a lock, because a threads pool or the API's executor may ask for it concurrently and
    the value (a runtime with its Redis pools, an evaluator with cached heads) is costly to
    build twice. `set` replaces it (embedded mode and tests).
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._value: T | None = None
        self._built = False
        self._lock = threading.Lock()

    def get(self) -> T:
        with self._lock:
            if not self._built:
                self._value = self._factory()
                self._built = True
            return self._value  # type: ignore[return-value]  # built: a T (possibly None)

    def set(self, value: T | None) -> None:
        """Use `value` from now on; None means "build again on next use"."""
        with self._lock:
            self._value = value
            self._built = value is not None
