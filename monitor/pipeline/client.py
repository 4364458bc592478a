"""`MonitorClient`: how a Python producer (a gateway, the probe's sink) feeds the pipeline.

Exactly once across failures rests on the batch id: it is fixed before the first send, every
retry sends the same id, and the store's `seen` marker counts an id once. A send can fail after
the broker stored the message (the answer was lost, or the socket timed out after the write),
so a failed submission raises `SubmitError` carrying the ids: retry with
`batch_id=err.batch_id` and whatever did arrive is not counted twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
import torch
from kombu.exceptions import OperationalError

from monitor.config import Settings
from monitor.errors import CollapseMonitorError
from monitor.pipeline.payload import SCHEMA_VERSION, encode_batch
from monitor.pipeline.queues import TASK_EMBED, TASK_INGEST
from monitor.pipeline.runtime import Runtime, get_runtime

if TYPE_CHECKING:
    from monitor.capture.sinks import CaptureBatch


_FLOAT16_MAX = 6.0e4
SEND_TIMEOUT = 10.0  # seconds a broker socket may stay silent before a send fails
# What a send to an unreachable or silent broker raises (after Celery's own retries).
UNSENT = (OperationalError, redis.RedisError, OSError)


class SubmitError(CollapseMonitorError):
    """A submission's send failed after Celery's retries; part of it may have arrived.

    `batch_id` is the submission's id: pass it back as `batch_id=` to retry safely. `batch_ids`
    are the ids of its batches (one per `max_batch_samples` rows or `texts_per_task` texts).
    """

    def __init__(self, message: str, batch_id: str, batch_ids: list[str]) -> None:
        super().__init__(message)
        self.batch_id, self.batch_ids = batch_id, batch_ids


def _numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


class MonitorClient:
    """Sends batches to the Celery queues (or runs them in-process in embedded mode).

    Large submissions are split into batches of at most `max_batch_samples` rows, each with a
    batch id derived from the caller's, so a retried submission is still counted once. Without a
    caller's id one is generated before the first send and returned (or carried by
    `SubmitError`). A broker that stops answering fails a send after `send_timeout` seconds per
    try (Celery retries a few times with the same message) instead of hanging the producer.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        runtime: Runtime | None = None,
        *,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        # Embedded mode runs the work in this process on its runtime; otherwise Celery.
        self.runtime = (
            runtime if runtime is not None else (get_runtime() if self.settings.embedded else None)
        )
        self.app = None
        if not self.settings.embedded:  # Celery only where messages are sent
            from monitor.worker.app import create_app

            self.app = create_app(self.settings)
        if self.app is not None:
            self.app.conf.broker_transport_options = {
                **(self.app.conf.broker_transport_options or {}),
                "socket_timeout": send_timeout,
            }

    def _send_all(self, task: str, base: str, parts: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Send every part in order; on failure `SubmitError` names the ids to retry with."""
        ids = [part for part, _ in parts]
        for part, payload in parts:
            try:
                self._send(task, payload)
            except UNSENT as exc:
                raise SubmitError(
                    f"batch {part} not confirmed by the broker ({type(exc).__name__}); it may "
                    f"still arrive: retry with batch_id={base!r} (counted once)",
                    base,
                    ids,
                ) from exc
        return ids

    def _send(self, task: str, payload: dict[str, Any]) -> None:
        if self.app is not None:
            self.app.send_task(task, args=[payload])
            return
        assert self.runtime is not None
        if task == TASK_INGEST:
            self.runtime.ingestor.ingest(payload)
        else:
            from monitor.pipeline.embed import embed_payload

            embed_payload(self.runtime, payload)

    def submit_features(
        self,
        model: str,
        features: Any,
        labels: Any,
        *,
        batch_id: str | None = None,
        ts: float | None = None,
        nc4: tuple[int, int] | None = None,
        half_precision: bool = False,
    ) -> list[str]:
        """Queue (N, d) features and (N,) next-token labels; returns the batch ids sent.

        `half_precision=True` sends float16 (half the bytes, about 3 significant digits, enough
        for hidden states of a bf16 model); values outside float16's range are sent as float32.
        """
        x, y = _numpy(features), _numpy(labels)
        finite = bool(np.isfinite(x).all())
        if half_precision and finite and np.abs(x).max(initial=0.0) < _FLOAT16_MAX:
            x = x.astype(np.float16)
        base = batch_id or uuid.uuid4().hex
        step = self.settings.max_batch_samples
        parts: list[tuple[str, dict[str, Any]]] = []
        for i, start in enumerate(range(0, max(len(y), 1), step)):
            part = base if len(y) <= step else f"{base}.{i}"
            payload = encode_batch(
                model,
                x[start : start + step],
                y[start : start + step],
                batch_id=part,
                ts=ts,
                nc4=nc4 if i == 0 else None,
            )
            parts.append((part, payload))
        return self._send_all(TASK_INGEST, base, parts)

    def submit_texts(
        self,
        model: str,
        texts: Sequence[str] | None = None,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
        batch_id: str | None = None,
        ts: float | None = None,
        texts_per_task: int = 32,
    ) -> list[str]:
        """Queue texts (or token-id sequences) for the `embed` workers' forward pass."""
        if (texts is None) == (token_ids is None):
            raise ValueError("give exactly one of texts and token_ids")
        key, items = ("texts", list(texts)) if texts is not None else ("token_ids", token_ids)
        assert items is not None
        base = batch_id or uuid.uuid4().hex
        parts: list[tuple[str, dict[str, Any]]] = []
        for i, start in enumerate(range(0, len(items), texts_per_task)):
            part = base if len(items) <= texts_per_task else f"{base}.{i}"
            payload: dict[str, Any] = {"v": SCHEMA_VERSION, "model": model, "batch_id": part}
            if ts is not None:
                payload["ts"] = ts
            payload[key] = [
                list(s) if key == "token_ids" else s for s in items[start : start + texts_per_task]
            ]
            parts.append((part, payload))
        return self._send_all(TASK_EMBED, base, parts)


class PipelineSink:
    """The probe's sink into the pipeline: every captured batch becomes one ingest task."""

    def __init__(self, client: MonitorClient, model: str) -> None:
        self.client = client
        self.model = model

    def send(self, batch: CaptureBatch) -> None:
        nc4 = (batch.nc4_hits, batch.nc4_total) if batch.nc4_total else None
        self.client.submit_features(
            self.model, batch.features, batch.labels, batch_id=batch.batch_id, nc4=nc4
        )
