"""`Snapshot`: one evaluation of one model's window, the contract between the evaluator that
writes it and everything that reads it (exporter, direct alerts, reports, `compare --live`).
Torch-free and at the bottom of the package, so readers need nothing of the evaluator.

Stored as JSON (the schema below is a contract with the exporter and with users' tooling):

    {"v": 1, "model": "m", "window": "1h", "window_seconds": 3600, "timestamp": 1764140000.0,
     "status": "ok" | "insufficient_data", "reason": null | "...",
     "duration_seconds": 0.53, "sample_count": 1234, "class_count": 56,
     "metrics": {"nc1_cdnv": 0.12, "nc4_ncc_agreement": null, "drift_mmd": 0.001, ...},
     "baseline": {"name": "launch", "created": 1764000000.0, "sample_count": 99999,
                  "source": "window:24h"} | null,
     "top_drift": [{"class_id": 17, "token": " the", "count": 120, "base_count": 300,
                    "cosine_distance": 0.12, "contribution": 0.01}, ...]}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class TopDrift:
    class_id: int
    token: str
    count: int
    base_count: int
    cosine_distance: float
    contribution: float


@dataclass(frozen=True)
class Snapshot:
    model: str
    window: str
    window_seconds: int
    timestamp: float
    status: str  # "ok" or "insufficient_data"
    reason: str | None
    duration_seconds: float
    sample_count: int
    class_count: int
    metrics: dict[str, float | int | None] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    top_drift: list[TopDrift] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> str:
        doc = asdict(self)
        doc["v"] = SNAPSHOT_VERSION
        # JSON has no NaN or Infinity: a value that is not finite is reported as missing.
        doc["metrics"] = {
            k: (v if v is None or (isinstance(v, int | float) and math.isfinite(v)) else None)
            for k, v in self.metrics.items()
        }
        return json.dumps(doc, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        doc = snapshot_document(text)
        doc.pop("v", None)
        doc["top_drift"] = [TopDrift(**t) for t in doc.get("top_drift", [])]
        return cls(**doc)


def snapshot_document(text: str) -> dict[str, Any]:
    """The JSON object of a snapshot of this schema version; ValueError otherwise.

    The exporter reads documents field by field (a damaged field costs one series, not the
    scrape); `Snapshot.from_json` builds the typed object from the same checked document.
    """
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("a snapshot is a JSON object")
    if doc.get("v") != SNAPSHOT_VERSION:
        raise ValueError(f"unsupported snapshot version {doc.get('v')!r}")
    return doc
