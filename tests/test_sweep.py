"""Batched sweeps equal the naive loop of separate forwards (heads and knockout map), with prefix reuse."""

from __future__ import annotations

import pytest
import torch

import arbiter
from arbiter.data import ConflictSample
from arbiter.replay import decoder_siblings
from arbiter.sweep import _clean_outputs, forward_kwargs, head_sweep, knockout_sweep

from helpers import MULTIMODAL, _tiny, inputs_for, logits


def _naive_head_loop(lens, tm, inputs, settings, position: int = -1) -> torch.Tensor:
    """The independent reference: one plain forward per head setting, that head blocked, logits at ``position``."""
    out = []
    for s in settings:
        with lens.block_heads([(s.meta["layer"], s.meta["head"])]):
            out.append(logits(tm.model, inputs)[:, position])
    return torch.stack(out)


def test_head_sweep_equals_naive_loop():
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        res = head_sweep(lens, inputs, chunk=5)
        naive = _naive_head_loop(lens, tm, inputs, res.settings)
    assert res.values.shape[0] == 16
    assert (res.values - naive).abs().max().item() <= 1e-5
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


@pytest.mark.slow
@pytest.mark.parametrize("family", MULTIMODAL + ["llama"])
def test_head_sweep_replays_encoders_and_equals_naive_loop(family):
    tm = _tiny(family)
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        last = lens.facts.attention_layers[-1]
        first = lens.facts.attention_layers[0]
        keeps_last_row = "logits_to_keep" in forward_kwargs(lens, True)
        heads = [(first, 0), (first, 1), (last, 0), (last, 1)]   # chunks of 2: the first leaves the last layer alone
        replayed = _clean_outputs(lens, {k: v for k, v in inputs.items() if k != "labels"})[1].encoders
        encoders = [m for m in decoder_siblings(lens.model, lens.facts.decoder) if m in replayed]
        # count calls of a submodule (the real work): a replayed encoder's stand-in never calls it
        # (leaf siblings such as lm_head are skipped: they run after the decoder and are never replayed)
        inner = [next(m.children()) for m in encoders if next(m.children(), None) is not None]
        calls = {id(m): 0 for m in inner}
        handles = [m.register_forward_pre_hook(lambda m, a: calls.__setitem__(id(m), calls[id(m)] + 1))
                   for m in inner]
        try:
            res = head_sweep(lens, inputs, heads=heads, chunk=2)
        finally:
            for h in handles:
                h.remove()
        naive = _naive_head_loop(lens, tm, inputs, res.settings)
    assert (res.values - naive).abs().max().item() <= 1e-5
    # the first layer's attention was replayed too, except where the layers cannot be replayed (Gemma 3n reads state
    # earlier layers leave aside) or the attention module returns more than its output projection (GIT)
    assert (res.attention_replayed > 0) == (family not in ("gemma3n", "git"))
    # ... and the first chunk's last layer ran on its last row, except where the cut is refused (Gemma 3n's stacked
    # streams, GIT's layer without a pre-MLP norm) or never tried (a forward without logits_to_keep keeps every
    # row's logits: Qwen2-Audio, the Qwen2.5-Omni thinker)
    assert (res.last_row == 1) == (family not in ("gemma3n", "git") and keeps_last_row)
    # each replayed encoder ran once (the clean run), not once per sweep forward; the vision tower is one
    assert all(c <= 1 for c in calls.values()), calls
    assert max(calls.values(), default=0) == (1 if inner else 0)
    # IDEFICS runs its vision tower inside the decoder module: no sibling encoder to replay (still exact above)
    assert bool(inner) == (family not in ("llama", "idefics"))


