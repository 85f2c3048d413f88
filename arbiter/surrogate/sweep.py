"""β sweeps of the surrogate (docs/methods/surrogate.md): NMSE, dynamical SHAP angle, attention concentration and order parameters per cell.

Seeds are paired across cells; identifiability ratios say whether a quantity depends on β at all."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..util import ToDict, check_choice, fail, jsonable
from ..metrics.shapley import ANGLE_METHODS
from .oscillators import Preset, get_preset, make_signal, resolve_workers, simulate, torch_threads
from .readout import FEATURE_FNS, ridge_readout, windows
from .shap import cell_shap

__all__ = ["IDENTIFIABLE_ABOVE", "SweepResult", "beta_grid", "evaluate_cells", "identifiability_ratio", "sweep"]

IDENTIFIABLE_ABOVE = 2.0
"""Proposed reading of an identifiability ratio: above 2 the quantity depends on β; near or below 1 it does not."""

BETA_LABEL = "attention concentration and synchrony"


def beta_grid(n: int = 5, preset: str | Preset = "paper", *, extended: bool = False) -> np.ndarray:
    """``n`` log-spaced β from preset.beta_min to preset.beta_max (``extended``: to preset.beta_max_extended).

    docs/methods/surrogate.md: 1e-4..1e0 for ``paper`` (5 x 5 default, 9 x 9 option, extended range up to 1e2); 1e-1..1e2 for
    ``responsive`` (proposed)."""
    p = get_preset(preset)
    if n < 1:
        fail(f"grid size {n} must be >= 1.")
    hi = p.beta_max_extended if extended else p.beta_max
    return np.logspace(math.log10(p.beta_min), math.log10(hi), n) if n > 1 else np.array([p.beta_min])


def identifiability_ratio(values) -> dict:
    """Spread of the cell means across the β grid / spread across seeds within a cell (docs/methods/surrogate.md).

    values [cells, seeds] (nan = missing). Seeds are paired: each seed's offset (its mean over cells minus the
    grand mean) is removed first; the within-cell spread is the residual standard deviation of that two-way
    layout, sqrt(Σ r² / (n - C - S + 1)); the between spread is the standard deviation (ddof 1) of the cell
    means. Near or below 1 the quantity does not depend on β (with S seeds, pure noise gives about 1/sqrt(S))."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        fail(f"identifiability_ratio: values must be [cells, seeds], got shape {v.shape}.")
    ok = np.isfinite(v)
    C, S = v.shape
    out = {"ratio": None, "between_cells": None, "within_cells": None, "n_cells": int(C), "n_seeds": int(S),
           "n_values": int(ok.sum())}
    if ok.sum() < 3 or C < 2 or S < 2:
        out["note"] = "needs at least 2 cells and 2 seeds with finite values"
        return out
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a seed or cell with no finite value is dropped below
        vv = np.where(ok, v, np.nan)
        grand = np.nanmean(vv)
        off = np.nanmean(vv, axis=0) - grand
        off = np.where(np.isfinite(off), off, 0.0)
        w = vv - off[None, :]
        cm = np.nanmean(w, axis=1)
        resid = w - cm[:, None]
    cells_ok = np.isfinite(cm)
    seeds_ok = ok.any(axis=0)
    dof = int(ok.sum()) - int(cells_ok.sum()) - int(seeds_ok.sum()) + 1
    if dof < 1 or cells_ok.sum() < 2:
        out["note"] = "too few finite values for a residual spread"
        return out
    within = math.sqrt(float(np.nansum(resid ** 2)) / dof)
    between = float(np.std(cm[cells_ok], ddof=1))
    if within > 0:
        ratio = between / within
    else:
        ratio = math.inf if between > 0 else math.nan
    out.update(ratio=ratio, between_cells=between, within_cells=within,
               depends_on_beta=bool(math.isfinite(ratio) and ratio > IDENTIFIABLE_ABOVE) or ratio == math.inf)
    return out


def _spread(a: np.ndarray) -> dict:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"median": None, "q25": None, "q75": None, "min": None, "max": None}
    q = np.percentile(a, [25, 50, 75])
    return {"median": float(q[1]), "q25": float(q[0]), "q75": float(q[2]), "min": float(a.min()), "max": float(a.max())}


