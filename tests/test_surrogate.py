"""Physics surrogate numerics (SPEC 11): vector field vs loop, softmax at β = 0, RK4 order, Lorenz, readout, SHAP, runs."""

import math
import types

import numpy as np
import pytest
import torch

from arbiter.errors import DataError
from arbiter.surrogate import (
    PAPER,
    RESPONSIVE,
    cell_shap,
    draw,
    dynamical_shap,
    get_preset,
    identifiability_ratio,
    lorenz,
    nmse,
    oscillators,
    ridge_readout,
    simulate,
    substeps_for,
    sweep,
)
from arbiter.surrogate.oscillators import OscillatorBatch, _integrate, series_terms, ws_adjacency

TINY = {"n_x": 7, "n_y": 7, "ws_k": 4, "ws_p": 0.3}


def loop_velocity(p, d, s, beta_self, beta_cross, th, sx, sy):
    """dθ_i/dt written term by term from SPEC 11 (softmax over the whole group, adjacency after, j = i included)."""
    n = p.n
    out = np.zeros(n)
    for i in range(n):
        own = range(p.n_x) if i < p.n_x else range(p.n_x, n)
        oth = range(p.n_x, n) if i < p.n_x else range(p.n_x)
        acc = d.omega[s, i]
        for grp, beta in ((own, beta_self), (oth, beta_cross)):
            logits = np.array([beta * math.cos(th[i] - th[j]) for j in grp])
            w = np.exp(logits - logits.max())
            w /= w.sum()
            for wj, j in zip(w, grp):
                acc += p.k0 * wj * d.adj[s, i, j] * math.sin(th[j] - th[i])
        acc += p.drive_gain * d.h[s, i] * math.sin(th[i]) * (sx if i < p.n_x else sy)
        out[i] = acc
    return out


def loop_concentration(th, rows, keys, beta):
    cs = []
    for i in rows:
        lg = np.array([beta * math.cos(th[i] - th[j]) for j in keys])
        q = np.exp(lg - lg.max())
        q /= q.sum()
        cs.append(math.exp(-(q * np.log(q)).sum()) / len(keys))
    return float(np.mean(cs))


@pytest.mark.parametrize("preset", [PAPER, RESPONSIVE], ids=["paper", "responsive"])
@pytest.mark.parametrize("betas", [(0.0, 0.0), (0.5, 1.5), (1.9, 0.02), (30.0, 5.0)])
def test_velocity_and_concentration_match_loop(preset, betas):
    p = preset.replace(**TINY)
    d = draw(p, [3, 4])
    bs, bc = betas
    methods = ["series", "dense"] if max(betas) <= 2 else ["dense"]
    gen = torch.Generator().manual_seed(1)
    for m in methods:
        b = OscillatorBatch(p, d, [bs, 0.3], [bc, 0.7], method=m)
        th = torch.rand(b.B, p.n, generator=gen, dtype=torch.float64) * 7 - 1
        v = b.velocity(th, 3.0, -7.0).numpy()
        for s in range(2):  # cell 0 = rows 0, 1 (b = cell * S + seed)
            ref = loop_velocity(p, d, s, bs, bc, th[s].numpy(), 3.0, -7.0)
            assert np.abs(v[s] - ref).max() < 1e-11 * max(1.0, np.abs(ref).max())
        cs, cc = b.concentration(th)
        t0 = th[0].numpy()
        X, Y = range(p.n_x), range(p.n_x, p.n)
        assert cs[0].numpy() == pytest.approx([loop_concentration(t0, X, X, bs), loop_concentration(t0, Y, Y, bs)],
                                              abs=1e-12)
        assert cc[0].numpy() == pytest.approx([loop_concentration(t0, X, Y, bc), loop_concentration(t0, Y, X, bc)],
                                              abs=1e-12)


