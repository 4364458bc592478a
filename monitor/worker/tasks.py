"""Every Celery task. Names and payloads are a contract for producers (docs/architecture.md);
the work is in `monitor.pipeline` and `monitor.evaluate`, which know nothing of Celery.

Every task is idempotent: ingestion writes a partial under the batch id once, compaction is
atomic, so a redelivered or retried task changes nothing.

What happens to a batch task (`collapse.ingest_features`, `collapse.embed_texts`) that fails:
- bad input: counted as `rejected:<reason>` by the ingestor and acknowledged, never retried;
- an infrastructure failure (Redis out of memory, connection lost, timeout, a busy model, GPU
  out of memory): counted as `ingest_failures:<reason>` and retried with exponential backoff
  (`task_retry_backoff` doubling up to `task_retry_backoff_max`). The batch id keeps a retry
  exactly once. Past `task_max_retries` the batch is dead-lettered (`retries_exhausted`);
- anything else (a bug, or arguments that do not fit the task): dead-lettered (`task_error`,
  `malformed_task_message`) at once, since running it again would fail the same way.
Nothing is acknowledged without one of these records. When even the record cannot be written
(the store refuses the count, the broker refuses the retry), the message stays with the broker
and comes back: retried after the longest backoff, or redelivered after the visibility timeout.

Maintenance loops over models; one model's failure is logged and counted
(`compaction_failures`) and never stops the others.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
import uuid
from typing import Any, NoReturn

import msgpack
import torch
from celery import Task, shared_task
from celery.exceptions import Ignore, Reject, Retry
from celery.signals import worker_process_init

from monitor.errors import InvalidInput
from monitor.evaluate.run import evaluate_models
from monitor.lazy import ProcessLocal
from monitor.pipeline.deadletter import (
    FAILURE_REASONS,
    DeadLetter,
    DeadLetterSink,
    failure_reason,
)
from monitor.pipeline.embed import embed_payload
from monitor.pipeline.ingest import UNKNOWN_MODEL
from monitor.pipeline.queues import TASK_COMPACT, TASK_EMBED, TASK_EVALUATE, TASK_INGEST
from monitor.pipeline.runtime import Runtime, get_runtime
from monitor.pipeline.windows import compact_model, maintain_model

log = logging.getLogger(__name__)
_compact_lock = threading.Lock()
_sink: ProcessLocal[DeadLetterSink] = ProcessLocal(lambda: DeadLetterSink(get_runtime().settings))


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _one_thread_per_process(**_: object) -> None:
    """Each pool process computes with one thread: `--concurrency` processes already fill the
    cores, and torch's thread pools stall badly when oversubscribed (docs/benchmarks.md)."""
    torch.set_num_threads(1)


def dead_letter_sink() -> DeadLetterSink:
    """This process's dead-letter sink (its broker client is made on first use)."""
    return _sink.get()


def retry_delay(runtime: Runtime, retries: int) -> float:
    """Seconds before retry number `retries` + 1: doubling, capped, with jitter so a fleet of
    workers that failed together does not come back together. At most half the visibility
    timeout, or the broker would redeliver the waiting retry as a lost task."""
    s = runtime.settings
    cap = min(s.task_retry_backoff_max, s.task_visibility_timeout / 2)
    delay = min(cap, s.task_retry_backoff * 2.0 ** min(retries, 32))
    return float(delay * random.uniform(0.75, 1.0))


def _owner(runtime: Runtime, args: tuple[Any, ...]) -> tuple[str, str | None, str | None]:
    """(counter owner, model, batch id) of a batch task's arguments, as far as they say."""
    payload = args[0] if args and isinstance(args[0], dict) else {}
    model, batch_id = payload.get("model"), payload.get("batch_id")
    model = model if isinstance(model, str) else None
    batch_id = batch_id if isinstance(batch_id, str) else None
    owner = model if model is not None and model in runtime.registry.names else UNKNOWN_MODEL
    return owner, model, batch_id


def _uncounted(value: object) -> dict[str, int]:
    """The failures a retried message carries because the store could not count them then."""
    if not isinstance(value, dict):
        return {}
    return {
        k: min(v, 1000)
        for k, v in value.items()
        if k in FAILURE_REASONS and isinstance(v, int) and not isinstance(v, bool) and v > 0
    }


