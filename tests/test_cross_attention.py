"""Cross-attention outside the layers' own mixers (IDEFICS gated blocks, an encoder-decoder's decoder): served on the
xattn.* sites, severed by knockouts; an encoder-decoder's decoder groups the encoder's positions from the encoder's
own inputs, its encoder is a second stack with a Lens of its own. Checked against eager attention, weights edited by
hand and perturbed pixels / audio features."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

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


def _cross_block_output(read: bool) -> tuple[torch.Tensor, Any]:
    """(the first cross-attention block's output, the recorder or None) under a knockout image -> last there, with
    a reader of the last row's cross-attention probabilities beside where ``read``."""
    tm = _tm("idefics")
    inputs = _inputs(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        layer = lens.facts.cross_layers[0]
        attn = lens.facts.layers[layer].cross_attn
        out = {}
        h = attn.register_forward_hook(lambda m, a, o: out.__setitem__("y", o[0]))
        try:
            with lens.knockout("image", "last", layers=[layer]), \
                    (lens.record("xattn.probs", layers=[layer], rows="last") if read
                     else contextlib.nullcontext()) as rec:
                _last(tm, inputs)
        finally:
            h.remove()
    return out["y"], (rec.trace.site("xattn.probs", layer) if read else None)


def test_idefics_cross_knockout_zeroes_the_block_output_of_severed_rows():
    y, _ = _cross_block_output(read=False)
    assert torch.equal(y[0, -1], torch.zeros_like(y[0, -1]))
    assert y[0, :-1].abs().max() > 0


def test_idefics_cross_knockout_read_beside_still_zeroes_the_severed_row_and_reads_no_attention_there():
    """With the severed row's cross-attention probabilities read beside the knockout, the row's output (then taken
    from the reader's eager call) is still zero, and so are its probabilities; the other rows keep theirs."""
    y, probs = _cross_block_output(read=True)
    assert torch.equal(y[0, -1], torch.zeros_like(y[0, -1]))
    assert y[0, :-1].abs().max() > 0
    assert probs.shape[2] == 1 and torch.equal(probs, torch.zeros_like(probs))


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


def test_decoder_knockout_zeroes_the_cross_attention_on_the_encoders_image_positions():
    tm = _tm("florence2")
    inputs = _inputs(tm)
    image = (inputs["input_ids"] == tm.model.config.image_token_id)[0]   # the encoder's positions of the image
    assert image.any() and (~image).any()
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.warns(UserWarning, match="still carry 'image'"), lens.knockout("image", "last"), \
                lens.record("xattn", rows="last") as rec:
            cut = _last(tm, inputs)
        n = lens.facts.n_layers
    for i in range(n):
        p = rec.trace[f"L{i}.xattn.probs"][0, :, -1]     # [heads, encoder positions]
        assert p[:, image].abs().max() == 0
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]), atol=1e-6, rtol=0)
    assert (cut - _last(tm, inputs)).abs().max() > 1e-4


@contextlib.contextmanager
def _nothing():
    yield


def _encoder_decoder_delta(tm, a, b, enc_lens, dec_lens, src="image", dst="text"):
    with enc_lens.knockout(src, dst) if enc_lens else _nothing(), dec_lens.knockout(src, dst):
        return (_last(tm, a) - _last(tm, b)).abs().max().item()


def test_decoder_knockout_alone_leaves_the_encoders_mixing_and_says_so():
    tm = _tm("florence2")
    a, b = _inputs(tm, 0), _inputs(tm, 1)
    with arbiter.attach(tm.model, tm.processor) as dec, pytest.warns(UserWarning, match="knock it out in the encoder"):
        delta = _encoder_decoder_delta(tm, a, b, None, dec)
    assert delta > 1e-6   # the encoder's prompt positions still carry the pixels into the decoder


