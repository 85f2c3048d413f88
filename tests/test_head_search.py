"""Head search (adaptive group testing, docs/methods/head-search.md) against the exhaustive sweep and planted truth."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import _tiny

import arbiter
from arbiter.data import generate_synthetic
from arbiter.errors import DataError, InterventionError
from arbiter.experiments.common import batches, metric_pi_and_margin
from arbiter.experiments.head_search import oracle_packing, screen_partitions, search_ranking, split_parts
from arbiter.experiments.heads import exhaustive_ranking
from arbiter.testing.tiny import tiny

LAYERS, HEADS = 16, 16          # 256 heads


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn"), 8, seed=0, image_size=64)


def _above(ranking, theta):
    """The heads of a complete ranking with score >= theta, best first."""
    return [(x["layer"], x["head"]) for x in ranking.ranking() if x["score"] >= theta]


def test_screens_share_at_most_one_block_per_pair():
    heads = [(layer, h) for layer in range(6) for h in range(4)]
    contiguous, strided = screen_partitions(heads, 2)
    assert sorted(h for b in contiguous for h in b) == sorted(heads) == sorted(h for b in strided for h in b)
    for a in contiguous:
        for b in strided:
            assert len(set(a) & set(b)) <= 1
    assert split_parts(list(range(10)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert split_parts([1, 2, 3], 4) == [[1], [2], [3]]


def test_search_equals_exhaustive_on_a_tiny_model(synth):
    """Heads at or above the cutoff, their order, their exact scores and per-sample drops, and TopG: as the
    exhaustive sweep gives them on the same samples."""
    tm = _tiny("llava")
    samples = [s for s in synth.samples if s.conflict]
    with arbiter.attach(tm.model, tm.processor) as lens:
        ex = exhaustive_ranking(lens, samples, batch_size=4, dataset=synth, progress=False)
        se = search_ranking(lens, samples, batch_size=4, dataset=synth, progress=False, threshold=0.25)
    scores = [x["score"] for x in ex.ranking()]
    theta = min(0.25 * scores[0], scores[len(ex.top()) - 1])
    assert se.cutoff == pytest.approx(theta, abs=1e-5)
    assert [h for h, _ in se.above] == _above(ex, theta)
    assert se.top() == ex.top()
    done = torch.isfinite(se.scores)
    assert torch.allclose(se.scores[done], ex.scores[done], atol=1e-5)
    assert torch.allclose(se.per_sample[:, done], ex.per_sample[:, done], atol=1e-5)
    if se.untested_bound is not None:        # what was not blocked alone is bounded below the cutoff
        assert se.untested_bound < se.cutoff
        untested = ~done & torch.isfinite(ex.scores)
        assert bool((ex.scores[untested] <= se.bounds[untested] + 1e-5).all())
    # each batch's clean forward ran once, in the first round, and was replayed in the others
    assert len(se.rounds) > 1 and se.clean_forwards == 1
    assert se.cost_forward_equivalents == sum(r["sets"] for r in se.rounds) + 1
    assert se.exhaustive_cost == ex.cost_forward_equivalents == 17.0


def test_a_search_that_costs_more_than_the_exhaustive_sweep_says_so(synth):
    """On the tiny model every screen set comes out above the cutoff, so the search blocks every head alone and
    costs more than L·H + 1: it warns at once, with both counts, and points to the exhaustive sweep."""
    tm = _tiny("llava")
    samples = [s for s in synth.samples if s.conflict]
    with arbiter.attach(tm.model, tm.processor) as lens, pytest.warns(UserWarning) as caught:
        se = search_ranking(lens, samples, batch_size=4, dataset=synth, progress=False, threshold=0.25)
    assert se.cost_forward_equivalents > se.exhaustive_cost == 17.0
    text = " ".join(str(w.message) for w in caught)
    assert f"({se.cost_forward_equivalents:g} forward-equivalents per batch against 17)" in text
    assert f"blocked {se.measured} of the 16 heads alone" in text and "method='exhaustive'" in text


def test_the_cost_sentence_is_said_only_where_the_search_cost_more():
    from arbiter.experiments.head_search import costlier_than_exhaustive

    base = {"exhaustive_forward_equivalents": 65.0, "measured": 59, "n_heads": 64,
            "guard": {"fallback_splits": [{"set": [[0, 0], [0, 1]]}] * 3}}
    assert costlier_than_exhaustive({**base, "forward_equivalents": 40.0}) is None
    assert costlier_than_exhaustive({**base, "forward_equivalents": 65.0}) is None
    said = costlier_than_exhaustive({**base, "forward_equivalents": 76.0})
    assert "(76 forward-equivalents per batch against 65)" in said and "blocked 59 of the 64 heads alone" in said
    assert "3 of them with no head blocked alone accounting for it" in said
    assert "accounting" not in costlier_than_exhaustive({**base, "guard": {}, "forward_equivalents": 76.0})


def test_the_search_replays_the_first_layers_attention_in_every_round(synth, monkeypatch):
    """The clean run kept from the first round holds every attention layer's per-head outputs, so the later rounds'
    sets, whatever layer they start at, replay that layer's attention too: every forward of every sweep does."""
    import arbiter.experiments.head_search as hs
    results = []

    def spy(*a, **k):
        results.append(hs_sweep(*a, **k))
        return results[-1]
    hs_sweep = hs.sweep
    monkeypatch.setattr(hs, "sweep", spy)
    # 8 layers of 2 heads: the first round's blocks of 4 heads start at even layers only; later sets at odd ones
    tm = tiny("llava", hidden=32, layers=8, heads=2, kv_heads=2, image_tokens=16)
    samples = [s for s in synth.samples if s.conflict]
    with arbiter.attach(tm.model, tm.processor) as lens:
        search_ranking(lens, samples, batch_size=8, dataset=synth, progress=False, threshold=0.25)
        layers = lens.facts.attention_layers
    firsts = [sorted({s.first_layer for s in r.settings}) for r in results]
    assert set(firsts[0]) != set(layers) and any(set(f) - set(firsts[0]) for f in firsts[1:])
    assert len(results) > 1 and any(r.clean_reused for r in results)
    assert all(r.attention_replayed == r.forwards > 0 for r in results)
    assert all(sorted(r.clean.heads) == layers for r in results)


