"""`compare --live`: two served variants (canary against stable) compared on their live windows.

No model runs here: both sides are the latest snapshots the evaluator stored for one window, so
the comparison costs two Redis reads. Each metric gets the difference `candidate - reference`
and, where both snapshots carry `<key>_traffic_stderr` (the window's value as an estimate of
the model's value under its traffic), a confidence interval `d +- z sqrt(se_r^2 + se_c^2)`:
the two windows are independent samples of traffic, so their variances add. A metric fails
only when it moved beyond its tolerance in its bad direction (the offline gate's rule,
`monitor.offline.compare.judge_metric`) *and* the interval excludes zero: a canary's window is
small, and a tolerance alone would fail it on noise. The document (`LiveCompareResult.to_json`)
follows the offline one's fields where they mean the same (docs/compare.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from statistics import NormalDist
from typing import Any, Literal

from monitor.errors import ExitCode, InvalidInput
from monitor.metrics.drift import DRIFT_KEYS
from monitor.metrics.report import TRAFFIC_STDERR_SUFFIX
from monitor.offline.compare import COMPARED_KEYS, SCHEMA_VERSION
from monitor.offline.live_verdict import (
    DEFAULT_Z,
    LiveMetric,
    LiveStatus,
    judge_live,
)
from monitor.offline.tolerances import Tolerances
from monitor.pipeline.registry import ModelShape
from monitor.pipeline.runtime import Runtime
from monitor.snapshot import Snapshot

STALE_INTERVALS = 3  # a snapshot older than this many evaluation intervals is refused
# Bounded by the hidden width d (effective rank <= d; the trace ratio's pinv(Sigma_B) spans
# min(K - 1, d) directions): across widths their values are not like for like.
WIDTH_KEYS: tuple[str, ...] = ("effective_rank", "nc1_trace_ratio")
# Counts of token ids: across vocabularies they count different things.
VOCABULARY_KEYS: tuple[str, ...] = ("class_count",)
PER_DIM_KEY = "effective_rank_per_dim"  # shown, never judged, when widths differ
VOLUME_GAP = 2.0  # sample counts this far apart get a note about plug-in keys
PLUG_IN_KEYS = ("nc1_cdnv", "nc1_cdnv2")


@dataclass(frozen=True)
class LiveSide:
    """One model's snapshot: what was compared, from when, with which sizes (None: unknown)."""

    kind: Literal["live"]
    name: str
    window: str
    timestamp: float
    age_seconds: float
    sample_count: int
    class_count: int
    dim: int | None
    vocab_size: int | None
    baseline: str | None


@dataclass(frozen=True)
class DriftPair:
    """A drift key of each model against its own baseline: shown, never judged."""

    key: str
    reference: float | None
    candidate: float | None
    status: LiveStatus


@dataclass(frozen=True)
class Comparability:
    """Whether the models share a vocabulary and a width (None: a size is unknown), and the
    metrics that are not compared because of it."""

    vocabulary: bool | None
    width: bool | None
    not_comparable: tuple[str, ...]

    @property
    def compatible(self) -> bool:
        return self.vocabulary is True and self.width is True


@dataclass(frozen=True)
class LiveCompareResult:
    """The live comparison; `to_json` is the documented document (docs/compare.md)."""

    reference: LiveSide
    candidate: LiveSide
    window: str
    z: float
    metrics: list[LiveMetric]
    drift: list[DriftPair]
    comparability: Comparability
    tolerances: Tolerances
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def regressions(self) -> list[str]:
        return [m.key for m in self.metrics if m.regressed]

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.REGRESSION if self.regressions else ExitCode.OK

    @property
    def confidence(self) -> float:
        """The two-sided coverage of the intervals: 2 Phi(z) - 1."""
        return 2 * NormalDist().cdf(self.z) - 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "mode": "live",
            "passed": not self.regressions,
            "exit_code": int(self.exit_code),
            "regressions": self.regressions,
            "window": self.window,
            "z": self.z,
            "confidence": round(self.confidence, 6),
            "reference": asdict(self.reference),
            "candidate": asdict(self.candidate),
            "comparable": {
                "vocabulary": self.comparability.vocabulary,
                "width": self.comparability.width,
                "not_comparable": list(self.comparability.not_comparable),
            },
            "metrics": [m.as_dict() for m in self.metrics],
            "drift": [{**asdict(d), "status": d.status.value} for d in self.drift],
            "tolerances": {
                "relative": dict(self.tolerances.relative),
                "absolute": dict(self.tolerances.absolute),
            },
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), allow_nan=False)


