"""I_NSSD, the Normalized Signed Structural Divergence of an intervention (docs/methods/i-nssd.md), and its options.

pi = P(D_p) / (P(D_p) + P(D_c)) from next-token probabilities; an exactly zero-safe Jensen-Shannon divergence."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..util import ToDict, as_ids, check_choice, check_vocab, fail, per_sample_ids

NSSD_METHODS = ("signed_jsd", "normalised_signed_change", "relative_change", "three_outcome")
LN2 = math.log(2.0)

__all__ = ["NSSD_METHODS", "answer_prob", "compliance_prob", "jsd", "NSSDResult", "nssd_values", "i_nssd",
           "i_nssd_from_probs"]


def answer_prob(probs: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """P(D) = sum_{v in D} P(v) from next-token probabilities [..., vocab]; repeated ids count once. Returns [...]
    (float64)."""
    idx = as_ids(ids, "ids")
    check_vocab(idx, probs.shape[-1], "ids")
    return probs.to(torch.float64)[..., idx].sum(dim=-1)


def compliance_prob(probs: torch.Tensor, ids_p: Sequence[int], ids_c: Sequence[int]) -> torch.Tensor:
    """pi = P(D_p) / (P(D_p) + P(D_c)) from next-token probabilities [..., vocab] at ``last``. Returns [...] float64.

    Raises when P(D_p) + P(D_c) is exactly 0 somewhere (pi undefined)."""
    pp, pc = answer_prob(probs, ids_p), answer_prob(probs, ids_c)
    tot = pp + pc
    if bool((tot <= 0).any()):
        fail("P(D_p) + P(D_c) is 0 for some sample: pi is undefined; check the answer ids (or use log-space logits).")
    return pp / tot


def jsd(p: torch.Tensor, q: torch.Tensor, *, bits: bool = False) -> torch.Tensor:
    """Jensen-Shannon divergence along the last axis of two distributions [..., k]; nats (or bits). Returns [...].

    Computed in float64 as 1/2 KL(p||m) + 1/2 KL(q||m) with 0 log 0 = 0; identical rows give exactly 0.0
    (m = (p+p)/2 = p exactly, and identical rows are also set to 0 explicitly), never 1e-17."""
    p, q = torch.broadcast_tensors(p.to(torch.float64), q.to(torch.float64))
    m = (p + q) / 2

    def term(x: torch.Tensor) -> torch.Tensor:   # x log(x / m), 0 where x = 0
        # m underflows to 0 only where x is the smallest subnormal and the other side 0: there x / m is exactly 2
        ratio = torch.where(m > 0, torch.where(x > 0, x, 1.0) / torch.where(m > 0, m, 1.0), 2.0)
        return torch.where(x > 0, x * torch.log(ratio), 0.0)
    tp, tq = term(p), term(q)
    out = (0.5 * (tp.sum(dim=-1) + tq.sum(dim=-1))).clamp(0.0, LN2)
    out = torch.where((p == q).all(dim=-1), torch.zeros_like(out), out)
    return out / LN2 if bits else out


def _binary(pi: torch.Tensor) -> torch.Tensor:
    return torch.stack([pi, 1.0 - pi], dim=-1)


def _check_pi(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    if not bool(torch.isfinite(x).all()) or bool((x < 0).any()) or bool((x > 1).any()):
        fail(f"{name} must hold probabilities in [0, 1].")
    return x


def nssd_values(pi: torch.Tensor | Sequence[float], pi_prime: torch.Tensor | Sequence[float],
                how: str = "signed_jsd") -> torch.Tensor:
    """Per-sample values of the binary I_NSSD variants; pi, pi_prime: [...] -> [...] float64.

    ``"signed_jsd"`` (default, proposed): sign(pi' - pi) * JSD(B||B') / ln 2 in [-1, 1], B = (pi, 1 - pi);
    ``"normalised_signed_change"``: (pi' - pi)/pi if pi' < pi else (pi' - pi)/(1 - pi), in [-1, 1];
    ``"relative_change"``: (pi' - pi)/pi * 100 (Zhang et al. 2025); nan where pi = 0 < pi' (undefined).
    A no-op (pi' == pi) gives exactly 0.0 in every variant. ``"three_outcome"`` needs the full distribution:
    use :func:`i_nssd_from_probs`."""
    check_choice("how", how, NSSD_METHODS)
    if how == "three_outcome":
        fail("how='three_outcome' needs P(D_p), P(D_c) and the rest: call i_nssd_from_probs with probabilities.")
    a, b = _check_pi(pi, "pi"), _check_pi(pi_prime, "pi_prime")
    a, b = torch.broadcast_tensors(a, b)
    d = b - a
    if how == "signed_jsd":
        return torch.sign(d) * (jsd(_binary(a), _binary(b)) / LN2).clamp(0.0, 1.0)
    if how == "normalised_signed_change":
        down = d / torch.where(a > 0, a, 1.0)
        up = d / torch.where(a < 1, 1.0 - a, 1.0)
        return torch.where(d == 0, torch.zeros_like(d), torch.where(d < 0, down, up))
    rel = d / torch.where(a > 0, a, 1.0) * 100.0
    return torch.where(d == 0, torch.zeros_like(d), torch.where(a > 0, rel, torch.full_like(d, math.nan)))


@dataclass
class NSSDResult(ToDict):
    """value: mean of ``per_sample`` over the samples where it is defined; n: samples counted;
    n_undefined: samples left out (relative change with pi = 0 < pi'); how: the variant."""

    value: float
    per_sample: torch.Tensor
    n: int
    n_undefined: int = 0
    how: str = "signed_jsd"

    def plot(self, path=None, ax=None):
        """Per-sample I_NSSD histogram and its mean (:func:`arbiter.metrics.plots.plot_nssd`)."""
        from .plots import plot_nssd

        return plot_nssd(self, path=path, ax=ax)


def _result(vals: torch.Tensor, how: str) -> NSSDResult:
    vals = vals.reshape(-1)
    if vals.numel() == 0:
        fail("no samples given.")
    ok = torch.isfinite(vals)
    n = int(ok.sum())
    value = float(vals[ok].mean()) if n else math.nan
    return NSSDResult(value, vals, n, int(vals.numel() - n), how)


def i_nssd(pi: torch.Tensor | Sequence[float], pi_prime: torch.Tensor | Sequence[float],
           how: str = "signed_jsd") -> NSSDResult:
    """I_NSSD averaged over samples from clean pi and intervened pi' ([samples] each). See :func:`nssd_values`.

    docs/methods/i-nssd.md (proposed formula): I_NSSD = sign(pi' - pi) * JSD(B||B') / ln 2, B = (pi, 1 - pi) (the "binary
    distribution constraint"); negative = the intervention hurts modality following. Returns :class:`NSSDResult`."""
    return _result(nssd_values(pi, pi_prime, how), how)


def i_nssd_from_probs(probs: torch.Tensor, probs_prime: torch.Tensor, ids_p, ids_c, how: str = "signed_jsd",
                      *, from_logits: bool = False) -> NSSDResult:
    """I_NSSD from next-token distributions at ``last``, final layer: probs, probs_prime [samples, vocab].

    ids_p / ids_c: one id list shared by all samples, or one list per sample (D_p, D_c).
    from_logits: apply a softmax first. ``how`` as in :func:`nssd_values`, plus the ablation
    ``"three_outcome"`` (no binary constraint): sign(pi' - pi) * JSD(T||T') / ln 2 with
    T = (P(D_p), P(D_c), 1 - P(D_p) - P(D_c)); the sign still comes from pi (proposed). Returns :class:`NSSDResult`."""
    check_choice("how", how, NSSD_METHODS)
    if probs.shape != probs_prime.shape or probs.ndim != 2:
        fail(f"probs and probs_prime must both be [samples, vocab], got {tuple(probs.shape)} and "
             f"{tuple(probs_prime.shape)}.")
    if from_logits:
        probs = torch.softmax(probs.to(torch.float64), dim=-1)
        probs_prime = torch.softmax(probs_prime.to(torch.float64), dim=-1)
    n = probs.shape[0]
    P, C = per_sample_ids(ids_p, n, "ids_p"), per_sample_ids(ids_c, n, "ids_c")
    pp = torch.stack([answer_prob(probs[s], P[s]) for s in range(n)])
    pc = torch.stack([answer_prob(probs[s], C[s]) for s in range(n)])
    pp2 = torch.stack([answer_prob(probs_prime[s], P[s]) for s in range(n)])
    pc2 = torch.stack([answer_prob(probs_prime[s], C[s]) for s in range(n)])
    if bool(((pp + pc) <= 0).any()) or bool(((pp2 + pc2) <= 0).any()):
        fail("P(D_p) + P(D_c) is 0 for some sample: pi is undefined; check the answer ids.")
    pi, pi2 = pp / (pp + pc), pp2 / (pp2 + pc2)
    if how != "three_outcome":
        return _result(nssd_values(pi.clamp(0, 1), pi2.clamp(0, 1), how), how)
    t1 = torch.stack([pp, pc, (1.0 - pp - pc).clamp_min(0.0)], dim=-1)
    t2 = torch.stack([pp2, pc2, (1.0 - pp2 - pc2).clamp_min(0.0)], dim=-1)
    vals = torch.sign(pi2 - pi) * (jsd(t1, t2) / LN2).clamp(0.0, 1.0)
    return _result(vals, how)
