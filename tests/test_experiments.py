"""Arbitration experiments: batched knockout map == loop, pipeline glue vs direct computation, diagnose/CLI."""

from __future__ import annotations

import json

import pytest
import torch

import arbiter
from arbiter.data import generate_synthetic
from arbiter.experiments.baseline import evaluate
from arbiter.experiments.common import batches, pi_from_logits
from arbiter.experiments.diagnose import diagnose
from arbiter.experiments.heads import attribution_ranking, compare_rankings, dla_ranking, exhaustive_ranking
from arbiter.experiments.knockout_map import knockout_map
from arbiter.metrics import i_nssd

from helpers import FAMILIES, _tiny


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


REPORT_KEYS = {"model", "n_samples", "mfr", "mam", "ldar", "knockout", "heads", "blocking", "amplification"}


@pytest.mark.parametrize("family", FAMILIES)
def test_diagnose_produces_a_complete_report_on_every_family(family, synth, tmp_path):
    tm = _tiny(family)
    rep = diagnose(tm.model, tm.processor, synth, tmp_path, limit=4, window=3, n_random=2, alphas=(2.0,),
                   batch_size=4, generate=False, progress=False, log=lambda s: None,
                   head_methods=("exhaustive",))
    assert REPORT_KEYS <= set(rep)
    assert rep["n_samples"] == 4
    assert len(rep["mam"]["vision"]) + len(rep["mam"]["text"]) > 0
    assert len(rep["knockout"]) == 13 * rep["model"]["n_layers"]
    assert len(rep["heads"]["ranking"]) == sum(1 for _ in rep["heads"]["ranking"]) > 0
    assert set(rep["blocking"]) >= {"fraction", "heads", "mfr_top", "mfr_random"}
    assert set(rep["amplification"]) >= {"alpha", "restored", "n_failed"}
    json.dumps(rep)


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
    for name in ("report.json", "report.md", "report.html", "mam_ldar.png", "knockout_map.png", "heads.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "data:image/png;base64," in (tmp_path / "out" / "report.html").read_text()
    from arbiter.trace import read_trace_dir

    tr = read_trace_dir(tmp_path / "out" / "traces" / "baseline")
    assert tr["resid_last"].shape[:2] == (4, 4) and tr["pi"].shape == (4,)
    assert arbiter.report.Report.load(tmp_path / "out")["n_samples"] == 4


def test_cli_reports_a_missing_model_folder_clearly(tmp_path, capsys):
    from arbiter import cli

    assert cli.main(["diagnose", "--model", str(tmp_path / "nope"), "--data", "x.jsonl", "--out",
                     str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err
