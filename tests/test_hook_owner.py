"""One hook owner: the Lens's replay service swaps modules and always puts them back; attn.k_pre is a site;
adapters carry the model-specific behaviour (stacked residual streams, cross-attention key groups)."""

from __future__ import annotations

import pytest
import torch

import arbiter
from arbiter.errors import InterventionError, SiteError
from arbiter.replay import ReplayModule
from arbiter.sweep import head_sweep, knockout_sweep

from helpers import _tiny, inputs_for, logits


def _tree(model):
    """Every (parent, slot, child) object of the module tree, by identity."""
    return [(id(p), name, id(c)) for p in model.modules() for name, c in p._modules.items()]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_replay_swaps_modules_and_restores_the_exact_objects_after_the_block_and_after_an_exception():
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    ref = logits(tm.model, inputs)
    tree, n_hooks = _tree(tm.model), _hooks(tm.model)
    with arbiter.attach(tm.model, tm.processor) as lens:
        attached = _hooks(tm.model)
        with lens.capture() as cap, torch.no_grad():
            tm.model(**inputs)
        assert sorted(cap.layers) == lens.all_layers and cap.encoders   # vision tower + projector ran once
        assert _hooks(tm.model) == attached                              # the capture's hooks are gone
        layers = lens.facts.decoder.layers
        with lens.replay(cap.layers, 2, 1, cap.encoders):
            assert all(isinstance(layers[i], ReplayModule) for i in (0, 1)) and layers[2] is lens.facts.layers[2].layer
            assert layers[0].self_attn is lens.facts.layers[0].attn      # attributes fall through to the original
            out = logits(tm.model, inputs)
        assert _tree(tm.model) == tree
        assert torch.equal(out, ref)                                     # replaying the clean run changes nothing
        with pytest.raises(RuntimeError, match="boom"):
            with lens.replay(cap.layers, 3, 2, cap.encoders):
                assert _tree(tm.model) != tree
                raise RuntimeError("boom")
        assert _tree(tm.model) == tree
        block = lens.replay(cap.layers, 1, 1, cap.encoders)
        block.__enter__()                                                # left open: close() restores it
        assert _tree(tm.model) != tree
    assert _tree(tm.model) == tree and _hooks(tm.model) == n_hooks
    assert not any("forward" in m.__dict__ for m in tm.model.modules())
    assert torch.equal(logits(tm.model, inputs), ref)


def test_replay_refuses_what_it_cannot_replay():
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(InterventionError, match="lens.capture"), lens.replay({0: torch.zeros(1)}, 2):
            pass
        with pytest.raises(InterventionError, match="out of range"), lens.replay({}, 99):
            pass
    g = _tiny("gemma3n")
    with arbiter.attach(g.model, g.processor) as lens:
        with pytest.raises(InterventionError, match="upto=0"), lens.replay({0: torch.zeros(1)}, 1):
            pass


def _count_calls(modules):
    calls = [0] * len(modules)
    handles = [m.register_forward_pre_hook(lambda *_, _i=i: calls.__setitem__(_i, calls[_i] + 1))
               for i, m in enumerate(modules)]
    return calls, handles


def test_replaying_a_layers_attention_runs_only_its_output_projection_and_equals_a_plain_forward():
    """replay(heads=...) at layer 1: its query projection never runs, its output projection runs once on the recorded
    per-head outputs (n copies), and a head blocked there gives what a plain forward with that head blocked gives."""
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        clean = logits(tm.model, inputs)
        with lens.block_heads([(1, 0)]):
            ref = logits(tm.model, inputs)
        assert (ref - clean).abs().max().item() > 1e-4                  # the block changes the output
        with lens.capture(heads=[0, 1, 2]) as cap, torch.no_grad():
            tm.model(**inputs)
        assert sorted(cap.heads) == [0, 1, 2]
        assert cap.heads[1][0].shape[:2] == inputs["input_ids"].shape    # [batch, tokens, heads * head_dim]
        lf = lens.facts.layers[1]
        calls, handles = _count_calls([lf.attn.q_proj, lf.out_proj, lens.facts.layers[2].attn.q_proj])
        try:
            with lens.replay(cap.layers, 1, 2, cap.encoders, heads=cap.heads), lens.block_heads([(1, 0)]):
                assert isinstance(lf.layer.self_attn, ReplayModule)
                out = logits(tm.model, {k: torch.cat([v] * 2) for k, v in inputs.items()})
        finally:
            for h in handles:
                h.remove()
        assert lf.layer.self_attn is lf.attn
    assert calls == [0, 1, 1]
    assert (out - torch.cat([ref] * 2)).abs().max().item() <= 1e-5


