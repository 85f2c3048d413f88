"""intervention_effect: I_NSSD and MFR of any intervention, clean against intervened."""

from __future__ import annotations

import pytest
import torch
from helpers import _tiny

import arbiter
from arbiter import organisms
from arbiter.data import generate_synthetic
from arbiter.errors import InterventionError
from arbiter.experiments.baseline import evaluate
from arbiter.experiments.common import batches, pi_from_logits
from arbiter.experiments.intervention import intervention_effect
from arbiter.experiments.knockout_map import knockout_map
from arbiter.metrics import NSSD_METHODS, i_nssd


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn"), 8, seed=0, image_size=64)


class Gaze(arbiter.Probe):
    """Reads the last row's attention and changes nothing."""

    reads = {"attn.probs": "last"}

    def attn_probs(self, ctx, probs):
        self.emit(ctx.layer, probs.sum(-1))


@pytest.mark.parametrize("how", [m for m in NSSD_METHODS])
def test_a_reading_probe_has_exactly_zero_effect(synth, how):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = intervention_effect(lens, synth.samples, Gaze(), how=how, batch_size=3, dataset=synth)
    assert r.nssd.value == 0.0 and set(r.nssd_by_target.values()) == {0.0}
    assert torch.equal(r.pi, r.pi_prime) and r.mfr.follows == r.mfr_clean.follows


def test_nssd_is_i_nssd_of_pi_with_and_without_the_intervention(synth):
    """Against two plain forwards per batch: π from the last logits, then SPEC 5's signed JSD."""
    tm = _tiny("llava")
    heads = [(0, 1), (1, 2), (3, 0)]
    samples = [s for s in synth.samples if s.conflict]
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = intervention_effect(lens, samples, lambda: lens.block_heads(heads), batch_size=8, dataset=synth)
        item = next(iter(batches(lens, samples, 8, synth)))
        with torch.no_grad():
            pi = pi_from_logits(tm.model(**item.batch.inputs).logits[:, -1], item.ids_p, item.ids_c)
            with lens.block_heads(heads):
                pi2 = pi_from_logits(tm.model(**item.batch.inputs).logits[:, -1], item.ids_p, item.ids_c)
    assert torch.allclose(r.pi, pi, atol=1e-6) and torch.allclose(r.pi_prime, pi2, atol=1e-6)
    assert r.nssd.value == pytest.approx(i_nssd(pi, pi2).value, abs=1e-6)
    assert r.nssd.value != 0.0


