"""`compare`: a collapse regression gate between two model versions (or a pinned baseline).

Both models run over the same corpus slice (same token ids, batches, seed and NC4 positions);
every metric is computed for each, and each metric with a tolerance is judged on its relative
change in its bad direction (`monitor.offline.tolerances`). The drift of the candidate's
features from the reference's (MMD in shared random Fourier features, mean shift, ...) is
judged against absolute maxima. The JSON document (`CompareResult.to_json`) is a stable
contract for CI systems, versioned by `SCHEMA_VERSION` (docs/compare.md).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import torch

from monitor.config import Settings
from monitor.data.files import read_lines
from monitor.errors import ExitCode, InvalidInput
from monitor.metrics import compute_metrics
from monitor.metrics.drift import DriftReport, compute_drift
from monitor.metrics.engine import resolve_device
from monitor.metrics.report import COLLAPSE_KEYS, GEOMETRY_KEYS
from monitor.offline.corpus_run import (
    ModelRun,
    Progress,
    context_length,
    nc4_positions,
    open_model,
    open_tokenizer,
    run_model,
    tokenize_slice,
)
from monitor.offline.tolerances import BAD_DIRECTION, Tolerances
from monitor.stats import CollapseStats
from monitor.stats.rff import BucketSums

SCHEMA_VERSION = 1
COMPARED_KEYS: tuple[str, ...] = COLLAPSE_KEYS + GEOMETRY_KEYS
DRIFT_REPORTED: tuple[str, ...] = (
    "drift_mmd",
    "drift_mmd_threshold",
    "drift_mean_shift",
    "drift_class_mean_cos",
    "drift_label_js",
)
DEFAULT_MAX_TOKENS = 50_000
Value = float | int | None


class Status(StrEnum):
    """The verdict on one metric: only `regressed` fails the gate."""

    ok = "ok"  # within its tolerance
    regressed = "regressed"  # beyond its tolerance, or missing in the candidate only
    unchecked = "unchecked"  # no tolerance for this key: reported for information
    skipped = "skipped"  # a tolerance, but no reference value to compare with


@dataclass(frozen=True)
class MetricComparison:
    """One metric on both sides; `relative_change = (candidate - reference) / |reference|`."""

    key: str
    reference: Value
    candidate: Value
    relative_change: float | None
    bad_direction: str | None
    tolerance: float | None
    status: Status

    @property
    def regressed(self) -> bool:
        return self.status is Status.regressed


@dataclass(frozen=True)
class DriftCheck:
    """A drift metric of the candidate's features against the reference's, with its maximum."""

    key: str
    value: float | None
    max: float | None
    status: Status

    @property
    def regressed(self) -> bool:
        return self.status is Status.regressed


@dataclass(frozen=True)
class Side:
    """What one side of the comparison is: a model run over the corpus, or a pinned baseline."""

    kind: Literal["model", "baseline"]
    name: str
    sample_count: int
    class_count: int
    dim: int


@dataclass(frozen=True)
class CorpusInfo:
    path: str
    documents: int  # lines the slice used
    positions: int  # labelled positions (samples) per model
    max_tokens: int
    nc4_positions: int
    seed: int


@dataclass(frozen=True)
class CompareResult:
    """The whole comparison; `to_json` is the documented, versioned document."""

    reference: Side
    candidate: Side
    corpus: CorpusInfo
    metrics: list[MetricComparison]
    drift: list[DriftCheck]
    tolerances: Tolerances
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def regressions(self) -> list[str]:
        """Keys that failed, metrics first, in catalogue order."""
        return [m.key for m in self.metrics if m.regressed] + [
            d.key for d in self.drift if d.regressed
        ]

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.REGRESSION if self.regressions else ExitCode.OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "passed": not self.regressions,
            "exit_code": int(self.exit_code),
            "regressions": self.regressions,
            "reference": asdict(self.reference),
            "candidate": asdict(self.candidate),
            "corpus": asdict(self.corpus),
            "metrics": [{**asdict(m), "status": m.status.value} for m in self.metrics],
            "drift": [{**asdict(d), "status": d.status.value} for d in self.drift],
            "tolerances": {
                "relative": dict(self.tolerances.relative),
                "absolute": dict(self.tolerances.absolute),
            },
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), allow_nan=False)  # NaN is not JSON; values are None


# --------------------------------------------------------------------------- judging
def relative_change(reference: Value, candidate: Value) -> float | None:
    """(candidate - reference) / |reference|; None when either is missing or reference is 0."""
    if reference is None or candidate is None or reference == 0:
        return None
    value = (float(candidate) - float(reference)) / abs(float(reference))
    return value if math.isfinite(value) else None


def judge_metric(key: str, reference: Value, candidate: Value, tol: Tolerances) -> MetricComparison:
    """The verdict on one metric (see `Status`)."""
    direction = BAD_DIRECTION.get(key)
    limit = tol.relative.get(key)
    change = relative_change(reference, candidate)
    if limit is None or direction is None:
        status = Status.unchecked
    elif reference is None:
        status = Status.skipped
    elif candidate is None:
        status = Status.regressed  # computable before, not any more (e.g. fewer than 2 classes)
    elif change is None:  # reference exactly 0: any move in the bad direction is unbounded
        worse = float(candidate) > 0 if direction == "increase" else float(candidate) < 0
        status = Status.regressed if worse else Status.ok
    else:
        bad = change if direction == "increase" else -change
        status = Status.regressed if bad > limit else Status.ok
    return MetricComparison(
        key,
        reference,
        candidate,
        change,
        None if direction is None else direction.value,
        limit,
        status,
    )


def judge(
    reference: Mapping[str, Value],
    candidate: Mapping[str, Value],
    drift: Mapping[str, float | None],
    tol: Tolerances,
) -> tuple[list[MetricComparison], list[DriftCheck]]:
    """Every compared metric and drift key, judged against `tol`."""
    metrics = [judge_metric(k, reference.get(k), candidate.get(k), tol) for k in COMPARED_KEYS]
    checks: list[DriftCheck] = []
    for key in DRIFT_REPORTED:
        value, limit = drift.get(key), tol.absolute.get(key)
        if limit is None:
            status = Status.unchecked
        elif value is None:
            status = Status.skipped
        else:
            status = Status.regressed if value > limit else Status.ok
        checks.append(DriftCheck(key, value, limit, status))
    return metrics, checks


# --------------------------------------------------------------------------- running
@dataclass(frozen=True)
class CompareOptions:
    """How the corpus is run: at most `max_tokens` labelled positions per model."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    batch_size: int = 8
    second_moment: bool = True
    settings: Settings = field(default_factory=Settings)