def test_encoder_and_decoder_knockouts_together_free_the_answer_from_the_pixels():
    tm = _tm("florence2")
    a, b = _inputs(tm, 0), _inputs(tm, 1)
    assert (_last(tm, a) - _last(tm, b)).abs().max() > 1e-4
    with arbiter.attach(tm.model, tm.processor, stack="encoder") as enc, arbiter.attach(tm.model, tm.processor) as dec:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")   # the encoder Lens severs the image there: no warning
            delta = _encoder_decoder_delta(tm, a, b, enc, dec)
    assert delta <= 1e-6


def test_encoder_and_decoder_knockouts_free_generation_from_the_pixels():
    tm = _tm("florence2")
    a, b = _inputs(tm, 0), _inputs(tm, 1)
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        free = [tm.model.generate(**x, **kw).scores for x in (a, b)]
    assert max((s - t).abs().max().item() for s, t in zip(*free)) > 1e-4
    with arbiter.attach(tm.model, tm.processor, stack="encoder") as enc, arbiter.attach(tm.model, tm.processor) as dec, \
            enc.knockout("image", "text"), dec.knockout("image", "text|generated"), torch.no_grad():
        cut = [tm.model.generate(**x, **kw) for x in (a, b)]
    assert torch.equal(cut[0].sequences, cut[1].sequences)
    assert max((s - t).abs().max().item() for s, t in zip(cut[0].scores, cut[1].scores)) <= 1e-6


def test_encoder_outputs_computed_outside_the_lens_cannot_be_grouped():
    tm = _tm("florence2")
    inputs = _inputs(tm)
    with torch.no_grad():
        enc_out = tm.model.get_encoder()(inputs_embeds=tm.model.get_input_embeddings()(inputs["input_ids"]),
                                          attention_mask=inputs["attention_mask"])
    with arbiter.attach(tm.model, tm.processor) as lens:
        _last(tm, inputs)   # a run that grouped the encoder's positions: not reused for the next one
        with pytest.raises(arbiter.errors.GroupError, match="encoder did not run in this call"):
            with lens.knockout("image", "last"), torch.no_grad():
                start = tm.model.config.text_config.decoder_start_token_id
                tm.model(encoder_outputs=enc_out, attention_mask=inputs["attention_mask"],
                         decoder_input_ids=torch.tensor([[start]]))


def test_the_two_stacks_share_the_routing_and_restore_it_when_the_last_lens_closes():
    tm = _tm("florence2")
    inputs = _inputs(tm)
    before = _last(tm, inputs)
    cfg = tm.model.config.text_config
    enc = arbiter.attach(tm.model, tm.processor, stack="encoder").__enter__()
    dec = arbiter.attach(tm.model, tm.processor).__enter__()
    dec.close()
    assert cfg._attn_implementation.startswith("arbiter_")   # the encoder Lens still routes the shared config
    with enc.knockout("image", "text"):
        assert (_last(tm, inputs) - before).abs().max() > 1e-4
    enc.close()
    assert cfg._attn_implementation == "sdpa"
    assert torch.equal(_last(tm, inputs), before)


def test_a_second_lens_on_the_same_stack_is_refused():
    tm = _tm("florence2")
    with arbiter.attach(tm.model, tm.processor, stack="encoder"):
        with pytest.raises(arbiter.errors.UnsupportedModelError, match="encoder stack is already routed"):
            arbiter.attach(tm.model, tm.processor, stack="encoder").__enter__()


def _tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                        max_source_positions=16, max_target_positions=32, pad_token_id=0, decoder_start_token_id=1,
                        eos_token_id=2, bos_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    return WhisperForConditionalGeneration(cfg).eval()


