"""nnsight interop (issue #9 item 4): arbiter probes inside an nnsight trace, and nnsight-native head block /
amplify and residual patching (the remote-expressible parts) equal to arbiter's own interventions."""

from __future__ import annotations

import copy
import types

import pytest
import torch

pytest.importorskip("nnsight")

from helpers import _tiny, inputs_for
from nnsight import NNsight

import arbiter
from arbiter.interop.nnsight import (
    NnsightSites,
    amplify_heads_nnsight,
    attach_nnsight,
    block_heads_nnsight,
    nnsight_sites,
    patch_resid_nnsight,
    resolve,
)


@pytest.fixture(scope="module")
def setup():
    base = _tiny("llava")
    # a copy: nnsight instruments every module it wraps, keep the session-cached tiny model untouched
    tm = types.SimpleNamespace(model=copy.deepcopy(base.model), processor=base.processor)
    return tm, NNsight(tm.model), inputs_for(base, seed=0), inputs_for(base, seed=3)


def _plain(model, inp):
    with torch.no_grad():
        return model(**inp, use_cache=False).logits


def _nn_logits(nm, inp, edit=None):
    with torch.no_grad(), nm.trace(**inp, use_cache=False):
        if edit is not None:
            edit()
        out = nm.output.logits.save()
    return out


def _arbiter(tm, inp, make):
    with arbiter.attach(tm.model, tm.processor) as lens, make(lens), torch.no_grad():
        return tm.model(**inp, use_cache=False).logits


def test_sites_from_facts(setup):
    tm, nm, _, _ = setup
    with arbiter.attach(tm.model) as lens:
        sites = nnsight_sites(lens)
        assert nnsight_sites(lens.facts) == sites == nnsight_sites(nm) and nnsight_sites(sites) is sites
        assert isinstance(sites, NnsightSites) and len(sites.layers) == lens.facts.n_layers
        assert sites.heads[0] == (lens.facts.heads(0)[0], lens.facts.heads(0)[2])
        assert resolve(nm, sites.out_proj[0])._module is lens.facts.layers[0].out_proj


def test_arbiter_inside_nnsight_trace(setup):
    tm, nm, inp, _ = setup
    clean = _plain(tm.model, inp)
    ref = _arbiter(tm, inp, lambda lens: lens.block_heads([(0, 1)]))
    with attach_nnsight(nm, tm.processor) as lens:
        assert lens.model is tm.model
        with lens.block_heads([(0, 1)]):
            mixed = _nn_logits(nm, inp)
        with lens.record("resid.post", "attn.probs", layers=[1], rows="last") as rec, torch.no_grad():
            tm.model(**inp, use_cache=False)
        with lens.record("resid.post", "attn.probs", layers=[1], rows="last") as rec_nn:
            _nn_logits(nm, inp)
    assert (mixed - ref).abs().max() <= 1e-6
    assert (mixed - clean).abs().max() > 1e-4
    keys = set(rec.trace.keys())
    assert keys == set(rec_nn.trace.keys()) and keys
    for k in keys:
        assert torch.equal(rec.trace[k], rec_nn.trace[k]), k
    assert torch.equal(_plain(tm.model, inp), clean)        # detached: the model is clean again
    assert torch.equal(_nn_logits(nm, inp), clean)


@pytest.mark.parametrize("alpha", [0.0, 2.5])
def test_block_amplify_nnsight_native(setup, alpha):
    tm, nm, inp, _ = setup
    heads = [(1, 0), (0, 1), (0, 3)]
    sites = nnsight_sites(nm)
    if alpha == 0.0:
        ref = _arbiter(tm, inp, lambda lens: lens.block_heads(heads))
        got = _nn_logits(nm, inp, lambda: block_heads_nnsight(nm, sites, heads))
    else:
        ref = _arbiter(tm, inp, lambda lens: lens.amplify_heads(heads, alpha=alpha))
        got = _nn_logits(nm, inp, lambda: amplify_heads_nnsight(nm, sites, heads, alpha=alpha))
    assert (got - ref).abs().max() <= 1e-5
    assert (got - _plain(tm.model, inp)).abs().max() > 1e-4
    # rows: only the last position
    ref = _arbiter(tm, inp, lambda lens: lens.amplify_heads(heads, alpha=alpha, rows=[-1]))
    got = _nn_logits(nm, inp, lambda: block_heads_nnsight(nm, sites, heads, alpha=alpha, positions=[-1]))
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("site", ["resid.post", "resid.pre"])
def test_patch_resid_nnsight_native(setup, site):
    tm, nm, inp, other = setup
    sites = nnsight_sites(nm)
    layer = 1
    with torch.no_grad(), nm.trace(**other, use_cache=False):      # source: the other image's residual stream
        env = resolve(nm, sites.layers[layer])
        src = (env.input if site == "resid.pre" else env.output).save()
    assert src.shape[1] == inp["input_ids"].shape[1]
    clean = _plain(tm.model, inp)
    for rows, pos in (("all", None), ([-1, 2], [-1, 2])):
        ref = _arbiter(tm, inp, lambda lens, rows=rows: lens.patch_resid(layer, src, rows=rows, site=site))
        got = _nn_logits(nm, inp, lambda pos=pos: patch_resid_nnsight(nm, sites, layer, src, positions=pos,
                                                                   site=site))
        assert (got - ref).abs().max() <= 1e-5, rows
        assert (got - clean).abs().max() > 1e-4


def test_errors(setup):
    _, nm, _, _ = setup
    sites = nnsight_sites(nm)
    with pytest.raises(TypeError):
        attach_nnsight(object())
    with pytest.raises(ValueError):
        block_heads_nnsight(nm, sites, [(0, 99)])
    with pytest.raises(ValueError):
        block_heads_nnsight(nm, sites, [(0, 0)], alpha=[1.0, 2.0])
    with pytest.raises(ValueError):
        patch_resid_nnsight(nm, sites, 0, torch.zeros(1, 2, 3), site="attn.out")
