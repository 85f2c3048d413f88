"""Attention imbalance between two modalities per (layer, head) (docs/methods/imbalance.md, after [MI]; proposed formulas).

Attention mass A_m, output norm N_m = ||W_O^(h) sum_{j in T_m} alpha_{q,j} v_j||, log-ratio heat map and scalar."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from ..errors import GroupError
from ..util import ToDict, check_choice, fail

IMBALANCE_METHODS = ("log_ratio", "share")

__all__ = ["IMBALANCE_METHODS", "ImbalanceResult", "attention_imbalance"]


@dataclass
class ImbalanceResult(ToDict):
    """Heat maps [layers, heads], each the mean over samples: ``imbalance`` (log(N_1/N_2), or the share
    N_1/(N_1+N_2)), ``mass_1``/``mass_2`` (A_m), ``norm_1``/``norm_2`` (N_m); ``per_sample`` [samples, layers, heads];
    ``scalar``: mean over the heat map's cells of |imbalance| (share: of |share - 1/2|, 0 = balanced)."""

    imbalance: torch.Tensor
    scalar: float
    mass_1: torch.Tensor
    mass_2: torch.Tensor
    norm_1: torch.Tensor
    norm_2: torch.Tensor
    per_sample: torch.Tensor
    how: str = "log_ratio"
    per_token: bool = False


def _masks(mask: torch.Tensor, S: int, K: int, name: str) -> torch.Tensor:
    m = torch.as_tensor(mask).to(torch.bool)
    if m.ndim == 1:
        m = m.expand(S, -1)
    if m.shape != (S, K):
        fail(f"{name} must be [keys={K}] or [samples={S}, keys={K}], got {tuple(m.shape)}.")
    if bool((m.sum(dim=-1) == 0).any()):
        raise GroupError(f"{name} selects no key position for some sample: the modality's token set T_m is empty.")
    return m


def attention_imbalance(alpha: torch.Tensor, v: torch.Tensor, W_O: torch.Tensor, mask_1: torch.Tensor,
                        mask_2: torch.Tensor, *, how: str = "log_ratio", per_token: bool = False,
                        eps: float = 0.0) -> ImbalanceResult:
    """Imbalance of modality 1 vs modality 2 in every (layer, head) for one query position (default ``last``).

    alpha: the attention row of the query, [layers, heads, keys] or [samples, layers, heads, keys];
    v: value vectors [layers, kv_heads, keys, head_dim] (with a leading samples axis when alpha has one);
    grouped-query heads are mapped as in transformers' repeat_kv (head h reads kv head h // (heads / kv_heads));
    W_O: o_proj weights [layers, hidden, heads*head_dim]; mask_1 / mask_2: T_m1 / T_m2 as boolean [keys] or
    [samples, keys].
    A_m = sum_{j in T_m} alpha_{q,j}; N_m = ||W_O^(h) sum_{j in T_m} alpha_{q,j} v_j||_2.
    ``how`` (proposed): ``"log_ratio"`` log(N_1/N_2) (default), ``"share"`` N_1/(N_1+N_2). ``per_token``
    (option): divide A_m and N_m by |T_m| first. eps: added to N_1 and N_2 before the ratio (default 0, so an
    all-zero side gives +-inf, reported as None by ``to_dict``). Returns :class:`ImbalanceResult`."""
    check_choice("how", how, IMBALANCE_METHODS)
    if alpha.ndim == 3:
        alpha, v = alpha[None], v[None]
    if alpha.ndim != 4 or v.ndim != 5:
        fail(f"alpha must be [(samples,) layers, heads, keys] and v [(samples,) layers, kv_heads, keys, head_dim], "
             f"got {tuple(alpha.shape)} and {tuple(v.shape)}.")
    S, L, H, K = alpha.shape
    KV, D = v.shape[2], v.shape[4]
    if v.shape[0] != S or v.shape[1] != L or v.shape[3] != K or KV == 0 or H % KV:
        fail(f"v {tuple(v.shape)} does not fit alpha {tuple(alpha.shape)} (kv_heads must divide heads).")
    if W_O.ndim != 3 or W_O.shape[0] != L or W_O.shape[2] != H * D:
        fail(f"W_O must be [layers={L}, hidden, heads*head_dim={H * D}], got {tuple(W_O.shape)}.")
    m1, m2 = _masks(mask_1, S, K, "mask_1"), _masks(mask_2, S, K, "mask_2")
    a = alpha.to(torch.float64)
    vv = v.to(torch.float64).repeat_interleave(H // KV, dim=2)  # [S, L, H, K, D]
    Wo = rearrange(W_O.to(torch.float64), "l e (h d) -> l h e d", h=H)

    def side(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = a * m[:, None, None, :].to(torch.float64)  # [S, L, H, K]
        mass = w.sum(dim=-1)
        z = torch.einsum("slhk,slhkd->slhd", w, vv)
        norm = torch.linalg.vector_norm(torch.einsum("lhed,slhd->slhe", Wo, z), dim=-1)
        if per_token:
            cnt = m.sum(dim=-1).to(torch.float64)[:, None, None]
            mass, norm = mass / cnt, norm / cnt
        return mass, norm

    A1, N1 = side(m1)
    A2, N2 = side(m2)
    n1, n2 = N1 + eps, N2 + eps
    if how == "log_ratio":
        imb = torch.log(n1) - torch.log(n2)
        heat = imb.mean(dim=0)
        scalar = float(heat.abs().mean())
    else:
        imb = n1 / (n1 + n2)
        heat = imb.mean(dim=0)
        scalar = float((heat - 0.5).abs().mean())
    return ImbalanceResult(heat, scalar, A1.mean(0), A2.mean(0), N1.mean(0), N2.mean(0), imb, how, per_token)
