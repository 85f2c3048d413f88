"""Arbitration experiments: batched knockout map == loop, pipeline glue vs direct computation, diagnose/CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from helpers import FAMILIES, MULTIMODAL, _tiny

import arbiter
import arbiter.errors
import arbiter.report
from arbiter.data import ConflictDataset, ConflictSample, generate_synthetic
from arbiter.experiments.baseline import evaluate
from arbiter.experiments.common import batches, pi_from_logits
from arbiter.experiments.diagnose import diagnose
from arbiter.experiments.heads import (
    attribution_ranking,
    compare_rankings,
    dla_ranking,
    exhaustive_ranking,
)
from arbiter.experiments.knockout_map import knockout_map
from arbiter.metrics import i_nssd


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn"), 8, seed=0, image_size=64)


def test_knockout_map_equals_loop_of_single_knockouts(synth):
    tm = _tiny("llava")
    edges = [("image", "instruction"), ("context", "last"), ("image", "system")]
    with arbiter.attach(tm.model, tm.processor) as lens:
        km = knockout_map(lens, synth.samples, edges=edges, window=3, batch_size=4, dataset=synth)
        pis, pis_ko = [], {i: [] for i in range(len(km.entries))}
        for item in batches(lens, [s for s in synth.samples if s.conflict], 4, synth):
            with torch.no_grad():
                pis.append(pi_from_logits(tm.model(**item.batch.inputs).logits[:, -1], item.ids_p, item.ids_c))
            for i, e in enumerate(km.entries):
                with lens.knockout(e["src"], e["dst"], layers=e["layers"], allow_empty=True), torch.no_grad():
                    lg = tm.model(**item.batch.inputs).logits[:, -1]
                pis_ko[i].append(pi_from_logits(lg, item.ids_p, item.ids_c))
    pi = torch.cat(pis)
    for i, e in enumerate(km.entries):
        loop = i_nssd(pi, torch.cat(pis_ko[i])).value
        assert abs(e["nssd"] - loop) <= 1e-5
    system = [e for e in km.entries if e["dst"] == "system"]
    assert system and all(e["nssd"] == 0.0 and not e["edge_present"] for e in system)  # absent edge: exact no-op


def test_knockout_map_of_edges_absent_everywhere_is_exactly_zero_without_running_them(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        km = knockout_map(lens, synth.samples, edges=[("image", "system")], window=3, batch_size=4, dataset=synth)
        base = evaluate(lens, [s for s in synth.samples if s.conflict], 4, synth, generate=False)
    assert all(e["nssd"] == 0.0 and not e["edge_present"] for e in km.entries)
    assert all(abs(e["pi"] - float(base.pi.mean())) < 1e-6 for e in km.entries)


def test_baseline_pi_and_final_mam_equal_direct_computation(synth):
    tm = _tiny("qwen2_vl")
    with arbiter.attach(tm.model, tm.processor) as lens:
        res = evaluate(lens, synth.samples, batch_size=4, dataset=synth, generate=False)
        direct_pi, direct_m = [], []
        for item in batches(lens, [s for s in synth.samples if s.conflict], 4, synth):
            with torch.no_grad():
                lg = tm.model(**item.batch.inputs).logits[:, -1]
            for i in range(item.size):
                p, c = item.ids_p[i], item.ids_c[i]
                prob = lg[i].softmax(-1)
                direct_pi.append(float(prob[p].sum() / (prob[p].sum() + prob[c].sum())))
                direct_m.append(float(lg[i, p].mean() - lg[i, c].mean()))
    assert torch.allclose(res.pi, torch.tensor(direct_pi), atol=1e-5)
    # logit lens of the last layer's output = the model's own logits (final norm + unembedding)
    assert torch.allclose(res.mam_last[:, -1], torch.tensor(direct_m), atol=1e-4)
    assert len(res.ldar_rate) == lens.facts.n_layers
    # resid.pre of layer l is resid.post of layer l-1: the attention + MLP split adds up to the layer's change
    change = res.mam_last[:, 1:] - res.mam_last[:, :-1]
    assert torch.allclose((res.mam_attn + res.mam_mlp)[:, 1:], change, atol=1e-4)


def test_head_rankings_have_one_score_per_head_and_report_agreement(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        ex = exhaustive_ranking(lens, synth.samples, batch_size=4, dataset=synth)
        at = attribution_ranking(lens, synth.samples, batch_size=4, dataset=synth)
        dl = dla_ranking(lens, synth.samples, batch_size=4, dataset=synth)
    for r in (ex, at, dl):
        assert r.scores.shape == (4, 4) and torch.isfinite(r.scores).all()
        assert len(r.ranking()) == 16
    cmp = compare_rankings(ex, at)
    assert -1.0 <= cmp["spearman"] <= 1.0 and cmp["k"] == 1


def test_attribution_of_last_layer_heads_tracks_exact_effect(synth):
    """Last-layer heads reach the logits only through the final norm: first order is close to exact there."""
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        ex = exhaustive_ranking(lens, synth.samples, batch_size=8, dataset=synth)
        at = attribution_ranking(lens, synth.samples, batch_size=8, dataset=synth)
    a, b = ex.scores[-1], at.scores[-1]
    assert (a - b).abs().max().item() <= 0.25 * a.abs().max().item() + 1e-4


@pytest.mark.slow
def test_attribution_is_the_total_derivative_through_later_attention(synth):
    """AtP of a layer-0 head = the directional derivative of m along a -> (1 ± eps) a, measured by central
    differences: the gradient must flow through every later layer (attention included), not stop at the next
    head output (a detached leaf per layer gets −0.0020 where the derivative is −0.0296)."""
    tm = _tiny("llava")
    model = copy.deepcopy(tm.model).double()  # the cached model stays as it is for other tests
    eps = 1e-2
    with arbiter.attach(model, tm.processor) as lens:
        at = attribution_ranking(lens, synth.samples, batch_size=8, dataset=synth)
        ex = exhaustive_ranking(lens, synth.samples, batch_size=8, dataset=synth)  # the same samples, in order
        for head in range(4):
            from arbiter.experiments.common import metric_pi_and_margin
            from arbiter.sweep import head_sweep
            item = next(iter(batches(lens, [s for s in synth.samples if s.conflict], 8, synth)))
            m = [head_sweep(lens, item.batch.inputs, heads=[(0, head)], alpha=a,
                            metric=metric_pi_and_margin(item.ids_p, item.ids_c)).values[0][:, 1].double()
                 for a in (1 + eps, 1 - eps)]
            fd = (m[0] - m[1]) / (2 * eps)
            assert torch.allclose(at.per_sample[:, 0, head].double(), fd, rtol=1e-2, atol=1e-4)
    assert ex.per_sample.shape == at.per_sample.shape


@pytest.mark.slow
def test_layer_path_integrated_gradients_are_complete(synth):
    """ig-layer: per layer, the heads' scores sum to the drop of m when the whole layer's heads are zeroed."""
    tm = _tiny("llava")
    model = copy.deepcopy(tm.model).double()
    with arbiter.attach(model, tm.processor) as lens:
        ig = attribution_ranking(lens, synth.samples, batch_size=8, dataset=synth, method="ig-layer", steps=48)
        from arbiter.experiments.common import metric_pi_and_margin
        from arbiter.experiments.heads import _head_set_settings
        from arbiter.sweep import sweep
        item = next(iter(batches(lens, [s for s in synth.samples if s.conflict], 8, synth)))
        res = sweep(lens, item.batch.inputs, _head_set_settings([[(l_, h) for h in range(4)] for l_ in range(4)], 0.0),
                    metric_pi_and_margin(item.ids_p, item.ids_c))
    drop = res.baseline[:, 1].double().unsqueeze(0) - res.values[:, :, 1].double()       # [layers, samples]
    assert ig.cost_forward_equivalents == 3.0 * 48 * 4
    assert torch.allclose(ig.per_sample.double().sum(-1).T, drop, atol=2e-3 * drop.abs().max().item() + 1e-6)


def test_attribution_rejects_unknown_method_and_bad_steps(synth):
    tm = _tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(arbiter.errors.InterventionError, match="unknown"):
            attribution_ranking(lens, synth.samples, dataset=synth, method="atp*")
        with pytest.raises(arbiter.errors.InterventionError, match="steps"):
            attribution_ranking(lens, synth.samples, dataset=synth, method="ig", steps=0)


def test_split_half_reliability_is_one_for_identical_samples_and_lower_for_noise():
    from arbiter.experiments.heads import HeadRanking
    g = torch.Generator().manual_seed(0)
    base = torch.arange(12.0).view(3, 4)
    targets = ["vision", "text"] * 10
    same = HeadRanking("exhaustive", base, per_sample=base.expand(20, 3, 4).clone(), targets=targets)
    assert same.split_half(n_splits=5)["spearman_mean"] == pytest.approx(1.0)
    noisy = base + 20 * torch.randn(20, 3, 4, generator=g)
    rel = HeadRanking("exhaustive", noisy.mean(0), per_sample=noisy, targets=targets).split_half(n_splits=10)
    assert rel["spearman_mean"] < 0.9 and rel["n_samples"] == 20
    assert HeadRanking("dla", base).split_half() is None


def test_diagnose_rejects_an_unknown_head_method_before_running(synth, tmp_path):
    tm = _tiny("llava")
    with pytest.raises(arbiter.errors.DataError, match="head ranking methods"):
        diagnose(tm.model, tm.processor, synth, tmp_path, **{**FAST, "head_methods": ("exhaustive", "atp*")})
    assert not (tmp_path / "report.json").exists()


REPORT_KEYS = {"model", "n_samples", "mfr", "mam", "ldar", "knockout", "heads", "blocking", "amplification",
               "shapley", "keyspace", "imbalance", "surrogate"}
FAST = {"limit": 4, "window": 3, "n_random": 2, "alphas": (2.0,), "batch_size": 4, "generate": False,
        "progress": False, "head_methods": ("exhaustive",), "keyspace_max_n": 300, "keyspace_permutations": 20}


def check_modality_sections(rep: dict, n_heads: int) -> None:
    """Values of the shapley / keyspace / imbalance / surrogate sections (or a skip with a reason)."""
    sh = rep["shapley"]
    if "skipped" in sh:
        assert isinstance(sh["skipped"], str) and sh["skipped"]
    else:
        assert sh["players"][:1] == ["image"] and len(sh["players"]) >= 2 and sh["n_samples"] >= 1
        ps = sh["per_sample"]
        for phi, v0, v1 in zip(ps["phi"], ps["v_empty"], ps["v_full"]):  # efficiency, per sample
            assert abs(sum(phi) - (v1 - v0)) <= 1e-6
        assert abs(sum(sh["mean"].values()) - (sh["v_full_mean"] - sh["v_empty_mean"])) <= 1e-6
        assert sh["efficiency_gap"] <= 1e-6
        for t, m in sh["mean_by_target"].items():  # the split by target averages the per-sample values
            rows = [p for p, tt in zip(ps["phi"], ps["targets"]) if tt == t]
            assert m[sh["players"][0]] == pytest.approx(sum(r[0] for r in rows) / len(rows), abs=1e-9)
            a = sh["angle_by_target"][t]
            assert a is None or -90.0 <= a <= 90.0
        assert sh["angle"] is None or -90.0 <= sh["angle"] <= 90.0
    ks = rep["keyspace"]
    if "skipped" in ks:
        assert ks["skipped"]
    else:
        assert len(ks["mmd"]) == len(ks["intra"]) == len(ks["layers"]) >= 1
        assert all(v is None or v >= 0 for v in ks["mmd"] + ks["intra_a"] + ks["intra_b"])
        assert ks["summary"]["mmd_mean"] is not None and ks["summary"]["intra_mean"] is not None
    im = rep["imbalance"]
    if "skipped" in im:
        assert im["skipped"]
    else:
        assert len(im["heat"]) == len(im["layers"]) >= 1 and all(len(row) == n_heads for row in im["heat"])
        finite = [v for row in im["heat"] for v in row if v is not None]
        if len(finite) == sum(len(row) for row in im["heat"]):
            assert im["scalar"] == pytest.approx(sum(abs(v) for v in finite) / len(finite), rel=1e-6)
        else:  # a side with no mass (keys outside a sliding window) is an infinite cell: no finite scalar
            assert im["scalar"] is None
    su = rep["surrogate"]
    if "skipped" in su:
        assert isinstance(su["skipped"], str) and su["skipped"]
    else:
        for b in (su["beta_self"], su["beta_cross"]):
            assert b is not None and math.isfinite(b) and b > 0
        assert su["angle_pred"] is None or -90.0 <= su["angle_pred"] <= 90.0
        assert su["nmse"] is not None and 0 < su["nmse"] < 1
        assert su["angle_measured"] == (None if "skipped" in sh else sh["angle"])
        assert su["calibration"]["name"] == "responsive_5x5_5seeds" and su["prediction"] == "table"
        assert su["calibration"]["seeds"] and su["calibration"]["preset"] == "responsive"
        lo, hi = min(su["table"]["beta"]), max(su["table"]["beta"])
        assert all(lo <= e["beta_self"] <= hi for e in su["layers"] if e["beta_self"] is not None)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_diagnose_produces_a_complete_report_on_every_family(family, synth, tmp_path):
    tm = _tiny(family)
    rep = diagnose(tm.model, tm.processor, synth, tmp_path, log=lambda s: None, **FAST)
    assert REPORT_KEYS <= set(rep)
    assert rep["n_samples"] == 4
    assert len(rep["mam"]["vision"]) + len(rep["mam"]["text"]) > 0
    assert len(rep["knockout"]) == 13 * rep["model"]["n_layers"]
    assert len(rep["heads"]["ranking"]) == sum(1 for _ in rep["heads"]["ranking"]) > 0
    assert set(rep["blocking"]) >= {"fraction", "heads", "mfr_top", "mfr_random"}
    assert set(rep["amplification"]) >= {"alpha", "restored", "n_failed"}
    check_modality_sections(rep, rep["model"]["n_heads"])
    if "image" in tm.modalities:  # tiny random models with an image all have a context: every step runs
        assert not [k for k in ("shapley", "keyspace", "imbalance", "surrogate") if "skipped" in rep[k]]
    else:
        assert all("no image token" in rep[k]["skipped"] for k in ("shapley", "keyspace", "imbalance", "surrogate"))
    assert set(rep["timing_s"]) >= {"shapley", "keyspace", "imbalance", "surrogate"}
    assert rep["attractors"]["skipped"] == "the data file declares no label set"  # synth declares no labels
    json.dumps(rep, allow_nan=False)


@pytest.mark.slow
def test_diagnose_resumes_the_modality_steps_and_reruns_only_what_changed(synth, tmp_path):
    tm = _tiny("llava")
    logs = []
    first = diagnose(tm.model, tm.processor, synth, tmp_path, log=logs.append, **FAST)
    logs.clear()
    again = diagnose(tm.model, tm.processor, synth, tmp_path, log=logs.append, **FAST)
    for step in ("baseline", "shapley", "keyspace", "imbalance", "surrogate"):
        assert any(f"{step}: done earlier" in line for line in logs), step
        assert again[step if step != "baseline" else "mfr"] == first[step if step != "baseline" else "mfr"]
    logs.clear()  # a modality setting changes: only the modality steps run again
    other = diagnose(tm.model, tm.processor, synth, tmp_path, log=logs.append, **{**FAST, "keyspace_permutations": 10})
    assert any("keyspace: done earlier" not in line and line.startswith("[arbiter] keyspace:") for line in logs)
    assert any("shapley: done earlier" in line for line in logs)
    assert other["keyspace"]["settings"]["n_permutations"] == 10
    logs.clear()
    skipped = diagnose(tm.model, tm.processor, synth, tmp_path, log=logs.append, skip="keyspace,surrogate", **FAST)
    assert "skip" in skipped["keyspace"]["skipped"] and "skip" in skipped["surrogate"]["skipped"]
    assert skipped["shapley"] == first["shapley"]
    with pytest.raises(arbiter.errors.DataError, match="can be skipped"):
        diagnose(tm.model, tm.processor, synth, tmp_path, log=logs.append, skip=("heads",), **FAST)


def test_diagnose_records_a_reason_when_the_data_has_no_image(synth, tmp_path):
    tm = _tiny("llava")
    text_only = ConflictDataset([dataclasses.replace(s, image=None) for s in synth.samples], template=synth.template,
                                path=synth.path)
    rep = diagnose(tm.model, tm.processor, text_only, tmp_path, log=lambda s: None, **FAST)
    for step in ("shapley", "keyspace", "imbalance", "surrogate"):
        assert set(rep[step]) == {"skipped", "seconds"} and "no conflict sample has an image" in rep[step]["skipped"]
    md = arbiter.report.markdown(rep)  # the report says so instead of failing
    assert "Modality Shapley: skipped (no conflict sample has an image" in md and "Surrogate: skipped (" in md


def test_modality_samples_alternate_targets_and_skip_imageless():
    from arbiter.experiments.diagnose import modality_samples

    mk = lambda i, t, img=True: ConflictSample(id=f"s{i}", image="x.png" if img else None, context="c",
                                               instruction="i", question="q", target=t, answer_vision="a",
                                               answer_text="b")
    ss = [mk(0, "vision"), mk(1, "vision"), mk(2, "vision"), mk(3, "text"), mk(4, "text", img=False), mk(5, "text")]
    assert [s.id for s in modality_samples(ss, 3)] == ["s0", "s3", "s1"]
    assert [s.id for s in modality_samples(ss, None)] == ["s0", "s3", "s1", "s5", "s2"]


def test_streamed_concentrations_equal_trace_concentrations_of_a_recorded_trace(synth):
    """diagnose's surrogate step measures c per sample as the rows pass (no attention map kept); merged over
    batches of 2 it equals arbiter.surrogate.trace_concentrations on one recorded trace of all samples."""
    from arbiter.experiments.diagnose import lens_concentrations
    from arbiter.surrogate import trace_concentrations

    tm = _tiny("llava")
    samples = [s for s in synth.samples if s.conflict][:4]
    with arbiter.attach(tm.model, tm.processor) as lens:
        streamed = lens_concentrations(lens, samples, 2, synth)
        batch = lens.encode(samples, dataset=synth)
        with torch.no_grad(), lens.record("attn.probs", rows="all") as rec:
            tm.model(**batch.inputs)
    ref = trace_concentrations(rec.trace)
    assert streamed["layers"] == ref["layers"] == list(range(tm.model.config.text_config.num_hidden_layers))
    for layer in ref["layers"]:
        for k in ("c_self", "c_cross", "c_self_x", "c_self_y", "c_cross_x", "c_cross_y", "n_rows_x", "n_rows_y"):
            a, b = streamed["per_layer"][layer][k], ref["per_layer"][layer][k]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9), (layer, k)
    assert streamed["overall"]["c_self"] == pytest.approx(ref["overall"]["c_self"], abs=1e-9)


def test_shipped_calibration_reproduces_its_cells_and_fits_without_simulating():
    from arbiter.surrogate import fit, load_calibration, table_point
    from arbiter.surrogate.calibration import calibration_info

    cal = load_calibration()
    assert cal.params["preset"] == "responsive" and len(cal.points) == 25 and cal.params["seeds"] == [0, 1, 2, 3, 4]
    assert calibration_info(cal, "responsive_5x5_5seeds")["identifiability_ratio"]["c_self"] > 2
    for p in cal.points[::6]:  # on a grid cell the table gives that cell's sweep values
        t = table_point(cal, p["beta_self"], p["beta_cross"])
        assert t["nmse"] == pytest.approx(p["nmse"], rel=1e-9)
        assert (t["angle"] is None and p["angle"] is None) or t["angle"] == pytest.approx(p["angle"], abs=1e-6)
    curves = cal.params["concentration_curves"]
    beta, cs, cc = curves["beta"], curves["c_self_marginal"], curves["c_cross_marginal"]
    mid_c = (cs[2] + cs[3]) / 2
    conc = {"layers": [0], "x": "image", "y": "text", "count": "visible", "min_keys": 2,
            "per_layer": {0: {"c_self": mid_c, "c_cross": cc[1], "c_self_x": mid_c, "c_self_y": mid_c,
                              "c_cross_x": cc[1], "c_cross_y": cc[1]}}}
    conc["overall"] = dict(conc["per_layer"][0])
    r = fit(None, concentrations=conc, sweep_result=cal, predict="table", angle_measured=12.0)
    assert beta[2] < r.beta_self < beta[3] and r.beta_cross == pytest.approx(beta[1], rel=1e-6)
    assert r.angle_measured == 12.0 and r.params["predict"] == "table" and 0 < r.nmse < 1
    assert any("identifiability ratio" in f for f in r.flags)


@pytest.mark.slow
def test_cli_diagnose_writes_reports_and_resumes_after_interrupt(synth, tmp_path, monkeypatch, capsys):
    from arbiter import cli
    from arbiter.experiments import diagnose as dg

    tm = _tiny("llava")
    model_dir = tmp_path / "model"
    tm.model.save_pretrained(model_dir)
    tm.processor.save_pretrained(model_dir)
    args = ["diagnose", "--model", str(model_dir), "--data", str(synth.path), "--out", str(tmp_path / "out"),
            "--limit", "4", "--window", "3", "--random-draws", "2", "--no-generate"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(dg, "knockout_map", interrupted)
    assert cli.main(args) == 130
    assert (tmp_path / "out" / "steps" / "baseline.json").exists()
    assert not (tmp_path / "out" / "steps" / "knockout.json").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(args) == 0
    log = capsys.readouterr().out
    assert "baseline: done earlier" in log
    for name in ("report.json", "report.md", "report.html", "mam_ldar.png", "knockout_map.png", "heads.png",
                 "shapley.png", "keyspace.png", "imbalance.png", "surrogate.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Modality Shapley" in html and "calibration responsive_5x5_5seeds" in html
    from arbiter.trace import read_trace_dir

    tr = read_trace_dir(tmp_path / "out" / "traces" / "baseline")
    assert tr["resid_last"].shape[:2] == (4, 4) and tr["pi"].shape == (4,)
    assert arbiter.report.Report.load(tmp_path / "out")["n_samples"] == 4


def test_cli_reports_a_missing_model_folder_clearly(tmp_path, capsys):
    from arbiter import cli

    assert cli.main(["diagnose", "--model", str(tmp_path / "nope"), "--data", "x.jsonl", "--out",
                     str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.slow
def test_diagnose_blocks_each_rankings_own_topg_and_reports_it(synth, tmp_path):
    """SPEC 7: a cheap ranking is reported with the effect of blocking its own TopG; the reference's deletion
    curve is its own (captured 1) and the markdown report says it."""
    tm = _tiny("llava")
    kw = {**FAST, "head_methods": ("exhaustive", "dla"), "skip": ("shapley", "keyspace", "imbalance", "surrogate")}
    rep = diagnose(tm.model, tm.processor, synth, tmp_path, log=lambda s: None, **kw)
    ba = rep["blocking"]["by_ranking"]
    assert ba["reference"] == "exhaustive" and set(ba["summary"]) == {"exhaustive", "dla"}
    assert ba["summary"]["dla"]["topg_heads"] == [[r["layer"], r["head"]] for r in rep["heads"]["rankings"]["dla"][:1]]
    assert ba["summary"]["exhaustive"]["topg_heads"] == rep["blocking"]["heads"]
    assert ba["summary"]["exhaustive"]["topg_mfr"] == pytest.approx(rep["blocking"]["mfr_top"])
    assert ba["random"]["n"] == FAST["n_random"]
    assert "Each ranking's TopG blocked (1 head, " in arbiter.report.markdown(rep)
    kw["head_methods"] = ("exhaustive",)
    only = diagnose(tm.model, tm.processor, synth, tmp_path, log=lambda s: None, **kw)
    assert "by_ranking" not in only["blocking"]  # the blocking step reran: its settings name the head methods


@pytest.mark.slow
def test_diagnose_blocks_the_samples_the_model_gets_right_when_batches_reorder_them(synth, tmp_path):
    """Text-only conflict samples go to their own batches, so the baseline's per-sample results come back in
    another order: the samples chosen as correct (π > 0.5 without generation) must still be those, so their
    unblocked MFR is 1."""
    import dataclasses

    tm = _tiny("llava")
    conf = [s for s in synth.samples if s.conflict]
    mixed = ConflictDataset([dataclasses.replace(s, image=None) if i in (0, 1, 3) else s for i, s in enumerate(conf)],
                            path=synth.path)
    kw = {**FAST, "limit": None, "head_methods": ("exhaustive", "dla"),
          "skip": ("shapley", "keyspace", "imbalance", "surrogate", "attractors")}
    rep = diagnose(tm.model, tm.processor, mixed, tmp_path, log=lambda s: None, **kw)
    ba = rep["blocking"]["by_ranking"]
    assert 0 < ba["n_samples"] < len(conf)
    assert ba["mfr_base"] == 1.0


def test_surrogate_warnings_say_what_limits_the_fit_in_words():
    from arbiter.experiments.diagnose import surrogate_warnings

    flags = ["c_self also depends on β_cross (range up to 0.06): the marginal curve averages over it",
             "layer 2: c_self = 0.9 is above the tabulated range [0.1, 0.8]: clipped to β = 0.5",
             "layer 4: c_cross = 0.01 is below the tabulated range [0.1, 0.8]: clipped to β = 8",
             "layer 4: c_self = 0.95 is above the tabulated range [0.1, 0.8]: clipped to β = 0.5",
             "overall: c_cross = 0.05 is below the tabulated range [0.1, 0.8]: clipped to β = 8",
             "the angle's identifiability ratio is 0.713 (<= 2.0): the predicted angle carries no information",
             "the surrogate angle is a dynamical SHAP (readout restricted to X, Y or both)",
             "table: drift: 1 seed-cells extrapolate"]
    w = surrogate_warnings(flags, 0.713, fitted=True)
    assert len(w) == 4
    assert w[0].startswith("uninformative: ") and "0.71" in w[0]
    assert w[1] == "overall concentration c_cross = 0.05 is below the tabulated range [0.1, 0.8]: clipped to β = 8"
    assert w[2].startswith("2 layer(s) (2, 4) have a concentration outside")
    assert w[3] == "table: drift: 1 seed-cells extrapolate"
    assert surrogate_warnings([], 5.0, fitted=True) == []
    none = surrogate_warnings([], None, fitted=False)
    assert none[0].startswith("β could not be fitted") and "identifiability ratio unknown" in none[1]


@pytest.mark.slow
def test_every_long_step_of_diagnose_shows_a_labelled_bar(tmp_path, monkeypatch, capsys):
    tm = _tiny("llava")
    labelled = generate_synthetic(tmp_path / "data", 8, seed=0, image_size=64, labels=True)
    monkeypatch.setenv("ARBITER_PROGRESS", "1")         # stderr is captured, not a terminal: force the bars
    capsys.readouterr()
    rep = diagnose(tm.model, tm.processor, labelled, tmp_path / "out", log=lambda s: None,
                   **{**FAST, "progress": True, "head_methods": ("exhaustive", "dla"), "attractor_subsets": 2})
    err = capsys.readouterr().err
    assert "skipped" not in rep["attractors"]
    for label in ("baseline: batches", "knockout map: ", "head sweep: layer×head", "DLA: batches",
                  "blocking: TopG + 2 random head sets", "blocking agreement: ", "modality shapley: ",
                  "key space: ", "imbalance: ", "surrogate: attention concentrations", "label perturbation: "):
        assert label in err, label
    if rep["amplification"]["n_failed"]:
        assert "amplification α=2: " in err


def test_amplification_reports_the_failures_and_their_share_already_above_one_half(synth):
    """restored_base = share of the failures with π > 0.5 unscaled (direct forward); α = 1 restores exactly it."""
    from arbiter.experiments.heads import amplification_experiment

    tm = _tiny("llava")
    conf = [s for s in synth.samples if s.conflict]
    correct = [i % 2 == 0 for i in range(len(conf))]          # the odd ones are the "failures"
    with arbiter.attach(tm.model, tm.processor) as lens:
        res = amplification_experiment(lens, conf, correct, [(0, 0)], alphas=(1.0, 3.0), n_random=2, batch_size=4,
                                       dataset=synth, progress=False)
        failed = [s for s, ok in zip(conf, correct) if not ok]
        above = []
        for item in batches(lens, failed, 4, synth):
            with torch.no_grad():
                prob = tm.model(**item.batch.inputs).logits[:, -1].softmax(-1)
            above += [float(prob[i, item.ids_p[i]].sum() > prob[i, item.ids_c[i]].sum()) for i in range(item.size)]
    assert res.sample_ids == [s.id for s in failed] and res.n_failed == len(failed)
    assert res.restored_base == pytest.approx(sum(above) / len(above))
    assert res.restored[0] == pytest.approx(res.restored_base)       # scaling by 1 changes nothing
    assert res.restored_random_mean[0] == pytest.approx(res.restored_base)
    with pytest.raises(arbiter.errors.InterventionError, match="one per sample"):
        amplification_experiment(lens, conf, correct[:-1], [(0, 0)], dataset=synth)


def test_attribution_under_a_memory_budget_splits_the_path_and_keeps_the_scores(synth):
    """A budget that holds fewer path steps than the method takes runs them in several forwards: the scores equal
    the one-forward computation (to float rounding); a budget below one step is a clear error."""
    from arbiter import memory
    from arbiter.experiments import heads as heads_mod

    tm = _tiny("llava")
    seen = []
    real = heads_mod._path_gradients

    def counting(lens, item, alphas, layers, method):
        seen.append(len(alphas))
        return real(lens, item, alphas, layers, method)

    with arbiter.attach(tm.model, tm.processor) as lens:
        free = attribution_ranking(lens, synth.samples, batch_size=4, dataset=synth, method="ig", steps=4,
                                   memory_budget=2**40)
        item = next(iter(batches(lens, [s for s in synth.samples if s.conflict], 4, synth)))
        one_step, _, _ = memory.measure(lambda: real(lens, item, [0.5], [], "ig"), "cpu")
        heads_mod._path_gradients = counting
        try:
            tight = attribution_ranking(lens, synth.samples, batch_size=4, dataset=synth, method="ig", steps=4,
                                        memory_budget=int(2.5 * one_step))
        finally:
            heads_mod._path_gradients = real
        with pytest.raises(arbiter.errors.InterventionError, match="memory budget"):
            attribution_ranking(lens, synth.samples, batch_size=4, dataset=synth, method="ig", steps=4,
                                memory_budget=one_step // 2)
    assert max(seen[1:]) < 4   # after the one-step measurement, no forward held all four steps
    torch.testing.assert_close(tight.scores, free.scores, atol=1e-6, rtol=1e-5, equal_nan=True)
