"""Core guarantees: exact no-op recording, eager agreement, restoration, padding, dtypes, clear errors."""

from __future__ import annotations

import pytest
import torch

import arbiter
from arbiter.errors import GroupError, ProbeError, SiteError, UnsupportedModelError
from arbiter.probes.base import SITES

from helpers import _tiny, inputs_for, logits, set_text_attention


class ReadEverything(arbiter.Probe):
    """Reads every site at every layer, edits nothing."""

    reads = {s: "all" for s in SITES}

    def __init__(self):
        super().__init__()
        self.seen = set()

    def _see(self, ctx, v):
        assert torch.isfinite(v.float()).all() or ctx.site == "attn.scores"
        self.seen.add((ctx.site, ctx.layer))


for _site in SITES:
    setattr(ReadEverything, _site.replace(".", "_"), ReadEverything._see)


def test_reading_every_site_is_bit_identical(tm):
    inputs = inputs_for(tm, n=2)
    ref = logits(tm.model, inputs)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.probe(ReadEverything()) as p:
            out = logits(tm.model, inputs)
    assert (out - ref).abs().max().item() == 0.0
    assert ("attn.probs", lens.facts.attention_layers[-1]) in p.seen and ("logits", None) in p.seen


def _eager_reference(tm, inputs):
    impl = set_text_attention(tm.model, "eager")  # sdpa; GIT implements eager only
    try:
        with torch.no_grad():
            out = tm.model(**inputs, output_attentions=True)
    finally:
        set_text_attention(tm.model, impl)
    return [a for a in out.attentions if a is not None]


def _compare(rec, eager, layers, only_first=False, n_layers=None):
    checked = 0
    for i, layer in enumerate(layers):
        rec_p = rec.trace[f"L{layer}.attn.probs"]
        ref = eager[layer] if len(eager) == n_layers else eager[i]  # one entry per layer, or per self-attn layer
        assert ref.shape == rec_p.shape
        assert (rec_p - ref).abs().max().item() <= 1e-6
        checked += 1
        if only_first:
            break
    return checked


def test_recorded_probs_match_eager_output_attentions(tm):
    """Same run (model in eager): every layer. Model in SDPA: the first layer (later ones see SDPA's rounding)."""
    inputs = inputs_for(tm, n=2)
    eager = _eager_reference(tm, inputs)
    impl = set_text_attention(tm.model, "eager")
    try:
        with arbiter.attach(tm.model, tm.processor) as lens, lens.record("attn.probs", rows="all") as rec:
            logits(tm.model, inputs)
    finally:
        set_text_attention(tm.model, impl)
    layers = [lf.index for lf in lens.facts.layers if lf.attn is not None and not lf.cross]
    assert _compare(rec, eager, layers, n_layers=lens.facts.n_layers) == len(layers)
    with arbiter.attach(tm.model, tm.processor) as lens, lens.record("attn.probs", rows="all") as rec_sdpa:
        logits(tm.model, inputs)
    assert _compare(rec_sdpa, eager, layers, only_first=True, n_layers=lens.facts.n_layers) == 1


def test_last_row_probs_are_rows_of_the_full_matrix(tm):
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.record("attn.probs", rows="all") as full, torch.no_grad():
            tm.model(**inputs)
        with lens.record("attn.probs", rows="last") as last, torch.no_grad():
            tm.model(**inputs)
    layer = lens.facts.attention_layers[0]
    pos = last.trace[f"rows.attn.probs"]
    rows = last.trace[f"L{layer}.attn.probs"]
    assert rows.shape[2] == 1
    assert (rows - full.trace[f"L{layer}.attn.probs"][:, :, pos]).abs().max().item() <= 1e-6


def test_two_readers_of_different_rows_each_get_their_rows_of_the_full_matrix(tm):
    """Readers of one site with different rows share one read of their rows' union, which need not be consecutive
    ([0, 2, 5, 6, 7]: the first reader's position 2 is the union's second row, not its third); each still gets
    exactly its own rows of the full matrix, in either order of activation."""
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.record("attn.probs", rows="all") as full, torch.no_grad():
            tm.model(**inputs)
        for specs in (("last", [3, 1]), ([3, 1], "last"), ([0, 2], [2, 5, 6, 7])):
            with lens.record("attn.probs", rows=specs[0]) as a, lens.record("attn.probs", rows=specs[1]) as b, \
                    torch.no_grad():
                tm.model(**inputs)
            for rec, spec in ((a, specs[0]), (b, specs[1])):
                pos = rec.trace["rows.attn.probs"]
                if spec != "last":
                    assert pos.tolist() == sorted(spec)
                for layer in lens.facts.attention_layers:
                    rows = rec.trace[f"L{layer}.attn.probs"]
                    assert rows.shape[2] == len(pos)
                    assert (rows - full.trace[f"L{layer}.attn.probs"][:, :, pos]).abs().max().item() <= 1e-6


