"""`serve()`: the API under uvicorn, bound to loopback unless told otherwise.

Loopback by default because the embedded mode has no token: exposing it on a network
interface would let anyone write statistics. A non-loopback bind without a token is refused.
"""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

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
        timeout_graceful_shutdown=30,
    )
