"""One evaluation run over every declared model, as the `collapse.evaluate` task does it
(`monitor.worker.tasks`): Celery-free, so the evaluator is usable and testable without it."""

from __future__ import annotations

import logging
import math
import time

from monitor.alerts.alertmanager import AlertmanagerClient
from monitor.alerts.verdicts import VerdictTracker
from monitor.errors import CollapseMonitorError
from monitor.evaluate.evaluator import Evaluator
from monitor.lazy import ProcessLocal
from monitor.pipeline.runtime import Runtime, get_runtime
from monitor.snapshot import Snapshot

log = logging.getLogger(__name__)
_evaluator: ProcessLocal[Evaluator] = ProcessLocal(lambda: Evaluator(get_runtime()))


def process_evaluator() -> Evaluator:
    """One evaluator per process: it caches heads and baseline metrics between runs."""
    return _evaluator.get()


def evaluate_models() -> dict[str, int]:
    """Evaluate every declared model, then send the verdicts to Alertmanager when a direct URL
    is configured.

    Each model on its own: whatever one model's evaluation raises (a refused store read, a
    corrupted state, a bug in a custom metric) is logged and counted
    (`evaluation_failures`), and the next model is evaluated all the same.
    """
    evaluator = process_evaluator()
    runtime = evaluator.runtime
    snapshots: list[Snapshot] = []
    failed = 0
    for model in runtime.registry.names:
        try:
            if not claim_evaluation(runtime, model):
                log.info("evaluation of %s skipped: already done in this interval", model)
                continue
            snapshots += evaluator.evaluate_model(model)
        except CollapseMonitorError as exc:
            failed += 1
            log.warning("evaluation of %s failed: %s", model, exc)
            count_failure(runtime, model)
        except Exception:
            failed += 1
            log.exception("evaluation of %s failed; the other models go on", model)
            count_failure(runtime, model)
    alerts = process_alerts()
    if alerts is not None:
        tracker, client = alerts
        client.update(tracker.firing(snapshots))
    return {"snapshots": len(snapshots), "failed": failed}


def count_failure(runtime: Runtime, model: str) -> None:
    """Count one failed evaluation of `model`, best effort: the store may be what failed."""
    try:
        runtime.store.add_counters(model, {"evaluation_failures": 1})
    except Exception as exc:
        log.warning("evaluation failure of %s not counted: %s", model, exc)


def claim_evaluation(runtime: Runtime, model: str, now: float | None = None) -> bool:
    """True for the first evaluation of `model` in the current evaluation-interval slot.

    Two beats running at once (a misconfigured deployment, or two during a rollout) each send
    `collapse.evaluate` every interval; the first task of a slot takes a per-model lock with
    SET NX EX and the others skip, so snapshots, history and alert updates are not doubled.
    The slot is wall-clock time divided by the interval, so beats out of phase still share
    it.
    """
    interval = runtime.settings.evaluation_interval
    now = time.time() if now is None else now
    slot = math.floor(now / interval)
    return runtime.store.claim(model, f"evaluate:{slot}", max(1, math.ceil(2 * interval)))


def _direct_alerts() -> tuple[VerdictTracker, AlertmanagerClient] | None:
    settings = get_runtime().settings
    if settings.alertmanager_url is None:
        return None
    client = AlertmanagerClient(
        settings.alertmanager_url,
        username=settings.alertmanager_username,
        password=settings.alertmanager_password,
        bearer_token=settings.alertmanager_token,
    )
    return VerdictTracker(settings.alert_thresholds()), client


_alerts: ProcessLocal[tuple[VerdictTracker, AlertmanagerClient] | None] = ProcessLocal(
    _direct_alerts
)


def process_alerts() -> tuple[VerdictTracker, AlertmanagerClient] | None:
    """The direct Alertmanager path of this process, when `alertmanager_url` is set."""
    return _alerts.get()
