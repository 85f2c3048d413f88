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


def test_generated_mfr_is_the_baselines_clean_and_intervened(synth):
    tm = _tiny("llava")
    samples = [s for s in synth.samples if s.conflict][:4]
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = intervention_effect(lens, samples, Gaze(), generate=True, batch_size=4, dataset=synth)
        base = evaluate(lens, samples, 4, synth, generate=True)
    assert r.mfr_generated_clean.follows == [int(f == 1) for f in base.follows] == r.mfr_generated.follows
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
