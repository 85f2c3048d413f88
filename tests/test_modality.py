"""Modality experiments on tiny models: Shapley values (efficiency, captum, null player, omni), key space, imbalance."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pytest
import torch
from helpers import _tiny

import arbiter
from arbiter.data import generate_synthetic
from arbiter.errors import DataError
from arbiter.experiments.modality import (
    coalitions,
    imbalance,
    keyspace,
    modality_shapley,
    modality_shapley_captum,
    neutral_sample,
    present_players,
)
from arbiter.metrics.shapley import preference_angle

PLAYERS = ("image", "context")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("modality"), 4, seed=0, image_size=64)


@pytest.fixture(scope="module")
def omni_samples(synth):
    tm = _tiny("qwen2_5_omni")
    # no template: the default user turn lets the chat template place the image and the audio
    return [dataclasses.replace(s, audio=tm.make_audio(i), template=None) for i, s in enumerate(synth.samples[:2])]


def _direct_logprob(lens, sample, dataset, knocked=()):
    """log P(D_p) at the last position of one unbatched forward, with the given groups knocked out to all."""
    from arbiter.experiments.common import answer_ids

    batch = lens.encode([sample], dataset=dataset)
    with contextlib.ExitStack() as stack:
        for g in knocked:
            stack.enter_context(lens.knockout(g, "all", allow_empty=True))
        with torch.no_grad():
            z = lens.model(**batch.inputs).logits[0, -1].double()
    ids_p, _ = answer_ids(lens, sample)
    return float(torch.logsumexp(torch.log_softmax(z, -1)[ids_p], -1))


# ----------------------------------------------------------------------------------------------- Shapley


def test_coalition_order_is_the_bitmask_of_players():
    c = coalitions(["image", "context"])
    assert c == [frozenset(), frozenset({"image"}), frozenset({"context"}), frozenset({"image", "context"})]


def test_shapley_efficiency_against_direct_forwards(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = modality_shapley(lens, synth.samples, players=PLAYERS, removal="knockout", dataset=synth)
        full = [_direct_logprob(lens, s, synth) for s in synth.samples]
        empty = [_direct_logprob(lens, s, synth, knocked=PLAYERS) for s in synth.samples]
    assert r.phi.shape == (4, 2) and r.coalition_values.shape == (4, 4)
    assert torch.allclose(r.v_full, torch.tensor(full, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(r.v_empty, torch.tensor(empty, dtype=torch.float64), atol=1e-5)
    # efficiency: sum phi = v(all) - v(none), against the unbatched forwards
    assert torch.allclose(r.phi.sum(1), torch.tensor(full).double() - torch.tensor(empty).double(), atol=1e-5)
    assert r.efficiency_gap < 1e-12


def test_knockout_and_neutral_removals_both_run_and_share_the_full_coalition(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        ko = modality_shapley(lens, synth.samples, players=PLAYERS, removal="knockout", dataset=synth)
        ne = modality_shapley(lens, synth.samples, players=PLAYERS, removal="neutral", dataset=synth)
    for r in (ko, ne):
        assert torch.isfinite(r.phi).all() and r.present.all()
    # all players present = the unmodified sample under both removals
    assert torch.allclose(ko.v_full, ne.v_full, atol=1e-5)
    # removing means different things: knocked-out tokens vs black image + empty context
    assert (ko.v_empty - ne.v_empty).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("removal", ["knockout", "neutral"])
def test_batched_shapley_agrees_with_captum_shapley_values(synth, removal):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = modality_shapley(lens, synth.samples, players=PLAYERS, removal=removal, dataset=synth, batch_size=4)
        ref = modality_shapley_captum(lens, synth.samples, players=PLAYERS, removal=removal, dataset=synth)
    assert ref.shape == r.phi.shape
    assert (ref - r.phi).abs().max().item() <= 1e-5
    assert r.phi.abs().max().item() > 1e-4  # not a trivially zero game


def test_image_knocked_out_everywhere_is_a_null_player(synth):
    """With the image already cut off in every layer for every row, adding or removing it changes nothing:
    phi(image) is exactly 0, and phi(context) = v(all) - v(none)."""
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens, lens.knockout("image", "all"):
        r = modality_shapley(lens, synth.samples, players=PLAYERS, removal="knockout", dataset=synth)
    assert torch.equal(r["image"], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(r.coalition_values[:, 1], r.coalition_values[:, 0])   # {image} == {}
    assert torch.allclose(r["context"], r.v_full - r.v_empty, atol=1e-12)
    # ratio angle with phi(X) = 0: +-90 by the sign of phi(Y) (a negative phi counts as |phi| toward -90)
    assert r.angle == 90.0 * math.copysign(1.0, float(r["context"].mean()))


def test_accuracy_value_is_binary_and_matches_argmax(synth):
    from arbiter.experiments.common import answer_ids

    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = modality_shapley(lens, synth.samples, players=PLAYERS, value="accuracy", dataset=synth)
        direct = []
        for s in synth.samples:
            b = lens.encode([s], dataset=synth)
            with torch.no_grad():
                top = int(tm.model(**b.inputs).logits[0, -1].argmax())
            direct.append(float(top in answer_ids(lens, s)[0]))
    assert set(r.coalition_values.flatten().tolist()) <= {0.0, 1.0}
    assert r.v_full.tolist() == direct
    assert r.phi.sum(1).tolist() == pytest.approx((r.v_full - r.v_empty).tolist(), abs=1e-12)


def test_angle_and_json(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = modality_shapley(lens, synth.samples, players=PLAYERS, dataset=synth, angle_how="atan2")
    m = r.phi.mean(0)
    assert r.angle_players == ("image", "context")
    assert r.angle == pytest.approx(preference_angle(float(m[0]), float(m[1]), "atan2"), nan_ok=True)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["players"] == ["image", "context"] and len(d["phi"]) == 4 and len(d["coalition_values"][0]) == 4
    assert d["coalitions"] == [[], ["image"], ["context"], ["image", "context"]]
    assert d["mean"]["image"] == pytest.approx(float(m[0]))


def test_bad_players_are_rejected(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(DataError, match="neutral"):
            modality_shapley(lens, synth.samples, players=("image", "last"), removal="neutral", dataset=synth)
        with pytest.raises(DataError, match="n <= 4"):
            modality_shapley(lens, synth.samples, players=("image", "context", "instruction", "question", "system"))


def test_neutral_sample_keeps_size_and_length():
    tm = _tiny("qwen2_5_omni")
    from arbiter.data import ConflictSample

    s = ConflictSample("x", "ctx", "instr", "q?", "vision", "red", "blue", image=tm.make_image(0),
                       audio=tm.make_audio(0))
    n = neutral_sample(s, ["image", "audio", "context"])
    assert n.image.size == s.image.size and max(n.image.getdata()) == (0, 0, 0)
    assert n.audio.shape == s.audio.shape and not n.audio.any()
    assert n.context == "" and n.question == "q?" and s.context == "ctx"


@pytest.mark.slow
@pytest.mark.parametrize("removal", ["knockout", "neutral"])
def test_omni_image_audio_context(omni_samples, removal):
    tm = _tiny("qwen2_5_omni")
    assert present_players(omni_samples) == ["image", "audio", "context"]
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = modality_shapley(lens, omni_samples, removal=removal)
        ref = modality_shapley_captum(lens, omni_samples[:1], players=r.players, removal=removal)
    assert r.players == ["image", "audio", "context"]
    assert r.coalition_values.shape == (2, 8) and r.present.all()
    assert torch.allclose(r.phi.sum(1), r.v_full - r.v_empty, atol=1e-12)
    assert r["audio"].abs().max() > 1e-4          # the audio reaches the answer
    assert (ref[0] - r.phi[0]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------- key space


@pytest.mark.parametrize("keys", ["pre_rope", "post_rope"])
def test_keyspace_finite_per_layer_and_image_differs_from_text(synth, keys):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        k = keyspace(lens, synth.samples, keys=keys, dataset=synth, n_permutations=20)
        n_text = int(lens.encode(synth.samples, dataset=synth).groups["text"].sum())
    assert k.layers == [0, 1, 2, 3]
    for arr in (k.mmd, k.intra_a, k.intra_b, k.p_value, k.jsd):
        assert arr.shape == (4,) and all(math.isfinite(x) for x in arr)
    assert all(k.n_a[l] == 4 * tm.image_tokens_per_image and k.n_b[l] == n_text for l in k.layers)
    assert (k.mmd > 3 * max(k.intra_a.max(), k.intra_b.max())).all()
    assert (k.p_value == pytest.approx(1 / 21))
    json.dumps(k.to_dict())


def _text_half(parity):
    def half(groups):
        r = torch.rand(groups.batch_size, groups.length, generator=torch.Generator().manual_seed(7)) < 0.5
        return groups["text"] & (r if parity else ~r)
    half.__name__ = f"text{parity}"
    return half


def test_keyspace_of_one_modality_split_in_two_is_at_the_intra_baseline(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        k = keyspace(lens, synth.samples, modalities=(_text_half(0), _text_half(1)), keys="post_rope",
                     dataset=synth, n_permutations=50)
    assert k.modalities == ("text0", "text1")
    assert (k.mmd <= 2 * k.intra_a + 0.01).all() and (k.mmd <= 2 * k.intra_b + 0.01).all()
    assert (k.p_value > 0.05).all()


def test_keyspace_single_kv_head(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        k = keyspace(lens, synth.samples, keys="post_rope", kv_head=1, dataset=synth, n_permutations=0,
                     layers=[0, 2])
    assert k.layers == [0, 2] and k.kv_head == 1
    assert all(math.isnan(p) for p in k.p_value) and all(math.isfinite(x) for x in k.mmd)


# ----------------------------------------------------------------------------------------------- imbalance


def test_imbalance_matches_manual_computation_for_one_layer_and_head(synth):
    tm = _tiny("llava")
    layer, head = 1, 2
    with arbiter.attach(tm.model, tm.processor) as lens:
        res = imbalance(lens, synth.samples[:2], dataset=synth, batch_size=2)  # padded batch of two
        b = lens.encode([synth.samples[0]], dataset=synth)                   # the first sample alone, no padding
        with torch.no_grad(), lens.record("attn.probs", layers=[layer], rows="last") as rp, \
                lens.record("attn.v", layers=[layer]) as rv:
            tm.model(**b.inputs)
        nh, nkv, hd = lens.facts.heads(layer)
        W = lens.facts.layers[layer].out_proj.weight.detach().double()[:, head * hd:(head + 1) * hd]
    alpha = rp.trace[f"L{layer}.attn.probs"][0, head, 0].double()        # [keys]
    v = rv.trace[f"L{layer}.attn.v"][0, head // (nh // nkv)].double()   # [keys, hd]

    def norm(mask):
        return torch.linalg.vector_norm(W @ (alpha[mask] @ v[mask]))
    img, ctx = b.groups["image"][0], b.groups["context"][0]
    manual = math.log(norm(img) / norm(ctx))
    assert res.layers == [0, 1, 2, 3] and res.heat.shape == (4, 4)
    assert res.result.per_sample[0, layer, head].item() == pytest.approx(manual, abs=1e-4)
    assert res.result.mass_1.shape == (4, 4)
    assert res.scalar == pytest.approx(float(res.heat.abs().mean()))


def test_imbalance_batches_combine_exactly(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        one = imbalance(lens, synth.samples, dataset=synth, batch_size=4, modalities=("image", "text"))
        two = imbalance(lens, synth.samples, dataset=synth, batch_size=1, modalities=("image", "text"))
    assert one.sample_ids == two.sample_ids == [s.id for s in synth.samples]
    assert torch.allclose(one.result.per_sample, two.result.per_sample, atol=1e-4)
    assert torch.allclose(one.result.mass_1, two.result.mass_1, atol=1e-5)
    json.dumps(one.to_dict())


def test_plots_write_png(synth, tmp_path):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        k = keyspace(lens, synth.samples, keys="post_rope", dataset=synth, n_permutations=0, layers=[0])
        im = imbalance(lens, synth.samples, dataset=synth)
    k.plot(path=tmp_path / "ks.png")
    im.plot(path=tmp_path / "im.png")
    assert (tmp_path / "ks.png").stat().st_size > 1000 and (tmp_path / "im.png").stat().st_size > 1000
