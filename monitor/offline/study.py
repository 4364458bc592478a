"""`study`: collapse metrics and validation loss of many checkpoints, and how they correlate.

Wu & Papyan measure, for each model, the collapse metrics of its final hidden states on the
training set and its validation loss, then correlate the two across models. Per checkpoint this
module does the same: the metrics of the train corpus (all of METRICS.md's collapse and
geometry keys; NC4 on the validation corpus, against the class means of the train corpus) and
the mean next-token cross-entropy on the validation corpus. Both corpora are read as one
document per line and cut into windows of the model's context (at most `context` tokens),
spread evenly over the corpus up to a token budget, so a long corpus costs a bounded time.
Then, across checkpoints, each metric's correlations with loss with run-clustered bootstrap
intervals and partial correlations controlling for scale (`study_stats`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monitor.config import Settings
from monitor.data.files import read_lines
from monitor.errors import InvalidInput
from monitor.metrics import REPORT_KEYS, compute_metrics
from monitor.metrics.engine import resolve_device
from monitor.metrics.report import COLLAPSE_KEYS
from monitor.offline.corpus_run import context_length, head_of
from monitor.offline.correlation import Correlation, correlation_json
from monitor.offline.study_layers import (
    HEAD_FREE_KEYS,
    LayerRow,
    accumulate_layers,
    layer_correlations,
    layer_rows,
)
from monitor.offline.study_meta import RunInfo, default_meta, read_meta
from monitor.offline.study_scale import DERIVED_KEYS as DERIVED_KEYS
from monitor.offline.study_scale import class_mean_sq_norm as class_mean_sq_norm
from monitor.offline.study_scale import derived_values as derived_values
from monitor.offline.study_stats import analyse
from monitor.stats import CollapseStats

SCHEMA_VERSION = 2
# The metrics correlated with loss (class_count and sample_count are fixed by the corpus).
STUDY_KEYS: tuple[str, ...] = (
    *COLLAPSE_KEYS,
    "anisotropy_mean_cos",
    "effective_rank",
    *DERIVED_KEYS,
)
# The quantities correlated per layer (`--layers`): STUDY_KEYS less those needing the head.
LAYER_KEYS: tuple[str, ...] = tuple(k for k in STUDY_KEYS if k in HEAD_FREE_KEYS + DERIVED_KEYS)
# The sign of the correlation with loss that "more collapse, lower loss" predicts (METRICS.md's
# healthy directions); equiangularity_mean heads toward -1/(K-1), so it predicts no sign.
EXPECTED_SIGN: dict[str, int] = {
    "nc1_cdnv": 1,
    "nc1_cdnv2": 1,
    "nc1_cdnv_unbiased": 1,
    "nc1_cdnv2_unbiased": 1,
    "nc1_cdnv2_scale_free": 1,
    "nc1_trace_ratio": 1,
    "nc2_equinorm_cv": 1,
    "nc2_equiangularity_std": 1,
    "nc2_log_energy_mean": 1,
    "nc2_log_energy_std": 1,
    "nc3_duality_mean_cos": -1,
    "nc3_uniform_duality_cv": 1,
    "nc4_ncc_agreement": -1,
}
# A corpus is read up to this many characters per budgeted token (evenly strided lines), so
# tokenising a huge file never dominates; ~4 characters make a token in English BPE.
_CHARS_PER_TOKEN_BUDGET = 16


@dataclass(frozen=True)
class StudyOptions:
    """Token budgets and batching; the metric options come from `Settings`."""

    max_tokens: int = 131_072  # train-corpus positions whose states make the metrics
    max_eval_tokens: int = 32_768  # validation positions for the loss and NC4
    context: int = 256  # longest window, capped by the model's own context
    batch_size: int = 16
    resamples: int = 2000  # run-clustered bootstrap resamples
    level: float = 0.95  # of the bootstrap intervals
    seed: int = 0  # of the bootstrap's draws
    layers: bool = False  # also every hidden state's head-free metrics (one more pass)


@dataclass(frozen=True)
class CheckpointRow:
    """One checkpoint's measurements."""

    name: str
    path: str
    parameters: int
    n_embd: int | None
    n_layer: int | None
    train_tokens: int  # labelled positions that fed the statistics
    eval_tokens: int  # predicted positions of the validation loss
    val_loss: float
    metrics: dict[str, float | int | None]
    run: str | None = None  # the training run it is a snapshot of (None: its own)
    tokens_seen: int | None = None  # training tokens before it (None: unknown)
    derived: dict[str, float | None] = field(default_factory=dict)  # DERIVED_KEYS
    layers: list[LayerRow] | None = None  # hidden_states[0..L] with --layers

    def value(self, key: str) -> float | None:
        """A metric or derived quantity as a float (None: not computable)."""
        raw = self.derived[key] if key in DERIVED_KEYS else self.metrics.get(key)
        return None if raw is None else float(raw)


