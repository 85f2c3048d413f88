"""The attention router: switched through transformers' public API, untouched layers keep whatever kernel the model
was loaded with, and kernels with 2D (flash-style) masks are read and edited exactly. Compared with plain forwards
and with the same interventions under SDPA."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

import arbiter
from arbiter.testing import tiny
from helpers import HalveFirstHead, inputs_for, logits

CALLS = {"counting_sdpa": 0}


def _counting_sdpa(module, query, key, value, attention_mask, **kwargs):
    CALLS["counting_sdpa"] += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _padded_kernel(module, query, key, value, attention_mask, **kwargs):
    """A stand-in for a flash kernel: takes None or a 2D padding mask and applies causality itself."""
    q, k = query.shape[2], key.shape[2]
    causal = torch.ones(q, k, dtype=torch.bool).tril(k - q)
    mask = causal[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -k:].bool()
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


AttentionInterface.register("counting_sdpa", _counting_sdpa)
AttentionMaskInterface.register("counting_sdpa", sdpa_mask)
AttentionInterface.register("padded_kernel", _padded_kernel)
AttentionMaskInterface.register("padded_kernel", flash_attention_mask)


def _model(impl: str):
    tm = tiny("llava")
    tm.model.set_attn_implementation({"text_config": impl})   # the vision tower stays on SDPA
    return tm


def test_attach_switches_the_text_stack_only_and_back_even_after_an_exception():
    tm = tiny("llava")
    cfg = tm.model.config
    vision_before = cfg.vision_config._attn_implementation
    with pytest.raises(RuntimeError):
        with arbiter.attach(tm.model, tm.processor):
            assert cfg.text_config._attn_implementation == "arbiter_sdpa"
            assert cfg.vision_config._attn_implementation == vision_before
            raise RuntimeError("inside")
    assert cfg.text_config._attn_implementation == "sdpa"
    assert cfg.vision_config._attn_implementation == vision_before


def test_untouched_layers_keep_the_loaded_kernel():
    tm = _model("counting_sdpa")
    inputs = inputs_for(tm)
    plain = logits(tm.model, inputs)
    n = tm.model.config.text_config.num_hidden_layers
    with arbiter.attach(tm.model, tm.processor) as lens:
        assert tm.model.config.text_config._attn_implementation == "arbiter_counting_sdpa"
        CALLS["counting_sdpa"] = 0
        with lens.record("attn", layers=[1], rows="last"):
            attached = logits(tm.model, inputs)
        assert CALLS["counting_sdpa"] == n            # the recorded layer reads rows beside the kernel's call
        CALLS["counting_sdpa"] = 0
        with lens.knockout("image", "last", layers=[1]):
            knocked = logits(tm.model, inputs)
        assert CALLS["counting_sdpa"] == n            # the kernel runs every row; the edited row is recomputed alone
    assert torch.equal(attached, plain)
    sdpa = tiny("llava")
    with arbiter.attach(sdpa.model, sdpa.processor) as lens, lens.knockout("image", "last", layers=[1]):
        reference = logits(sdpa.model, inputs)
    torch.testing.assert_close(knocked, reference, atol=1e-6, rtol=0)


def test_kernels_with_two_dimensional_masks_are_read_and_edited_exactly():
    tm = _model("padded_kernel")
    ref = tiny("llava")
    inputs = inputs_for(tm, n=2)                       # left-padded: the 2D mask carries the padding
    torch.testing.assert_close(logits(tm.model, inputs)[:, -1], logits(ref.model, inputs)[:, -1], atol=1e-5, rtol=0)
    out = {}
    for name, t in (("kernel", tm), ("sdpa", ref)):
        with arbiter.attach(t.model, t.processor) as lens:
            with lens.record("attn", rows="last") as rec:
                logits(t.model, inputs)
            with lens.knockout("image", "text"):
                out[name] = logits(t.model, inputs)[:, -1]
        out[name + "_probs"] = rec.trace["L2.attn.probs"]
    torch.testing.assert_close(out["kernel_probs"], out["sdpa_probs"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out["kernel"], out["sdpa"], atol=1e-5, rtol=0)


def test_a_probability_edit_under_a_kernel_with_two_dimensional_masks_keeps_the_kernel_and_equals_sdpa():
    """A flash-style kernel (2D padding mask): the edited last row is recomputed beside it (its mask rebuilt from the
    2D mask), every earlier row is the kernel's own output bit for bit, and the edit
    gives what it gives under SDPA."""
    tm = _model("padded_kernel")
    ref = tiny("llava")
    inputs = inputs_for(tm, n=2)
    plain = logits(tm.model, inputs)
    out = {}
    for name, t in (("kernel", tm), ("sdpa", ref)):
        with arbiter.attach(t.model, t.processor) as lens, lens.probe(HalveFirstHead(), layers=[1, 2]):
            out[name] = logits(t.model, inputs)
    assert torch.equal(out["kernel"][:, :-1], plain[:, :-1])
    assert (out["kernel"][:, -1] - plain[:, -1]).abs().max() > 1e-4
    torch.testing.assert_close(out["kernel"][:, -1], out["sdpa"][:, -1], atol=1e-5, rtol=0)


def test_a_second_lens_on_a_routed_model_is_refused():
    tm = tiny("llava")
    with arbiter.attach(tm.model, tm.processor):
        with pytest.raises(arbiter.errors.UnsupportedModelError, match="already routed"):
            with arbiter.attach(tm.model, tm.processor):
                pass
    assert tm.model.config.text_config._attn_implementation == "sdpa"


def test_probs_come_from_the_modules_own_eager_function():
    """A model whose eager attention differs from the textbook one (here: a temperature inside the eager
    function) has its recorded rows follow the model, not a re-implementation."""
    tm = tiny("llava")
    attn = tm.model.model.language_model.layers[0].self_attn
    module = __import__(type(attn).__module__, fromlist=["eager_attention_forward"])
    original = module.eager_attention_forward

    def tempered(mod, q, k, v, mask, scaling=None, **kw):
        return original(mod, q, k, v, mask, scaling=(scaling or 1.0) * 0.5, **kw)

    inputs = inputs_for(tm)
    module.eager_attention_forward = tempered
    try:
        with arbiter.attach(tm.model, tm.processor) as lens, lens.record("attn", layers=[0], rows="last") as rec:
            logits(tm.model, inputs)
        tm.model.set_attn_implementation("eager")
        with torch.no_grad():
            eager = tm.model(**inputs, output_attentions=True).attentions[0][:, :, -1]
    finally:
        module.eager_attention_forward = original
        tm.model.set_attn_implementation("sdpa")
    torch.testing.assert_close(rec.trace["L0.attn.probs"][:, :, -1], eager, atol=1e-6, rtol=0)


def test_a_knockout_keeps_every_other_row_bit_identical():
    """image -> last changes only the last row of each layer; causal rows before it never read it, so every other
    row of the logits is the plain forward's, bit for bit (the kernel ran them untouched)."""
    tm = tiny("llava")
    inputs = inputs_for(tm, n=2)
    plain = logits(tm.model, inputs)
    with arbiter.attach(tm.model, tm.processor) as lens, lens.knockout("image", "last"):
        knocked = logits(tm.model, inputs)
    assert torch.equal(knocked[:, :-1], plain[:, :-1])
    assert (knocked[:, -1] - plain[:, -1]).abs().max() > 1e-4


