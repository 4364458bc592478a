"""The monitor's side of an end-to-end test, in compressed time, on a real redis-server.

One model `m` (vocabulary 40, width 8, a random LM head), 10-second buckets and a one-minute
window `1m`; traffic with a `spread` knob (class means pulled together below 1, as a corrupted
layer would); the real ingestor, compaction and evaluator; and the exporter as a subprocess.
Shared by the alerting, dashboard and report tests, which each used to build their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from servers import ROOT, service_env

from monitor.config import Settings
from monitor.evaluate.evaluator import Evaluator
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model
from monitor.snapshot import Snapshot

VOCAB, DIM = 40, 8
WINDOW = "1m"
SERVICE = {
    "COLLAPSE_WINDOWS": json.dumps({WINDOW: 60}),
    "COLLAPSE_BUCKET_SECONDS": "10",
    "COLLAPSE_COARSE_BUCKET_SECONDS": "60",
    "COLLAPSE_FINE_RETENTION_SECONDS": "60",
}


def traffic(seed: int, n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """`spread` scales the distance between class means: 0.3 blurs the classes together."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).normal(size=(VOCAB, DIM)) * 3 * spread
    y = rng.integers(0, VOCAB, n)
    return (means[y] + rng.normal(size=(n, DIM))).astype(np.float32), y


def model_m(tmp: Path, *, second_moment: bool = False) -> dict[str, Any]:
    """The declared model `m`, with its LM head saved under `tmp`."""
    np.save(tmp / "head.npy", np.random.default_rng(1).normal(size=(VOCAB, DIM)))
    spec: dict[str, Any] = {"name": "m", "vocab_size": VOCAB, "dim": DIM}
    if second_moment:
        spec["second_moment"] = True
    spec["classifier_path"] = str(tmp / "head.npy")
    return spec


class MinuteStack:
    """Redis-backed runtime and evaluator over `models`, with a clock the test moves."""

    def __init__(self, redis_url: str, models: list[dict[str, Any]], **env: str) -> None:
        self.models = models
        self.env = service_env(redis_url, json.dumps(models), **SERVICE, **env)
        settings = Settings(
            redis_url=redis_url,
            models=models,  # type: ignore[arg-type]
            windows={WINDOW: 60},
            bucket_seconds=10,
            coarse_bucket_seconds=60,
            fine_retention_seconds=60,
        )
        self.runtime = Runtime(settings)
        self.evaluator = Evaluator(self.runtime)
        self.t0 = time.time()

    def feed(self, spread: float, at: float, tag: str, *, nc4_hits: int | None = None) -> None:
        """Five batches of 300 in the minute before `at`, one per 10-second bucket, compacted.

        `nc4_hits` of each 300 agree with the nearest class mean, as capture would count them.
        """
        for i in range(5):
            x, y = traffic(zlib.crc32(f"{tag}{i}".encode()), 300, spread)
            nc4 = None if nc4_hits is None else (nc4_hits, 300)
            payload = encode_batch("m", x, y, batch_id=f"{tag}{i}", ts=at - 5 - 10 * i, nc4=nc4)
            self.runtime.ingestor.ingest(payload)
        compact_model(self.runtime.store, "m")

    def evaluate(self, at: float) -> Snapshot:
        return self.evaluator.evaluate_model("m", now=at)[0]

    def start_exporter(self, port: int, log_path: Path) -> subprocess.Popen[bytes]:
        """`collapse-monitor exporter` on 127.0.0.1:`port`, reading this stack's Redis."""
        log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it; closed at its exit
        return subprocess.Popen(
            [sys.executable, "-m", "monitor.cli", "exporter", "--port", str(port)],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
