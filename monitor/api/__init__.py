"""The HTTP ingest API (`collapse-monitor api`): samples in, 202 out, bad input refused early.

`create_api(settings)` builds the FastAPI app; `serve(settings, host, port)` runs it under
uvicorn. The API validates and enqueues; the Celery workers (or, in embedded mode, this same
process) turn batches into statistics.
"""

from __future__ import annotations

from monitor.api.app import ApiConfigError, create_api
from monitor.api.server import serve

__all__ = ["ApiConfigError", "create_api", "serve"]