def test_a_clean_run_the_budget_cannot_keep_with_its_per_head_outputs_is_kept_without_them(synth):
    """Half the memory budget holds every batch's clean run without its per-head outputs, not with them: the search
    frees those outputs and keeps the runs, so a second measurement runs no clean forward (one clean run per batch,
    in the first measurement only)."""
    from arbiter.experiments.common import batch_plan
    from arbiter.experiments.head_search import set_measure
    from arbiter.sweep import head_settings, sweep
    tm = _tiny("llava")
    samples = [s for s in synth.samples if s.conflict][:6]
    sets = [[(0, 0), (1, 1)], [(2, 0)]]
    with arbiter.attach(tm.model, tm.processor) as lens:
        held = heads = 0
        for item in batches(lens, samples, 2, synth):
            run = sweep(lens, item.batch.inputs, head_settings(lens, [(0, 0)]), memory_budget=2**40,
                        keep_clean=True, attention_layers=lens.facts.attention_layers).clean
            held, heads = held + run.held_bytes, heads + run.heads_bytes
        budget = 2 * held - 2 * 1024   # half of it: every run without its per-head outputs, not all with them
        assert held - heads <= budget // 2 < held and len(batch_plan(samples, 2)) == 3
        measure, _, share = set_measure(lens, samples, batch_size=2, dataset=synth, memory_budget=budget,
                                        progress=False)
        first = measure(sets)
        second = measure(sets)
    assert share["cleans"] == 1
    assert torch.allclose(first, second, atol=1e-6)   # the second replays no attention where the outputs were freed


def test_search_refuses_without_conflicts(synth):
    tm = _tiny("llava")
    agree = [s for s in synth.samples if not s.conflict] or [dataclasses.replace(synth.samples[0], conflict=False)]
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(DataError, match="conflict samples"):
            search_ranking(lens, agree, dataset=synth, progress=False)
        with pytest.raises(InterventionError, match="threshold"):
            search_ranking(lens, synth.samples, dataset=synth, progress=False, threshold=0.0)


