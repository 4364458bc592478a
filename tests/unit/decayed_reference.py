"""Float64 brute-force reference of a decayed window (issue 14 point 3, the spec's semantics).

Computed from the raw samples with one explicit weight per sample, w = exp(-(t - b) / tau),
b being the start of the sample's fine bucket; it imports nothing from `monitor` (the metric
helpers come from the brute-force oracle, which does not either). It is the oracle the decayed
windows of the stores are checked against, so it follows the spec's formulas literally:

- per class: W_c = sum w, V_c = sum w^2, S_c = sum w h, Q_c = sum w ||h||^2;
- membership: W_c >= eps;
- presented (an ordinary statistics object with integer counts): n_c = max(1, round(W_c^2 / V_c)),
  class sum n_c S_c / W_c, class sum of squares n_c Q_c / W_c, N = sum of member n_c;
- globals over every sample (members or not), presented as the spec says (unit counts, second
  moment, NC4 counts and RFF sums rescaled by N / W, the RFF sums such that the unbiased MMD of
  the presented statistics is the weighted one).

The class mean and within-class variance are computed here directly as weighted averages of
the samples (the variance from the deviations h - mu_c, not from Q_c), a route independent of
the sums the stores keep.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from brute_force import _cov, _mean, pair_family, volume_robust

DEFAULT_EPS = math.exp(-2.0)  # the spec's decay_min_weight default: one sample of age S


@dataclass(frozen=True)
class Part:
    """One ingested batch: its samples all sit in the fine bucket starting at `bucket`."""

    features: np.ndarray  # (n, d)
    labels: np.ndarray  # (n,) class ids
    bucket: int  # start of the fine bucket (the batch's time rounded down to the bucket length)
    nc4_hits: int = 0
    nc4_total: int = 0
    phi: np.ndarray | None = None  # (n, D) random features of each sample, when drift is on


@dataclass(frozen=True)
class Reference:
    """A decayed window at time `t`: the weighted quantities and their presentation."""

    t: float
    tau: float
    eps: float
    # Every class with a row (members or not), ascending, and its weighted sums at t.
    all_ids: np.ndarray
    class_weight: np.ndarray  # W_c
    class_weight_sq: np.ndarray  # V_c
    class_sum_w: np.ndarray  # S_c (K, d)
    class_sq_w: np.ndarray  # Q_c
    # Members only (W_c >= eps), ascending by id.
    ids: np.ndarray
    counts: np.ndarray  # presented n_c (int64)
    means: np.ndarray  # weighted class means (k, d)
    variances: np.ndarray  # weighted within-class variance, sum w ||h - mu||^2 / W_c
    sums: np.ndarray  # presented class sums n_c S_c / W_c
    sq_norms: np.ndarray  # presented class sums of squares n_c Q_c / W_c
    sample_count: int  # presented N
    # Globals over every sample: weights and weighted sums at t.
    weight: float  # W
    weight_sq: float  # V
    unit_weight: float  # U: weight of the samples with a nonzero vector
    unit_sum_w: np.ndarray  # sum w h / ||h||
    second_w: np.ndarray  # M_w = sum w h h^T
    nc4_hits_w: float  # H_w
    nc4_total_w: float  # T_w
    rff_sum_w: np.ndarray | None  # sum w phi
    rff_sq_w: float  # sum w^2 ||phi||^2
    # Globals as presented.
    unit_count: int
    unit_sum: np.ndarray
    second: np.ndarray
    nc4_total: int
    nc4_hits: int
    rff_sum: np.ndarray | None
    rff_sq: float

    @property
    def total_sum(self) -> np.ndarray:
        """sum of the presented class sums (what the statistics derive their total from)."""
        return self.sums.sum(axis=0) if len(self.ids) else np.zeros(self.second.shape[0])

    def membership_margin(self) -> float:
        """min over classes of |log(W_c / eps)|: how far the nearest class is from the line.

        A test comparing membership with a store needs it well above float rounding (1e-9)."""
        if not len(self.all_ids):
            return math.inf
        return float(np.min(np.abs(np.log(self.class_weight / self.eps))))

    def weighted_mmd(self) -> float | None:
        """(||sum w phi||^2 - sum w^2 ||phi||^2) / (W^2 - V): the unbiased weighted estimate of
        E k(x, x') the presented RFF sums must reproduce."""
        if self.rff_sum_w is None or self.weight**2 <= self.weight_sq:
            return None
        s = self.rff_sum_w
        return (float(s @ s) - self.rff_sq_w) / (self.weight**2 - self.weight_sq)


def weights(buckets: np.ndarray, t: float, tau: float) -> np.ndarray:
    """exp(-(t - b) / tau) per sample, stepped per fine bucket."""
    return np.exp(-(t - np.asarray(buckets, dtype=np.float64)) / tau)


def decayed_reference(
    parts: Sequence[Part],
    t: float,
    tau: float,
    eps: float = DEFAULT_EPS,
    forgotten: Mapping[int, int] | None = None,
) -> Reference:
    """The spec's decayed window of `parts` at time `t`, brute force from the samples.

    `forgotten[c] = n`: maintenance deleted class c's row (its weight had fallen below eps)
    when the first n parts had been merged; those parts' samples of c are no longer in its
    row (a class that comes back starts a new one), though still in the globals.
    """
    if not parts:
        raise ValueError("no parts")
    d = int(parts[0].features.shape[1])
    x = np.concatenate([np.asarray(p.features, dtype=np.float64) for p in parts])
    y = np.concatenate([np.asarray(p.labels, dtype=np.int64) for p in parts])
    b = np.concatenate([np.full(len(p.labels), p.bucket, dtype=np.float64) for p in parts])
    index = np.concatenate([np.full(len(p.labels), i) for i, p in enumerate(parts)])
    w = weights(b, t, tau)
    in_row = np.ones(len(y), dtype=bool)
    for c, n in (forgotten or {}).items():
        in_row &= ~((y == c) & (index < n))

    all_ids = np.unique(y[in_row])
    k_all = len(all_ids)
    cw, cv, cq = np.zeros(k_all), np.zeros(k_all), np.zeros(k_all)
    cs = np.zeros((k_all, d))
    means, variances = np.zeros((k_all, d)), np.zeros(k_all)
    for k, c in enumerate(all_ids):
        mine = (y == c) & in_row
        rows, wc = x[mine], w[mine]
        cw[k] = math.fsum(wc)
        cv[k] = math.fsum(wc * wc)
        cs[k] = (wc[:, None] * rows).sum(axis=0)
        cq[k] = math.fsum(wc * np.sum(rows * rows, axis=1))
        mu = cs[k] / cw[k]
        means[k] = mu
        dev = rows - mu
        variances[k] = math.fsum(wc * np.sum(dev * dev, axis=1)) / cw[k]

    member = cw >= eps
    counts = np.array(
        [max(1, round(cw[k] ** 2 / cv[k])) for k in range(k_all) if member[k]], dtype=np.int64
    )
    scale = counts / cw[member]
    n_total = int(counts.sum())

    big_w, big_v = math.fsum(w), math.fsum(w * w)
    norms = np.sqrt(np.sum(x * x, axis=1))
    nonzero = norms > 0
    unit_weight = math.fsum(w[nonzero])
    unit_sum_w = (w[nonzero, None] * (x[nonzero] / norms[nonzero, None])).sum(axis=0)
    second_w = (x * w[:, None]).T @ x
    part_w = [math.exp(-(t - p.bucket) / tau) for p in parts]
    hits_w = math.fsum(wp * p.nc4_hits for wp, p in zip(part_w, parts, strict=True))
    total_w = math.fsum(wp * p.nc4_total for wp, p in zip(part_w, parts, strict=True))
    rff_sum_w: np.ndarray | None = None
    rff_sq_w = 0.0
    if all(p.phi is not None for p in parts):
        phi = np.concatenate([np.asarray(p.phi, dtype=np.float64) for p in parts])
        rff_sum_w = (w[:, None] * phi).sum(axis=0)
        rff_sq_w = math.fsum(w * w * np.sum(phi * phi, axis=1))

    ratio = n_total / big_w
    unit_count = round(unit_weight * ratio)
    unit_sum = unit_sum_w * unit_count / unit_weight if unit_weight > 0 else np.zeros(d)
    nc4_total = round(total_w * ratio)
    nc4_hits = min(round(hits_w * ratio), nc4_total)
    if n_total >= 2 and big_w**2 > big_v:
        a = math.sqrt(n_total * (n_total - 1) / (big_w**2 - big_v))
    else:
        a = ratio
    return Reference(
        t=t,
        tau=tau,
        eps=eps,
        all_ids=all_ids,
        class_weight=cw,
        class_weight_sq=cv,
        class_sum_w=cs,
        class_sq_w=cq,
        ids=all_ids[member],
        counts=counts,
        means=means[member],
        variances=variances[member],
        sums=cs[member] * scale[:, None],
        sq_norms=cq[member] * scale,
        sample_count=n_total,
        weight=big_w,
        weight_sq=big_v,
        unit_weight=unit_weight,
        unit_sum_w=unit_sum_w,
        second_w=second_w,
        nc4_hits_w=hits_w,
        nc4_total_w=total_w,
        rff_sum_w=rff_sum_w,
        rff_sq_w=rff_sq_w,
        unit_count=unit_count,
        unit_sum=unit_sum,
        second=second_w * ratio,
        nc4_total=nc4_total,
        nc4_hits=nc4_hits,
        rff_sum=None if rff_sum_w is None else a * rff_sum_w,
        rff_sq=a * a * rff_sq_w,
    )


def presented_metrics(
    ref: Reference, classifier: np.ndarray | None = None, min_count: int = 2
) -> dict[str, float | int | None]:
    """METRICS.md's keys of the presented statistics, brute force from the reference's presented
    quantities (class counts, weighted means and variances, presented globals), by the oracle's
    loops (`brute_force`). What a metric of the presented statistics must equal."""
    keep = ref.counts >= min_count
    ids = ref.ids[keep]
    counts = [int(n) for n in ref.counts[keep]]
    means, variances = ref.means[keep], ref.variances[keep]
    k = len(ids)
    out: dict[str, float | int | None] = {"class_count": k, "sample_count": ref.sample_count}
    centred = means - means.sum(axis=0) / k if k else means
    norms = [float(np.sqrt(row @ row)) for row in centred]
    out["nc2_equinorm_cv"] = _cov(norms) if k else None
    if k >= 2:
        out.update(pair_family(means, variances))
        out.update(volume_robust(counts, means, variances, centred))
        out["nc1_trace_ratio"] = _presented_trace_ratio(ref, keep, means, min_count)
        if ref.nc4_total > 0:
            out["nc4_ncc_agreement"] = ref.nc4_hits / ref.nc4_total
    n_units = ref.unit_count
    if n_units >= 2:
        u = ref.unit_sum
        out["anisotropy_mean_cos"] = (float(u @ u) - n_units) / (n_units * (n_units - 1))
    if ref.sample_count >= 2:
        out["effective_rank"] = _presented_effective_rank(ref)
    if classifier is not None and k:
        cosines = []
        for row, c in zip(centred, ids, strict=True):
            wc = classifier[c]
            wn, mn = float(np.sqrt(wc @ wc)), float(np.sqrt(row @ row))
            if wn > 0 and mn > 0:
                cosines.append(float(wc @ row) / (wn * mn))
        out["nc3_duality_mean_cos"] = _mean(cosines)
        out["nc3_uniform_duality_cv"] = _cov(cosines)
    return out


def _presented_effective_rank(ref: Reference) -> float:
    """exp(entropy) of the eigenvalues of second / N - mean mean^T, mean = total_sum / N."""
    n = ref.sample_count
    mean = ref.total_sum / n
    cov = ref.second / n - np.outer(mean, mean)
    eig = np.clip(np.linalg.eigvalsh((cov + cov.T) / 2), 0.0, None)
    p = eig / eig.sum()
    return math.exp(-math.fsum(float(v) * math.log(float(v)) for v in p if v > 0))


def _presented_trace_ratio(
    ref: Reference, keep: np.ndarray, means: np.ndarray, min_count: int
) -> float | None:
    """Tr(Sigma_W pinv(Sigma_B)) / K of the presented statistics: Sigma_W from the presented
    second moment less every class's n_c mu_c mu_c^T (METRICS.md's route from sums), over the
    presented counts of the kept classes (min_count <= 2) as the engine divides."""
    if min_count > 2:
        return None  # the engine pools differently there; not needed by these tests
    k = len(means)
    scatter = ref.second.copy()
    for n, mu in zip(ref.counts, ref.means, strict=True):
        scatter -= n * np.outer(mu, mu)
    sigma_w = scatter / int(ref.counts[keep].sum())
    centred = means - means.sum(axis=0) / k
    sigma_b = centred.T @ centred / k
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True))) / k