def _median(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else math.nan


@dataclass
class SweepResult(ToDict):
    """A β sweep. ``to_dict()``: {"points": [one dict per cell], "params": {...}, "identifiability": {...}}.

    Each point: beta_self, beta_cross, nmse (median over seeds of NMSE_{X∪Y}), nmse_x, nmse_y (medians), phi_x,
    phi_y (seed means), angle (of the seed-mean φ; None = no arrow), angle_defined, log_nmse_ratio, c_self,
    c_cross, R_X, R_Y, drift (medians), drift_flag and drift_seeds (seeds whose mean sin θ moves by more than
    preset.drift_threshold between train and test), substeps, method, spread {quantity: median, q25, q75, min,
    max}, per_seed {...}, flags. ``examples`` (not serialised): predicted and true z over t = 50..70 for the
    median-NMSE seed at the lowest and the highest diagonal cells, for the attractor plot."""

    points: list
    params: dict
    identifiability: dict
    examples: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"points": jsonable(self.points), "params": jsonable(self.params),
                "identifiability": jsonable(self.identifiability)}

    @classmethod
    def from_dict(cls, d: dict) -> SweepResult:
        return cls(list(d["points"]), dict(d["params"]), dict(d["identifiability"]))

    def betas(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct β_self and β_cross of the grid."""
        bs = sorted({p["beta_self"] for p in self.points})
        bc = sorted({p["beta_cross"] for p in self.points})
        return np.array(bs), np.array(bc)

    def grid(self, key: str) -> np.ndarray:
        """A point quantity as a [len(β_self), len(β_cross)] array (None -> nan)."""
        bs, bc = self.betas()
        out = np.full((len(bs), len(bc)), np.nan)
        for p in self.points:
            i, j = int(np.searchsorted(bs, p["beta_self"])), int(np.searchsorted(bc, p["beta_cross"]))
            v = p.get(key)
            out[i, j] = np.nan if v is None else float(v)
        return out


def _order_parameter_cs(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Time mean of |mean_j e^{iθ_j}| from cos θ and sin θ [S, T, n] -> [S]."""
    c = cos.mean(-1)
    s = sin.mean(-1)
    return np.sqrt(c * c + s * s).mean(-1)


class _Trig:
    """Feature arrays of one cell's phases [S, T, N], each computed once (``trig["sin"]``) and sliced by
    population; ``features(names, cols)`` is :func:`~arbiter.surrogate.readout.features` of ``theta[..., cols]``
    (a view when there is one feature)."""

    def __init__(self, theta: np.ndarray):
        self.theta, self._cache = theta, {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name in ("sin", "cos"):  # torch's vectorised float64 sin / cos: several times numpy's here
                self._cache[name] = getattr(torch, name)(torch.from_numpy(self.theta)).numpy()
            else:
                self._cache[name] = FEATURE_FNS[name](self.theta)
        return self._cache[name]

    def features(self, names: Sequence[str], cols: slice = slice(None)) -> np.ndarray:
        parts = [self[nm][..., cols] for nm in names]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


SHAP_MODES = ("readout", "knockout")


def evaluate_cells(preset: str | Preset, cells, seeds: Iterable[int], *, signal=None, how: str = "ratio",
                   printed: bool = False, method: str = "auto", examples: Sequence[int] = (),
                   max_cells: int | None = 25, shap_mode: str = "readout", dtype: str = "float32",
                   workers: int | None = None, batch_cells: int | None = None,
                   log: Callable[[str], None] | None = None):
    """Simulate and score cells [(β_self, β_cross), ...] with the same seeds; returns (points, arrays, info, examples).

    arrays: per-seed [C, S] arrays (nmse, nmse_x, nmse_y, angle, log_nmse_ratio, c_self, c_cross, R_X, R_Y, drift,
    chosen λ ...); info: timings, substeps, methods; points: the dicts of :class:`SweepResult`. Cells are
    integrated ``max_cells`` at a time (each chunk one batched computation; None: all at once).
    ``shap_mode``: ``"readout"`` (docs/methods/surrogate.md default: NMSE_X, NMSE_Y from the readout restricted to one population)
    or ``"knockout"`` (the docs/methods/surrogate.md option: NMSE of the full readout when only X, or only Y, is driven; two
    extra simulations per chunk). ``dtype`` (default ``"float32"``: the vector field in float32, phases and RK4
    sums in float64; on the default paper sweep per-seed NMSE within 3e-5, angles within 0.004°, c within 1e-7
    of ``"float64"``), ``workers``, ``batch_cells``: see :func:`simulate`; the readouts of the cells also run on
    ``workers`` threads (each cell's sin θ / cos θ are computed once and shared by the X∪Y, X and Y readouts, the
    drift and the order parameters)."""
    p = get_preset(preset)
    check_choice("angle", how, ANGLE_METHODS)
    check_choice("shap_mode", shap_mode, SHAP_MODES)
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 2)
    seeds = [int(s) for s in seeds]
    S, C = len(seeds), len(cells)
    workers = resolve_workers(workers)
    if signal is None:
        signal = make_signal(p)
    keys = ("nmse", "nmse_x", "nmse_y", "angle", "phi_x", "phi_y", "log_nmse_ratio", "c_self", "c_cross",
            "c_self_x", "c_self_y", "c_cross_x", "c_cross_y", "R_X", "R_Y", "drift", "lam_x", "lam_y", "lam_xy")
    arr = {k: np.full((C, S), np.nan) for k in keys}
    points, ex = [], {}
    t_sim = t_read = 0.0
    step = C if not max_cells else max(1, int(max_cells))
    nx_ = p.n_x
    sub_all, meth_all = [], []
    sim_kw = {"signal": signal, "record_from": 0.0, "method": method, "dtype": dtype, "workers": workers,
              "batch_cells": batch_cells}
    for a in range(0, C, step):
        chunk = cells[a:a + step]
        t0 = time.perf_counter()
        sim = simulate(p, chunk[:, 0], chunk[:, 1], seeds, log=log, **sim_kw)
        t_sim += time.perf_counter() - t0
        sub_all += sim.substeps.tolist()
        meth_all += list(sim.method)
        if log:
            log(f"integrated cells {a + 1}-{a + len(chunk)} of {C} ({S} seeds) in {sim.seconds:.1f} s")
        ko = {}
        if shap_mode == "knockout":
            t0 = time.perf_counter()
            for name, q in (("x", p.replace(drive_y=0.0)), ("y", p.replace(drive_x=0.0))):
                ko[name] = simulate(q, chunk[:, 0], chunk[:, 1], seeds, **sim_kw).theta
            t_sim += time.perf_counter() - t0
        t0 = time.perf_counter()
        z = signal.at(sim.times)[:, 2]
        win = windows(sim.times, p.t_fit, p.t_train, p.t_end)
        times = sim.times

        def read(F, keep=False, z=z, times=times):
            return ridge_readout(F, z, times, t_fit=p.t_fit, t_train=p.t_train, t_end=p.t_end, lambdas=p.lambdas,
                                 keep_prediction=keep)

        def score(k, a=a, sim=sim, ko=ko, read=read, win=win):
            """The per-cell work: features (each trigonometric array once), readouts, drift, order parameters."""
            c = a + k
            th = sim.theta[k].astype(np.float64)  # [S, T, N]
            trig = _Trig(th)
            res = {"xy": read(trig.features(p.features), c in examples)}
            if shap_mode == "knockout":
                res["x"] = read(_Trig(ko["x"][k].astype(np.float64)).features(p.features))
                res["y"] = read(_Trig(ko["y"][k].astype(np.float64)).features(p.features))
            else:
                res["x"] = read(trig.features(p.features, slice(0, nx_)))
                res["y"] = read(trig.features(p.features, slice(nx_, None)))
            sin = trig["sin"]
            drift = np.abs(sin[:, win["test"]].mean(1) - sin[:, win["train"]].mean(1)).mean(-1)  # [S]
            R_X = _order_parameter_cs(trig["cos"][..., :nx_], sin[..., :nx_])
            R_Y = _order_parameter_cs(trig["cos"][..., nx_:], sin[..., nx_:])
            return res, drift, R_X, R_Y

        idx = range(len(chunk))
        with torch_threads(1):  # parallel over cells, not inside each operation (see simulate)
            if workers > 1 and len(chunk) > 1:
                with ThreadPoolExecutor(min(workers, len(chunk))) as pool:
                    scored = list(pool.map(score, idx))
            else:
                scored = [score(k) for k in idx]
        for k, (res, drift, R_X, R_Y) in enumerate(scored):
            c = a + k
            nx_s = np.array([r.nmse for r in res["x"]])
            ny_s = np.array([r.nmse for r in res["y"]])
            nxy_s = np.array([r.nmse for r in res["xy"]])
            cs = cell_shap(nx_s, ny_s, nxy_s, how=how, printed=printed)
            c_self, c_cross = sim.c_self[k], sim.c_cross[k]  # [S, 2]
            vals = {"nmse": nxy_s, "nmse_x": nx_s, "nmse_y": ny_s, "angle": np.array(cs.per_seed["angle"]),
                    "phi_x": np.array(cs.per_seed["phi_x"]), "phi_y": np.array(cs.per_seed["phi_y"]),
                    "log_nmse_ratio": np.array(cs.per_seed["log_nmse_ratio"]),
                    "c_self": c_self.mean(1), "c_cross": c_cross.mean(1), "c_self_x": c_self[:, 0],
                    "c_self_y": c_self[:, 1], "c_cross_x": c_cross[:, 0], "c_cross_y": c_cross[:, 1],
                    "R_X": R_X, "R_Y": R_Y, "drift": drift, "lam_x": np.array([r.lam for r in res["x"]]),
                    "lam_y": np.array([r.lam for r in res["y"]]), "lam_xy": np.array([r.lam for r in res["xy"]])}
            for kk, v in vals.items():
                arr[kk][c] = v
            dmed = _median(drift)
            n_drift = int((drift > p.drift_threshold).sum())
            flags = list(cs.flags)
            if n_drift:
                flags.append(f"drift: in {n_drift} of {S} seeds the oscillators' mean sin θ moves by more than "
                             f"{p.drift_threshold} (mean over oscillators) between train [0, {p.t_train}] and test: "
                             f"the readout extrapolates there (per-seed values in per_seed.drift)")
            points.append({
                "beta_self": float(cells[c, 0]), "beta_cross": float(cells[c, 1]),
                "nmse": _median(nxy_s), "nmse_x": _median(nx_s), "nmse_y": _median(ny_s),
                "phi_x": cs.phi_x, "phi_y": cs.phi_y, "angle": cs.angle, "angle_defined": cs.angle_defined,
                "nmse_xy_mean": cs.nmse_xy_mean, "log_nmse_ratio": cs.log_nmse_ratio,
                "c_self": _median(vals["c_self"]), "c_cross": _median(vals["c_cross"]),
                "R_X": _median(R_X), "R_Y": _median(R_Y), "drift": dmed, "drift_flag": bool(n_drift > 0), "drift_seeds": n_drift,
                "substeps": int(sim.substeps[k]), "method": sim.method[k],
                "spread": {kk: _spread(v) for kk, v in vals.items() if not kk.startswith("lam")},
                "per_seed": {kk: np.asarray(v).tolist() for kk, v in vals.items()},
                "flags": flags})
            if c in examples:
                tw = sim.times[win["test"]]
                sel = (tw >= 50 - 1e-9) & (tw <= 70 + 1e-9)
                xyz = signal.at(tw[sel])
                m = int(np.nanargmin(np.abs(nxy_s - np.nanmedian(nxy_s))))  # the seed with the median NMSE
                ex[c] = {"beta_self": float(cells[c, 0]), "beta_cross": float(cells[c, 1]), "seed": seeds[m],
                         "t": tw[sel], "z": xyz[:, 2], "x": xyz[:, 0], "y": xyz[:, 1],
                         "z_hat": res["xy"][m].prediction[sel], "nmse": float(nxy_s[m])}
        t_read += time.perf_counter() - t0
        del sim, ko, scored
    info = {"seconds_integration": t_sim, "seconds_readout": t_read, "substeps": sub_all, "methods": meth_all,
            "lorenz": signal.params, "dtype": dtype, "workers": workers}
    return points, arr, info, ex


def sweep(preset: str | Preset = "paper", grid: int = 5, seeds: int | Iterable[int] = 10, *,
          extended: bool = False, betas: Sequence[float] | None = None, angle: str = "ratio", printed: bool = False,
          method: str = "auto", max_cells: int | None = 25, shap_mode: str = "readout", dtype: str = "float32",
          workers: int | None = None, batch_cells: int | None = None,
          log: Callable[[str], None] | None = None) -> SweepResult:
    """Sweep β_self x β_cross over a log grid (docs/methods/surrogate.md) with paired seeds; one Lorenz run shared by all cells.

    grid: points per axis (5 default, 9 option); extended: up to preset.beta_max_extended; betas: explicit axis
    values instead; seeds: a count (seeds 0..n-1; >= 10 recommended, fewer allowed) or explicit seeds; angle:
    ``"ratio"`` or ``"atan2"`` (docs/methods/shapley.md); printed: the paper's printed SHAP formula (cancels; for comparison);
    shap_mode: ``"readout"`` (default) or ``"knockout"`` (zero one population's drive; see :func:`evaluate_cells`);
    dtype, workers, batch_cells: the integration's field dtype (default float32, see :func:`evaluate_cells` for
    its tolerance; ``"float64"`` reproduces the reference numerics), threads and cells per batch (:func:`simulate`).
    Returns a :class:`SweepResult` whose identifiability holds the ratios for the angle, log NMSE_{X∪Y}, c_self,
    c_cross and c (their mean)."""
    p = get_preset(preset)
    seeds = list(range(int(seeds))) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not seeds:
        fail("sweep: no seeds.")
    axis = np.asarray(betas, dtype=np.float64) if betas is not None else beta_grid(grid, p, extended=extended)
    cells = np.array([(a, b) for a in axis for b in axis])
    t0 = time.perf_counter()
    signal = make_signal(p)
    ex_cells = sorted({0, len(cells) - 1})
    points, arr, info, ex = evaluate_cells(p, cells, seeds, signal=signal, how=angle, printed=printed, method=method,
                                           examples=ex_cells, max_cells=max_cells, shap_mode=shap_mode, dtype=dtype,
                                           workers=workers, batch_cells=batch_cells, log=log)
    c_both = (arr["c_self"] + arr["c_cross"]) / 2.0
    ident = {"angle": identifiability_ratio(arr["angle"]), "log_nmse": identifiability_ratio(np.log(arr["nmse"])),
             "c_self": identifiability_ratio(arr["c_self"]), "c_cross": identifiability_ratio(arr["c_cross"]),
             "c": identifiability_ratio(c_both),
             "log_nmse_ratio": identifiability_ratio(arr["log_nmse_ratio"]),
             "reading": f"ratio = spread of cell means across the β grid / within-cell spread across paired seeds; "
                        f"above {IDENTIFIABLE_ABOVE} (proposed) the quantity depends on β, near or below 1 it does "
                        f"not and results built on it must say so"}
    total = time.perf_counter() - t0
    d = p.to_dict()
    params = {
        "preset": p.name, "preset_params": d, "seeds": seeds, "grid": len(axis), "betas": axis.tolist(),
        "extended": bool(extended), "angle_method": angle, "printed_shap": bool(printed), "method": method,
        "shap_mode": shap_mode,
        "beta_label": BETA_LABEL,
        "numerics": {"dt": p.dt, "substeps_per_cell": info["substeps"], "normaliser_per_cell": info["methods"],
                     "integrator": f"RK4, float64 phases, {dtype} vector field; Lorenz drive by cubic Hermite at "
                                   f"stage times",
                     "t_start": p.t_start, "discarded": [p.t_start, 0.0], "fit": [0.0, p.t_fit],
                     "validate": [p.t_fit, p.t_train], "refit": [0.0, p.t_train], "test": [p.t_train, p.t_end],
                     "lambdas": list(p.lambdas), "features": list(p.features) + ["intercept"],
                     "lorenz": info["lorenz"], "drive": {"gain": p.drive_gain, "scale": p.drive_scale},
                     "c_sampling": f"every {p.c_every} dt over [0, {p.t_end}]"},
        "timings": {"integration_s": info["seconds_integration"], "readout_s": info["seconds_readout"],
                    "total_s": total, "workers": info["workers"]},
        "concentration_curves": _c_curves(arr, cells, axis),
        "summary": _summary(points, axis),
        "notes": _notes(p, printed, shap_mode),
    }
    return SweepResult(points, params, ident, ex)


def _c_curves(arr, cells, axis) -> dict:
    """c_self as a function of β_self (mean over β_cross and seeds) and c_cross of β_cross; also on the diagonal."""
    out = {"beta": axis.tolist(), "c_self_marginal": [], "c_cross_marginal": [], "c_self_diagonal": [],
           "c_cross_diagonal": [], "c_self_range_over_beta_cross": []}
    for b in axis:
        ms = np.isclose(cells[:, 0], b)
        mc = np.isclose(cells[:, 1], b)
        md = ms & mc
        out["c_self_marginal"].append(float(np.nanmean(arr["c_self"][ms])))
        out["c_cross_marginal"].append(float(np.nanmean(arr["c_cross"][mc])))
        out["c_self_diagonal"].append(float(np.nanmean(arr["c_self"][md])))
        out["c_cross_diagonal"].append(float(np.nanmean(arr["c_cross"][md])))
        per = np.nanmean(arr["c_self"][ms], axis=1)
        out["c_self_range_over_beta_cross"].append(float(per.max() - per.min()))
    return out


def _summary(points, axis) -> dict:
    """Descriptive checks of the paper's findings (docs/methods/surrogate.md): low β X-dominated with high error; balanced with the
    lowest error at the top of the grid. Thresholds (proposed): X-dominated = angle < -45°, balanced = |angle| <
    15°."""
    lo, hi = axis.min(), axis.max()
    find = lambda a, b: next(p for p in points if np.isclose(p["beta_self"], a) and np.isclose(p["beta_cross"], b))
    pl, ph = find(lo, lo), find(hi, hi)
    nm = [p["nmse"] for p in points]
    best = points[int(np.nanargmin(nm))]
    al, ah = pl["angle"], ph["angle"]
    angles = [p["angle"] for p in points if p["angle"] is not None]
    return {"angle_low": al, "angle_high": ah, "nmse_low": pl["nmse"], "nmse_high": ph["nmse"],
            "nmse_range": [float(np.nanmin(nm)), float(np.nanmax(nm))],
            "angle_range": [min(angles), max(angles)] if angles else None,
            "lowest_nmse_cell": [best["beta_self"], best["beta_cross"]],
            "paper_finding_low_x_dominated": bool(al is not None and al < -45),
            "paper_finding_high_balanced": bool(ah is not None and abs(ah) < 15),
            "paper_finding_lowest_error_at_high": bool(np.isclose(best["beta_self"], hi)
                                                       and np.isclose(best["beta_cross"], hi))}


def _notes(p: Preset, printed: bool, shap_mode: str = "readout") -> list:
    notes = [f"β is labelled '{BETA_LABEL}', not 'modality preference' (docs/methods/surrogate.md).",
             "Dynamical SHAP restricts the readout to X, Y or both; it does not remove an input, so it is a "
             "different quantity from the input-removal modality Shapley of docs/methods/shapley.md." if shap_mode == "readout" else
             "Dynamical SHAP in 'knockout' mode: NMSE_X (NMSE_Y) is the full readout's NMSE when only X (only Y) "
             "is driven (docs/methods/surrogate.md option).",
             "The Lorenz signal is chaotic: implementations agree only statistically."]
    if p.name == "paper":
        notes.insert(0, "Preset 'paper': with K0 = 200 the coupling dominates the drive; the paper's map is NOT "
                        "expected here (docs/methods/surrogate.md); see the identifiability ratios.")
    if printed:
        notes.append("printed=True: the paper's printed SHAP formula cancels to φ(X) = φ(Y); every angle is 0.")
    return notes


def load_sweep_result(result) -> SweepResult:
    """A SweepResult from itself, its dict, a sweep.json or the folder holding one."""
    if isinstance(result, SweepResult):
        return result
    if isinstance(result, dict):
        return SweepResult.from_dict(result)
    path = Path(result)
    if path.is_dir():
        path = path / "sweep.json"
    if not path.exists():
        fail(f"no sweep at {path} (run `arbiter surrogate sweep --out DIR` first, or let fit run one).")
    return SweepResult.from_dict(json.loads(path.read_text()))