def test_a_feature_encoders_positions_are_all_its_modality():
    """Whisper's encoder runs on audio features only: every key of the decoder's cross-attention is audio, so
    audio -> text in every decoder layer frees the logits from the audio (perturbed features)."""
    model = _tiny_whisper()
    fa, fb = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1)), \
        torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])

    def last(f):
        with torch.no_grad():
            return model(input_features=f, decoder_input_ids=ids).logits[:, -1]

    assert (last(fa) - last(fb)).abs().max() > 1e-5
    with arbiter.attach(model) as lens:
        assert lens.facts.unserved == []
        with lens.knockout("audio", "text"):
            assert (last(fa) - last(fb)).abs().max() <= 1e-6
        with lens.knockout("audio", "last"), lens.record("xattn", rows="last") as rec:
            last(fa)
    for i in range(2):   # every key severed: no attention at all (the row's output is zero), recorded as such
        assert rec.trace[f"L{i}.xattn.probs"].abs().max() == 0


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


def test_groups_set_with_use_on_the_decoder_describe_the_encoders_prompt():
    """A group the user adds over the prompt (here: the image's first half) is severed in the cross-attention."""
    tm = _tm("florence2")
    inputs = _inputs(tm)
    groups = arbiter.groups.TokenGroups.from_input_ids(inputs["input_ids"], inputs["attention_mask"],
                                                       {"image": [tm.model.config.image_token_id]})
    image = groups["image"][0].nonzero().flatten()
    half = torch.zeros_like(groups["image"])
    half[0, image[: len(image) // 2]] = True
    groups.add("half", half)
    with arbiter.attach(tm.model, tm.processor) as lens:
        lens.use(groups)
        with pytest.warns(UserWarning), lens.knockout("half", "last"), lens.record("xattn", rows="last") as rec:
            _last(tm, inputs)
    p = rec.trace["L0.xattn.probs"][0, :, -1]
    assert p[:, half[0]].abs().max() == 0 and p[:, image[len(image) // 2:]].min() > 0


def test_a_failed_attach_leaves_the_model_as_it_was(monkeypatch):
    tm = _tm("florence2")
    inputs = _inputs(tm)
    before = _last(tm, inputs)
    cfg = tm.model.config.text_config

    def broken(self):
        raise RuntimeError("an input module that cannot be hooked")

    def hooks():   # transformers may keep output-capturing hooks of its own: compare with before
        return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in tm.model.modules()]

    hooks_before = hooks()
    monkeypatch.setattr(arbiter.adapters.base.ModelFacts, "input_modules", broken)
    with pytest.raises(RuntimeError, match="cannot be hooked"):
        arbiter.attach(tm.model, tm.processor).__enter__()
    assert cfg._attn_implementation == "sdpa"
    assert hooks() == hooks_before
    assert not any(m in arbiter.attention.RUNTIME for m in tm.model.modules())
    assert torch.equal(_last(tm, inputs), before)


def test_an_encoder_decoder_without_get_input_embeddings_attaches(monkeypatch):
    tm = _tm("florence2")

    def not_implemented(self):
        raise NotImplementedError("`get_input_embeddings` not auto-handled")

    monkeypatch.setattr(type(tm.model), "get_input_embeddings", not_implemented)
    inputs = _inputs(tm)
    with arbiter.attach(tm.model, tm.processor) as lens, lens.record("xattn", rows="last") as rec:
        _last(tm, inputs)
    assert rec.trace["L0.xattn.probs"].shape[-1] == inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_a_decoder_that_reads_the_encoder_in_its_self_attention_refuses_attention_sites_at_activation():
    """T5Gemma 2's decoder attends over its own and the encoder's keys in one call (no cross-attention module):
    attention sites are refused when the probe is activated, naming why; residual sites still record."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import zoo_runtime

    model, _ = zoo_runtime.build("t5gemma2", "T5Gemma2ForConditionalGeneration", False)
    with arbiter.attach(model) as lens:
        assert lens.facts.merged_encoder and "inside its self-attention" in lens.facts.merged_encoder
        with pytest.raises(SiteError, match="cannot be served on this model: the decoder reads the encoder"):
            with lens.record("attn.probs", rows="last"):
                pass
        with pytest.raises(SiteError, match="cannot be served on this model"):
            with lens.knockout("image", "last"):
                pass
        with lens.record("resid.post", rows="last"):
            pass
