"""The whole /metrics page of a real exporter passes `promtool check metrics`.

Redis holds what the real evaluator writes (a pinned baseline, a drifted window, so drift
ratios and their standard errors, the jackknife's traffic stderrs, top drifting tokens), a
synthetic snapshot holding every catalogued key plus a custom one, and pipeline state (a
rejected batch, a pending partial, counters, queue depths). The page is piped through promtool,
which exits non-zero or prints one lint line per problem; both are checked.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from minute_stack import DIM, VOCAB, WINDOW, MinuteStack, model_m, traffic
from prometheus_client.parser import text_string_to_metric_families
from servers import RedisServer, free_port, stop_process, wait_for

from monitor.errors import InvalidInput
from monitor.exporter import METRIC_HELP, gauge_name
from monitor.pipeline.baselines import pin_window
from monitor.pipeline.payload import encode_batch

pytestmark = pytest.mark.slow


def promtool(page: str) -> tuple[int, str]:
    """promtool's exit code and everything it printed (lint lines go to stderr)."""
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=page.encode(), capture_output=True, timeout=30
    )
    return done.returncode, (done.stdout + done.stderr).decode()


def full_snapshot(timestamp: float) -> str:
    """A snapshot of model `full` with every catalogued key, a custom key and top tokens."""
    metrics: dict[str, float] = {key: 0.5 + i / 1000 for i, key in enumerate(METRIC_HELP)}
    metrics.update({"sample_count": 900, "class_count": 30, "my.custom-score": 1.25})
    doc = {
        "v": 1,
        "model": "full",
        "window": WINDOW,
        "window_seconds": 60,
        "timestamp": timestamp,
        "status": "ok",
        "reason": None,
        "duration_seconds": 0.2,
        "sample_count": 900,
        "class_count": 30,
        "metrics": metrics,
        "baseline": {"name": "launch", "created": timestamp - 600, "source": f"window:{WINDOW}"},
        "top_drift": [
            {"class_id": 3, "token": " the", "cosine_distance": 0.4},
            {"class_id": 7, "token": 'a"b\\c\n', "cosine_distance": 0.2},
        ],
    }
    return json.dumps(doc)


def test_promtool_bites_on_a_count_gauge() -> None:
    """The check below is not vacuous: promtool flags the old name and a missing HELP."""
    code, text = promtool("# HELP x_count n\n# TYPE x_count gauge\nx_count 1\ny 2\n")
    assert code != 0
    assert '"_count" suffix' in text
    assert "no help text" in text


def test_the_whole_scrape_passes_promtool(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    models = [model_m(tmp_path, second_moment=True), {"name": "full", "vocab_size": VOCAB,
                                                       "dim": DIM}]  # fmt: skip
    stack = MinuteStack(redis_server.url, models)
    port = free_port()
    exporter = stack.start_exporter(port, tmp_path / "exporter.log")
    try:
        t0 = stack.t0
        stack.feed(1.0, t0, "base", nc4_hits=150)
        pin_window(stack.runtime.store, stack.runtime.registry, "m", "ref", WINDOW, 60)
        stack.feed(0.6, t0 + 100, "drifted", nc4_hits=90)
        assert stack.evaluate(t0 + 100).ok
        stack.runtime.store.put_snapshot("full", WINDOW, full_snapshot(t0), history=2)
        x, y = traffic(5, 10, 1.0)
        with pytest.raises(InvalidInput):  # wrong width: a rejection counted by reason
            stack.runtime.ingestor.ingest(encode_batch("m", x[:, :5], y, batch_id="bad", ts=t0))
        stack.runtime.ingestor.ingest(  # left uncompacted: pending partials and a lag
            encode_batch("m", x, y.astype(np.int64), batch_id="late", ts=t0 + 101)
        )

        url = f"http://127.0.0.1:{port}/metrics"

        def page() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        wait_for(lambda: "collapse_store_up 1.0" in page(), 60, "the exporter reading Redis")
        text = page()
    finally:
        stop_process(exporter)
        redis_server.stop()

    names = {f.name for f in text_string_to_metric_families(text)}
    # Every kind of series is on the page, so promtool judges all of them.
    for key in METRIC_HELP:
        assert gauge_name(key) in names, key
    for family in ("build_info", "store_up", "snapshot_ok", "baseline_info",
                   "top_drift_cosine_distance", "pending_partials", "compaction_lag_seconds",
                   "queue_depth", "my_custom_score"):  # fmt: skip
        assert f"collapse_{family}" in names, family
    assert "collapse_samples_rejected" in names  # the parser drops a counter's _total
    # The real evaluator's own drift ratios, their stderrs and the jackknife's traffic stderrs.
    for prefix in ("collapse_drift_nc1_cdnv_ratio{", "collapse_drift_nc1_cdnv_ratio_stderr{",
                   "collapse_nc1_cdnv_unbiased_traffic_stderr{"):  # fmt: skip
        assert f'{prefix}model="m"' in text, prefix

    code, lint = promtool(text)
    assert code == 0, lint
    assert lint.strip() == "", lint
