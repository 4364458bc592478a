"""`/metrics` of the demo: the exporter's own collector over the embedded store, on loopback.

The service's exporter reads Redis; the demo has no Redis, so the same `CollapseCollector` is
pointed at the in-process `MemoryStore` and served by prometheus_client's small threaded WSGI
server (no event loop to share with the demo's own threads).
"""

from __future__ import annotations

import socket
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_wsgi_server

from monitor.config import Settings
from monitor.errors import InvalidInput
from monitor.exporter.collector import CollapseCollector
from monitor.store.base import Store

HOST = "127.0.0.1"


def _unavailable(port: int, exc: OSError) -> InvalidInput:
    return InvalidInput(
        "port_unavailable",
        f"cannot serve /metrics on {HOST}:{port} ({exc.strerror or exc}); "
        "choose another --port, or --port 0 for a free one",
    )


def check_port(port: int) -> None:
    """Refuse a port in use before minutes of model loading, not after (the real bind still
    decides: something may take the port in between)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise _unavailable(port, exc) from None


class MetricsServer:
    """Serves `/metrics` on 127.0.0.1:`port` (0 = a free port) until `close()`."""

    def __init__(self, store: Store, settings: Settings, port: int) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(CollapseCollector.for_settings(store, settings))
        try:
            self._server, self._thread = start_wsgi_server(port, addr=HOST, registry=registry)
        except OSError as exc:
            raise _unavailable(port, exc) from None
        self.port = int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/metrics"

    def close(self, timeout: float = 5.0) -> None:
        server: WSGIServer = self._server
        server.shutdown()
        server.server_close()
        thread: threading.Thread = self._thread
        thread.join(timeout)
