"""Arbitration heads (docs/methods/mfr.md): three rankings (exhaustive blocking, DLA, attribution patching), TopG, and the
blocking (TopG vs random heads) and amplification (alpha sweep on failures) experiments.

Every function takes ``progress`` (default True): a labelled bar over its batches (:mod:`arbiter.progress`)."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import memory
from ..data import ConflictSample
from ..metrics import head_scores, spearman, top_g, topk_overlap
from ..util import jsonable
from ..probes.base import Probe
from ..probes.head_interventions import HeadScale
from ..progress import progress_bar
from ..errors import InterventionError
from ..sweep import Setting, tile_batch, head_sweep, sweep, tiled_groups
from .common import (batch_plan, batches, margin_from_logits, metric_pi_and_margin, module_weight, per_sample,
                     require_conflicts)


@dataclass
class HeadRanking:
    """A (layer, head) score table; higher = more important for following the instruction."""

    method: str
    scores: torch.Tensor                          # [layers, heads]
    by_target: dict = field(default_factory=dict)  # target -> [layers, heads]
    cost_forward_equivalents: float | None = None
    per_sample: torch.Tensor | None = field(default=None, repr=False)  # [samples, layers, heads]
    targets: list | None = field(default=None, repr=False)

    def split_half(self, n_splits: int = 20, seed: int = 0) -> dict | None:
        """Split-half reliability (proposed): Spearman between the scores of two random halves of the samples
        (each half split within each target), mean and sd over ``n_splits`` splits. It bounds the agreement any
        other ranking can reach with this one on the same data (a noise ceiling). None without per-sample
        scores or with fewer than 4 samples."""
        if self.per_sample is None or self.targets is None or len(self.targets) < 4:
            return None
        rng = random.Random(seed)
        vals = []
        for _ in range(n_splits):
            half_a, half_b = [], []
            for t in sorted(set(self.targets)):
                idx = [i for i, x in enumerate(self.targets) if x == t]
                rng.shuffle(idx)
                half_a += idx[:len(idx) // 2]
                half_b += idx[len(idx) // 2:]
            sa = _target_avg(self.per_sample[half_a], [self.targets[i] for i in half_a])[0].flatten()
            sb = _target_avg(self.per_sample[half_b], [self.targets[i] for i in half_b])[0].flatten()
            ok = torch.isfinite(sa) & torch.isfinite(sb)
            vals.append(spearman(sa[ok], sb[ok]))
        t = torch.tensor(vals, dtype=torch.float64)
        return {"spearman_mean": float(t.mean()), "spearman_sd": float(t.std()) if n_splits > 1 else 0.0,
                "n_splits": n_splits, "n_samples": len(self.targets)}

    def ranking(self) -> list[dict]:
        L, H = self.scores.shape
        flat = [(float(self.scores[l_, h]), l_, h) for l_ in range(L) for h in range(H)
                if torch.isfinite(self.scores[l_, h])]
        flat.sort(key=lambda x: (-x[0], x[1], x[2]))
        return [{"layer": l_, "head": h, "score": s} for s, l_, h in flat]

    def top(self, fraction: float = 0.05) -> list[tuple[int, int]]:
        return top_g(self.scores.nan_to_num(float("-inf")), fraction)

    def plot(self, path=None, axes=None, fraction: float = 0.05):
        """Heat map of the scores and TopG heads per layer (:func:`arbiter.experiments.plots.plot_head_scores`)."""
        from .plots import plot_head_scores

        return plot_head_scores({"method": self.method, "ranking": self.ranking()}, path=path, axes=axes,
                                top=self.top(fraction), n_layers=self.scores.shape[0])

    def to_dict(self) -> dict:
        return jsonable({"method": self.method, "ranking": self.ranking(),
                         "by_target": {k: v.tolist() for k, v in self.by_target.items()},
                         "cost_forward_equivalents": self.cost_forward_equivalents,
                         "split_half": self.split_half()})


def _layers_heads(lens):
    L = lens.facts.n_layers
    H = max(lens.facts.heads(layer)[0] for layer in lens.facts.attention_layers)
    return L, H


def _mask_missing_heads(lens, per: torch.Tensor) -> torch.Tensor:
    """NaN for the heads a layer lacks and for layers without attention, in per-sample scores [n, L, H]: they
    have no score (and must not be chosen as TopG)."""
    for layer in range(per.shape[1]):
        nh = lens.facts.heads(layer)[0] if layer in lens.facts.attention_layers else 0
        per[:, layer, nh:] = float("nan")
    return per


def target_average(per_sample: torch.Tensor, targets: Sequence[str]) -> tuple[torch.Tensor, dict]:
    """(mean over targets of the per-target means over samples, {target: per-target mean}) of per-sample values
    [samples, ...]: how every ranking averages its per-sample scores (vision and text weigh alike)."""
    by = {}
    for t in ("vision", "text"):
        sel = torch.tensor([x == t for x in targets])
        if bool(sel.any()):
            by[t] = per_sample[sel].mean(0)
    return torch.stack(list(by.values())).mean(0), by


_target_avg = target_average


def _batches_bar(lens, part, batch_size, dataset, desc: str, progress: bool):
    """:func:`batches` of ``part`` behind a progress bar labelled ``desc``."""
    return progress_bar(batches(lens, part, batch_size, dataset), desc, total=len(batch_plan(part, batch_size)),
                        progress=progress)


def exhaustive_ranking(lens, samples: Sequence[ConflictSample], batch_size: int = 8, chunk: int = 16,
                       dataset=None, progress: bool = True) -> HeadRanking:
    """Zero every head alone (batched sweep); score = drop of the final MAM (mean signal) it causes, averaged per
    target then across targets. The reference ranking (docs/methods/mfr.md)."""
    samples = require_conflicts(samples, "exhaustive_ranking()")
    L, H = _layers_heads(lens)

    def part_results(part):  # per-sample drops [n, L, H], targets
        drops, targets = [], []
        n_heads = sum(lens.facts.heads(layer)[0] for layer in lens.facts.attention_layers)
        for item in _batches_bar(lens, part, batch_size, dataset, f"head sweep: layer×head ({n_heads} heads), "
                                 "batches", progress):
            res = head_sweep(lens, item.batch.inputs, metric=metric_pi_and_margin(item.ids_p, item.ids_c),
                             chunk=chunk, progress=progress)
            d = torch.full((item.size, L, H), float("nan"))
            for j, s in enumerate(res.settings):
                d[:, s.meta["layer"], s.meta["head"]] = res.baseline[:, 1] - res.values[j][:, 1]
            drops.append(d)
            targets.extend(item.targets)
        return torch.cat(drops), targets
    per, targets = per_sample(part_results, samples, batch_size)
    score, by = _target_avg(per, targets)
    n_heads = sum(lens.facts.heads(layer)[0] for layer in lens.facts.attention_layers)
    return HeadRanking("exhaustive", score, by, float(n_heads + 1), per, list(targets))


class _HeadPath(Probe):
    """Scales head outputs along an attribution path and adds a zero ``delta`` leaf per layer, so that the
    gradient of the metric w.r.t. ``delta`` is the *total* derivative w.r.t. the head outputs (through every
    later attention, MLP and norm), at the scaled point. ``alpha`` is one factor per batch row ([rows]);
    ``layers`` (None = all) are the layers whose heads are scaled; the others run clean."""

    edits = {"attn.head_out": "all"}

    def __init__(self, alpha: torch.Tensor, layers=None):
        super().__init__()
        self.alpha = alpha
        self.layers = None if layers is None else set(layers)
        self.acts: dict[int, torch.Tensor] = {}
        self.deltas: dict[int, torch.Tensor] = {}

    def attn_head_out(self, ctx, x):
        if self.layers is not None and ctx.layer not in self.layers:
            return x
        self.acts[ctx.layer] = x.detach()
        delta = torch.zeros_like(x, requires_grad=True)
        self.deltas[ctx.layer] = delta
        a = self.alpha.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return a * x + delta


class _DropSwitch:
    """Which decoder layer's residual contribution :class:`_GradDrop` currently cuts in the backward pass
    (None: none). One per GradDrop probe; read by its gates at backward time."""

    __slots__ = ("layer",)

    def __init__(self) -> None:
        self.layer: int | None = None


class _GradGate(torch.autograd.Function):
    """Identity forward; backward passes the gradient unchanged unless ``switch.layer`` is this gate's layer,
    then it passes zeros."""

    @staticmethod
    def forward(ctx, x, layer, switch):
        ctx.layer, ctx.switch = layer, switch
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (torch.zeros_like(g) if ctx.switch.layer == ctx.layer else g), None, None


class _GradDrop(Probe):
    """AtP*'s GradDrop gate on one residual contribution (``site``: ``attn.out`` or ``mlp.out``): the forward
    value is unchanged; in the backward pass the gradient of the layer named by ``switch.layer`` is zeroed. Set
    the switch between ``autograd.grad(..., retain_graph=True)`` calls to drop one layer after another on one
    forward graph; the two sites' probes share one switch."""

    def __init__(self, site: str, switch: _DropSwitch):
        super().__init__()
        self.switch = switch
        self._edits = {site: "all"}

    def _gate(self, ctx, x):
        return _GradGate.apply(x, ctx.layer, self.switch)

    attn_out = mlp_out = _gate