def _heads_captured_with(hook) -> list[int]:
    """The layers (of 0 and 1) whose per-head outputs a clean run of tiny LLaVA keeps while ``hook(layer_facts)``,
    a user's hook on layer 1 placed before arbiter attaches, is in place (it returns the handle)."""
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=1)
    h = hook(arbiter.attach(tm.model, tm.processor).facts.layers[1])   # not entered: nothing installed
    try:
        with arbiter.attach(tm.model, tm.processor) as lens:
            with lens.capture(heads=[0, 1]) as cap, torch.no_grad():
                tm.model(**inputs)
    finally:
        h.remove()
    return sorted(cap.heads)


def test_capture_leaves_out_a_layer_whose_attention_returns_more_than_its_output_projection():
    """Per-head outputs are kept only where the attention module returned its output projection's result itself:
    a hook that rewrites layer 1's attention output (as an adapter's post-processing would) leaves layer 1 out."""
    assert _heads_captured_with(
        lambda lf: lf.attn.register_forward_hook(lambda m, a, out: (out[0] + 0.0, *out[1:]))) == [0]


def test_capture_leaves_out_per_head_outputs_written_into_after_they_were_recorded():
    """The per-head outputs are kept without a copy: a hook that writes into layer 1's o_proj input after the
    projection (in place, values unchanged) leaves layer 1 out, since arbiter can no longer vouch for them."""
    assert _heads_captured_with(
        lambda lf: lf.out_proj.register_forward_hook(lambda m, args, out: args[0].mul_(1.0))) == [0]


def test_replay_refuses_a_probe_on_what_it_does_not_run():
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=1)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.capture(heads=[1]) as cap, torch.no_grad():
            tm.model(**inputs)
        with lens.record("resid.post", layers=[0]):
            with pytest.raises(InterventionError, match=r"layers \[0\], which do not run"):
                with lens.replay(cap.layers, 1):
                    pass
        with lens.record("attn.probs", layers=[1]):
            with pytest.raises(InterventionError, match="attention is replayed"):
                with lens.replay(cap.layers, 1, heads=cap.heads):
                    pass
            with lens.replay(cap.layers, 1):     # the attention runs: nothing refused
                pass
        with lens.record("resid.pre", layers=[1]), lens.replay(cap.layers, 1, heads=cap.heads):
            pass                                  # a read of resid.pre is served: the layer itself runs
        with lens.record("embed"):
            with pytest.raises(InterventionError, match="embed"):
                with lens.replay(cap.layers, 1):
                    pass


def test_last_row_only_runs_the_last_layers_mlp_on_one_row_and_gives_the_full_forwards_last_row():
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    seen = []
    with arbiter.attach(tm.model, tm.processor) as lens:
        ref = logits(tm.model, inputs)[:, -1]
        attached = _hooks(tm.model)
        h = lens.facts.layers[-1].mlp.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
        try:
            with lens.last_row_only():
                out = logits(tm.model, inputs)[:, -1]
        finally:
            h.remove()
        assert _hooks(tm.model) == attached                              # its two pre-hooks are gone
    assert seen == [(2, 1, tm.config.text_config.hidden_size)]
    assert (out - ref).abs().max().item() <= 1e-6


def test_last_row_only_refuses_a_layer_it_cannot_cut_and_a_probe_on_the_last_layer():
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        last = lens.facts.n_layers - 1
        with lens.record("resid.post", layers=[last]):
            with pytest.raises(InterventionError, match=f"Recorder is active on resid.post at layer {last}"):
                with lens.last_row_only():
                    pass
        with lens.record("resid.post", layers=[0]), lens.last_row_only():
            pass                                            # another layer's probe is served as usual
    g = _tiny("git")
    with arbiter.attach(g.model, g.processor) as lens:
        assert "no pre-MLP norm" in lens.last_row_refusal()
        with pytest.raises(InterventionError, match="no pre-MLP norm"), lens.last_row_only():
            pass


class _HandK(arbiter.Probe):
    reads = {"attn.k_pre": "all"}

    def attn_k_pre(self, ctx, value):
        self.emit(ctx.layer, value)