def test_softmax_is_uniform_k0_over_n_at_beta_zero():
    p = PAPER.replace(**TINY)
    d = draw(p, [0])
    b = OscillatorBatch(p, d, [0.0], [0.0])
    th = torch.rand(1, p.n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 6.3
    v = b.velocity(th, 0.0, 0.0).numpy()[0]
    t = th[0].numpy()
    K = p.k0 / p.n_x  # K0 softmax_j(0) = K0 / N_σ for every j
    ref = np.array([sum(K * d.adj[0, i, j] * math.sin(t[j] - t[i]) for j in range(p.n)) for i in range(p.n)])
    assert v == pytest.approx(ref, abs=1e-12)
    cs, cc = b.concentration(th)
    assert cs.numpy() == pytest.approx(1.0, abs=1e-14) and cc.numpy() == pytest.approx(1.0, abs=1e-14)


def test_series_terms_and_substep_rule():
    assert series_terms(0.0) == 1 and series_terms(1.0) <= 20 and series_terms(100.0) > 50
    assert substeps_for(1.0, 1.0, PAPER) == 1 and substeps_for(1e-4, 1e-2, PAPER) == 1
    assert substeps_for(100.0, 0.1, RESPONSIVE) == 16 and substeps_for(3.0, 0.1, RESPONSIVE) == 1
    assert substeps_for(1.0, 1.0, PAPER.replace(substeps=3)) == 3


def test_ws_adjacency_equals_networkx():
    nx = pytest.importorskip("networkx")
    for n, k, p, seed in ((50, 10, 0.01, 7), (50, 10, 0.3, 11), (20, 4, 0.9, 3), (12, 10, 0.5, 1)):
        g = nx.watts_strogatz_graph(n, k, p, seed=seed)
        ref = np.zeros((n, n))
        for i, j in g.edges():
            ref[i, j] = ref[j, i] = 1.0
        assert np.array_equal(ws_adjacency(n, k, p, seed), ref)


def test_ws_adjacency_seeded_symmetric_and_draws_paired():
    a = ws_adjacency(50, 10, 0.01, 7)
    assert np.array_equal(a, a.T) and a.sum() == 50 * 10 and np.all(np.diag(a) == 0)
    assert np.array_equal(a, ws_adjacency(50, 10, 0.01, 7))
    d1, d2 = draw(PAPER, [5, 6]), draw(RESPONSIVE, [5])
    assert np.array_equal(d1.adj[0], d2.adj[0]) and np.array_equal(d1.theta0[0], d2.theta0[0])
    assert np.all(d1.omega == 0) and d2.omega.std() > 1
    blk = draw(PAPER.replace(cross_adjacency="blocks"), [5])
    assert np.array_equal(blk.adj[0], blk.adj[0].T) and blk.adj[0].sum() == 100 * 10


class _KnownODE:
    """dθ/dt = θ cos(t), with t delivered as the signal's x value: θ(t) = θ0 exp(sin t - sin t0)."""

    def __init__(self, p, theta0):
        self.preset, self.theta0 = p, theta0

    def velocity(self, th, sx, sy):
        return th * math.cos(sx)

    def concentration(self, th):
        return torch.zeros(th.shape[0], 2, dtype=th.dtype), torch.zeros(th.shape[0], 2, dtype=th.dtype)


def test_rk4_fourth_order_on_known_ode():
    p = PAPER.replace(dt=0.2, t_start=-2.0, t_fit=0.5, t_train=1.0, t_end=2.0, c_every=1)
    sig = types.SimpleNamespace(at=lambda t: np.stack([np.asarray(t), 0 * np.asarray(t), 0 * np.asarray(t)], -1))
    th0 = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    exact = 0.7 * math.exp(math.sin(2.0) - math.sin(-2.0))
    errs = []
    for s in (1, 2, 4, 8):
        out, _, _ = _integrate(_KnownODE(p, th0), sig, s, 2.0, 2.0, np.float64, None)
        # stored phases are mod 2π: compare on the circle
        errs.append(abs(math.remainder(out[0, -1, 0] - exact, 2 * math.pi)))
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(3)]
    assert all(3.6 < o < 4.4 for o in orders), (errs, orders)


