"""LDAR, the Latent Decision Alignment Rate (docs/methods/ldar.md): does the MAM sign at the instruction anchors match the answer?

TopK instruction aggregation per layer, latent vs final decision, the per-layer rate (chance 0.5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..util import ToDict, check_targets, fail

__all__ = ["topk_positions", "latent_decision", "LDARResult", "ldar"]


def topk_positions(m: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Indices of the K instruction positions with the largest |m_i| along the last axis: [..., n] -> [..., min(k, n)].

    Ties in |m_i| go to the earlier position (stable sort), so the choice is deterministic."""
    if k < 1:
        fail(f"k={k}: TopK needs k >= 1.")
    if m.shape[-1] == 0:
        fail("no instruction positions: a sample needs at least one instruction token for LDAR.")
    order = torch.argsort(-m.abs(), dim=-1, stable=True)
    return order[..., : min(k, m.shape[-1])]


def latent_decision(m: torch.Tensor, k: int = 2) -> torch.Tensor:
    """d^l = sign(mean_{i in S_K} m_i), S_K the K positions with largest |m_i| (proposed TopK aggregation, K=2).

    m: MAM at the instruction positions, [..., n] (e.g. [layers, n] of one sample). Returns [...] in {-1, 0, +1}
    (0 only for an exact tie). Fewer than K positions: all of them are used."""
    idx = topk_positions(m, k)
    return torch.sign(torch.gather(m, -1, idx).mean(dim=-1))


@dataclass
class LDARResult(ToDict):
    """rate[l] = fraction of samples whose latent decision at layer l matches the final decision (chance 0.5).

    by_target: the same rate over the vision-following / text-following samples (when targets were given).
    n_samples: samples counted; n_excluded: samples without a final decision (answer option only)."""

    rate: torch.Tensor
    n_samples: int
    n_excluded: int = 0
    k: int = 2
    final: str = "mam"
    chance: float = 0.5
    by_target: dict[str, torch.Tensor] = field(default_factory=dict)

    def plot(self, path=None, ax=None):
        """The rate per layer, per target, and chance (:func:`arbiter.metrics.plots.plot_ldar`)."""
        from .plots import plot_ldar

        return plot_ldar(self, path=path, ax=ax)


def ldar(mam_instr: torch.Tensor | Sequence[torch.Tensor], final_mam: torch.Tensor | Sequence[float] | None = None,
         *, final_answer: Sequence[int | None] | None = None, k: int = 2,
         targets: Sequence[str] | None = None) -> LDARResult:
    """LDAR^l = mean_s 1[d^l(s) = d*(s)] (docs/methods/ldar.md, proposed operationalisation).

    mam_instr: MAM^l_i at the instruction positions: a tensor [samples, layers, n_instr] or a list of
    [layers, n_i] tensors (samples may differ in n_i). Latent decision per :func:`latent_decision` (TopK, ``k``).
    Final decision d*(s), exactly one of:
      ``final_mam`` [samples]: sign(MAM^L_last(s)) (default reading);
      ``final_answer`` (option): the modality of the generated answer, +1 compliant / -1 competitor / 0 or None
      neither or both (such samples are excluded and counted in ``n_excluded``); see
      :func:`arbiter.metrics.mfr.answer_follows`.
    Decisions are signs in {-1, 0, +1}; an exact zero only matches a zero. targets: optional per-sample
    ``"vision"`` / ``"text"`` for ``by_target``. Returns :class:`LDARResult` with ``rate`` [layers]."""
    per = list(mam_instr.unbind(0)) if isinstance(mam_instr, torch.Tensor) else list(mam_instr)
    n = len(per)
    if n == 0:
        fail("mam_instr holds no samples.")
    if any(x.ndim != 2 for x in per):
        fail("each sample's mam_instr must be [layers, n_instr].")
    layers = per[0].shape[0]
    if any(x.shape[0] != layers for x in per):
        fail("every sample's mam_instr must have the same number of layers.")
    if (final_mam is None) == (final_answer is None):
        fail("give exactly one of final_mam (sign of MAM at the last layer, `last`) or final_answer.")
    if final_mam is not None:
        fm = torch.as_tensor(final_mam, dtype=torch.float64).reshape(-1)
        if fm.numel() != n:
            fail(f"final_mam has {fm.numel()} values for {n} samples.")
        final = torch.sign(fm)
        keep = torch.ones(n, dtype=torch.bool)
        mode = "mam"
    else:
        fa = list(final_answer)  # type: ignore[arg-type]
        if len(fa) != n:
            fail(f"final_answer has {len(fa)} values for {n} samples.")
        vals = []
        for a in fa:
            a = 0 if a is None else int(a)
            if a not in (-1, 0, 1):
                fail(f"final_answer values must be +1 (compliant), -1 (competitor) or 0/None (neither), got {a}.")
            vals.append(a)
        final = torch.tensor(vals, dtype=torch.float64)
        keep = final != 0
        mode = "answer"
    latent = torch.stack([latent_decision(x.to(torch.float64), k) for x in per])  # [samples, layers]
    match = (latent == final[:, None]).to(torch.float64)
    if not bool(keep.any()):
        fail("no sample has a final decision (every final_answer is 0/None); LDAR is undefined.")
    rate = match[keep].mean(dim=0)
    by: dict[str, torch.Tensor] = {}
    if targets is not None:
        tg = check_targets(targets, n)
        for t in ("vision", "text"):
            sel = torch.tensor([x == t for x in tg]) & keep
            if bool(sel.any()):
                by[t] = match[sel].mean(dim=0)
    return LDARResult(rate, int(keep.sum()), int(n - keep.sum()), k, mode, 0.5, by)
