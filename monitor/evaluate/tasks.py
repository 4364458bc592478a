"""The beat-driven evaluation task (queue `maintenance`)."""

from __future__ import annotations

import logging
import threading

from monitor.errors import CollapseMonitorError
from monitor.evaluate.evaluator import Evaluator
from monitor.pipeline.celery_app import TASK_EVALUATE, app
from monitor.pipeline.runtime import get_runtime

log = logging.getLogger(__name__)
_lock = threading.Lock()
_evaluator: Evaluator | None = None


def process_evaluator() -> Evaluator:
    """One evaluator per process: it caches heads and baseline metrics between runs."""
    global _evaluator
    with _lock:
        if _evaluator is None:
            _evaluator = Evaluator(get_runtime())
        return _evaluator


@app.task(name=TASK_EVALUATE)  # type: ignore[untyped-decorator]
def evaluate() -> dict[str, int]:
    """Evaluate every declared model; one model's failure does not stop the others."""
    evaluator = process_evaluator()
    done = 0
    for model in evaluator.runtime.registry.names:
        try:
            evaluator.evaluate_model(model)
            done += 1
        except CollapseMonitorError as exc:
            log.warning("evaluation of %s failed: %s", model, exc)
    return {"models": done}