def test_lorenz_matches_solve_ivp_and_rk4_order():
    from scipy.integrate import solve_ivp

    def f(t, u):
        return [10 * (u[1] - u[0]), u[0] * (28 - u[2]) - u[1], u[0] * u[1] - 8 / 3 * u[2]]

    ref = solve_ivp(f, (0, 2), [1.0, 1.0, 1.0], method="DOP853", rtol=1e-12, atol=1e-12, dense_output=True)
    sig = lorenz(0.0, 2.0, 0.005)
    err = float(np.abs(sig.states - ref.sol(sig.times).T).max())
    assert err < 2e-4, err  # RK4 global error at dt = 0.005 on |state| ~ 25
    mid = np.linspace(0.0025, 1.9975, 50)  # Hermite between grid points
    err_mid = float(np.abs(sig.at(mid) - ref.sol(mid).T).max())
    assert err_mid < 1e-3, err_mid
    assert np.array_equal(sig.at(sig.times[:5]), sig.states[:5])
    tt = np.linspace(0.0, 1.0, 51)
    errs = [np.abs(lorenz(0.0, 1.0, h).at(tt) - ref.sol(tt).T).max() for h in (0.02, 0.01, 0.005)]
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(3.5 < o < 4.5 for o in orders), orders
    with pytest.raises(DataError):
        sig.at(2.5)


def test_ridge_recovers_planted_linear_map():
    rng = np.random.default_rng(0)
    t = np.round(np.arange(-0.0, 8.0 + 1e-9, 0.01), 10)
    F = rng.normal(size=(t.size, 6)) * np.array([1, 2, 3, 0.5, 1, 4]) + 3.0
    w = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 0.25])
    z = F @ w + 7.0 + 1e-6 * rng.normal(size=t.size)
    r = ridge_readout(F, z, t, t_fit=3.0, t_train=4.0, t_end=8.0, keep_weights=True, keep_prediction=True)
    assert r.nmse < 1e-9 and r.lam == 1e-8
    train = (t >= 0) & (t <= 4.0 + 1e-9)
    assert r.weights == pytest.approx(w * F[train].std(0), rel=1e-5, abs=1e-6)  # standardised units
    assert r.prediction.shape == (int(((t > 4.0 + 1e-9) & (t <= 8.0 + 1e-9)).sum()),)
    # batched == one by one
    rb = ridge_readout(np.stack([F, F[:, ::-1]]), z, t, t_fit=3.0, t_train=4.0, t_end=8.0)
    assert rb[0].nmse == pytest.approx(r.nmse, rel=1e-6, abs=1e-15)


def test_nmse_of_the_mean_is_one_and_uninformative_readout():
    z = np.sin(np.linspace(0, 20, 400)) + 2
    assert nmse(z, np.full_like(z, z.mean())) == pytest.approx(1.0)
    t = np.arange(400) * 0.01 * 2
    r = ridge_readout(np.zeros((400, 3)), z, t, t_fit=3.0, t_train=4.0, t_end=8.0)
    # constant features: the readout is its intercept, the train mean; NMSE >= 1 on the test window
    assert r.nmse >= 1.0 - 1e-12


def test_dynamical_shap_corrected_identity_efficiency_and_printed_form():
    rng = np.random.default_rng(1)
    for nx_, ny, nxy in rng.uniform(0.01, 1.5, size=(20, 3)):
        d = dynamical_shap(nx_, ny, nxy)
        assert d["phi_y"] - d["phi_x"] == pytest.approx(nx_ - ny, abs=1e-12)
        assert d["phi_x"] + d["phi_y"] == pytest.approx(1.0 - nxy, abs=1e-12)
        pr = dynamical_shap(nx_, ny, nxy, printed=True)
        assert pr["phi_x"] == pytest.approx(pr["phi_y"]) == pytest.approx(0.5 * (1.0 - nxy))


