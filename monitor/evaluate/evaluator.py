"""The evaluator: for each model and window, every metric, drift against the pinned baseline,
standard errors from the window's own traffic, and one snapshot written atomically. Runs as a
beat task or once (`collapse-monitor evaluate`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from monitor.errors import CollapseMonitorError, InvalidInput
from monitor.evaluate.custom import discover, run_custom
from monitor.evaluate.heads import Head, load_head
from monitor.metrics import MetricReport, compute_metrics
from monitor.metrics.baseline import BaselineSummary
from monitor.metrics.drift import compute_drift
from monitor.metrics.engine import ClassPairs
from monitor.metrics.jackknife import (
    Group,
    JackknifeResult,
    deal_groups,
    jackknife,
    ratio_stderrs,
    traffic_stderrs,
)
from monitor.metrics.replicates import CarriedStderrs, alert_replicates
from monitor.metrics.report import ALERT_STDERR_KEYS
from monitor.pipeline.baselines import TRAFFIC_STDERR_META, checked_baseline, decode_calibration
from monitor.pipeline.nc4_means import encode_nc4_means
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import (
    BucketCut,
    BucketGroup,
    changed_buckets,
    read_state,
    state_rows,
    window_stats,
)
from monitor.snapshot import Snapshot, TopDrift
from monitor.stats import CollapseStats
from monitor.stats.rff import BucketSums
from monitor.store.base import NC4_MEANS_STATE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Baseline:
    """A baseline as the evaluator keeps it: metrics and a summary, not its K x d class sums
    (those are streamed from the store when drift compares class means)."""

    name: str
    meta: dict[str, object]
    state: str
    summary: BaselineSummary
    metrics: dict[str, float | int | None]
    buckets: list[BucketSums]
    stderrs: dict[str, float]  # traffic stderrs recorded at pin time (may be empty)


@dataclass(frozen=True)
class _Evaluated:
    snapshot: Snapshot
    stats: CollapseStats | None
    cut: tuple[BucketCut, ...]


class Evaluator:
    """Holds what is expensive to rebuild (heads, custom metrics, baseline metrics)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.custom = discover(runtime.settings.custom_metrics)
        self._baselines: dict[str, tuple[tuple[str, object], _Baseline]] = {}
        self._heads: dict[str, Head | None] = {}
        # Each window's last jackknife, carried between jackknifes (settings.stderr_interval).
        self._carried: dict[tuple[str, str], CarriedStderrs] = {}

    def evaluate_model(self, model: str, *, now: float | None = None) -> list[Snapshot]:
        """Evaluate every window of `model`, store the snapshots and the NC4 reference."""
        now = time.time() if now is None else now
        settings, store = self.runtime.settings, self.runtime.store
        self.runtime.registry.spec(model)  # unknown models are refused here
        if model not in self._heads:
            self._heads[model] = load_head(self.runtime, model)
        head = self._heads[model]
        baseline = self._baseline(model, head)
        snapshots: list[Snapshot] = []
        reference_done = False
        for window, seconds in sorted(settings.windows.items(), key=lambda kv: kv[1]):
            done = self._evaluate_window(model, window, seconds, now, head, baseline)
            snapshot, stats = done.snapshot, done.stats
            if snapshot.ok and stats is not None and not reference_done:
                # The shortest window with data gives the means NC4 is counted against.
                kept = stats.classes(min_count=settings.min_count)
                store.write_state(model, NC4_MEANS_STATE, encode_nc4_means(kept, stats.dim))
                reference_done = True
            if snapshot.ok and stats is not None:
                # Last: the jackknife works in place in `stats`.
                snapshot = self._with_stderrs(model, snapshot, stats, done.cut, now, baseline)
            store.put_snapshot(model, window, snapshot.to_json(), history=settings.snapshot_history)
            snapshots.append(snapshot)
        store.meta_setdefault(model, "first_evaluation", repr(now))
        return snapshots

    def _evaluate_window(
        self,
        model: str,
        window: str,
        seconds: int,
        now: float,
        head: Head | None,
        baseline: _Baseline | None,
    ) -> _Evaluated:
        settings = self.runtime.settings
        started = time.perf_counter()
        read = window_stats(self.runtime.store, model, window, seconds, now=now)
        stats = read.stats
        base = Snapshot(
            model=model,
            window=window,
            window_seconds=seconds,
            timestamp=now,
            status="insufficient_data",
            reason="no samples in the window yet",
            duration_seconds=0.0,
            sample_count=stats.sample_count if stats else 0,
            class_count=0,
        )
        if stats is None or stats.sample_count == 0:
            return _Evaluated(
                replace(base, duration_seconds=time.perf_counter() - started), None, ()
            )
        report = self._metrics(stats, head)
        metrics = dict(report.as_dict())
        if report.class_count < 2:
            reason = (
                f"{report.class_count} class(es) with at least {settings.min_count} samples; "
                "the collapse metrics need 2"
            )
            counts = {k: metrics[k] for k in ("sample_count", "class_count")}
            elapsed = time.perf_counter() - started
            done = replace(base, reason=reason, metrics=counts, duration_seconds=elapsed)
            return _Evaluated(done, stats, read.cut)
        metrics.update(run_custom(self.custom, stats, head.weight if head else None))
        top: list[TopDrift] = []
        base_doc = None
        if baseline is not None:
            store = self.runtime.store
            drift = compute_drift(
                stats,
                baseline.summary,
                base_rows=lambda: state_rows(store, model, baseline.state),
                window_metrics=metrics,
                base_metrics=baseline.metrics,
                base_buckets=baseline.buckets,
                min_count=settings.min_count,
                quantile=settings.drift_quantile,
                top_k=settings.top_drift_classes,
                max_mean_noise=settings.drift_max_mean_noise,
                min_samples_per_dim=settings.drift_min_samples_per_dim,
            )
            metrics.update(drift.as_dict())
            text = head.token_text if head else (lambda i: f"#{i}")
            top = [
                TopDrift(
                    c.class_id,
                    text(c.class_id),
                    c.count,
                    c.base_count,
                    c.cosine_distance,
                    c.contribution,
                )
                for c in drift.top_classes
            ]
            base_doc = {
                "name": baseline.name,
                "created": baseline.meta.get("created"),
                "sample_count": baseline.summary.sample_count,
                "source": baseline.meta.get("source"),
            }
        snapshot = replace(
            base,
            status="ok",
            reason=None,
            class_count=report.class_count,
            metrics=metrics,
            baseline=base_doc,
            top_drift=top,
            duration_seconds=time.perf_counter() - started,
        )
        return _Evaluated(snapshot, stats, read.cut)

    # ------------------------------------------------------------ standard errors
    def _with_stderrs(
        self,
        model: str,
        snapshot: Snapshot,
        stats: CollapseStats,
        cut: tuple[BucketCut, ...],
        now: float,
        baseline: _Baseline | None,
    ) -> Snapshot:
        """The snapshot with `<key>_traffic_stderr` and `drift_<k>_ratio_stderr` added where
        they can be computed (docs/architecture.md, "Standard errors"); `stats` is then spent.

        A jackknife at most every `stderr_interval` seconds per window; the evaluations between
        carry its relative errors, scaled to the window's volume now."""
        settings = self.runtime.settings
        if settings.stderr_groups < 1:
            return snapshot
        window = (model, snapshot.window)
        carried = self._carried.get(window)
        if carried is not None and 0 <= now - carried.at < settings.stderr_interval:
            result = carried.scaled(snapshot.metrics, stats.sample_count, stats.nc4_total)
            log.info(
                "traffic stderrs of %s/%s carried from the jackknife of %.0f s ago: relative "
                "errors scaled by sqrt(N_then / N_now) = sqrt(%d / %d); the next in %.0f s",
                model,
                snapshot.window,
                now - carried.at,
                carried.sample_count,
                stats.sample_count,
                settings.stderr_interval - (now - carried.at),
            )
            return self._add_stderrs(snapshot, result, baseline, 0.0)
        if not cut:
            return snapshot
        started = time.perf_counter()
        try:
            result, full = self._jackknife(model, stats, cut, now, snapshot)
        except CollapseMonitorError as exc:  # late data, a busy lock: next evaluation
            log.info("no traffic stderrs for %s/%s this time: %s", model, snapshot.window, exc)
            return snapshot
        except Exception:  # the snapshot matters more than its error bars
            log.exception("traffic stderrs of %s/%s failed", model, snapshot.window)
            return snapshot
        elapsed = time.perf_counter() - started
        if result.groups < 2:
            log.debug(
                "no traffic stderrs for %s/%s: fewer than 2 settled buckets", model, snapshot.window
            )
            return snapshot
        # The jackknife restored every count of `stats` exactly.
        self._carried[window] = CarriedStderrs.of(result, full, stats, now)
        log.info(
            "jackknife of %s/%s: %d groups of %d buckets, %.2f s beside %.2f s of evaluation; "
            "carried for %.0f s",
            model,
            snapshot.window,
            result.groups,
            len(cut),
            elapsed,
            snapshot.duration_seconds,
            settings.stderr_interval,
        )
        return self._add_stderrs(snapshot, result, baseline, elapsed)

    def _add_stderrs(
        self,
        snapshot: Snapshot,
        result: JackknifeResult,
        baseline: _Baseline | None,
        elapsed: float,
    ) -> Snapshot:
        metrics = dict(snapshot.metrics)
        metrics.update(traffic_stderrs(metrics, result))
        if baseline is not None:
            metrics.update(
                ratio_stderrs(metrics, baseline.metrics, baseline.stderrs, baseline.summary)
            )
        return replace(
            snapshot, metrics=metrics, duration_seconds=snapshot.duration_seconds + elapsed
        )

    def _jackknife(
        self,
        model: str,
        stats: CollapseStats,
        cut: tuple[BucketCut, ...],
        now: float,
        snapshot: Snapshot,
    ) -> tuple[JackknifeResult, dict[str, float | int | None]]:
        """Delete-a-group jackknife over the window's settled buckets; also returns the window
        values the replicates were compared with.

        A bucket that may still receive data (it ended less than two compaction intervals, or
        one bucket length if shorter, before `now`) or that already did since the window was
        read is held fixed in every replicate: deleting it would need its content as the window
        summed it, and one that changed between a replicate's subtraction and its addition
        would abandon the jackknife.

        When the window's pairs were sampled, the replicates' pair metrics come from
        `stderr_pair_samples` pairs drawn once, by class id (each replicate uses those whose
        classes it keeps), and the window's value they are compared with from the same pairs
        (`monitor.metrics.replicates`); else every replicate walks every pair.
        """
        settings, store = self.runtime.settings, self.runtime.store
        settle = 2.0 * settings.compaction_interval
        changed = changed_buckets(store, model, cut)
        movable = [
            c for c in cut if c.end <= now - min(settle, c.end - c.start) and c.state not in changed
        ]
        groups = []
        for members in deal_groups([c.sample_count for c in movable], settings.stderr_groups):
            chosen = [movable[i] for i in members]
            groups.append(Group(BucketGroup(store, model, chosen)))
        if len(groups) < 2:
            return JackknifeResult({}, 0), dict(snapshot.metrics)
        evaluate, full = alert_replicates(
            stats,
            snapshot.metrics,
            self._replicate_metrics,
            sampled=snapshot.class_count > settings.max_exact_classes,  # compute_metrics' rule
            pair_samples=min(settings.stderr_pair_samples, settings.pair_samples),
            seed=settings.seed,
            min_count=settings.min_count,
        )
        return jackknife(stats, groups, evaluate, full, ALERT_STDERR_KEYS), full

    def _replicate_metrics(
        self, stats: CollapseStats, pairs: ClassPairs | None, keys: Sequence[str]
    ) -> dict[str, float | int | None]:
        """Metrics of a replicate (`monitor.metrics.replicates`): the window's options, no head
        (NC3 is no alert key; NC4 is the replicate's own counts, as the window's is from its
        counts)."""
        options = self.runtime.settings.metric_options()
        return dict(compute_metrics(stats, keys=keys, pairs=pairs, **options).as_dict())

    def _metrics(self, stats: CollapseStats, head: Head | None) -> MetricReport:
        return compute_metrics(
            stats,
            head.weight if head else None,
            head.bias if head else None,
            **self.runtime.settings.metric_options(),
        )

    def _baseline(self, model: str, head: Head | None) -> _Baseline | None:
        """The model's configured (or newest) baseline with its metrics, computed once."""
        store, registry = self.runtime.store, self.runtime.registry
        pinned = store.baselines(model)
        if not pinned:
            return None
        name = registry.spec(model).baseline
        if name is None:
            name = max(pinned, key=lambda n: _created(pinned[n]))
        elif name not in pinned:
            log.warning("baseline %r of %s is not pinned; drift is not computed", name, model)
            return None
        key = (name, pinned[name].get("created"))
        cached = self._baselines.get(model)
        if cached is None or cached[0] != key:
            self._baselines.pop(model, None)  # the old one's memory goes before the new loads
            found = checked_baseline(store, registry, model, name)  # stamp read once
            stats = read_state(store, model, found.state)
            if stats is None:
                raise InvalidInput(
                    "unknown_baseline", f"baseline {name!r} of {model!r} has no data"
                )
            buckets = decode_calibration(found.calibration)
            metrics = dict(self._metrics(stats, head).as_dict())
            summary = BaselineSummary.of(stats)
            del stats  # only the summary stays: O(K + d), not K x d
            stderrs = _pinned_stderrs(found.meta)
            cached = (
                key,
                _Baseline(name, found.meta, found.state, summary, metrics, buckets, stderrs),
            )
            self._baselines[model] = cached
        return cached[1]


def _created(meta: dict[str, object]) -> float:
    value = meta.get("created")
    return float(value) if isinstance(value, int | float) else 0.0


def _pinned_stderrs(meta: Mapping[str, object]) -> dict[str, float]:
    """The traffic stderrs a baseline's stamp carries (pinned from an evaluated window)."""
    found = meta.get(TRAFFIC_STDERR_META)
    if not isinstance(found, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in found.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    }