def test_a_sweep_given_an_earlier_clean_run_skips_its_clean_forward_and_equals_a_fresh_sweep():
    """sweep(clean=...) replays the clean run of an earlier sweep on the same inputs: values and baseline bit for bit
    those of a fresh sweep, without its clean forward and last-row check (counted by a hook on the model)."""
    from arbiter.sweep import head_settings, sweep
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    calls = []
    handle = tm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with arbiter.attach(tm.model, tm.processor) as lens:
            settings = head_settings(lens, [(0, 1), (1, 2), (1, 3)])
            first = sweep(lens, inputs, settings, chunk=2, keep_clean=True)
            n_fresh = len(calls)
            fresh = sweep(lens, inputs, settings, chunk=2)
            calls.clear()
            again = sweep(lens, inputs, settings, chunk=2, clean=first.clean)
    finally:
        handle.remove()
    assert first.clean is not None and fresh.clean is None and not first.clean_reused and again.clean_reused
    # a fresh sweep also runs the clean forward and the last-row check (a forward of the last layer); the clean run
    # passed back carries both
    assert len(calls) == n_fresh - 2 == fresh.forwards and again.last_row_diff == first.last_row_diff
    assert torch.equal(again.values, fresh.values) and torch.equal(again.baseline, fresh.baseline)


@pytest.mark.parametrize("reuse", [True, False])
def test_a_head_sweep_replays_each_chunks_first_layer_attention_up_to_its_output_projection(reuse):
    """One chunk per layer: layer l's query projection runs in the clean forward and in the chunks of the layers
    below it (l + 1 times; the last layer once more, in the last-row check); it runs once more (its own chunk)
    without ``reuse_attention``. Values equal the naive loop either way."""
    from arbiter.sweep import head_settings, sweep
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        f = lens.facts
        per_layer = f.heads(0)[0]
        calls = [0] * f.n_layers
        handles = [lf.attn.q_proj.register_forward_pre_hook(lambda *_, _i=lf.index: calls.__setitem__(_i, calls[_i] + 1))
                   for lf in f.layers]
        try:
            res = sweep(lens, inputs, head_settings(lens), chunk=per_layer, reuse_attention=reuse)
        finally:
            for h in handles:
                h.remove()
        naive = _naive_head_loop(lens, tm, inputs, res.settings)
    expected = [1 + layer + (0 if reuse else 1) for layer in range(f.n_layers)]
    expected[-1] += 1   # the last-row check on the clean run runs the last layer once more
    assert calls == expected
    assert res.attention_replayed == (res.forwards if reuse else 0) and res.forwards == f.n_layers
    # the last layer ran on its last row in every chunk but the last layer's own (its probes are there)
    assert res.last_row == f.n_layers - 1 and res.last_row_diff <= 1e-6
    assert (res.values - naive).abs().max().item() <= 1e-5


def test_a_knockout_sweep_never_replays_an_attention():
    """A knockout changes its first layer's attention itself: that attention always runs."""
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        res = knockout_sweep(lens, inputs, [("image", "last")], window=1, chunk=2)
    assert res.forwards == 2 and res.attention_replayed == 0 and res.layers_skipped > 0
    assert res.last_row == 1   # the chunk whose knockouts reach the last layer ran it whole


def test_a_sweep_runs_the_last_layer_whole_where_the_last_row_check_fails():
    """A model that mixes positions after its last layer (a hook on the final norm adds the mean over positions) is
    one the last-row cut would get wrong: the check on the clean run finds the difference, every forward runs the
    last layer whole, and the values still equal the naive loop's."""
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        h = lens.facts.final_norm.register_forward_pre_hook(lambda m, a: (a[0] + a[0].mean(dim=1, keepdim=True),))
        try:
            res = head_sweep(lens, inputs, heads=[(0, 0), (1, 1)], chunk=1)
            cut = head_sweep(lens, inputs, heads=[(0, 0), (1, 1)], chunk=1)
            naive = _naive_head_loop(lens, tm, inputs, res.settings)
        finally:
            h.remove()
        plain = head_sweep(lens, inputs, heads=[(0, 0), (1, 1)], chunk=1)
    assert res.last_row == 0 and res.last_row_diff > 1e-3 and cut.last_row == 0
    assert (res.values - naive).abs().max().item() <= 1e-5
    assert plain.last_row == 2 and plain.last_row_diff <= 1e-6    # without the hook the cut serves this model