def test_cell_shap_averages_phi_before_the_angle_and_undefined_arrow():
    from arbiter.metrics.shapley import preference_angle

    nx_, ny, nxy = [0.2, 0.6, 0.3], [0.5, 0.2, 0.4], [0.1, 0.15, 0.2]
    c = cell_shap(nx_, ny, nxy)
    px = np.mean([dynamical_shap(a, b, e)["phi_x"] for a, b, e in zip(nx_, ny, nxy)])
    py = np.mean([dynamical_shap(a, b, e)["phi_y"] for a, b, e in zip(nx_, ny, nxy)])
    assert c.angle == pytest.approx(preference_angle(px, py)) and c.angle_defined
    assert c.log_nmse_ratio == pytest.approx(np.mean(np.log(np.array(ny) / np.array(nx_))))
    bad = cell_shap([1.2, 1.1], [1.3, 1.0], [1.05, 1.0])
    assert bad.angle is None and not bad.angle_defined and any("undefined" in f for f in bad.flags)
    assert math.isnan(bad.per_seed["angle"][0])
    assert cell_shap(nx_, ny, nxy, printed=True).angle == pytest.approx(0.0)
    assert cell_shap(nx_, ny, nxy, how="atan2").angle is not None


def test_identifiability_ratio_removes_paired_seed_offsets():
    rng = np.random.default_rng(0)
    cell = np.linspace(0, 1, 9)[:, None]
    seed = rng.normal(0, 100, size=(1, 10))  # large shared per-seed offsets
    noise = rng.normal(0, 0.01, size=(9, 10))
    r = identifiability_ratio(cell + seed + noise)
    assert r["ratio"] > 20 and r["depends_on_beta"]
    r0 = identifiability_ratio(seed + noise)
    assert r0["ratio"] < 1.0 and not r0["depends_on_beta"]
    v = seed + noise + cell
    v[2, 3] = np.nan
    assert identifiability_ratio(v)["n_values"] == 89


def test_small_beta_cells_are_the_beta_zero_dynamics():
    # the softmax differs from uniform by at most e^{±2β}: β <= 1e-2 is the β = 0 model. Checked on the phases
    # after the first time unit (the random start's synchronisation transient briefly amplifies any difference).
    kw = {"record_from": -9.0, "t_end": -8.0, "store": "float64"}
    r = simulate(PAPER, [0.0, 1e-4, 1e-2], [0.0, 1e-4, 1e-2], [0, 1], **kw)
    d = np.abs(np.angle(np.exp(1j * (r.theta[1:] - r.theta[:1]))))
    assert d[1].max() < 1e-2 and d[0].max() < 1e-3, (d[0].max(), d[1].max())
    r1 = simulate(PAPER, [1.0], [1.0], [0, 1], **kw)  # sanity: β = 1 moves the phases more than β = 1e-2 does
    assert np.abs(np.angle(np.exp(1j * (r1.theta[0] - r.theta[0])))).max() > d[1].max()


KW = {"t_end": -9.0, "record_from": -9.5, "store": "float64"}


def test_simulate_deterministic_and_batched_equals_per_cell():
    p = RESPONSIVE.replace(**TINY)
    cells = [(0.1, 0.1), (1.0, 0.3), (5.0, 3.0)]  # series, series and dense (β > 2)
    a = simulate(p, [c[0] for c in cells], [c[1] for c in cells], [2, 9], **KW)
    b = simulate(p, [c[0] for c in cells], [c[1] for c in cells], [2, 9], **KW)
    assert np.array_equal(a.theta, b.theta) and np.array_equal(a.c_self, b.c_self)
    for k, (bs, bc) in enumerate(cells):
        one = simulate(p, [bs], [bc], [2, 9], **KW)
        assert np.allclose(one.theta[0], a.theta[k], atol=1e-10, rtol=0)
        assert np.allclose(one.c_cross[0], a.c_cross[k], atol=1e-12)
    other = simulate(p, [0.1], [0.1], [3, 9], **KW)
    assert not np.allclose(other.theta[0, 0], a.theta[0, 0])
    assert np.allclose(other.theta[0, 1], a.theta[0, 1], atol=1e-10)  # seed 9 is the same system
    assert a.method == ["series", "series", "dense"]


