"""`compare --reference-baseline`: judge a candidate against a baseline pinned in Redis.

The reference is the baseline's frozen statistics (no reference model runs); its metrics are
computed as the evaluator computes a baseline's (with the declared model's head), and the
candidate's statistics use the baseline's random Fourier features so the MMD is meaningful.
NC4 of the reference exists only if the baseline recorded NC4 counts (it keeps no samples).
"""

from __future__ import annotations

import time
from pathlib import Path

from monitor.data.files import read_lines
from monitor.errors import InvalidInput
from monitor.evaluate.heads import load_head
from monitor.metrics import compute_metrics
from monitor.metrics.engine import resolve_device
from monitor.offline.compare import (
    CompareOptions,
    CompareResult,
    Side,
    corpus_slice,
    drift_between,
    judge,
    metrics_of,
)
from monitor.offline.corpus_run import (
    Progress,
    context_length,
    open_model,
    run_model,
    tokenize_slice,
)
from monitor.offline.tolerances import Tolerances
from monitor.pipeline.baselines import decode_calibration, load_baseline
from monitor.pipeline.runtime import Runtime

# Metrics that need the d x d second moment (CollapseStats(second_moment=True)).
_SECOND_MOMENT_KEYS = ("effective_rank", "nc1_trace_ratio")


def compare_with_baseline(
    model: str,
    baseline: str,
    candidate: str,
    corpus: Path,
    tolerances: Tolerances,
    options: CompareOptions,
    progress: Progress | None = None,
) -> CompareResult:
    """Run `candidate` over the corpus slice and judge it against baseline `baseline` of the
    declared model `model` (Redis from the settings). The candidate must have the model's
    vocabulary size and width, so that its statistics and the baseline's are of one shape."""
    started = time.perf_counter()
    settings = options.settings
    if settings.embedded:
        raise InvalidInput(
            "no_redis", "--reference-baseline needs COLLAPSE_REDIS_URL (where baselines are pinned)"
        )
    lines = read_lines(corpus)
    runtime = Runtime(settings)
    runtime.registry.spec(model)  # an undeclared model is named as such, not as a missing pin
    ref_stats, meta = load_baseline(runtime.store, runtime.registry, model, baseline)
    found = runtime.store.baseline(model, baseline)
    buckets = decode_calibration(found.calibration if found else None)
    cand_model, cand_tok = open_model(candidate, str(resolve_device(settings.device)))
    head = cand_model.get_output_embeddings().weight
    if (int(head.shape[0]), int(head.shape[1])) != (ref_stats.num_classes, ref_stats.dim):
        raise InvalidInput(
            "incomparable_models",
            f"candidate has vocabulary {head.shape[0]} x width {head.shape[1]}, baseline "
            f"{baseline!r} of {model!r} {ref_stats.num_classes} x {ref_stats.dim}",
        )
    seqs = tokenize_slice(cand_tok, lines, options.max_tokens, context_length(cand_model))
    positions, corpus_info = corpus_slice(seqs, corpus, options)
    run = run_model(
        cand_model,
        cand_tok,
        seqs,
        positions=positions,
        rff=ref_stats.rff,
        second_moment=options.second_moment,
        batch_size=options.batch_size,
        label="candidate",
        progress=progress,
    )
    ref_head = load_head(runtime, model)
    ref_values = compute_metrics(
        ref_stats,
        ref_head.weight if ref_head else None,
        ref_head.bias if ref_head else None,
        **settings.metric_options(),
    ).as_dict()
    cand_values = metrics_of(run, settings)
    if not options.second_moment:  # the user's choice, not a regression: compare neither side
        ref_values = {**ref_values, **dict.fromkeys(_SECOND_MOMENT_KEYS)}
    drift = drift_between(run.stats, ref_stats, buckets, settings).as_dict()
    metrics, checks = judge(ref_values, cand_values, drift, tolerances)
    notes = []
    if ref_values.get("nc4_ncc_agreement") is None:
        notes.append("the baseline recorded no NC4 counts: nc4_ncc_agreement is not compared")
    if not options.second_moment:
        notes.append("--no-second-moment: effective_rank and nc1_trace_ratio are not compared")
    elif not ref_stats.has_second_moment:
        notes.append(
            "the baseline has no second moment (second_moment: false): effective_rank and "
            "nc1_trace_ratio are not compared"
        )
    return CompareResult(
        reference=Side(
            "baseline",
            f"{model}/{baseline}",
            ref_stats.sample_count,
            int(ref_values["class_count"] or 0),
            ref_stats.dim,
        ),
        candidate=Side(
            "model",
            candidate,
            run.stats.sample_count,
            int(cand_values["class_count"] or 0),
            run.stats.dim,
        ),
        corpus=corpus_info,
        metrics=metrics,
        drift=checks,
        tolerances=tolerances,
        notes=[*notes, f"baseline source: {meta.get('source')}"],
        seconds=time.perf_counter() - started,
    )
