"""Ridge readout of docs/methods/surrogate.md: standardised oscillator features plus an unpenalised intercept predict Lorenz z(t).

λ is chosen per feature subset on a validation split, then the readout is refit and scored by NMSE on the test window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..util import ToDict, check_choice, fail

__all__ = ["FEATURE_FNS", "ReadoutResult", "features", "nmse", "ridge_readout", "windows"]

FEATURE_FNS = {
    "sin": lambda th: np.sin(th),
    "cos": lambda th: np.cos(th),
    "sin2": lambda th: np.sin(2 * th),
    "cos2": lambda th: np.cos(2 * th),
}


def features(theta: np.ndarray, names: Sequence[str] = ("sin",)) -> np.ndarray:
    """Feature matrix [..., T, len(names) * N] from phases [..., T, N]: per name, one column per oscillator."""
    for n in names:
        check_choice("feature", n, tuple(FEATURE_FNS))
    th = np.asarray(theta, dtype=np.float64)
    return np.concatenate([FEATURE_FNS[n](th) for n in names], axis=-1)


def nmse(z: np.ndarray, z_hat: np.ndarray) -> float:
    """Σ (z - ẑ)² / Σ (z - mean z)² over the given samples (predicting the mean gives 1)."""
    z, z_hat = np.asarray(z, dtype=np.float64), np.asarray(z_hat, dtype=np.float64)
    den = float(((z - z.mean()) ** 2).sum())
    if den <= 0:
        fail("nmse: the target is constant over the window; NMSE is undefined.")
    return float(((z - z_hat) ** 2).sum()) / den


def windows(times: np.ndarray, t_fit: float = 20.0, t_train: float = 30.0, t_end: float = 80.0) -> dict:
    """Index arrays of the docs/methods/surrogate.md windows: fit [0, t_fit], validate (t_fit, t_train], train [0, t_train],
    test (t_train, t_end] (a tolerance of 1e-9 on the time grid)."""
    t = np.asarray(times, dtype=np.float64)
    eps = 1e-9
    w = {"fit": np.nonzero((t >= -eps) & (t <= t_fit + eps))[0],
         "val": np.nonzero((t > t_fit + eps) & (t <= t_train + eps))[0],
         "train": np.nonzero((t >= -eps) & (t <= t_train + eps))[0],
         "test": np.nonzero((t > t_train + eps) & (t <= t_end + eps))[0]}
    for k, v in w.items():
        if len(v) < 2:
            fail(f"readout: the {k} window has {len(v)} samples; times cover [{t.min()}, {t.max()}].")
    return w


@dataclass
class ReadoutResult(ToDict):
    """One readout (one system, one feature subset): test-window ``nmse``, chosen ``lam`` (on the mean squared
    loss), validation MSE per λ of the grid ``lambdas``, ``train_nmse`` on [0, t_train] after the refit;
    ``prediction`` over the test window (when asked) and the refit ``weights`` (standardised units) and
    ``intercept``."""

    nmse: float
    lam: float
    lambdas: list
    val_mse: list
    train_nmse: float
    n_features: int
    prediction: np.ndarray | None = None
    weights: np.ndarray | None = None
    intercept: float = 0.0
    extra: dict = field(default_factory=dict)


def _standardise(F: torch.Tensor):
    mu = F.mean(1, keepdim=True)
    sd = F.std(1, unbiased=False, keepdim=True)
    sd = torch.where(sd < 1e-12, torch.ones_like(sd), sd)  # a constant feature stays 0 after centring
    return mu, sd


def _ridge_svd(X: torch.Tensor, yc: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
    """Weights [B, L, P] minimising (1/n)||yc - X w||² + λ||w||² for each λ, by SVD of X [B, n, P]."""
    n = X.shape[1]
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    uty = torch.einsum("bnr,n->br", U, yc)
    coef = S[:, None, :] / (S[:, None, :] ** 2 + n * lams[None, :, None]) * uty[:, None, :]  # [B, L, r]
    return torch.einsum("blr,brp->blp", coef, Vh)


def _as_slice(idx: np.ndarray):
    """A contiguous index range as a slice (indexing with it gives a view); other index arrays unchanged."""
    if len(idx) and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def ridge_readout(F: np.ndarray, z: np.ndarray, times: np.ndarray, *, t_fit: float = 20.0, t_train: float = 30.0,
                  t_end: float = 80.0, lambdas: Sequence[float] = tuple(10.0 ** k for k in range(-8, 1)),
                  keep_prediction: bool = False, keep_weights: bool = False, chunk: int = 16):
    """Ridge readout (docs/methods/surrogate.md). F: features [T, P] or a batch [B, T, P] sharing the target z [T] and ``times`` [T].

    1. standardise on the fit window [0, t_fit] (features with zero spread stay 0), centre z (the intercept is
       not penalised); for every λ of the grid solve min (1/n)||z - X w||² + λ||w||² by SVD (not by normal
       equations) and score the validation window (t_fit, t_train];
    2. take the λ with the lowest validation MSE (the smallest λ on ties), standardise on [0, t_train], refit;
    3. NMSE on the test window (t_train, t_end] against that window's mean.
    Returns a :class:`ReadoutResult` (a list of them for a batch). ``chunk`` systems are solved at a time."""
    F = np.asarray(F, dtype=np.float64)
    single = F.ndim == 2
    if single:
        F = F[None]
    if F.ndim != 3:
        fail(f"ridge_readout: features must be [T, P] or [B, T, P], got shape {F.shape}.")
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    if F.shape[1] != z.size or z.size != len(times):
        fail(f"ridge_readout: features have {F.shape[1]} time samples, z {z.size}, times {len(times)}.")
    lams = np.asarray(list(lambdas), dtype=np.float64)
    if lams.size == 0 or np.any(lams < 0):
        fail("ridge_readout: lambdas must be a non-empty list of values >= 0.")
    w = {k: _as_slice(v) for k, v in windows(times, t_fit, t_train, t_end).items()}  # views, not copies
    zt = torch.as_tensor(z)
    lt = torch.as_tensor(lams)
    test_z = z[w["test"]]
    den_test = float(((test_z - test_z.mean()) ** 2).sum())
    tr_z = z[w["train"]]
    den_train = float(((tr_z - tr_z.mean()) ** 2).sum())
    if den_test <= 0 or den_train <= 0:
        fail("ridge_readout: the target is constant over a window.")
    out = []
    for a in range(0, F.shape[0], chunk):
        Fb = torch.as_tensor(F[a:a + chunk])
        # 1. λ on the validation split
        Ff = Fb[:, w["fit"]]
        mu, sd = _standardise(Ff)
        yf = zt[w["fit"]]
        W = _ridge_svd((Ff - mu) / sd, yf - yf.mean(), lt)  # [b, L, P]
        Xv = (Fb[:, w["val"]] - mu) / sd
        pv = torch.einsum("btp,blp->blt", Xv, W) + yf.mean()
        val = ((pv - zt[w["val"]]) ** 2).mean(-1)  # [b, L]
        best = torch.argmin(val, dim=1)
        # 2. refit on [0, t_train] with the chosen λ
        Ft = Fb[:, w["train"]]
        mu2, sd2 = _standardise(Ft)
        yt = zt[w["train"]]
        Xt = (Ft - mu2) / sd2
        U, S, Vh = torch.linalg.svd(Xt, full_matrices=False)
        n = Xt.shape[1]
        lam_b = lt[best]
        coef = S / (S ** 2 + n * lam_b[:, None]) * torch.einsum("bnr,n->br", U, yt - yt.mean())
        wts = torch.einsum("br,brp->bp", coef, Vh)
        b0 = yt.mean()
        ptr = torch.einsum("btp,bp->bt", Xt, wts) + b0
        pte = torch.einsum("btp,bp->bt", (Fb[:, w["test"]] - mu2) / sd2, wts) + b0
        err_te = ((pte - torch.as_tensor(test_z)) ** 2).sum(-1) / den_test
        err_tr = ((ptr - yt) ** 2).sum(-1) / den_train
        for i in range(Fb.shape[0]):
            out.append(ReadoutResult(
                nmse=float(err_te[i]), lam=float(lam_b[i]), lambdas=lams.tolist(), val_mse=val[i].tolist(),
                train_nmse=float(err_tr[i]), n_features=int(F.shape[2]),
                prediction=pte[i].numpy().copy() if keep_prediction else None,
                weights=wts[i].numpy().copy() if keep_weights else None, intercept=float(b0)))
    return out[0] if single else out