def test_head_outputs_recombine_to_attention_output(tm):
    inputs = inputs_for(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.record("attn.head_out", "attn.out") as rec, torch.no_grad():
            tm.model(**inputs)
        for lf in lens.facts.layers:
            if lf.attn is None:
                continue
            h = rec.trace[f"L{lf.index}.attn.head_out"]
            with torch.no_grad():
                recombined = lf.out_proj(h.flatten(-2))
            assert (recombined - rec.trace[f"L{lf.index}.attn.out"]).abs().max().item() <= 1e-5


def test_leaving_attach_restores_the_model_even_after_an_exception(tm):
    inputs = inputs_for(tm)
    ref = logits(tm.model, inputs)
    impl = tm.model.get_decoder().config._attn_implementation
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tm.model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with arbiter.attach(tm.model, tm.processor) as lens:
            with lens.knockout("last", "last", allow_empty=True) if False else lens.record("resid"):
                raise RuntimeError("boom")
    assert tm.model.get_decoder().config._attn_implementation == impl
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tm.model.modules()) == n_hooks
    assert torch.equal(logits(tm.model, inputs), ref)


def test_left_padded_batch_equals_unbatched_for_last_row_attention(mm):
    if mm.family == "git":
        pytest.skip("GIT's learned text positions ignore the attention mask (position ids count from the first "
                    "column, pads included), so left padding shifts the shorter prompt's positions and changes "
                    "its attention and residuals in the model itself, with or without arbiter")
    inputs2 = inputs_for(mm, n=2)
    single = inputs_for(mm, n=1)
    with arbiter.attach(mm.model, mm.processor) as lens:
        with lens.record("attn.probs", "resid.post", rows="last") as rb, torch.no_grad():
            mm.model(**inputs2)
        with lens.record("attn.probs", "resid.post", rows="last") as r1, torch.no_grad():
            mm.model(**single)
    layer = [lf.index for lf in lens.facts.layers if lf.attn is not None and not lf.cross][-1]
    pb, p1 = rb.trace[f"L{layer}.attn.probs"][0], r1.trace[f"L{layer}.attn.probs"][0]
    # sample 0 is the shorter prompt: left padding puts zeros in front
    pad = pb.shape[-1] - p1.shape[-1]
    assert pad >= 0
    assert pad == 0 or pb[..., :pad].abs().max().item() == 0.0
    assert (pb[..., pad:] - p1).abs().max().item() <= 1e-5
    rb_r, r1_r = rb.trace[f"L{layer}.resid.post"], r1.trace[f"L{layer}.resid.post"]
    first = (lambda t: t[:, 0]) if rb_r.dim() == 4 else (lambda t: t[0])  # Gemma 3n: [altup, batch, ...]
    assert (first(rb_r) - first(r1_r)).abs().max().item() <= 1e-4


def test_bfloat16_recording_is_bit_identical():
    from arbiter.testing import tiny

    tm = tiny("llava")  # a fresh copy: casting the shared one would round its buffers (rotary inv_freq)
    model = tm.model.to(torch.bfloat16)
    try:
        inputs = inputs_for(tm, n=2)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        ref = logits(model, inputs)
        with arbiter.attach(model, tm.processor) as lens, lens.record("attn", "resid", rows="last") as rec:
            out = logits(model, inputs)
        assert torch.equal(out, ref)
        assert rec.trace["L0.attn.probs"].dtype == torch.bfloat16
        assert torch.allclose(rec.trace["L0.attn.probs"].float().sum(-1), torch.ones(1), atol=1e-2)
    finally:
        model.to(torch.float32)