def _graddrop_sites(lens) -> dict[str, list[int]]:
    """The layers that have each residual contribution GradDrop gates (``attn.out``, ``mlp.out``)."""
    return {"attn.out": [lf.index for lf in lens.facts.layers if lf.attn is not None],
            "mlp.out": [lf.index for lf in lens.facts.layers if lf.mlp is not None]}


def _graddrop_dropped(sites: dict[str, list[int]]) -> list[int]:
    """The layers GradDrop drops one at a time: those with an ``attn.out`` or an ``mlp.out``."""
    return sorted(set().union(*sites.values()))


ATTRIBUTION_METHODS = ("atp", "ig", "ig-layer", "graddrop")


def _attribution_alphas(method: str, steps: int) -> list[float]:
    if method in ("atp", "graddrop"):
        return [1.0]
    return [(i + 0.5) / steps for i in range(steps)]                      # midpoint rule on [0, 1]


def attribution_ranking(lens, samples: Sequence[ConflictSample], batch_size: int = 8, dataset=None,
                        method: str = "atp", steps: int = 4, progress: bool = True,
                        memory_budget: int | str | None = None) -> HeadRanking:
    """Attribution patching: a gradient estimate of each head's zero-ablation effect on m = final MAM (the
    quantity :func:`exhaustive_ranking` measures exactly). Score = predicted drop of m; the gradient is the
    total derivative (through all later layers), taken w.r.t. the head outputs at every position.

    ``method`` (the path options are proposed, docs/methods/mfr.md names the family):

    - ``"atp"``: first order at the clean point, ∂m/∂a · a (Nanda's attribution patching); one forward and
      one backward per batch (3 forward-equivalents).
    - ``"ig"``: integrated gradients on the joint path that scales every head by α from 1 to 0 (midpoint rule,
      ``steps`` points, run as one batch of ``steps`` copies); 3·steps forward-equivalents. Per layer the
      scores sum to the effect of zeroing *all* heads (completeness), not to single-head effects.
    - ``"ig-layer"``: integrated gradients on one path per attention layer (that layer's heads scaled
      together, the others clean): within-layer interactions only; 3·steps·layers forward-equivalents.
    - ``"graddrop"``: AtP*'s GradDrop (Kramár et al. 2024, eq. 11; as in koayon/atp_star): for each of the L
      decoder layers l' (those with an ``attn.out`` or ``mlp.out``), the AtP estimate I_l'(n) recomputed with
      the gradient through l''s residual contribution (its ``attn.out`` and ``mlp.out``) zeroed; score of a
      head n in layer l = (1/(L−1)) Σ_{l'≠l} |I_l'(n)| (its own layer's term is 0: dropping it cuts every
      path), per sample, then averaged per target. It guards against paths that cancel (a head whose direct
      and indirect effects offset each other gets a small AtP but a large score here). The scores are
      magnitudes (AtP* ranks by |effect|), whereas :func:`exhaustive_ranking` is signed: a head whose zeroing
      *helps* the compliant answer ranks high here and low there. Heads of the last dropped layer get exactly
      |AtP| (no later layer to drop); with fewer than 2 droppable layers every score is |AtP|. Cost: one
      forward and L backward passes (one per dropped layer, on the retained graph), nominally 1 + 2L
      forward-equivalents.

    docs/methods/mfr.md warns that gradient estimators can miss decisive early heads (saturated downstream attention and
    MLPs); report their agreement with :func:`exhaustive_ranking` (:func:`compare_rankings`) and never use one
    in its place silently."""
    samples = require_conflicts(samples, "attribution_ranking()")
    if method not in ATTRIBUTION_METHODS:
        raise InterventionError(f"attribution method {method!r} is unknown; use one of {ATTRIBUTION_METHODS}.")
    if int(steps) < 1:
        raise InterventionError(f"steps must be >= 1, got {steps}.")
    L, H = _layers_heads(lens)
    alphas = _attribution_alphas(method, int(steps))
    budget = memory.budget_bytes(next(lens.model.parameters()).device, memory_budget)
    plan: dict = {}   # path steps per forward, measured once (see _path_contributions)
    paths = {"ig-layer": [[layer] for layer in lens.facts.attention_layers],
             "graddrop": []}.get(method, [list(lens.facts.attention_layers)])  # graddrop: _graddrop_batch

    def part_results(part):  # per-sample estimates [n, L, H], targets
        per, targets = [], []
        for item in _batches_bar(lens, part, batch_size, dataset, f"attribution ({method}): batches", progress):
            b, k = item.size, len(alphas)
            est = _graddrop_batch(lens, item, L, H) if method == "graddrop" else torch.zeros(b, L, H)
            for layers in paths:  # the path methods (GradDrop has none: its one forward ran above)
                for contrib_layer, contrib in _path_contributions(lens, item, alphas, layers, method, budget, plan):
                    est[:, contrib_layer, :contrib.shape[1]] += contrib   # mean over the path
            per.append(_mask_missing_heads(lens, est))
            targets.extend(item.targets)
        return torch.cat(per), targets
    per, targets = per_sample(part_results, samples, batch_size)
    score, by = _target_avg(per, targets)
    name = {"atp": "attribution", "ig": "attribution-ig", "ig-layer": "attribution-ig-layer",
            "graddrop": "attribution-graddrop"}[method]
    if method == "graddrop":
        n_drop = len(_graddrop_dropped(_graddrop_sites(lens)))
        cost = 1.0 + 2.0 * (n_drop if n_drop >= 2 else 1)
    else:
        cost = 3.0 * len(alphas) * len(paths)
    return HeadRanking(name, score, by, cost, per, list(targets))


