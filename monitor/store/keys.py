"""The Redis key schema, in one place (documented in docs/architecture.md).

Every per-model key carries the hash tag `{model}`, so a model's multi-key operations
(compaction's WATCH/MULTI, the partial-write script) stay on one Redis Cluster slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from monitor.errors import InvalidInput

# Model names become part of keys and Prometheus labels: keep them short and inert.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BATCH_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
BASELINE_NAME = MODEL_NAME
LEVELS = ("fine", "coarse")
# Counter owner for rejections that name no declared model ('_' keeps it out of MODEL_NAME).
UNKNOWN_MODEL = "_unknown"


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise InvalidInput(
            "invalid_model_name",
            "model names are 1-64 characters of letters, digits, '.', '_' or '-'",
        )
    return name


def check_batch_id(batch_id: str) -> str:
    if not isinstance(batch_id, str) or not BATCH_ID.match(batch_id):
        raise InvalidInput(
            "invalid_batch_id",
            "batch ids are 1-128 characters of letters, digits, '.', '_', ':', '-'",
        )
    return batch_id


@dataclass(frozen=True)
class ModelKeys:
    """Key names of one model under `prefix`."""

    prefix: str
    model: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.model}}}"

    def seen(self, batch_id: str) -> str:
        return f"{self.base}:seen:{batch_id}"

    def partial(self, batch_id: str) -> str:
        """A batch's statistics: a hash of fields (store format 2)."""
        return f"{self.base}:rows:partial:{batch_id}"

    def state(self, state: str) -> str:
        """A bucket, window, baseline or reference: a hash of fields (store format 2)."""
        return f"{self.base}:rows:{state}"

    def staging(self, state: str, token: str) -> str:
        """Where a replacement of `state` is written before it is renamed into place."""
        return f"{self.base}:staging:{state}:{token}"

    @property
    def pending(self) -> str:
        return f"{self.base}:pending"

    def bucket_index(self, level: str) -> str:
        return f"{self.base}:index:{level}"

    @property
    def windows(self) -> str:
        """Window label -> JSON of its `WindowState`."""
        return f"{self.base}:windows"

    @property
    def state_lock(self) -> str:
        return f"{self.base}:lock:state"

    def calibration(self, name: str) -> str:
        return f"{self.base}:calibration:{name}"

    @property
    def baselines(self) -> str:
        return f"{self.base}:baselines"

    def snapshot(self, window: str) -> str:
        return f"{self.base}:snapshot:{window}"

    def history(self, window: str) -> str:
        return f"{self.base}:history:{window}"

    @property
    def counters(self) -> str:
        return f"{self.base}:counters"

    @property
    def frequencies(self) -> str:
        """Class id -> decayed count of a model with max_tracked_classes (a zset)."""
        return f"{self.base}:freq"

    @property
    def meta(self) -> str:
        return f"{self.base}:meta"

    def claim(self, name: str) -> str:
        """Taken (SET NX, expiring) by the first caller of `name`, e.g. an evaluation slot."""
        return f"{self.base}:lock:{name}"


def legacy_indexes(keys: ModelKeys) -> list[str]:
    """Bucket indexes of store format 1 (one blob per bucket), to detect old data."""
    return [f"{keys.base}:buckets:{level}" for level in LEVELS]


def models_key(prefix: str) -> str:
    """The set of model names that have stored anything (not hash-tagged: global)."""
    return f"{prefix}:models"
