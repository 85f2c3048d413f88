"""AtP*'s GradDrop head ranking (``attribution_ranking(method="graddrop")``) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from helpers import _tiny

import arbiter
import arbiter.errors
from arbiter.data import generate_synthetic
from arbiter.experiments.common import batches, margin_from_logits
from arbiter.experiments.heads import HeadRanking, attribution_ranking
from arbiter.probes.base import Probe
from arbiter.testing.tiny import tiny


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn_gd"), 8, seed=0, image_size=64)


def test_graddrop_of_last_layer_heads_is_the_magnitude_of_atp(synth):
    """Dropping an earlier layer does not touch the path from a last-layer head to the logits, and the head's
    own layer is left out: every one of its L − 1 terms is |AtP|."""
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        at = attribution_ranking(lens, synth.samples, batch_size=8, dataset=synth)
        gd = attribution_ranking(lens, synth.samples, batch_size=8, dataset=synth, method="graddrop")
    assert gd.per_sample.shape == at.per_sample.shape
    last_gd, last_at = gd.per_sample[:, -1], at.per_sample[:, -1]
    assert torch.allclose(last_gd, last_at.abs(), rtol=0, atol=1e-6)
    assert last_at.abs().max() > 1e-3                         # not trivially zero


class _ScaleHead(Probe):
    """Multiplies one head's output in batch row r by ``s[r]`` (a leaf that requires grad, to differentiate)."""

    edits = {"attn.head_out": "all"}

    def __init__(self, layer: int, head: int, s: torch.Tensor):
        super().__init__()
        self.layers = [layer]
        self.head, self.s = head, s

    def attn_head_out(self, ctx, x):
        onehot = torch.zeros(x.shape[2], dtype=x.dtype)
        onehot[self.head] = 1.0
        scale = 1.0 + (self.s.to(x.dtype)[:, None] - 1.0) * onehot           # [rows, heads]
        return x * scale[:, None, :, None]


class _Hold(Probe):
    """Records ``attn.out`` and ``mlp.out`` of its layers on a clean run, then (``hold = True``) replaces them
    by the recorded clean tensors whatever the input: the layer's residual contribution is frozen."""

    edits = {"attn.out": "all", "mlp.out": "all"}

    def __init__(self, layers):
        super().__init__()
        self.layers = list(layers)
        self.clean: dict = {}
        self.hold = False

    def _site(self, ctx, x):
        key = (ctx.site, ctx.layer)
        if self.hold:
            return self.clean[key]
        self.clean[key] = x.detach().clone()
        return x

    attn_out = _site
    mlp_out = _site


def test_graddrop_of_a_first_layer_head_is_the_derivative_with_the_second_layer_frozen(synth):
    """2-layer model, float64: for a layer-0 head, GradDrop = |I_1| / (L − 1) with L = 2, where I_1 = dm/ds at
    s = 1 (s scales the head) with layer 1's attn.out and mlp.out replaced by their recorded clean values (so no
    gate is involved), by autograd on that frozen model. (Central differences are limited to ~1e-4 here: the
    Llama RMSNorm computes in float32 even in a float64 model.)"""
    tm = tiny("llava", layers=2)
    model = tm.model.double()
    with arbiter.attach(model, tm.processor) as lens:
        gd = attribution_ranking(lens, synth.samples, batch_size=8, dataset=synth, method="graddrop")
        at = attribution_ranking(lens, synth.samples, batch_size=8, dataset=synth)
        item = next(iter(batches(lens, [s for s in synth.samples if s.conflict], 8, synth)))
        assert item.size == gd.per_sample.shape[0]
        hold = _Hold([1])
        with lens.probe(hold):
            with torch.no_grad():
                model(**item.batch.inputs, use_cache=False)          # record layer 1's clean contributions
            hold.hold = True
            for head in range(4):
                s = torch.ones(item.size, dtype=torch.float64, requires_grad=True)   # one scale per sample
                with lens.probe(_ScaleHead(0, head, s)), torch.enable_grad():
                    logits = model(**item.batch.inputs, use_cache=False).logits[:, -1]
                    m = margin_from_logits(logits, item.ids_p, item.ids_c)
                    (i_1,) = torch.autograd.grad(m.sum(), [s])                   # rows independent: dm_r/ds_r
                assert torch.allclose(gd.per_sample[:, 0, head].double(), i_1.abs() / (2 - 1), rtol=0, atol=1e-6)
                # dropping layer 1 matters here: the frozen derivative is not the plain AtP
                assert (i_1 - at.per_sample[:, 0, head].double()).abs().max() > 1e-3
    assert gd.cost_forward_equivalents == 1 + 2 * 2


def test_graddrop_is_a_named_non_negative_ranking_and_unknown_methods_are_rejected(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(arbiter.errors.InterventionError, match="unknown"):
            attribution_ranking(lens, synth.samples, dataset=synth, method="atp*")
        gd = attribution_ranking(lens, synth.samples, batch_size=4, dataset=synth, method="graddrop")
    assert isinstance(gd, HeadRanking) and gd.method == "attribution-graddrop"
    assert gd.scores.shape == (4, 4)
    assert torch.isfinite(gd.scores).all() and (gd.scores >= 0).all() and gd.scores.max() > 0
    assert gd.cost_forward_equivalents == 1 + 2 * 4


def test_graddrop_gates_only_the_contributions_a_layer_has(synth):
    """A layer without an mlp.out site is dropped through its attn.out alone: no error, L still counts it, and
    last-layer heads still get exactly |AtP|."""
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        at = attribution_ranking(lens, synth.samples, batch_size=8, dataset=synth)
        full = attribution_ranking(lens, synth.samples, batch_size=8, dataset=synth, method="graddrop")
        saved = lens.facts.layers[2].mlp
        lens.facts.layers[2].mlp = None
        try:
            part = attribution_ranking(lens, synth.samples, batch_size=8, dataset=synth, method="graddrop")
        finally:
            lens.facts.layers[2].mlp = saved
    assert part.cost_forward_equivalents == full.cost_forward_equivalents == 1 + 2 * 4
    assert torch.allclose(part.per_sample[:, -1], at.per_sample[:, -1].abs(), rtol=0, atol=1e-6)
    # heads in layers >= 2 never go through layer 2's MLP gate; heads before it keep that path when 2 is dropped
    assert torch.equal(part.per_sample[:, 2:], full.per_sample[:, 2:])
    assert (part.per_sample[:, :2] - full.per_sample[:, :2]).abs().max() > 1e-4
