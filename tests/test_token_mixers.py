"""Hybrid models: gated attention heads, every token mixer severed by knockouts, every site on every layer it exists.

Checked against independent computations: the model's own config, perturbed image inputs, and the mixer module
run by hand on a sequence with the severed positions deleted."""

from __future__ import annotations

import functools

import pytest
import torch

import arbiter
from arbiter.errors import SiteError
from arbiter.testing import tiny

HYBRIDS = ["qwen3_5", "qwen3_5_moe", "lfm2_vl"]
MIXER_OF_TYPE = {"linear_attention": "linear_attention", "full_attention": "attention", "conv": "convolution",
                 "attention": "attention", "sliding_attention": "attention"}


@functools.cache
def _tm(family):
    return tiny(family)


def _inputs(tm, image_seed=0, text="What colour is the shape in the image?"):
    return tm.inputs(tm.prompt(text), image_seeds=[image_seed])


def _image_mask(tm, inputs):
    """Image positions read from the input ids (independent of arbiter's groups)."""
    cfg = tm.model.config
    tid = getattr(cfg, "image_token_id", None)
    tid = getattr(cfg, "image_token_index", None) if tid is None else tid
    return inputs["input_ids"][0] == tid


def _logits(tm, inputs):
    with torch.no_grad():
        return tm.model(**inputs).logits


