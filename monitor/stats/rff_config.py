"""`RFFConfig`: the random-feature map's seed, size and bandwidths, torch-free.

The map itself (`monitor.stats.rff`) needs torch; its configuration travels in every stored
globals field, which compaction and `status` decode without torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

# Bandwidths whose float32 weights N(0,1)/sigma (sigma from b/2 to 2b) stay normal numbers
# (float32 spans 1.2e-38..3.4e38) with ample margin; the median heuristic is clamped into it.
BANDWIDTH_RANGE = (1e-30, 1e30)


def valid_bandwidth(value: float) -> bool:
    """A finite bandwidth the float32 map can use (within `BANDWIDTH_RANGE`)."""
    low, high = BANDWIDTH_RANGE
    return math.isfinite(value) and low <= value <= high


@dataclass(frozen=True)
class RFFConfig:
    dim: int
    features: int = 256
    bandwidths: tuple[float, ...] = (1.0,)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.features < 2 or self.features % 2:
            raise ValueError("RFF needs dim >= 1 and an even number of features >= 2")
        if not self.bandwidths or not all(valid_bandwidth(b) for b in self.bandwidths):
            raise ValueError(
                f"RFF bandwidths must be finite and within {BANDWIDTH_RANGE}, got {self.bandwidths}"
            )
        if self.features < len(self.bandwidths):
            raise ValueError("need at least one feature per bandwidth")

    def to_json(self) -> str:
        return json.dumps(
            {
                "dim": self.dim,
                "features": self.features,
                "bandwidths": list(self.bandwidths),
                "seed": self.seed,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> RFFConfig:
        raw = json.loads(text)
        return cls(
            dim=int(raw["dim"]),
            features=int(raw["features"]),
            bandwidths=tuple(float(b) for b in raw["bandwidths"]),
            seed=int(raw["seed"]),
        )
