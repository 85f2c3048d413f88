"""Cross-attention outside the layers' own mixers (IDEFICS gated blocks, an encoder-decoder's decoder): served on the
xattn.* sites, severed by knockouts; encoder-decoders attach to the decoder and refuse knockouts they cannot make
complete. Checked against eager attention and perturbed pixels."""

from __future__ import annotations

import functools

import pytest
import torch

import arbiter
from arbiter.errors import SiteError
from arbiter.testing import tiny
from helpers import set_text_attention


@functools.cache
def _tm(family):
    return tiny(family)


def _inputs(tm, seed=0):
    return tm.inputs(tm.prompt("What colour is the shape in the image?"), image_seeds=[seed])


def _last(tm, inputs):
    with torch.no_grad():
        return tm.model(**inputs).logits[0, -1]


def test_idefics_cross_attention_blocks_feed_their_layers():
    tm = _tm("idefics")
    cfg = tm.model.config
    with arbiter.attach(tm.model, tm.processor) as lens:
        blocks = tm.model.model.gated_cross_attn_layers
        expected = {j * cfg.cross_layer_interval: b.cross_attn for j, b in enumerate(blocks)}
        assert {lf.index: lf.cross_attn for lf in lens.facts.layers if lf.cross_attn is not None} == expected
        assert lens.facts.unserved == []


def test_idefics_cross_attention_probs_match_eager_attentions():
    tm = _tm("idefics")
    inputs = _inputs(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.record("xattn", rows="last") as rec:
            logits_attached = _last(tm, inputs)
        layers = lens.facts.cross_layers
    assert torch.equal(logits_attached, _last(tm, inputs))
    # independent: the cross-attention module's own eager weights, captured from an eager run by hand
    tm.model.set_attn_implementation("eager")
    try:
        seen = {}
        hooks = [lf_attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[1]))
                 for i, lf_attn in ((i, tm.model.model.gated_cross_attn_layers[j].cross_attn)
                                    for j, i in enumerate(layers))]
        try:
            with torch.no_grad():
                tm.model(**inputs, output_attentions=True)
        finally:
            for h in hooks:
                h.remove()
    finally:
        tm.model.set_attn_implementation("sdpa")
    for i in layers:
        got = rec.trace[f"L{i}.xattn.probs"][0, :, -1]
        torch.testing.assert_close(got, seen[i][0, :, -1], atol=1e-6, rtol=0)
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[0]))


def test_idefics_knockout_needs_the_cross_attention_to_sever_the_image():
    tm = _tm("idefics")
    a, b = _inputs(tm, 0), _inputs(tm, 1)
    assert (_last(tm, a) - _last(tm, b)).abs().max() > 1e-4
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.knockout("image", "text"):
            full_a, full_b = _last(tm, a), _last(tm, b)

        class SelfOnly(arbiter.probes.knockout.Knockout):  # the same knockout without the cross-attention
            edits = {"attn.mask": "all"}

        with lens.probe(SelfOnly("image", "text")):
            self_a, self_b = _last(tm, a), _last(tm, b)
    assert (full_a - full_b).abs().max() <= 1e-6
    assert (self_a - self_b).abs().max() > 1e-4


