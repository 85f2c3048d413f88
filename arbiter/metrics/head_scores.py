"""Arbitration-head scores (docs/methods/mfr.md): direct logit attribution of each head on the MAM direction at ``last``.

TopG selection and the ranking comparisons (Spearman, top-k overlap) used against the exhaustive sweep."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from einops import rearrange
from scipy.stats import rankdata

from ..util import ToDict, as_ids, check_vocab, fail, per_sample_ids, target_means

__all__ = ["HeadScores", "answer_direction", "head_scores", "top_g", "spearman", "topk_overlap"]


def answer_direction(W_U: torch.Tensor, ids_p: Sequence[int], ids_c: Sequence[int]) -> torch.Tensor:
    """u = mean_{v in D_p} W_U[v] - mean_{v in D_c} W_U[v]; W_U [vocab, hidden] -> u [hidden] (float64)."""
    p, c = as_ids(ids_p, "ids_p"), as_ids(ids_c, "ids_c")
    check_vocab(p, W_U.shape[0], "ids_p")
    check_vocab(c, W_U.shape[0], "ids_c")
    W = W_U.to(torch.float64)
    return W[p].mean(dim=0) - W[c].mean(dim=0)


@dataclass
class HeadScores(ToDict):
    """score [layers, heads]: mean over samples per target modality, then the average of those means (plain mean
    without targets); per_sample [samples, layers, heads]: c^{l,h}(s); by_target: target -> [layers, heads]."""

    score: torch.Tensor
    per_sample: torch.Tensor
    by_target: dict[str, torch.Tensor] = field(default_factory=dict)

    def plot(self, path=None, ax=None):
        """Heat map of the [layers, heads] score (:func:`arbiter.metrics.plots.plot_score_grid`)."""
        from .plots import plot_score_grid

        return plot_score_grid(self.score, title="DLA head score (MAM direction)", path=path, ax=ax)


def head_scores(head_out: torch.Tensor, W_O: torch.Tensor, W_U: torch.Tensor, ids_p, ids_c,
                gamma_final: torch.Tensor, h_final: torch.Tensor, targets: Sequence[str] | None = None,
                *, eps: float = 0.0) -> HeadScores:
    """DLA head score on the MAM direction (docs/methods/mfr.md, proposed): c^{l,h}(s) = u . (gamma_final * o^{l,h}) / rms(h^L_last).

    head_out: the per-head outputs at ``last`` (the o_proj input, split by head) [samples, layers, heads, head_dim];
    W_O: o_proj weights [layers, hidden, heads*head_dim]; o^{l,h} = W_O[l][:, h*d:(h+1)*d] . head_out[s, l, h].
    W_U: [vocab, hidden]; ids_p / ids_c: D_p / D_c ids, one shared list or one list per sample; u per
    :func:`answer_direction`. gamma_final [hidden]: the final RMSNorm's effective scale (as
    ``lens.facts.norm_scale(final_norm, hidden)`` reads it off the module); h_final [samples, hidden]: the final residual h^L at ``last`` of the clean
    run, which freezes the norm's scale. rms(h) = sqrt(mean(h^2) + eps): pass the model's norm eps to match
    it exactly (default 0). targets: optional ``"vision"``/``"text"`` per sample; the score is averaged per target
    then across targets. Alternatives named in docs/methods/arbitration-heads.md (exhaustive single-head blocking, attribution patching)
    are experiments on a model, not pure functions: this DLA is the cheap estimator to be checked against them."""
    if head_out.ndim != 4:
        fail(f"head_out must be [samples, layers, heads, head_dim], got shape {tuple(head_out.shape)}.")
    S, L, H, D = head_out.shape
    if W_O.ndim != 3 or W_O.shape[0] != L or W_O.shape[2] != H * D:
        fail(f"W_O must be [layers={L}, hidden, heads*head_dim={H * D}], got {tuple(W_O.shape)}.")
    hidden = W_O.shape[1]
    if W_U.ndim != 2 or W_U.shape[1] != hidden:
        fail(f"W_U must be [vocab, hidden={hidden}], got {tuple(W_U.shape)}.")
    if gamma_final.shape != (hidden,):
        fail(f"gamma_final must be [hidden={hidden}], got {tuple(gamma_final.shape)}.")
    if h_final.shape != (S, hidden):
        fail(f"h_final must be [samples={S}, hidden={hidden}], got {tuple(h_final.shape)}.")
    P, C = per_sample_ids(ids_p, S, "ids_p"), per_sample_ids(ids_c, S, "ids_c")
    u = torch.stack([answer_direction(W_U, P[s], C[s]) for s in range(S)])  # [S, hidden]
    Wo = rearrange(W_O.to(torch.float64), "l e (h d) -> l h e d", h=H)
    o = torch.einsum("lhed,slhd->slhe", Wo, head_out.to(torch.float64))  # [S, L, H, hidden]
    hf = h_final.to(torch.float64)
    rms = torch.sqrt(hf.pow(2).mean(dim=-1) + eps)  # [S]
    if bool((rms <= 0).any()):
        fail("h_final has an all-zero row: rms is 0 and the score is undefined (pass eps > 0).")
    ug = u * gamma_final.to(torch.float64)  # [S, hidden]
    c = torch.einsum("se,slhe->slh", ug, o) / rms[:, None, None]
    score, by = target_means(c, targets)
    return HeadScores(score, c, by)


def _flat_scores(scores) -> np.ndarray:
    if isinstance(scores, HeadScores):
        scores = scores.score
    a = scores.detach().cpu().to(torch.float64).numpy() if isinstance(scores, torch.Tensor) \
        else np.asarray(scores, dtype=np.float64)
    if np.isnan(a).any():
        fail("scores hold nan: rank only finite scores.")
    return a


def _order(flat: np.ndarray) -> np.ndarray:
    """Indices by descending score; equal scores keep index order (stable)."""
    return np.argsort(-flat, kind="stable")


def top_g(scores, fraction: float = 0.05, *, k: int | None = None) -> list[tuple[int, int]]:
    """TopG: the (layer, head) pairs of the highest-scoring heads, best first. scores: [layers, heads] (or HeadScores).

    Count = round(fraction * layers * heads) (halves up), at least 1 (5% of 784 heads = 39, of 1024 = 51);
    ``k`` overrides the count. Ties are broken by (layer, head) ascending."""
    a = _flat_scores(scores)
    if a.ndim != 2:
        fail(f"scores must be [layers, heads], got shape {a.shape}.")
    n = a.size
    if k is None:
        if not (0 < fraction <= 1):
            fail(f"fraction={fraction} must be in (0, 1].")
        k = max(1, int(math.floor(fraction * n + 0.5 + 1e-9)))
    if not (1 <= k <= n):
        fail(f"k={k} must be between 1 and the number of heads ({n}).")
    heads = a.shape[1]
    return [(int(i // heads), int(i % heads)) for i in _order(a.reshape(-1))[:k]]


def spearman(a, b) -> float:
    """Spearman rank correlation of two score arrays of one shape (flattened), average ranks for ties.

    Returns nan when either array is constant (the correlation is undefined)."""
    x, y = _flat_scores(a).reshape(-1), _flat_scores(b).reshape(-1)
    if x.shape != y.shape:
        fail(f"a and b must have the same number of entries, got {x.size} and {y.size}.")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else math.nan


def topk_overlap(a, b, k: int) -> float:
    """|top_k(a) & top_k(b)| / k: the share of a's k best entries (flattened) that are also among b's k best.

    Same tie-breaking as :func:`top_g`; multiply by k for the count ("1 of 3")."""
    x, y = _flat_scores(a).reshape(-1), _flat_scores(b).reshape(-1)
    if x.shape != y.shape:
        fail(f"a and b must have the same number of entries, got {x.size} and {y.size}.")
    if not (1 <= k <= x.size):
        fail(f"k={k} must be between 1 and {x.size}.")
    return len(set(_order(x)[:k].tolist()) & set(_order(y)[:k].tolist())) / k