# ------------------------------------------------------------------------------------ harness
# Feeding the same parts into a store and comparing what it presents with a `Reference`. This
# part touches `monitor` (partials are made as ingestion makes them); the reference above never
# calls it.


def part_fields(part: Part, vocab: int, *, second: bool, rff: object = None) -> dict[bytes, bytes]:
    """The stored fields of the part's partial, as ingestion writes them."""
    from monitor.stats import CollapseStats
    from monitor.stats.fields import to_fields

    stats = CollapseStats(vocab, part.features.shape[1], second_moment=second, rff=rff)  # type: ignore[arg-type]
    stats.update(part.features, part.labels)
    if part.nc4_total:
        stats.record_nc4(part.nc4_hits, part.nc4_total)
    return to_fields(stats)


def with_phi(part: Part, rff: object) -> Part:
    """The part with its samples' random features (the map ingestion applies), in float64."""
    import torch

    from monitor.stats.rff import rff_features

    phi = rff_features(torch.from_numpy(part.features), rff).to(torch.float64).numpy()  # type: ignore[arg-type]
    return Part(part.features, part.labels, part.bucket, part.nc4_hits, part.nc4_total, phi)


class Feed:
    """A store fed part by part, and what the reference needs to follow it: the parts put, how
    many of them were merged, and which class rows each window's maintenance deleted.

    Deleting a row is not only garbage collection: a class that comes back after its row was
    deleted starts a new row, without its old (by then tiny) weight. So after every maintenance
    (`maintain`, `read`) the feed looks at which rows went, checks that each weighed less than
    eps then (by the reference, never the store's numbers) and records it in `forgotten`.
    """

    def __init__(self, store: Any, *, vocab: int, rff: object, second: bool = True) -> None:
        self.store, self.vocab, self.rff, self.second = store, vocab, rff, second
        self.parts: list[Part] = []
        self.merged = 0  # parts[:merged] were compacted
        self.windows = dict(store.policy.windows)
        self.forgotten: dict[str, dict[int, int]] = {label: {} for label in self.windows}
        self.rows: dict[str, set[int]] = {label: set() for label in self.windows}
        self.pruned = 0  # rows seen deleted, over all windows

    def put(self, part: Part, ts: float, batch_id: str | None = None) -> bool:
        assert self.store.policy.start("fine", ts) == part.bucket
        fields = part_fields(part, self.vocab, second=self.second, rff=self.rff)
        name = batch_id or f"b{len(self.parts)}"
        stored = bool(self.store.put_partial("m", name, fields, ts, len(part.labels)))
        if stored:
            self.parts.append(with_phi(part, self.rff) if self.rff is not None else part)
        return stored

    def compact(self) -> None:
        """Compact everything pending (or account for a compaction done elsewhere)."""
        from monitor.pipeline.windows import compact_model

        compact_model(self.store, "m")
        assert self.store.pending_count("m") == 0
        for part in self.parts[self.merged :]:  # every decayed window receives all new data
            for rows in self.rows.values():
                rows.update(int(c) for c in np.unique(part.labels))
        self.merged = len(self.parts)

    def maintain(self, now: float) -> None:
        from monitor.pipeline.windows import maintain_model

        maintain_model(self.store, "m", now)
        self._observe(now)

    def read(self, label: str, now: float) -> Any:
        """`window_stats` of a configured window at `now` (it maintains first)."""
        from monitor.pipeline.windows import window_stats

        read = window_stats(self.store, "m", label, self.windows[label], now=now)
        self._observe(now)
        return read

    def reference(self, label: str, now: float) -> Reference:
        assert self.merged == len(self.parts), "compact before comparing"
        ref = decayed_reference(
            self.parts, now, self.windows[label] / 2, forgotten=self.forgotten[label]
        )
        # Membership is compared class by class: no class may sit on the line W_c = eps.
        assert ref.membership_margin() > 1e-6, "test data: a class sits on the eps line"
        return ref

    def _observe(self, now: float) -> None:
        from monitor.store.base import window_state

        for label, seconds in self.windows.items():
            with self.store.locked("m"):
                chunks = list(self.store.scan_state("m", window_state(label)))
            present = {int(f) for chunk in chunks for f, _ in chunk if f[:1].isdigit()}
            gone = self.rows[label] - present
            if gone:
                ref = decayed_reference(
                    self.parts[: self.merged], now, seconds / 2, forgotten=self.forgotten[label]
                )
                weight = dict(zip(ref.all_ids.tolist(), ref.class_weight, strict=True))
                for c in sorted(gone):
                    assert weight[c] < ref.eps, f"{label}: row {c} deleted at W_c = {weight[c]}"
                    self.forgotten[label][c] = self.merged
                self.pruned += len(gone)
            self.rows[label] = present


