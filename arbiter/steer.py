"""Steering from a diagnosis: head roles, a serialisable SteeringPlan, runtime steering and baking into weights.

Runtime steering is the HeadScale probe; baking scales o_proj input columns, which is exactly the same map."""

from __future__ import annotations

import contextlib

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .errors import DataError, InterventionError
from .experiments.common import batches, pi_from_logits
from .experiments.diagnose import config_hash
from .util import atomic_write_json
from .probes.head_interventions import HeadScale


def head_roles(by_target: dict, top: Sequence[tuple[int, int]], ratio: float = 2.0) -> dict[str, str]:
    """Tag each TopG head (proposed rule): with s_v, s_t its vision- and text-instructed scores,
    ``vision-expert`` if s_v > 0 and s_v >= ratio * max(s_t, 0), ``text-expert`` symmetrically, else
    ``shared-hub`` (it matters for following both instructions). Keys are "layer,head"."""
    sv, st = by_target.get("vision"), by_target.get("text")
    roles = {}
    for layer, head in top:
        v = float(sv[layer][head]) if sv is not None else 0.0
        t = float(st[layer][head]) if st is not None else 0.0
        if v > 0 and v >= ratio * max(t, 0.0):
            role = "vision-expert"
        elif t > 0 and t >= ratio * max(v, 0.0):
            role = "text-expert"
        else:
            role = "shared-hub"
        roles[f"{layer},{head}"] = role
    return roles


@dataclass
class SteeringPlan:
    """Heads and per-head alphas to amplify, optional rows (a group or "all"), and the model's identity."""

    heads: list[list[int]]
    alphas: list[float]
    rows: str = "all"
    model_class: str = ""
    config_hash: str = ""
    roles: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.heads = [[int(a), int(b)] for a, b in self.heads]
        if len(self.alphas) != len(self.heads):
            raise InterventionError(f"plan has {len(self.heads)} heads but {len(self.alphas)} alphas.")
        for a in self.alphas:
            if not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
                raise InterventionError(f"steering alpha must be finite and > 0, got {a!r}.")

    # -- identity -------------------------------------------------------------------------------------------
    def check(self, model) -> None:
        cls, h = type(model).__name__, config_hash(model)
        if (self.model_class and self.model_class != cls) or (self.config_hash and self.config_hash != h):
            raise InterventionError(f"this steering plan is for {self.model_class} (config {self.config_hash}), "
                                    f"not for {cls} (config {h}); build a plan from this model's diagnosis.")
        from .adapters import model_facts

        facts = model_facts(model)
        for layer, head in self.heads:
            if not 0 <= layer < facts.n_layers or not 0 <= head < facts.heads(layer)[0]:
                raise InterventionError(f"plan head ({layer}, {head}) is out of range for this model.")

    # -- io ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(Path(path), {"arbiter_steering_plan": 1, **self.to_dict()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SteeringPlan":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read steering plan {path}: {e}") from None
        if d.pop("arbiter_steering_plan", None) != 1:
            raise DataError(f"{path} is not an arbiter steering plan.")
        return cls(**d)

    # -- use --------------------------------------------------------------------------------------------------
    def probe(self) -> HeadScale:
        return HeadScale([tuple(h) for h in self.heads], alpha=self.alphas, rows=self.rows)

    def bake(self, model, inplace: bool = False):
        """Fold the plan into o_proj weights (head h's input columns × alpha): a plain transformers model.
        A plan restricted to rows cannot be baked (the weights apply at every position)."""
        if self.rows != "all":
            raise InterventionError(f"a plan restricted to rows={self.rows!r} cannot be baked into the weights "
                                    "(they act at every position); use lens.steer(plan) at run time.")
        self.check(model)
        if not inplace:
            import copy

            model = copy.deepcopy(model)
        from .adapters import model_facts

        facts = model_facts(model)
        with torch.no_grad():
            for (layer, head), a in zip(self.heads, self.alphas):
                _, _, d = facts.heads(layer)
                facts.layers[layer].out_proj.weight[:, head * d:(head + 1) * d] *= a
        return model


def plan_from_report(report, top: float = 0.05, alpha: float = 2.0, toward: str = "instruction",
                     rows: str = "all", model=None) -> SteeringPlan:
    """TopG heads of a report's ranking; ``toward`` = "instruction" (all), "vision" or "text" (that modality's
    experts plus shared hubs)."""
    data = report.data if hasattr(report, "data") else report
    ranking = data["heads"]["ranking"]
    n_total = len(ranking)
    k = max(1, round(top * n_total))
    chosen = [(r["layer"], r["head"]) for r in ranking[:k]]
    by_target = data["heads"].get("scores", {}).get(data["heads"]["method"], {})
    roles = head_roles(by_target, chosen)
    if toward in ("vision", "text"):
        chosen = [h for h in chosen if roles[f"{h[0]},{h[1]}"] in (f"{toward}-expert", "shared-hub")]
    elif toward != "instruction":
        raise InterventionError(f"toward must be 'instruction', 'vision' or 'text', got {toward!r}.")
    m = data["model"]
    return SteeringPlan([list(h) for h in chosen], [float(alpha)] * len(chosen), rows, m.get("class", ""),
                        m.get("config_hash", ""), roles={k: v for k, v in roles.items()},
                        meta={"top": top, "toward": toward})


