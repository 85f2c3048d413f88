"""Logit lens z(h), the modality signal Phi_m and the Modality Arbitration Margin (docs/methods/logit-lens.md and docs/methods/mam.md).

Also the attention / MLP split of a layer's MAM change and the per-target averaging of MAM profiles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..util import ToDict, as_ids, check_choice, check_vocab, fail, target_means

SIGNALS = ("mean", "max", "logsumexp_prob")

__all__ = ["SIGNALS", "logit_lens", "signal", "mam", "mam_from_hidden", "MAMComponents", "mam_components",
           "TargetProfile", "mam_by_target"]


def _check_wu(W_U: torch.Tensor, hidden: int) -> None:
    if W_U.ndim != 2 or W_U.shape[1] != hidden:
        fail(f"W_U must be the unembedding [vocab, hidden] (lm_head.weight) with hidden={hidden}, "
             f"got shape {tuple(W_U.shape)}.")


def logit_lens(h: torch.Tensor, final_norm: Callable[[torch.Tensor], torch.Tensor], W_U: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """z(h) = W_U . Norm_final(h): the model's own final norm and unembedding applied to residual vectors.

    h: [..., hidden]; final_norm: the model's final norm module (or any callable; pass ``lambda x: x``
    for none); W_U: [vocab, hidden], i.e. ``lm_head.weight``; bias: optional [vocab] lm_head bias.
    Returns the logits [..., vocab], computed in W_U's dtype."""
    _check_wu(W_U, h.shape[-1])
    normed = final_norm(h).to(W_U.dtype)
    return torch.nn.functional.linear(normed, W_U, bias)


def signal(z: torch.Tensor, ids: Sequence[int], how: str = "mean") -> torch.Tensor:
    """Phi_m: the signal of one modality from logits z [..., vocab] and its answer ids D_m. Returns [...].

    (proposed; the paper's exact aggregation is unknown) ``how``:
    ``"mean"`` (default) mean_{v in D_m} z_v; ``"max"`` max_{v in D_m} z_v;
    ``"logsumexp_prob"`` log sum_{v in D_m} softmax(z)_v, the log-probability of the whole set."""
    check_choice("how", how, SIGNALS)
    idx = as_ids(ids, "ids")
    check_vocab(idx, z.shape[-1], "ids")
    sel = z[..., idx]
    if how == "mean":
        return sel.mean(dim=-1)
    if how == "max":
        return sel.amax(dim=-1)
    zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return torch.logsumexp(zf[..., idx], dim=-1) - torch.logsumexp(zf, dim=-1)


def mam(z: torch.Tensor, ids_p: Sequence[int], ids_c: Sequence[int], how: str = "mean") -> torch.Tensor:
    """MAM = Phi_p(z) - Phi_c(z) from logits z [..., vocab] (docs/methods/mam.md). Returns [...]; > 0 leans to the compliant answer.

    ids_p / ids_c: the token ids of D_p (instruction-compliant answer) and D_c (competitor).
    ``how`` picks the signal Phi (proposed; see :func:`signal`)."""
    return signal(z, ids_p, how) - signal(z, ids_c, how)


