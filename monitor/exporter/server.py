"""The exporter's HTTP side: `/metrics`, `/healthz`, `/readyz`, served by uvicorn.

Why it looks like this:
- The collector lives in a private `CollectorRegistry`, not prometheus_client's global one, so
  the page holds exactly the collapse families (no process or GC collectors from whatever else
  the process imported), and several apps in one test process do not collide.
- `/metrics` always answers 200 while the process runs: a Redis outage shows up as
  `collapse_store_up 0`, which an alert can match, instead of a failed scrape that only says
  `up == 0` and hides why.
- `/healthz` says the process is alive (liveness must not restart the pod because Redis is
  down); `/readyz` says whether the store answers a PING within a second.
- The page is served in the classic text format 0.0.4, which every Prometheus understands.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from monitor import __version__
from monitor.config import Settings
from monitor.errors import InvalidInput
from monitor.exporter.collector import STORE_ERRORS, CollapseCollector
from monitor.pipeline.queues import QUEUES
from monitor.pipeline.runtime import broker_client, bucket_policy, redis_client
from monitor.store.base import Store
from monitor.store.redis_store import RedisStore

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464


def exporter_store(settings: Settings) -> RedisStore:
    """A RedisStore on a client of its own: 1 s timeouts, no retries, no health-check pings.

    The service's shared client retries with backoff for up to tens of seconds, which is right
    for a worker and wrong for a scrape: Prometheus would time out before the answer comes.
    """
    if settings.redis_url is None:
        raise InvalidInput(
            "no_redis",
            "the exporter reads snapshots from Redis: set COLLAPSE_REDIS_URL (embedded mode "
            "has no shared store to export)",
        )
    client = redis_client(settings, io_timeout=1.0)
    return RedisStore(client, bucket_policy(settings), settings.redis_key_prefix)


def queue_depth_reader(settings: Settings) -> Callable[[], dict[str, int]] | None:
    """LLEN of each Celery queue on the broker (1 s timeouts); None in embedded mode."""
    broker = broker_client(settings, io_timeout=1.0)
    if broker is None:
        return None

    def read() -> dict[str, int]:
        pipe = broker.pipeline(transaction=False)
        for queue in QUEUES:
            pipe.llen(queue)
        depths = pipe.execute(raise_on_error=False)  # a WRONGTYPE key hides one queue only
        return {q: int(n) for q, n in zip(QUEUES, depths, strict=True) if isinstance(n, int)}

    return read


def create_exporter_app(settings: Settings, store: Store | None = None) -> FastAPI:
    """The exporter's ASGI app; `store` defaults to `exporter_store(settings)`; queue depths
    come from the broker (`broker_url`, else the store's Redis) when one is configured."""
    store = store if store is not None else exporter_store(settings)
    registry = CollectorRegistry(auto_describe=False)  # never collects at registration
    collector = CollapseCollector.for_settings(
        store, settings, queue_depths=queue_depth_reader(settings)
    )
    registry.register(collector)
    app = FastAPI(
        title="collapse-monitor exporter",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.registry = registry
    app.state.store = store

    # Plain `def` handlers run in the thread pool: a slow Redis blocks a worker thread, never
    # the event loop, and the collector's own budget bounds how long.
    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    def readyz() -> dict[str, str] | JSONResponse:
        try:
            if store.ping():
                return {"status": "ready"}
            reason = "store did not answer PING"
        except STORE_ERRORS as exc:
            reason = f"store unreachable ({type(exc).__name__})"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    return app


def serve(settings: Settings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Run the exporter until interrupted (SIGINT/SIGTERM stop it gracefully)."""
    app = create_exporter_app(settings)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    log.info("exporter on http://%s:%d/metrics", host, port)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,  # one line per scrape every few seconds says nothing
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=30,  # Prometheus reuses its connection between scrapes
        timeout_graceful_shutdown=5,
    )