def _follow_rate(lens, samples, plan: SteeringPlan | None, batch_size: int, dataset) -> tuple[float, int]:
    """MFR by π > 0.5 on conflict samples; accuracy (argmax first token in D_p) on agreement samples."""
    if not samples:
        return float("nan"), 0
    hits = 0
    for item in batches(lens, samples, batch_size, dataset):
        ctx = lens.probe(plan.probe()) if plan is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            lg = lens.model(**item.batch.inputs).logits[:, -1]
        for i, s in enumerate(item.batch.samples):
            if s.conflict:
                hits += int(pi_from_logits(lg[i:i + 1], [item.ids_p[i]], [item.ids_c[i]])[0] > 0.5)
            else:
                hits += int(int(lg[i].argmax()) in set(item.ids_p[i]))
    return hits / len(samples), len(samples)


def steering_experiment(lens, dataset, report, alphas=(1.5, 2.0, 3.0, 5.0), top: float = 0.05,
                        n_random: int = 10, seed: int = 0, batch_size: int = 8, limit: int | None = None,
                        chunk: int = 11, progress: bool = False, toward: str = "instruction") -> dict:
    """On a data set: failures (conflict samples not followed, π ≤ 0.5), already-correct conflict samples and
    agreement samples. For each alpha: restored fraction of failures with the TopG plan and with random head sets
    of the same size (mean ± sd), and the side effects (correct-sample MFR, agreement accuracy) under the plan.

    On the failures the plan and the random sets run as settings of one batched sweep per batch
    (:func:`arbiter.sweep.sweep`);
    the report's model must be this model (class and config hash), else InterventionError. ``toward``: as in
    :func:`plan_from_report` ("vision" / "text": that modality's experts and the shared hubs among TopG)."""
    from .experiments.heads import mfr_under

    samples = list(dataset.samples)[:limit] if limit else list(dataset.samples)
    conflict = [s for s in samples if s.conflict]
    agreement = [s for s in samples if not s.conflict]
    base_plan = plan_from_report(report, top=top, alpha=1.0, toward=toward)
    base_plan.check(lens.model)
    if not base_plan.heads:
        raise InterventionError(f"no {toward}-expert or shared-hub head among the top {top:g} of the ranking; "
                                "raise --top or steer toward 'instruction'.")
    # split conflicts by the clean model
    failed, correct = [], []
    for item in batches(lens, conflict, batch_size, dataset):
        with torch.no_grad():
            lg = lens.model(**item.batch.inputs).logits[:, -1]
        pi = pi_from_logits(lg, item.ids_p, item.ids_c)
        for s, p in zip(item.batch.samples, pi):
            (correct if float(p) > 0.5 else failed).append(s)
    base_agree, _ = _follow_rate(lens, agreement, None, batch_size, dataset)
    facts = lens.facts
    pool = [(layer, h) for layer in facts.attention_layers for h in range(facts.heads(layer)[0])]
    rng = random.Random(seed)
    rows = []
    best = None
    k = len(base_plan.heads)
    randoms = [sorted(rng.sample(pool, k)) for _ in range(n_random)]
    topg = [tuple(h) for h in base_plan.heads]
    from .progress import progress_bar

    it = progress_bar(alphas, f"steering: α sweep on {len(failed)} failures", unit="alpha", progress=progress)
    for a in it:
        plan = SteeringPlan(base_plan.heads, [float(a)] * k, "all", base_plan.model_class, base_plan.config_hash,
                            base_plan.roles, base_plan.meta)
        restored, rnd = float("nan"), []
        if failed:
            ok = (mfr_under(lens, failed, [topg] + randoms, float(a), batch_size, chunk, dataset) > 0.5).float()
            restored, rnd = float(ok[0].mean()), ok[1:].mean(1).tolist()
        keep, _ = _follow_rate(lens, correct, plan, batch_size, dataset)  # one setting: a plain forward per batch
        agree, _ = _follow_rate(lens, agreement, plan, batch_size, dataset)
        t = torch.tensor(rnd) if rnd else torch.tensor([float("nan")])
        row = {"alpha": a, "restored": restored, "restored_random_mean": float(t.mean()),
               "restored_random_sd": float(t.std()) if len(rnd) > 1 else 0.0, "correct_mfr": keep,
               "agreement_accuracy": agree}
        rows.append(row)
        score = (restored if restored == restored else 0.0) - max(0.0, 1.0 - keep) if keep == keep else restored
        if best is None or score > best[0]:
            best = (score, plan)
    return {"n_failed": len(failed), "n_correct": len(correct), "n_agreement": len(agreement),
            "agreement_accuracy_base": base_agree, "heads": base_plan.heads, "roles": base_plan.roles,
            "toward": toward, "top": top,
            "random_heads": [[list(h) for h in r] for r in randoms],
            "sweep": rows, "best": best[1].to_dict() if best else None}