def _number(value: object) -> float | None:
    """A snapshot value as a float; None when missing (or not a finite number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------- comparing
def comparability(reference: ModelShape | None, candidate: ModelShape | None) -> Comparability:
    """Which keys differ in meaning between the two models (unknown sizes count as differing)."""
    vocabulary = width = None
    if reference is not None and candidate is not None:
        vocabulary = reference.vocab_size == candidate.vocab_size
        width = reference.dim == candidate.dim
    keys = (() if width else WIDTH_KEYS) + (() if vocabulary else VOCABULARY_KEYS)
    return Comparability(vocabulary, width, keys)


def compare_snapshots(
    reference: Snapshot,
    candidate: Snapshot,
    shapes: tuple[ModelShape | None, ModelShape | None],
    tolerances: Tolerances,
    z: float = DEFAULT_Z,
    now: float | None = None,
) -> LiveCompareResult:
    """Judge `candidate` against `reference` (two ok snapshots of one window)."""
    started = time.perf_counter()
    now = time.time() if now is None else now
    comp = comparability(*shapes)
    metrics = []
    for key in COMPARED_KEYS:
        ref_se = _number(reference.metrics.get(key + TRAFFIC_STDERR_SUFFIX))
        cand_se = _number(candidate.metrics.get(key + TRAFFIC_STDERR_SUFFIX))
        metrics.append(
            judge_live(
                key,
                _number(reference.metrics.get(key)),
                _number(candidate.metrics.get(key)),
                ref_se,
                cand_se,
                tolerances,
                z,
                comparable=key not in comp.not_comparable,
            )
        )
    ref_shape, cand_shape = shapes
    if comp.width is False and ref_shape is not None and cand_shape is not None:
        per_dim = [
            None if rank is None else rank / shape.dim
            for rank, shape in (
                (_number(reference.metrics.get("effective_rank")), ref_shape),
                (_number(candidate.metrics.get("effective_rank")), cand_shape),
            )
        ]
        metrics.append(judge_live(PER_DIM_KEY, per_dim[0], per_dim[1], None, None, tolerances, z))
    drift_status = LiveStatus.unchecked if comp.compatible else LiveStatus.not_comparable
    drift = [
        DriftPair(
            key,
            _number(reference.metrics.get(key)),
            _number(candidate.metrics.get(key)),
            drift_status,
        )
        for key in DRIFT_KEYS
    ]
    return LiveCompareResult(
        reference=_side(reference, ref_shape, now),
        candidate=_side(candidate, cand_shape, now),
        window=reference.window,
        z=z,
        metrics=metrics,
        drift=drift,
        comparability=comp,
        tolerances=tolerances,
        notes=_notes(reference, candidate, shapes, comp, metrics, z),
        seconds=time.perf_counter() - started,
    )


def _side(snapshot: Snapshot, shape: ModelShape | None, now: float) -> LiveSide:
    base = snapshot.baseline or {}
    name = base.get("name")
    return LiveSide(
        "live",
        snapshot.model,
        snapshot.window,
        snapshot.timestamp,
        round(now - snapshot.timestamp, 3),
        snapshot.sample_count,
        snapshot.class_count,
        None if shape is None else shape.dim,
        None if shape is None else shape.vocab_size,
        name if isinstance(name, str) else None,
    )


def _notes(
    reference: Snapshot,
    candidate: Snapshot,
    shapes: tuple[ModelShape | None, ModelShape | None],
    comp: Comparability,
    metrics: list[LiveMetric],
    z: float,
) -> list[str]:
    notes = []
    ref_shape, cand_shape = shapes
    if ref_shape is None or cand_shape is None:
        unknown = reference.model if ref_shape is None else candidate.model
        notes.append(
            f"the vocabulary and width of {unknown} are unknown (its checkpoint's config cannot "
            f"be read here): {', '.join(comp.not_comparable)} and the drift keys are not compared"
        )
    else:
        if comp.vocabulary is False:
            notes.append(
                f"vocabularies differ ({ref_shape.vocab_size} vs {cand_shape.vocab_size}): "
                "classes are different tokens, so class_count and the drift keys are not "
                "compared; the collapse metrics are summaries over each model's own classes"
            )
        if comp.width is False:
            notes.append(
                f"widths differ ({ref_shape.dim} vs {cand_shape.dim}): effective_rank and "
                f"nc1_trace_ratio are bounded by the width and not compared; {PER_DIM_KEY} "
                "(effective_rank / d) is shown for information only"
            )
    names = [(s.baseline or {}).get("name") for s in (reference, candidate)]
    if comp.compatible and any(names):
        notes.append(
            f"drift keys are each model's drift from its own baseline ({reference.model}: "
            f"{names[0] or 'none'}, {candidate.model}: {names[1] or 'none'}), shown for "
            "information"
        )
    small, large = sorted((reference.sample_count, candidate.sample_count))
    if small > 0 and large / small >= VOLUME_GAP:
        notes.append(
            f"sample counts differ {large / small:.1f}x: plug-in keys "
            f"({', '.join(PLUG_IN_KEYS)}) read less collapse at lower volume; the default "
            "checks use nc1_cdnv_unbiased"
        )
    for m in metrics:
        if m.status is LiveStatus.no_interval:
            notes.append(
                f"{m.key} moved beyond its tolerance, but {m.key}{TRAFFIC_STDERR_SUFFIX} is "
                "missing from a snapshot (stderr_groups = 0, or too few buckets), so the move "
                "cannot be shown significant; --z 0 judges on the tolerance alone"
            )
        elif m.status is LiveStatus.not_significant and m.interval is not None:
            score = "inf" if m.interval.z_score is None else f"{abs(m.interval.z_score):.2f}"
            notes.append(
                f"{m.key} moved beyond its tolerance within the noise of the two windows "
                f"(|z| = {score} < {z:g})"
            )
    return notes


# --------------------------------------------------------------------------- reading
def load_snapshot(
    runtime: Runtime, model: str, window: str, now: float, max_age: float
) -> Snapshot:
    """The model's latest snapshot of `window`, refused (exit 2) when absent, not ok or stale."""
    text = runtime.store.snapshot(model, window)
    if text is None:
        raise InvalidInput(
            "no_snapshot",
            f"no snapshot of {model}'s {window} window yet (is beat evaluating, does {model} "
            "get traffic?)",
        )
    try:
        snapshot = Snapshot.from_json(text)
    except (ValueError, TypeError) as exc:
        raise InvalidInput("bad_snapshot", f"{model}'s {window} snapshot: {exc}") from exc
    if not snapshot.ok:
        raise InvalidInput(
            "insufficient_data", f"{model}'s {window} snapshot is not ok: {snapshot.reason}"
        )
    age = now - snapshot.timestamp
    if age > max_age:
        raise InvalidInput(
            "stale_snapshot",
            f"{model}'s {window} snapshot is {age:.0f} s old (the limit is {max_age:.0f} s): "
            "is beat evaluating?",
        )
    return snapshot


