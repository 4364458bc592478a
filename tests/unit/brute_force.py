"""Brute-force float64 oracle for the collapse/geometry metrics of METRICS.md.

Everything here is computed directly from the raw samples with plain loops and explicit
matrices, in float64 numpy, without touching `monitor` at all. It is deliberately slow and
simple: it is the independent oracle the implementation is checked against, so clarity beats
speed. Sizes used by the tests are small (N up to a few thousand, K up to a few hundred).

Semantics (METRICS.md plus the team's decisions):

- C' = classes with n_c >= min_count, K = |C'|; mu_c = class sample mean; sigma_c^2 = mean over
  the class's samples of ||h - mu_c||^2 (the biased trace of the class covariance, equal to
  q_c/n_c - ||mu_c||^2); mu_G = unweighted mean of the mu_c over C'; m_c = mu_c - mu_G.
- Pairwise metrics are over unordered pairs c < c' of C'; None when K < 2. Pairs whose class
  means coincide are skipped in cdnv/cdnv2; pairs with u_c == u_c' are skipped in the log
  energy; classes with ||m_c|| == 0 are left out of the angular metrics.
- std and CoV are population statistics (ddof = 0).
- nc1_trace_ratio = Tr(Sigma_W pinv(Sigma_B)) / K over the samples of C' only.
- anisotropy_mean_cos and effective_rank use ALL samples, whatever their class.
- Volume-robust keys: over classes of C' with n_c >= 2, s~_c^2 = sigma_c^2 n_c/(n_c-1),
  D~ = ||mu_c - mu_c'||^2 - s~_c^2/n_c - s~_c'^2/n_c'; a pair is kept when
  D~ > RESOLUTION (s~_c^2/n_c + s~_c'^2/n_c') (the team's cut, docs/metrics.md).
  mean_noise_ratio = sum s~_c^2/n_c / sum ||m_c||^2 over those classes (m_c centred on C').
- nc4_ncc_agreement: over `eval_features` when given, else over `features` themselves (the
  CLI's behaviour); argmax / argmin range over C' only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

PAIRWISE_KEYS = (
    "nc1_cdnv",
    "nc1_cdnv2",
    "nc1_cdnv_unbiased",
    "nc1_cdnv2_unbiased",
    "nc2_equiangularity_mean",
    "nc2_equiangularity_std",
    "nc2_log_energy_mean",
    "nc2_log_energy_std",
)

METRIC_KEYS = (
    "nc1_cdnv",
    "nc1_cdnv2",
    "nc1_cdnv_unbiased",
    "nc1_cdnv2_unbiased",
    "nc1_trace_ratio",
    "nc2_equinorm_cv",
    "nc2_equiangularity_mean",
    "nc2_equiangularity_std",
    "nc2_log_energy_mean",
    "nc2_log_energy_std",
    "nc3_duality_mean_cos",
    "nc3_uniform_duality_cv",
    "nc4_ncc_agreement",
    "anisotropy_mean_cos",
    "effective_rank",
    "class_count",
    "sample_count",
    "mean_noise_ratio",
)

STDERR_KEYS = (
    "nc1_cdnv_stderr",
    "nc1_cdnv2_stderr",
    "nc1_cdnv_unbiased_stderr",
    "nc1_cdnv2_unbiased_stderr",
    "nc2_equiangularity_mean_stderr",
    "nc2_equiangularity_std_stderr",
    "nc2_log_energy_mean_stderr",
    "nc2_log_energy_std_stderr",
    "nc4_ncc_agreement_stderr",
)

ALL_KEYS = METRIC_KEYS + STDERR_KEYS


def _to_numpy(value: Any, dtype: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _mean(values: list[float]) -> float | None:
    if not values:
        return None
    return math.fsum(values) / len(values)


def _pop_std(values: list[float]) -> float | None:
    if not values:
        return None
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def _cov(values: list[float]) -> float | None:
    """Population coefficient of variation std / mean (None when undefined)."""
    mean = _mean(values)
    if mean is None or mean == 0.0:
        return None
    std = _pop_std(values)
    assert std is not None
    return std / mean


RESOLUTION = 0.25


def volume_robust(
    counts: list[int], means: np.ndarray, variances: np.ndarray, centred: np.ndarray
) -> dict[str, float | None]:
    """nc1_cdnv_unbiased, nc1_cdnv2_unbiased and mean_noise_ratio by a loop over pairs."""
    usable = [k for k, n in enumerate(counts) if n >= 2]
    s2 = {k: variances[k] * counts[k] / (counts[k] - 1) for k in usable}
    noise = {k: s2[k] / counts[k] for k in usable}
    cdnv, cdnv2 = [], []
    for a, i in enumerate(usable):
        for j in usable[a + 1 :]:
            diff = means[i] - means[j]
            d_tilde = float(np.dot(diff, diff)) - noise[i] - noise[j]
            if d_tilde > RESOLUTION * (noise[i] + noise[j]):
                cdnv.append((s2[i] + s2[j]) / (2.0 * d_tilde))
                cdnv2.append((s2[i] + s2[j]) / (2.0 * d_tilde * d_tilde))
    spread = math.fsum(float(np.dot(centred[k], centred[k])) for k in usable)
    ratio = None
    if len(usable) >= 2 and spread > 0:
        ratio = math.fsum(noise.values()) / spread
    return {"nc1_cdnv_unbiased": _mean(cdnv), "nc1_cdnv2_unbiased": _mean(cdnv2),
            "mean_noise_ratio": ratio}  # fmt: skip


def kept_classes(labels: np.ndarray, min_count: int) -> list[int]:
    """C': the class ids with at least `min_count` samples, ascending."""
    ids, counts = np.unique(labels, return_counts=True)
    return [int(c) for c, n in zip(ids, counts, strict=True) if n >= min_count]


