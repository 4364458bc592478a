"""`compare --live`: two served variants compared from their live windows in a real Redis.

Traffic for each declared model goes through the real ingestor, compaction and evaluator
(10-second buckets, a one-minute window, as in minute_stack.py); the command then runs in
process through typer with the service's COLLAPSE_* environment. A canary drawn from the
stable model's own distribution must pass; a canary whose class means are pulled together
(as a corrupted final layer would) must fail with exit 3 on the volume-robust CDNV, with the
difference and its interval equal to what the two stored snapshots give by hand.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from servers import RedisServer, service_env
from typer.testing import CliRunner

from monitor.cli import app
from monitor.config import Settings
from monitor.evaluate.evaluator import Evaluator
from monitor.metrics.report import ALERT_STDERR_KEYS
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model
from monitor.snapshot import Snapshot

VOCAB, DIM, WIDE = 40, 8, 12
WINDOW = "1m"
TIMING = {"windows": {WINDOW: 60}, "bucket_seconds": 10, "coarse_bucket_seconds": 60,
          "fine_retention_seconds": 60}  # fmt: skip
NAMES = {"stable": DIM, "canary": DIM, "wide": WIDE, "idle": DIM, "empty": DIM, "big": DIM}
VOCABS = {"big": 60}  # another vocabulary (a superset of the traffic's 40 tokens); others VOCAB
BATCHES, ROWS = 6, 400


def declared(tmp: Path) -> list[dict[str, Any]]:
    """The models, each with a random LM head (NC3; NC4 needs a head to be reported)."""
    models = []
    for name, dim in NAMES.items():
        vocab = VOCABS.get(name, VOCAB)
        head = tmp / f"head{dim}x{vocab}.npy"
        np.save(head, np.random.default_rng(1).normal(size=(vocab, dim)))
        models.append({"name": name, "vocab_size": vocab, "dim": dim, "second_moment": True,
                       "classifier_path": str(head)})  # fmt: skip
    return models


def traffic(
    model: str, tag: str, spread: float, dim: int, rows: int = ROWS
) -> Iterator[dict[str, Any]]:
    """`BATCHES` payloads of one model, one per 10-second bucket of the last minute.

    Class means are the same for every model of a width (seed 0); `spread` scales the distance
    between them (0.3 blurs the classes together). Each batch carries NC4 counts as capture
    would: the head agrees with the nearest mean about 80% of the time, `spread` times less.
    """
    means = np.random.default_rng(0).normal(size=(VOCAB, dim)) * 3 * spread
    now = time.time()
    for i in range(BATCHES):
        rng = np.random.default_rng(zlib.crc32(f"{model}{tag}{i}".encode()))
        y = rng.integers(0, VOCAB, rows)
        x = (means[y] + rng.normal(size=(rows, dim))).astype(np.float32)
        hits = int(rng.binomial(rows, 0.8 * min(spread, 1.0)))
        yield encode_batch(model, x, y, batch_id=f"{tag}{i}", ts=now - 5 - 9 * i, nc4=(hits, rows))


class LiveStack:
    """The service's runtime and evaluator on a real Redis, and the CLI's environment."""

    def __init__(self, server: RedisServer, tmp: Path) -> None:
        models = declared(tmp)
        settings = Settings(redis_url=server.url, models=models, **TIMING)  # type: ignore[arg-type]
        self.runtime = Runtime(settings)
        self.evaluator = Evaluator(self.runtime)
        timing = {
            "COLLAPSE_WINDOWS": json.dumps(TIMING["windows"]),
            "COLLAPSE_BUCKET_SECONDS": "10",
            "COLLAPSE_COARSE_BUCKET_SECONDS": "60",
            "COLLAPSE_FINE_RETENTION_SECONDS": "60",
        }
        self.env = service_env(server.url, json.dumps(models), **timing)

    def serve(self, model: str, spread: float, tag: str = "t", rows: int = ROWS) -> Snapshot:
        for payload in traffic(model, tag, spread, NAMES[model], rows):
            self.runtime.ingestor.ingest(payload)
        compact_model(self.runtime.store, model)
        snapshot = self.evaluator.evaluate_model(model, now=time.time())[0]
        assert snapshot.ok, snapshot.reason
        return snapshot

    def compare(self, reference: str, candidate: str, *extra: str) -> tuple[int, str, str]:
        args = ["compare", "--live", "--reference-model", reference,
                "--candidate-model", candidate, "--window", WINDOW, *extra]  # fmt: skip
        result = CliRunner().invoke(app, args, env=self.env)
        return result.exit_code, result.stdout, result.stderr

    def compare_json(self, reference: str, candidate: str, *extra: str) -> Any:
        code, out, err = self.compare(reference, candidate, "--format", "json", *extra)
        assert code in (0, 3), err
        doc = json.loads(out)
        assert doc["exit_code"] == code
        return doc


@pytest.fixture
def stack(redis_server: RedisServer, tmp_path: Path) -> LiveStack:
    return LiveStack(redis_server, tmp_path)


def by_key(doc: Any) -> dict[str, Any]:
    return {m["key"]: m for m in doc["metrics"]}


def by_hand(ref: Snapshot, cand: Snapshot, key: str, z: float) -> tuple[float, float, float]:
    """(difference, low, high) of `key` from the two stored snapshots' numbers."""
    diff = float(cand.metrics[key]) - float(ref.metrics[key])  # type: ignore[arg-type]
    se_r = float(ref.metrics[f"{key}_traffic_stderr"])  # type: ignore[arg-type]
    se_c = float(cand.metrics[f"{key}_traffic_stderr"])  # type: ignore[arg-type]
    half = z * math.sqrt(se_r**2 + se_c**2)
    return diff, diff - half, diff + half