def test_preset_checks_and_dict_round_trip():
    p = get_preset("responsive", k0=10.0)
    assert p.k0 == 10.0 and get_preset(p.to_dict()) == p
    with pytest.raises(DataError):
        get_preset("nope")
    with pytest.raises(DataError):
        PAPER.replace(n_x=10, n_y=12)
    with pytest.raises(DataError):
        simulate(PAPER.replace(**TINY), [400.0], [0.0], [0], t_end=-9.9)


# ------------------------------------------------------------------------------------- fast paths (issue #7)

MID = {"n_x": 16, "n_y": 16, "ws_k": 4, "ws_p": 0.1}  # ring lattice plus a few rewired edges


@pytest.mark.parametrize("cross_adjacency", ["independent", "blocks"])
def test_fast_paths_equal_reference_path(cross_adjacency, monkeypatch):
    # the ring-lattice views + power-by-power series loop (large batches) and the general edge list + batched
    # product (small batches) give the same field and concentrations as the plain edge-list reference, in values
    p = PAPER.replace(cross_adjacency=cross_adjacency, **MID)
    d = draw(p, [3, 4, 5])
    cells = ([0.0, 1e-3, 0.5, 1.9], [1.0, 0.02, 1.5, 0.0])
    gen = torch.Generator().manual_seed(2)
    for method in ("series", "dense"):
        ref = OscillatorBatch(p, d, *cells, method=method, lattice=False, large=False)
        th = torch.rand(ref.B, p.n, generator=gen, dtype=torch.float64) * 20 - 10
        v_ref = ref.velocity(th, 3.0, -7.0)
        c_ref = ref.concentration(th)
        for lattice, large in ((True, True), (False, True), (True, False)):
            b = OscillatorBatch(p, d, *cells, method=method, lattice=lattice, large=large)
            if lattice and cross_adjacency == "independent":
                assert {blk["kind"] for blk in b.ring} == {"self", "cross"} and b.n_edges < 32  # of 128
            v = b.velocity(th, 3.0, -7.0)
            assert torch.allclose(v, v_ref, rtol=0, atol=1e-12 * float(v_ref.abs().max())), (method, lattice, large)
            for x, y in zip(b.concentration(th), c_ref):
                assert torch.allclose(x, y, rtol=0, atol=1e-13)
        monkeypatch.setattr(oscillators, "SMALL_SCATTER", 0)  # the sparse-product scatter of many edges
        b = OscillatorBatch(p, d, *cells, method=method, lattice=False)
        assert not b.scatter_small
        assert torch.allclose(b.velocity(th, 3.0, -7.0), v_ref, rtol=0, atol=1e-12 * float(v_ref.abs().max()))
        monkeypatch.undo()
    # and the fast path against the term-by-term loop of SPEC 11
    b = OscillatorBatch(p, d, [0.7], [1.3], lattice=True, large=True)
    th = torch.rand(b.B, p.n, generator=gen, dtype=torch.float64) * 7
    v = b.velocity(th, 0.4, 2.0).numpy()
    for s in range(3):
        ref = loop_velocity(p, d, s, 0.7, 1.3, th[s].numpy(), 0.4, 2.0)
        assert np.abs(v[s] - ref).max() < 1e-11 * max(1.0, np.abs(ref).max())


