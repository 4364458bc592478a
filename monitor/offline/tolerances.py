"""Tolerances of `collapse-monitor compare`: how far a candidate may move in the bad direction.

Each metric with a clear bad direction (METRICS.md, and the same directions as the alert rules:
CDNV rising means classes blur, NC4 agreement and effective rank falling mean a worse or
collapsing representation) takes a *relative* tolerance: the largest allowed change
`(candidate - reference) / |reference|` in that direction. The drift keys between the two
feature sets take an *absolute* maximum. A file maps keys to numbers (YAML or JSON) and is
merged over the defaults; `null` turns a default check off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from monitor.data.files import read_structured
from monitor.errors import InvalidInput


class Direction(StrEnum):
    """Which way a metric moves when the candidate gets worse."""

    increase = "increase"
    decrease = "decrease"


# Bad direction of every collapse/geometry key that has one. `nc2_equiangularity_mean` (best
# at -1/(K-1), not at an end), `class_count` and `sample_count` have none.
BAD_DIRECTION: dict[str, Direction] = {
    "nc1_cdnv": Direction.increase,
    "nc1_cdnv2": Direction.increase,
    "nc1_cdnv_unbiased": Direction.increase,
    "nc1_cdnv2_unbiased": Direction.increase,
    "nc1_trace_ratio": Direction.increase,
    "nc2_equinorm_cv": Direction.increase,
    "nc2_equiangularity_std": Direction.increase,
    "nc2_log_energy_mean": Direction.increase,
    "nc2_log_energy_std": Direction.increase,
    "nc3_duality_mean_cos": Direction.decrease,
    "nc3_uniform_duality_cv": Direction.increase,
    "nc4_ncc_agreement": Direction.decrease,
    "anisotropy_mean_cos": Direction.increase,
    "effective_rank": Direction.decrease,
}
# Drift between reference and candidate features: bounded by an absolute maximum.
ABSOLUTE_KEYS: tuple[str, ...] = (
    "drift_mmd",
    "drift_mean_shift",
    "drift_class_mean_cos",
    "drift_label_js",
)

DEFAULT_RELATIVE: dict[str, float] = {
    "nc1_cdnv": 0.25,
    "nc4_ncc_agreement": 0.10,
    "nc2_equiangularity_std": 0.25,
    "effective_rank": 0.20,
}
DEFAULT_ABSOLUTE: dict[str, float] = {"drift_mmd": 0.05}
# `compare --live`: the same checks, but CDNV on its volume-robust key. A canary gets a slice
# of the traffic, and the plug-in CDNV of a window with fewer samples per class reads lower
# (less collapse) for an unchanged model (METRICS.md "Volume-robust estimators").
LIVE_DEFAULT_RELATIVE: dict[str, float] = {
    "nc1_cdnv_unbiased": 0.25,
    "nc4_ncc_agreement": 0.10,
    "nc2_equiangularity_std": 0.25,
    "effective_rank": 0.20,
}


@dataclass(frozen=True)
class Tolerances:
    """Relative tolerances (key -> allowed relative change in the bad direction) and absolute
    maxima of drift keys; a key absent from both is reported but never fails the gate."""

    relative: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RELATIVE))
    absolute: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ABSOLUTE))

    def merged(self, overrides: Mapping[str, float | None]) -> Tolerances:
        """These tolerances with `overrides` applied (None removes a check); keys validated."""
        relative, absolute = dict(self.relative), dict(self.absolute)
        for key, value in overrides.items():
            target = relative if key in BAD_DIRECTION else absolute
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
        return Tolerances(relative, absolute)


def check_overrides(data: object, where: str) -> dict[str, float | None]:
    """Validate a key -> number-or-null mapping; any problem is one `InvalidInput` line."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput("bad_tolerances", f"{where}: expected a mapping of metric key -> number")
    out: dict[str, float | None] = {}
    for key, value in data.items():
        if not isinstance(key, str) or (key not in BAD_DIRECTION and key not in ABSOLUTE_KEYS):
            known = ", ".join([*BAD_DIRECTION, *ABSOLUTE_KEYS])
            raise InvalidInput(
                "bad_tolerances",
                f"{where}: unknown or untolerable metric key {key!r}; known: {known}",
            )
        if value is None:
            out[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(
                "bad_tolerances", f"{where}: {key}: expected a number or null, got {value!r}"
            )
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise InvalidInput(
                "bad_tolerances", f"{where}: {key}: must be a finite number >= 0, got {value!r}"
            )
        out[key] = number
    return out


def load_tolerances(path: Path | None) -> Tolerances:
    """The defaults, with the YAML or JSON file at `path` merged over them."""
    defaults = Tolerances()
    if path is None:
        return defaults
    data = read_structured(path, "bad_tolerances")
    return defaults.merged(check_overrides(data, str(path)))


def load_live_tolerances(path: Path | None) -> Tolerances:
    """`compare --live`'s tolerances: `LIVE_DEFAULT_RELATIVE` with the file at `path` merged
    over them. Drift keys are refused: each live model's drift is against its own baseline,
    so the two models' drift values are not a difference between them."""
    defaults = Tolerances(relative=dict(LIVE_DEFAULT_RELATIVE), absolute={})
    if path is None:
        return defaults
    overrides = check_overrides(read_structured(path, "bad_tolerances"), str(path))
    drift = [key for key in overrides if key in ABSOLUTE_KEYS]
    if drift:
        raise InvalidInput(
            "bad_tolerances",
            f"{path}: {', '.join(drift)}: drift keys are not compared between live models "
            "(each is measured against its own model's baseline)",
        )
    return defaults.merged(overrides)