def test_recomputing_the_edited_rows_alone_equals_recomputing_the_layer(monkeypatch):
    tm = tiny("qwen2_vl")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.knockout("image", "last"):
            rows = logits(tm.model, inputs)
        monkeypatch.setattr(type(lens._runtime), "ROW_SLICE_SHARE", 0.0)   # every edit recomputes the whole layer
        with lens.knockout("image", "last"):
            whole = logits(tm.model, inputs)
    torch.testing.assert_close(rows, whole, atol=1e-6, rtol=0)


def test_row_sliced_knockouts_on_different_rows_in_different_layers_edit_each_their_own_rows(monkeypatch):
    """Two knockouts on two layers whose destination rows start at the same position and are as many ({5, 9} and
    {5, 6}): each layer edits its own rows, as recomputing every layer with the edited mask does (a per-forward
    cache keyed by the first position and the count alone handed the second layer the first one's rows)."""
    tm = tiny("llava")
    inputs = inputs_for(tm, n=1)
    n = inputs["input_ids"].shape[1]
    a, b = torch.zeros(1, n, dtype=torch.bool), torch.zeros(1, n, dtype=torch.bool)
    a[0, [5, 9]] = True
    b[0, [5, 6]] = True
    with arbiter.attach(tm.model, tm.processor) as lens:
        lens.use(arbiter.TokenGroups.from_input_ids(inputs["input_ids"], None, lens.facts.modality_token_ids)
                 .add("a", a).add("b", b))

        def knocked():
            with lens.knockout("text", "a", layers=[0]), lens.knockout("text", "b", layers=[1]):
                return logits(tm.model, inputs)
        rows = knocked()
        monkeypatch.setattr(type(lens._runtime), "ROW_SLICE_SHARE", 0.0)   # every edit recomputes the whole layer
        whole = knocked()
    torch.testing.assert_close(rows, whole, atol=1e-6, rtol=0)