class BatchTask(Task):  # type: ignore[misc]
    """A task carrying one batch: every outcome is a record (module docstring), none a drop."""

    max_retries = None  # the bound is task_max_retries, applied in `_infrastructure`

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        runtime = get_runtime()
        uncounted = _uncounted(kwargs.get("uncounted"))
        try:
            inspect.signature(self.run).bind(*args, **kwargs)
        except TypeError as exc:
            return self._give_up(runtime, "malformed_task_message", exc, args, kwargs, uncounted)
        kwargs.pop("uncounted", None)
        try:
            result = super().__call__(*args, **kwargs)
        except (Retry, Reject, Ignore):
            raise
        except InvalidInput as exc:  # counted by the ingestor already
            result = {"rejected": exc.reason}
        except Exception as exc:
            reason = failure_reason(exc)
            if reason is None:
                return self._give_up(runtime, "task_error", exc, args, kwargs, uncounted)
            return self._infrastructure(runtime, reason, exc, args, kwargs, uncounted)
        if uncounted:
            _count(runtime, _owner(runtime, args)[0], uncounted)
        return result

    def _infrastructure(
        self,
        runtime: Runtime,
        reason: str,
        exc: Exception,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        uncounted: dict[str, int],
    ) -> dict[str, str]:
        """Count the failure, retry with backoff; past the bound, dead-letter."""
        owner, model, batch_id = _owner(runtime, args)
        uncounted = {**uncounted, reason: uncounted.get(reason, 0) + 1}
        if _count(runtime, owner, uncounted):
            uncounted = {}
        retries = int(self.request.retries or 0)
        if retries < runtime.settings.task_max_retries:
            delay = retry_delay(runtime, retries)
            log.warning(
                "batch %s of %s failed on infrastructure (%s: %s); retry %d in %.1f s",
                batch_id, model, reason, exc, retries + 1, delay,
            )  # fmt: skip
            self._retry(exc, args, kwargs, uncounted, delay)
        return self._give_up(runtime, "retries_exhausted", exc, args, kwargs, uncounted)

    def _give_up(
        self,
        runtime: Runtime,
        reason: str,
        exc: BaseException,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        uncounted: dict[str, int],
    ) -> dict[str, str]:
        """Dead-letter the message; when that cannot be recorded (entry and count), keep it
        and try again after a backoff instead of letting Celery acknowledge it."""
        try:
            return self._dead_letter(runtime, reason, exc, args, kwargs, uncounted)
        except Exception as record_exc:
            retries = int(self.request.retries or 0)
            log.error(
                "task %s (%s) cannot be dead-lettered yet (%s: %s); it stays queued",
                self.request.id, reason, type(record_exc).__name__, record_exc,
            )  # fmt: skip
            self._retry(record_exc, args, kwargs, uncounted, retry_delay(runtime, retries))

    def _retry(
        self,
        exc: BaseException,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        uncounted: dict[str, int],
        delay: float,
    ) -> NoReturn:
        """Celery retry (a new message with a countdown; this one is acknowledged). When the
        broker refuses the new message, Celery would reject this one for good; it is
        requeued instead, or left unacknowledged if the broker refuses that too."""
        options = {k: v for k, v in kwargs.items() if k != "uncounted"}
        if uncounted:
            options["uncounted"] = uncounted
        try:
            raise self.retry(args=args, kwargs=options, exc=exc, countdown=delay)
        except Reject as refused:
            raise Reject(refused.reason, requeue=True) from exc

    def _dead_letter(
        self,
        runtime: Runtime,
        reason: str,
        exc: BaseException,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        uncounted: dict[str, int],
    ) -> dict[str, str]:
        owner, model, batch_id = _owner(runtime, args)
        request = self.request
        letter = DeadLetter(
            id=str(request.id or "") or uuid.uuid4().hex,
            reason=reason,
            message=msgpack.packb({"args": list(args), "kwargs": kwargs}, default=repr),
            queue=(request.delivery_info or {}).get("routing_key"),
            task=self.name,
            model=model,
            batch_id=batch_id,
            error=f"{type(exc).__name__}: {exc}",
            retries=int(request.retries or 0),
        )
        if reason == "task_error":
            log.error("task %s failed: %s", self.name, letter.error, exc_info=exc)
        dead_letter_sink().record(letter, runtime.store, owner, undo_if_uncounted=True)
        if uncounted:
            _count(runtime, owner, uncounted)
        return {"dead_letter": reason}


def _count(runtime: Runtime, owner: str, failures: dict[str, int]) -> bool:
    """Count infrastructure failures; False (and a log line) when the store refuses, since a
    failing store is often why they happened."""
    try:
        runtime.store.add_counters(owner, {f"ingest_failures:{r}": n for r, n in failures.items()})
    except Exception as exc:
        log.warning("ingest failures %s of %s not counted yet: %s", failures, owner, exc)
        return False
    return True


@shared_task(name=TASK_INGEST, base=BatchTask)  # type: ignore[untyped-decorator]
def ingest_features(payload: dict[str, Any], uncounted: object = None) -> dict[str, Any]:
    """A feature batch (payload schema v1) -> one immutable partial. `uncounted` is internal:
    failures a retry carries because the store could not count them when they happened."""
    result = get_runtime().ingestor.ingest(payload)
    return {"stored": result.stored, "samples": result.samples}


@shared_task(name=TASK_EMBED, base=BatchTask)  # type: ignore[untyped-decorator]
def embed_texts(payload: dict[str, Any], uncounted: object = None) -> dict[str, Any]:
    """Texts or token ids -> teacher-forced forward on this worker's model -> one partial."""
    result = embed_payload(get_runtime(), payload)
    return {"stored": result.stored, "samples": result.samples}


@shared_task(name=TASK_COMPACT)  # type: ignore[untyped-decorator]
def compact() -> dict[str, int]:
    """Merge pending partials into buckets and windows, slide the windows, drop old buckets.

    Each model on its own: a model whose compaction or maintenance raises is logged and
    counted (`compaction_failures`), and the next model is compacted all the same.
    """
    runtime = get_runtime()
    merged = failed = 0
    with _compact_lock:
        for model in runtime.store.models():
            try:
                merged += compact_model(runtime.store, model).partials
                maintain_model(runtime.store, model, time.time())
            except Exception:
                failed += 1
                log.exception("compaction of %s failed; the other models go on", model)
                _count_failure(runtime, model, "compaction_failures")
    return {"partials": merged, "failed": failed}


def _count_failure(runtime: Runtime, model: str, counter: str) -> None:
    """Count a maintenance failure of `model`, best effort (the store may be what failed)."""
    try:
        runtime.store.add_counters(model, {counter: 1})
    except Exception as exc:
        log.warning("%s of %s not counted: %s", counter, model, exc)


@shared_task(name=TASK_EVALUATE)  # type: ignore[untyped-decorator]
def evaluate() -> dict[str, int]:
    """Evaluate every declared model (`monitor.evaluate.run.evaluate_models`)."""
    return evaluate_models()
