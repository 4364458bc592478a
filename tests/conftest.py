"""Shared fixtures. Integration fixtures (redis-server, celery workers) join as those tests land."""

from __future__ import annotations

import os

# Tests never reach a model hub; the capture tests build tiny models from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