class _InPlaceMaskEdit(arbiter.Probe):
    """Severs image keys for the last row by writing into the mask it is handed and returning that same tensor."""
    edits = {"attn.mask": "all"}

    def attn_mask(self, ctx, mask):
        image = ctx.on_device(ctx.group("image", over="keys"), mask.device)   # [b, k]
        last = ctx.on_device(ctx.group("last", over="rows"), mask.device)     # [b, q]
        mask &= ~(last[:, None, :, None] & image[:, None, None, :])
        return mask


def test_a_mask_edited_in_place_and_returned_is_an_edit():
    """An editor may write into the mask it receives and return it: the layer runs with that mask (equal to the
    knockout image -> last), never with the model's own one because the returned object is the same."""
    tm = tiny("llava")
    inputs = inputs_for(tm, n=1)
    plain = logits(tm.model, inputs)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.knockout("image", "last"):
            knocked = logits(tm.model, inputs)
        with lens.probe(_InPlaceMaskEdit()):
            in_place = logits(tm.model, inputs)
    assert (knocked[:, -1] - plain[:, -1]).abs().max() > 1e-4
    torch.testing.assert_close(in_place, knocked, atol=1e-6, rtol=0)


def test_knockout_edges_built_once_per_forward_equal_edges_built_per_layer(monkeypatch):
    """A knockout's kept edges are built once per forward when small and per layer when large: both give the same
    logits (row-sliced image -> last, whole-layer image -> text), bit for bit."""
    from arbiter.probes.knockout import Knockout
    tm = tiny("llava")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        runs = []
        for limit in (Knockout.KEEP_ELEMENTS, 0):
            monkeypatch.setattr(Knockout, "KEEP_ELEMENTS", limit)
            with lens.knockout("image", "last"):
                last = logits(tm.model, inputs)
            with lens.knockout("image", "text"):
                text = logits(tm.model, inputs)
            runs.append((last, text))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])


def test_knockouts_and_reads_run_under_inference_mode():
    """torch.inference_mode() tensors keep no version counter: a knockout (row-sliced and whole-layer), an in-place
    mask edit and a row read there give what they give under no_grad, bit for bit; a knockout that severs nothing
    leaves the logits bit-identical."""
    tm = tiny("llava")
    inputs = inputs_for(tm, n=2)

    def run(grad_mode):
        out = []
        with arbiter.attach(tm.model, tm.processor) as lens:
            for make in (lambda: lens.knockout("image", "last"), lambda: lens.knockout("image", "text"),
                         lambda: lens.probe(_InPlaceMaskEdit()), lambda: lens.record("attn.probs", rows="last")):
                with grad_mode(), make() as p:
                    out.append(tm.model(**inputs).logits.clone())
                    if hasattr(p, "trace"):
                        out.append(p.trace["L0.attn.probs"].clone())
            with grad_mode(), lens.knockout("image", "last", batch_rows=[]):
                out.append(tm.model(**inputs).logits.clone())
        return out

    with torch.no_grad():
        plain = tm.model(**inputs).logits
    ref, inf = run(torch.no_grad), run(torch.inference_mode)
    assert all(torch.equal(a, b) for a, b in zip(ref, inf))
    assert torch.equal(inf[-1], plain)


@settings(max_examples=80, deadline=None)
@given(picked=st.sets(st.integers(0, 150), max_size=100))
def test_the_span_of_row_indices_is_their_run_where_consecutive(picked):
    """Sorted row indices (a few read at once, many by their ends): (start, stop) where they are one run, else
    None, as reading them one by one says."""
    from arbiter.lens import _span

    idx = sorted(picked)
    want = (idx[0], idx[-1] + 1) if idx and idx == list(range(idx[0], idx[-1] + 1)) else None
    assert _span(torch.tensor(idx, dtype=torch.long)) == want