@dataclass(frozen=True)
class StudyResult:
    """Every checkpoint's row and each metric's correlation with validation loss."""

    corpus: str
    eval_corpus: str
    options: StudyOptions
    rows: list[CheckpointRow]
    correlations: list[Correlation] = field(default_factory=list)
    controls: tuple[str, ...] = ()  # of the partial correlations
    runs: int | None = None  # bootstrap clusters among the rows
    layer_correlations: list[tuple[int, Correlation]] | None = None  # with --layers

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "corpus": self.corpus,
            "eval_corpus": self.eval_corpus,
            "options": {
                "max_tokens": self.options.max_tokens,
                "max_eval_tokens": self.options.max_eval_tokens,
                "context": self.options.context,
                "layers": self.options.layers,
            },
            "bootstrap": {
                "cluster": "run",
                "runs": self.runs,
                "resamples": self.options.resamples,
                "level": self.options.level,
                "seed": self.options.seed,
            },
            "controls": list(self.controls),
            "checkpoints": [
                {
                    "name": r.name,
                    "path": r.path,
                    "parameters": r.parameters,
                    "n_embd": r.n_embd,
                    "n_layer": r.n_layer,
                    "train_tokens": r.train_tokens,
                    "eval_tokens": r.eval_tokens,
                    "val_loss": r.val_loss,
                    "metrics": r.metrics,
                    "run": r.run if r.run is not None else r.name,
                    "tokens_seen": r.tokens_seen,
                    "derived": {k: r.derived.get(k) for k in DERIVED_KEYS},
                    **({} if r.layers is None else {"layers": [x.to_json() for x in r.layers]}),
                }
                for r in self.rows
            ],
            "correlations": [correlation_json(c) for c in self.correlations],
        }
        if self.layer_correlations is not None:  # absent without --layers (additive field)
            doc["layer_correlations"] = [
                {"layer": layer, **correlation_json(c)} for layer, c in self.layer_correlations
            ]
        return doc