DOCUMENTED = {"schema_version", "mode", "passed", "exit_code", "regressions", "window", "z",
              "confidence", "reference", "candidate", "comparable", "metrics", "drift",
              "tolerances", "notes", "seconds"}  # fmt: skip
METRIC_FIELDS = {"key", "reference", "candidate", "difference", "relative_change",
                 "bad_direction", "tolerance", "reference_stderr", "candidate_stderr", "stderr",
                 "ci_low", "ci_high", "z_score", "significant", "status"}  # fmt: skip


def test_equal_variants_pass(stack: LiveStack) -> None:
    ref = stack.serve("stable", 1.0)
    cand = stack.serve("canary", 1.0)
    doc = stack.compare_json("stable", "canary")
    assert set(doc) == DOCUMENTED
    assert (doc["mode"], doc["window"], doc["passed"], doc["regressions"]) == (
        "live", WINDOW, True, [])  # fmt: skip
    assert doc["z"] == 1.96
    assert doc["comparable"] == {"vocabulary": True, "width": True, "not_comparable": []}
    for side, snap in (("reference", ref), ("candidate", cand)):
        assert doc[side]["name"] == snap.model
        assert doc[side]["sample_count"] == snap.sample_count == BATCHES * ROWS
        assert (doc[side]["dim"], doc[side]["vocab_size"]) == (DIM, VOCAB)
        assert 0 <= doc[side]["age_seconds"] < 60
    got = by_key(doc)
    for m in doc["metrics"]:
        assert set(m) == METRIC_FIELDS, m["key"]
        assert m["status"] in ("ok", "unchecked", "not_significant"), m
        if m["reference"] is not None and m["candidate"] is not None:
            assert m["difference"] == pytest.approx(m["candidate"] - m["reference"], abs=1e-12)
    checked = {m["key"] for m in doc["metrics"] if m["tolerance"] is not None}
    assert checked == {"nc1_cdnv_unbiased", "nc4_ncc_agreement", "nc2_equiangularity_std",
                       "effective_rank"}  # fmt: skip
    # Every alerting key has its interval, the one the two stored snapshots give by hand.
    for key in ALERT_STDERR_KEYS:
        diff, low, high = by_hand(ref, cand, key, 1.96)
        assert (got[key]["difference"], got[key]["ci_low"], got[key]["ci_high"]) == pytest.approx(
            (diff, low, high), rel=1e-12, abs=1e-15
        ), key
        assert got[key]["significant"] == (low > 0 or high < 0), key
    assert abs(got["nc1_cdnv_unbiased"]["relative_change"]) < 0.25
    # A plug-in key has no traffic standard error: shown, without an interval.
    assert got["nc1_cdnv"]["ci_low"] is None
    assert got["nc1_cdnv"]["tolerance"] is None
    drift = {d["key"]: d for d in doc["drift"]}
    assert drift["drift_mmd"]["status"] == "unchecked"  # no baselines here: both null
    code, out, err = stack.compare("stable", "canary")
    assert code == 0, err
    assert "nc1_cdnv_unbiased" in out
    assert out.strip().splitlines()[-1] == "passed"


