"""One model over a held-out corpus slice (mirror mode), for `compare`.

The slice is tokenised once into token ids, so two model versions see exactly the same
positions in the same batches; the statistics are the service's (`CollapseStats`), and the
rows NC4 is measured on are fixed positions chosen by seed, the same for every model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from monitor.capture.mirror import embed_batches, load_model
from monitor.errors import InvalidInput
from monitor.stats import CollapseStats, RFFConfig
from monitor.stats.rff import BucketSums, median_bandwidth, rff_features

Progress = Callable[[str, int, int], None]
RFF_FEATURES = 256
CALIBRATION_PARTS = 16


def _source(name_or_path: str) -> str:
    """The name to load; a hub id never starts with "/", "." or "~", so such a name is a local
    path, refused here when missing instead of being guessed at as a hub id."""
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) and not path.is_dir():
        raise InvalidInput("model_not_found", f"no model directory {name_or_path!r}")
    return str(path)


def open_model(name_or_path: str, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) through `load_model`, every loading failure as `InvalidInput`."""
    source = _source(name_or_path)
    try:
        return load_model(source, device=device)
    except InvalidInput:
        raise
    except (ValueError, OSError) as exc:  # e.g. an invalid hub id, a directory without a model
        raise InvalidInput(
            "model_not_found", f"cannot load model {name_or_path!r}: {exc}"
        ) from None


def open_tokenizer(name_or_path: str) -> tuple[Any, Any]:
    """(tokenizer, config) without the weights: enough to check that two models are comparable
    before either runs, so only one model need be in memory at a time."""
    from transformers import AutoConfig, AutoTokenizer

    source = _source(name_or_path)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    local = Path(source).is_dir() or offline
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (ValueError, OSError) as exc:
        raise InvalidInput(
            "model_not_found", f"cannot load model {name_or_path!r}: {exc}"
        ) from None
    return tokenizer, config


def context_length(model_or_config: Any) -> int | None:
    """The context size a model (or its config) states, if any."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 1 else None


def head_of(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (V, d) weight and (V,) bias as float32 CPU tensors."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise InvalidInput("no_head_weight", f"{type(model).__name__} has no linear LM head")
    bias = getattr(head, "bias", None)
    return (
        weight.detach().float().cpu(),
        bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None,
    )


def tokenize_slice(
    tokenizer: Any, lines: Sequence[str], max_tokens: int, max_length: int | None
) -> list[list[int]]:
    """Token ids of the first lines, truncated to `max_length`, until `max_tokens` labelled
    positions (a sequence of n tokens has n - 1); lines under two tokens are skipped."""
    seqs: list[list[int]] = []
    positions = 0
    for line in lines:
        if positions >= max_tokens:
            break
        ids = [int(t) for t in tokenizer(line, add_special_tokens=False)["input_ids"]]
        if max_length is not None:
            ids = ids[:max_length]
        ids = ids[: max_tokens - positions + 1]
        if len(ids) >= 2:
            seqs.append(ids)
            positions += len(ids) - 1
    return seqs


def nc4_positions(total: int, max_samples: int, seed: int) -> torch.Tensor:
    """Sorted indices of the labelled positions NC4 is measured on (all of them if few)."""
    if total <= max_samples:
        return torch.arange(total)
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(total, generator=gen)[:max_samples]).values


def auto_rff(sample: torch.Tensor) -> RFFConfig:
    """The registry's recipe: bandwidths half, once and twice the median pairwise distance."""
    try:
        median = median_bandwidth(sample.to(torch.float64))
    except ValueError:
        median = float(sample.to(torch.float64).norm(dim=1).mean()) or 1.0
    return RFFConfig(int(sample.shape[1]), RFF_FEATURES, (median / 2, median, 2 * median), seed=0)


@dataclass
class ModelRun:
    """What one model's pass over the slice leaves: statistics, NC4 rows, head, RFF buckets."""

    stats: CollapseStats
    nc4_features: torch.Tensor  # (M, d) float32 CPU, rows at `nc4_positions`
    weight: torch.Tensor
    bias: torch.Tensor | None
    buckets: list[BucketSums] = field(default_factory=list)


def run_model(
    model: Any,
    tokenizer: Any,
    seqs: list[list[int]],
    *,
    positions: torch.Tensor,
    rff: RFFConfig | Literal["auto"] | None,
    second_moment: bool,
    batch_size: int,
    calibrate: bool = False,
    label: str = "model",
    progress: Progress | None = None,
) -> ModelRun:
    """Teacher-forced pass over `seqs`: `CollapseStats` (with RFF sums when `rff` is set), the
    rows at `positions` for NC4, and with `calibrate` per-part RFF sums (batches dealt
    round-robin into parts, as `pin_batches` does) to calibrate the MMD threshold."""
    weight, bias = head_of(model)
    total = sum(len(s) - 1 for s in seqs)
    stats: CollapseStats | None = None
    kept: list[torch.Tensor] = []
    parts: list[BucketSums] = []
    offset = 0
    for i, batch in enumerate(embed_batches(model, tokenizer, seqs, batch_size=batch_size)):
        feats = batch.features
        if stats is None:
            config = auto_rff(feats) if rff == "auto" else rff
            stats = CollapseStats(
                int(weight.shape[0]), int(feats.shape[1]), second_moment=second_moment, rff=config
            )
        stats.update(feats, batch.labels)
        n = int(feats.shape[0])
        lo = int(torch.searchsorted(positions, offset))
        hi = int(torch.searchsorted(positions, offset + n))
        if hi > lo:
            kept.append(feats[positions[lo:hi] - offset].float())
        if calibrate and stats.rff is not None:
            phi = rff_features(feats, stats.rff).to(torch.float64)
            part = BucketSums(n, phi.sum(dim=0), float((phi * phi).sum()))
            if len(parts) < CALIBRATION_PARTS:
                parts.append(part)
            else:
                j = i % CALIBRATION_PARTS
                old = parts[j]
                parts[j] = BucketSums(
                    old.count + n, old.rff_sum + part.rff_sum, old.rff_sq + part.rff_sq
                )
        offset += n
        if progress is not None:
            progress(label, offset, total)
    if stats is None or stats.sample_count == 0:
        raise InvalidInput("empty_corpus", "no labelled position: every line is under 2 tokens")
    dim = stats.dim
    nc4 = torch.cat(kept) if kept else torch.empty(0, dim)
    return ModelRun(stats, nc4, weight, bias, parts)
