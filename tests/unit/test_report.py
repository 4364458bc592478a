"""`monitor.report`: data building, the PCA of class means, alert periods and the HTML page.

References are computed here independently: class means straight from the raw samples with
numpy, principal axes from numpy's eigendecomposition of the covariance (float64), alert
periods from the construction of the series, PNG content by decoding the files.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from monitor.alerts.thresholds import AbsoluteBound, AlertingSettings, DriftBound
from monitor.errors import InvalidInput
from monitor.report import AlertPeriod, ReportData, ReportFiles, write_report
from monitor.report.figures import LINE_COLOR, SEVERITY_COLOR
from monitor.report.pca import drift_ranking, project_means
from monitor.report.periods import alert_periods
from monitor.report.sources import from_json
from monitor.snapshot import Snapshot, TopDrift
from monitor.stats import CollapseStats

T0 = 1_764_140_000.0


def rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)])


def color_pixels(image: np.ndarray, hex_color: str, tol: float = 0.02) -> int:
    """Pixels within `tol` of a colour (RGB channels, alpha ignored)."""
    return int((np.abs(image[..., :3] - rgb(hex_color)).max(axis=-1) < tol).sum())


def snap(i: int, metrics: dict[str, float | int | None], **kw: object) -> Snapshot:
    base: dict[str, object] = {
        "model": "m", "window": "1h", "window_seconds": 3600, "timestamp": T0 + 60 * i,
        "status": "ok", "reason": None, "duration_seconds": 0.1, "sample_count": 500,
        "class_count": 20, "metrics": metrics,
    }  # fmt: skip
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def samples(seed: int, means: np.ndarray, n: int, shift: dict[int, np.ndarray] | None = None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, means.shape[0], n)
    x = means[y] + rng.normal(size=(n, means.shape[1]))
    for c, delta in (shift or {}).items():
        x[y == c] += delta
    return x, y


def stats_of(x: np.ndarray, y: np.ndarray, vocab: int) -> CollapseStats:
    s = CollapseStats(vocab, x.shape[1])
    s.update(torch.tensor(x), torch.tensor(y))
    return s


def numpy_means(x: np.ndarray, y: np.ndarray, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([c for c in np.unique(y) if (y == c).sum() >= min_count])
    return ids, np.stack([x[y == c].mean(axis=0) for c in ids])


# ------------------------------------------------------------------------------------- PCA
# Fewer means than dimensions takes the Gram path, more takes the scatter-matrix path.
@pytest.mark.parametrize(
    ("d", "vocab", "min_count"), [(6, 12, 2), (16, 40, 5), (3, 9, 1), (64, 20, 2), (50, 25, 3)]
)
def test_pca_matches_independent_float64_eigendecomposition(
    d: int, vocab: int, min_count: int
) -> None:
    means = np.random.default_rng(d).normal(size=(vocab, d)) * 3
    xb, yb = samples(1, means, 40 * vocab)
    xc, yc = samples(2, means * 1.3, 25 * vocab, shift={0: np.full(d, 2.0)})
    got = project_means(stats_of(xb, yb, vocab), stats_of(xc, yc, vocab), min_count=min_count)
    assert got is not None
    b_ids, b_means = numpy_means(xb, yb, min_count)
    c_ids, c_means = numpy_means(xc, yc, min_count)
    np.testing.assert_array_equal(got.base_ids, b_ids)
    np.testing.assert_array_equal(got.current_ids, c_ids)
    union = np.concatenate([b_means, c_means]).astype(np.float64)
    centre = union.mean(axis=0)
    cov = (union - centre).T @ (union - centre)
    evals, evecs = np.linalg.eigh(cov)
    top = evecs[:, ::-1][:, :2]  # (d, 2), largest first
    want_b, want_c = (b_means - centre) @ top, (c_means - centre) @ top
    for k in range(2):  # eigenvectors are defined up to sign
        sign = np.sign(got.components[k] @ top[:, k])
        np.testing.assert_allclose(got.base_xy[:, k], sign * want_b[:, k], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got.current_xy[:, k], sign * want_c[:, k], rtol=1e-9, atol=1e-9)
    share = evals[::-1][:2] / evals.sum()
    np.testing.assert_allclose(got.explained, share, rtol=1e-9)
    for row in got.components:  # the sign convention makes reruns draw the same picture
        assert row[np.argmax(np.abs(row))] > 0


def test_pca_caps_each_set_at_its_most_frequent_classes() -> None:
    vocab, d = 30, 5
    means = np.random.default_rng(0).normal(size=(vocab, d))
    y = np.repeat(np.arange(vocab), np.arange(vocab) + 2)  # class c has c + 2 samples
    x = means[y] + np.random.default_rng(1).normal(size=(y.size, d))
    s = stats_of(x, y, vocab)
    got = project_means(s, s, min_count=2, max_classes=7)
    assert got is not None
    np.testing.assert_array_equal(got.base_ids, np.arange(vocab - 7, vocab))


@pytest.mark.parametrize("d", [4, 40])
def test_pca_of_means_on_one_line_still_has_a_plane(d: int) -> None:
    direction = np.random.default_rng(d).normal(size=d)
    y = np.repeat(np.arange(6), 3)
    x = np.outer(y.astype(np.float64), direction)  # identical samples per class, on one line
    s = stats_of(x, y, 6)
    got = project_means(s, s)
    assert got is not None
    np.testing.assert_allclose(got.components @ got.components.T, np.eye(2), atol=1e-12)
    cos = abs(got.components[0] @ direction) / np.linalg.norm(direction)
    assert cos == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(got.base_xy[:, 1], 0.0, atol=1e-9)
    assert got.explained == pytest.approx((1.0, 0.0), abs=1e-12)


def test_pca_needs_three_means() -> None:
    x = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    s = stats_of(x, np.array([0, 0, 1]), 2)  # class 1 has one sample: below min_count 2
    assert project_means(s, s, min_count=2) is None


def test_drift_ranking_finds_the_moved_classes_first() -> None:
    vocab, d = 25, 8
    means = np.random.default_rng(3).normal(size=(vocab, d)) * 4
    xb, yb = samples(4, means, 5000)
    moved = {7: -2 * means[7], 12: -1.5 * means[12]}  # flipped means: cosine distance near 2
    xc, yc = samples(5, means, 5000, shift=moved)
    ranking = drift_ranking(stats_of(xb, yb, vocab), stats_of(xc, yc, vocab), top=5)
    # Brute force: weight * (1 - cos) from numpy means of the raw samples.
    ids, bm = numpy_means(xb, yb, 2)
    _, cm = numpy_means(xc, yc, 2)
    cos = (bm * cm).sum(1) / np.linalg.norm(bm, axis=1) / np.linalg.norm(cm, axis=1)
    weight = np.array([(yc == c).sum() for c in ids])
    want = ids[np.argsort(-(weight * (1 - cos)), kind="stable")][:5]
    assert ranking == [int(c) for c in want]
    assert set(ranking[:2]) == {7, 12}


# --------------------------------------------------------------------------- alert periods
def bounded(for_: str) -> AlertingSettings:
    return AlertingSettings(
        absolute=[
            AbsoluteBound(
                alert="CollapseRankLow",
                metric="effective_rank",
                min=3.0,
                for_=for_,
                severity="critical",
            )
        ],
        relative=[],
        predictive=[],
        drift=[DriftBound(alert="CollapseDrift", for_=for_)],
    )


def test_alert_periods_follow_the_crossings() -> None:
    ranks = [5, 5, 2, 2, 2, 5, 2, 2]  # below 3 at snapshots 2-4 and 6-7
    snaps = [snap(i, {"effective_rank": r}) for i, r in enumerate(ranks)]
    got = alert_periods(snaps, bounded("0s"))
    assert got == [
        AlertPeriod("CollapseRankLow", T0 + 120, T0 + 300),
        AlertPeriod("CollapseRankLow", T0 + 360, None),
    ]


def test_alert_periods_honour_for_and_the_drift_factor() -> None:
    mmd = [0.0, 2.0, 2.0, 2.0, 2.0, 0.5]  # above threshold 1 at snapshots 1-4 (4 minutes)
    snaps = [snap(i, {"drift_mmd": v, "drift_mmd_threshold": 1.0}) for i, v in enumerate(mmd)]
    got = alert_periods(snaps, bounded("2m"))  # holds from T0+60, fires once 2 min have passed
    assert got == [AlertPeriod("CollapseDrift", T0 + 180, T0 + 300)]
    assert alert_periods(snaps, bounded("5m")) == []


def test_insufficient_snapshot_ends_an_alert() -> None:
    snaps = [snap(0, {"effective_rank": 1.0}), snap(1, {}, status="insufficient_data"),
             snap(2, {"effective_rank": 1.0})]  # fmt: skip
    got = alert_periods(snaps, bounded("0s"))
    assert got == [AlertPeriod("CollapseRankLow", T0, T0 + 60),
                   AlertPeriod("CollapseRankLow", T0 + 120, None)]  # fmt: skip


# ----------------------------------------------------------------------------- the page
def history(n: int) -> list[Snapshot]:
    out = []
    for i in range(n):
        r = 1.0 + max(0, i - n // 2) / max(n, 1)
        out.append(
            snap(
                i,
                {
                    "nc1_cdnv": 0.1 * r,
                    "nc1_cdnv_stderr": 0.004,
                    "nc2_equiangularity_std": 0.2 * r,
                    "nc3_duality_mean_cos": 0.3,
                    "nc4_ncc_agreement": 0.4 / r,
                    "effective_rank": 4.0 / r,
                    "anisotropy_mean_cos": 0.1,
                    "drift_mmd": 0.01 * r,
                    "drift_mmd_threshold": 0.012,
                    "drift_nc1_cdnv_ratio": r,
                    "sample_count": 500,
                    "class_count": 20,
                },
                baseline={"name": "launch"},
                top_drift=[
                    TopDrift(7, "<b>tok&", 30, 40, 0.9, 0.5),
                    TopDrift(12, " the", 20, 25, 0.4, 0.2),
                ],
            )
        )
    return out  # fmt: skip


def pinned_pair() -> tuple[CollapseStats, CollapseStats]:
    vocab, d = 25, 8
    means = np.random.default_rng(3).normal(size=(vocab, d)) * 4
    xb, yb = samples(4, means, 3000)
    xc, yc = samples(5, means, 3000, shift={7: -2 * means[7]})
    return stats_of(xb, yb, vocab), stats_of(xc, yc, vocab)


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


def check_self_contained(page: str, files: ReportFiles) -> None:
    assert not re.search(r"""(src|href)\s*=\s*['"]?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"https?://", page)  # not even in text: nothing to fetch or follow
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert re.findall(r"<img [^>]*src='([^']*)'", page) == [
        m for m in re.findall(r"<img [^>]*src='([^']*)'", page) if m.startswith("data:image/png")
    ]
    blobs = embedded_pngs(page)
    assert len(blobs) == len(files.pngs)
    assert sorted(blobs) == sorted(p.read_bytes() for p in files.pngs)


def decoded(blob: bytes) -> np.ndarray:
    image = imread(io.BytesIO(blob), format="png")
    assert image.ndim == 3
    assert image.shape[0] >= 200
    assert image.shape[1] >= 400
    assert float(image[..., :3].std()) > 0.02  # not a blank canvas
    return image


def test_full_report_is_self_contained_and_every_png_decodes(tmp_path: Path) -> None:
    base, cur = pinned_pair()
    alerting = bounded("0s")
    snaps = history(30)
    data = ReportData("m", "1h", snaps, alerting, alert_periods(snaps, alerting), base, cur)
    files = write_report(data, tmp_path / "out")
    page = files.html.read_text(encoding="utf-8")
    check_self_contained(page, files)
    names = sorted(p.name for p in files.pngs)
    assert names == sorted(["nc1.png", "nc2.png", "nc3.png", "nc4.png", "geometry.png",
                            "drift.png", "class_means_pca.png"])  # fmt: skip
    for path in files.pngs:
        image = decoded(path.read_bytes())
        if path.name != "class_means_pca.png":
            assert color_pixels(image, LINE_COLOR) > 200, path.name  # the metric line is there
    assert "&lt;b&gt;tok&amp;" in page
    assert "<b>tok" not in page
    assert "CollapseRankLow" in page
    assert "still firing" in page
    assert data.snapshots == snaps  # the caller's data is left as it was


def test_threshold_line_is_drawn_only_with_a_bound(tmp_path: Path) -> None:
    snaps = [snap(i, {"effective_rank": 4.0 + 0.1 * i}) for i in range(10)]
    write_report(ReportData("m", "1h", snaps, bounded("0s")), tmp_path / "a")
    without = write_report(ReportData("m", "1h", snaps), tmp_path / "b")
    red = SEVERITY_COLOR["critical"]  # CollapseRankLow is critical; no alert fires here
    with_px = color_pixels(imread(tmp_path / "a" / "geometry.png"), red)
    assert with_px > 300
    assert color_pixels(imread(tmp_path / "b" / "geometry.png"), red) == 0
    assert without.pngs == [tmp_path / "b" / "geometry.png"]


def test_empty_history_gives_a_page_with_a_note(tmp_path: Path) -> None:
    files = write_report(ReportData("m", "1h", []), tmp_path)
    page = files.html.read_text(encoding="utf-8")
    assert files.pngs == []
    assert "No snapshots of m (1h) yet" in page
    assert "No class statistics (baseline and window): the class-means projection" in page
    check_self_contained(page, files)


def test_single_snapshot_and_no_baseline(tmp_path: Path) -> None:
    _, current = pinned_pair()
    files = write_report(ReportData("m", "1h", history(1), current=current), tmp_path)
    page = files.html.read_text(encoding="utf-8")
    assert "class_means_pca.png" not in [p.name for p in files.pngs]
    assert "No baseline: the class-means projection (PCA) is skipped." in page
    for path in files.pngs:
        assert color_pixels(decoded(path.read_bytes()), LINE_COLOR) > 20  # the lone marker


def test_rewrite_removes_figures_that_no_longer_apply(tmp_path: Path) -> None:
    base, cur = pinned_pair()
    write_report(ReportData("m", "1h", history(5), baseline=base, current=cur), tmp_path)
    assert (tmp_path / "class_means_pca.png").exists()
    files = write_report(ReportData("m", "1h", history(5)), tmp_path)
    assert not (tmp_path / "class_means_pca.png").exists()
    assert sorted(tmp_path.iterdir()) == sorted([files.html, *files.pngs])


# ---------------------------------------------------------------------------- from JSON
def test_analyze_json_is_one_point(tmp_path: Path) -> None:
    path = tmp_path / "analyze.json"
    path.write_text(json.dumps({"nc1_cdnv": 0.2, "nc4_ncc_agreement": None, "sample_count": 9,
                                "class_count": 3, "exact_pairs": True}))  # fmt: skip
    data = from_json(path)
    assert (data.model, len(data.snapshots), data.x_labels) == ("analyze", 1, ["analyze.json"])
    assert data.snapshots[0].metrics == {"nc1_cdnv": 0.2, "nc4_ncc_agreement": None,
                                         "sample_count": 9, "class_count": 3}  # fmt: skip


def test_study_json_is_one_point_per_checkpoint(tmp_path: Path) -> None:
    rows = [{"checkpoint": f"step-{k}", "metrics": {"nc1_cdnv": 1.0 / (k + 1),
             "effective_rank": 2.0 + k}} for k in range(4)]  # fmt: skip
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"model": "tiny", "rows": rows}))
    data = from_json(path, alerting=bounded("1h"))
    assert data.model == "tiny"
    assert data.x_labels == ["step-0", "step-1", "step-2", "step-3"]
    assert [s.metrics["nc1_cdnv"] for s in data.snapshots] == [1.0, 0.5, 1 / 3, 0.25]
    # effective_rank < 3 only at step-0: `for` does not apply between checkpoints.
    assert data.alert_periods == [AlertPeriod("CollapseRankLow", 0.0, 1.0)]
    files = write_report(data, tmp_path / "out")
    page = files.html.read_text(encoding="utf-8")
    assert "step-0" in page
    assert "step-1" in page
    assert {p.name for p in files.pngs} == {"nc1.png", "geometry.png"}