def class_means_and_variances(
    features: np.ndarray, labels: np.ndarray, ids: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """mu_c (K, d) and sigma_c^2 (K,), each from the class's own samples by explicit sums."""
    d = features.shape[1]
    means = np.zeros((len(ids), d))
    variances = np.zeros(len(ids))
    for k, c in enumerate(ids):
        rows = features[labels == c]
        mu = rows.sum(axis=0) / rows.shape[0]
        means[k] = mu
        dev = rows - mu
        variances[k] = float(np.sum(dev * dev)) / rows.shape[0]
    return means, variances


def pair_kernels(means: np.ndarray, variances: np.ndarray) -> dict[str, list[float]]:
    """Per-pair kernel values over c < c' (explicit double loop), one list per pairwise metric.

    Keys: 'cdnv', 'cdnv2', 'cos', 'log_energy'.
    """
    K = means.shape[0]
    mu_G = means.sum(axis=0) / K if K else None
    centred = means - mu_G if K else means
    norms = [float(np.sqrt(np.dot(centred[k], centred[k]))) for k in range(K)]
    out: dict[str, list[float]] = {"cdnv": [], "cdnv2": [], "cos": [], "log_energy": []}
    for i in range(K):
        for j in range(i + 1, K):
            diff = means[i] - means[j]
            dist2 = float(np.dot(diff, diff))
            if dist2 > 0.0:
                num = variances[i] + variances[j]
                out["cdnv"].append(num / (2.0 * dist2))
                out["cdnv2"].append(num / (2.0 * dist2 * dist2))
            if norms[i] > 0.0 and norms[j] > 0.0:
                u_i = centred[i] / norms[i]
                u_j = centred[j] / norms[j]
                out["cos"].append(float(np.dot(centred[i], centred[j])) / (norms[i] * norms[j]))
                gap = float(np.sqrt(np.sum((u_i - u_j) ** 2)))
                if gap > 0.0:
                    out["log_energy"].append(math.log(1.0 / gap))
    return out


def pair_family(means: np.ndarray, variances: np.ndarray) -> dict[str, float]:
    """The plug-in pair metrics (NC1 CDNVs, NC2 angles and log energies) of >= 2 classes."""
    kern = pair_kernels(means, variances)
    return {
        "nc1_cdnv": _mean(kern["cdnv"]),
        "nc1_cdnv2": _mean(kern["cdnv2"]),
        "nc2_equiangularity_mean": _mean(kern["cos"]),
        "nc2_equiangularity_std": _pop_std(kern["cos"]),
        "nc2_log_energy_mean": _mean(kern["log_energy"]),
        "nc2_log_energy_std": _pop_std(kern["log_energy"]),
    }


def _trace_ratio(
    features: np.ndarray, labels: np.ndarray, ids: list[int], means: np.ndarray
) -> float | None:
    K = len(ids)
    if K < 2:
        return None
    d = features.shape[1]
    mu_G = means.sum(axis=0) / K
    M = means - mu_G
    sigma_b = M.T @ M / K
    sigma_w = np.zeros((d, d))
    n_kept = 0
    for k, c in enumerate(ids):
        for h in features[labels == c]:
            dev = h - means[k]
            sigma_w += np.outer(dev, dev)
            n_kept += 1
    sigma_w /= n_kept
    # Eigenvalues below 1e-10 of the largest are zero: states after a LayerNorm lie in a
    # hyperplane to float32 precision, and numpy's default cut-off would keep that noise.
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True))) / K


