"""Models with no adapter attach through the generic inference: record bit-exactly and intervene."""

from __future__ import annotations

import pytest
import torch

import arbiter
from arbiter.adapters import base

from helpers import _tiny, inputs_for, logits


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "idefics3", "mllama"])
def test_generic_path_without_any_adapter(monkeypatch, family):
    monkeypatch.setattr(base, "_REGISTRY", [])
    tm = _tiny(family)
    inputs = inputs_for(tm, n=2)
    ref = logits(tm.model, inputs)
    a, b = inputs_for(tm, seed=0), inputs_for(tm, seed=5)
    with arbiter.attach(tm.model, tm.processor) as lens:
        assert lens.facts.family == "generic"
        assert lens.facts.modality_token_ids["image"]
        with lens.record("attn", "resid", "heads", rows="last") as rec:
            out = logits(tm.model, inputs)
        with lens.knockout("image", "text"):
            ka, kb = logits(tm.model, a)[:, -1], logits(tm.model, b)[:, -1]
    assert torch.equal(out, ref)
    assert len(rec.trace.layers("attn.probs")) == len(lens.facts.attention_layers)
    assert (ka - kb).abs().max().item() <= 1e-6


def test_registering_an_adapter_takes_precedence(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", list(base._REGISTRY))

    @arbiter.register_adapter
    class Mine(arbiter.Adapter):
        name = "mine"
        model_types = ("llava",)
        notes = ("custom",)

    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        assert lens.facts.family == "mine" and lens.facts.notes == ["custom"]