def _path_gradients(lens, item, alphas: Sequence[float], layers, method: str):
    """One forward and backward of the batch tiled once per path step in ``alphas``: {layer: [steps, b, heads]}
    of Σ_d grad · act for each step's copy of the batch."""
    b, k = item.size, len(alphas)
    big = {key: tile_batch(v, k) for key, v in item.batch.inputs.items() if key != "labels"}
    probe = _HeadPath(torch.tensor(alphas).repeat_interleave(b), None if method != "ig-layer" else layers)  # copy-major
    with contextlib.ExitStack() as stack:
        stack.enter_context(tiled_groups(lens, b, k))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(lens.probe(probe))
        logits = lens.model(**big, use_cache=False).logits[:, -1]
        m = margin_from_logits(logits, item.ids_p * k, item.ids_c * k)
        got = sorted(probe.deltas)
        grads = torch.autograd.grad(m.sum(), [probe.deltas[x] for x in got], allow_unused=True)
    out = {}
    for layer, g in zip(got, grads):
        a = probe.acts[layer]
        contrib = (g * a).sum(dim=(1, 3)) if g is not None else torch.zeros(a.shape[0], a.shape[2])
        out[layer] = contrib.float().view(k, b, -1)
    return out


def _path_contributions(lens, item, alphas: Sequence[float], layers, method: str, budget: int | None, plan: dict):
    """(layer, [b, heads] mean over the path of grad · act): every path step in one forward when the memory
    ``budget`` holds them, else in chunks of as many steps as it holds; a budget below one step is a clear error.
    What one step's forward and backward add is measured once per ranking, on its first batch (``plan`` keeps it);
    where every step fits, the computation is the one-forward one, to the last bit."""
    k = len(alphas)
    if budget is not None and k > 1 and "steps_per_forward" not in plan:
        peak, _, _ = memory.measure(lambda: _path_gradients(lens, item, alphas[:1], layers, method),
                                    next(lens.model.parameters()).device)
        if peak > budget:
            raise InterventionError(f"one attribution path step needs about {memory.format_bytes(peak)} (a forward "
                                    f"and backward of this batch), more than the memory budget of "
                                    f"{memory.format_bytes(budget)}; use a smaller batch or a larger budget.")
        plan["steps_per_forward"] = max(1, int(budget // peak))
    per_forward = plan.get("steps_per_forward", k)
    if per_forward >= k:
        return [(layer, c.mean(0)) for layer, c in _path_gradients(lens, item, alphas, layers, method).items()]
    sums: dict = {}
    for start in range(0, k, per_forward):
        for layer, c in _path_gradients(lens, item, alphas[start:start + per_forward], layers, method).items():
            sums[layer] = sums[layer] + c.sum(0) if layer in sums else c.sum(0)
    return [(layer, total / k) for layer, total in sums.items()]


def _graddrop_batch(lens, item, L: int, H: int) -> torch.Tensor:
    """GradDrop scores of one batch, [b, L, H]: one forward with the head-output delta leaves
    (:class:`_HeadPath`, alpha = 1) and the gates (:class:`_GradDrop`), then one backward per dropped layer l'
    on the retained graph, accumulating |AtP with l' dropped| / (L − 1) for the heads of every other layer."""
    b = item.size
    sites = _graddrop_sites(lens)
    dropped = _graddrop_dropped(sites)
    passes: list = dropped if len(dropped) >= 2 else [None]       # < 2 droppable layers: plain |AtP|
    norm = float(max(len(dropped) - 1, 1))
    head = _HeadPath(torch.ones(b), list(lens.facts.attention_layers))
    switch = _DropSwitch()                                        # every gate reads this one
    gates = [(_GradDrop(site, switch), where) for site, where in sites.items() if where]
    est = torch.zeros(b, L, H)
    inputs = {key: v for key, v in item.batch.inputs.items() if key != "labels"}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(lens.probe(head))
        for probe, where in gates:
            stack.enter_context(lens.probe(probe, layers=where))
        logits = lens.model(**inputs, use_cache=False).logits[:, -1]
        m = margin_from_logits(logits, item.ids_p, item.ids_c).sum()
        got = sorted(head.deltas)
        try:
            for i, drop in enumerate(passes):
                want = [x for x in got if x != drop]          # a head's own layer contributes 0 by definition
                if not want:
                    continue
                switch.layer = drop
                grads = torch.autograd.grad(m, [head.deltas[x] for x in want], retain_graph=i < len(passes) - 1,
                                            allow_unused=True)
                for layer, g in zip(want, grads):
                    if g is not None:
                        a = head.acts[layer]
                        est[:, layer, :a.shape[2]] += (g * a).sum(dim=(1, 3)).float().abs() / norm
        finally:
            switch.layer = None
    return est


def dla_ranking(lens, samples: Sequence[ConflictSample], batch_size: int = 8, dataset=None,
                progress: bool = True) -> HeadRanking:
    """Direct logit attribution of each head's output at ``last`` on the MAM direction (docs/methods/mfr.md, proposed)."""
    samples = require_conflicts(samples, "dla_ranking()")
    facts = lens.facts
    L, H = _layers_heads(lens)
    layers = facts.attention_layers
    W_U = module_weight(facts.lm_head)
    norm = facts.final_norm
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)) or 0.0)
    gamma = facts.norm_scale(norm, W_U.shape[1], W_U.dtype, W_U.device)   # the norm's effective scale

    def part_results(part):  # per-sample DLA scores [n, L, H], targets
        per, targets = [], []
        for item in _batches_bar(lens, part, batch_size, dataset, "DLA: batches", progress):
            with torch.no_grad(), lens.record("attn.head_out", rows="last") as rec, \
                    lens.record("resid.post", rows="last", layers=[L - 1]) as fin:
                lens.model(**item.batch.inputs)
            ho = torch.zeros(item.size, L, H, facts.heads(layers[0])[2])
            W_O = torch.zeros(L, W_U.shape[1], H * facts.heads(layers[0])[2])
            for layer in layers:
                t = rec.trace.site("attn.head_out", layer)[:, 0]               # [b, H, d]
                ho[:, layer, :t.shape[1]] = t
                w = module_weight(facts.layers[layer].out_proj)
                W_O[layer, :, :w.shape[1]] = w
            h_final = fin.trace.site("resid.post", L - 1)
            h_final = facts.residual.main_stream(h_final)[:, 0]
            hs = head_scores(ho, W_O, W_U, item.ids_p, item.ids_c, gamma, h_final, item.targets, eps=eps)
            per.append(_mask_missing_heads(lens, hs.per_sample.float()))
            targets.extend(item.targets)
        return torch.cat(per), targets
    per, targets = per_sample(part_results, samples, batch_size)
    score, by = _target_avg(per, targets)
    return HeadRanking("dla", score, by, 1.0, per, list(targets))


