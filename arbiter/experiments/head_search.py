"""Head ranking by adaptive group testing (``method="search"``, our proposal, docs/methods/head-search.md): the heads
whose single-head blocking effect reaches a share of the largest, with their exact effects, in fewer forwards."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..data import ConflictSample
from ..errors import InterventionError
from ..metrics import top_g
from ..progress import progress_bar
from ..sweep import CleanRun, sweep
from ..util import jsonable
from .common import batch_plan, batches, metric_pi_and_margin, per_sample, require_conflicts
from .heads import HeadRanking, head_set_settings, target_average

DEFAULT_THRESHOLD = 0.25
"""τ: a head is reported with its exact effect when its score is at least τ times the largest head score."""
DEFAULT_BRANCHING = 4
"""Parts an open group is split into per round (a group of at most this many heads is blocked head by head)."""
DEFAULT_SCREENS = 2
"""Screen partitions of the first round: contiguous blocks and strided blocks (more: seeded random partitions)."""

BOUNDS = ("sample", "target")
"""Where U takes the positive part of the drops: per sample (default: a head that helps on some samples cannot
offset one that hurts on others) or per target mean (tighter, assumes no such offset within a target)."""

Head = tuple[int, int]


@dataclass
class TestedSet:
    """One blocked head set: its heads, U (mean over targets of the per-sample positive drop), the signed mean
    drop, the round it ran in and why it was tested (``screen``, ``prior``, ``open``, ``fallback``)."""

    heads: tuple[Head, ...]
    bound: float
    signed: float
    round: int
    why: str
    split: bool = False          # its heads not yet measured were split by the fallback


@dataclass
class SearchRanking(HeadRanking):
    """A :class:`HeadRanking` of the heads the search blocked alone (exact scores; NaN for the others), with what it
    knows about the rest: ``bounds`` [layers, heads] (exact score where measured, else the smallest corrected U of a
    set holding the head), ``cutoff`` θ, ``above`` (the heads with score ≥ θ, best first), ``untested_bound`` (the
    largest bound of a head not blocked alone: < θ under the assumption), ``guard`` (the assumption's tests) and
    ``rounds``."""

    threshold: float = DEFAULT_THRESHOLD
    cover_top: float | None = None
    cutoff: float | None = None
    bounds: torch.Tensor | None = field(default=None, repr=False)
    above: list = field(default_factory=list)
    untested_bound: float | None = None
    measured: int = 0
    clean_forwards: int = 0
    n_heads: int = 0
    exhaustive_cost: float | None = None
    layer_share_cost: float | None = None
    exhaustive_layer_share_cost: float | None = None
    rounds: list = field(default_factory=list)
    guard: dict = field(default_factory=dict)

    def order(self) -> list[Head]:
        """Every head: those blocked alone by exact score (as :meth:`ranking`), then the others by bound."""
        done = [(x["layer"], x["head"]) for x in self.ranking()]
        seen = set(done)
        L, H = self.bounds.shape
        rest = [(float(self.bounds[i, j]), i, j) for i in range(L) for j in range(H)
                if (i, j) not in seen and not math.isnan(float(self.bounds[i, j]))]
        rest.sort(key=lambda x: (-x[0], x[1], x[2]))
        return done + [(i, j) for _, i, j in rest]

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["search"] = jsonable({
            "threshold": self.threshold, "cover_top": self.cover_top, "cutoff": self.cutoff,
            "above": [{"layer": h[0], "head": h[1], "score": s} for h, s in self.above],
            "untested_bound": self.untested_bound, "measured": self.measured, "n_heads": self.n_heads,
            "clean_forwards": self.clean_forwards,
            "forward_equivalents": self.cost_forward_equivalents,
            "exhaustive_forward_equivalents": self.exhaustive_cost,
            "cost_ratio": (self.cost_forward_equivalents / self.exhaustive_cost
                           if self.cost_forward_equivalents and self.exhaustive_cost else None),
            "layer_share_cost": self.layer_share_cost,
            "exhaustive_layer_share_cost": self.exhaustive_layer_share_cost,
            "order": [list(h) for h in self.order()], "rounds": self.rounds, "guard": self.guard})
        return d


def costlier_than_exhaustive(search: dict) -> str | None:
    """Where the search cost more forwards than the exhaustive sweep, a sentence saying so and why, from its summary
    (``SearchRanking.to_dict()["search"]``); None where it did not."""
    cost, ex = search.get("forward_equivalents"), search.get("exhaustive_forward_equivalents")
    if not cost or not ex or cost <= ex:
        return None
    splits = len((search.get("guard") or {}).get("fallback_splits") or [])
    return (f"The search cost more than the exhaustive sweep here ({cost:g} forward-equivalents per batch against "
            f"{ex:g}): it blocked {search.get('measured')} of the {search.get('n_heads')} heads alone, because the "
            "sets holding them came out at or above the cutoff"
            + (f" ({splits} of them with no head blocked alone accounting for it: heads that act together)"
               if splits else "")
            + ". The heads it reports are exact all the same; on this model the exhaustive sweep "
            "(method='exhaustive') reaches the same ranking with fewer forwards.")


def screen_partitions(heads: Sequence[Head], screens: int = DEFAULT_SCREENS, seed: int = 0) -> list[list[list[Head]]]:
    """The first round's partitions of ``heads`` (in order): about √N contiguous blocks, then as many strided blocks
    (head i in block i mod n, n ≥ the contiguous block size, so two heads share at most one of those two blocks),
    then ``screens`` − 2 seeded random partitions into as many blocks."""
    n = len(heads)
    if n == 0:
        return []
    blocks = max(1, math.ceil(math.sqrt(n)))
    size = math.ceil(n / blocks)
    out = [[list(heads[i:i + size]) for i in range(0, n, size)]]
    if screens >= 2 and size > 1:
        stride = max(size, math.ceil(n / size))
        out.append([list(heads[i::stride]) for i in range(stride) if heads[i::stride]])
    rng = random.Random(seed)
    for _ in range(max(0, screens - 2)):
        perm = list(heads)
        rng.shuffle(perm)
        out.append([sorted(perm[i:i + size], key=heads.index) for i in range(0, n, size)])
    return out


def split_parts(heads: Sequence[Head], branching: int) -> list[list[Head]]:
    """``heads`` one by one when there are at most ``branching`` of them, else ``branching`` contiguous parts of
    nearly equal size."""
    heads = list(heads)
    if len(heads) <= branching:
        return [[h] for h in heads]
    q, r = divmod(len(heads), branching)
    out, i = [], 0
    for j in range(branching):
        k = q + (1 if j < r else 0)
        out.append(heads[i:i + k])
        i += k
    return out


class GroupSearch:
    """The search's bookkeeping, apart from any model: ``measure(sets)`` returns the per-sample MAM drops of each
    head set blocked ([samples, len(sets)]); ``targets`` the samples' targets.

    How it works (each round is one batched :func:`arbiter.sweep.sweep` per batch of samples, head sets as settings):

    1. **Screens.** The heads, in (layer, head) order, are cut into about √N contiguous blocks (screen 0) and into as
       many strided blocks (screen 1: every n-th head), so that two heads share at most one screen block. More
       screens (``screens`` > 2) add seeded random partitions. Every block is blocked as one set.
    2. **Bounds.** A set S is scored by U(S) = mean over targets of the per-sample mean of max(D_s(S), 0), D_s(S) the
       drop of the final MAM on sample s with S blocked. A head's bound b(h) is the smallest U(S) / ρ(|S|) over the
       sets that hold it (ρ: below); a head blocked alone gets its exact score (the exhaustive sweep's: same
       per-sample drops, same averaging), and U({h}) ≥ its score always.
    3. **Threshold.** θ = min(τ · largest score, k-th largest score) with k the TopG count (``cover_top``), computed
       on the optimistic scores (exact where known, bounds elsewhere): never below the final θ, so the most
       promising heads go first, and the search stops only once θ rests on exact scores alone.
    4. **Splits.** Heads still open (not blocked alone, b(h) ≥ θ) are grouped by the smallest set holding them and
       that group is blocked head by head (≤ ``branching`` heads) or in ``branching`` parts. Rounds repeat until no
       head is open.

    Assumption (stated, tested, guarded): blocking more heads along with h does not lower h's per-sample positive drop
    below θ ("no cancellation": per sample, max(D_s(S), 0) ≥ max(D_s({h}), 0) for h in S, at least where it matters).
    Under it every head not blocked alone has score ≤ b(h) < θ (the bound reported). The guard, on the data:

    - every (head blocked alone at or above θ, tested set holding it) pair is checked: the smallest retention
      U(S) / score(h) seen among sets of at most n heads is ρ(n) (1 when none fell below), and a set of n heads bounds
      its heads by U(S) / ρ(n) only; where ρ = 0 (a set hid a head entirely) sets of that size bound nothing, so their
      heads reopen and are split more finely, down to single heads;
    - a set with U(S) ≥ θ that no head blocked alone accounts for (none with U({h}) ≥ θ) is split down to the heads
      it holds (``fallback``): a head cancelled inside one screen block still raises its other screen block, which no
      other head explains, so it is found (a head hidden in every screen block holding it, each also holding another
      head above θ, is not: more screens shrink that case).

    Cost in forward-equivalents per batch, as :func:`~arbiter.experiments.heads.exhaustive_ranking` counts its
    L·H + 1: one per blocked set, one per clean forward run (each batch's clean run is kept across rounds while
    half the memory budget holds it, so it runs once); replayed prefixes are not discounted (the layer-share cost, which discounts them for both methods alike, is reported beside it)."""

    def __init__(self, heads: Sequence[Head], targets: Sequence[str], measure: Callable[[list], torch.Tensor],
                 threshold: float = DEFAULT_THRESHOLD, cover_top: float | None = 0.05,
                 grid: tuple[int, int] | None = None,
                 branching: int = DEFAULT_BRANCHING, screens: int = DEFAULT_SCREENS, first: Sequence[Head] = (),
                 seed: int = 0, tol: float = 1e-6, bound: str = "sample", guard: bool = True):
        if bound not in BOUNDS:
            raise InterventionError(f"bound={bound!r} is not one of {BOUNDS}.")
        self.bound_by = bound
        self.guard = bool(guard)
        if not 0 < threshold <= 1:
            raise InterventionError(f"threshold={threshold} must be in (0, 1]: a share of the largest head score.")
        if int(branching) < 2:
            raise InterventionError(f"branching={branching} must be >= 2.")
        if int(screens) < 1:
            raise InterventionError(f"screens={screens} must be >= 1.")
        if cover_top is not None and not 0 < cover_top <= 1:
            raise InterventionError(f"cover_top={cover_top} must be in (0, 1] (the TopG fraction) or None.")
        self.heads = [tuple(h) for h in heads]
        self.index = {h: i for i, h in enumerate(self.heads)}
        self.targets = list(targets)
        self.measure = measure
        self.threshold, self.cover_top = float(threshold), cover_top
        self.grid = grid
        self.branching, self.screens, self.seed, self.tol = int(branching), int(screens), seed, tol
        self.first = [tuple(h) for h in first if tuple(h) in self.index]
        self.sets: dict[frozenset, TestedSet] = {}
        self.drops: dict[Head, torch.Tensor] = {}      # per-sample drops of the heads blocked alone
        self.score: dict[Head, float] = {}
        self.rounds: list[dict] = []
        self.violations: list[dict] = []
        self.fallback: list[dict] = []
        self.shrink: dict[int, float] = {}      # set size -> the smallest retention U(S) / score(h) seen there
        self.checked: set = set()

    # -------------------------------------------------------------------------------------------- statistics
    def _k(self) -> int:
        if self.cover_top is None:
            return 1
        L, H = self.grid or (1, len(self.heads))
        return len(top_g(torch.zeros(L, H), self.cover_top))

    def _bound(self, d: torch.Tensor) -> float:
        """U of per-sample drops ``d`` [samples]: the positive part per sample (``bound="sample"``) or per target
        mean (``"target"``), averaged over the targets; either is ≥ the signed score of one head's drops."""
        if self.bound_by == "sample":
            return float(target_average(d.clamp(min=0)[:, None], self.targets)[0][0])
        by = target_average(d[:, None], self.targets)[1]
        return float(sum(float(v.clamp(min=0)[0]) for v in by.values()) / len(by))

    def retention(self, size: int) -> float:
        """ρ(n): the smallest U(S) / score(h) seen over sets S of at most ``size`` heads holding a head h blocked
        alone at or above θ (1 when no set fell below such a head's score). A set of n heads bounds its heads by
        U(S) / ρ(n): the cancellation seen on the data, assumed no worse in sets of that size (none at all
        where ρ = 0: those sets bound nothing)."""
        seen = [r for n, r in self.shrink.items() if n <= size]
        return min([1.0, *seen])

    def set_bound(self, s: TestedSet) -> float:
        rho = self.retention(len(s.heads))
        return s.bound / rho if rho > 0 else math.inf

    def bounds(self) -> dict[Head, float]:
        """b(h): the exact score of a head blocked alone, else the smallest corrected U of a set holding it."""
        b = {h: math.inf for h in self.heads}
        for s in self.sets.values():
            u = self.set_bound(s)
            for h in s.heads:
                b[h] = min(b[h], u)
        b.update(self.score)
        return b

    def cutoff(self, b: dict[Head, float]) -> float:
        """θ on the optimistic scores b: min(τ · the largest, the k-th largest) (k = the TopG count, or 1)."""
        vals = sorted(b.values(), reverse=True)
        if not vals or math.isinf(vals[0]):
            return -math.inf
        top = vals[0]
        th = self.threshold * top if top > 0 else top
        if self.cover_top is not None:
            th = min(th, vals[min(self._k(), len(vals)) - 1])
        return th

    # -------------------------------------------------------------------------------------------- rounds
    def _run(self, sets: list[list[Head]], why: list[str]) -> None:
        keep = []
        for s, w in zip(sets, why):
            key = frozenset(s)
            if s and key not in self.sets and key not in {frozenset(x) for x, _ in keep}:
                keep.append((s, w))
        if not keep:
            return
        drops = self.measure([s for s, _ in keep])     # [samples, sets]
        r = len(self.rounds)
        for j, (s, w) in enumerate(keep):
            d = drops[:, j].float()
            signed = float(target_average(d[:, None], self.targets)[0][0])
            self.sets[frozenset(s)] = TestedSet(tuple(s), self._bound(d), signed, r, w)
            if len(s) == 1:
                self.drops[s[0]] = d
                self.score[s[0]] = signed
        self.rounds.append({"sets": len(keep), "sizes": sorted((len(s) for s, _ in keep), reverse=True),
                            "why": sorted({w for _, w in keep})})

    def _check_domination(self, theta: float) -> bool:
        """The assumption, tested where the truth is known: a set whose U is below the exact score of a head it
        holds (at or above θ: where it matters) shows cancellation; the retention U(S) / score(h) it shows lowers
        ρ for sets of its size and larger (:meth:`retention`), so their bounds grow and their heads may reopen and
        be split more finely. True when ρ changed."""
        changed = False
        for s in self.sets.values():
            if len(s.heads) < 2:
                continue
            bad = [h for h in s.heads if h in self.score and self.score[h] >= theta and self.score[h] > 0
                   and s.bound < self.score[h] - self.tol]
            for h in bad:
                ratio = max(0.0, s.bound / self.score[h])
                key = (frozenset(s.heads), h)
                if key in self.checked:
                    continue
                self.checked.add(key)
                self.violations.append({"set": [list(x) for x in s.heads], "bound": s.bound,
                                        "head": list(h), "score": self.score[h], "retention": ratio})
                if ratio < self.shrink.get(len(s.heads), 1.0):
                    self.shrink[len(s.heads)] = ratio
                    changed = True
        return changed

    def _parts(self, members: list[Head], theta: float) -> list[list[Head]]:
        """How to block ``members`` next: ``branching`` parts (each no larger than the largest set size that still
        bounds), or head by head where that is expected to cost less: with p the share of the tested sets of
        several heads that came out at or above θ, b parts then about p·m single heads cost b + p·m, against m."""
        multi = [s for s in self.sets.values() if len(s.heads) > 1]
        if self.score:   # θ of the heads blocked alone: finite where bounds are not (sets that bound nothing)
            theta = max(theta, self.cutoff(dict(self.score)))
        p = sum(1 for s in multi if s.bound >= theta) / len(multi) if multi else 1.0
        useful = self._largest_useful()
        n_parts = self.branching if math.isinf(useful) else max(
            self.branching, math.ceil(len(members) / max(1, useful)))
        if n_parts + p * len(members) >= len(members):
            return [[h] for h in members]
        return split_parts(members, n_parts)

    def _largest_useful(self) -> float:
        """The largest set size that still bounds its heads (ρ > 0)."""
        dead = [n for n, r in self.shrink.items() if r <= 0]
        return min(dead) - 1 if dead else math.inf

    def _next(self) -> tuple[list[list[Head]], list[str]]:
        while True:
            b = self.bounds()
            theta = self.cutoff(b)
            if not self._check_domination(theta):
                break
        open_ = [h for h in self.heads if h not in self.score and b[h] >= theta]
        sets, why = [], []
        groups: dict[frozenset, list[Head]] = {}
        for h in open_:   # grouped by the smallest set holding them, split into finer parts
            holders = [s for s in self.sets.values() if h in s.heads]
            home = min(holders, key=lambda s: (len(s.heads), s.round)) if holders else None
            groups.setdefault(frozenset(home.heads) if home else frozenset(self.heads), []).append(h)
        for key, members in groups.items():
            members = sorted(members, key=self.index.get)
            parts = self._parts(members, theta)
            if any(frozenset(p) in self.sets for p in parts):   # nothing new to learn there: head by head
                parts = [[h] for h in members]
            sets += parts
            why += ["open"] * len(parts)
        pending = set(open_)
        for s in (self.sets.values() if self.guard else ()):   # flagged sets no measured head accounts for
            if len(s.heads) < 2 or s.split or s.bound < theta or pending.intersection(s.heads):
                continue                # (a set with open heads waits: they may account for it)
            if any(h in self.score and self._bound(self.drops[h]) >= theta for h in s.heads):
                continue
            rest = [h for h in s.heads if h not in self.score]
            if not rest:
                continue
            s.split = True
            parts = self._parts(rest, theta)
            self.fallback.append({"set": [list(h) for h in s.heads], "bound": s.bound, "theta": theta,
                                  "parts": len(parts)})
            sets += parts
            why += ["fallback"] * len(parts)
        return sets, why

    def run(self) -> None:
        parts = [p for part in screen_partitions(self.heads, self.screens, self.seed) for p in part]
        self._run([[h] for h in self.first] + parts, ["prior"] * len(self.first) + ["screen"] * len(parts))
        while True:
            sets, why = self._next()
            before = len(self.sets)
            self._run(sets, why)
            if len(self.sets) == before:
                break

    # -------------------------------------------------------------------------------------------- summary
    def summary(self) -> dict:
        b = self.bounds()
        theta = self.cutoff(b)
        above = sorted(((h, s) for h, s in self.score.items() if s >= theta),
                       key=lambda x: (-x[1], x[0][0], x[0][1]))
        rest = [b[h] for h in self.heads if h not in self.score]
        pairs = sum(1 for s in self.sets.values() if len(s.heads) > 1 for h in s.heads if h in self.score)
        below = sum(1 for s in self.sets.values() if len(s.heads) > 1 for h in s.heads
                    if h in self.score and s.bound < self.score[h] - self.tol)
        hidden = sorted({h for h, v in self.score.items() if v >= theta
                         for s in self.sets.values() if len(s.heads) > 1 and h in s.heads and s.bound < theta})
        return {"theta": theta, "above": above, "untested_bound": max(rest) if rest else None,
                "guard": {"assumption": "no cancellation: per sample, blocking more heads with h does not lower h's "
                                        "positive MAM drop below the threshold",
                          "bound": self.bound_by, "screens": self.screens, "fallback": self.guard,
                          "checked_pairs": pairs, "pairs_below_score": below,
                          "failures": self.violations,
                          "retention_by_size": {n: self.retention(n) for n in sorted(self.shrink)},
                          "fallback_splits": self.fallback,
                          "cancelled_heads": [list(h) for h in hidden]},
                "rounds": self.rounds}


def layer_share(first_layers: Sequence[int], chunk: int, n_layers: int, clean: bool = True) -> float:
    """Forward-equivalents of one sweep with replayed prefixes: settings sorted by first layer in chunks of
    ``chunk``; each setting recomputes the layers from its chunk's first intervened layer; plus the clean forward
    (``clean``: when it ran). A first layer whose attention the sweep replays still counts whole (an upper bound)."""
    order = sorted(first_layers)
    cost = 1.0 if clean else 0.0
    for i in range(0, len(order), max(1, chunk)):
        part = order[i:i + chunk]
        cost += len(part) * (n_layers - part[0]) / n_layers
    return cost


def set_measure(lens, samples: Sequence[ConflictSample], batch_size: int = 8, chunk: int = 16, dataset=None,
                memory_budget: int | str | None = None, progress: bool = True
                ) -> tuple[Callable[[list], torch.Tensor], list[str], dict]:
    """(measure, targets, share): ``measure(sets)`` blocks each head set of ``sets`` jointly (one sweep setting per
    set, batched, prefix replay) and returns the per-sample drops of the final MAM [samples, sets], samples in the
    order of ``targets``; ``share["cost"]`` accumulates the layer-share cost of the sweeps run, ``share["cleans"]``
    the calls that ran a clean forward.

    Each batch's clean run is kept for the next call (the same inputs: the same outputs to replay) while the kept
    runs take at most half the memory budget; the sweeps get the budget less what is kept. A batch whose run is not
    kept runs its clean forward again."""
    from .. import memory

    L = lens.facts.n_layers
    plan = batch_plan(samples, batch_size)
    order = [samples[i] for b in plan for i in b]
    share = {"cost": 0.0, "cleans": 0}
    device = next(lens.model.parameters()).device
    budget = memory.budget_bytes(device, memory_budget)
    kept: dict[tuple, CleanRun] = {}     # batch (its samples) -> its clean run

    def measure(sets: list[list[Head]]) -> torch.Tensor:
        settings = head_set_settings(sets, 0.0)
        ran = {"clean": False}

        def part_results(part):
            drops = []
            bar = progress_bar(batches(lens, part, batch_size, dataset),
                               f"head search: {len(sets)} head sets, batches", total=len(batch_plan(part, batch_size)),
                               progress=progress)
            for idx, item in zip(batch_plan(part, batch_size), bar):
                key = tuple(id(part[i]) for i in idx)   # the samples outlive the search: their ids stay theirs
                others = sum(run.held_bytes for k, run in kept.items() if k != key)
                res = sweep(lens, item.batch.inputs, settings, metric_pi_and_margin(item.ids_p, item.ids_c),
                            chunk=chunk, memory_budget=None if budget is None else max(budget - others, 0),
                            clean=kept.get(key), keep_clean=True,
                            # later rounds replay this clean run with sets starting at any layer
                            attention_layers=lens.facts.attention_layers)
                ran["clean"] |= not res.clean_reused
                this = res.clean
                if budget is not None and others + this.held_bytes > budget // 2 >= \
                        others + this.held_bytes - this.heads_bytes:
                    this.drop_heads()   # a kept clean run saves a whole forward; its per-head outputs, part of one
                if budget is None or others + this.held_bytes <= budget // 2:
                    kept[key] = this
                else:
                    kept.pop(key, None)
                share["chunk"] = res.chunk
                drops.append((res.baseline[:, 1][None] - res.values[:, :, 1]).T.float())   # [b, sets]
            return torch.cat(drops)
        out = per_sample(part_results, order, batch_size)
        share["cost"] += layer_share([s.first_layer for s in settings], share.get("chunk") or chunk, L,
                                     clean=ran["clean"])
        share["cleans"] += int(ran["clean"])
        return out
    return measure, [s.target for s in order], share


def oracle_packing(lens, samples: Sequence[ConflictSample], exhaustive: HeadRanking, batch_size: int = 8,
                   chunk: int = 16, dataset=None, threshold: float = DEFAULT_THRESHOLD,
                   cover_top: float | None = 0.05, bound: str = "sample", memory_budget: int | str | None = None,
                   progress: bool = True) -> dict:
    """What certifying the search's answer costs a method that already knows every head's exhaustive effect and packs
    by it (our reference measure for the search's cost, docs/methods/head-search.md): the heads at or above θ
    blocked alone, every other head packed (first-fit, largest bound first) into sets whose summed single-head bounds
    U({h}) stay below θ, each set blocked once; a set that comes out at or above θ (its heads interact) is then
    blocked head by head. Forward-equivalents counted as the search counts them (one per blocked set, one per clean
    forward: one here). A reference, not a lower bound: where heads' joint effects are smaller than the sum of their
    single effects (they partly offset, per sample), larger sets stay below θ and a search may certify with fewer
    (seen on a shipped organism with 8 samples: 15 against 20, benchmarks/RESULTS.md). ``exhaustive``:
    :func:`~arbiter.experiments.heads.exhaustive_ranking` on the same samples and batches."""
    samples = require_conflicts(samples, "oracle_packing()")
    measure, targets, _ = set_measure(lens, samples, batch_size, chunk, dataset, memory_budget, progress)
    if exhaustive.per_sample is None or list(exhaustive.targets or []) != targets:
        raise InterventionError("oracle_packing() needs the exhaustive ranking of the same samples in the same "
                                "batches (per-sample drops); run exhaustive_ranking() with the same batch_size.")
    facts = lens.facts
    heads = [(layer, h) for layer in facts.attention_layers for h in range(facts.heads(layer)[0])]
    L, H = exhaustive.scores.shape
    gs = GroupSearch(heads, targets, measure, threshold, cover_top, (L, H), bound=bound)
    exact = {h: float(exhaustive.scores[h]) for h in heads}
    theta = gs.cutoff(exact)
    above = sorted((h for h in heads if exact[h] >= theta), key=lambda h: (-exact[h], h))
    single = {h: gs._bound(exhaustive.per_sample[:, h[0], h[1]].float()) for h in heads}
    bins: list[list] = []
    for h in sorted((h for h in heads if h not in above), key=lambda h: (-single[h], h)):
        for b in bins:
            if b[0] + single[h] < theta:
                b[0] += single[h]
                b[1].append(h)
                break
        else:
            bins.append([single[h], [h]])
    packed = [sorted(b[1]) for b in bins]
    rounds, failed, set_bounds = 0, [], []
    if packed:
        drops = measure(packed)
        rounds += 1
        set_bounds = [gs._bound(drops[:, j].float()) for j in range(len(packed))]
        failed = [s for s, u in zip(packed, set_bounds) if len(s) > 1 and u >= theta]
    singles = [h for s in failed for h in s]
    rounds += 1 if singles else 0
    # the above heads' singles run beside the packed sets; one clean forward (kept for the split round)
    cost = len(above) + len(packed) + len(singles) + 1
    return {"forward_equivalents": float(cost), "exhaustive_forward_equivalents": float(len(heads) + 1),
            "ratio": cost / (len(heads) + 1), "theta": theta, "above": [list(h) for h in above],
            "packed_sets": len(packed), "sets": [[list(h) for h in s] for s in packed], "set_bounds": set_bounds,
            "sets_at_or_above_theta": len(failed), "rounds": max(rounds, 1)}


def search_ranking(lens, samples: Sequence[ConflictSample], batch_size: int = 8, chunk: int = 16, dataset=None,
                   threshold: float = DEFAULT_THRESHOLD, cover_top: float | None = 0.05,
                   branching: int = DEFAULT_BRANCHING, screens: int = DEFAULT_SCREENS,
                   prior: HeadRanking | None = None, prior_heads: int | None = None, seed: int = 0,
                   bound: str = "sample", guard: bool = True, memory_budget: int | str | None = None,
                   progress: bool = True) -> SearchRanking:
    """Adaptive group-testing head ranking (:class:`GroupSearch`; docs/methods/head-search.md): the heads whose
    exhaustive score is ≥ ``threshold`` × the largest, and (``cover_top``, default the TopG fraction 0.05; None:
    not) at least the TopG heads, each with its exact exhaustive score; every other head bounded.

    ``prior``: a cheap ranking (e.g. ``attribution_ranking(method="graddrop")``) whose top ``prior_heads`` (default
    the TopG count) heads are blocked alone in the first round, which only orders the work: the answer is what
    blocking measures. Its cost is added (``prior.cost_forward_equivalents``). ``branching``, ``screens``,
    ``bound`` (where U takes the positive part, :data:`BOUNDS`), ``guard`` (False: no fallback splits of the sets no
    measured head accounts for; the dominance checks still run; the result then rests on the assumption alone, and
    says so in ``guard["fallback"]``): see :class:`GroupSearch`. ``chunk`` / ``memory_budget``: as
    :func:`arbiter.sweep.sweep`. Raises the errors of :func:`~arbiter.experiments.heads.exhaustive_ranking` on the
    same data (no conflict sample)."""
    samples = require_conflicts(samples, "search_ranking()")
    facts = lens.facts
    L = facts.n_layers
    H = max(facts.heads(layer)[0] for layer in facts.attention_layers)
    heads = [(layer, h) for layer in facts.attention_layers for h in range(facts.heads(layer)[0])]
    first: list[Head] = []
    if prior is not None:
        k = prior_heads if prior_heads is not None else len(top_g(torch.zeros(L, H), cover_top or 0.05))
        first = [(x["layer"], x["head"]) for x in prior.ranking()[:k]]
    measure, targets, share = set_measure(lens, samples, batch_size, chunk, dataset, memory_budget, progress)
    gs = GroupSearch(heads, targets, measure, threshold, cover_top, (L, H), branching, screens, first, seed,
                     bound=bound, guard=guard)
    gs.run()
    summ = gs.summary()
    per = torch.full((len(targets), L, H), float("nan"))
    for (layer, h), d in gs.drops.items():
        per[:, layer, h] = d
    score, by = target_average(per, targets)
    bounds = torch.full((L, H), float("nan"))
    for (layer, h), v in gs.bounds().items():
        bounds[layer, h] = v
    n_sets = sum(r["sets"] for r in gs.rounds)
    cost = float(n_sets + share["cleans"])
    prior_cost = float(prior.cost_forward_equivalents or 0.0) if prior is not None else 0.0
    ex_share = layer_share([layer for layer, _ in heads], share.get("chunk") or chunk, L)
    guard = dict(summ["guard"], prior=(prior.method if prior is not None else None), prior_cost=prior_cost)
    result = SearchRanking(
        "search", score, by, cost + prior_cost, per, targets, threshold=threshold, cover_top=cover_top,
        cutoff=summ["theta"], bounds=bounds, above=summ["above"], untested_bound=summ["untested_bound"],
        measured=len(gs.score), clean_forwards=share["cleans"], n_heads=len(heads), exhaustive_cost=float(len(heads) + 1),
        layer_share_cost=share["cost"] + prior_cost, exhaustive_layer_share_cost=ex_share, rounds=summ["rounds"],
        guard=guard)
    why = costlier_than_exhaustive(result.to_dict()["search"])
    if why is not None:
        warnings.warn(f"search_ranking(): {why}", stacklevel=2)
    return result