def test_a_knockout_gives_the_knockout_map_entry_of_its_edge_and_window(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        kmap = knockout_map(lens, synth.samples, edges=[("image", "last")], window=3, batch_size=4, dataset=synth)
        for e in kmap.entries:
            r = intervention_effect(lens, synth.samples,
                                    lambda c=e["center"]: lens.knockout("image", "last", layers=lens.window(c, 3)),
                                    batch_size=4, dataset=synth)
            assert r.nssd.value == pytest.approx(e["nssd"], abs=1e-5)
            assert r.mfr.overall == pytest.approx(e["mfr"])


def test_knocking_the_image_out_of_the_last_token_is_negative_for_vision_only():
    """Sign convention on the trained organism: the vision-instructed answers lose π (I_NSSD < 0, MFR falls), the
    text-instructed ones do not read the image there."""
    model, processor, ds = organisms.load("llava_tiny")
    samples = [s for s in ds.samples if s.conflict][:24]
    with arbiter.attach(model, processor) as lens:
        r = intervention_effect(lens, samples, lens.knockout("image", "last"), dataset=ds)
    assert r.nssd_by_target["vision"] < -0.1 and r.nssd.value < 0
    assert abs(r.nssd_by_target["text"]) < 0.02
    assert r.mfr.vision < r.mfr_clean.vision and r.mfr.text == r.mfr_clean.text == 1.0
    assert set(r.to_dict()) >= {"nssd", "nssd_by_target", "mfr_clean", "mfr", "pi", "pi_prime"}


def test_generated_mfr_is_the_baselines_clean_and_intervened():
    """On the organism, knocking the image out of the last token changes greedy answers: the intervened MFR is
    the baseline's under the same knockout, the clean one the baseline's without."""
    model, processor, ds = organisms.load("llava_tiny")
    samples = [s for s in ds.samples if s.conflict and s.target == "vision"][:8]
    with arbiter.attach(model, processor) as lens:
        r = intervention_effect(lens, samples, lambda: lens.knockout("image", "last"), generate=True, dataset=ds)
        clean = evaluate(lens, samples, 8, ds, generate=True)
        with lens.knockout("image", "last"):
            knocked = evaluate(lens, samples, 8, ds, generate=True)
    assert r.mfr_generated_clean.follows == [int(f == 1) for f in clean.follows]
    assert r.mfr_generated.follows == [int(f == 1) for f in knocked.follows]
    assert r.mfr_generated.overall < r.mfr_generated_clean.overall
    assert r.mfr_generated.variant == "answer"


def test_bad_interventions_are_rejected_with_an_example(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(InterventionError, match="lambda: lens.knockout"):
            intervention_effect(lens, synth.samples, 3, dataset=synth)
        with pytest.raises(InterventionError, match="factory returned int"):
            intervention_effect(lens, synth.samples, lambda: 3, dataset=synth)


def test_plot_shows_the_histogram_and_mfr_clean_against_intervened(synth, tmp_path):
    pytest.importorskip("matplotlib")
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = intervention_effect(lens, synth.samples, lambda: lens.block_heads([(0, 0), (1, 1)]), dataset=synth)
    fig = r.plot(tmp_path / "e.png")
    bars = fig.axes[1].patches
    assert [p.get_height() for p in bars[:3]] == pytest.approx(
        [r.mfr_clean.overall, r.mfr_clean.vision, r.mfr_clean.text], nan_ok=True)
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def _mixed(synth):
    """The conflict samples with two of them text-only: batches group them apart, so results come back in
    another order than given."""
    import dataclasses

    conf = [s for s in synth.samples if s.conflict]
    return [dataclasses.replace(s, image=None) if i in (0, 3) else s for i, s in enumerate(conf)]


def _one_by_one(lens, samples, dataset, make):
    """{id: ((π, m) clean, (π, m) intervened)} from one forward per sample."""
    from arbiter.experiments.common import metric_pi_and_margin

    out = {}
    for s in samples:
        item = next(iter(batches(lens, [s], 1, dataset)))
        metric = metric_pi_and_margin(item.ids_p, item.ids_c)
        with torch.no_grad():
            a = metric(lens.model(**item.batch.inputs).logits)[0]
            with make():
                b = metric(lens.model(**item.batch.inputs).logits)[0]
        out[s.id] = (a, b)
    return out


def test_per_sample_results_stay_with_their_samples_when_text_only_samples_are_mixed_in(synth):
    tm = _tiny("llava")
    samples = _mixed(synth)
    heads = [(0, 1), (1, 2), (3, 0), (2, 2)]
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = intervention_effect(lens, samples, lambda: lens.block_heads(heads), batch_size=8, dataset=synth)
        direct = _one_by_one(lens, samples, synth, lambda: lens.block_heads(heads))
    assert r.sample_ids != [s.id for s in samples]  # the batches did reorder them
    target = {s.id: s.target for s in samples}
    assert r.targets == [target[i] for i in r.sample_ids]
    assert torch.allclose(r.pi, torch.stack([direct[i][0][0] for i in r.sample_ids]), atol=1e-5)
    assert torch.allclose(r.pi_prime, torch.stack([direct[i][1][0] for i in r.sample_ids]), atol=1e-5)
    for t in ("vision", "text"):
        ids = [i for i in r.sample_ids if target[i] == t]
        want = i_nssd(torch.stack([direct[i][0][0] for i in ids]), torch.stack([direct[i][1][0] for i in ids]))
        assert r.nssd_by_target[t] == pytest.approx(want.value, abs=1e-5)


def test_blocking_agreement_averages_each_sample_under_its_own_target(synth):
    from arbiter.experiments.heads import blocking_agreement

    tm = _tiny("llava")
    samples = _mixed(synth)
    heads = [(0, 1), (1, 2), (3, 0), (2, 2)]
    with arbiter.attach(tm.model, tm.processor) as lens:
        ba = blocking_agreement(lens, samples, [True] * len(samples), {"ref": heads + [(0, 0)]}, ks=[4], n_random=0,
                                batch_size=8, dataset=synth)
        direct = _one_by_one(lens, samples, synth, lambda: lens.block_heads(heads))
    drops = {t: torch.stack([direct[s.id][0][1] - direct[s.id][1][1] for s in samples if s.target == t]).mean()
             for t in ("vision", "text")}
    assert ba.curves["ref"]["margin_drop"][1] == pytest.approx(float(torch.stack(list(drops.values())).mean()),
                                                                abs=1e-5)