def compare_rankings(reference: HeadRanking, other: HeadRanking, fraction: float = 0.05) -> dict:
    """Spearman over all heads, also against the reference's magnitudes (``spearman_abs_reference``: for
    rankings of |effect| such as GradDrop, which put a head whose zeroing helps high where the signed reference
    puts it last), top-k overlap at TopG size and at 3, and the reference's split-half reliability (the ceiling
    for the Spearman: what the reference reaches against itself on half the data)."""
    a, b = reference.scores.flatten(), other.scores.flatten()
    ok = torch.isfinite(a) & torch.isfinite(b)
    k = len(reference.top(fraction))
    return {"method": other.method, "spearman": spearman(a[ok], b[ok]),
            "spearman_abs_reference": spearman(a[ok].abs(), b[ok]),
            "topg_overlap": topk_overlap(reference.scores.nan_to_num(float("-inf")),
                                         other.scores.nan_to_num(float("-inf")), k),
            "top3_overlap": topk_overlap(reference.scores.nan_to_num(float("-inf")),
                                         other.scores.nan_to_num(float("-inf")), 3), "k": k,
            "reference_split_half": reference.split_half()}


def head_set_settings(head_sets: Sequence[Sequence[tuple[int, int]]], alpha: float) -> list[Setting]:
    """One sweep setting per head set: every head of the set scaled by ``alpha`` (0 = blocked) on its rows."""
    out = []
    for i, heads in enumerate(head_sets):
        heads = [tuple(h) for h in heads]

        def make(rows, _h=heads):
            return [(HeadScale(_h, alpha=alpha, batch_rows=rows), sorted({lay for lay, _ in _h}))]
        out.append(Setting(f"set{i}", min(lay for lay, _ in heads), make, {"heads": heads, "alpha": alpha},
                           first_site="attn.head_out"))
    return out


