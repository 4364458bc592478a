"""`serve()`: the API under uvicorn, bound to loopback unless told otherwise.

Loopback by default because the embedded mode has no token: exposing it on a network
interface would let anyone write statistics. A non-loopback bind without a token is refused.

uvicorn waits for a request's head forever: a connection that sends nothing, or a few header
bytes now and then, was held open indefinitely (the app never runs, so its body deadline
cannot act). `HeadDeadline` closes a connection whose request line and headers are not
complete within `api_body_timeout` of the connection (or of the previous response).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from monitor.api.app import ApiConfigError, create_api
from monitor.config import Settings
from monitor.pipeline.runtime import Runtime, set_runtime

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (`head_timeout` seconds)."""

    head_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _head_late(self) -> None:
        # IDLE: h11 has not parsed a whole request head since the timer was armed.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closed a connection whose request head did not arrive in time")
            self.transport.close()


def head_deadline(seconds: float) -> type[HeadDeadline]:
    return type("HeadDeadlineProtocol", (HeadDeadline,), {"head_timeout": seconds})


def serve(settings: Settings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Run the ingest API until interrupted (SIGINT/SIGTERM stop it gracefully)."""
    if settings.api_token is None and not is_loopback(host):
        raise ApiConfigError(
            f"refusing to serve an API without a token on {host}: set COLLAPSE_API_TOKEN "
            "or bind 127.0.0.1"
        )
    if not logging.getLogger().handlers:  # our lines (readiness, refusals) next to uvicorn's
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    runtime = Runtime(settings)
    app = create_api(settings, runtime)
    set_runtime(runtime)  # embedded mode: the in-process pipeline shares this store
    mode = "embedded (in-memory store)" if settings.embedded else "queue (Redis)"
    log.info("ingest API on http://%s:%d, %s mode", host, port, mode)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        server_header=False,
        proxy_headers=False,  # client addresses in logs are the socket's, not a header's claim
        http=head_deadline(settings.api_body_timeout),
        timeout_graceful_shutdown=30,
    )
