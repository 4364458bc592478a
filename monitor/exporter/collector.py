"""`CollapseCollector`: the store's snapshots and pipeline counters as Prometheus metric families.

Why it is built this way:
- Everything is read from the store at scrape time and nothing is cached, so two exporter
  replicas scraped at the same moment answer the same numbers (the evaluator owns the state).
- A scrape reads first and renders second: if Redis refuses or times out anywhere while reading,
  the scrape still answers, with `collapse_store_up 0` and no other store series, instead of a
  half-filled page that would look like a real drop of some metrics.
- Reads are bounded: the dedicated client has 1 s socket timeouts and no retries, and a scrape
  gives up after `budget_seconds` of store time, so a wedged Redis cannot pile up scrapes.
- A metric that is missing, null or not finite in a snapshot has no sample (absent, never 0):
  an alert on a gap must not see a false "perfect" value.
- Label values that come from data (token text, custom metric keys, reasons) are sanitised and
  bounded, so cardinality stays flat and the exposition stays parseable whatever the model emits.
"""

from __future__ import annotations

import logging
import math
import platform
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisClusterException

from monitor.config import Settings
from monitor.exporter import (
    COUNTERS,
    FAMILY_HELP,
    METRIC_HELP,
    PREFIX,
    REASON_COUNTERS,
    RESERVED_NAMES,
    custom_help,
    gauge_name,
)
from monitor.pipeline.deadletter import DEAD_LETTER_REASONS, FAILURE_REASONS
from monitor.snapshot import snapshot_document
from monitor.store.base import Store
from monitor.store.keys import MODEL_NAME, UNKNOWN_MODEL

__all__ = ["CollapseCollector", "label_text", "metric_suffix"]

log = logging.getLogger(__name__)

TOKEN_MAX_CHARS = 32
LABEL_MAX_CHARS = 64
# A cluster client raises RedisClusterException (not a RedisError) when no node answers.
STORE_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException, OSError)
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_]")


class ScrapeTimeout(Exception):
    """The store answered too slowly for this scrape's budget."""


SCRAPE_ERRORS: tuple[type[Exception], ...] = (*STORE_ERRORS, ScrapeTimeout)


def metric_suffix(key: str) -> str | None:
    """A snapshot key as a metric-name suffix ([A-Za-z0-9_]), or None when nothing is left."""
    name = _UNSAFE_NAME.sub("_", str(key))[:100].strip("_")
    return name or None