_head_set_settings = head_set_settings


def _values_under(lens, samples, head_sets, alpha, batch_size, chunk, dataset, desc: str = "head sets: batches",
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean [samples, 2], scaled [samples, len(head_sets), 2]): (π, m) without intervention and with each head
    set's outputs scaled by alpha, one batched sweep per batch (behind a bar labelled ``desc``)."""
    def part_results(part):
        base, vals = [], []
        for item in _batches_bar(lens, part, batch_size, dataset, desc, progress):
            res = sweep(lens, item.batch.inputs, _head_set_settings(head_sets, alpha),
                        metric_pi_and_margin(item.ids_p, item.ids_c), chunk=chunk)
            base.append(res.baseline.float())
            vals.append(res.values.float().transpose(0, 1))
        return torch.cat(base), torch.cat(vals)
    return per_sample(part_results, samples, batch_size)


def mfr_under(lens, samples, head_sets, alpha, batch_size, chunk, dataset, desc: str = "head sets: batches",
               progress: bool = False) -> torch.Tensor:
    """[len(head_sets), samples] π' under each head set scaled by alpha."""
    return _values_under(lens, samples, head_sets, alpha, batch_size, chunk, dataset, desc, progress)[1][:, :, 0].T


@dataclass
class BlockingResult:
    fraction: float
    heads: list
    n_samples: int
    mfr_base: float
    mfr_top: float
    mfr_random: list
    relative_drop_top: float | None
    relative_drop_random_mean: float | None
    relative_drop_random_sd: float | None
    sample_ids: list = field(default_factory=list)  # the samples blocked: those ``correct`` marks

    def to_dict(self) -> dict:
        return jsonable(self.__dict__)

    def plot(self, path=None, ax=None):
        """MFR clean, TopG blocked, random sets blocked (:func:`arbiter.experiments.plots.plot_blocking`)."""
        from .plots import plot_blocking

        return plot_blocking(self, path=path, ax=ax)


