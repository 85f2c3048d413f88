"""The examples run and their numbers are right: checked against direct computations from recorded traces."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

import arbiter
from arbiter.testing import tiny

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"arbiter_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=None)
def _run(name: str):
    mod = _load(name)
    return mod, mod.main()


def _share(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """probs [batch, heads, keys], mask [batch, keys] -> [batch, heads] mass on the masked keys."""
    return (probs * mask[:, None, :].to(probs.dtype)).sum(-1)


# ---------------------------------------------------------------------------------------------- 01 reading probe


def test_reading_probe_gives_shares_per_layer_batch_and_head():
    _, out = _run("01_reading_probe")
    shares = out["shares"]
    assert out["shape"] == tuple(shares.shape) == (4, 2, 4)       # [layers, batch, heads] of tiny llava
    assert ((shares >= 0) & (shares <= 1)).all()
    assert all(n > 0 for n in out["instruction_tokens"])          # the instruction was found in both prompts
    assert (shares > 0).all()
    assert out["mean_per_layer"] == pytest.approx(shares.mean(dim=(1, 2)).tolist())


def test_reading_probe_equals_a_direct_computation_from_a_recorded_trace():
    mod, out = _run("01_reading_probe")
    tm = tiny("llava")                                              # same seed -> same weights
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode(mod.make_samples(tm))
        with lens.record("attn.probs", rows="last") as rec, torch.no_grad():
            tm.model(**batch.inputs)
    instruction = batch.groups["instruction"]
    direct = torch.stack([_share(rec.trace[f"L{layer}.attn.probs"][:, :, 0], instruction)
                          for layer in rec.trace.layers("attn.probs")])
    assert direct.shape == out["shares"].shape
    assert torch.allclose(out["shares"], direct, atol=1e-6)
    # and the probe sees exactly the last-token row
    assert rec.trace["rows.attn.probs"].tolist() == [batch.inputs["input_ids"].shape[1] - 1]


# ---------------------------------------------------------------------------------------------- 02 editing probe


def test_editing_probe_keeps_rows_normalised_and_moves_the_expected_mass():
    _, out = _run("02_editing_probe")
    f = out["fraction"]
    assert out["row_sum_max_error"] <= 1e-5
    before, after = out["image_share_before"], out["image_share_after"]
    ctx_before, ctx_after = out["context_share_before"], out["context_share_after"]
    assert (ctx_before > 0).all()
    # first edited layer: nothing upstream changed, so the recorded shares move by exactly f * context share
    assert torch.allclose(after - before, f * ctx_before, atol=1e-6)
    assert torch.allclose(ctx_after, (1 - f) * ctx_before, atol=1e-6)
    assert (after > before).all()
    assert out["image_share_gain"] == pytest.approx(out["expected_gain"], abs=1e-6)
    assert out["image_share_gain"] > 0.01


def test_editing_probe_changes_the_last_token_logits():
    _, out = _run("02_editing_probe")
    assert out["logit_change"] > 1e-4


def test_editing_probe_own_log_agrees_with_the_recorder_and_spares_other_heads():
    _, out = _run("02_editing_probe")
    f = out["fraction"]
    log = out["probe_shares"]          # [edited layers, (before, after), batch, heads, (image, context, sum)]
    layers = sorted({layer for layer, _ in out["heads"]})
    assert log.shape[:2] == (len(layers), 2)
    for i, layer in enumerate(layers):
        chosen = [h for lay, h in out["heads"] if lay == layer]
        others = [h for h in range(log.shape[3]) if h not in chosen]
        b, a = log[i, 0], log[i, 1]
        assert torch.allclose(a[..., 2], torch.ones_like(a[..., 2]), atol=1e-5)        # rows sum to 1
        assert torch.allclose(a[:, chosen, 0], b[:, chosen, 0] + f * b[:, chosen, 1], atol=1e-6)
        assert torch.allclose(a[:, chosen, 1], (1 - f) * b[:, chosen, 1], atol=1e-6)
        assert torch.equal(a[:, others], b[:, others])
    # what the probe saw before editing the first layer is what the plain recording saw
    first = layers.index(out["first_layer"])
    heads = [h for lay, h in out["heads"] if lay == out["first_layer"]]
    assert torch.allclose(log[first, 0][:, heads, 0], out["image_share_before"], atol=1e-6)
    assert torch.allclose(log[first, 1][:, heads, 0], out["image_share_after"], atol=1e-6)


def test_editing_probe_checks_its_heads_on_activation():
    mod = _load("02_editing_probe")
    tm = tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(arbiter.SiteError, match="out of range"):
            with lens.probe(mod.RedirectToImage([(1, 9)])):
                pass


# ---------------------------------------------------------------------------------------------- 03 generate probe


def test_generate_probe_sees_each_decode_step_at_its_position():
    _, out = _run("03_generate_probe")
    n = out["max_new_tokens"] - 1                                  # decode forwards after the prefill
    p = out["prompt_len"]
    assert out["steps"] == list(range(1, n + 1))
    assert out["positions"] == [[p + s - 1] for s in range(1, n + 1)]
    assert out["layers"] == [0, 1, 2, 3]
    assert tuple(out["image_share"].shape) == (n, 4, 2, 4)       # [steps, layers, batch, heads]


def test_decode_only_knockout_zeroes_image_attention_of_new_tokens_in_its_layers_only():
    _, out = _run("03_generate_probe")
    ko, plain = out["image_share"], out["image_share_plain"]
    for share in (ko, plain):
        assert ((share >= 0) & (share <= 1)).all()
    knocked = out["knockout_layers"]
    free = [layer for layer in out["layers"] if layer not in knocked]
    assert ko[:, knocked].abs().max().item() == 0.0
    assert (ko[:, free] > 0.01).all()
    assert (plain > 0.01).all()
    # first decode step: same token, same cache -> layers below the knockout agree with the plain run
    assert torch.allclose(ko[0, free], plain[0, free], atol=1e-6)
    # the prefill is untouched, so the first new token is the same; later logits do move
    assert out["prefill_logit_change"] == 0.0
    assert [t[0] for t in out["new_tokens"]] == [t[0] for t in out["new_tokens_plain"]]
    assert out["last_step_logit_change"] > 1e-4


def test_generate_probe_shares_equal_a_no_cache_replay_of_the_generated_text():
    """Image share of each new token during cached generation == that row of one forward over the whole text."""
    mod, out = _run("03_generate_probe")
    p, n = out["prompt_len"], out["max_new_tokens"] - 1
    tm = tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode(mod.make_samples(tm))
        inputs = dict(batch.inputs)
        new = torch.tensor(out["new_tokens_plain"])[:, :n]                   # tokens fed at decode steps 1..n
        inputs["input_ids"] = torch.cat([inputs["input_ids"], new], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)
        groups = arbiter.TokenGroups.from_input_ids(batch.inputs["input_ids"], batch.inputs["attention_mask"],
                                                    lens.facts.modality_token_ids)
        groups.extend(n)
        lens.use(groups)
        rows = list(range(p, p + n))
        with lens.record("attn.probs", rows=rows) as rec, torch.no_grad():
            tm.model(**inputs, use_cache=False)
    assert rec.trace["rows.attn.probs"].tolist() == rows
    image = groups["image"]
    direct = torch.stack([torch.stack([_share(rec.trace[f"L{layer}.attn.probs"][:, :, r], image)
                                       for layer in range(4)]) for r in range(n)])      # [steps, layers, b, h]
    assert torch.allclose(out["image_share_plain"], direct, atol=1e-5)


# ---------------------------------------------------------------------------------------------- 04 arbitration


@pytest.fixture(scope="module")
def arbitration(tmp_path_factory):
    return _load("04_arbitration").main(tmp_path_factory.mktemp("ex4"))


@pytest.mark.slow
def test_arbitration_example_finds_the_image_to_last_route_of_the_organism(arbitration):
    """llava_tiny reads the image at the last token around layer 3 (organisms README): the strongest knockout."""
    entries = arbitration["knockout"].entries
    assert len(entries) == 13 * 6
    worst = min((e for e in entries if e["nssd"] is not None), key=lambda e: e["nssd"])
    assert (worst["src"], worst["dst"], worst["center"]) == ("image", "last", 3) and worst["nssd"] < -0.1
    assert arbitration["baseline"].mfr_pi()["overall"] > 0.9


@pytest.mark.slow   # shares the module fixture that runs the whole example (16 s)
def test_arbitration_example_agreement_is_the_spearman_of_its_two_score_tables(arbitration):
    from scipy.stats import spearmanr

    ex, gd = arbitration["exhaustive"], arbitration["graddrop"]
    want = spearmanr(ex.scores.flatten().numpy(), gd.scores.flatten().numpy())[0]
    assert arbitration["agreement"]["spearman"] == pytest.approx(want, abs=1e-9)
    blocked = arbitration["blocked"]
    assert blocked.summary["exhaustive"]["topg_heads"] == [list(h) for h in ex.top()]
    assert blocked.summary["exhaustive"]["captured"] == pytest.approx(1.0)
    assert blocked.n_samples == sum(arbitration["baseline"].correct)


@pytest.mark.slow   # shares the module fixture that runs the whole example (16 s)
def test_arbitration_example_writes_json_and_plots(arbitration):
    import json

    out = arbitration["out"]
    res = json.loads((out / "results.json").read_text())
    assert res["exhaustive"]["ranking"][0]["layer"] == arbitration["exhaustive"].ranking()[0]["layer"]
    for name in ("mam_ldar", "knockout_map", "heads", "blocked"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
