"""Which training run each checkpoint of a study belongs to, and how many tokens it had seen.

`study --meta FILE` reads a CSV with the header `checkpoint,run,tokens_seen`: one row per
checkpoint, named as the study names it (its path relative to the folder the checkpoints
share). `run` labels the checkpoints that are snapshots of one training run: the bootstrap
resamples runs, not checkpoints. `tokens_seen` (training tokens before the snapshot; may be
empty) is a control of the partial correlations. Without the file every checkpoint is its own
run and tokens seen are unknown.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from monitor.errors import InvalidInput

HEADER = ("checkpoint", "run", "tokens_seen")


@dataclass(frozen=True)
class RunInfo:
    """One checkpoint's run label and training tokens seen (None: unknown)."""

    run: str
    tokens_seen: int | None


def default_meta(names: Sequence[str]) -> dict[str, RunInfo]:
    """Every checkpoint its own run, tokens unknown."""
    return {name: RunInfo(name, None) for name in names}


def read_meta(path: Path, names: Sequence[str]) -> dict[str, RunInfo]:
    """The file's row for every checkpoint in `names`; a missing or unknown one is refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput("invalid_meta", f"{path}: {exc.strerror or exc}") from exc
    reader = csv.reader(io.StringIO(text))
    header = tuple(next(reader, ()))
    if header != HEADER:
        raise InvalidInput("invalid_meta", f"{path}: the header must be {','.join(HEADER)}")
    found: dict[str, RunInfo] = {}
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 3 or not row[0] or not row[1]:
            raise InvalidInput("invalid_meta", f"{path}:{line}: need checkpoint,run,tokens_seen")
        tokens = row[2].strip()
        if tokens and (not tokens.isdigit() or int(tokens) < 1):
            raise InvalidInput("invalid_meta", f"{path}:{line}: tokens_seen must be >= 1")
        if row[0] in found:
            raise InvalidInput("invalid_meta", f"{path}:{line}: {row[0]} is listed twice")
        found[row[0]] = RunInfo(row[1], int(tokens) if tokens else None)
    missing = [n for n in names if n not in found]
    if missing:
        raise InvalidInput("invalid_meta", f"{path}: no row for {', '.join(missing[:3])}")
    return {n: found[n] for n in names}