def blocking_experiment(lens, samples: Sequence[ConflictSample], correct: Sequence[bool], heads: Sequence,
                        fraction: float = 0.05, n_random: int = 10, seed: int = 0, batch_size: int = 8,
                        chunk: int = 11, dataset=None, progress: bool = True) -> BlockingResult:
    """Block TopG on the samples the model gets right (``correct``, e.g. the baseline's first-answer follows;
    MFR under blocking by π > 0.5, against 1 for these samples); control: same-size random head sets."""
    if len(correct) != len(samples):
        raise InterventionError(f"correct has {len(correct)} entries for {len(samples)} samples; give one per sample.")
    chosen = [s for s, ok in zip(samples, correct) if ok and s.conflict]
    facts = lens.facts
    pool = [(layer, h) for layer in facts.attention_layers for h in range(facts.heads(layer)[0])]
    rng = random.Random(seed)
    randoms = [sorted(rng.sample(pool, len(heads))) for _ in range(n_random)]
    if not chosen or not heads:
        return BlockingResult(fraction, [list(h) for h in heads], 0, float("nan"), float("nan"), [], None, None, None)
    pi = mfr_under(lens, chosen, [list(heads)] + randoms, 0.0, batch_size, chunk, dataset,
                    f"blocking: TopG + {n_random} random head sets, batches", progress)
    mfr = (pi > 0.5).float().mean(1)
    base = 1.0
    rnd = mfr[1:]
    drop_r = (base - rnd) / base
    return BlockingResult(fraction, [list(h) for h in heads], len(chosen), base, float(mfr[0]), rnd.tolist(),
                          float((base - mfr[0]) / base), float(drop_r.mean()),
                          float(drop_r.std(unbiased=True)) if len(rnd) > 1 else 0.0, [s.id for s in chosen])


def deletion_ks(n_heads: int, k_topg: int, points: int = 8) -> list[int]:
    """Head counts of the deletion curve (proposed): a geometric grid of ``points`` values from 1 to
    K = min(n_heads, max(2·k_topg, 8)), rounded and deduplicated, plus the TopG size itself."""
    if n_heads < 1 or k_topg < 1:
        raise InterventionError(f"deletion_ks needs n_heads >= 1 and k_topg >= 1, got {n_heads} and {k_topg}.")
    top = min(n_heads, max(2 * k_topg, 8))
    grid = {int(round(top ** (i / (points - 1)))) for i in range(points)} if points > 1 else {top}
    return sorted((grid | {min(k_topg, n_heads)}) - {0})