def test_collapsed_canary_fails_with_exit_3(stack: LiveStack, tmp_path: Path) -> None:
    ref = stack.serve("stable", 1.0)
    cand = stack.serve("canary", 0.3)
    doc = stack.compare_json("stable", "canary")
    assert doc["exit_code"] == 3
    assert doc["passed"] is False
    assert "nc1_cdnv_unbiased" in doc["regressions"]
    got = by_key(doc)
    cdnv = got["nc1_cdnv_unbiased"]
    assert cdnv["status"] == "regressed"
    assert cdnv["relative_change"] > 0.25
    diff, low, high = by_hand(ref, cand, "nc1_cdnv_unbiased", 1.96)
    assert cdnv["difference"] == pytest.approx(diff, rel=1e-12)
    assert cdnv["ci_low"] == pytest.approx(low, rel=1e-12)
    assert cdnv["ci_high"] == pytest.approx(high, rel=1e-12)
    assert cdnv["significant"] is True
    assert low > 0  # the interval excludes zero on the bad side
    for key in doc["regressions"]:
        assert got[key]["status"] == "regressed"
        assert got[key]["significant"] is True
    # The same windows at 99.99%: CDNV moved by far more than the noise, still a regression.
    strict = stack.compare_json("stable", "canary", "--confidence", "0.9999")
    assert strict["z"] == pytest.approx(3.8906, abs=1e-4)
    assert "nc1_cdnv_unbiased" in strict["regressions"]
    code, out, err = stack.compare("stable", "canary")
    assert code == 3, err
    assert out.strip().splitlines()[-1].startswith("REGRESSION: ")
    assert "nc1_cdnv_unbiased" in out.strip().splitlines()[-1]
    assert stack.compare("stable", "canary", "--format", "table") == (code, out, err)  # default
    # The failing checks turned off in a tolerance file: the same windows pass.
    loose = tmp_path / "live.yaml"
    loose.write_text("".join(f"{key}: null\n" for key in doc["regressions"]))
    relaxed = stack.compare_json("stable", "canary", "--tolerances", str(loose))
    assert (relaxed["exit_code"], relaxed["regressions"]) == (0, [])
    assert by_key(relaxed)["nc1_cdnv_unbiased"]["status"] == "unchecked"


