"""The models the service watches, with the sizes their statistics need.

Names and shapes are torch-free (the API checks batches against them in a core install); the
statistics and the RFF bandwidth proposal load torch on first use, in a worker.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from monitor.config import ModelSpec, Settings
from monitor.errors import CollapseMonitorError, InvalidInput
from monitor.stats.rff_config import BANDWIDTH_RANGE, RFFConfig
from monitor.store.base import Store

if TYPE_CHECKING:
    import torch

    from monitor.stats import CollapseStats

log = logging.getLogger(__name__)
# The agreed median is used at half, once and twice its value: each must be a valid bandwidth.
MEDIAN_RANGE = (2 * BANDWIDTH_RANGE[0], BANDWIDTH_RANGE[1] / 2)


class InvalidStoredBandwidth(CollapseMonitorError):
    """The store holds an RFF bandwidth no map can use (written by a release before 0.2 from a
    poisoned first batch). Not the current batch's fault, so not counted as its rejection."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab_size: int
    dim: int
    second_moment: bool


def _checkpoint_sizes(checkpoint: str) -> tuple[int, int]:
    """Vocabulary size and hidden width from a checkpoint's config, without loading weights."""
    local = Path(checkpoint) / "config.json"
    if local.is_file():
        config = json.loads(local.read_text())
        vocab = config.get("vocab_size")
        dim = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    else:  # a hub id: honours HF_HUB_OFFLINE and the local cache
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(checkpoint)
        vocab = getattr(cfg, "vocab_size", None)
        dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not isinstance(vocab, int) or not isinstance(dim, int):
        raise InvalidInput(
            "unknown_model", f"cannot read vocab_size and hidden size of {checkpoint}"
        )
    return vocab, dim


class ModelRegistry:
    """Declared models by name; anything else is refused as `unknown_model`."""

    def __init__(self, settings: Settings) -> None:
        self.max_clock_skew = settings.max_clock_skew_seconds  # for `TimeBounds` of payloads
        self._specs = {m.name: m for m in settings.models}
        self._shapes: dict[str, ModelShape] = {}
        self._rff: dict[str, RFFConfig | None] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> ModelSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise InvalidInput(
                "unknown_model",
                f"model {name!r} is not declared (COLLAPSE_MODELS); known: {self.names}",
            )
        return spec

    def shape(self, name: str) -> ModelShape:
        if name not in self._shapes:
            spec = self.spec(name)
            if spec.vocab_size is not None and spec.dim is not None:
                vocab, dim = spec.vocab_size, spec.dim
            else:
                assert spec.checkpoint is not None  # guaranteed by ModelSpec's validator
                vocab, dim = _checkpoint_sizes(spec.checkpoint)
            self._shapes[name] = ModelShape(name, vocab, dim, spec.second_moment)
        return self._shapes[name]

    def rff(self, name: str, store: Store, sample: torch.Tensor) -> RFFConfig | None:
        """The model's random Fourier features, the same in every process.

        Without a configured bandwidth, the first process to see data proposes one from the
        median heuristic on its batch (half, once and twice the median distance) and the store
        keeps the first proposal, so every worker and the baseline agree. Because that choice
        is forever, `sample` is validated here, whatever path it came by (ingest, embed,
        baseline import): a non-finite or out-of-range sample raises `InvalidInput` before
        anything is proposed, and the proposal is clamped into `MEDIAN_RANGE`.
        """
        if name in self._rff:
            return self._rff[name]
        spec, shape = self.spec(name), self.shape(name)
        config = None
        if spec.rff_features > 0:
            if spec.rff_bandwidth is not None:
                median = spec.rff_bandwidth
            else:
                median = self._agreed_bandwidth(name, store, sample)
            bandwidths = (median,) if spec.rff_bandwidth else (median / 2, median, 2 * median)
            config = RFFConfig(shape.dim, spec.rff_features, bandwidths, seed=0)
        self._rff[name] = config
        return config

    def _agreed_bandwidth(self, name: str, store: Store, sample: torch.Tensor) -> float:
        stored = store.meta(name).get("rff_bandwidth")
        if stored is None:
            from monitor.stats.validation import check_values

            check_values(sample)
            proposal = _clamped(_median_or_norm(sample), name)
            stored = store.meta_setdefault(name, "rff_bandwidth", repr(proposal))
        try:
            value = float(stored)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and MEDIAN_RANGE[0] <= value <= MEDIAN_RANGE[1]):
            raise InvalidStoredBandwidth(
                f"the stored RFF bandwidth of model {name!r} is {stored!r}, outside "
                f"{MEDIAN_RANGE}: delete the field rff_bandwidth of its meta hash "
                f"(<prefix>:{{{name}}}:meta) and the statistics computed under it"
            )
        return value

    def new_stats(self, name: str, store: Store, sample: torch.Tensor) -> CollapseStats:
        """Empty statistics laid out for the model (vocabulary, width, options, features)."""
        from monitor.stats import CollapseStats

        shape = self.shape(name)
        return CollapseStats(
            shape.vocab_size,
            shape.dim,
            second_moment=shape.second_moment,
            rff=self.rff(name, store, sample),
        )


def _clamped(proposal: float, name: str) -> float:
    low, high = MEDIAN_RANGE
    if low <= proposal <= high:
        return proposal
    log.warning("RFF bandwidth %.3g proposed for %r clamped into %s", proposal, name, MEDIAN_RANGE)
    return min(max(proposal, low), high)


def _median_or_norm(sample: torch.Tensor) -> float:
    import torch

    from monitor.stats.rff import median_bandwidth

    rows = sample.detach().to(torch.float64)
    try:
        return median_bandwidth(rows)
    except ValueError:  # one row or identical rows: fall back to the typical norm
        norm = float(rows.norm(dim=1).mean()) if rows.numel() else 0.0
        return norm if norm > 0 else 1.0