def test_text_from_the_source_is_drawn_and_shown_literally(tmp_path: Path) -> None:
    """`$` would start matplotlib mathtext, `<` HTML: names from a file are neither."""
    path = tmp_path / "odd.json"
    doc = {"model": "m$\\frac{$ <x>", "rows": [{"name": "a$b^$", "nc1_cdnv": 1, "x$^$": 2}]}
    path.write_text(json.dumps(doc))
    data = from_json(path)
    base, cur = pinned_pair()
    data.baseline, data.current, data.token_names = base, cur, {7: "$\\frac{", 12: "\n"}
    files = write_report(data, tmp_path / "out")
    page = files.html.read_text(encoding="utf-8")
    assert "m$\\frac{$ &lt;x&gt;" in page
    assert {p.name for p in files.pngs} == {"nc1.png", "custom.png", "class_means_pca.png"}


def test_json_written_by_study_is_read(tmp_path: Path) -> None:
    """The file `study` writes (its own serialiser, not a hand-made imitation)."""
    from monitor.metrics import REPORT_KEYS
    from monitor.offline.study import CheckpointRow, StudyOptions, StudyResult
    from monitor.offline.study_output import write_study

    rows = [
        CheckpointRow(
            name=f"ckpt-{k}", path=f"/ckpt/{k}", parameters=1000 * (k + 1), n_embd=8,
            n_layer=k + 1, train_tokens=500, eval_tokens=100, val_loss=3.0 - 0.5 * k,
            metrics={**dict.fromkeys(REPORT_KEYS), "nc1_cdnv": 0.3 - 0.1 * k, "class_count": 9},
        )
        for k in range(3)
    ]  # fmt: skip
    write_study(StudyResult("train.txt", "val.txt", StudyOptions(), rows), tmp_path)
    data = from_json(tmp_path / "study.json")
    assert data.x_labels == ["ckpt-0", "ckpt-1", "ckpt-2"]
    assert [s.metrics["val_loss"] for s in data.snapshots] == [3.0, 2.5, 2.0]
    assert [s.metrics["nc1_cdnv"] for s in data.snapshots] == [0.3, 0.3 - 0.1, 0.3 - 0.2]
    assert "parameters" not in data.snapshots[0].metrics
    files = write_report(data, tmp_path / "out")
    assert {p.name for p in files.pngs} == {"nc1.png", "geometry.png", "custom.png"}


