"""Direct Alertmanager v2 client: the evaluator's own verdicts, for deployments without a rule
engine. Labels are the rendered rules' labels, so when both paths run, Alertmanager sees one
alert (it deduplicates by label set) and notifies once.

Firing alerts are re-sent on every evaluation (Alertmanager expires an alert that is not
refreshed); an alert that stops firing is sent once more with `endsAt` = now, which resolves
it. Posts that fail (Alertmanager down) are queued and retried with exponential backoff on the
following calls; the queue is bounded, and the newest state of an alert wins.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import SecretStr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.labels.items()))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


class AlertmanagerClient:
    """Posts firing and resolved alerts to `url`/api/v2/alerts, with retries and deduplication."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: SecretStr | None = None,
        bearer_token: SecretStr | None = None,
        timeout: float = 5.0,
        max_backoff: float = 300.0,
        max_queue: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/") + "/api/v2/alerts"
        self._auth = self._auth_header(username, password, bearer_token)
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.max_queue = max_queue
        self._clock = clock
        self._lock = threading.Lock()
        self._firing: dict[tuple[tuple[str, str], ...], tuple[Alert, float]] = {}
        self._queue: dict[tuple[tuple[str, str], ...], dict[str, object]] = {}
        self._failures = 0
        self._next_try = 0.0
        self.sent = 0

    @staticmethod
    def _auth_header(
        username: str | None, password: SecretStr | None, token: SecretStr | None
    ) -> str | None:
        if token is not None:
            return f"Bearer {token.get_secret_value()}"
        if username is not None:
            secret = password.get_secret_value() if password else ""
            raw = base64.b64encode(f"{username}:{secret}".encode()).decode()
            return f"Basic {raw}"
        return None

    def update(self, firing: list[Alert]) -> bool:
        """Report the alerts firing now: new and still-firing ones are (re)sent, alerts that
        fired before and are absent now are resolved. Returns True when everything queued was
        delivered."""
        now = self._clock()
        with self._lock:
            current = {
                a.fingerprint: (a, self._firing.get(a.fingerprint, (a, now))[1]) for a in firing
            }
            for key, (alert, started) in current.items():
                self._queue[key] = self._document(alert, started, None)
            for key, (alert, started) in self._firing.items():
                if key not in current:
                    self._queue[key] = self._document(alert, started, now)
            self._firing = current
            while len(self._queue) > self.max_queue:  # drop the oldest state, never block
                self._queue.pop(next(iter(self._queue)))
        return self.flush()

    def flush(self) -> bool:
        """Send what is queued unless a backoff is in force; True when the queue is empty."""
        with self._lock:
            if not self._queue:
                return True
            if self._clock() < self._next_try:
                return False
            batch = list(self._queue.items())
        try:
            self._post([doc for _, doc in batch])
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            with self._lock:
                self._failures += 1
                delay = min(self.max_backoff, 2.0 ** min(self._failures, 16))
                self._next_try = self._clock() + delay
            log.warning("alertmanager unreachable (%s); retrying in %.0f s", _reason(exc), delay)
            return False
        with self._lock:
            for key, doc in batch:
                if self._queue.get(key) is doc:
                    del self._queue[key]
            self._failures = 0
            self._next_try = 0.0
            self.sent += len(batch)
            return not self._queue

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    @staticmethod
    def _document(alert: Alert, started: float, ended: float | None) -> dict[str, object]:
        doc: dict[str, object] = {
            "labels": dict(alert.labels),
            "annotations": dict(alert.annotations),
            "startsAt": _iso(started),
        }
        if ended is not None:
            doc["endsAt"] = _iso(ended)
        return doc

    def _post(self, documents: list[dict[str, object]]) -> None:
        request = urllib.request.Request(
            self.url,
            data=json.dumps(documents).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        if self._auth is not None:
            request.add_header("Authorization", self._auth)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            if response.status >= 300:
                raise OSError(f"alertmanager answered {response.status}")


def _reason(exc: BaseException) -> str:
    # Never log the request (it carries the Authorization header); the error kind is enough.
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return type(exc).__name__
