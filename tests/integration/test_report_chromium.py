"""The report page in a real browser: headless Chromium, no network, a screenshot checked.

The page must show its figures with nothing but the file itself (they are data URIs), so the
browser runs with networking off and every host name unresolvable. A copy of the page with
the image data broken is the control: the same check must then find no plot pixels.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from monitor.alerts.thresholds import default_alerting
from monitor.report import ReportData, write_report
from monitor.report.figures import LINE_COLOR
from monitor.report.periods import alert_periods
from monitor.snapshot import Snapshot, TopDrift
from monitor.stats import CollapseStats

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
T0 = 1_764_140_000.0

# Skipped only outside CI: there, .ci/run installs chromium and a missing one must fail.
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"),
    reason="chromium is not installed (.ci/run installs it)",
)


def report_data() -> ReportData:
    snaps = []
    for i in range(40):
        r = 1.0 + max(0, i - 20) / 10  # collapse sets in halfway
        metrics: dict[str, float | int | None] = {
            "nc1_cdnv": 0.1 * r, "nc2_equiangularity_std": 0.2 * r, "nc4_ncc_agreement": 0.4 / r,
            "effective_rank": 6.0 / r, "drift_mmd": 0.002 * r * r, "drift_mmd_threshold": 0.005,
            "drift_nc1_cdnv_ratio": r, "sample_count": 1000, "class_count": 30,
        }  # fmt: skip
        snaps.append(
            Snapshot(
                "m",
                "1h",
                3600,
                T0 + 60 * i,
                "ok",
                None,
                0.2,
                1000,
                30,
                metrics,
                {"name": "launch"},
                [TopDrift(4, " the", 40, 50, 0.8, 0.3)],
            )
        )
    vocab, dim = 30, 12
    means = np.random.default_rng(0).normal(size=(vocab, dim)) * 3
    pair = []
    for seed, shift in ((1, 0.0), (2, -2.0)):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, vocab, 3000)
        x = means[y] + rng.normal(size=(y.size, dim))
        x[y == 4] += shift * means[4]
        stats = CollapseStats(vocab, dim)
        stats.update(torch.tensor(x), torch.tensor(y))
        pair.append(stats)
    alerting = default_alerting()
    return ReportData("m", "1h", snaps, alerting, alert_periods(snaps, alerting), *pair)


def screenshot(page: Path, out: Path, profile: Path) -> np.ndarray:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--hide-scrollbars",
        "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
        f"--user-data-dir={profile}", f"--screenshot={out}", "--window-size=1200,2000",
        page.resolve().as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file(), proc.stderr[-2000:]
    image = imread(out)
    assert image.shape[:2] == (2000, 1200)
    return image


def line_pixels(image: np.ndarray) -> int:
    rgb = np.array([int(LINE_COLOR[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.03).sum())


def test_chromium_renders_the_plots_offline(tmp_path: Path) -> None:
    files = write_report(report_data(), tmp_path / "report")
    image = screenshot(files.html, tmp_path / "shot.png", tmp_path / "profile")
    assert float(image[..., :3].std()) > 0.1  # not a blank page
    seen = line_pixels(image)
    assert seen > 1500, seen  # the metric lines of the first figures, drawn in the browser

    # Control: the same page with its image data cut short shows no plot at all.
    page = files.html.read_text(encoding="utf-8")
    broken = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,AAAA", page)
    assert broken != page
    control = tmp_path / "broken.html"
    control.write_text(broken, encoding="utf-8")
    blank = screenshot(control, tmp_path / "control.png", tmp_path / "profile2")
    assert line_pixels(blank) < 50