@pytest.mark.parametrize(
    "text", ["{", "[]", "[1, 2]", '"x"', '{"rows": [{"checkpoint": "a"}]}', '{"a": "b"}']
)
def test_malformed_json_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InvalidInput) as err:
        from_json(path)
    assert err.value.reason == "bad_json"


def run_report(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("COLLAPSE_")}
    return subprocess.run(
        [sys.executable, "-m", "monitor.cli", "report", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip


def test_cli_from_json_prints_the_paths(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    # Absolute bounds judge windows of at least 100 samples (the shipped min_samples).
    path.write_text(json.dumps({"nc1_cdnv": 0.2, "effective_rank": 1.5, "sample_count": 1000}))
    proc = run_report("--from-json", path, "--out", tmp_path / "out", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert Path(doc["html"]).is_file()
    assert doc["snapshots"] == 1
    assert sorted(Path(p).name for p in doc["pngs"]) == ["geometry.png", "nc1.png"]
    assert doc["firing"] == ["CollapseEffectiveRankLow"]  # default bound: min 2.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from-json", "{tmp}/missing.json"], "missing.json"),
        (["--from-json", "{tmp}/bad.json"], "not valid JSON"),
        (["--model", "m"], "COLLAPSE_REDIS_URL"),
        ([], "--model"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(
    tmp_path: Path,
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the console entry point in-process (a subprocess per case costs ~6 s)."""
    from monitor.cli import main

    for key in [k for k in __import__("os").environ if k.startswith("COLLAPSE_")]:
        monkeypatch.delenv(key)
    (tmp_path / "bad.json").write_text("{nope")
    argv = [*[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", ["collapse-monitor", "report", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert not (tmp_path / "out").exists()