def test_group_search_finds_planted_effects_in_an_additive_model():
    """No model: a set's per-sample drop is the sum of its heads' planted drops (1,024 heads, 5 of them decisive,
    the rest zero). The search returns exactly the five, with their planted scores, and bounds the rest by 0."""
    from arbiter.experiments.head_search import GroupSearch

    heads = [(layer, h) for layer in range(32) for h in range(32)]
    targets = ["vision", "text"] * 3
    g = torch.Generator().manual_seed(0)
    truth = {(3, 7): 2.0, (3, 9): 1.5, (17, 0): 1.2, (25, 31): 0.9, (31, 16): 0.6}
    drops = {h: torch.full((6,), v) + 0.1 * torch.randn(6, generator=g) for h, v in truth.items()}
    calls = []

    def measure(sets):
        calls.append(len(sets))
        return torch.stack([sum((drops[h] for h in s if h in drops), torch.zeros(6)) for s in sets], dim=1)

    gs = GroupSearch(heads, targets, measure, threshold=0.25, cover_top=None, grid=(32, 32))
    gs.run()
    summary = gs.summary()
    expect = sorted(truth, key=lambda h: -float(drops[h].mean()))
    assert [h for h, _ in summary["above"]] == expect
    for h, score in summary["above"]:
        assert score == pytest.approx(float(drops[h].mean()), abs=1e-6)   # balanced targets: the plain mean
    assert summary["untested_bound"] == 0.0
    assert sum(calls) + len(calls) < 0.15 * 1025          # forward-equivalents against the exhaustive 1,025


def test_without_the_fallback_a_cancelled_head_is_missed_and_with_it_found():
    """The additive model with a planted pair that cancels exactly inside its contiguous screen block."""
    from arbiter.experiments.head_search import GroupSearch

    heads = [(layer, h) for layer in range(8) for h in range(8)]
    targets = ["vision", "text"]
    drops = {(2, 3): torch.tensor([1.0, 1.0]), (2, 4): torch.tensor([-1.0, -1.0]), (6, 1): torch.tensor([0.8, 0.8])}

    def measure(sets):
        return torch.stack([sum((drops[h] for h in s if h in drops), torch.zeros(2)) for s in sets], dim=1)

    found = {}
    for guard in (False, True):
        gs = GroupSearch(heads, targets, measure, threshold=0.25, cover_top=None, grid=(8, 8), guard=guard)
        gs.run()
        found[guard] = [h for h, _ in gs.summary()["above"]]
    assert found[False] == [(6, 1)]
    assert found[True] == [(2, 3), (6, 1)]


# ---------------------------------------------------------------------------------------- planted heads

def _planted(tmp_path, effects: dict[tuple[int, int], float]):
    """A tiny Qwen2-VL (16 layers x 16 heads) whose heads write nothing (o_proj zero, MLPs zero) except the
    ``effects`` heads: each writes a constant (its value comes from the v bias alone) along the direction that
    separates the compliant answer ("red") from the competitor ("blue"), times its effect (negative: against).
    Returns (model, processor, dataset, samples): every sample's compliant answer is "red"."""
    tm = tiny("qwen2_vl", layers=LAYERS, heads=HEADS, kv_heads=HEADS, hidden=128)
    ds = generate_synthetic(tmp_path, 8, seed=1, image_size=56, p_noisy=0.0, p_agreement=0.0)
    samples = []
    for i, s in enumerate(ds.samples[:4]):
        vision, text = ("red", "blue") if s.target == "vision" else ("blue", "red")
        samples.append(dataclasses.replace(s, answer_vision=vision, answer_text=text, aliases_vision=[],
                                           aliases_text=[], question="What colour is the shape?"))
    model = tm.model
    text = model.model.language_model
    d = 128 // HEADS
    with arbiter.attach(model, tm.processor) as lens:
        item = next(iter(batches(lens, samples[:1], 1, ds)))
    w = model.lm_head.weight.detach()
    u = w[item.ids_p[0]].mean(0) - w[item.ids_c[0]].mean(0)
    u = u / u.norm()
    with torch.no_grad():
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for (layer, h), c in effects.items():
            attn = text.layers[layer].self_attn
            attn.v_proj.weight[h * d:(h + 1) * d] = 0.0
            attn.v_proj.bias[h * d:(h + 1) * d] = 0.0
            attn.v_proj.bias[h * d] = 1.0
            attn.o_proj.weight[:, h * d] = c * u
    return model, tm.processor, ds, samples