@dataclass
class BlockingAgreement:
    """How far each ranking's own top heads reproduce the reference ranking's blocking effect.

    ``curves[method]``: ``heads`` (the ranking's top ``max(ks)`` heads, in order), and per k in ``ks``, with its
    top k heads zeroed together on the samples the model gets right (``correct``, e.g. from generated answers):
    ``mfr`` (π > 0.5) and ``margin_drop`` (drop
    of m, the final MAM, averaged per target then across targets: the quantity the exhaustive ranking scores
    heads by). ``summary[method]``: its TopG blocked (``topg_mfr``, ``topg_relative_drop``; docs/methods/mfr.md) and
    ``captured`` = Σ_k margin_drop / Σ_k reference margin_drop over ``ks`` (proposed: the share of the
    reference's deletion curve the ranking reaches; 1 = as effective, above 1 possible since single-head
    effects do not add up). ``random``: the same for ``n`` random head orders (chance level): mean and sd of
    ``captured``, mean ``mfr`` and ``margin_drop`` curves. ``mfr_base``: the MFR (π > 0.5) of those samples
    unblocked, which the relative drops are taken against (:func:`blocking_experiment` takes 1, the samples being
    correct; the two differ where ``correct`` comes from generated answers that π does not confirm)."""

    reference: str
    ks: list
    k_topg: int
    n_samples: int
    mfr_base: float
    curves: dict
    summary: dict
    random: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return jsonable(self.__dict__)

    def plot(self, path=None, axes=None):
        """Each ranking's deletion curve and the MFR left
        (:func:`arbiter.experiments.plots.plot_blocking_agreement`)."""
        from .plots import plot_blocking_agreement

        return plot_blocking_agreement(self, path=path, axes=axes)


def _ordered_heads(r) -> list[tuple[int, int]]:
    if isinstance(r, HeadRanking):
        return [(x["layer"], x["head"]) for x in r.ranking()]
    if isinstance(r, dict) and "ranking" in r:  # HeadRanking.to_dict()
        r = r["ranking"]
    return [(int(x["layer"]), int(x["head"])) if isinstance(x, dict) else (int(x[0]), int(x[1])) for x in r]


def blocking_agreement(lens, samples: Sequence[ConflictSample], correct: Sequence[bool], rankings: dict,
                       reference: str | None = None, fraction: float = 0.05, ks: Sequence[int] | None = None,
                       n_random: int = 10, seed: int = 0, batch_size: int = 8, chunk: int = 11,
                       dataset=None, progress: bool = True) -> BlockingAgreement:
    """docs/methods/mfr.md's functional check of cheap head rankings: block each ranking's TopG (and, proposed, its top k for
    every k of a deletion curve) on the samples the model gets right, next to the reference's.

    ``rankings``: name -> :class:`HeadRanking`, its ``to_dict()``, or an ordered list of (layer, head);
    ``reference`` (default: the first) is the ranking the others are measured against. ``ks`` default:
    :func:`deletion_ks`; ``n_random`` random head orders (drawn with ``seed``) give the chance level. Every
    distinct head set runs once, all in one batched sweep per batch. Unlike a rank correlation over all heads this
    weighs what blocking the chosen heads does, so the order among heads with negligible effects does not count.
    ``captured`` is None when the reference's curve does not hurt m (its area is not positive)."""
    if not rankings:
        raise InterventionError("blocking_agreement() needs at least one ranking.")
    names = list(rankings)
    reference = names[0] if reference is None else reference
    if reference not in rankings:
        raise InterventionError(f"reference {reference!r} is not among the rankings {names}.")
    ordered = {m: _ordered_heads(rankings[m]) for m in names}
    n_heads = len(ordered[reference])
    k_topg = len(top_g(torch.zeros(_layers_heads(lens)), fraction))  # the count HeadRanking.top() takes
    if not 1 <= k_topg <= min(len(v) for v in ordered.values()):
        raise InterventionError(f"TopG is {k_topg} heads (fraction {fraction}) but a ranking holds only "
                                f"{min(len(v) for v in ordered.values())}: pass complete rankings or a smaller "
                                "fraction.")
    ks = deletion_ks(n_heads, k_topg) if ks is None else sorted({int(k) for k in ks} | {k_topg})
    if ks[0] < 1 or any(k > len(ordered[m]) for m in names for k in ks):
        raise InterventionError(f"ks={ks} (TopG size {k_topg} included): every k must be between 1 and the number "
                                f"of ranked heads ({min(len(v) for v in ordered.values())}).")
    if len(correct) != len(samples):
        raise InterventionError(f"correct has {len(correct)} entries for {len(samples)} samples; give one per sample.")
    chosen = [s for s, ok in zip(samples, correct) if ok and s.conflict]
    if not chosen:
        return BlockingAgreement(reference, ks, k_topg, 0, float("nan"), {}, {})
    chosen = [chosen[i] for b in batch_plan(chosen, batch_size) for i in b]  # the order results come back in
    rng = random.Random(seed)
    randoms = [rng.sample(ordered[reference], max(ks)) for _ in range(n_random)]
    sets: dict[frozenset, int] = {}
    for m in [*names, *range(n_random)]:
        for k in ks:
            sets.setdefault(frozenset((ordered[m] if m in ordered else randoms[m])[:k]), len(sets))
    head_sets = [sorted(x) for x in sets]
    clean, blocked = _values_under(lens, chosen, head_sets, 0.0, batch_size, chunk, dataset,
                                   f"blocking agreement: {len(head_sets)} head sets, batches", progress)
    targets = [s.target for s in chosen]
    drop = _target_avg(clean[:, None, 1] - blocked[:, :, 1], targets)[0]      # [sets]
    mfr = (blocked[:, :, 0] > 0.5).float().mean(0)                            # [sets]
    base = float((clean[:, 0] > 0.5).float().mean())
    curves, summary = {}, {}
    for m in names:
        idx = [sets[frozenset(ordered[m][:k])] for k in ks]
        curves[m] = {"heads": [list(h) for h in ordered[m][:max(ks)]], "mfr": mfr[idx].tolist(),
                     "margin_drop": drop[idx].tolist()}
    ref_area = sum(curves[reference]["margin_drop"])
    g = ks.index(k_topg)
    for m in names:
        top_mfr = curves[m]["mfr"][g]
        summary[m] = {"topg_heads": [list(h) for h in ordered[m][:k_topg]], "topg_mfr": top_mfr,
                      "topg_relative_drop": (base - top_mfr) / base if base > 0 else None,
                      "captured": sum(curves[m]["margin_drop"]) / ref_area if ref_area > 0 else None}
    rnd = {}
    if n_random:
        idx = torch.tensor([[sets[frozenset(r[:k])] for k in ks] for r in randoms])      # [n_random, ks]
        cap = drop[idx].sum(1) / ref_area if ref_area > 0 else None
        rnd = {"n": n_random, "mfr_mean": mfr[idx].mean(0).tolist(), "margin_drop_mean": drop[idx].mean(0).tolist(),
               "captured_mean": float(cap.mean()) if cap is not None else None,
               "captured_sd": float(cap.std()) if cap is not None and n_random > 1 else None}
    return BlockingAgreement(reference, ks, k_topg, len(chosen), base, curves, summary, rnd)


