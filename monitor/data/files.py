"""Reading the user's own text files with one-line errors: corpora and JSON/YAML settings."""

from __future__ import annotations

import json
from pathlib import Path

from monitor.errors import InvalidInput


def read_lines(path: Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped: one document (or request) per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput("bad_corpus", f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise InvalidInput("bad_corpus", f"{path}: {exc.strerror or exc}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise InvalidInput("empty_corpus", f"{path}: no non-blank lines")
    return lines


def read_structured(path: Path, reason: str) -> object:
    """A JSON (by suffix) or YAML file's data; any problem is `InvalidInput(reason)`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(reason, f"{path}: {exc.strerror or exc}") from None
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        if kind == "JSON":
            return json.loads(text)
        import yaml  # type: ignore[import-untyped]

        return yaml.safe_load(text)
    except Exception as exc:  # JSONDecodeError, YAMLError: their text says where
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidInput(reason, f"{path}: not valid {kind}: {message}") from None