def test_float32_field_tolerance():
    # the float32 field (phases and RK4 sums stay float64) follows the float64 run to ~1e-6 rad here; the default
    # paper sweep agrees within 3e-7 rad and NMSE within 1e-5 (CHANGELOG)
    p = PAPER.replace(**MID)
    d = draw(p, [0, 1])
    b64 = OscillatorBatch(p, d, [0.1, 1.0], [1.0, 1e-3])
    b32 = OscillatorBatch(p, d, [0.1, 1.0], [1.0, 1e-3], dtype="float32")
    th = torch.rand(b64.B, p.n, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 6.3
    v64, v32 = b64.velocity(th, 1.5, -2.0), b32.velocity(th, 1.5, -2.0)
    assert v32.dtype == torch.float32
    assert b32.M < b64.M  # the float32 field truncates its Fourier-Bessel series at 1e-10, not 1e-17 (SERIES_TOL)
    assert (v32.double() - v64).abs().max() < 1e-5 * v64.abs().max()
    kw = {"t_end": -8.0, "record_from": -10.0, "store": "float64", "workers": 1}
    a = simulate(p, [0.1, 1.0], [1.0, 1e-3], [0, 1], **kw)
    f = simulate(p, [0.1, 1.0], [1.0, 1e-3], [0, 1], dtype="float32", **kw)
    dphi = np.abs(np.angle(np.exp(1j * (a.theta - f.theta))))
    assert 0 < dphi.max() < 1e-5, dphi.max()
    assert np.allclose(a.c_self, f.c_self, atol=1e-6) and np.allclose(a.c_cross, f.c_cross, atol=1e-6)
    with pytest.raises(DataError):
        OscillatorBatch(p, d, [50.0], [0.0], dtype="float32")  # exp(-2β) must stay a normal float32


@pytest.mark.slow
def test_workers_batches_and_per_point_loop_agree():
    # the systems are independent: how they are split into batches (one batch, a per-point loop) and worker
    # threads changes nothing beyond rounding
    p = RESPONSIVE.replace(**MID)
    cells = [(0.1, 0.1), (1.0, 0.3), (5.0, 3.0), (0.2, 1.5)]  # series, series, dense, series
    bs, bc = [c[0] for c in cells], [c[1] for c in cells]
    kw = {"t_end": -9.0, "record_from": -9.5, "store": "float64"}
    one = simulate(p, bs, bc, [2, 9, 4], workers=1, **kw)
    for extra in ({"workers": 2}, {"workers": 3, "batch_cells": 1}, {"workers": 1, "batch_cells": 1}):
        other = simulate(p, bs, bc, [2, 9, 4], **extra, **kw)
        assert np.allclose(other.theta, one.theta, atol=1e-10, rtol=0), extra
        assert np.allclose(other.c_self, one.c_self, atol=1e-12) and np.allclose(other.c_cross, one.c_cross, atol=1e-12)
        assert other.method == one.method and list(other.substeps) == list(one.substeps)
    assert torch.get_num_threads() >= 1  # restored after the worker threads


@pytest.mark.slow
def test_sweep_threaded_readout_matches_serial():
    p = PAPER.replace(t_start=-1.0, t_fit=2.0, t_train=3.0, t_end=5.0, **MID)
    a = sweep(p, betas=[1e-3, 1.0], seeds=[0, 1], workers=1, dtype="float64").to_dict()["points"]
    b = sweep(p, betas=[1e-3, 1.0], seeds=[0, 1], workers=2, dtype="float64").to_dict()["points"]
    for x, y in zip(a, b):
        for k in ("nmse", "nmse_x", "nmse_y", "angle", "c_self", "c_cross", "R_X", "R_Y", "drift"):
            assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12), k


def test_package_names_stay_the_functions_after_their_submodules_load():
    import arbiter.surrogate as package
    import arbiter.surrogate.fit
    import arbiter.surrogate.lorenz
    import arbiter.surrogate.sweep  # noqa: F401  (the import system sets the submodules as package attributes)

    for name in ("fit", "lorenz", "sweep"):
        assert callable(getattr(package, name)) and getattr(package, name).__module__ == f"arbiter.surrogate.{name}"