@dataclass
class AmplificationResult:
    """Per alpha: ``restored`` = share of the failures with π > 0.5 under TopG scaled by alpha, and the same for
    the random head sets (mean, sd). ``restored_base``: that share with no scaling (the failures come from
    ``correct``, e.g. generated answers, so π may already favour the compliant answer on a few); ``sample_ids``:
    the failures."""

    alpha: list
    restored: list
    restored_random_mean: list
    restored_random_sd: list
    n_failed: int
    heads: list
    restored_base: float | None = None
    sample_ids: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return jsonable(self.__dict__)

    def plot(self, path=None, ax=None):
        """Restored fraction per alpha, TopG against random sets
        (:func:`arbiter.experiments.plots.plot_amplification`)."""
        from .plots import plot_amplification

        return plot_amplification(self, path=path, ax=ax)


def amplification_experiment(lens, samples: Sequence[ConflictSample], correct: Sequence[bool], heads: Sequence,
                             alphas: Sequence[float] = (1.5, 2.0, 3.0, 5.0), n_random: int = 10, seed: int = 0,
                             batch_size: int = 8, chunk: int = 11, dataset=None,
                             progress: bool = True) -> AmplificationResult:
    """On the failed conflict samples (those ``correct`` does not mark), scale TopG by each alpha: restored
    fraction = MFR (π > 0.5) among them; control: random head sets of the same size (``n_random``, seeded)."""
    if len(correct) != len(samples):
        raise InterventionError(f"correct has {len(correct)} entries for {len(samples)} samples; give one per sample.")
    failed = [s for s, ok in zip(samples, correct) if not ok and s.conflict]
    if not failed or not heads:
        return AmplificationResult(list(alphas), [], [], [], len(failed), [list(h) for h in heads], None,
                                   [s.id for s in failed])
    facts = lens.facts
    pool = [(layer, h) for layer in facts.attention_layers for h in range(facts.heads(layer)[0])]
    rng = random.Random(seed)
    randoms = [sorted(rng.sample(pool, len(heads))) for _ in range(n_random)]
    restored, r_mean, r_sd, base = [], [], [], None
    for a in alphas:
        clean, vals = _values_under(lens, failed, [list(heads)] + randoms, float(a), batch_size, chunk, dataset,
                                    f"amplification α={a:g}: TopG + {n_random} random head sets, batches", progress)
        base = float((clean[:, 0] > 0.5).float().mean())
        ok = (vals[:, :, 0].T > 0.5).float().mean(1)
        restored.append(float(ok[0]))
        r_mean.append(float(ok[1:].mean()) if n_random else float("nan"))
        r_sd.append(float(ok[1:].std(unbiased=True)) if n_random > 1 else 0.0)
    return AmplificationResult(list(alphas), restored, r_mean, r_sd, len(failed), [list(h) for h in heads], base,
                               [s.id for s in failed])
