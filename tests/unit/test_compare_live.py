"""`compare --live`: the comparison of two models' snapshots, without Redis.

The interval arithmetic is checked against numbers worked out by hand from the inputs; the
verdict on either side of the tolerance and of significance; models of another width or
vocabulary; the refusals of bad snapshots (absent, not ok, stale, unreadable) through an
embedded runtime; and the CLI's separation of the live and offline modes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from monitor.cli import app
from monitor.config import Settings
from monitor.errors import InvalidInput
from monitor.offline.compare_live import compare_live, compare_snapshots
from monitor.offline.live_verdict import LiveStatus, difference_interval, judge_live, z_for
from monitor.offline.tolerances import (
    LIVE_DEFAULT_RELATIVE,
    Tolerances,
    load_live_tolerances,
)
from monitor.pipeline.registry import ModelShape
from monitor.pipeline.runtime import Runtime
from monitor.snapshot import Snapshot

TOL = Tolerances(relative={"nc1_cdnv_unbiased": 0.25, "effective_rank": 0.2}, absolute={})
NOW = 1_800_000_000.0


# --------------------------------------------------------------------------- the interval
def test_interval_of_a_difference_by_hand() -> None:
    # d = 1.3 - 1.0 = 0.3; se = sqrt(0.1^2 + 0.2^2) = sqrt(0.05) = 0.2236068;
    # half-width 1.96 * 0.2236068 = 0.4382693: [-0.1382693, 0.7382693], z = 1.3416408.
    iv = difference_interval(0.3, 0.1, 0.2, 1.96)
    assert iv is not None
    assert iv.stderr == pytest.approx(0.2236068, abs=1e-7)
    assert (iv.low, iv.high) == pytest.approx((-0.1382693, 0.7382693), abs=1e-7)
    assert iv.z_score == pytest.approx(1.3416408, abs=1e-7)
    assert iv.significant is False
    # se = sqrt(0.03^2 + 0.04^2) = 0.05: z = 6, [0.202, 0.398].
    iv = difference_interval(0.3, 0.03, 0.04, 1.96)
    assert iv is not None
    assert (iv.stderr, iv.z_score) == pytest.approx((0.05, 6.0))
    assert (iv.low, iv.high) == pytest.approx((0.202, 0.398))
    assert iv.significant is True
    # Exactly at the bound: |z| = z counts as significant (the interval touches zero).
    edge = difference_interval(-0.098, 0.03, 0.04, 1.96)
    assert edge is not None
    assert edge.significant is True
    assert edge.high == pytest.approx(0.0, abs=1e-12)
    # Without an error on both sides there is no interval; two exact values differ for real.
    assert difference_interval(0.3, None, 0.1, 1.96) is None
    assert difference_interval(0.3, 0.1, None, 1.96) is None
    exact = difference_interval(0.3, 0.0, 0.0, 1.96)
    assert exact is not None
    assert (exact.z_score, exact.significant, exact.low, exact.high) == (None, True, 0.3, 0.3)
    same = difference_interval(0.0, 0.0, 0.0, 1.96)
    assert same is not None
    assert same.significant is False


def test_z_of_a_confidence() -> None:
    assert z_for(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert z_for(0.9999) == pytest.approx(3.890592, abs=1e-6)
    for bad in (0.0, 1.0, 95.0, -0.5):
        with pytest.raises(InvalidInput, match="--confidence must be in"):
            z_for(bad)


# --------------------------------------------------------------------------- the verdict
def status(ref: float | None, cand: float | None, se: float | None, key: str = "nc1_cdnv_unbiased",
           z: float = 1.96) -> LiveStatus:  # fmt: skip
    return judge_live(key, ref, cand, se, se, TOL, z).status


def test_regressed_needs_the_tolerance_and_significance() -> None:
    # +30% > +25% with se 0.05 on each side: z = 0.3 / 0.0707 = 4.24 -> regressed.
    assert status(1.0, 1.3, 0.05) is LiveStatus.regressed
    # The same move with se 0.2 on each side: z = 0.3 / 0.283 = 1.06 -> noise.
    assert status(1.0, 1.3, 0.2) is LiveStatus.not_significant
    # +20% is within the tolerance however significant (se 0.001: z = 141).
    assert status(1.0, 1.2, 0.001) is LiveStatus.ok
    # No traffic stderr: beyond the tolerance cannot be shown significant ...
    assert status(1.0, 1.3, None) is LiveStatus.no_interval
    # ... unless --z 0 turns significance off; then the tolerance alone decides.
    assert status(1.0, 1.3, None, z=0) is LiveStatus.regressed
    assert status(1.0, 1.2, None, z=0) is LiveStatus.ok
    # Improvements never fail, however significant.
    assert status(1.0, 0.5, 0.001) is LiveStatus.ok
    # Effective rank: falling is bad. 10 -> 7.9 is -21%; se 0.1 each: z = -14.8.
    assert status(10.0, 7.9, 0.1, "effective_rank") is LiveStatus.regressed
    assert status(10.0, 7.9, 1.0, "effective_rank") is LiveStatus.not_significant
    assert status(10.0, 8.1, 0.01, "effective_rank") is LiveStatus.ok
    assert status(10.0, 13.0, 0.01, "effective_rank") is LiveStatus.ok
    # A side without a value: skipped, never a regression (a window without NC4 counts).
    assert status(1.0, None, 0.05) is LiveStatus.skipped
    assert status(None, 1.3, 0.05) is LiveStatus.skipped
    # No tolerance: unchecked, the interval still reported.
    free = judge_live("nc1_cdnv2", 1.0, 3.0, 0.1, 0.1, TOL, 1.96)
    assert free.status is LiveStatus.unchecked
    assert free.interval is not None
    assert free.interval.significant is True


def test_entry_fields_match_the_inputs() -> None:
    m = judge_live("nc1_cdnv_unbiased", 0.8, 1.1, 0.03, 0.04, TOL, 1.96)
    doc = m.as_dict()
    # d = 0.3, relative 0.3 / 0.8 = 0.375, se 0.05, [0.202, 0.398], z 6.
    assert doc["difference"] == pytest.approx(0.3)
    assert doc["relative_change"] == pytest.approx(0.375)
    assert (doc["reference_stderr"], doc["candidate_stderr"]) == (0.03, 0.04)
    assert (doc["stderr"], doc["ci_low"], doc["ci_high"], doc["z_score"]) == pytest.approx(
        (0.05, 0.202, 0.398, 6.0)
    )
    assert (doc["significant"], doc["status"], doc["bad_direction"], doc["tolerance"]) == (
        True, "regressed", "increase", 0.25)  # fmt: skip
    off = judge_live("effective_rank", 8.0, 4.0, 0.1, 0.1, TOL, 1.96, comparable=False)
    assert off.status is LiveStatus.not_comparable
    assert (off.difference, off.relative_change, off.interval) == (None, None, None)
    assert (off.reference, off.candidate) == (8.0, 4.0)


# --------------------------------------------------------------------------- snapshots
def snapshot(model: str, metrics: dict[str, float | int | None], **extra: Any) -> Snapshot:
    fields: dict[str, Any] = {
        "model": model, "window": "1h", "window_seconds": 3600, "timestamp": NOW - 30,
        "status": "ok", "reason": None, "duration_seconds": 0.1, "sample_count": 5000,
        "class_count": 100, "metrics": metrics,
    }  # fmt: skip
    fields.update(extra)
    return Snapshot(**fields)


REF = {"nc1_cdnv_unbiased": 0.5, "nc1_cdnv_unbiased_traffic_stderr": 0.02, "nc1_cdnv": 0.4,
       "effective_rank": 12.0, "effective_rank_traffic_stderr": 0.3, "nc1_trace_ratio": 0.1,
       "nc4_ncc_agreement": 0.6, "nc4_ncc_agreement_traffic_stderr": 0.01, "class_count": 100,
       "sample_count": 5000, "drift_mmd": 0.001}  # fmt: skip
SHAPE = ModelShape("stable", 1000, 64, True)


def shape(name: str, vocab: int = 1000, dim: int = 64) -> ModelShape:
    return ModelShape(name, vocab, dim, True)


def test_collapsed_candidate_regresses_on_the_robust_cdnv_only() -> None:
    # CDNV 0.5 -> 0.8 (+60%): d = 0.3, se = sqrt(0.02^2 + 0.05^2) = 0.0538516, z = 5.5709;
    # the plug-in nc1_cdnv moves more (+100%) but has no tolerance by default.
    cand = {**REF, "nc1_cdnv_unbiased": 0.8, "nc1_cdnv_unbiased_traffic_stderr": 0.05,
            "nc1_cdnv": 0.8, "effective_rank": 11.0}  # fmt: skip
    tol = load_live_tolerances(None)
    result = compare_snapshots(
        snapshot("stable", REF), snapshot("canary", cand, sample_count=400),
        (shape("stable"), shape("canary")), tol, 1.96, NOW,
    )  # fmt: skip
    got = {m.key: m for m in result.metrics}
    cdnv = got["nc1_cdnv_unbiased"]
    assert cdnv.status is LiveStatus.regressed
    assert cdnv.interval is not None
    assert cdnv.interval.stderr == pytest.approx(0.0538516, abs=1e-7)
    assert cdnv.interval.z_score == pytest.approx(5.5708601, abs=1e-6)
    assert cdnv.interval.low == pytest.approx(0.3 - 1.96 * 0.0538516, abs=1e-6)
    assert got["nc1_cdnv"].status is LiveStatus.unchecked
    assert got["effective_rank"].status is LiveStatus.ok  # -8.3%: within -20%
    assert result.regressions == ["nc1_cdnv_unbiased"]
    assert int(result.exit_code) == 3
    doc = json.loads(result.to_json())
    assert doc["regressions"] == ["nc1_cdnv_unbiased"]
    assert (doc["passed"], doc["exit_code"], doc["mode"], doc["window"]) == (False, 3, "live", "1h")
    assert doc["confidence"] == pytest.approx(0.950004, abs=1e-6)
    assert doc["tolerances"] == {"relative": LIVE_DEFAULT_RELATIVE, "absolute": {}}
    assert doc["reference"] == {"kind": "live", "name": "stable", "window": "1h",
                                "timestamp": NOW - 30, "age_seconds": 30.0, "sample_count": 5000,
                                "class_count": 100, "dim": 64, "vocab_size": 1000,
                                "baseline": None}  # fmt: skip
    assert doc["comparable"] == {"vocabulary": True, "width": True, "not_comparable": []}
    assert any("12.5x" in note and "nc1_cdnv" in note for note in doc["notes"])
    drift = {d["key"]: d for d in doc["drift"]}
    assert drift["drift_mmd"] == {"key": "drift_mmd", "reference": 0.001, "candidate": 0.001,
                                  "status": "unchecked"}  # fmt: skip
    # The same two snapshots with the candidate's stderr four times larger: noise.
    noisy = {**cand, "nc1_cdnv_unbiased_traffic_stderr": 0.2}
    again = compare_snapshots(
        snapshot("stable", REF), snapshot("canary", noisy), (SHAPE, SHAPE), tol, 1.96, NOW
    )
    assert again.regressions == []
    assert any("within the noise" in note for note in again.notes)


def test_other_width_and_vocabulary_are_compared_on_what_is_comparable() -> None:
    cand = {**REF, "effective_rank": 20.0}
    result = compare_snapshots(
        snapshot("stable", REF), snapshot("wide", cand),
        (shape("stable", 1000, 64), shape("wide", 2000, 128)), load_live_tolerances(None),
    )  # fmt: skip
    doc = result.as_dict()
    assert doc["comparable"] == {
        "vocabulary": False,
        "width": False,
        "not_comparable": ["effective_rank", "nc1_trace_ratio", "class_count"],
    }
    got = {m["key"]: m for m in doc["metrics"]}
    for key in ("effective_rank", "nc1_trace_ratio", "class_count"):
        assert got[key]["status"] == "not_comparable"
        assert got[key]["difference"] is None
    per_dim = got["effective_rank_per_dim"]
    assert (per_dim["reference"], per_dim["candidate"], per_dim["status"]) == (
        12.0 / 64, 20.0 / 128, "unchecked")  # fmt: skip
    assert got["nc1_cdnv_unbiased"]["status"] == "ok"  # scalar collapse metrics stay comparable
    assert got["nc1_cdnv_unbiased"]["difference"] == 0.0
    assert {d["status"] for d in doc["drift"]} == {"not_comparable"}
    notes = " ".join(doc["notes"])
    assert "vocabularies differ (1000 vs 2000)" in notes
    assert "widths differ (64 vs 128)" in notes
    # A size that cannot be read: everything that depends on one is left out.
    unknown = compare_snapshots(
        snapshot("stable", REF), snapshot("hub", REF), (SHAPE, None), load_live_tolerances(None)
    )
    assert unknown.comparability.not_comparable == (
        "effective_rank", "nc1_trace_ratio", "class_count")  # fmt: skip
    assert unknown.candidate.dim is None
    assert any("width of hub are unknown" in note for note in unknown.notes)


# --------------------------------------------------------------------------- reading
def runtime_with(*snapshots: Snapshot) -> Runtime:
    models = [{"name": n, "vocab_size": 1000, "dim": 64} for n in ("stable", "canary")]
    settings = Settings(models=models, windows={"1h": 3600}, evaluation_interval=60)  # type: ignore[arg-type]
    runtime = Runtime(settings)
    for snap in snapshots:
        runtime.store.put_snapshot(snap.model, snap.window, snap.to_json(), history=4)
    return runtime


def test_bad_snapshots_are_refused() -> None:
    tol = load_live_tolerances(None)
    ok = runtime_with(snapshot("stable", REF), snapshot("canary", REF))
    result = compare_live(ok, "stable", "canary", "1h", tol, now=NOW)
    assert result.regressions == []
    assert (result.reference.age_seconds, result.candidate.dim) == (30.0, 64)
    cases = [
        (ok, ("stable", "nobody", "1h"), "model 'nobody' is not declared"),
        (ok, ("stable", "stable", "1h"), "both name 'stable'"),
        (ok, ("stable", "canary", "2h"), "window '2h' is not configured"),
        (runtime_with(snapshot("stable", REF)), ("stable", "canary", "1h"),
         "no snapshot of canary's 1h window yet"),
        (runtime_with(snapshot("stable", REF), snapshot("canary", {}, status="insufficient_data",
                                                        reason="1 class(es)")),
         ("stable", "canary", "1h"), "canary's 1h snapshot is not ok: 1 class(es)"),
        # 3 evaluation intervals of 60 s: a snapshot 200 s old is stale.
        (runtime_with(snapshot("stable", REF, timestamp=NOW - 200), snapshot("canary", REF)),
         ("stable", "canary", "1h"), "stable's 1h snapshot is 200 s old (the limit is 180 s)"),
    ]  # fmt: skip
    for runtime, args, message in cases:
        with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
            compare_live(runtime, *args, tol, now=NOW)
    # --max-age moves the limit.
    old = runtime_with(snapshot("stable", REF, timestamp=NOW - 200), snapshot("canary", REF))
    assert compare_live(old, "stable", "canary", "1h", tol, max_age=300, now=NOW).exit_code == 0
    broken = runtime_with(snapshot("stable", REF))
    broken.store.put_snapshot("canary", "1h", '{"v": 99}', history=4)
    with pytest.raises(InvalidInput, match="canary's 1h snapshot: unsupported snapshot version"):
        compare_live(broken, "stable", "canary", "1h", tol, now=NOW)


# --------------------------------------------------------------------------- tolerances
def test_live_tolerances(tmp_path: Path) -> None:
    assert load_live_tolerances(None) == Tolerances(dict(LIVE_DEFAULT_RELATIVE), {})
    assert "nc1_cdnv" not in LIVE_DEFAULT_RELATIVE  # the plug-in CDNV moves with volume
    path = tmp_path / "tol.yaml"
    path.write_text("nc1_cdnv_unbiased: 0.1\neffective_rank: null\nanisotropy_mean_cos: 0.5\n")
    tol = load_live_tolerances(path)
    assert tol.relative == {"nc1_cdnv_unbiased": 0.1, "nc4_ncc_agreement": 0.1,
                            "nc2_equiangularity_std": 0.25, "anisotropy_mean_cos": 0.5}  # fmt: skip
    path.write_text("drift_mmd: 0.1\n")
    with pytest.raises(InvalidInput, match="drift_mmd: drift keys are not compared"):
        load_live_tolerances(path)
    path.write_text("nc1_cdnv_unbaised: 0.1\n")
    with pytest.raises(InvalidInput, match="unknown or untolerable metric key 'nc1_cdnv_unbaised'"):
        load_live_tolerances(path)


# --------------------------------------------------------------------------- the command
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--live", "--corpus", "x.txt"], "--corpus: not used with --live"),
        (["--live", "--reference-model", "a", "--candidate-model", "b", "--candidate", "m"],
         "--candidate: not used with --live"),
        (["--reference-model", "a", "--candidate", "m", "--corpus", "x"],
         "--reference-model: only with --live"),
        (["--window", "1h", "--candidate", "m", "--corpus", "x"], "--window: only with --live"),
        (["--live"], "--live needs --reference-model and --candidate-model"),
        (["--live", "--reference-model", "a", "--candidate-model", "b", "--z", "1",
          "--confidence", "0.9"], "give --z or --confidence, not both"),
        (["--live", "--reference-model", "a", "--candidate-model", "b"],
         "needs COLLAPSE_REDIS_URL"),
        (["--candidate", "m"], "exactly one of --reference, --reference-baseline"),
        (["--reference", "m"], "give --candidate and --corpus (or --live"),
    ],
    ids=["live-corpus", "live-candidate", "model-offline", "window-offline", "live-alone",
         "z-and-confidence", "no-redis", "offline-reference", "offline-no-corpus"],
)  # fmt: skip
def test_modes_do_not_mix(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["compare", *args], env={"COLLAPSE_REDIS_URL": None})
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_live_table(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from monitor.cli.compare import _print_live_table

    monkeypatch.setenv("COLUMNS", "200")
    cand = {**REF, "nc1_cdnv_unbiased": 0.8, "nc1_cdnv_unbiased_traffic_stderr": 0.05}
    result = compare_snapshots(
        snapshot("stable", REF), snapshot("canary", cand), (SHAPE, SHAPE),
        load_live_tolerances(None), 1.96, NOW,
    )  # fmt: skip
    _print_live_table(result)
    out = capsys.readouterr().out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    # +0.3 [0.3 - 1.96 * 0.0538516, 0.3 + 1.96 * 0.0538516] = [+0.1945, +0.4055].
    assert "+0.3" in lines["nc1_cdnv_unbiased"]
    assert "[+0.1945, +0.4055]" in lines["nc1_cdnv_unbiased"]
    assert "regressed" in lines["nc1_cdnv_unbiased"]
    assert "no interval" in lines["nc1_cdnv"]
    assert "drift_mmd" in lines  # a value on either side: shown
    assert "drift_label_js" not in lines  # null on both: left out of the table
    assert "95% CI" in out
    assert out.strip().splitlines()[-1] == "REGRESSION: nc1_cdnv_unbiased"
    assert math.isclose(result.z, 1.96)