@pytest.mark.parametrize("family", ["llava", "gemma3n"])
def test_k_pre_equals_k_proj_of_its_input_computed_by_hand(family):
    tm = _tiny(family)
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with_k = [lf.index for lf in lens.facts.layers if isinstance(getattr(lf.attn, "k_proj", None),
                                                                      torch.nn.Linear)]
        seen = {}
        handles = [lens.facts.layers[i].attn.k_proj.register_forward_pre_hook(
            lambda m, a, _i=i: seen.__setitem__(_i, a[0].detach().clone())) for i in with_k]
        try:
            with lens.probe(_HandK()) as p, lens.record("attn.k_pre", heads=[0]) as rec, torch.no_grad():
                tm.model(**inputs)
        finally:
            for h in handles:
                h.remove()
        got = p.result()
        assert sorted(got) == with_k if isinstance(got, dict) else got.shape[0] == len(with_k)
        for j, layer in enumerate(with_k):
            _, nkv, hd = lens.facts.heads(layer)
            x = seen[layer]
            with torch.no_grad():
                want = lens.facts.layers[layer].attn.k_proj(x).view(x.shape[0], x.shape[1], nkv, hd)
            k = got[layer] if isinstance(got, dict) else got[j]
            assert k.shape == want.shape and torch.equal(k, want)
            assert torch.equal(rec.trace[f"L{layer}.attn.k_pre"], want[:, :, :1])   # query head 0 -> KV head 0
        if family == "gemma3n":
            assert with_k != lens.all_layers                  # KV-shared layers have no k_proj: skipped by "all"
            missing = next(i for i in lens.all_layers if i not in with_k)
            with pytest.raises(SiteError, match=rf"{missing}\b.*attn\.k \(keys after RoPE\)"):
                with lens.probe(_HandK(), layers=[missing]):
                    pass
            with pytest.raises(SiteError, match="read-only"):
                type("EditK", (_HandK,), {"reads": {}, "edits": {"attn.k_pre": "all"}})().site_specs()


def test_gemma3n_sweep_with_stacked_streams_equals_the_loop_of_single_forwards():
    tm = _tiny("gemma3n")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        assert lens.facts.residual.stacked
        heads = [(0, 0), (1, 1), (lens.facts.attention_layers[-1], 0)]
        res = head_sweep(lens, inputs, heads=heads, chunk=2)
        naive = []
        for s in res.settings:
            with lens.block_heads([(s.meta["layer"], s.meta["head"])]):
                naive.append(logits(tm.model, inputs)[:, -1])
        ko = knockout_sweep(lens, inputs, [("image", "last")], window=1, chunk=3)
        naive_ko = []
        for s in ko.settings:
            with lens.knockout("image", "last", layers=s.meta["layers"], allow_empty=True):
                naive_ko.append(logits(tm.model, inputs)[:, -1])
    assert (res.values - torch.stack(naive)).abs().max().item() <= 1e-5
    assert (ko.values - torch.stack(naive_ko)).abs().max().item() <= 1e-5
    assert (res.values - res.baseline).abs().max().item() > 0


def test_stacked_residual_layout_is_the_adapters():
    g, ll = _tiny("gemma3n"), _tiny("llava")
    with arbiter.attach(g.model, g.processor) as lens:
        res = lens.facts.residual
        x = torch.randn(4, 2, 5, 8)                                 # [streams, batch, seq, hidden]
        assert res.seq_dim(x) == 2 and res.batch_dim(x) == 1 and torch.equal(res.main_stream(x), x[0])
        assert torch.equal(res.repeat_batch(x, 3), torch.cat([x] * 3, dim=1))
        y = x[0]                                                    # attn.out / mlp.out: one stream
        assert res.seq_dim(y) == 1 and res.batch_dim(y) == 0 and res.main_stream(y) is y
        with lens.record("resid.post", rows="last") as rec, torch.no_grad():
            g.model(**inputs_for(g, n=2))
        assert rec.trace["L0.resid.post"].shape[:3] == (4, 2, 1)
    with arbiter.attach(ll.model, ll.processor) as lens:
        res = lens.facts.residual
        x = torch.randn(2, 5, 8)
        assert not res.stacked and res.seq_dim(x) == 1 and res.main_stream(x) is x
        assert torch.equal(res.repeat_batch(x, 2), torch.cat([x, x]))


def test_cross_attention_key_groups_come_from_the_adapter():
    m, ll = _tiny("mllama"), _tiny("llava")
    with arbiter.attach(m.model, m.processor) as lens:
        cross = [lf.index for lf in lens.facts.layers if lf.cross]
        assert cross and lens.facts.cross_key_groups() == {"image"}
        assert lens.facts.cross_key_groups(cross[0]) == {"image"}
        assert lens.facts.cross_key_groups(next(i for i in lens.all_layers if i not in cross)) == frozenset()
    with arbiter.attach(ll.model, ll.processor) as lens:
        assert lens.facts.cross_key_groups() == frozenset()      # no cross-attention layer


def test_generic_cross_key_groups_are_the_models_modalities(monkeypatch):
    from arbiter.adapters import base

    monkeypatch.setattr(base, "_REGISTRY", [])
    m = _tiny("mllama")
    with arbiter.attach(m.model, m.processor) as lens:
        assert lens.facts.family == "generic" and lens.facts.cross_key_groups() == {"image"}
