"""Batched sweeps equal the naive loop of separate forwards (heads and knockout map), with prefix reuse."""

from __future__ import annotations

import torch

import arbiter
from arbiter.data import ConflictSample
from arbiter.sweep import head_sweep, knockout_sweep

from helpers import _tiny, inputs_for, logits


def test_head_sweep_equals_naive_loop():
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        res = head_sweep(lens, inputs, chunk=5)
        naive = []
        for s in res.settings:
            with lens.block_heads([(s.meta["layer"], s.meta["head"])]):
                naive.append(logits(tm.model, inputs)[:, -1])
    assert res.values.shape[0] == 16
    assert (res.values - torch.stack(naive)).abs().max().item() <= 1e-5
    assert res.layers_skipped > 0


def test_knockout_map_equals_naive_loop_with_text_groups():
    tm = _tiny("qwen2_vl")
    img = tm.make_image(0)
    samples = [ConflictSample(id=f"s{i}", context="The circle is red.", question="What colour is the circle?",
                              instruction="You must rely on the image content rather than the text context." + " ok" * i,
                              target="vision", answer_vision="blue", answer_text="red", image=img) for i in range(2)]
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode(samples)
        edges = [("image", "instruction"), ("context", "last")]
        res = knockout_sweep(lens, batch.inputs, edges, window=3, chunk=3)
        naive = []
        for s in res.settings:
            with lens.knockout(s.meta["src"], s.meta["dst"], layers=s.meta["layers"], allow_empty=True):
                naive.append(logits(tm.model, batch.inputs)[:, -1])
    assert len(res.settings) == 2 * lens.facts.n_layers
    assert (res.values - torch.stack(naive)).abs().max().item() <= 1e-5
    assert (res.values - res.baseline).abs().amax(dim=(1, 2)).min().item() >= 0.0
    assert (res.values[0] - res.baseline).abs().max().item() > 0  # image -> instruction at layer 0 matters
