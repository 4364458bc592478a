"""The Markdown tables of docs/study.md, computed from a study_family study.json alone.

Everything here is a deterministic function of study.json (the subset analyses reuse the
study's own bootstrap seed), so `study_family.py --tables-only` regenerates the tables exactly.
Run names are study_family's `<size>-seed<k>-<const|cosNNNNN>`; steps are tokens seen / 1,024.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.offline.correlation import average_ranks, correlation_json, pearson
from monitor.offline.study import EXPECTED_SIGN, STUDY_KEYS
from monitor.offline.study_stats import (
    analyse,
    bootstrap_interval,
    cluster_plan,
)

RUN = re.compile(r"^(?P<size>.+)-seed(?P<seed>\d+)-(?P<schedule>const|cos\d+)$")
TOKENS_PER_STEP = 16 * 64
# The metrics of the summary and within-group tables.
TABLE_KEYS = ("nc1_cdnv2", "nc1_cdnv2_scale_free", "nc1_cdnv", "nc4_ncc_agreement",
              "nc2_equiangularity_std", "nc3_uniform_duality_cv")  # fmt: skip
Row = dict[str, Any]


def value(row: Row, key: str) -> float | None:
    raw = row["derived"][key] if key in row["derived"] else row["metrics"].get(key)
    return None if raw is None else float(raw)


def describe(row: Row) -> tuple[str, int, str, int]:
    """(size, seed, schedule, steps) of a checkpoint."""
    m = RUN.match(row["run"])
    if m is None:
        raise ValueError(f"not a study_family run name: {row['run']}")
    return m["size"], int(m["seed"]), m["schedule"], row["tokens_seen"] // TOKENS_PER_STEP


def num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


CI_OF = {"pearson_r": "pearson_ci", "spearman_rho": "spearman_ci",
         "partial_r": "partial_r_ci", "partial_rho": "partial_rho_ci"}  # fmt: skip


def ci(c: dict[str, Any], name: str) -> str:
    """`+0.12 [-0.30, +0.50]`: the point value and its bootstrap interval (study.json's)."""
    band = c[CI_OF[name]]
    text = num(c[name], "+.2f")
    return text if band is None else f"{text} [{band[0]:+.2f}, {band[1]:+.2f}]"


def summary_table(rows: list[Row]) -> list[str]:
    """Per configuration (size, schedule, length): seeds, and the mean (seed sd) of each."""
    groups: dict[tuple[int, str, str, int], list[Row]] = {}
    for r in rows:
        size, _, schedule, steps = describe(r)
        kind = "const" if schedule == "const" else "cos"
        groups.setdefault((r["parameters"], size, kind, steps), []).append(r)
    head = ["size", "parameters", "schedule", "steps", "seeds", "val loss", *TABLE_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|---:|---:|" + "---:|" * 7]
    for (params, size, kind, steps), group in sorted(groups.items()):
        losses = [r["val_loss"] for r in group]
        sd = statistics.stdev(losses) if len(losses) > 1 else None
        cells = [f"{statistics.mean(losses):.3f} ({num(sd, '.3f')})"]
        for key in TABLE_KEYS:
            vals = [v for r in group if (v := value(r, key)) is not None]
            spec = ".3f" if key == "nc4_ncc_agreement" else ".3g"
            cells.append(num(statistics.mean(vals) if vals else None, spec))
        lines.append(
            f"| {size} | {params:,} | {kind} | {steps} | {len(group)} | " + " | ".join(cells) + " |"
        )
    return lines


def correlation_table(correlations: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| metric | n | runs | scale | Pearson r [95% CI] | Spearman rho | partial r | "
        "partial rho | expected sign |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in correlations:
        sign = {1: "+", -1: "-", None: "none"}[c["expected_sign"]]
        lines.append(
            f"| `{c['metric']}` | {c['n']} | {c['runs']} | {c['scale']} | "
            f"{ci(c, 'pearson_r')} | {ci(c, 'spearman_rho')} | {ci(c, 'partial_r')} | "
            f"{ci(c, 'partial_rho')} | {sign} |"
        )
    return lines


def subset_correlations(doc: dict[str, Any], rows: list[Row]) -> list[dict[str, Any]]:
    """The study's analysis on a subset of its checkpoints (same options and seed)."""
    boot = doc["bootstrap"]
    found = analyse(
        {k: [value(r, k) for r in rows] for k in STUDY_KEYS},
        [r["val_loss"] for r in rows],
        [r["run"] for r in rows],
        [r["parameters"] for r in rows],
        [r["tokens_seen"] for r in rows],
        EXPECTED_SIGN,
        resamples=boot["resamples"],
        seed=boot["seed"],
        level=boot["level"],
    ).correlations
    return [correlation_json(c) for c in found]


def within_groups(rows: list[Row]) -> list[str]:
    """Spearman's rho with loss inside groups holding one factor fixed (constant-rate runs).

    At a fixed length only size (and seed) varies; within one size only length (and seed).
    Group sizes are counted, not assumed.
    """
    const = [r for r in rows if describe(r)[2] == "const"]
    by_steps: dict[int, list[Row]] = {}
    by_size: dict[tuple[int, str], list[Row]] = {}
    for r in const:
        size, _, _, steps = describe(r)
        by_steps.setdefault(steps, []).append(r)
        by_size.setdefault((r["parameters"], size), []).append(r)

    def rho(group: list[Row], key: str) -> str:
        pairs = [(v, r["val_loss"]) for r in group if (v := value(r, key)) is not None]
        got = pearson(average_ranks([p[0] for p in pairs]), average_ranks([p[1] for p in pairs]))
        return "n/a" if len(pairs) < 3 or got is None else f"{got:+.2f}"

    keys = ("parameters", *TABLE_KEYS, "nc3_duality_mean_cos", "effective_rank")
    lines = ["| group | n | " + " | ".join(f"`{k}`" for k in keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]  # fmt: skip

    def line(label: str, group: list[Row]) -> str:
        cells = [rho(group, k) if k != "parameters" else rho_params(group) for k in keys]
        return f"| {label} | {len(group)} | " + " | ".join(cells) + " |"

    def rho_params(group: list[Row]) -> str:
        got = pearson(average_ranks([r["parameters"] for r in group]),
                      average_ranks([r["val_loss"] for r in group]))  # fmt: skip
        return "n/a" if got is None else f"{got:+.2f}"

    for steps, group in sorted(by_steps.items()):
        sizes = len({describe(r)[0] for r in group})
        lines.append(line(f"{steps} steps, {sizes} sizes", group))
    for (_, size), group in sorted(by_size.items()):
        lengths = len({describe(r)[3] for r in group})
        lines.append(line(f"{size}, {lengths} lengths", group))
    return lines


def schedule_table(rows: list[Row]) -> list[str]:
    """Scheduled (cosine) run minus the constant-rate snapshot at the same size, seed, length."""
    const = {(describe(r)[0], describe(r)[1], describe(r)[3]): r for r in rows
             if describe(r)[2] == "const"}  # fmt: skip
    diffs: dict[tuple[int, str, int], list[tuple[float, float, float]]] = {}
    for r in rows:
        size, seed, schedule, steps = describe(r)
        twin = const.get((size, seed, steps))
        if schedule == "const" or twin is None:
            continue
        d = [r["val_loss"] - twin["val_loss"]]
        for key in ("nc1_cdnv2", "nc4_ncc_agreement"):
            a, b = value(r, key), value(twin, key)
            d.append(math.nan if a is None or b is None else a - b)
        diffs.setdefault((r["parameters"], size, steps), []).append((d[0], d[1], d[2]))
    lines = ["| size | steps | pairs | loss cos - const | CDNV2 cos - const | NC4 cos - const |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (_, size, steps), group in sorted(diffs.items()):
        means = [statistics.mean(col) for col in zip(*group, strict=True)]
        lines.append(f"| {size} | {steps} | {len(group)} | {means[0]:+.3f} | {means[1]:+.3g} | "
                     f"{means[2]:+.3f} |")  # fmt: skip
    return lines


def demeaned_pearson(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float | None:
    """Pearson's r after subtracting each group's mean from x and y (fixed effects)."""
    dx, dy = x.copy(), y.copy()
    for g in np.unique(groups[:, 0]):
        mask = groups[:, 0] == g
        dx[mask] -= dx[mask].mean()
        dy[mask] -= dy[mask].mean()
    return pearson(dx, dy)


def seed_level(
    doc: dict[str, Any], rows: list[Row], correlations: list[dict[str, Any]]
) -> list[str]:
    """Seed-to-seed: r of metric and loss after removing each configuration's mean.

    A configuration is size x schedule x length, so what is left is how seeds of one setup
    differ: the paper's "20 seeds of one model" test. Bootstrap over runs, as the study's.
    """
    boot = doc["bootstrap"]
    configs = sorted({(r["parameters"], describe(r)[2], r["tokens_seen"]) for r in rows})
    group = np.array([[configs.index((r["parameters"], describe(r)[2], r["tokens_seen"]))]
                      for r in rows], dtype=np.float64)  # fmt: skip
    y = np.array([r["val_loss"] for r in rows])
    plan = cluster_plan([r["run"] for r in rows], boot["resamples"], boot["seed"], boot["level"])
    lines = [f"| metric | r within configuration [95% CI] ({len(configs)} configurations) |",
             "|---|---:|"]  # fmt: skip
    for c in correlations:
        vals = [value(r, c["metric"]) for r in rows]
        x = np.array([math.nan if v is None else v for v in vals])
        if c["scale"] == "log10":
            x = np.log10(x)
        ok = np.isfinite(x)
        point = demeaned_pearson(x[ok], y[ok], group[ok]) if ok.sum() > 2 else None
        band = bootstrap_interval(demeaned_pearson, x, y, group, plan)
        text = num(point, "+.2f") + (
            "" if band is None else f" [{band.low:+.2f}, {band.high:+.2f}]"
        )
        lines.append(f"| `{c['metric']}` | {text} |")
    return lines


def scale_proxy(doc: dict[str, Any], rows: list[Row]) -> list[str]:
    """How much of log10 CDNV2 is the class-mean scale: r with log10 class_mean_sq_norm."""
    boot = doc["bootstrap"]
    ok = [r for r in rows if value(r, "nc1_cdnv2") and value(r, "class_mean_sq_norm")]
    x = np.log10([value(r, "nc1_cdnv2") for r in ok])
    y = np.log10([value(r, "class_mean_sq_norm") for r in ok])
    plan = cluster_plan([r["run"] for r in ok], boot["resamples"], boot["seed"], boot["level"])
    band = bootstrap_interval(lambda a, b, _: pearson(a, b), x, y, np.empty((len(ok), 0)), plan)
    r = pearson(x, y)
    text = num(r, "+.3f") + ("" if band is None else f" [{band.low:+.3f}, {band.high:+.3f}]")
    return [f"Pearson r of log10 `nc1_cdnv2` with log10 `class_mean_sq_norm`, {len(ok)} "
            f"checkpoints: {text}"]  # fmt: skip


def markdown_tables(doc: dict[str, Any]) -> str:
    rows: list[Row] = doc["checkpoints"]
    const = [r for r in rows if describe(r)[2] == "const"]
    cos = [r for r in rows if describe(r)[2] != "cos" and describe(r)[2] != "const"]
    out = ["### Configurations (mean over seeds; val loss: mean (seed sd))", "",
           *summary_table(rows), "",
           f"### All {len(rows)} checkpoints ({doc['bootstrap']['runs']} runs), as study.json",
           "", *correlation_table(doc["correlations"]), "",
           f"### Separately scheduled runs only ({len(cos)} checkpoints, one per run)", "",
           *correlation_table(subset_correlations(doc, cos)), "",
           f"### Constant-rate snapshots only ({len(const)} checkpoints)", "",
           *correlation_table(subset_correlations(doc, const)), "",
           "### Seed to seed: within one configuration (size x schedule x length)", "",
           *seed_level(doc, rows, doc["correlations"]), "",
           "### Spearman rho with loss within groups (constant-rate snapshots)", "",
           *within_groups(rows), "",
           "### Scheduled run minus constant-rate snapshot (same size, seed, length)", "",
           *schedule_table(rows), "", *scale_proxy(doc, rows)]  # fmt: skip
    return "\n".join(out)