def test_a_sweep_on_a_model_that_keeps_every_rows_logits_never_cuts_the_last_layer():
    """Qwen2-Audio's forward takes no logits_to_keep: the metric sees every position, so the last layer always runs
    whole, and a metric reading the first position gets the naive loop's values (a cut would leave it wrong)."""
    from arbiter.sweep import head_settings, sweep
    tm = _tiny("qwen2_audio")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        res = sweep(lens, inputs, head_settings(lens, [(0, 0), (1, 1)]), metric=lambda lg: lg[:, 0], chunk=1)
        naive = _naive_head_loop(lens, tm, inputs, res.settings, position=0)
    assert res.last_row == 0 and res.last_row_diff is None
    assert (res.values - naive).abs().max().item() <= 1e-5
    assert (res.values[0] - res.baseline).abs().max().item() > 0


def test_a_sweep_whose_budget_leaves_no_room_for_the_per_head_outputs_frees_them_and_runs_without_them():
    """A memory budget that holds the clean run and one setting, but not the per-head outputs recorded for the
    attention replay beside them: the sweep frees those, replays no attention, and still equals the naive loop (it
    used to run at this budget before the per-head outputs existed, so it must not refuse now)."""
    from arbiter.sweep import head_settings, sweep
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        settings = head_settings(lens, [(1, 0), (1, 1)])
        free = sweep(lens, inputs, settings, chunk=2, memory_budget=2**40, keep_clean=True)
        heads = sum(t.numel() * t.element_size() for t, _ in free.clean.heads.values())
        per_setting = free.clean_peak_bytes + sum(v.numel() * v.element_size() for v in inputs.values()
                                                  if isinstance(v, torch.Tensor))
        budget = free.clean_held_bytes + per_setting - heads // 2
        tight = sweep(lens, inputs, settings, chunk=2, memory_budget=budget)
        naive = _naive_head_loop(lens, tm, inputs, tight.settings)
    assert heads > 0 and free.attention_replayed == 1
    assert tight.attention_replayed == 0 and tight.chunk == 1 and tight.forwards == 2
    assert tight.clean_held_bytes == free.clean_held_bytes - heads
    assert (tight.values - naive).abs().max().item() <= 1e-5


def test_a_head_sweep_under_an_active_head_edit_on_its_layers_equals_the_loop_under_it():
    """A caller's amplification of head (1, 2) stays active around a sweep of layer-1 heads: the replayed attention
    is recorded before any edit at attn.head_out, so the amplification applies once in every chunk, as in a loop of
    plain forwards under it."""
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens, lens.amplify_heads([(1, 2)], alpha=3.0):
        res = head_sweep(lens, inputs, heads=[(1, 0), (1, 1)], chunk=2)
        naive = _naive_head_loop(lens, tm, inputs, res.settings)
    assert res.attention_replayed == 1
    assert (res.values - naive).abs().max().item() <= 1e-5


def test_a_sweep_refuses_a_probe_active_on_a_layer_it_would_replay_and_names_the_way_out():
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens, lens.record("resid.post", layers=[0]):
        with pytest.raises(arbiter.errors.InterventionError, match="reuse_prefix=False"):
            head_sweep(lens, inputs, heads=[(2, 0)], chunk=1)
        res = head_sweep(lens, inputs, heads=[(2, 0)], chunk=1, reuse_prefix=False)
    assert res.layers_skipped == 0 and res.attention_replayed == 0


def test_a_model_whose_layer_code_rejects_the_cut_rows_runs_its_last_layer_whole():
    """An MLP that checks its input's length (as some layers' own code does) raises on the cut row: the
    check reads that as a failed check (infinite difference), and the sweep runs the last layer whole, exactly."""
    tm = _tiny("llava")
    inputs = inputs_for(tm, n=2)
    seq = inputs["input_ids"].shape[1]

    def strict(mod, args):
        if args[0].shape[1] != seq:
            raise RuntimeError(f"expected {seq} positions, got {args[0].shape[1]}")
    with arbiter.attach(tm.model, tm.processor) as lens:
        h = lens.facts.layers[-1].mlp.register_forward_pre_hook(strict)
        try:
            res = head_sweep(lens, inputs, heads=[(0, 0), (1, 1)], chunk=1)
            naive = _naive_head_loop(lens, tm, inputs, res.settings)
        finally:
            h.remove()
    assert res.last_row == 0 and res.last_row_diff == float("inf")
    assert (res.values - naive).abs().max().item() <= 1e-5
