"""Kosmos-2 and GIT through the generic path plus their adapters: the image group read off the model's own inputs
(Kosmos-2's image_embeds_position_mask, GIT's prepended image positions), GIT's inline attention served through
stand-ins (put back on exit), the model facts the logit lens needs, generate() under interventions, encode(), and
the clear error where attention is not routed."""

from __future__ import annotations

import pytest
import torch

import arbiter
from arbiter.data import ConflictSample
from arbiter.errors import SiteError

from helpers import _tiny, inputs_for, logits


class SeenGroups(arbiter.Probe):
    """Keeps the token groups the lens ran the forward with."""

    reads = {"resid.post": "all"}
    layers = [0]

    def __init__(self):
        super().__init__()
        self.groups = None

    def resid_post(self, ctx, v):
        self.groups = ctx.groups


def _image_changes(tm, a, b):
    """[batch, positions] where the residual entering layer 0 differs between inputs a and b (other pixels): where
    the model itself writes the image, read off its computation, independently of arbiter's groups."""
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.record("embed") as ra, torch.no_grad():
            tm.model(**a)
        with lens.record("embed") as rb, lens.probe(SeenGroups()) as seen, torch.no_grad():
            tm.model(**b)
    return (ra.trace["embed"] - rb.trace["embed"]).abs().amax(-1) > 0, seen.groups


def test_kosmos2_image_group_is_the_processors_image_embeds_position_mask():
    tm = _tiny("kosmos2")
    a, b = inputs_for(tm, n=2, seed=0), inputs_for(tm, n=2, seed=5)
    mask = a["image_embeds_position_mask"].bool()
    assert torch.equal(mask, b["image_embeds_position_mask"].bool())
    assert (mask.sum(1) == tm.image_tokens_per_image).all()
    changed, g = _image_changes(tm, a, b)
    assert torch.equal(changed, mask)            # the model writes the image exactly there
    assert torch.equal(g["image"], mask)
    assert torch.equal(g["text"], a["attention_mask"].bool() & ~mask)
    assert torch.equal(g["pad"], ~a["attention_mask"].bool())


def test_git_image_group_is_the_prefix_the_model_prepends():
    tm = _tiny("git")
    a, b = inputs_for(tm, n=2, seed=0), inputs_for(tm, n=2, seed=5)
    ids, am = a["input_ids"], a["attention_mask"].bool()
    with torch.no_grad():
        n = tm.model(**a).logits.shape[1] - ids.shape[1]   # positions the model runs before the ids
    assert n == tm.image_tokens_per_image > 0
    changed, g = _image_changes(tm, a, b)
    assert changed.shape == (2, n + ids.shape[1])
    assert changed[:, :n].all() and not changed[:, n:].any()
    assert torch.equal(g["image"], changed)
    real = torch.cat([torch.ones(2, n, dtype=torch.bool), am], dim=1)
    assert torch.equal(g["text"], real & ~changed) and torch.equal(g["pad"], ~real)
    assert g.positions("last", 0) == [n + ids.shape[1] - 1] == g.positions("last", 1)  # left padding


def test_git_attention_is_routed_while_attached_and_put_back_after_an_exception():
    tm = _tiny("git")
    block = tm.model.git.encoder.layer[0].attention
    original = block.self
    inputs = inputs_for(tm)
    ref = logits(tm.model, inputs)
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tm.model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with arbiter.attach(tm.model, tm.processor) as lens, lens.knockout("image", "text"):
            stand_in = block.self
            assert stand_in is not original and isinstance(stand_in, type(original))
            assert stand_in.query is original.query and stand_in.training is original.training
            assert lens.facts.layers[0].attn is original
            assert not torch.equal(logits(tm.model, inputs), ref)   # the knockout reaches GIT's attention
            raise RuntimeError("boom")
    assert block.self is original and type(original).__name__ == "GitSelfAttention"
    assert tm.model.config._attn_implementation == "eager"
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tm.model.modules()) == n_hooks
    assert torch.equal(logits(tm.model, inputs), ref)


