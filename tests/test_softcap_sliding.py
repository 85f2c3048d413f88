"""Gemma-2-style attention softcapping and sliding windows: recorded rows and knockouts stay exact."""

from __future__ import annotations

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import arbiter


def _gemma2():
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                       attn_logit_softcapping=5.0, final_logit_softcapping=None, attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).eval()


def test_softcapped_sliding_window_probs_match_eager_and_recording_is_exact():
    model = _gemma2()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ref = model(input_ids=ids, output_attentions=True)
    with arbiter.attach(model) as lens, lens.record("attn.probs", rows="all") as rec, torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.equal(out, ref.logits)
    for layer in range(2):
        assert (rec.trace[f"L{layer}.attn.probs"] - ref.attentions[layer]).abs().max().item() <= 1e-6
    # the sliding layer (0) really is windowed: row 9 sees only keys 6..9
    assert rec.trace["L0.attn.probs"][0, :, 9, :6].abs().max().item() == 0.0


def test_knockout_composes_with_the_sliding_window_and_softcap():
    model = _gemma2()
    ids = torch.randint(0, 64, (1, 10))
    first = torch.zeros(1, 10, dtype=torch.bool)
    first[0, :3] = True
    groups = arbiter.TokenGroups({"pad": torch.zeros(1, 10, dtype=torch.bool)}).add("first", first)
    with arbiter.attach(model) as lens:
        lens.use(groups)
        with lens.knockout("first", "all"), lens.record("attn.probs", rows="all") as rec, torch.no_grad():
            out = model(input_ids=ids).logits
    assert torch.isfinite(out).all()
    p = rec.trace["L1.attn.probs"][0]                   # global layer: keys 0..2 severed for every row
    assert p[:, 3:, :3].abs().max().item() == 0.0
    assert torch.allclose(p[:, 0, 0], torch.ones(4))    # row 0 lost every key: keeps its own position
    assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-6)
    w = rec.trace["L0.attn.probs"][0]                   # sliding layer: window kept too
    assert w[:, 9, :6].abs().max().item() == 0.0
