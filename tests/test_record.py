"""The Recorder's handling of tensors recorded on an accelerator: kept there while the model runs, moved to the host
at the next forward or when the trace is read (no host wait per layer)."""

from __future__ import annotations

import pytest
import torch
from helpers import _tiny, inputs_for

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
