"""The effect of any intervention on modality following (docs/methods/i-nssd.md and docs/methods/mfr.md): I_NSSD and MFR of conflict samples, clean
against intervened, for a probe, a context manager or a factory of them (knockouts, head edits, steering, your own)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..data import ConflictSample
from ..errors import InterventionError
from ..metrics import MFRResult, NSSDResult, i_nssd_from_probs, mention_counts, mfr_from_follows, mfr_from_pi
from ..util import jsonable
from ..probes.base import Probe
from .common import batch_plan, batches, clean_metric, per_sample, require_conflicts


@dataclass
class InterventionEffect:
    """``nssd``: I_NSSD over the samples (``how`` variant; negative = the intervention lowers π, docs/methods/i-nssd.md) and
    ``nssd_by_target`` (vision / text); ``mfr_clean`` / ``mfr``: MFR from π > 0.5 without / with the intervention;
    ``mfr_generated_clean`` / ``mfr_generated``: MFR from greedy generation (when asked); ``pi`` / ``pi_prime``:
    per-sample π clean / intervened."""

    nssd: NSSDResult
    nssd_by_target: dict
    mfr_clean: MFRResult
    mfr: MFRResult
    pi: torch.Tensor
    pi_prime: torch.Tensor
    sample_ids: list
    targets: list
    mfr_generated_clean: MFRResult | None = None
    mfr_generated: MFRResult | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return jsonable({"nssd": self.nssd.value, "nssd_how": self.nssd.how, "nssd_n": self.nssd.n,
                         "nssd_undefined": self.nssd.n_undefined, "nssd_by_target": self.nssd_by_target,
                         "mfr_clean": self.mfr_clean.to_dict(), "mfr": self.mfr.to_dict(),
                         "mfr_generated_clean": self.mfr_generated_clean.to_dict() if self.mfr_generated_clean
                         else None,
                         "mfr_generated": self.mfr_generated.to_dict() if self.mfr_generated else None,
                         "sample_ids": self.sample_ids, "targets": self.targets, "pi": self.pi,
                         "pi_prime": self.pi_prime, **self.extra})

    def plot(self, path=None, axes=None):
        """Per-sample I_NSSD and MFR clean against intervened, overall and per target."""
        from ..metrics.plots import figure_axes, finish

        fig, (a0, a1) = figure_axes(axes, 2, (10, 3.4))
        self.nssd.plot(ax=a0)
        labels = ["overall", "vision", "text"]
        x = torch.arange(3).float()
        for off, (name, r) in ((-0.2, ("clean", self.mfr_clean)), (0.2, ("intervened", self.mfr))):
            vals = [r.overall, r.vision, r.text]
            a1.bar((x + off).tolist(), [float("nan") if v is None else v for v in vals], 0.4, label=name)
        a1.set_xticks(range(3), labels)
        a1.set(title="MFR (π > 0.5)", ylabel="MFR", ylim=(0, 1.05))
        a1.legend(fontsize=8)
        return finish(fig, path)


def _activate(lens, intervention) -> contextlib.AbstractContextManager:
    if isinstance(intervention, Probe):
        return lens.probe(intervention)
    if hasattr(intervention, "__enter__") and hasattr(intervention, "__exit__"):
        return intervention
    if callable(intervention):
        made = intervention()
        if isinstance(made, Probe):
            return lens.probe(made)
        if hasattr(made, "__enter__") and hasattr(made, "__exit__"):
            return made
        raise InterventionError(f"the intervention factory returned {type(made).__name__}: it must return a "
                                "context manager (e.g. lens.knockout(...)) or a Probe.")
    raise InterventionError(f"intervention {intervention!r} is not a Probe, a context manager or a factory of them; "
                            "e.g. intervention_effect(lens, samples, lambda: lens.knockout('image', 'last')).")


def _answer_probs(lens, samples, batch_size, dataset, desc: str = "batches", progress: bool = False) -> torch.Tensor:
    """[samples, 3] (P(D_p), P(D_c), the rest) at the last position, float64."""
    from ..progress import progress_bar

    def part_results(part):
        out = []
        for item in progress_bar(batches(lens, part, batch_size, dataset), desc,
                                 total=len(batch_plan(part, batch_size)), progress=progress):
            logits = clean_metric(lens, item.batch.inputs, lambda z: z[:, -1])
            p = torch.softmax(logits.float().cpu().double(), dim=-1)
            pp = torch.stack([p[i, ids].sum() for i, ids in enumerate(item.ids_p)])
            pc = torch.stack([p[i, ids].sum() for i, ids in enumerate(item.ids_c)])
            out.append(torch.stack([pp, pc, (1.0 - pp - pc).clamp_min(0.0)], dim=1))
        return torch.cat(out)
    return per_sample(part_results, samples, batch_size)


def intervention_effect(lens, samples: Sequence[ConflictSample], intervention: Probe | Callable[[], Any] | Any,
                        how: str = "signed_jsd", generate: bool = False, batch_size: int = 8,
                        dataset=None, progress: bool = True) -> InterventionEffect:
    """I_NSSD and MFR of ``intervention`` on the conflict samples.

    ``intervention``: a :class:`~arbiter.Probe` (activated on its own layers), a context manager (entered once
    around the intervened runs: ``lens.knockout(...)``, ``lens.block_heads(...)``, ``lens.steer(plan)``, a
    ``contextlib.ExitStack`` of several), or a zero-argument factory of either. ``how``: the I_NSSD variant
    (:data:`arbiter.metrics.NSSD_METHODS`, the three-outcome ablation included). ``generate``: also the MFR from
    greedy generation, clean and intervened (docs/methods/mfr.md), read at the first answer entity, with the both / neither
    counts in their ``answers``. ``progress``: labelled bars over the batches. A no-op intervention gives I_NSSD exactly 0; samples and
    batches are those of every other experiment (:func:`arbiter.experiments.common.batches`), and the per-sample
    results (``sample_ids``, ``pi``, ...) are in their batch order (those with an image and those without
    grouped apart, each group in the given order)."""
    samples = require_conflicts(samples, "intervention_effect()")
    samples = [samples[i] for b in batch_plan(samples, batch_size) for i in b]  # the order results come back in
    targets = [s.target for s in samples]
    clean = _answer_probs(lens, samples, batch_size, dataset, "intervention: clean run, batches", progress)
    gen_clean = gen = None
    if generate:
        from .baseline import evaluate

        gen_clean = evaluate(lens, samples, batch_size, dataset, generate=True, progress=progress)
    with _activate(lens, intervention):
        inter = _answer_probs(lens, samples, batch_size, dataset, "intervention: intervened run, batches", progress)
        if generate:
            gen = evaluate(lens, samples, batch_size, dataset, generate=True, progress=progress)
    nssd = i_nssd_from_probs(clean, inter, [0], [1], how)
    by = {}
    for t in ("vision", "text"):
        sel = torch.tensor([x == t for x in targets])
        if bool(sel.any()):
            by[t] = i_nssd_from_probs(clean[sel], inter[sel], [0], [1], how).value
    pi, pi2 = (x[:, 0] / (x[:, 0] + x[:, 1]) for x in (clean, inter))
    def follows(r):
        out = mfr_from_follows([int(f == 1) for f in r.follows], targets)
        out.answers = mention_counts(r.mentions) if r.mentions else None
        return out
    return InterventionEffect(nssd, by, mfr_from_pi(pi, targets), mfr_from_pi(pi2, targets), pi.float(),
                              pi2.float(), [s.id for s in samples], targets,
                              follows(gen_clean) if generate else None, follows(gen) if generate else None)
