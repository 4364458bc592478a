"""The evaluator on the embedded store: snapshots, insufficient data, drift and custom metrics."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from monitor.config import Settings
from monitor.evaluate.evaluator import Evaluator
from monitor.metrics import compute_metrics
from monitor.pipeline.baselines import pin_window
from monitor.pipeline.nc4_means import load_nc4_means
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model
from monitor.snapshot import Snapshot
from monitor.stats import CollapseStats

VOCAB, DIM = 40, 8


@pytest.fixture
def head(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(7)
    weight = rng.normal(size=(VOCAB, DIM))
    path = tmp_path / "head.npy"
    np.save(path, weight)
    return path, weight


def make_runtime(head_path: Path, **extra: object) -> Runtime:
    model = {"name": "m", "vocab_size": VOCAB, "dim": DIM, "classifier_path": str(head_path)}
    return Runtime(Settings(models=[model], **extra))  # type: ignore[arg-type]


def traffic(seed: int, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).normal(size=(VOCAB, DIM)) * 3
    y = rng.integers(0, VOCAB, n)
    x = means[y] + rng.normal(size=(n, DIM)) + shift
    return x.astype(np.float32), y


def feed(
    runtime: Runtime,
    data: list[tuple[np.ndarray, np.ndarray]],
    prefix: str,
    ages: list[float] | None = None,
) -> None:
    """Ingest batches `ages` seconds old (default: a minute) and compact them."""
    now = time.time()
    for i, (x, y) in enumerate(data):
        age = 60.0 if ages is None else ages[i]
        payload = encode_batch("m", x, y, batch_id=f"{prefix}{i}", ts=now - age)
        runtime.ingestor.ingest(payload)
    compact_model(runtime.store, "m")


def test_no_data_gives_insufficient_data_never_zeros(head: tuple[Path, np.ndarray]) -> None:
    runtime = make_runtime(head[0])
    snapshots = Evaluator(runtime).evaluate_model("m")
    assert [s.window for s in snapshots] == ["15m", "1h", "24h"]
    for s in snapshots:
        assert s.status == "insufficient_data"
        assert s.reason
        assert all(v is None for k, v in s.metrics.items() if k != "sample_count")
        stored = runtime.store.snapshot("m", s.window)
        assert stored is not None
        assert Snapshot.from_json(stored) == s


def test_one_class_is_insufficient_with_a_reason(head: tuple[Path, np.ndarray]) -> None:
    runtime = make_runtime(head[0])
    feed(runtime, [(np.ones((5, DIM), np.float32), np.full(5, 3))], "one")
    snapshot = Evaluator(runtime).evaluate_model("m")[0]
    assert snapshot.status == "insufficient_data"
    assert "need 2" in (snapshot.reason or "")
    assert snapshot.sample_count == 5
    assert snapshot.metrics.get("nc1_cdnv") is None


def test_snapshot_holds_the_window_metrics(head: tuple[Path, np.ndarray]) -> None:
    runtime = make_runtime(head[0])
    data = [traffic(s, 300) for s in range(4)]
    feed(runtime, data, "b")
    snapshots = Evaluator(runtime).evaluate_model("m")
    reference = CollapseStats(VOCAB, DIM)
    for x, y in data:
        reference.update(x, y)
    expected = compute_metrics(reference, head[1]).as_dict()
    for s in snapshots:
        assert s.ok
        assert s.sample_count == 1200
        for key in ("nc1_cdnv", "nc2_equiangularity_std", "nc3_duality_mean_cos"):
            assert s.metrics[key] == pytest.approx(expected[key], rel=1e-9)
        assert s.metrics["nc4_ncc_agreement"] is None  # features carried no NC4 counts
        assert s.baseline is None
        assert "drift_mmd" not in s.metrics
    assert load_nc4_means(runtime.store, "m") is not None  # class means published for NC4
    assert len(runtime.store.history("m", "1h", 10)) == 1


def test_drift_against_a_pinned_baseline(head: tuple[Path, np.ndarray]) -> None:
    runtime = make_runtime(head[0])
    # Baseline traffic 20 to 45 minutes old: six fine buckets in the 1h window, none in 15m.
    ages = [1200.0 + 300 * i for i in range(6)]
    feed(runtime, [traffic(s, 400) for s in range(6)], "base", ages)
    pin_window(runtime.store, runtime.registry, "m", "ref", "1h", 3600)
    evaluator = Evaluator(runtime)
    same = {s.window: s for s in evaluator.evaluate_model("m")}["1h"]
    assert same.baseline is not None
    assert same.baseline["name"] == "ref"  # the window is the baseline itself
    assert same.metrics["drift_label_js"] == pytest.approx(0.0, abs=1e-12)
    assert same.metrics["drift_mean_shift"] == pytest.approx(0.0, abs=1e-12)
    assert same.metrics["drift_nc1_cdnv_ratio"] == pytest.approx(1.0, rel=1e-9)

    feed(runtime, [traffic(100 + s, 400, shift=1.5) for s in range(2)], "shifted")
    moved = {s.window: s for s in evaluator.evaluate_model("m")}["15m"]
    mmd, threshold = moved.metrics["drift_mmd"], moved.metrics["drift_mmd_threshold"]
    assert mmd is not None
    assert threshold is not None
    assert mmd > threshold
    assert moved.metrics["drift_mean_shift"] is not None
    assert moved.metrics["drift_mean_shift"] > 0.1
    assert 0 < len(moved.top_drift) <= 20
    assert moved.top_drift[0].token.startswith("#")


@pytest.fixture
def plugin_package(tmp_path: Path) -> Iterator[None]:
    """A tiny installed package that registers a metric through the entry-point group."""
    root = tmp_path / "site"
    (root / "collapse_plugin_demo").mkdir(parents=True)
    (root / "collapse_plugin_demo" / "__init__.py").write_text(
        "def touched(stats, classifier):\n    return float(stats.touched_classes)\n"
    )
    info = root / "collapse_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: collapse-plugin-demo\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[collapse_monitor.metrics]\ntouched_classes_demo = collapse_plugin_demo:touched\n"
    )
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("collapse_plugin_demo", None)


def test_custom_metrics_from_entry_points_and_settings(
    head: tuple[Path, np.ndarray], plugin_package: None, tmp_path: Path
) -> None:
    module = tmp_path / "site" / "my_metrics.py"
    module.write_text(
        "def spread(stats, classifier):\n"
        "    mean = stats.sample_count / stats.touched_classes\n"
        "    return {'mean_count': mean, 'bad': float('nan')}\n"
    )
    runtime = make_runtime(head[0], custom_metrics=["my_metrics:spread"])
    data = [traffic(1, 500)]
    feed(runtime, data, "c")
    snapshot = Evaluator(runtime).evaluate_model("m")[0]
    touched = len(np.unique(data[0][1]))
    assert snapshot.metrics["touched_classes_demo"] == touched
    assert snapshot.metrics["mean_count"] == pytest.approx(500 / touched)
    assert snapshot.metrics["bad"] is None
    assert json.loads(snapshot.to_json())["metrics"]["touched_classes_demo"] == touched


@pytest.mark.parametrize(
    ("settings", "withheld"),
    [
        ({"drift_max_mean_noise": 1e9, "drift_min_samples_per_dim": 0.0}, set()),
        (
            {"drift_max_mean_noise": 1e-12, "drift_min_samples_per_dim": 0.0},
            {"nc2_equiangularity_std"},
        ),
        ({"drift_max_mean_noise": 1e9, "drift_min_samples_per_dim": 1e9}, {"effective_rank"}),
    ],
)
def test_drift_guard_settings_reach_the_ratios(
    head: tuple[Path, np.ndarray], settings: dict[str, float], withheld: set[str]
) -> None:
    """The evaluator passes the volume guards' settings to the drift ratios: a guarded ratio is
    withheld exactly when its guard's setting says so (the window is its own baseline, so every
    ratio that is computed is 1)."""
    model = {"name": "m", "vocab_size": VOCAB, "dim": DIM, "classifier_path": str(head[0])}
    runtime = Runtime(Settings(models=[{**model, "second_moment": True}], **settings))  # type: ignore[arg-type]
    feed(runtime, [traffic(s, 400) for s in range(6)], "base", [1200.0 + 300 * i for i in range(6)])
    pin_window(runtime.store, runtime.registry, "m", "ref", "1h", 3600)
    snap = {s.window: s for s in Evaluator(runtime).evaluate_model("m")}["1h"]
    for key in ("nc1_cdnv", "nc2_equiangularity_std", "effective_rank"):
        ratio = snap.metrics.get(f"drift_{key}_ratio")
        if key in withheld:
            assert ratio is None, key
        else:
            assert ratio == pytest.approx(1.0, rel=1e-9), key