@pytest.mark.parametrize("family", ["kosmos2", "git"])
def test_final_norm_and_unembedding_reproduce_the_logits(family):
    """The facts the logit lens uses: Kosmos-2's final norm is the inner transformer's layer_norm; GIT (post-LN) has
    none. Kosmos-2's resid.mid (input of its pre-MLP norm final_layer_norm) is resid.pre + attn.out."""
    tm = _tiny(family)
    inputs = inputs_for(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        last = lens.facts.n_layers - 1
        sites = ("resid.pre", "resid.mid", "attn.out", "resid.post") if family == "kosmos2" else ("resid.post",)
        with lens.record(*sites, layers=[last]) as rec:
            out = logits(tm.model, inputs)
    f = lens.facts
    assert (f.final_norm is None) == (family == "git")
    h = rec.trace[f"L{last}.resid.post"]
    with torch.no_grad():
        z = f.lm_head(f.final_norm(h) if f.final_norm is not None else h)
    assert (z - out).abs().max().item() <= 1e-5
    if family == "kosmos2":
        mid = rec.trace[f"L{last}.resid.pre"] + rec.trace[f"L{last}.attn.out"]
        assert torch.equal(rec.trace[f"L{last}.resid.mid"], mid)


@pytest.mark.parametrize("kind", ["knockout", "amplify"])
@pytest.mark.parametrize("family", ["kosmos2", "git"])
def test_generate_under_interventions_equals_uncached_forward_unpadded(family, kind):
    """test_interventions.py skips these families for a left-padded batch (the models' own cached and uncached
    positions differ there); on an unpadded prompt generate() under an intervention equals the uncached forward."""
    tm = _tiny(family)
    inputs = inputs_for(tm)
    n_new = 4

    def make(lens):
        if kind == "knockout":
            return lens.knockout("image", "last|generated", layers=lens.window(1, 3))
        return lens.amplify_heads([(lens.facts.attention_layers[-1], 1)], alpha=3.0)

    with arbiter.attach(tm.model, tm.processor) as lens:
        with make(lens), torch.no_grad():
            gen = tm.model.generate(**inputs, max_new_tokens=n_new, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        seq, steps = gen.sequences, torch.stack(gen.logits, dim=1)
        p = inputs["input_ids"].shape[1]
        full = dict(inputs, input_ids=seq, attention_mask=torch.ones_like(seq))
        if "image_embeds_position_mask" in full:
            full["image_embeds_position_mask"] = torch.cat(
                [inputs["image_embeds_position_mask"], torch.zeros(1, seq.shape[1] - p, dtype=torch.long)], dim=1)
        groups = arbiter.TokenGroups.from_input_ids(inputs["input_ids"], inputs["attention_mask"])
        groups.extend(seq.shape[1] - p)
        lens.use(groups)   # over the ids: the lens maps them onto the model's sequence
        with make(lens), torch.no_grad():
            out = tm.model(**full, use_cache=False).logits
    replay = out[:, out.shape[1] - seq.shape[1] + p - 1:-1]
    assert steps.shape == replay.shape
    assert (steps - replay).abs().max().item() <= 1e-4 * max(1.0, replay.abs().max().item())


def _samples(tm, n=2):
    return [ConflictSample(id=f"s{i}", context="The circle is red.", question="What colour is the circle?" + " ok" * i,
                           instruction="You must rely on the image content rather than the text context.",
                           target="vision", answer_vision="blue", answer_text="red", image=tm.make_image(i))
            for i in range(n)]


def test_git_encoded_left_padded_batch_equals_each_sample_alone():
    """encode() pads on the left; GIT counts its learned positions from the first column, so the adapter passes
    position ids counted over the mask (as GIT's generate() does) and a padded sample computes as it would alone."""
    tm = _tiny("git")
    samples = _samples(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode(samples)
        assert not bool(batch.inputs["attention_mask"].all()) and "position_ids" in batch.inputs
        both = logits(tm.model, batch.inputs)[:, -1]
        for i, s in enumerate(samples):
            one = lens.encode([s])
            assert "position_ids" not in one.inputs
            assert (logits(tm.model, one.inputs)[0, -1] - both[i]).abs().max().item() <= 1e-5
    n = tm.image_tokens_per_image
    assert batch.groups.length == n + batch.inputs["input_ids"].shape[1]
    assert batch.groups["image"][:, :n].all() and not batch.groups["image"][:, n:].any()


def test_git_attention_sites_are_refused_where_its_attention_is_not_routed(monkeypatch):
    """Without the adapter's stand-ins GIT computes attention inline, out of the router's sight: attention-level
    sites and knockouts are refused at activation with a clear error (never a silent no-op); head and residual sites,
    which need no routing, still work."""
    from arbiter.adapters.git import GitAdapter

    monkeypatch.setattr(GitAdapter, "attention_stand_ins", lambda self, facts: {})
    tm = _tiny("git")
    inputs = inputs_for(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(SiteError, match="computes attention inline.*attention_stand_ins"):
            with lens.knockout("image", "text"):
                pass
        with pytest.raises(SiteError, match="AttentionInterface"):
            with lens.record("attn.probs", layers=[1]):
                pass
        with lens.record("attn.head_out", "resid.post") as rec, torch.no_grad():
            tm.model(**inputs)
    assert "L0.attn.head_out" in rec.trace.keys()


def test_git_has_no_resid_mid_and_says_so():
    """GIT's layers are post-LN (BERT-style): no pre-MLP norm, so resid.mid does not exist."""
    tm = _tiny("git")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(SiteError, match="resid.mid"):
            with lens.record("resid.mid", layers=[0]):
                pass