@pytest.mark.parametrize("family", HYBRIDS)
def test_mixer_kinds_follow_the_config(family):
    tm = _tm(family)
    cfg = tm.model.config.get_text_config()
    with arbiter.attach(tm.model, tm.processor) as lens:
        kinds = [lf.mixer_kind for lf in lens.facts.layers]
        with lens.record("resid", layers="all", rows="last") as rec:
            _logits(tm, _inputs(tm))
    assert kinds == [MIXER_OF_TYPE[t] for t in cfg.layer_types]
    assert {"attention"} < set(kinds)
    assert rec.trace.meta["model"]["mixer_kinds"] == kinds


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_gated_attention_has_the_configured_heads(family):
    tm = _tm(family)
    cfg = tm.model.config.get_text_config()
    inputs = _inputs(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        layer = lens.facts.attention_layers[0]
        assert lens.facts.heads(layer) == (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        with lens.record("attn", layers=[layer], rows="last") as rec:
            _logits(tm, inputs)
        probs = rec.trace[f"L{layer}.attn.probs"]
        assert probs.shape[1] == cfg.num_attention_heads
        torch.testing.assert_close(probs.float().sum(-1), torch.ones(probs.shape[:-1]))
        # blocking every head of the layer equals zeroing the o_proj input by hand
        heads = [(layer, h) for h in range(cfg.num_attention_heads)]
        with lens.block_heads(heads):
            blocked = _logits(tm, inputs)
    attn = lens.facts.layers[layer].attn
    handle = attn.o_proj.register_forward_pre_hook(lambda m, a: (torch.zeros_like(a[0]),))
    try:
        by_hand = _logits(tm, inputs)
    finally:
        handle.remove()
    torch.testing.assert_close(blocked, by_hand, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", HYBRIDS)
def test_record_serves_each_site_on_every_layer_that_has_it(family):
    tm = _tm(family)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.record("attn", "resid", rows="last") as rec:
            _logits(tm, _inputs(tm))
        n = lens.facts.n_layers
        attn_layers = lens.facts.attention_layers
    assert {k for k in rec.trace.keys() if k.startswith("L") and k.endswith("resid.post")} == {f"L{i}.resid.post" for i in range(n)}
    assert {k for k in rec.trace.keys() if k.startswith("L") and k.endswith("attn.probs")} == {f"L{i}.attn.probs" for i in attn_layers}
    assert len(attn_layers) < n


@pytest.mark.parametrize("family", HYBRIDS)
def test_explicit_attention_site_on_a_mixer_layer_names_its_kind(family):
    tm = _tm(family)
    with arbiter.attach(tm.model, tm.processor) as lens:
        mixer_layer = next(lf for lf in lens.facts.layers if lf.attn is None)
        with pytest.raises(SiteError, match=mixer_layer.mixer_kind):
            with lens.record("attn", layers=[mixer_layer.index]):
                pass
        with pytest.raises(SiteError, match="head"):
            with lens.block_heads([(mixer_layer.index, 0)]):
                pass


@pytest.mark.parametrize("family", HYBRIDS)
def test_knockout_in_every_layer_makes_logits_independent_of_the_image(family):
    tm = _tm(family)
    a, b = _inputs(tm, 0), _inputs(tm, 1)
    clean_a, clean_b = _logits(tm, a)[0, -1], _logits(tm, b)[0, -1]
    assert (clean_a - clean_b).abs().max() > 1e-3
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.knockout("image", "text"):
            ko_a, ko_b = _logits(tm, a)[0, -1], _logits(tm, b)[0, -1]
        with lens.knockout("image", "text", layers=lens.facts.attention_layers):
            attn_only_a, attn_only_b = _logits(tm, a)[0, -1], _logits(tm, b)[0, -1]
    assert (ko_a - ko_b).abs().max() <= 1e-6
    assert (ko_a - clean_a).abs().max() > 1e-4
    # severing the attention layers alone leaves the path through the other token mixers open
    assert (attn_only_a - attn_only_b).abs().max() > 1e-4


def _mixer_io(lens, layer, tm, inputs, knockout=None):
    """(mixer input, mixer output as the layer passes it on) of one layer, read with a plain hook registered
    after arbiter's (independent of arbiter's sites)."""
    seen = {}
    mixer = lens.facts.layers[layer].mixer

    def run():
        h = mixer.register_forward_hook(
            lambda m, a, kw, out: seen.update(x=kw.get("hidden_states", a[0] if a else None),
                                              y=out[0] if isinstance(out, tuple) else out), with_kwargs=True)
        try:
            _logits(tm, inputs)
        finally:
            h.remove()

    if knockout is None:
        run()
    else:
        with lens.knockout(*knockout, layers=[layer]):
            run()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("family", HYBRIDS)
def test_mixer_knockout_equals_the_mixer_run_on_the_sequence_without_the_source(family):
    tm = _tm(family)
    inputs = _inputs(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        layer = next(lf.index for lf in lens.facts.layers if lf.attn is None)
        x, clean = _mixer_io(lens, layer, tm, inputs)
        _, knocked = _mixer_io(lens, layer, tm, inputs, knockout=("image", "text"))
        mixer = lens.facts.layers[layer].mixer
    image = _image_mask(tm, inputs)
    after = ~image & (torch.cumsum(image.int(), 0) > 0)      # text rows after the image
    with torch.no_grad():
        by_hand = mixer(hidden_states=x[:, ~image])
    by_hand = by_hand[0] if isinstance(by_hand, tuple) else by_hand
    kept_index = torch.cumsum((~image).int(), 0) - 1           # position -> index in the deleted sequence
    torch.testing.assert_close(knocked[0, after], by_hand[0, kept_index[after]], atol=1e-6, rtol=0)
    assert torch.equal(knocked[0, ~after], clean[0, ~after])   # image rows and text before it: bit-exact
    first = int(torch.nonzero(after)[0])
    assert (knocked[0, first] - clean[0, first]).abs().max() > 1e-5


@pytest.mark.parametrize("family", ["lfm2_vl", "qwen3_5"])
def test_mixer_knockout_rows_do_not_depend_on_the_source_inputs(family):
    tm = _tm(family)
    with arbiter.attach(tm.model, tm.processor) as lens:
        layer = next(lf.index for lf in lens.facts.layers if lf.attn is None)
        mixer = lens.facts.layers[layer].mixer
        inputs = _inputs(tm)
        noise = {}

        img = _image_mask(tm, inputs)[None]

        def perturb(m, a, kw):  # change the mixer's inputs at the image positions
            x = kw["hidden_states"]
            if x.shape[1] != img.shape[1]:
                return None
            noise["x"] = x + 3.0 * img[..., None] * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
            return a, {**kw, "hidden_states": noise["x"]}

        _, ko_clean = _mixer_io(lens, layer, tm, inputs, knockout=("image", "text"))
        h = mixer.register_forward_pre_hook(perturb, with_kwargs=True)
        try:
            _, ko_perturbed = _mixer_io(lens, layer, tm, inputs, knockout=("image", "text"))
            _, plain_perturbed = _mixer_io(lens, layer, tm, inputs)
        finally:
            h.remove()
        _, plain = _mixer_io(lens, layer, tm, inputs)
    image = img[0]
    after_image = ~image & (torch.cumsum(image.int(), 0) > 0)
    assert after_image.any()
    torch.testing.assert_close(ko_perturbed[0, after_image], ko_clean[0, after_image], atol=1e-6, rtol=0)
    assert (plain_perturbed[0, after_image] - plain[0, after_image]).abs().max() > 1e-4


def test_head_specific_knockout_on_a_mixer_layer_is_refused():
    tm = _tm("lfm2_vl")
    with arbiter.attach(tm.model, tm.processor) as lens:
        layer = next(lf.index for lf in lens.facts.layers if lf.attn is None)
        with pytest.raises(SiteError, match="head-specific"):
            with lens.knockout("image", "last", heads=[0], layers=[layer]):
                _logits(tm, _inputs(tm))


@pytest.mark.parametrize("family", ["lfm2_vl", "qwen3_5"])
def test_a_destination_row_inside_the_source_keeps_its_own_position(family):
    tm = _tm(family)
    inputs = _inputs(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        layer = next(lf.index for lf in lens.facts.layers if lf.attn is None)
        x, clean = _mixer_io(lens, layer, tm, inputs)
        _, knocked = _mixer_io(lens, layer, tm, inputs, knockout=("image|last", "last"))
        mixer = lens.facts.layers[layer].mixer
    keep = ~_image_mask(tm, inputs)          # the image deleted, the last position kept (it is the row itself)
    with torch.no_grad():
        by_hand = mixer(hidden_states=x[:, keep])
    by_hand = by_hand[0] if isinstance(by_hand, tuple) else by_hand
    torch.testing.assert_close(knocked[0, -1], by_hand[0, -1], atol=1e-6, rtol=0)
    assert torch.equal(knocked[0, :-1], clean[0, :-1])


@pytest.mark.parametrize("family", ["lfm2_vl", "qwen3_5"])
def test_generate_with_mixer_knockout_equals_uncached_forwards(family):
    tm = _tm(family)
    inputs = _inputs(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.knockout("image", "text|generated"):  # generated tokens are text in the uncached forwards
            with torch.no_grad():
                out = tm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
            ids = inputs["input_ids"]
            step_logits = []
            for t in range(4):  # the same tokens, each step a full forward without cache
                full = {**inputs, "input_ids": out[:, : ids.shape[1] + t],
                        "attention_mask": torch.ones_like(out[:, : ids.shape[1] + t])}
                if "mm_token_type_ids" in inputs:
                    tt = inputs["mm_token_type_ids"]
                    full["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(tt.shape[0], t)], dim=1)
                with torch.no_grad():
                    step_logits.append(tm.model(**full, use_cache=False).logits[0, -1])
    greedy = torch.stack([lg.argmax() for lg in step_logits])
    assert torch.equal(out[0, ids.shape[1]:], greedy)