def mam_from_hidden(h: torch.Tensor, final_norm: Callable[[torch.Tensor], torch.Tensor], W_U: torch.Tensor,
                    ids_p: Sequence[int], ids_c: Sequence[int], how: str = "mean",
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """MAM^l_t of residual vectors h [..., hidden] (e.g. [layers, positions, hidden] of one sample). Returns [...].

    Same value as ``mam(logit_lens(h, final_norm, W_U, bias), ids_p, ids_c, how)``; for ``"mean"`` and ``"max"``
    only the rows of W_U in D_p and D_c are used, so no [..., vocab] tensor is built."""
    check_choice("how", how, SIGNALS)
    if how == "logsumexp_prob":
        return mam(logit_lens(h, final_norm, W_U, bias), ids_p, ids_c, how)
    _check_wu(W_U, h.shape[-1])
    p, c = as_ids(ids_p, "ids_p"), as_ids(ids_c, "ids_c")
    check_vocab(p, W_U.shape[0], "ids_p")
    check_vocab(c, W_U.shape[0], "ids_c")
    rows = p + c
    z = logit_lens(h, final_norm, W_U[rows], None if bias is None else bias[rows])
    zp, zc = z[..., : len(p)], z[..., len(p):]
    if how == "mean":
        return zp.mean(dim=-1) - zc.mean(dim=-1)
    return zp.amax(dim=-1) - zc.amax(dim=-1)


@dataclass
class MAMComponents(ToDict):
    """MAM at the three points of a layer and the attention / MLP contributions (all of the input's leading shape).

    attn = MAM(h_mid) - MAM(h_in); mlp = MAM(h_out) - MAM(h_mid); attn + mlp = out - in exactly up to rounding."""

    mam_in: torch.Tensor
    mam_mid: torch.Tensor
    mam_out: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    how: str = "mean"

    def plot(self, path=None, ax=None, layer_dim: int = 0):
        """Attention / MLP contributions per layer (``layer_dim`` of the tensors; the other dimensions averaged)
        and the MAM after it (:func:`arbiter.metrics.plots.plot_mam_components`)."""
        from .plots import plot_mam_components

        return plot_mam_components(self, path=path, ax=ax, layer_dim=layer_dim)


def mam_components(h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                   final_norm: Callable[[torch.Tensor], torch.Tensor], W_U: torch.Tensor,
                   ids_p: Sequence[int], ids_c: Sequence[int], how: str = "mean",
                   bias: torch.Tensor | None = None) -> MAMComponents:
    """Attention / MLP split of the MAM change in each layer (proposed, after the [IA] authors' notes).

    h_in: the layer's input residual, h_mid = h_in + Attn(h_in), h_out = h_mid + MLP(h_mid); each
    [..., hidden] with the same shape, e.g. [layers, positions, hidden].
    dMAM_attn = MAM(h_mid) - MAM(h_in), dMAM_mlp = MAM(h_out) - MAM(h_mid) (the MLP contribution is the logit
    difference before vs after the MLP). "Semantic inertia" = mlp < 0 in deep layers."""
    if not (h_in.shape == h_mid.shape == h_out.shape):
        fail(f"h_in, h_mid, h_out must have one shape, got {tuple(h_in.shape)}, {tuple(h_mid.shape)}, "
             f"{tuple(h_out.shape)}.")
    m_in, m_mid, m_out = (mam_from_hidden(x, final_norm, W_U, ids_p, ids_c, how, bias) for x in (h_in, h_mid, h_out))
    return MAMComponents(m_in, m_mid, m_out, m_mid - m_in, m_out - m_mid, how)


@dataclass
class TargetProfile(ToDict):
    """A per-sample quantity averaged over samples: ``all`` (mean of the per-target means), and per target."""

    all: torch.Tensor
    vision: torch.Tensor | None = None
    text: torch.Tensor | None = None
    n_vision: int = 0
    n_text: int = 0

    def plot(self, path=None, ax=None):
        """Lines per target (per layer), a heat map, or bars (:func:`arbiter.metrics.plots.plot_profile`)."""
        from .plots import plot_profile

        return plot_profile(self, path=path, ax=ax)


def mam_by_target(values: torch.Tensor | Sequence[torch.Tensor], targets: Sequence[str] | None = None) -> TargetProfile:
    """Average MAM profiles over samples, split by target modality (docs/methods/mam.md).

    values: [samples, ...] (e.g. [samples, layers] MAM at ``last``) or a list of equally shaped tensors.
    targets: ``"vision"`` / ``"text"`` per sample. ``all`` is the mean of the vision mean and the text mean (each
    target weighs the same whatever its sample count); without targets it is the plain mean."""
    v = torch.stack(list(values)) if not isinstance(values, torch.Tensor) else values
    if v.shape[0] == 0:
        fail("values holds no samples.")
    overall, by = target_means(v, targets)
    n_v = sum(1 for t in targets if t == "vision") if targets is not None else 0
    n_t = sum(1 for t in targets if t == "text") if targets is not None else 0
    return TargetProfile(overall, by.get("vision"), by.get("text"), n_v, n_t)
