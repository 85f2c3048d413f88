"""Steering plans: runtime == baked weights on every family, reload with from_pretrained, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

import arbiter
from arbiter.errors import InterventionError
from arbiter.experiments.diagnose import config_hash
from arbiter.report import Report
from arbiter.steer import SteeringPlan, head_roles, plan_from_report

from helpers import FAMILIES, _tiny, inputs_for, logits


def _plan(tm, alpha=2.5):
    with arbiter.attach(tm.model) as lens:
        layers = lens.facts.attention_layers
        heads = [[layers[0], 1], [layers[-1], 0]]
    return SteeringPlan(heads, [alpha, 1.5], "all", type(tm.model).__name__, config_hash(tm.model))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_baked_model_equals_runtime_steering_and_reloads(family, tmp_path):
    tm = _tiny(family)
    plan = _plan(tm)
    inputs = inputs_for(tm, n=2)
    with arbiter.attach(tm.model, tm.processor) as lens, lens.steer(plan):
        steered = logits(tm.model, inputs)
        with torch.no_grad():
            gen_rt = tm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    baked = plan.bake(tm.model)
    out = logits(baked, inputs)
    with torch.no_grad():
        gen_b = baked.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert (out - steered).abs().max().item() <= 1e-5
    assert torch.equal(gen_rt, gen_b)
    assert (steered - logits(tm.model, inputs)).abs().max().item() > 1e-6  # the original is untouched
    baked.save_pretrained(tmp_path)  # any engine can serve it: plain transformers, no arbiter
    again = type(tm.model).from_pretrained(tmp_path).eval()
    assert (logits(again, inputs) - out).abs().max().item() <= 1e-6


def test_plan_json_round_trip(tmp_path):
    plan = _plan(_tiny("qwen2_vl"))
    plan.save(tmp_path / "steer.json")
    assert SteeringPlan.load(tmp_path / "steer.json") == plan


def test_plan_for_another_model_is_refused():
    plan = _plan(_tiny("llava"))
    other = _tiny("qwen2_vl")
    with arbiter.attach(other.model, other.processor) as lens:
        with pytest.raises(InterventionError, match="not for"):
            with lens.steer(plan):
                pass
    with pytest.raises(InterventionError, match="not for"):
        plan.bake(other.model)


@pytest.mark.parametrize("alpha", [0.0, -1.0, math.inf, math.nan])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(InterventionError, match="alpha"):
        SteeringPlan([[0, 0]], [alpha])


def test_out_of_range_head_and_row_restricted_bake_are_refused():
    tm = _tiny("llava")
    bad = SteeringPlan([[0, 9]], [2.0], "all", type(tm.model).__name__, config_hash(tm.model))
    with pytest.raises(InterventionError, match="out of range"):
        bad.bake(tm.model)
    rows = SteeringPlan([[0, 1]], [2.0], "generated", type(tm.model).__name__, config_hash(tm.model))
    with pytest.raises(InterventionError, match="cannot be baked"):
        rows.bake(tm.model)
    before = [p.clone() for p in tm.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, tm.model.parameters()))


def test_head_roles_rule():
    by = {"vision": [[3.0, 1.0, 0.5]], "text": [[0.5, 1.0, 2.0]]}
    roles = head_roles(by, [(0, 0), (0, 1), (0, 2)])
    assert roles == {"0,0": "vision-expert", "0,1": "shared-hub", "0,2": "text-expert"}


def test_plan_from_report_toward_a_modality():
    rep = Report({"model": {"class": "X", "config_hash": "h"}, "mfr": {},
                  "heads": {"method": "exhaustive",
                            "ranking": [{"layer": 0, "head": h, "score": 3 - h} for h in range(3)] +
                                       [{"layer": 1, "head": h, "score": -h} for h in range(17)],
                            "scores": {"exhaustive": {"vision": [[3.0, 1.0, 0.5] + [0] * 17, [0] * 20],
                                                      "text": [[0.5, 1.0, 2.0] + [0] * 17, [0] * 20]}}}})
    plan = plan_from_report(rep, top=0.1, alpha=2.0)
    assert plan.heads == [[0, 0], [0, 1]] and plan.alphas == [2.0, 2.0]
    assert plan_from_report(rep, top=0.1, toward="text").heads == [[0, 1]]
    assert rep.steering(top=0.1).heads == plan.heads


@pytest.mark.slow
def test_cli_steer_writes_the_plan_report_and_plot(tmp_path):
    """`arbiter steer` after `arbiter diagnose`: the saved best plan reproduces its restored fraction, failures
    and already-correct samples partition the conflict samples, and report.json gains a steering section."""
    import json

    from arbiter import cli
    from arbiter.data import generate_synthetic
    from arbiter.experiments.common import batches, pi_from_logits

    data = generate_synthetic(tmp_path / "data", 12, seed=3, image_size=64)
    tm = _tiny("llava")
    model_dir = tmp_path / "model"
    tm.model.save_pretrained(model_dir)
    tm.processor.save_pretrained(model_dir)
    common = ["--batch-size", "4", "--random-draws", "2", "--seed", "0"]
    assert cli.main(["diagnose", "--model", str(model_dir), "--data", str(data.path), "--out", str(tmp_path / "d"),
                     "--window", "3", "--no-generate", "--head-methods", "exhaustive",
                     "--skip", "shapley,keyspace,imbalance,surrogate,attractors", *common]) == 0
    assert cli.main(["steer", "--model", str(model_dir), "--data", str(data.path), "--report",
                     str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--alpha", "0.5,3", "--top", "0.25",
                     *common]) == 0
    out = tmp_path / "s"
    rep = json.loads((out / "report.json").read_text())
    st = rep["steering"]
    assert rep["heads"] == json.loads((tmp_path / "d" / "report.json").read_text())["heads"]
    assert st["n_failed"] + st["n_correct"] == sum(s.conflict for s in data.samples)
    assert len(st["heads"]) == 4 and [r["alpha"] for r in st["sweep"]] == [0.5, 3.0]
    assert (out / "steering.png").stat().st_size > 0
    plan = SteeringPlan.load(out / "steering.json")
    row = next(r for r in st["sweep"] if r["alpha"] == plan.alphas[0])
    model = type(tm.model).from_pretrained(model_dir).eval()
    conflict = [s for s in data.samples if s.conflict]
    with arbiter.attach(model, tm.processor) as lens:
        pis = {}
        for item in batches(lens, conflict, 4, data):
            with torch.no_grad():
                pi = pi_from_logits(model(**item.batch.inputs).logits[:, -1], item.ids_p, item.ids_c)
            pis.update({s.id: float(p) for s, p in zip(item.batch.samples, pi)})
        failed = [s for s in conflict if pis[s.id] <= 0.5]
        assert len(failed) == st["n_failed"] > 0   # a random model fails about half of them
        if failed:
            ok = []
            with lens.steer(plan):
                for item in batches(lens, failed, 4, data):
                    with torch.no_grad():
                        lg = model(**item.batch.inputs).logits[:, -1]
                    ok += (pi_from_logits(lg, item.ids_p, item.ids_c) > 0.5).tolist()
            assert row["restored"] == pytest.approx(sum(ok) / len(ok))


def test_steering_experiment_refuses_a_report_of_another_model(tmp_path):
    from arbiter.data import generate_synthetic
    from arbiter.steer import steering_experiment

    data = generate_synthetic(tmp_path / "data", 4, seed=0, image_size=64)
    tm = _tiny("llava")
    report = {"model": {"class": "Qwen2VLForConditionalGeneration", "config_hash": "0" * 12}, "mfr": {},
              "heads": {"method": "exhaustive", "ranking": [{"layer": 0, "head": 0, "score": 1.0}]}}
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(InterventionError, match="build a plan from this model's diagnosis"):
            steering_experiment(lens, data, report)


def test_steering_toward_a_modality_without_experts_is_refused(tmp_path):
    from arbiter.data import generate_synthetic
    from arbiter.steer import steering_experiment

    data = generate_synthetic(tmp_path / "data", 4, seed=0, image_size=64)
    tm = _tiny("llava")
    by_target = {"vision": [[0.0] * 4 for _ in range(4)], "text": [[0.0] * 4 for _ in range(4)]}
    by_target["text"][0][0] = 1.0                                   # the only TopG head is a text expert
    report = {"model": {"class": type(tm.model).__name__, "config_hash": config_hash(tm.model)}, "mfr": {},
              "heads": {"method": "exhaustive", "ranking": [{"layer": 0, "head": 0, "score": 1.0}],
                        "scores": {"exhaustive": by_target}}}
    with arbiter.attach(tm.model, tm.processor) as lens:
        with pytest.raises(InterventionError, match="no vision-expert or shared-hub head"):
            steering_experiment(lens, data, report, toward="vision")
        res = steering_experiment(lens, data, report, toward="text", alphas=(2.0,), n_random=2)
    assert res["heads"] == [[0, 0]] and res["toward"] == "text" and res["roles"] == {"0,0": "text-expert"}
