"""The simulated world of `alert_quality.py`: a fixed model, its traffic, and injected failures.

A *model* is a fixed checkpoint in miniature: K classes with Zipf frequencies, class means
with a decaying spectrum, a within-class spread per class, a noisy self-dual LM head, and a
final normalisation layer `h = gains * x + bias` (the bias makes the states anisotropic, as
real hidden states are). Its states never change; only the traffic does:

- volume follows the time of day: `low_rate` samples/s at midnight, `swing` times that at noon;
- the class mix shifts: labels are drawn from a mixture of four "topics", each a reweighting
  of the model's Zipf frequencies, whose weights drift on cycles of 17 h to 3.5 days.

Every batch is generated from its own seed (seed, batch index), so a trial can replay the
healthy run's traffic exactly up to its injection.

Failures, each at a strength in (0, 1]:
- `collapse`: the demo's fault (`monitor.demo.inject.NormCollapse`, keep = 4: the final norm's
  gains zeroed but for 4 directions) on a share `strength` of the traffic, as on the replicas
  that loaded a broken checkpoint (1 = the demo's collapse on every request);
- `norm`: the same fault at partial strength on all traffic: the final norm's gains of all but
  4 directions scaled by `1 - strength`;
- `noise`: Gaussian noise of `2 * strength` times the mean within-class standard deviation per
  coordinate added to every state, as a bad quantisation or a broken kernel would;
- `swap`: a share `strength` of the traffic is served by another checkpoint (same geometry,
  other seed: other class means and head), as a wrong revision rolled out to some replicas.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from monitor.capture.sinks import NC4Reference
from monitor.demo.inject import NormCollapse

DAY = 86400
T0 = 1_700_006_400.0  # a midnight, UTC: buckets and days line up
KEEP = 4  # the demo's NormCollapse keeps 4 directions


def _spectrum(dim: int, decay: float) -> np.ndarray:
    """Per-coordinate variances `i^-decay`, scaled to sum to `dim`."""
    raw = np.arange(1, dim + 1, dtype=np.float64) ** -decay
    return raw * dim / raw.sum()


class _Holder(torch.nn.Module):
    """Just enough of a causal LM for `NormCollapse` to find its final norm (`model.norm`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.norm = torch.nn.LayerNorm(dim)


@functools.cache
def demo_collapse_gains(dim: int, seed: int = 0) -> np.ndarray:
    """The gains `NormCollapse` (the demo's fault) leaves: 1 on `KEEP` directions, 0 elsewhere."""
    holder = _Holder(dim)
    fault = NormCollapse(holder, keep=KEEP, seed=seed)
    fault.apply()
    gains = holder.model.norm.weight.detach().double().numpy().copy()
    fault.restore()
    gains.flags.writeable = False  # cached: shared by every call
    return gains


@dataclass(frozen=True)
class Failure:
    kind: str  # "collapse", "noise" or "swap"
    strength: float

    def label(self) -> str:
        return f"{self.kind} {self.strength:.0%}"


class SyntheticModel:
    """One fixed checkpoint: means, spreads, head and final norm of K classes in d dimensions."""

    def __init__(self, classes: int, dim: int, seed: int, *, anisotropy: float = 0.3) -> None:
        rng = np.random.default_rng([seed, 1])
        between, within = _spectrum(dim, 0.5), _spectrum(dim, 0.3)
        self.classes, self.dim = classes, dim
        self.means = rng.normal(size=(classes, dim)) * np.sqrt(between)
        self.spread = np.exp(rng.normal(0.0, 0.25, size=classes))  # per-class std factor
        self.within_sd = np.sqrt(within)
        # Mean cosine of the states ~ |bias|^2 / (|bias|^2 + tr between + tr within).
        direction = rng.normal(size=dim)
        norm2 = anisotropy / (1 - anisotropy) * 2 * dim
        self.bias = direction / np.linalg.norm(direction) * math.sqrt(norm2)
        self.head = self.means + 0.5 * rng.normal(size=(classes, dim)) * np.sqrt(between)
        self.noise_sd = float(np.mean(self.spread) * np.sqrt(np.mean(within)))

    def states(
        self, labels: np.ndarray, rng: np.random.Generator, failure: Failure | None = None
    ) -> np.ndarray:
        """Final-norm outputs for `labels` (float32), with `failure` applied if given."""
        z = rng.normal(size=(labels.size, self.dim)) * self.within_sd
        x = self.means[labels] + z * self.spread[labels, None]
        if failure is not None and failure.kind == "norm":
            x = x * (1.0 - failure.strength * (1.0 - demo_collapse_gains(self.dim)))
        elif failure is not None and failure.kind == "collapse":
            broken = rng.random(labels.size) < failure.strength
            x[broken] *= demo_collapse_gains(self.dim)
        h = x + self.bias
        if failure is not None and failure.kind == "noise":
            h = h + rng.normal(size=h.shape) * 2.0 * failure.strength * self.noise_sd
        return h.astype(np.float32)


class Traffic:
    """Samples per second by time of day, and the shifting class mix (see the module doc)."""

    TOPICS = 4
    PERIODS = (DAY, 3.5 * DAY, 0.7 * DAY, 2 * DAY)

    def __init__(
        self, classes: int, seed: int, *, low_rate: float, swing: float, zipf: float = 1.0
    ) -> None:
        rng = np.random.default_rng([seed, 2])
        base = np.arange(1, classes + 1, dtype=np.float64) ** -zipf
        topics = base * np.exp(0.7 * rng.normal(size=(self.TOPICS, classes)))
        self.topics = topics / topics.sum(axis=1, keepdims=True)
        self.phases = rng.uniform(0, 2 * math.pi, size=self.TOPICS)
        self.low_rate, self.swing = low_rate, swing

    def rate(self, t: float) -> float:
        """`low_rate` at midnight, `low_rate * swing` at noon, a cosine in between."""
        day = ((t - T0) % DAY) / DAY
        return self.low_rate * self.swing ** ((1 - math.cos(2 * math.pi * day)) / 2)

    def mix(self, t: float) -> np.ndarray:
        """Label frequencies at time `t`: the topics weighted by a softmax of slow cycles."""
        angle = [
            2 * math.pi * (t - T0) / p + ph for p, ph in zip(self.PERIODS, self.phases, strict=True)
        ]
        logits = 1.5 * np.sin(np.array(angle))
        weights = np.exp(logits - logits.max())
        p = (weights / weights.sum()) @ self.topics
        return np.asarray(p / p.sum())


@dataclass(frozen=True)
class Batch:
    ts: float
    features: np.ndarray
    labels: np.ndarray
    served_by_other: np.ndarray | None  # swap: which rows the other checkpoint served


class World:
    """The model, the other checkpoint, the traffic; batch `i` covers `[T0 + i B, T0 + (i+1) B)`."""

    def __init__(
        self,
        classes: int,
        dim: int,
        seed: int,
        *,
        low_rate: float,
        swing: float,
        batch_seconds: int,
    ) -> None:
        self.seed = seed
        self.model = SyntheticModel(classes, dim, seed)
        self.other = SyntheticModel(classes, dim, seed + 1000)
        self.traffic = Traffic(classes, seed, low_rate=low_rate, swing=swing)
        self.batch_seconds = batch_seconds

    def batch(self, index: int, failure: Failure | None = None) -> Batch:
        start = T0 + index * self.batch_seconds
        mid = start + self.batch_seconds / 2
        rng = np.random.default_rng([self.seed, 3, index])
        n = int(rng.poisson(self.traffic.rate(mid) * self.batch_seconds))
        labels = rng.choice(self.model.classes, size=n, p=self.traffic.mix(mid))
        features = self.model.states(labels, rng, failure)
        other = None
        if failure is not None and failure.kind == "swap":
            other = rng.random(n) < failure.strength
            if other.any():
                features[other] = self.other.states(labels[other], rng)
        return Batch(mid, features, labels, other)

    def nc4_hits(self, batch: Batch, ids: torch.Tensor, means: torch.Tensor) -> int:
        """What the probe counts: states whose head decision (of the checkpoint that served
        them) equals the nearest of the last evaluation's class means."""
        x = torch.from_numpy(batch.features)
        if batch.served_by_other is None:
            return _reference(self.model, ids, means).hits(x)
        mine = torch.from_numpy(~batch.served_by_other)
        hits = _reference(self.model, ids, means).hits(x[mine])
        return hits + _reference(self.other, ids, means).hits(x[~mine])


def _reference(model: SyntheticModel, ids: torch.Tensor, means: torch.Tensor) -> NC4Reference:
    rows = torch.from_numpy(model.head)[ids]
    return NC4Reference(class_ids=ids, means=means, weight=rows, bias=None)