def _anisotropy(features: np.ndarray) -> float | None:
    """Mean cosine over ordered pairs i != j, from explicit Gram blocks (not the sum formula)."""
    N = features.shape[0]
    if N < 2:
        return None
    unit = features / np.sqrt(np.sum(features * features, axis=1, keepdims=True))
    total = 0.0
    block = 512
    for start in range(0, N, block):
        gram = unit[start : start + block] @ unit.T
        total += float(gram.sum())
        # remove the diagonal (each h with itself)
        for r in range(gram.shape[0]):
            total -= float(gram[r, start + r])
    return total / (N * (N - 1))


def _effective_rank(features: np.ndarray) -> float:
    N = features.shape[0]
    centred = features - features.sum(axis=0) / N
    cov = centred.T @ centred / N
    eig = np.clip(np.linalg.eigvalsh(cov), 0.0, None)
    p = eig / eig.sum()
    entropy = -math.fsum(float(x) * math.log(float(x)) for x in p if x > 0.0)
    return math.exp(entropy)


def ncc_agreement(
    eval_x: np.ndarray,
    ids: list[int],
    means: np.ndarray,
    classifier: np.ndarray,
    bias: np.ndarray | None,
) -> float:
    """Fraction of rows whose linear argmax over C' equals their nearest class mean in C'."""
    W = classifier[ids]
    b = np.zeros(len(ids)) if bias is None else bias[ids]
    agree = 0
    block = 256
    for start in range(0, eval_x.shape[0], block):
        x = eval_x[start : start + block]
        linear = np.argmax(x @ W.T + b, axis=1)
        # explicit differences, not the ||x||^2 - 2 x.mu + ||mu||^2 expansion
        dist = np.sqrt(np.sum((x[:, None, :] - means[None, :, :]) ** 2, axis=2))
        nearest = np.argmin(dist, axis=1)
        agree += int(np.sum(linear == nearest))
    return agree / eval_x.shape[0]