def resolve_checkpoints(paths: Sequence[Path]) -> list[Path]:
    """Each path is a checkpoint (has config.json) or a folder of them (its sub-folders)."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise InvalidInput("checkpoint_not_found", f"{path}: not a checkpoint directory")
        if (path / "config.json").is_file():
            found.append(path)
            continue
        subs = sorted(p for p in path.iterdir() if (p / "config.json").is_file())
        if not subs:
            raise InvalidInput("checkpoint_not_found", f"{path}: no config.json in it or below")
        found.extend(subs)
    if not found:
        raise InvalidInput("checkpoint_not_found", "no checkpoints given")
    resolved = [p.resolve() for p in found]
    if len(set(resolved)) != len(resolved):
        raise InvalidInput("duplicate_checkpoint", "a checkpoint is given twice")
    return found


def checkpoint_names(paths: Sequence[Path]) -> list[str]:
    """Short unique names: each path relative to the folder all of them share."""
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath(resolved))
    return [str(p.relative_to(common)) for p in resolved]


def token_stream(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> torch.Tensor:
    """Token ids of the documents, each followed by EOS when the tokenizer has one.

    Above a character budget only evenly strided documents are read, so that the cost is
    bounded and the sample still spans the whole corpus.
    """
    budget = _CHARS_PER_TOKEN_BUDGET * max_tokens
    total = sum(len(t) for t in texts)
    stride = max(1, math.ceil(total / budget))
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts[::stride]:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.int64)


def token_windows(stream: torch.Tensor, length: int, max_tokens: int) -> torch.Tensor:
    """(W, length) windows of `stream`, non-overlapping and evenly spread, W*length <= budget.

    A stream shorter than `length` gives one window of the whole stream.
    """
    n = int(stream.numel())
    if n < 2:
        raise InvalidInput("empty_corpus", "the corpus has fewer than two tokens")
    length = min(length, n)
    available = n // length
    wanted = max(1, min(available, max_tokens // length))
    starts = torch.linspace(0, available - 1, wanted).round().long() * length
    starts = torch.tensor(sorted(set(starts.tolist())), dtype=torch.int64)
    return stream[starts[:, None] + torch.arange(length)[None, :]]


@torch.no_grad()
def validation_loss(model: Any, windows: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats, positions counted) over the windows."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, int(windows.shape[0]), batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        # float32 logits (a float64 copy would double the largest tensor with a real
        # vocabulary); the sum over positions is accumulated in a Python float.
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            ids[:, 1:].reshape(-1),
            reduction="sum",
        )
        total += float(loss)
        count += int(ids[:, 1:].numel())
    return total / count, count


def _tokenizer_key(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


class _Streams:
    """Token streams per tokenizer: checkpoints of one family share a tokenizer, tokenise once."""

    def __init__(self, train: Sequence[str], evaluation: Sequence[str], options: StudyOptions):
        self._texts = (train, evaluation)
        self._options = options
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        key = _tokenizer_key(tokenizer)
        if key not in self._cache:
            train, evaluation = self._texts
            self._cache[key] = (
                token_stream(tokenizer, train, self._options.max_tokens),
                token_stream(tokenizer, evaluation, self._options.max_eval_tokens),
            )
        return self._cache[key]


def measure_checkpoint(
    path: Path,
    name: str,
    streams: _Streams,
    options: StudyOptions,
    settings: Settings,
    info: RunInfo | None = None,
) -> CheckpointRow:
    """Load one checkpoint, measure its metrics and validation loss."""
    from monitor.capture.mirror import embed_batches, load_model

    device = resolve_device(settings.device)
    model, tokenizer = load_model(path, device=device, dtype=None)
    weight, bias = head_of(model)
    train_stream, eval_stream = streams.get(tokenizer)
    length = min(options.context, context_length(model) or options.context)
    train_windows = token_windows(train_stream, length, options.max_tokens)
    eval_windows = token_windows(eval_stream, length, options.max_eval_tokens)
    stats = CollapseStats(
        int(weight.shape[0]), int(weight.shape[1]), second_moment=True, device=device
    )
    train_tokens = 0
    # dtype=None: the checkpoint's own precision on every device (mirror mode's "auto" would
    # take bf16 on CUDA, and CPU and GPU studies would then disagree).
    for batch in embed_batches(model, tokenizer, train_windows, options.batch_size, dtype=None):
        stats.update(batch.features, batch.labels)
        train_tokens += len(batch)
    eval_features = torch.cat(
        [
            b.features
            for b in embed_batches(model, tokenizer, eval_windows, options.batch_size, dtype=None)
        ]
    )
    report = compute_metrics(
        stats, weight, bias, eval_features=eval_features, **settings.metric_options()
    )
    val_loss, eval_tokens = validation_loss(model, eval_windows, options.batch_size)
    metrics = {key: report.value(key) for key in REPORT_KEYS}
    scale2 = class_mean_sq_norm(stats, settings.min_count, device)
    del stats, eval_features  # the per-layer pass holds L + 1 statistics of its own
    layers = None
    if options.layers:
        found = accumulate_layers(model, train_windows, options.batch_size, device)
        layers = layer_rows(found, settings, device)
    config = getattr(model, "config", None)
    n_embd = getattr(config, "n_embd", None) or getattr(config, "hidden_size", None)
    n_layer = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", None)
    return CheckpointRow(
        name=name,
        path=str(path),
        parameters=sum(int(p.numel()) for p in model.parameters()),
        n_embd=None if n_embd is None else int(n_embd),
        n_layer=None if n_layer is None else int(n_layer),
        train_tokens=train_tokens,
        eval_tokens=eval_tokens,
        val_loss=val_loss,
        metrics=metrics,
        run=None if info is None else info.run,
        tokens_seen=None if info is None else info.tokens_seen,
        derived=derived_values(metrics, scale2),
        layers=layers,
    )


def correlations(
    rows: Sequence[CheckpointRow], options: StudyOptions
) -> tuple[list[Correlation], tuple[str, ...], int]:
    """Each STUDY_KEYS quantity against validation loss: (correlations, controls, runs)."""
    analysis = analyse(
        {key: [r.value(key) for r in rows] for key in STUDY_KEYS},
        [r.val_loss for r in rows],
        [r.run if r.run is not None else r.name for r in rows],
        [r.parameters for r in rows],
        [r.tokens_seen for r in rows],
        EXPECTED_SIGN,
        resamples=options.resamples,
        seed=options.seed,
        level=options.level,
    )
    return analysis.correlations, analysis.controls, analysis.runs


def run_study(
    checkpoints: Sequence[Path],
    corpus: Path,
    eval_corpus: Path,
    options: StudyOptions | None = None,
    settings: Settings | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    meta: Path | None = None,
) -> StudyResult:
    """Measure every checkpoint (calling `progress(done, total, name)`), then correlate.

    `meta`: the CSV of runs and tokens seen (`study_meta`); without it each checkpoint is its
    own run and the partial correlations control for log10 parameters only.
    """
    opts = options or StudyOptions()
    if min(opts.max_tokens, opts.max_eval_tokens, opts.context) < 2 or opts.batch_size < 1:
        raise InvalidInput("invalid_option", "token budgets and context need >= 2, batch >= 1")
    if opts.resamples < 0 or not 0.0 < opts.level < 1.0:
        raise InvalidInput("invalid_option", "resamples must be >= 0 and level in (0, 1)")
    paths = resolve_checkpoints(checkpoints)
    names = checkpoint_names(paths)
    infos = default_meta(names) if meta is None else read_meta(meta, names)
    streams = _Streams(read_lines(corpus), read_lines(eval_corpus), opts)
    chosen = settings if settings is not None else Settings()
    rows: list[CheckpointRow] = []
    for i, (path, name) in enumerate(zip(paths, names, strict=True)):
        if progress is not None:
            progress(i, len(paths), name)
        rows.append(measure_checkpoint(path, name, streams, opts, chosen, infos[name]))
    if progress is not None:
        progress(len(paths), len(paths), "")
    found, controls, runs = correlations(rows, opts)
    by_layer = None
    if opts.layers:
        by_layer = layer_correlations(
            [r.layers for r in rows], [r.val_loss for r in rows], LAYER_KEYS, EXPECTED_SIGN
        )
    return StudyResult(str(corpus), str(eval_corpus), opts, rows, found, controls, runs, by_layer)