def _shape(runtime: Runtime, model: str) -> ModelShape | None:
    """The declared sizes, or None when a checkpoint's config cannot be read from here."""
    try:
        return runtime.registry.shape(model)
    except InvalidInput:
        return None


def compare_live(
    runtime: Runtime,
    reference: str,
    candidate: str,
    window: str,
    tolerances: Tolerances,
    z: float = DEFAULT_Z,
    *,
    max_age: float | None = None,
    now: float | None = None,
) -> LiveCompareResult:
    """Compare the latest `window` snapshots of two declared models in the runtime's store.

    `max_age` (default: 3 evaluation intervals) bounds how old either snapshot may be.
    """
    started = time.perf_counter()
    settings = runtime.settings
    if reference == candidate:
        raise InvalidInput(
            "invalid_option", f"--reference-model and --candidate-model both name {reference!r}"
        )
    for model in (reference, candidate):
        runtime.registry.spec(model)  # an undeclared model: unknown_model
    if window not in settings.windows:
        raise InvalidInput(
            "unknown_window",
            f"window {window!r} is not configured (COLLAPSE_WINDOWS); configured: "
            f"{', '.join(settings.windows)}",
        )
    now = time.time() if now is None else now
    limit = STALE_INTERVALS * settings.evaluation_interval if max_age is None else max_age
    ref_snapshot = load_snapshot(runtime, reference, window, now, limit)
    cand_snapshot = load_snapshot(runtime, candidate, window, now, limit)
    shapes = (_shape(runtime, reference), _shape(runtime, candidate))
    result = compare_snapshots(ref_snapshot, cand_snapshot, shapes, tolerances, z, now)
    return replace(result, seconds=time.perf_counter() - started)  # the reads included
