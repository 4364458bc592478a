"""What a core install (no torch) relies on, checked in this venv: imports stay light, lazy names
still resolve, and the numpy batch checks judge as the tensor checks do.

The fresh-venv install itself is tests/integration/test_core_venv.py (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.errors import InvalidInput
from monitor.lazy import missing_extra
from monitor.stats.checks import check_arrays
from monitor.stats.validation import check_batch

ROOT = Path(__file__).resolve().parents[2]
# What the exporter, the API, rules, dashboards and status import (issue 17: no torch there).
CORE_MODULES = (
    "monitor",
    "monitor.config",
    "monitor.cli",
    "monitor.exporter",
    "monitor.exporter.collector",
    "monitor.exporter.server",
    "monitor.api",
    "monitor.api.app",
    "monitor.alerts.rules",
    "monitor.cli.dashboards",
    "monitor.grafana.push",
    "monitor.pipeline.status",
    "monitor.pipeline.windows",
    "monitor.pipeline.runtime",
    "monitor.pipeline.ingest",
    "monitor.metrics",
    "monitor.metrics.keys",
    "monitor.metrics.catalogue",
    "monitor.metrics.report",
    "monitor.stats",
    "monitor.stats.fields",
)
HEAVY = ("torch", "transformers", "tokenizers", "matplotlib", "scipy")


def imported_after(code: str) -> list[str]:
    """Top-level packages in sys.modules after `code`, in a fresh interpreter."""
    report = "import sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    script = f"{code}\n{report}"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_core_modules_do_not_import_torch() -> None:
    loaded = imported_after("\n".join(f"import {m}" for m in CORE_MODULES))
    assert [m for m in HEAVY if m in loaded] == []


def test_help_imports_only_the_command_line_libraries() -> None:
    code = (
        "from monitor import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code"
    )
    loaded = imported_after(code)
    slow = (*HEAVY, "numpy", "pydantic", "redis", "celery", "fastapi", "uvicorn", "yaml")
    assert [m for m in slow if m in loaded] == []


def test_lazy_names_resolve_to_their_modules() -> None:
    import monitor
    import monitor.metrics
    import monitor.stats
    from monitor.metrics.engine import compute_metrics
    from monitor.stats.collapse_stats import CollapseStats
    from monitor.stats.rff import median_bandwidth

    assert monitor.CollapseStats is CollapseStats
    assert monitor.compute_metrics is compute_metrics
    assert monitor.metrics.compute_metrics is compute_metrics
    assert monitor.stats.median_bandwidth is median_bandwidth
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = monitor.nope  # type: ignore[attr-defined]
    # The old homes of the moved constants still answer.
    from monitor.metrics import drift, keys

    assert drift.DRIFT_KEYS is keys.DRIFT_KEYS


def test_celery_stays_in_the_worker_wing() -> None:
    """Importing the app factory, the client or the API reads no settings (an unparsable
    environment would raise) and loads no task; the client, the API and the exporter load
    Celery only to send (not in embedded mode, not at import); the evaluator never."""
    code = (
        "import os, sys\n"
        "os.environ['COLLAPSE_MODELS'] = 'not json'\n"
        "import monitor.worker.app, monitor.pipeline.client, monitor.api.app\n"
        "assert 'monitor.worker.tasks' not in sys.modules\n"
        "import monitor.evaluate.run, monitor.evaluate.evaluator"
    )
    evaluate_only = "import monitor.evaluate.run, monitor.evaluate.evaluator"
    senders = "import monitor.pipeline.client, monitor.api.app, monitor.exporter.server"
    assert "monitor" in imported_after(code)
    assert [m for m in ("celery", "kombu") if m in imported_after(evaluate_only)] == []
    assert "celery" not in imported_after(senders)


def test_missing_extra_names_the_extra() -> None:
    torch_missing = ModuleNotFoundError("No module named 'torch'", name="torch")
    assert "pip install 'collapse-monitor[worker]'" in (missing_extra(torch_missing) or "")
    plots = ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot")
    assert "collapse-monitor[report]" in (missing_extra(plots) or "")
    assert missing_extra(ModuleNotFoundError("x", name="something_else")) is None


def _bad_batches() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(reason, features, labels) for every refusal, with dim 4 and 10 classes."""
    good_x = np.ones((3, 4), dtype=np.float32)
    good_y = np.array([0, 1, 9], dtype=np.int64)
    nan = good_x.copy()
    nan[1, 2] = np.nan
    huge = good_x.astype(np.float64)
    huge[2, 0] = -1e39
    return [
        ("wrong_dtype", good_x.astype(np.int32), good_y),
        ("wrong_dtype", good_x, good_y.astype(np.float32)),
        ("wrong_dtype", good_x, good_y.astype(np.uint16)),
        ("wrong_dtype", good_x, good_y.astype(bool)),
        ("wrong_shape", good_x[None], good_y),
        ("wrong_shape", good_x, good_y[:, None]),
        ("wrong_dimension", good_x[:, :3], good_y),
        ("length_mismatch", good_x, good_y[:2]),
        ("empty_batch", good_x[:0], good_y[:0]),
        ("label_out_of_range", good_x, np.array([0, 10, 1], dtype=np.int64)),
        ("label_out_of_range", good_x, np.array([0, -1, 1], dtype=np.int8)),
        ("non_finite", nan, good_y),
        ("non_finite", nan.astype(np.float16), good_y),
        ("value_out_of_range", huge, good_y),
    ]