def test_canary_at_a_tenth_of_the_traffic_passes(stack: LiveStack) -> None:
    """The same model on a tenth of the samples: the plug-in CDNV reads less collapse (fewer
    samples per class), the volume-robust one, which the gate judges, does not move."""
    stack.serve("stable", 1.0)
    stack.serve("canary", 1.0, rows=ROWS // 10)
    doc = stack.compare_json("stable", "canary")
    assert (doc["exit_code"], doc["regressions"]) == (0, [])
    got = by_key(doc)
    assert got["nc1_cdnv"]["relative_change"] < -0.1
    assert abs(got["nc1_cdnv_unbiased"]["relative_change"]) < 0.1
    assert got["nc1_cdnv_unbiased"]["status"] == "ok"
    assert any("sample counts differ 10.0x" in note for note in doc["notes"])


def test_other_width_compares_only_what_is_comparable(stack: LiveStack) -> None:
    stack.serve("stable", 1.0)
    stack.serve("wide", 1.0)
    doc = stack.compare_json("stable", "wide")
    assert doc["comparable"] == {
        "vocabulary": True,
        "width": False,
        "not_comparable": ["effective_rank", "nc1_trace_ratio"],
    }
    got = by_key(doc)
    assert got["effective_rank"]["status"] == "not_comparable"
    assert got["effective_rank"]["difference"] is None
    assert "effective_rank" not in doc["regressions"]
    ranks = (got["effective_rank"]["reference"], got["effective_rank"]["candidate"])
    per_dim = got["effective_rank_per_dim"]
    assert (per_dim["reference"], per_dim["candidate"]) == pytest.approx(
        (ranks[0] / DIM, ranks[1] / WIDE), rel=1e-12
    )
    assert per_dim["status"] == "unchecked"
    assert got["nc1_cdnv_unbiased"]["status"] in ("ok", "not_significant")
    assert {d["status"] for d in doc["drift"]} == {"not_comparable"}
    assert any("widths differ (8 vs 12)" in note for note in doc["notes"])
    code, out, _ = stack.compare("stable", "wide")
    assert code == 0
    assert "not comparable" in out
    assert "widths differ" in out


def test_other_vocabulary_compares_only_what_is_comparable(stack: LiveStack) -> None:
    stack.serve("stable", 1.0)
    stack.serve("big", 1.0)
    doc = stack.compare_json("stable", "big")
    assert (doc["reference"]["vocab_size"], doc["candidate"]["vocab_size"]) == (VOCAB, 60)
    assert doc["comparable"] == {"vocabulary": False, "width": True,
                                 "not_comparable": ["class_count"]}  # fmt: skip
    got = by_key(doc)
    assert got["class_count"]["status"] == "not_comparable"
    assert got["class_count"]["difference"] is None
    assert got["effective_rank"]["status"] in ("ok", "not_significant")  # same width: judged
    assert got["nc1_cdnv_unbiased"]["status"] in ("ok", "not_significant")
    assert (doc["exit_code"], doc["regressions"]) == (0, [])
    assert {d["status"] for d in doc["drift"]} == {"not_comparable"}
    assert any("vocabularies differ (40 vs 60)" in note for note in doc["notes"])
    code, out, _ = stack.compare("stable", "big", "--format", "table")
    assert code == 0
    assert "not comparable" in out
    assert "vocabularies differ" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stable", "nobody"], "model 'nobody' is not declared"),
        (["stable", "idle"], "no snapshot of idle's 1m window yet"),
        (["stable", "empty"], "empty's 1m snapshot is not ok: no samples in the window yet"),
        (["stable", "canary", "--window", "2h"], "window '2h' is not configured"),
        (["stable", "stable"], "both name 'stable'"),
        (["stable", "canary", "--max-age", "0.001"], "s old (the limit is 0 s)"),
    ],
    ids=["unknown-model", "no-snapshot", "not-ok", "unknown-window", "same-model", "stale"],
)
def test_bad_input_is_one_line_with_exit_2(stack: LiveStack, args: list[str], message: str) -> None:
    stack.serve("stable", 1.0)
    stack.serve("canary", 1.0)
    assert not stack.evaluator.evaluate_model("empty", now=time.time())[0].ok
    time.sleep(0.01)  # the stale case: both snapshots older than 1 ms
    code, out, err = stack.compare(*args)
    assert code == 2, (out, err)
    assert out == ""
    assert err.startswith("error: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1