def label_text(text: object, limit: int) -> str:
    """Printable, bounded label text: control characters become `\\xNN`-style escapes."""
    out = []
    for ch in str(text):
        out.append(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii"))
        if sum(len(p) for p in out) >= limit:
            break
    return "".join(out)[:limit]


def finite(value: object) -> float | None:
    """The value as a float when it is a finite number (bools count as 0/1), else None."""
    if not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # a JSON integer beyond float range
        return None
    return number if math.isfinite(number) else None


@dataclass
class _ModelView:
    model: str
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    oldest_pending: float | None = None
    memory_bytes: int | None = None


@dataclass
class _StoreView:
    now: float
    models: list[_ModelView]
    unknown_counters: dict[str, int]
    queues: dict[str, int]


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def expired(self) -> bool:
        return time.monotonic() > self.end

    def check(self) -> None:
        if self.expired():
            raise ScrapeTimeout("store reads exceeded the scrape budget")


class CollapseCollector(Collector):
    """Custom collector over a `Store`; register it in a private `CollectorRegistry`."""

    def __init__(
        self,
        store: Store,
        *,
        models: Iterable[str],
        windows: Iterable[str],
        secrets: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        budget_seconds: float = 1.5,
        queue_depths: Callable[[], dict[str, int]] | None = None,
        top_drift_limit: int = 20,
    ) -> None:
        """`models`: declared models, exported (counters at 0) before they store anything;
        `windows`: the snapshot windows read per model; `secrets`: masked in logged errors;
        `top_drift_limit`: top-drift series per model and window (the `token` label's bound,
        the evaluator's `top_drift_classes`)."""
        self.store = store
        self.models = tuple(models)
        self.windows = tuple(windows)
        self.queue_depths = queue_depths  # the broker's queues; None: not exported
        self.clock = clock
        self.budget_seconds = budget_seconds
        self._was_up: bool | None = None  # only to log transitions once, never read by output
        self._secrets = tuple(secrets)
        self.top_drift_limit = top_drift_limit
        self._build = build_info()

    @classmethod
    def for_settings(cls, store: Store, settings: Settings, **options: Any) -> CollapseCollector:
        """The collector of a deployment: its declared models, windows and secrets."""
        return cls(
            store,
            models=[m.name for m in settings.models],
            windows=list(settings.windows),
            secrets=settings.secret_values(),
            top_drift_limit=settings.top_drift_classes,
            **options,
        )

    # ------------------------------------------------------------------ collect
    def collect(self) -> Iterator[Metric]:
        yield self._build  # not a store series: shown whether or not Redis answers
        try:
            view = self._read(_Deadline(self.budget_seconds))
        except SCRAPE_ERRORS as exc:
            self._note(False, exc)
            yield _store_up(0)
            return
        self._note(True, None)
        yield _store_up(1)
        yield from _render(view, self.top_drift_limit)

    def _note(self, up: bool, exc: BaseException | None) -> None:
        """Log a change of store state once (every failed scrape again only at DEBUG)."""
        changed, self._was_up = up != self._was_up, up
        if exc is None:
            if changed:
                log.info("store readable: exporting snapshots")
            return
        message = str(exc)[:200]
        for secret in self._secrets:  # redis error texts should not carry them; make sure
            message = message.replace(secret, "***")
        level = logging.WARNING if changed else logging.DEBUG
        log.log(level, "store unreadable, collapse_store_up 0: %s: %s", type(exc).__name__, message)

    # --------------------------------------------------------------------- read
    def _read(self, deadline: _Deadline) -> _StoreView:
        store = self.store
        if not store.ping():
            raise redis.ConnectionError("ping failed")
        names = set(store.models()) | set(self.models)
        models = []
        for name in sorted(n for n in names if MODEL_NAME.match(n)):
            deadline.check()
            view = _ModelView(name)
            for window in self.windows:
                doc = _parse_snapshot(store.snapshot(name, window), name, window)
                if doc is not None:
                    view.snapshots[window] = doc
            view.counters = store.counters(name)
            view.pending = store.pending_count(name)
            view.oldest_pending = store.oldest_pending(name)
            models.append(view)
        deadline.check()
        unknown = store.counters(UNKNOWN_MODEL)
        queues = self.queue_depths() if self.queue_depths is not None else {}
        for view in models:  # best effort: past the budget, or refused, memory is left out
            if deadline.expired():
                break
            try:
                view.memory_bytes = store.memory_bytes(view.model)
            except redis.ResponseError as exc:  # e.g. MEMORY disabled on a managed Redis
                log.debug("memory of %s not measured: %s", view.model, exc)
        return _StoreView(self.clock(), models, unknown, queues)


def _parse_snapshot(raw: str | None, model: str, window: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        return snapshot_document(raw)
    except ValueError as exc:  # not JSON, or another schema
        log.warning("snapshot of %s/%s skipped: %s", model, window, str(exc)[:200])
        return None


def package_version() -> str:
    """The installed distribution's version (what pip installed), else the source tree's."""
    try:
        return metadata.version("collapse-monitor")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        from monitor import __version__

        return __version__


def build_info() -> GaugeMetricFamily:
    """`collapse_build_info{version, python} 1`: which release exports these series."""
    family = GaugeMetricFamily(
        f"{PREFIX}build_info", FAMILY_HELP["build_info"], labels=["version", "python"]
    )
    family.add_metric([package_version(), platform.python_version()], 1.0)
    return family


def _store_up(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}store_up", FAMILY_HELP["store_up"], value=value)


def _gauge(name: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, FAMILY_HELP[name], labels=labels)


def _counter(name: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, FAMILY_HELP[name], labels=labels)


# ----------------------------------------------------------------------- render
def _render(view: _StoreView, top_drift_limit: int) -> Iterator[Metric]:
    yield from _snapshot_families(view.models, top_drift_limit)
    yield from _health_families(view)


def _snapshot_families(models: list[_ModelView], top_drift_limit: int) -> Iterator[Metric]:
    values: dict[str, dict[tuple[str, str], float]] = {}
    timestamp = _gauge("snapshot_timestamp_seconds", ["model", "window"])
    duration = _gauge("evaluation_duration_seconds", ["model", "window"])
    ok = _gauge("snapshot_ok", ["model", "window"])
    top = _gauge("top_drift_cosine_distance", ["model", "window", "token", "class_id"])
    info = _gauge("baseline_info", ["model", "baseline_id", "source"])
    created = _gauge("baseline_created_timestamp_seconds", ["model", "baseline_id"])
    for view in models:
        baselines: dict[tuple[str, str], list[float]] = {}
        for window, doc in view.snapshots.items():
            labels = [view.model, window]
            for family, key in ((timestamp, "timestamp"), (duration, "duration_seconds")):
                number = finite(doc.get(key))
                if number is not None:
                    family.add_metric(labels, number)
            ok.add_metric(labels, 1.0 if doc.get("status") == "ok" else 0.0)
            metrics = doc.get("metrics")
            metrics = dict(metrics) if isinstance(metrics, dict) else {}
            for key in ("sample_count", "class_count"):  # counts are known even when too few
                metrics.setdefault(key, doc.get(key))
            for key, raw in metrics.items():
                suffix, number = metric_suffix(key), finite(raw)
                if suffix is None or number is None or PREFIX + suffix in RESERVED_NAMES:
                    continue
                values.setdefault(suffix, {}).setdefault((view.model, window), number)
            _add_top_drift(top, labels, doc.get("top_drift"), top_drift_limit)
            base = doc.get("baseline")
            if isinstance(base, dict) and base.get("name") is not None:
                name = label_text(base["name"], LABEL_MAX_CHARS)
                source = label_text(base.get("source") or "", LABEL_MAX_CHARS)
                stamp = finite(base.get("created"))
                baselines.setdefault((name, source), []).extend([] if stamp is None else [stamp])
        stamps: dict[str, list[float]] = {}
        for (name, source), found in sorted(baselines.items()):
            info.add_metric([view.model, name, source], 1.0)
            stamps.setdefault(name, []).extend(found)
        for name, found in sorted(stamps.items()):
            if found:  # windows evaluated across a re-pin may disagree: the newest wins
                created.add_metric([view.model, name], max(found))
    ordered = [k for k in METRIC_HELP if k in values] + sorted(set(values) - set(METRIC_HELP))
    for suffix in ordered:
        family = GaugeMetricFamily(
            gauge_name(suffix),
            METRIC_HELP.get(suffix) or custom_help(suffix),
            labels=["model", "window"],
        )
        for (model, window), number in values[suffix].items():
            family.add_metric([model, window], number)
        yield family
    for family in (ok, timestamp, duration, info, created, top):
        if family.samples:
            yield family


def _add_top_drift(
    family: GaugeMetricFamily, labels: list[str], entries: object, limit: int
) -> None:
    if not isinstance(entries, list):
        return
    seen: set[int] = set()
    for entry in entries:
        if len(seen) >= limit:
            break
        if not isinstance(entry, dict):
            continue
        class_id, distance = entry.get("class_id"), finite(entry.get("cosine_distance"))
        if not isinstance(class_id, int) or isinstance(class_id, bool) or distance is None:
            continue
        if class_id in seen:  # a duplicate label set would make Prometheus reject the scrape
            continue
        seen.add(class_id)
        token = label_text(entry.get("token", ""), TOKEN_MAX_CHARS)
        family.add_metric([*labels, token, str(class_id)], distance)


# Reasons shown at 0 before the first one: Prometheus's increase() cannot see a series that is
# born at 1, so an alert on "any increase" would miss the first dead letter.
KNOWN_REASONS: dict[str, tuple[str, ...]] = {
    "dead_letters": DEAD_LETTER_REASONS,
    "ingest_failures": FAILURE_REASONS,
}


def _health_families(view: _StoreView) -> Iterator[Metric]:
    counters = {name: _counter(name, ["model"]) for name in COUNTERS if name not in REASON_COUNTERS}
    by_reason = {name: _counter(name, ["model", "reason"]) for name in REASON_COUNTERS}
    pending = _gauge("pending_partials", ["model"])
    lag = _gauge("compaction_lag_seconds", ["model"])
    memory = _gauge("store_memory_bytes", ["model"])
    for model in view.models:
        for name, family in counters.items():
            family.add_metric([model.model], float(model.counters.get(name, 0)))
        for name, family in by_reason.items():
            _add_by_reason(family, name, model.model, model.counters)
        pending.add_metric([model.model], float(model.pending))
        oldest = model.oldest_pending
        lag.add_metric([model.model], 0.0 if oldest is None else max(view.now - oldest, 0.0))
        if model.memory_bytes is not None:
            memory.add_metric([model.model], float(model.memory_bytes))
    for name, family in by_reason.items():
        _add_by_reason(family, name, UNKNOWN_MODEL, view.unknown_counters)
    queues = _gauge("queue_depth", ["queue"])
    for queue, depth in view.queues.items():
        queues.add_metric([queue], float(depth))
    families: list[Metric] = [
        *counters.values(),
        *by_reason.values(),
        pending,
        lag,
        memory,
        queues,
    ]
    yield from (f for f in families if f.samples)


def _add_by_reason(
    family: CounterMetricFamily, name: str, model: str, counters: dict[str, int]
) -> None:
    """One series per reason of counter `name` (fields `<prefix><reason>` of the counters
    hash), plus the known reasons at 0; reasons are sanitised label text."""
    prefix = REASON_COUNTERS[name]
    totals: dict[str, float] = dict.fromkeys(KNOWN_REASONS.get(name, ()), 0.0)
    for field_name, value in sorted(counters.items()):
        if field_name.startswith(prefix):
            reason = label_text(field_name.removeprefix(prefix), LABEL_MAX_CHARS)
            totals[reason] = totals.get(reason, 0.0) + float(value)
    for reason, total in totals.items():
        family.add_metric([model, reason], total)
