"""Surrogate sweep, plots, fit to a trace (known β recovered, out-of-range clipped and flagged) and the CLI."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

from arbiter.groups import TokenGroups
from arbiter.surrogate import RESPONSIVE, concentration_table, fit, sweep, trace_concentrations
from arbiter.surrogate.cli import add_parser
from arbiter.surrogate.fit import concentration
from arbiter.surrogate.plots import arrow_map, attractor_plot
from arbiter.trace import Trace

TINY = RESPONSIVE.replace(n_x=6, n_y=6, ws_k=2, ws_p=0.2, k0=2.0, t_start=-0.5, t_fit=0.6, t_train=0.9,
                          t_end=1.5)
TABLE_BETA = np.logspace(-1, 2, 10).tolist()


def c_self_true(b):
    return 1.0 / (1.0 + (b / 2.0) ** 0.8)


def c_cross_true(b):
    return 0.95 / (1.0 + (b / 5.0) ** 0.7)


def fake_sweep() -> dict:
    cs = [c_self_true(b) for b in TABLE_BETA]
    cc = [c_cross_true(b) for b in TABLE_BETA]
    curves = {"beta": TABLE_BETA, "c_self_marginal": cs, "c_cross_marginal": cc, "c_self_diagonal": cs,
              "c_cross_diagonal": cc, "c_self_range_over_beta_cross": [0.0] * len(TABLE_BETA)}
    return {"points": [], "identifiability": {"angle": {"ratio": 0.6}, "c_self": {"ratio": 30.0}},
            "params": {"preset": "responsive", "preset_params": TINY.to_dict(), "seeds": [0, 1],
                       "concentration_curves": curves}}


def dist_with_concentration(n: int, c: float) -> torch.Tensor:
    """A distribution over n keys with exp(H) / n = c (p_k ∝ exp(-γ k), γ by bisection)."""
    k = torch.arange(n, dtype=torch.float64)
    lo, hi = 0.0, 50.0
    for _ in range(200):
        g = (lo + hi) / 2
        p = torch.softmax(-g * k, 0)
        cc = math.exp(float(-(p * p.log()).sum())) / n
        lo, hi = (g, hi) if cc > c else (lo, g)
    return torch.softmax(-(lo + hi) / 2 * k, 0)


def synthetic_trace(c_by_layer: list[tuple[float, float]], n_img: int = 12, n_txt: int = 9, heads: int = 2) -> Trace:
    """Every row puts half its mass on its own modality's keys (concentration c_self) and half on the other's
    (c_cross); non-causal, all keys visible (count='all')."""
    K = n_img + n_txt
    img = torch.zeros(2, K, dtype=torch.bool)
    img[:, :n_img] = True
    groups = TokenGroups({"image": img, "text": ~img, "pad": torch.zeros(2, K, dtype=torch.bool)})
    tensors = {}
    for layer, (cs, cc) in enumerate(c_by_layer):
        P = torch.zeros(2, heads, K, K, dtype=torch.float32)
        for q in range(K):
            own, oth = (slice(0, n_img), slice(n_img, K)) if q < n_img else (slice(n_img, K), slice(0, n_img))
            n_own, n_oth = (n_img, n_txt) if q < n_img else (n_txt, n_img)
            P[:, :, q, own] = 0.5 * dist_with_concentration(n_own, cs).float()
            P[:, :, q, oth] = 0.5 * dist_with_concentration(n_oth, cc).float()
        tensors[f"L{layer}.attn.probs"] = P
    return Trace(tensors, {"groups": groups.to_dict()})


def test_concentration_counts_visible_keys():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    keys = torch.tensor([True, True, True, False])
    vis = torch.tensor([[True, True, False, False]])
    assert concentration(probs, keys, vis).item() == pytest.approx(1.0)  # uniform over the 2 keys it can see
    assert concentration(probs, keys, None).item() == pytest.approx(2 / 3)  # 'all': out of the 3 image keys
    assert math.isnan(concentration(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), keys, None).item())  # no mass there


def test_trace_concentrations_on_synthetic_trace():
    tr = synthetic_trace([(0.6, 0.3), (0.4, 0.2)])
    r = trace_concentrations(tr, count="all")
    assert r["layers"] == [0, 1]
    e = r["per_layer"][0]
    for k, v in (("c_self_x", 0.6), ("c_self_y", 0.6), ("c_cross_x", 0.3), ("c_cross_y", 0.3)):
        assert e[k] == pytest.approx(v, abs=1e-4)
    assert r["overall"]["c_self"] == pytest.approx(0.5, abs=1e-4)
    assert e["n_rows_x"] == 2 * 12 and e["n_rows_y"] == 2 * 9


def test_fit_recovers_known_beta_and_clips_out_of_range():
    b_self, b_cross = 3.0, 0.5
    cs, cc = c_self_true(b_self), c_cross_true(b_cross)
    tr = synthetic_trace([(cs, cc), (cs, cc)])
    r = fit(tr, sweep_result=fake_sweep(), count="all", angle_measured=12.0)
    assert r.beta_self == pytest.approx(b_self, rel=0.1) and r.beta_cross == pytest.approx(b_cross, rel=0.1)
    for layer in r.layers:
        assert layer["beta_self"] == pytest.approx(b_self, rel=0.1) and not layer["flags"]
    d = r.to_dict()
    json.dumps(d)
    for k in ("beta_self", "beta_cross", "angle_pred", "nmse", "identifiability", "flags", "angle_measured"):
        assert k in d
    assert d["angle_measured"] == 12.0 and d["nmse"] is not None
    assert any("carries no information" in f for f in r.flags)  # the angle's ratio 0.6 is reported as such
    # out of range: more uniform than the lowest tabulated β, and more concentrated than the highest
    hi = synthetic_trace([(0.995, 0.01)])
    r2 = fit(hi, sweep_result=fake_sweep(), count="all")
    assert r2.beta_self == pytest.approx(TABLE_BETA[0]) and r2.beta_cross == pytest.approx(TABLE_BETA[-1])
    assert any("above the tabulated range" in f and "clipped" in f for f in r2.flags)
    assert any("below the tabulated range" in f and "clipped" in f for f in r2.flags)


def test_table_flags_flat_curves():
    d = fake_sweep()
    d["params"]["concentration_curves"]["c_self_marginal"] = [0.9999, 0.99995] + [0.99992] * (len(TABLE_BETA) - 2)
    t = concentration_table(d)
    assert any("not identifiable" in f for f in t.flags)
    beta, flags = t.invert(0.9, "self")
    assert beta is None and any("flat" in f for f in flags)


@pytest.mark.slow
def test_sweep_smoke_json_and_plots(tmp_path):
    r = sweep(TINY, grid=2, seeds=2)
    d = r.to_dict()
    assert set(d) == {"points", "params", "identifiability"}
    json.dumps(d)
    assert len(d["points"]) == 4
    pt = d["points"][0]
    for k in ("beta_self", "beta_cross", "nmse", "nmse_x", "nmse_y", "phi_x", "phi_y", "angle", "c_self", "c_cross",
              "R_X", "R_Y", "drift_flag", "per_seed", "spread", "log_nmse_ratio"):
        assert k in pt
    assert len(pt["per_seed"]["nmse"]) == 2
    for k in ("angle", "log_nmse", "c_self", "c_cross", "c"):
        assert "ratio" in d["identifiability"][k]
    assert d["params"]["numerics"]["dt"] == 0.01 and d["params"]["seeds"] == [0, 1]
    arrow_map(r, tmp_path / "map.png")
    attractor_plot(r, tmp_path / "att.png")
    arrow_map(d, tmp_path / "map2.png")
    assert (tmp_path / "map.png").stat().st_size > 1000 and (tmp_path / "att.png").stat().st_size > 1000
    # the sweep's own c(β) curves tabulate and invert
    t = concentration_table(r)
    assert len(t.beta) == 2


@pytest.mark.slow
def test_knockout_shap_mode_runs_and_differs():
    ko = sweep(TINY, betas=[0.5], seeds=2, shap_mode="knockout").to_dict()
    ro = sweep(TINY, betas=[0.5], seeds=2).to_dict()
    a, b = ko["points"][0], ro["points"][0]
    assert a["nmse"] == pytest.approx(b["nmse"])  # same full readout, same dynamics
    assert a["nmse_x"] != pytest.approx(b["nmse_x"]) and ko["params"]["shap_mode"] == "knockout"


def test_cli_fit_writes_json(tmp_path):
    ap = argparse.ArgumentParser(prog="arbiter")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    b_self, b_cross = 3.0, 0.5
    tr = synthetic_trace([(c_self_true(b_self), c_cross_true(b_cross))])
    tr.save(tmp_path / "t.safetensors")
    (tmp_path / "sweep.json").write_text(json.dumps(fake_sweep()))
    args = ap.parse_args(["surrogate", "fit", str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "o"),
                          "--sweep", str(tmp_path / "sweep.json"), "--count", "all"])
    assert args.fn(args) == 0
    d = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert d["beta_self"] == pytest.approx(b_self, rel=0.1)
    a2 = ap.parse_args(["surrogate", "sweep", "--out", str(tmp_path / "s"), "--grid", "9", "--preset", "responsive"])
    assert a2.grid == 9 and a2.seeds == 10 and a2.preset == "responsive" and callable(a2.fn)
