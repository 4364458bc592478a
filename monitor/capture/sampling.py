"""Which token positions the probe keeps: per-request rate, per-token rate, tokens per second.

The decisions are made on the CPU from shapes alone (never from tensor values on the
accelerator), so sampling never forces a device synchronisation on the request path. A seeded
`torch.Generator` makes every decision reproducible in tests.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from monitor.errors import InvalidInput

Clock = Callable[[], float]


@dataclass(frozen=True)
class SamplingPolicy:
    """How much live traffic the probe keeps.

    - `token_rate`: probability that an eligible position of a monitored request is kept.
    - `request_rate`: probability that a request (one row of a batch; a whole `generate()` call
      for that row) is monitored at all. Decided once per request, so a kept request contributes
      its prompt and its completion together.
    - `tokens_per_second`: an upper bound on kept positions per second (token bucket with
      `burst_tokens` capacity, default one second's worth). `None` = no budget.
    - `seed`: seeds the sampler's generator; `None` draws a fresh seed.
    """

    token_rate: float = 0.1
    request_rate: float = 1.0
    tokens_per_second: float | None = None
    burst_tokens: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("token_rate", "request_rate"):
            value = getattr(self, name)
            if not (0.0 <= value <= 1.0) or math.isnan(value):
                raise InvalidInput("invalid_policy", f"{name} must be in [0, 1], got {value}")
        if self.tokens_per_second is not None and not self.tokens_per_second > 0:
            raise InvalidInput(
                "invalid_policy", f"tokens_per_second must be > 0, got {self.tokens_per_second}"
            )
        if self.burst_tokens is not None and self.burst_tokens < 1:
            raise InvalidInput(
                "invalid_policy", f"burst_tokens must be >= 1, got {self.burst_tokens}"
            )


class TokenBucket:
    """Classic token bucket: refills at `rate` per second up to `capacity`; `take` never waits."""

    def __init__(self, rate: float, capacity: float, clock: Clock = time.monotonic) -> None:
        self.rate = float(rate)
        self.capacity = float(capacity)
        self._clock = clock
        self._tokens = float(capacity)
        self._last = clock()

    def take(self, wanted: int) -> int:
        """Grant up to `wanted` tokens now (possibly 0), never more than are in the bucket."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        granted = min(int(wanted), int(self._tokens))
        self._tokens -= granted
        return max(granted, 0)


class Sampler:
    """Stateful, thread-safe application of a `SamplingPolicy` (one per probe)."""

    def __init__(self, policy: SamplingPolicy, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self._gen = torch.Generator(device="cpu")
        if policy.seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(int(policy.seed))
        self._bucket: TokenBucket | None = None
        if policy.tokens_per_second is not None:
            burst = policy.burst_tokens or max(1, math.ceil(policy.tokens_per_second))
            self._bucket = TokenBucket(policy.tokens_per_second, burst, clock)
        self._lock = threading.Lock()

    def sample_requests(self, n: int) -> torch.Tensor:
        """(n,) bool on the CPU: which of `n` new requests are monitored."""
        rate = self.policy.request_rate
        if rate >= 1.0:
            return torch.ones(n, dtype=torch.bool)
        with self._lock:
            return torch.rand(n, generator=self._gen) < rate

    def sample_positions(self, eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept positions among `eligible` (B, T) bool CPU, as (rows, cols) int64 CPU tensors.

        Each eligible position is kept with probability `token_rate`; the budget then keeps a
        uniformly random subset of those if it cannot pay for all of them.
        """
        rate = self.policy.token_rate
        with self._lock:
            if rate >= 1.0:
                keep = eligible
            elif rate <= 0.0:
                keep = torch.zeros_like(eligible)
            else:
                keep = eligible & (torch.rand(eligible.shape, generator=self._gen) < rate)
            rows, cols = keep.nonzero(as_tuple=True)
            if self._bucket is not None and rows.numel():
                granted = self._bucket.take(int(rows.numel()))
                if granted < rows.numel():
                    pick = torch.randperm(int(rows.numel()), generator=self._gen)[:granted]
                    pick = pick.sort().values
                    rows, cols = rows[pick], cols[pick]
        return rows, cols