def brute_force_metrics(
    features: Any,
    labels: Any,
    classifier: Any = None,
    bias: Any = None,
    min_count: int = 2,
    eval_features: Any = None,
) -> dict[str, Any]:
    """Every collapse/geometry key of METRICS.md, brute force from raw samples.

    The `*_stderr` keys are all None (this is the exact value). `second_moment` is assumed,
    so `nc1_trace_ratio` and `effective_rank` are always computed when defined.
    """
    X = _to_numpy(features, np.float64)
    y = _to_numpy(labels, np.int64)
    assert X.ndim == 2
    assert y.shape == (X.shape[0],)
    N = X.shape[0]
    ids = kept_classes(y, min_count)
    K = len(ids)
    means, variances = class_means_and_variances(X, y, ids)

    out: dict[str, Any] = dict.fromkeys(ALL_KEYS)
    out["class_count"] = K
    out["sample_count"] = N

    if K >= 2:
        out.update(pair_family(means, variances))

    centred = means - means.sum(axis=0) / K if K else means
    norms = [float(np.sqrt(np.dot(row, row))) for row in centred]
    if K:
        out["nc2_equinorm_cv"] = _cov(norms)
    out["nc1_trace_ratio"] = _trace_ratio(X, y, ids, means)
    out["anisotropy_mean_cos"] = _anisotropy(X)
    out["effective_rank"] = _effective_rank(X)
    if K >= 2:
        counts = [int(np.sum(y == c)) for c in ids]
        out.update(volume_robust(counts, means, variances, centred))

    if classifier is not None and K:
        W = _to_numpy(classifier, np.float64)
        b = None if bias is None else _to_numpy(bias, np.float64)
        cosines = []
        for k, c in enumerate(ids):
            w = W[c]
            wn = float(np.sqrt(np.dot(w, w)))
            if wn > 0.0 and norms[k] > 0.0:
                cosines.append(float(np.dot(w, centred[k])) / (wn * norms[k]))
        out["nc3_duality_mean_cos"] = _mean(cosines)
        out["nc3_uniform_duality_cv"] = _cov(cosines)
        E = X if eval_features is None else _to_numpy(eval_features, np.float64)
        out["nc4_ncc_agreement"] = ncc_agreement(E, ids, means, W, b)
    return out


# ------------------------------------------------------------------ self-checks (alt routes)
def cdnv_by_matrices(features: Any, labels: Any, min_count: int = 2) -> tuple[float, float]:
    """(cdnv, cdnv2) through full K x K matrices and q_c/n_c - ||mu_c||^2: a second route."""
    X = _to_numpy(features, np.float64)
    y = _to_numpy(labels, np.int64)
    ids = kept_classes(y, min_count)
    n = np.array([np.sum(y == c) for c in ids], dtype=np.float64)
    s = np.stack([X[y == c].sum(axis=0) for c in ids])
    q = np.array([np.sum(X[y == c] ** 2) for c in ids])
    mu = s / n[:, None]
    var = q / n - np.sum(mu * mu, axis=1)
    dist2 = np.sum((mu[:, None, :] - mu[None, :, :]) ** 2, axis=2)
    num = var[:, None] + var[None, :]
    iu = np.triu_indices(len(ids), k=1)
    return (
        float(np.mean(num[iu] / (2 * dist2[iu]))),
        float(np.mean(num[iu] / (2 * dist2[iu] ** 2))),
    )


def anisotropy_by_formula(features: Any) -> float:
    """(||sum h/||h|| ||^2 - N) / (N (N-1)): the METRICS.md closed form, a second route."""
    X = _to_numpy(features, np.float64)
    N = X.shape[0]
    u = (X / np.linalg.norm(X, axis=1, keepdims=True)).sum(axis=0)
    return (float(u @ u) - N) / (N * (N - 1))


def assert_matches(
    got: dict[str, Any], want: dict[str, Any], keys: tuple[str, ...], rel: float = 1e-6
) -> None:
    """Every key of `got` equals the oracle's `want` within `rel` (1e-12 absolute); None
    where the oracle says None. All mismatches are listed at once."""
    bad = []
    for key in keys:
        g, w = got[key], want[key]
        if w is None:
            if g is not None:
                bad.append(f"{key}: got {g!r}, reference None")
        elif g is None or not math.isclose(float(g), float(w), rel_tol=rel, abs_tol=1e-12):
            bad.append(f"{key}: got {g!r}, reference {w!r}")
    assert not bad, "\n".join(bad)
