"""The Recorder's handling of tensors recorded on an accelerator: kept there while the model runs, moved to the host
at the next forward or when the trace is read (no host wait per layer)."""

from __future__ import annotations

import pytest
import torch
from helpers import _tiny, inputs_for, set_text_attention

import arbiter


@pytest.mark.parametrize("hold", [1 << 28, 0], ids=["held-to-the-next-forward", "moved-at-once"])
def test_tensors_held_on_the_device_reach_the_trace_as_if_moved_at_once(monkeypatch, hold):
    """The bookkeeping of recordings kept on an accelerator during a forward (exercised here on the CPU by treating
    every tensor as an accelerator's): over a prefill and decode steps of generate(), with heads selected, the trace
    equals an ordinary recording's, and nothing is left waiting once the trace is read."""
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)

    def record():
        with arbiter.attach(tm.model, tm.processor) as lens, \
                lens.record("attn.probs", "resid.post", rows="all", heads=[0, 2]) as rec, torch.no_grad():
            tm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        return rec

    plain = record()
    monkeypatch.setattr(arbiter.Recorder, "_held_on_device", staticmethod(lambda value: True))
    monkeypatch.setattr(arbiter.Recorder, "DEVICE_HOLD_BYTES", hold)
    held = record()
    assert not plain._on_device
    assert bool(held._on_device) == (hold > 0)   # held: the last decode step's tensors wait for the trace
    a, b = plain.trace, held.trace
    assert not held._on_device
    assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) > 10
    assert all(torch.equal(a[k], b[k]) for k in a.keys())


def test_trace_keeps_the_groups_of_the_recorded_forward_not_of_a_later_one():
    """The trace's groups describe the forward it recorded, even when the Lens ran other inputs before the trace
    was read."""
    tm = _tiny("llava")
    one, two = inputs_for(tm, n=1), inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens, torch.no_grad():
        with lens.record("resid.post", rows="last", layers=[0]) as rec:
            tm.model(**one)
        tm.model(**two)   # nothing active: another batch, other groups
        trace = rec.trace
    groups = trace.meta["groups"]["groups"]
    assert len(groups["image"]) == 1 and len(groups["last"]) == 1
    assert groups["last"][0] == [one["input_ids"].shape[1] - 1]


def test_probe_sets_entered_again_or_changed_read_their_own_rows():
    """Attention plans are shared by probe sets with the same sites, layers, steps, modes and rows, across Lenses
    (a recorder entered per batch builds them once). Each set in a sequence that repeats and varies them (other
    rows, other layers, a knockout beside the read) still reads exactly its rows: those of the eager model's own
    attention weights, and with image keys knocked out, those weights renormalised over the other keys."""
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    impl = set_text_attention(tm.model, "eager")
    try:
        with torch.no_grad():
            weights = tm.model(**inputs, output_attentions=True).attentions
        length = inputs["input_ids"].shape[1]
        for rows, layers in (("last", "all"), ("last", "all"), ([3, 5], "all"), ("last", [1]), ([3, 5], [0]),
                             ([length - 2], "all")):
            with arbiter.attach(tm.model, tm.processor) as lens, \
                    lens.record("attn.probs", rows=rows, layers=layers) as rec, torch.no_grad():
                tm.model(**inputs)
            want = [length - 1] if rows == "last" else rows
            got = [layer for layer in lens.facts.attention_layers if f"L{layer}.attn.probs" in rec.trace.keys()]
            assert got == (lens.facts.attention_layers if layers == "all" else layers)
            assert rec.trace["rows.attn.probs"].tolist() == want
            for layer in got:
                assert (rec.trace.site("attn.probs", layer) - weights[layer][:, :, want]).abs().max() <= 1e-6
        with arbiter.attach(tm.model, tm.processor) as lens, lens.knockout("image", "last", layers=[0]), \
                lens.record("attn.probs", rows="last", layers=[0]) as rec, torch.no_grad():
            tm.model(**inputs)
    finally:
        set_text_attention(tm.model, impl)
    image = torch.zeros(2, length, dtype=torch.bool)
    for b, positions in enumerate(rec.trace.meta["groups"]["groups"]["image"]):
        image[b, positions] = True
    assert image.sum() > 0
    kept = weights[0][:, :, [length - 1]] * ~image[:, None, None, :]
    expected = kept / kept.sum(-1, keepdim=True)
    assert (rec.trace.site("attn.probs", 0) - expected).abs().max() <= 1e-6


def test_a_recorder_entered_again_builds_no_attention_plan():
    """The second activation of an equal recorder (a recorder per batch) finds every layer's attention plan built;
    a recorder of other rows builds its own."""
    from arbiter import lens as lens_module

    tm = _tiny("llava")
    inputs = inputs_for(tm, n=1)
    lens_module._plans_for.cache_clear()

    def plans_built(rows):
        with arbiter.attach(tm.model, tm.processor) as lens, lens.record("attn.probs", rows=rows), torch.no_grad():
            plans = lens._runtime._plans
            before = len(plans)
            tm.model(**inputs)
            return len(plans) - before, len(lens.facts.attention_layers)

    built, layers = plans_built("last")
    assert built == layers
    assert plans_built("last") == (0, layers)
    assert plans_built([2]) == (layers, layers)
