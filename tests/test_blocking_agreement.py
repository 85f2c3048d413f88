"""Each head ranking's own top heads blocked (SPEC 7) and its deletion curve against the reference's."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import _tiny

import arbiter
from arbiter.data import generate_synthetic
from arbiter.errors import InterventionError
from arbiter.experiments.common import batches, metric_pi_and_margin
from arbiter.experiments.heads import HeadRanking, blocking_agreement, deletion_ks, exhaustive_ranking

ALL = [(layer, h) for layer in range(4) for h in range(4)]  # the tiny llava: 4 layers x 4 heads
REF = [ALL[i] for i in (5, 0, 10, 3, 15, 8, 1, 12, 2, 6, 4, 7, 9, 11, 13, 14)]
OTHER = REF[::-1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn"), 8, seed=0, image_size=64)


def _direct(lens, samples, dataset, heads):
    """(clean, blocked) [samples, 2] of (π, m) with ``heads`` zeroed by a plain HeadScale probe, one batch."""
    item = next(iter(batches(lens, samples, len(samples), dataset)))
    metric = metric_pi_and_margin(item.ids_p, item.ids_c)
    with torch.no_grad():
        clean = metric(lens.model(**item.batch.inputs).logits)
        with lens.probe(arbiter.HeadScale(heads, alpha=0.0)):
            blocked = metric(lens.model(**item.batch.inputs).logits)
    return clean.float(), blocked.float(), item.targets


def test_deletion_grid_is_geometric_up_to_twice_topg_and_contains_topg():
    assert deletion_ks(24, 1) == [1, 2, 3, 4, 6, 8]
    ks = deletion_ks(784, 39)
    assert ks[0] == 1 and ks[-1] == 78 and 39 in ks and len(ks) == 9
    assert deletion_ks(4, 1) == [1, 2, 3, 4]  # capped at the number of heads
    with pytest.raises(InterventionError, match="n_heads >= 1"):
        deletion_ks(0, 1)


def test_curves_equal_blocking_each_top_k_directly(synth):
    """Every point of every curve = zeroing that ranking's top k heads with a plain probe: the drop of m
    averaged per target then across targets, and the MFR (π > 0.5) on the chosen samples."""
    tm = _tiny("llava")
    samples = [s for s in synth.samples if s.conflict]
    with arbiter.attach(tm.model, tm.processor) as lens:
        res = blocking_agreement(lens, samples, [True] * len(samples), {"ref": REF, "other": OTHER},
                                 ks=[1, 2, 5], n_random=0, batch_size=3, dataset=synth)
        assert res.ks == [1, 2, 5] and res.k_topg == 1 and res.n_samples == len(samples)
        for name, order in (("ref", REF), ("other", OTHER)):
            for j, k in enumerate(res.ks):
                clean, blocked, targets = _direct(lens, samples, synth, order[:k])
                drops = clean[:, 1] - blocked[:, 1]
                by_target = [drops[[t == x for t in targets]].mean() for x in ("vision", "text") if x in targets]
                want = torch.stack(by_target).mean().item()
                assert res.curves[name]["margin_drop"][j] == pytest.approx(want, abs=1e-5)
                assert res.curves[name]["mfr"][j] == pytest.approx((blocked[:, 0] > 0.5).float().mean().item())
        assert res.mfr_base == pytest.approx((clean[:, 0] > 0.5).float().mean().item())
    ref_area, other_area = sum(res.curves["ref"]["margin_drop"]), sum(res.curves["other"]["margin_drop"])
    assert res.summary["ref"]["captured"] == pytest.approx(1.0)
    assert res.summary["other"]["captured"] == pytest.approx(other_area / ref_area)
    assert res.summary["other"]["topg_heads"] == [list(OTHER[0])]
    assert res.summary["other"]["topg_mfr"] == res.curves["other"]["mfr"][0]
    assert res.random == {}


def test_head_rankings_and_their_dicts_give_the_same_agreement_as_head_lists(synth):
    tm = _tiny("llava")
    samples = [s for s in synth.samples if s.conflict]
    scores = torch.zeros(4, 4)
    for i, (layer, h) in enumerate(REF):
        scores[layer, h] = 16.0 - i
    ranking = HeadRanking("exhaustive", scores)
    with arbiter.attach(tm.model, tm.processor) as lens:
        kw = dict(ks=[1, 3], n_random=0, batch_size=8, dataset=synth)
        a = blocking_agreement(lens, samples, [True] * len(samples), {"r": ranking, "o": OTHER}, **kw)
        b = blocking_agreement(lens, samples, [True] * len(samples), {"r": ranking.to_dict(), "o": OTHER}, **kw)
        c = blocking_agreement(lens, samples, [True] * len(samples), {"r": REF, "o": OTHER}, **kw)
    assert a.curves == b.curves == c.curves and a.summary == b.summary == c.summary


def test_random_orders_give_the_chance_level_of_the_same_curve(synth):
    """The random control: n orders drawn from the reference's heads with the seed; its mean curve and the
    captured share of each order, recomputed here from the same orders run as named rankings."""
    tm = _tiny("llava")
    samples = [s for s in synth.samples if s.conflict]
    with arbiter.attach(tm.model, tm.processor) as lens:
        ref = [(x["layer"], x["head"]) for x in exhaustive_ranking(lens, samples, dataset=synth).ranking()]
        rng = random.Random(3)
        orders = [rng.sample(ref, 2) for _ in range(3)]
        res = blocking_agreement(lens, samples, [True] * len(samples), {"ref": ref}, ks=[1, 2], n_random=3, seed=3,
                                 batch_size=8, dataset=synth)
        named = blocking_agreement(lens, samples, [True] * len(samples),
                                   {"ref": ref, **{f"r{i}": o for i, o in enumerate(orders)}}, ks=[1, 2], n_random=0,
                                   batch_size=8, dataset=synth)
    assert sum(named.curves["ref"]["margin_drop"]) > 0  # the best single heads of the reference hurt m
    caps = torch.tensor([named.summary[f"r{i}"]["captured"] for i in range(3)])
    assert res.random["n"] == 3
    assert res.random["captured_mean"] == pytest.approx(caps.mean().item(), abs=1e-6)
    assert res.random["captured_sd"] == pytest.approx(caps.std().item(), abs=1e-6)
    mean_drop = torch.tensor([named.curves[f"r{i}"]["margin_drop"] for i in range(3)]).mean(0)
    assert res.random["margin_drop_mean"] == pytest.approx(mean_drop.tolist(), abs=1e-6)


def test_only_correct_conflict_samples_are_blocked(synth):
    tm = _tiny("llava")
    samples = [s for s in synth.samples if s.conflict]
    with arbiter.attach(tm.model, tm.processor) as lens:
        none = blocking_agreement(lens, samples, [False] * len(samples), {"ref": REF}, dataset=synth)
        some = blocking_agreement(lens, samples, [i % 2 == 0 for i in range(len(samples))], {"ref": REF},
                                  ks=[1], n_random=0, dataset=synth)
    assert none.n_samples == 0 and none.curves == {} and none.summary == {}
    assert json.loads(json.dumps(none.to_dict(), allow_nan=False))["mfr_base"] is None
    assert some.n_samples == (len(samples) + 1) // 2


def test_bad_arguments_are_rejected_with_what_to_do(synth):
    tm = _tiny("llava")
    samples = [s for s in synth.samples if s.conflict]
    ok = [True] * len(samples)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(InterventionError, match="at least one ranking"):
            blocking_agreement(lens, samples, ok, {}, dataset=synth)
        with pytest.raises(InterventionError, match="reference 'nope' is not among"):
            blocking_agreement(lens, samples, ok, {"ref": REF}, reference="nope", dataset=synth)
        with pytest.raises(InterventionError, match="between 1 and the number of ranked heads"):
            blocking_agreement(lens, samples, ok, {"ref": REF, "short": REF[:2]}, ks=[1, 3], dataset=synth)
        with pytest.raises(InterventionError, match="TopG is 4 heads"):
            blocking_agreement(lens, samples, ok, {"ref": REF[:2]}, fraction=0.25, dataset=synth)
        with pytest.raises(InterventionError, match="one per sample"):
            blocking_agreement(lens, samples, ok[:-1], {"ref": REF}, dataset=synth)


def test_agreement_against_the_reference_magnitudes_ranks_a_helpful_head_by_its_size():
    """A magnitude ranking that orders |effect| exactly: Spearman 1 against |reference|, lower against the signed
    reference (the head whose zeroing helps, −0.9, ranks last there and second here)."""
    from arbiter.experiments.heads import compare_rankings

    ref = HeadRanking("exhaustive", torch.tensor([[1.0, -0.9], [0.2, 0.1]]))
    mag = HeadRanking("graddrop", torch.tensor([[1.0, 0.9], [0.2, 0.1]]))
    cmp = compare_rankings(ref, mag)
    assert cmp["spearman_abs_reference"] == pytest.approx(1.0)
    assert cmp["spearman"] == pytest.approx(0.4)  # ranks (4, 1, 3, 2) vs (4, 3, 2, 1): 1 - 6·6 / (4·15)
