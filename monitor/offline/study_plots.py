"""Plots of a study: each metric against validation loss, one point per checkpoint.

In the style of Wu & Papyan's figures: validation loss on x, the metric on y (log axis where
the correlation used log10), points coloured by architecture (width x depth) and joined per
training run, so the snapshots of one run read as a trail. The title carries R^2, Spearman's
rho and its run-clustered interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from monitor.data.output import OutputDir
from monitor.offline.correlation import Correlation
from monitor.offline.study import CheckpointRow, StudyResult

# The overview: the metrics the paper found most predictive, plus NC3 (which it did not).
OVERVIEW_KEYS: tuple[str, ...] = (
    "nc1_cdnv2",
    "nc1_cdnv2_scale_free",
    "nc4_ncc_agreement",
    "nc2_equiangularity_std",
    "nc2_log_energy_std",
    "nc3_duality_mean_cos",
)


def _group(row: CheckpointRow) -> str:
    if row.n_embd is None or row.n_layer is None:
        return "model"
    return f"d{row.n_embd} x {row.n_layer} layers"


def _title(corr: Correlation) -> str:
    r2 = "n/a" if corr.r2 is None else f"{corr.r2:.2f}"
    rho = "n/a" if corr.spearman_rho is None else f"{corr.spearman_rho:+.2f}"
    if corr.spearman_ci is not None:
        rho += f" [{corr.spearman_ci.low:+.2f}, {corr.spearman_ci.high:+.2f}]"
    scale = "log10 " if corr.scale == "log10" else ""
    return f"{corr.metric}\nR²({scale}metric) {r2}, Spearman ρ {rho}, n={corr.n}"


def _draw(ax: Any, rows: Sequence[CheckpointRow], corr: Correlation, legend: bool) -> None:
    groups: dict[str, dict[str, list[CheckpointRow]]] = {}
    for row in rows:
        if row.value(corr.metric) is not None:
            run = row.run if row.run is not None else row.name
            groups.setdefault(_group(row), {}).setdefault(run, []).append(row)
    ordered = sorted(
        groups.items(), key=lambda kv: min(r.parameters for m in kv[1].values() for r in m)
    )
    for i, (label, runs) in enumerate(ordered):
        for j, members in enumerate(runs.values()):
            members = sorted(members, key=lambda r: r.val_loss)
            xs = [r.val_loss for r in members]
            ys = [r.value(corr.metric) or 0.0 for r in members]
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=0.6, color=f"C{i % 10}",
                    label=label if j == 0 else None)  # fmt: skip
    if corr.scale == "log10":
        from matplotlib.ticker import NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap
    ax.set_xlabel("validation loss (nats/token)")
    ax.set_ylabel(corr.metric)
    ax.set_title(_title(corr), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    if legend and groups:
        ax.legend(fontsize=6)


def write_plots(result: StudyResult, out_dir: Path) -> list[Path]:
    """`<metric>.png` for every correlated metric with data, and `overview.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    usable = {c.metric: c for c in result.correlations if c.n >= 1}
    # A link at out_dir is refused; each PNG is written whole, then renamed into place.
    with OutputDir(out_dir) as out:
        for corr in usable.values():
            fig, ax = plt.subplots(figsize=(4.8, 3.6), dpi=100)
            _draw(ax, result.rows, corr, legend=True)
            fig.tight_layout()
            written.append(out.write_with(f"{corr.metric}.png", partial(_save, fig)))
            plt.close(fig)
        keys = [k for k in OVERVIEW_KEYS if k in usable]
        if keys:
            cols = 3
            rows_n = (len(keys) + cols - 1) // cols
            fig, axes = plt.subplots(
                rows_n, cols, figsize=(12, 3.6 * rows_n), dpi=90, squeeze=False
            )
            for i, ax in enumerate(axes.flat):
                if i < len(keys):
                    _draw(ax, result.rows, usable[keys[i]], legend=i == 0)
                else:
                    ax.axis("off")
            fig.tight_layout()
            written.append(out.write_with("overview.png", partial(_save, fig)))
            plt.close(fig)
    return written


def _save(figure: Any, handle: BinaryIO) -> None:
    figure.savefig(handle, format="png")