def test_idefics_cross_knockout_zeroes_the_block_output_of_severed_rows():
    tm = _tm("idefics")
    inputs = _inputs(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        layer = lens.facts.cross_layers[0]
        attn = lens.facts.layers[layer].cross_attn
        out = {}
        h = attn.register_forward_hook(lambda m, a, o: out.__setitem__("y", o[0]))
        try:
            with lens.knockout("image", "last", layers=[layer]):
                _last(tm, inputs)
        finally:
            h.remove()
    assert torch.equal(out["y"][0, -1], torch.zeros_like(out["y"][0, -1]))
    assert out["y"][0, :-1].abs().max() > 0


def test_encoder_decoder_attaches_to_the_decoder_that_makes_the_logits():
    tm = _tm("florence2")
    model = tm.model
    inputs = _inputs(tm)
    decoder = model.get_decoder().get_decoder()
    with arbiter.attach(model, tm.processor) as lens:
        assert lens.facts.decoder is decoder
        assert lens.facts.n_layers == len(decoder.layers)
        assert lens.facts.cross_layers == list(range(len(decoder.layers)))
        with lens.record("resid", layers=[lens.facts.n_layers - 1], rows="last") as rec:
            with torch.no_grad():
                logits = model(**inputs).logits
        # the last recorded row, through the final norm and the unembedding, gives the last logits
        h = rec.trace[f"L{lens.facts.n_layers - 1}.resid.post"][0, -1]
        assert h.shape[-1] == model.config.text_config.d_model
        head = model.get_output_embeddings()
        bias = getattr(model, "final_logits_bias", None)
        by_hand = head(h) + (bias[0] if bias is not None else 0)
        torch.testing.assert_close(by_hand, logits[0, -1], atol=1e-5, rtol=1e-5)


def test_encoder_decoder_knockout_is_refused_naming_the_encoder():
    tm = _tm("florence2")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(SiteError, match="encoder"):
            with lens.knockout("image", "text"):
                pass


def test_encoder_decoder_head_block_equals_zeroed_out_proj_columns():
    tm = _tm("florence2")
    inputs = _inputs(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.block_heads([(0, 1)]):
            blocked = _last(tm, inputs)
        attn = lens.facts.layers[0].attn
        _, _, hd = lens.facts.heads(0)
    w = attn.out_proj.weight.data
    saved = w[:, hd:2 * hd].clone()
    w[:, hd:2 * hd] = 0
    try:
        by_hand = _last(tm, inputs)
    finally:
        w[:, hd:2 * hd] = saved
    torch.testing.assert_close(blocked, by_hand, atol=1e-6, rtol=0)


def test_encoder_decoder_records_the_decoder_attention_as_eager_computes_it():
    tm = _tm("florence2")
    inputs = _inputs(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.record("attn", "xattn", rows="last") as rec:
            attached = _last(tm, inputs)
        n = lens.facts.n_layers
    assert torch.equal(attached, _last(tm, inputs))
    tm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tm.model(**inputs, output_attentions=True)
    finally:
        tm.model.set_attn_implementation("sdpa")
    for i in range(n):
        torch.testing.assert_close(rec.trace[f"L{i}.attn.probs"][0, :, -1], out.decoder_attentions[i][0, :, -1],
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(rec.trace[f"L{i}.xattn.probs"][0, :, -1], out.cross_attentions[i][0, :, -1],
                                   atol=1e-6, rtol=0)


def _encoder_states(tm, inputs):
    with torch.no_grad():
        return tm.model(**inputs).encoder_last_hidden_state


def test_the_encoder_is_a_second_stack_recorded_on_its_own_positions():
    tm = _tm("florence2")
    inputs = _inputs(tm)
    with arbiter.attach(tm.model, tm.processor, stack="encoder") as lens:
        assert lens.facts.decoder is tm.model.get_encoder() and lens.facts.stack == "encoder"
        with lens.record("attn", rows="all") as rec:
            attached = _last(tm, inputs)
        n = lens.facts.n_layers
    assert torch.equal(attached, _last(tm, inputs))
    before = set_text_attention(tm.model, "eager")
    try:
        with torch.no_grad():
            out = tm.model(**inputs, output_attentions=True)
    finally:
        set_text_attention(tm.model, before)
    for i in range(n):
        torch.testing.assert_close(rec.trace[f"L{i}.attn.probs"][0], out.encoder_attentions[i][0], atol=1e-6, rtol=0)


def test_an_encoder_knockout_frees_the_encoders_text_positions_from_the_pixels():
    tm = _tm("florence2")
    a, b = _inputs(tm, 0), _inputs(tm, 1)
    text = a["input_ids"][0] != tm.model.config.image_token_id
    assert (_encoder_states(tm, a)[0, text] - _encoder_states(tm, b)[0, text]).abs().max() > 1e-4
    with arbiter.attach(tm.model, tm.processor, stack="encoder") as lens, lens.knockout("image", "text"):
        ka, kb = _encoder_states(tm, a), _encoder_states(tm, b)
    assert (ka[0, text] - kb[0, text]).abs().max() <= 1e-6


def test_a_stack_the_model_lacks_is_refused_clearly():
    with pytest.raises(arbiter.errors.UnsupportedModelError, match="no encoder stack"):
        arbiter.attach(_tm("llava").model, stack="encoder")
    with pytest.raises(arbiter.errors.UnsupportedModelError, match="unknown stack"):
        arbiter.attach(_tm("florence2").model, stack="vision")


def test_layers_the_model_skips_are_named_not_silently_missing():
    """Mllama runs no cross-attention layer without an image: a recorder asked for every layer's residual warns,
    and the trace lists those layers (the model's own hidden states say which layers ran)."""
    tm = _tm("mllama")
    tok = tm.tokenizer
    inputs = tok(["What colour is the circle?"], return_tensors="pt")
    cross = set(tm.model.config.text_config.cross_attention_layers)
    with arbiter.attach(tm.model, tm.processor) as lens, torch.no_grad():
        with lens.record("resid.post") as rec, pytest.warns(UserWarning, match="did not run"):
            out = tm.model(**inputs, output_hidden_states=True)
            rec.trace  # noqa: B018 - the trace is built (and the warning given) on first access
    not_run = rec.trace.meta["layers_not_run"]["resid.post"]
    assert set(not_run) == cross
    ran = [i for i in range(lens.facts.n_layers) if i not in cross]
    assert rec.trace.layers("resid.post") == ran
    # the model's own hidden states (captured by hooks on the layers that ran) agree: one per layer that ran
    assert len(out.hidden_states) == len(ran) + 1
