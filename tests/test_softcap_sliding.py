"""Gemma-2-style attention softcapping and sliding windows: recorded rows and knockouts stay exact."""

from __future__ import annotations

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM
from transformers.models.gemma2.modeling_gemma2 import apply_rotary_pos_emb

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


class _Flatten(arbiter.Probe):
    """Each probability of the last row's head 0 replaced by its square root, renormalised."""

    edits = {"attn.probs": "last"}

    def attn_probs(self, ctx, p):
        f = p[:, :1].sqrt()
        return torch.cat([f / f.sum(-1, keepdim=True), p[:, 1:]], dim=1)


def test_a_probability_edit_under_softcap_and_sliding_window_equals_the_hand_computation():
    """The eager Gemma-2 model, the last row's head 0 flattened in both layers (sliding, global): every layer's
    returned attention weights as textbook attention with the same softcap, window and edit computes them by hand from
    each layer's input (≤ 1e-6); every earlier row's weights and logits, and in the first layer the other heads'
    weights of the last row, are the plain forward's, bit for bit."""
    model = _gemma2()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        plain = model(input_ids=ids, output_attentions=True)
    with arbiter.attach(model) as lens, lens.probe(_Flatten(), layers="all"), torch.no_grad():
        got = model(input_ids=ids, output_attentions=True)
    # by hand, layer by layer, from the hidden states the edited model produced (the inputs of each layer)
    cfg = model.config
    seen = {}

    def capture(i):
        def hook(module, args, kwargs):
            seen[i] = kwargs.get("hidden_states", args[0] if args else None)
        return hook
    handles = [layer.self_attn.register_forward_pre_hook(capture(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    try:
        with arbiter.attach(model) as lens, lens.probe(_Flatten(), layers="all"), torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    pos = torch.arange(10)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        x = seen[i]
        cos, sin = model.model.rotary_emb(x, pos[None])
        q = attn.q_proj(x).view(2, 10, 4, 8).transpose(1, 2)
        k = attn.k_proj(x).view(2, 10, 2, 8).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(2, dim=1)
        s = q @ k.transpose(2, 3) * attn.scaling
        s = torch.tanh(s / cfg.attn_logit_softcapping) * cfg.attn_logit_softcapping
        allowed = torch.ones(10, 10, dtype=torch.bool).tril()
        if cfg.layer_types[i] == "sliding_attention":
            allowed &= (pos[:, None] - pos[None, :]) < cfg.sliding_window
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        f = p[:, 0, -1].sqrt()
        p[:, 0, -1] = f / f.sum(-1, keepdim=True)
        torch.testing.assert_close(got.attentions[i], p, atol=1e-6, rtol=0)
        assert torch.equal(got.attentions[i][:, :, :-1], plain.attentions[i][:, :, :-1])
    # in the first layer (inputs unchanged) the heads left alone keep the kernel's weights of the last row too
    assert torch.equal(got.attentions[0][:, 1:], plain.attentions[0][:, 1:])
    assert torch.equal(got.logits[:, :-1], plain.logits[:, :-1])
    assert (got.logits[:, -1] - plain.logits[:, -1]).abs().max() > 1e-5   # (float rounding: ~1e-7)