def test_unsupported_model_error_names_families_and_register_adapter():
    with pytest.raises(UnsupportedModelError, match="register_adapter") as e:
        arbiter.attach(torch.nn.Linear(2, 2))
    assert "attach" in str(e.value)

    from transformers import PretrainedConfig, PreTrainedModel

    class Weird(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(UnsupportedModelError, match="llava"):
        arbiter.attach(Weird(PretrainedConfig()))


def test_unknown_group_is_a_clear_error():
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(GroupError, match="unknown token group 'nope'.*image"):
            with lens.record("attn", rows="nope"), torch.no_grad():
                tm.model(**inputs_for(tm))


def test_empty_group_knockout_is_a_clear_error():
    tm = _tiny("llama")
    with arbiter.attach(tm.model, tm.processor) as lens:
        lens.use(None)
        with pytest.raises(GroupError, match="empty"):
            with lens.knockout("generated", "pad"), torch.no_grad():
                tm.model(**inputs_for(tm))


@pytest.mark.parametrize("layers", [99, [-99], [0, 4]])
def test_layer_out_of_range_is_a_clear_error(layers):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(SiteError, match="out of range"):
            with lens.record("resid", layers=layers):
                pass


def test_head_out_of_range_is_a_clear_error():
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(SiteError, match="head 7 out of range"):
            with lens.block_heads([(0, 7)]):
                pass


def test_unknown_site_lists_the_sites():
    with pytest.raises(SiteError, match="resid.post"):
        arbiter.Recorder("attn.pattern")


def test_trace_round_trip_of_a_recording(tmp_path):
    tm = _tiny("qwen2_vl")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.record("attn", "keys", "resid", "heads", rows="last") as rec, torch.no_grad():
            tm.model(**inputs_for(tm, n=2))
    rec.trace.save(tmp_path / "run.safetensors")
    back = arbiter.Trace.load(tmp_path / "run.safetensors")
    assert set(back.keys()) == set(rec.trace.keys())
    for k in back.keys():
        assert torch.equal(back[k], rec.trace[k])
    assert back.meta["model"]["n_layers"] == lens.facts.n_layers
    assert back.meta["groups"]["groups"]["last"] == rec.trace.meta["groups"]["groups"]["last"]


class _ForwardStart(arbiter.Probe):
    reads = {"resid.post": "last"}

    def __init__(self):
        super().__init__()
        self.starts = []

    def on_forward(self, ctx):
        self.starts.append((ctx.step, ctx.layer, ctx.positions.clone(), ctx.row_mask.clone()))

    def resid_post(self, ctx, v):
        pass


def test_a_forward_start_is_seen_with_every_row_of_every_sample(tm):
    inputs = inputs_for(tm, n=2)
    b, t = inputs["input_ids"].shape
    with arbiter.attach(tm.model, tm.processor) as lens, lens.probe(_ForwardStart()) as p, torch.no_grad():
        tm.model(**inputs)
    [(step, layer, positions, row_mask)] = p.starts
    assert (step, layer) == (0, None)
    n = len(positions)   # the decoder's sequence: the ids, and positions a model puts before them (GIT's image)
    assert n >= t and positions.tolist() == list(range(n))
    assert row_mask.shape == (b, n) and bool(row_mask.all())


def test_readers_of_one_site_on_different_layers_each_get_only_their_layers_and_rows(tm):
    """Layers whose probes are the same share one resolution of their rows per forward; layers with other probes
    (here: a second reader on some of them) never take it."""
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        lens_layers = lens.facts.attention_layers
        with lens.record("attn.probs", rows="all") as full, torch.no_grad():
            tm.model(**inputs)
        layers = lens_layers[: max(1, len(lens_layers) // 2)]
        with lens.record("attn.probs", rows="last") as every, \
                lens.record("attn.probs", rows=[0, 2], layers=layers) as some, torch.no_grad():
            tm.model(**inputs)

    def recorded(rec):
        return {k for k in rec.trace.keys() if k.startswith("L") and k.endswith(".attn.probs")}
    assert recorded(some) == {f"L{i}.attn.probs" for i in layers}
    assert recorded(every) == {f"L{i}.attn.probs" for i in lens_layers}
    for rec in (every, some):
        pos = rec.trace["rows.attn.probs"]
        for layer in (layers if rec is some else lens_layers):
            rows = rec.trace[f"L{layer}.attn.probs"]
            assert rows.shape[2] == len(pos)
            assert (rows - full.trace[f"L{layer}.attn.probs"][:, :, pos]).abs().max().item() <= 1e-6
    assert some.trace["rows.attn.probs"].tolist() == [0, 2]