def drift_between(
    candidate: CollapseStats,
    reference: CollapseStats,
    buckets: list[BucketSums],
    settings: Settings,
) -> DriftReport:
    return compute_drift(
        candidate,
        reference,
        base_buckets=buckets,
        min_count=settings.min_count,
        quantile=settings.drift_quantile,
        top_k=0,
    )


def metrics_of(run: ModelRun, settings: Settings) -> dict[str, Value]:
    options = settings.metric_options()
    return compute_metrics(
        run.stats, run.weight, run.bias, eval_features=run.nc4_features, **options
    ).as_dict()


def _side(kind: Literal["model", "baseline"], name: str, stats: CollapseStats, k: Value) -> Side:
    return Side(kind, name, stats.sample_count, int(k or 0), stats.dim)


def _first_difference(a: list[list[int]], b: list[list[int]]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _check_vocab(reference: int, candidate: int | None) -> None:
    if candidate is not None and candidate != reference:
        raise InvalidInput(
            "incomparable_models",
            f"vocabulary sizes differ (reference {reference}, candidate {candidate}): compare "
            "needs one tokenizer, since classes are token ids",
        )


def _width(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[1])


def corpus_slice(
    seqs: list[list[int]], corpus: Path, options: CompareOptions
) -> tuple[torch.Tensor, CorpusInfo]:
    """The NC4 sample positions of a tokenised slice, and its description; an empty one is
    refused (both comparison modes run the same slice the same way)."""
    total = sum(len(s) - 1 for s in seqs)
    if total == 0:
        raise InvalidInput("empty_corpus", f"corpus {corpus} has no line of two tokens or more")
    settings = options.settings
    positions = nc4_positions(total, settings.nc4_max_samples, settings.seed)
    info = CorpusInfo(
        str(corpus), len(seqs), total, options.max_tokens, int(positions.numel()), settings.seed
    )
    return positions, info


def compare_models(
    reference: str,
    candidate: str,
    corpus: Path,
    tolerances: Tolerances,
    options: CompareOptions,
    progress: Progress | None = None,
) -> CompareResult:
    """Run both models over the same slice of `corpus` and judge the candidate.

    Comparable means the same classes: equal LM-head vocabulary sizes and identical token ids
    for the corpus slice under both tokenizers. Hidden widths may differ; then the drift keys,
    which need one feature space, are absent.
    """
    started = time.perf_counter()
    settings = options.settings
    lines = read_lines(corpus)
    device = str(resolve_device(settings.device))
    cand_tok, cand_config = open_tokenizer(candidate)  # a bad candidate fails before any run
    ref_model, ref_tok = open_model(reference, device)
    vocab = int(ref_model.get_output_embeddings().weight.shape[0])
    _check_vocab(vocab, getattr(cand_config, "vocab_size", None))
    limits = [n for n in (context_length(ref_model), context_length(cand_config)) if n]
    max_length = min(limits) if limits else None
    seqs = tokenize_slice(ref_tok, lines, options.max_tokens, max_length)
    other = tokenize_slice(cand_tok, lines, options.max_tokens, max_length)
    if seqs != other:
        raise InvalidInput(
            "incomparable_models",
            "the two tokenizers split the corpus differently (first difference in sequence "
            f"{_first_difference(seqs, other)}): compare needs one tokenizer",
        )
    positions, corpus_info = corpus_slice(seqs, corpus, options)
    ref_run = run_model(
        ref_model,
        ref_tok,
        seqs,
        positions=positions,
        rff="auto",
        second_moment=options.second_moment,
        batch_size=options.batch_size,
        calibrate=True,
        label="reference",
        progress=progress,
    )
    del ref_model  # one model in memory at a time
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    cand_model, cand_tok = open_model(candidate, device)
    _check_vocab(vocab, int(cand_model.get_output_embeddings().weight.shape[0]))
    same_width = ref_run.stats.dim == _width(cand_model)
    cand_run = run_model(
        cand_model,
        cand_tok,
        seqs,
        positions=positions,
        rff=ref_run.stats.rff if same_width else None,
        second_moment=options.second_moment,
        batch_size=options.batch_size,
        label="candidate",
        progress=progress,
    )
    ref_values, cand_values = metrics_of(ref_run, settings), metrics_of(cand_run, settings)
    notes: list[str] = []
    drift: dict[str, float | None] = {}
    if ref_run.stats.dim == cand_run.stats.dim:
        drift = drift_between(cand_run.stats, ref_run.stats, ref_run.buckets, settings).as_dict()
    else:
        notes.append(
            f"hidden widths differ ({ref_run.stats.dim} vs {cand_run.stats.dim}): no drift keys"
        )
    metrics, checks = judge(ref_values, cand_values, drift, tolerances)
    return CompareResult(
        reference=_side("model", reference, ref_run.stats, ref_values["class_count"]),
        candidate=_side("model", candidate, cand_run.stats, cand_values["class_count"]),
        corpus=corpus_info,
        metrics=metrics,
        drift=checks,
        tolerances=tolerances,
        notes=notes,
        seconds=time.perf_counter() - started,
    )