def _direct_drop(lens, samples, ds, heads, positive: bool = False, batch_size: int | None = None) -> float:
    """Drop of the final MAM with ``heads`` zeroed by a plain probe in ordinary forwards (batches of ``batch_size``,
    default all samples at once): per sample (its positive part when ``positive``: the search's bound U), mean per
    target, then across targets."""
    drops, targets = [], []
    for item in batches(lens, samples, batch_size or len(samples), ds):
        metric = metric_pi_and_margin(item.ids_p, item.ids_c)
        with torch.no_grad():
            clean = metric(lens.model(**item.batch.inputs).logits)[:, 1]
            with lens.probe(arbiter.HeadScale(heads, alpha=0.0)):
                blocked = metric(lens.model(**item.batch.inputs).logits)[:, 1]
        drops.append(clean - blocked)
        targets += item.targets
    d = torch.cat(drops)
    d = d.clamp(min=0) if positive else d
    by = [float(d[[t == x for x in targets]].mean()) for t in ("vision", "text") if t in targets]
    return sum(by) / len(by)


@pytest.mark.slow
def test_planted_decisive_heads_are_found_exactly_among_256(tmp_path):
    """Four hand-planted heads carry the decision among 256; every other head writes nothing. The search returns
    exactly them, in the order of their planted effects, with the drop a plain blocking forward gives, at a
    fraction of the exhaustive 257 forward-equivalents."""
    planted = {(2, 5): 0.5, (7, 11): 0.4, (11, 0): 0.3, (14, 9): 0.2}
    model, proc, ds, samples = _planted(tmp_path, planted)
    with arbiter.attach(model, proc) as lens:
        truth = {h: _direct_drop(lens, samples, ds, [h]) for h in planted}
        assert _direct_drop(lens, samples, ds, [(0, 0), (5, 5), (15, 15)]) == pytest.approx(0.0, abs=1e-6)
        assert all(v > 0.25 * max(truth.values()) for v in truth.values())   # all four above the threshold
        se = search_ranking(lens, samples, batch_size=4, dataset=ds, progress=False, threshold=0.25,
                            cover_top=None)
    assert [h for h, _ in se.above] == sorted(planted, key=planted.get, reverse=True)
    for h, s in se.above:
        assert s == pytest.approx(truth[h], abs=1e-5)
    assert se.untested_bound < se.cutoff
    assert se.exhaustive_cost == 257.0
    print(f"planted: cost {se.cost_forward_equivalents} of {se.exhaustive_cost} forward-equivalents "
          f"({se.cost_forward_equivalents / se.exhaustive_cost:.3f}), {se.measured} heads blocked alone, "
          f"rounds {[r['sets'] for r in se.rounds]}")
    assert se.cost_forward_equivalents <= 0.3 * se.exhaustive_cost


@pytest.mark.slow
def test_cancelling_pair_is_caught_by_the_guard(tmp_path):
    """Two planted heads of one layer write opposite contributions (they cancel exactly when blocked together).
    With the contiguous screen alone the head that helps is cleared by its block (U = 0) and missed; the strided
    screen's block that holds it is raised by no measured head, so the guard splits it and finds the head, with
    its exact drop, and reports the block that hid it."""
    a, b, other = (6, 2), (6, 3), (12, 7)
    model, proc, ds, samples = _planted(tmp_path, {a: 0.5, b: -0.5, other: 0.3})
    with arbiter.attach(model, proc) as lens:
        truth_a = _direct_drop(lens, samples, ds, [a])
        assert _direct_drop(lens, samples, ds, [a, b]) == pytest.approx(0.0, abs=1e-6)   # they cancel
        assert truth_a > 0.25 * max(truth_a, _direct_drop(lens, samples, ds, [other]))
        blind = search_ranking(lens, samples, batch_size=4, dataset=ds, progress=False, cover_top=None, screens=1)
        guarded = search_ranking(lens, samples, batch_size=4, dataset=ds, progress=False, cover_top=None)
    assert a not in [h for h, _ in blind.above]                     # the cancellation is real
    found = dict(guarded.above)
    assert a in found and found[a] == pytest.approx(truth_a, abs=1e-5)
    assert [a[0], a[1]] in guarded.guard["cancelled_heads"]
    hid = [v for v in guarded.guard["failures"] if v["head"] == [a[0], a[1]] and [b[0], b[1]] in v["set"]]
    assert hid and hid[0]["retention"] == pytest.approx(0.0, abs=1e-5)    # the pair's block hid it entirely
    assert guarded.guard["fallback_splits"]