@pytest.mark.parametrize(("reason", "x", "y"), _bad_batches())
def test_numpy_and_tensor_checks_refuse_alike(reason: str, x: np.ndarray, y: np.ndarray) -> None:
    with pytest.raises(InvalidInput) as numpy_refusal:
        check_arrays(x, y, dim=4, num_classes=10)
    with pytest.raises(InvalidInput) as tensor_refusal:
        check_batch(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), dim=4, num_classes=10)
    assert numpy_refusal.value.reason == tensor_refusal.value.reason == reason
    # check_batch hands numpy input to the numpy checks: the same reason by that path too.
    with pytest.raises(InvalidInput) as via_batch:
        check_batch(x, y, dim=4, num_classes=10)
    assert via_batch.value.reason == reason


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_checks_accept_what_the_tensor_checks_accept(dtype: type) -> None:
    x = np.full((2, 4), 3.0e38 if dtype is not np.float16 else 6.0e4, dtype=dtype)
    y = np.array([0, 9], dtype=np.int32)
    check_arrays(x, y, dim=4, num_classes=10)
    fx, fy = check_batch(x, y, dim=4, num_classes=10)
    assert isinstance(fx, torch.Tensor)
    assert torch.equal(fy, torch.from_numpy(y))
    check_batch(torch.from_numpy(x), torch.from_numpy(y), dim=4, num_classes=10)


def test_slim_image_installs_the_core_and_the_others_every_extra() -> None:
    deploy = ROOT / "deploy"
    slim = (deploy / "Dockerfile.slim").read_text(encoding="utf-8")
    assert "pip install --no-cache-dir /src \\" in slim  # the core install, no extras
    assert not [line for line in slim.splitlines() if "pip install" in line and "torch" in line]
    assert '! python -c "import torch"' in slim  # the build fails if an extra crept in
    assert "ARG BASE_IMAGE=" in slim
    assert "FROM ${BASE_IMAGE}" in slim
    assert "USER 10001:10001" in slim
    assert 'ENTRYPOINT ["collapse-monitor"]' in slim
    for name in ("Dockerfile", "Dockerfile.cuda"):
        worker = (deploy / name).read_text(encoding="utf-8")
        assert 'pip install --no-cache-dir /src"[all]"' in worker, name
