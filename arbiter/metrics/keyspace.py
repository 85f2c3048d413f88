"""Key-space analysis of two modalities' attention keys (docs/methods/keyspace.md, after [KS]; proposed estimators).

Subsample, pooled z-score and PCA; unbiased MMD with intra-modal baseline and permutation test; per-component JSD."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..util import ToDict, check_choice, fail
from .nssd import jsd

KERNELS = ("gaussian", "multi_gaussian", "linear", "polynomial")
OUTLIERS = ("drop", "clip")
MULTI_SCALES = (0.5, 1.0, 2.0)

__all__ = ["KERNELS", "subsample", "PCAResult", "pooled_pca", "median_bandwidth", "kernel_matrix", "mmd2_unbiased",
           "MMDResult", "keyspace_mmd", "JSDResult", "keyspace_jsd", "KeySpaceResult", "keyspace_analysis"]


def _array(x, name: str) -> np.ndarray:
    a = x.detach().cpu().to(torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        fail(f"{name} must be [n, d] (one key vector per row), got shape {a.shape}.")
    if a.shape[0] < 2:
        fail(f"{name} has {a.shape[0]} rows; the unbiased estimators need at least 2 per modality.")
    if not np.isfinite(a).all():
        fail(f"{name} holds nan or inf.")
    return a


def subsample(x, max_n: int = 5000, seed: int | np.random.Generator = 0) -> np.ndarray:
    """At most ``max_n`` rows of x [n, d], drawn without replacement with a fixed seed, in their original order."""
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.shape[0] <= max_n:
        return a
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return a[np.sort(rng.choice(a.shape[0], size=max_n, replace=False))]


@dataclass
class PCAResult(ToDict):
    """a, b: the two modalities' keys in PCA coordinates [n_a, k], [n_b, k] (pooled z-score, PCA fitted on the
    pooled set, components by decreasing variance, each signed so its largest loading is positive);
    explained: the explained-variance ratio of each kept component."""

    a: np.ndarray
    b: np.ndarray
    explained: np.ndarray


def pooled_pca(keys_a, keys_b, n_components: int = 50) -> PCAResult:
    """z-score with the pooled mean / sd (a constant feature becomes 0), then PCA to ``n_components`` via numpy SVD.

    keys_a [n_a, d], keys_b [n_b, d]. Keeps min(n_components, n_a + n_b, d) components."""
    a, b = _array(keys_a, "keys_a"), _array(keys_b, "keys_b")
    if a.shape[1] != b.shape[1]:
        fail(f"keys_a and keys_b have different widths ({a.shape[1]} vs {b.shape[1]}).")
    pooled = np.concatenate([a, b])
    mu, sd = pooled.mean(axis=0), pooled.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    z = (pooled - mu) / sd
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    k = max(1, min(n_components, vt.shape[0]))
    vt = vt[:k]
    sign = np.sign(vt[np.arange(k), np.abs(vt).argmax(axis=1)])
    vt = vt * np.where(sign == 0, 1.0, sign)[:, None]
    var = s ** 2
    explained = var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)
    proj = z @ vt.T
    return PCAResult(proj[: a.shape[0]], proj[a.shape[0]:], explained)


def _sqdist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.maximum(d, 0.0)


def median_bandwidth(z, max_points: int = 2000, seed: int = 0) -> float:
    """Median heuristic: the median pairwise Euclidean distance (i < j) of the rows of z [n, d].

    Above ``max_points`` rows the median is taken on a fixed-seed subsample of that many rows (proposed, for cost).
    Falls back to the mean of the non-zero distances when the median is 0, and to 1.0 when all distances are 0."""
    a = np.asarray(z, dtype=np.float64)
    a = subsample(a, max_points, seed)
    d = np.sqrt(_sqdist(a, a)[np.triu_indices(a.shape[0], 1)])
    if d.size == 0:
        return 1.0
    med = float(np.median(d))
    if med > 0:
        return med
    nz = d[d > 0]
    return float(nz.mean()) if nz.size else 1.0


def kernel_matrix(x, y, kernel: str = "gaussian", bandwidth: float | None = None, degree: int = 3) -> np.ndarray:
    """k(x_i, y_j) as [n_x, n_y] float64.

    ``"gaussian"``: exp(-||x - y||^2 / (2 sigma^2)), sigma = bandwidth; ``"multi_gaussian"``: the mean of the
    Gaussian kernels at sigma in {0.5, 1, 2} x bandwidth; ``"linear"``: x . y; ``"polynomial"``:
    (x . y / d + 1)^degree (degree 3). The Gaussian kernels need a bandwidth (see :func:`median_bandwidth`)."""
    check_choice("kernel", kernel, KERNELS)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if kernel == "linear":
        return x @ y.T
    if kernel == "polynomial":
        return (x @ y.T / x.shape[1] + 1.0) ** degree
    if bandwidth is None or not bandwidth > 0:
        fail(f"kernel={kernel!r} needs a positive bandwidth, got {bandwidth}.")
    d2 = _sqdist(x, y)
    scales = (1.0,) if kernel == "gaussian" else MULTI_SCALES
    return sum(np.exp(-d2 / (2.0 * (s * bandwidth) ** 2)) for s in scales) / len(scales)


def _mmd2_from_kernel(K: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> float:
    m, n = len(ix), len(iy)
    kxx, kyy, kxy = K[np.ix_(ix, ix)], K[np.ix_(iy, iy)], K[np.ix_(ix, iy)]
    sxx = kxx.sum() - np.trace(kxx)
    syy = kyy.sum() - np.trace(kyy)
    return float(sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * kxy.sum() / (m * n))


def mmd2_unbiased(x, y, kernel: str = "gaussian", bandwidth: float | None = None) -> float:
    """Unbiased MMD^2_u = 1/(m(m-1)) sum_{i!=j} k(x_i,x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i,y_j) - 2/(mn) sum k(x_i,y_j).

    x [m, d], y [n, d] (m, n >= 2), used as given. Gaussian kernels without a bandwidth use the median heuristic
    on the pooled rows. Can be negative (clip before taking a square root)."""
    a, b = _array(x, "x"), _array(y, "y")
    pooled = np.concatenate([a, b])
    if kernel in ("gaussian", "multi_gaussian") and bandwidth is None:
        bandwidth = median_bandwidth(pooled)
    K = kernel_matrix(pooled, pooled, kernel, bandwidth)
    return _mmd2_from_kernel(K, np.arange(len(a)), np.arange(len(a), len(pooled)))


@dataclass
class MMDResult(ToDict):
    """mmd = sqrt(max(mmd2, 0)) between the modalities; intra_a / intra_b: mean MMD between random halves of one
    modality (the intra-modal baseline, ``*_splits`` per split; nan below 4 rows); p_value: permutation test on the
    modality labels, (1 + #{perm >= observed}) / (1 + n_permutations); bandwidth: sigma of the Gaussian kernels."""

    mmd: float
    mmd2: float
    p_value: float | None
    intra_a: float
    intra_b: float
    intra_a_splits: list[float] = field(default_factory=list)
    intra_b_splits: list[float] = field(default_factory=list)
    bandwidth: float | None = None
    kernel: str = "gaussian"
    n_a: int = 0
    n_b: int = 0
    n_permutations: int = 0


def _perm_mmd2(K: np.ndarray, m: int, n_perm: int, rng: np.random.Generator, chunk: int = 64) -> np.ndarray:
    N = K.shape[0]
    n = N - m
    diag, colsum = np.diag(K), K.sum(axis=0)
    out = []
    for start in range(0, n_perm, chunk):
        c = min(chunk, n_perm - start)
        X = np.zeros((c, N))
        for r in range(c):
            X[r, rng.permutation(N)[:m]] = 1.0
        Y = 1.0 - X
        KX = X @ K  # [c, N]; K is symmetric, so Y @ K = colsum - X @ K
        sxx = (KX * X).sum(1) - X @ diag
        syy = ((colsum[None, :] - KX) * Y).sum(1) - Y @ diag
        sxy = (KX * Y).sum(1)
        out.append(sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * sxy / (m * n))
    return np.concatenate(out) if out else np.zeros(0)


def _intra(K: np.ndarray, idx: np.ndarray, n_splits: int, rng: np.random.Generator) -> list[float]:
    if len(idx) < 4:
        return [math.nan] * n_splits
    res = []
    for _ in range(n_splits):
        p = rng.permutation(idx)
        h = len(p) // 2
        res.append(math.sqrt(max(_mmd2_from_kernel(K, p[:h], p[h: 2 * h]), 0.0)))
    return res


def _mmd_on(a: np.ndarray, b: np.ndarray, kernel: str, n_permutations: int, n_splits: int,
            seed: int, bandwidth: float | None) -> MMDResult:
    check_choice("kernel", kernel, KERNELS)
    pooled = np.concatenate([a, b])
    if kernel in ("gaussian", "multi_gaussian") and bandwidth is None:
        bandwidth = median_bandwidth(pooled, seed=seed)
    if kernel in ("linear", "polynomial"):
        bandwidth = None
    K = kernel_matrix(pooled, pooled, kernel, bandwidth)
    m = len(a)
    ia, ib = np.arange(m), np.arange(m, len(pooled))
    mmd2 = _mmd2_from_kernel(K, ia, ib)
    rng = np.random.default_rng(seed)
    intra_a, intra_b = _intra(K, ia, n_splits, rng), _intra(K, ib, n_splits, rng)
    p = None
    if n_permutations > 0:
        perm = _perm_mmd2(K, m, n_permutations, rng)
        p = float((1 + np.sum(perm >= mmd2 - 1e-12 * max(1.0, abs(mmd2)))) / (1 + n_permutations))
    return MMDResult(math.sqrt(max(mmd2, 0.0)), mmd2, p, float(np.mean(intra_a)), float(np.mean(intra_b)),
                     intra_a, intra_b, bandwidth, kernel, len(a), len(b), n_permutations)


def _prepare(keys_a, keys_b, preprocess: bool, max_n: int, n_components: int, seed: int):
    a, b = _array(keys_a, "keys_a"), _array(keys_b, "keys_b")
    if not preprocess:
        return a, b, None
    rng = np.random.default_rng(seed)
    pca = pooled_pca(subsample(a, max_n, rng), subsample(b, max_n, rng), n_components)
    return pca.a, pca.b, pca


def keyspace_mmd(keys_a, keys_b, *, kernel: str = "gaussian", max_n: int = 5000, n_components: int = 50,
                 n_permutations: int = 200, n_splits: int = 5, seed: int = 0, bandwidth: float | None = None,
                 preprocess: bool = True) -> MMDResult:
    """MMD between two modalities' keys (docs/methods/keyspace.md, proposed estimator). keys_a [n_a, d], keys_b [n_b, d].

    With ``preprocess`` (default): <= ``max_n`` rows per modality (fixed ``seed``), pooled z-score, PCA to
    ``n_components`` (:func:`pooled_pca`); without it the rows are used as given. Kernel (``kernel``):
    ``"gaussian"`` at the median-heuristic bandwidth of the pooled set (default), options ``"multi_gaussian"``
    ({0.5, 1, 2} x median), ``"linear"``, ``"polynomial"``; see :func:`kernel_matrix`. The intra-modal baselines
    use the same kernel and bandwidth on ``n_splits`` random halves of each modality. ``n_permutations``
    label permutations (proposed default 200, so p >= 1/201; 0 skips the test). Memory: the pooled kernel matrix,
    8 (n_a + n_b)^2 bytes (800 MB at 2 x 5,000 rows). Returns :class:`MMDResult`."""
    a, b, _ = _prepare(keys_a, keys_b, preprocess, max_n, n_components, seed)
    return _mmd_on(a, b, kernel, n_permutations, n_splits, seed, bandwidth)


@dataclass
class JSDResult(ToDict):
    """jsd: the mean over components of ``per_component`` (Jensen-Shannon divergence in bits, in [0, 1])."""

    jsd: float
    per_component: list[float]
    bins: int = 50
    outliers: str = "drop"


def _jsd_on(a: np.ndarray, b: np.ndarray, n_components: int, bins: int, eps: float, lo_pct: float,
            hi_pct: float, outliers: str) -> JSDResult:
    check_choice("outliers", outliers, OUTLIERS)
    if bins < 1:
        fail(f"bins={bins} must be >= 1.")
    k = min(n_components, a.shape[1])
    vals = []
    for c in range(k):
        x, y = a[:, c], b[:, c]
        lo, hi = np.percentile(np.concatenate([x, y]), [lo_pct, hi_pct])
        if not hi > lo:
            vals.append(0.0)
            continue
        if outliers == "clip":
            x, y = np.clip(x, lo, hi), np.clip(y, lo, hi)
        hp, _ = np.histogram(x, bins=bins, range=(lo, hi))
        hq, _ = np.histogram(y, bins=bins, range=(lo, hi))
        p = hp / max(hp.sum(), 1) + eps
        q = hq / max(hq.sum(), 1) + eps
        vals.append(float(jsd(torch.from_numpy(p / p.sum()), torch.from_numpy(q / q.sum()), bits=True)))
    return JSDResult(float(np.mean(vals)), vals, bins, outliers)


def keyspace_jsd(keys_a, keys_b, *, n_components: int = 10, bins: int = 50, eps: float = 1e-10,
                 percentiles: tuple[float, float] = (0.5, 99.5), outliers: str = "drop", max_n: int = 5000,
                 pca_components: int = 50, seed: int = 0, preprocess: bool = True) -> JSDResult:
    """JSD per top PCA component (docs/methods/keyspace.md, proposed estimator), in bits, averaged over the top ``n_components`` (10).

    Per component: one shared histogram of ``bins`` (50) equal bins over the pooled ``percentiles`` (0.5-99.5);
    each modality's bin frequencies + ``eps`` (1e-10), renormalised; JSD in bits. ``outliers``: values outside
    the percentile range are dropped (``"drop"``, default, numpy's histogram range) or put in the edge bins
    (``"clip"``). With ``preprocess`` the keys go through subsampling, pooled z-score and PCA (as
    :func:`keyspace_mmd`); without it the columns are taken as PCA components in order."""
    a, b, _ = _prepare(keys_a, keys_b, preprocess, max_n, pca_components, seed)
    return _jsd_on(a, b, n_components, bins, eps, percentiles[0], percentiles[1], outliers)


@dataclass
class KeySpaceResult(ToDict):
    """mmd and jsd on one shared preprocessing; explained: explained-variance ratio of the kept PCA components."""

    mmd: MMDResult
    jsd: JSDResult
    explained: np.ndarray
    n_a: int
    n_b: int


def keyspace_analysis(keys_a, keys_b, *, kernel: str = "gaussian", max_n: int = 5000, n_components: int = 50,
                      jsd_components: int = 10, bins: int = 50, eps: float = 1e-10, outliers: str = "drop",
                      n_permutations: int = 200, n_splits: int = 5, seed: int = 0) -> KeySpaceResult:
    """Both estimators of docs/methods/keyspace.md on one subsample / z-score / PCA of keys_a [n_a, d] and keys_b [n_b, d]
    (e.g. image-position and text-position keys of one layer, pooled over samples). Which keys to pass is the
    caller's choice: k_proj output pre-RoPE (the default) or post-RoPE, all KV heads concatenated or one KV head.
    Options as in :func:`keyspace_mmd` and :func:`keyspace_jsd`. Returns :class:`KeySpaceResult`."""
    a, b, pca = _prepare(keys_a, keys_b, True, max_n, n_components, seed)
    mmd = _mmd_on(a, b, kernel, n_permutations, n_splits, seed, None)
    jsd = _jsd_on(a, b, jsd_components, bins, eps, 0.5, 99.5, outliers)
    return KeySpaceResult(mmd, jsd, pca.explained, len(a), len(b))