def assert_presents(stats: object, ref: Reference, rel: float = 1e-9) -> None:
    """`stats` (a presented `CollapseStats`) is the reference's presentation: ids and counts
    exactly, means, sums and globals within `rel`, within-class variances within `rel` of
    (variance + ||mu||^2), the scale of the cancellation in q/n - ||mu||^2."""
    from monitor.stats import CollapseStats

    assert isinstance(stats, CollapseStats), (
        f"no statistics presented (reference N = {ref.sample_count})"
    )
    c = stats.classes()
    assert c.class_ids.tolist() == ref.ids.tolist(), "member classes differ"
    assert c.counts.tolist() == ref.counts.tolist(), "presented counts n_c differ"
    assert stats.sample_count == ref.sample_count
    _rows_close(c.means().numpy(), ref.means, rel, "class means")
    _rows_close(c.sums.numpy(), ref.sums, rel, "class sums")
    _rows_close(c.sq_norms.numpy()[:, None], ref.sq_norms[:, None], rel, "class sums of squares")
    scale = ref.variances + np.sum(ref.means**2, axis=1)
    err = np.abs(c.variances().numpy() - ref.variances)
    assert np.all(err <= rel * scale), (
        f"within-class variances: worst {float(np.max(err / scale)):.3g}"
    )
    assert (stats.unit_count, stats.nc4_total, stats.nc4_hits) == (
        ref.unit_count,
        ref.nc4_total,
        ref.nc4_hits,
    ), "presented unit/NC4 counts"
    _close(stats.unit_sum.numpy(), ref.unit_sum, rel, "unit sum")
    if stats.second is not None:
        _close(stats.second.numpy(), ref.second, rel, "second moment")
    if ref.rff_sum is not None:
        assert stats.rff_sum is not None
        _close(stats.rff_sum.numpy(), ref.rff_sum, rel, "RFF sum")
        assert math.isclose(stats.rff_sq, ref.rff_sq, rel_tol=rel), (stats.rff_sq, ref.rff_sq)
        weighted = ref.weighted_mmd()
        if weighted is not None and ref.sample_count >= 2:
            # The point of the RFF presentation: the unbiased estimate of the presented
            # statistics is the weighted one (1e-8: a difference of two sums).
            n, s = stats.sample_count, stats.rff_sum.numpy()
            unbiased = (float(s @ s) - stats.rff_sq) / (n * (n - 1))
            assert math.isclose(unbiased, weighted, rel_tol=1e-8), (unbiased, weighted)


def _rows_close(got: np.ndarray, want: np.ndarray, rel: float, what: str) -> None:
    """Each row within `rel` of its own norm."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if not want.size:
        return
    err = np.linalg.norm(got - want, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-300)
    worst = int(np.argmax(err))
    assert err[worst] <= rel, f"{what}: row {worst} off by {err[worst]:.3g} relative (> {rel:g})"


def _close(got: np.ndarray, want: np.ndarray, rel: float, what: str) -> None:
    """Elementwise within `rel` of the array's largest magnitude (a sum's natural scale)."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-300)
    worst = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    assert worst <= rel, f"{what}: worst relative difference {worst:.3g} > {rel:g}"