@pytest.mark.slow
def test_diagnose_runs_the_search_as_reference_and_reports_both_costs(synth, tmp_path):
    """``head_methods=("search", "exhaustive")``: the report ranks by the search, records both forward counts
    (the exhaustive one = L·H + 1) and says them in the heads section; the blocking step draws both curves."""
    from arbiter.experiments.diagnose import diagnose
    from arbiter.report import markdown

    tm = _tiny("llava")
    rep = diagnose(tm.model, tm.processor, synth, tmp_path, limit=4, window=3, n_random=2, alphas=(2.0,),
                   batch_size=4, generate=False, progress=False, head_methods=("search", "exhaustive"),
                   skip=("shapley", "keyspace", "imbalance", "surrogate", "attractors"), log=lambda s: None)
    hd = rep["heads"]
    assert hd["method"] == "search" and hd["exhaustive_forward_equivalents"] == 17.0
    assert hd["forward_equivalents"]["exhaustive"] == 17.0
    assert hd["forward_equivalents"]["search"] == hd["search"]["forward_equivalents"] > 0
    ex = {(x["layer"], x["head"]): x["score"] for x in hd["rankings"]["exhaustive"]}
    for x in hd["ranking"]:                       # every head the search scored: the exhaustive score
        assert x["score"] == pytest.approx(ex[(x["layer"], x["head"])], abs=1e-5)
    assert set(rep["blocking"]["by_ranking"]["summary"]) == {"search", "exhaustive"}
    text = markdown(rep)
    assert "Cost in forward-equivalents per batch: exhaustive sweep 17; search" in text
    assert hd["forward_equivalents"]["search"] > 17   # on this model the search costs more: the report says why
    assert "The search cost more than the exhaustive sweep here" in text and "method='exhaustive'" in text


def test_oracle_packing_packs_below_the_cutoff_and_counts_what_it_blocks(synth):
    """The oracle packing: the exhaustive heads >= θ alone, the rest in packed sets; each set's bound equals the one
    an ordinary forward with the set blocked by a plain probe gives; sets below θ need no more; the count is
    above + sets + singles of sets >= θ + one clean forward, never above the exhaustive L·H + 1."""
    tm = _tiny("llava")
    samples = [s for s in synth.samples if s.conflict]
    with arbiter.attach(tm.model, tm.processor) as lens:
        ex = exhaustive_ranking(lens, samples, batch_size=4, dataset=synth, progress=False)
        floor = oracle_packing(lens, samples, ex, batch_size=4, dataset=synth, progress=False)
        direct = [_direct_drop(lens, samples, synth, [tuple(h) for h in s], positive=True, batch_size=4)
                  for s in floor["sets"]]
    scores = [x["score"] for x in ex.ranking()]
    theta = min(0.25 * scores[0], scores[len(ex.top()) - 1])
    assert floor["theta"] == pytest.approx(theta, abs=1e-6)
    assert [tuple(h) for h in floor["above"]] == _above(ex, theta)
    packed = sorted(tuple(h) for s in floor["sets"] for h in s)
    assert packed == sorted((x["layer"], x["head"]) for x in ex.ranking() if x["score"] < theta)
    assert floor["set_bounds"] == pytest.approx(direct, abs=1e-5)
    over = [s for s, u in zip(floor["sets"], direct) if len(s) > 1 and u >= theta]
    assert floor["sets_at_or_above_theta"] == len(over)
    assert floor["forward_equivalents"] == len(floor["above"]) + len(floor["sets"]) + sum(map(len, over)) + 1
    assert floor["forward_equivalents"] <= floor["exhaustive_forward_equivalents"] == 17.0
