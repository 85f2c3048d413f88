"""A shipped c(β) calibration of the surrogate (docs/methods/surrogate.md), so that :func:`arbiter.surrogate.fit` needs no hour of
integration inside ``arbiter diagnose``.

A calibration is a compact copy of a full β sweep (:class:`~arbiter.surrogate.sweep.SweepResult` as a dict):
the c(β) curves (``params.concentration_curves``), the identifiability ratios, and per cell and per seed the
quantities a prediction needs (NMSE of the X, Y and X∪Y readouts, c, drift). It loads back as a SweepResult, so
``fit(..., sweep_result=load_calibration())`` inverts its curves; ``fit(..., predict="table")`` also reads the
surrogate's angle and NMSE at the fitted β from its cells (:func:`table_point`) instead of simulating.

The shipped table ``responsive_5x5_5seeds`` (package data, ``arbiter/surrogate/data/``): preset ``responsive``
with its docs/methods/surrogate.md numerics (N = 50 + 50, t in [-10, 80], RK4 dt 0.01 with the automatic substeps, train [0, 30],
test (30, 80]), β_self x β_cross on the default 5 x 5 log grid 0.1..100, seeds 0-4 (docs/methods/surrogate.md recommends >= 10:
fewer allowed, spread larger). It took 70 min of one CPU core. To rebuild it exactly (same code, same numbers)::

    python -m arbiter.surrogate.calibration --out arbiter/surrogate/data/responsive_5x5_5seeds.json

or from a sweep you already ran (``arbiter surrogate sweep --preset responsive --grid 5 --seeds 5 --out DIR``)::

    python -m arbiter.surrogate.calibration --sweep DIR/sweep.json --out arbiter/surrogate/data/responsive_5x5_5seeds.json

Accuracy of the table path (``predict="table"``): the angle and NMSE at a fitted β are interpolated bilinearly in
(log β_self, log β_cross), per seed, from the four surrounding cells (log NMSE interpolated, then the dynamical
SHAP and the angle of the seed-mean φ, as in a sweep cell). Between cells that is an approximation of a new
simulation; on this table the angle's identifiability ratio is ≈ 0.7 (the angle does not depend on β beyond seed
noise, docs/methods/surrogate.md), so the interpolation error is below the seed scatter it reports."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..util import check_choice, fail, jsonable
from ..metrics.shapley import ANGLE_METHODS
from .oscillators import Preset, get_preset
from .shap import cell_shap
from .sweep import SweepResult

__all__ = ["DATA_DIR", "DEFAULT_CALIBRATION", "calibration_info", "calibration_path", "load_calibration",
           "make_calibration", "table_point"]

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CALIBRATION = "responsive_5x5_5seeds"
"""Name of the shipped calibration (a file ``DATA_DIR / (name + ".json")``)."""

_PER_SEED_KEEP = ("nmse", "nmse_x", "nmse_y", "angle", "phi_x", "phi_y", "c_self", "c_cross", "R_X", "R_Y", "drift")
_POINT_KEEP = ("beta_self", "beta_cross", "nmse", "nmse_x", "nmse_y", "phi_x", "phi_y", "angle", "angle_defined",
               "nmse_xy_mean", "log_nmse_ratio", "c_self", "c_cross", "R_X", "R_Y", "drift", "substeps", "method")
# preset fields that change neither the dynamics nor the readout (only a flag threshold)
_FLAG_ONLY_FIELDS = ("drift_threshold",)


def calibration_path(name: str = DEFAULT_CALIBRATION) -> Path:
    """The JSON file of a shipped calibration (``name``) or ``name`` itself when it is a path to a file."""
    p = Path(name)
    if p.suffix == ".json" and p.exists():
        return p
    q = DATA_DIR / f"{name}.json"
    if not q.exists():
        shipped = sorted(f.stem for f in DATA_DIR.glob("*.json")) if DATA_DIR.is_dir() else []
        fail(f"no calibration {name!r} (not a .json file, not shipped; shipped: {shipped}). Build one with "
             "`python -m arbiter.surrogate.calibration --out FILE.json`.")
    return q


def load_calibration(name: str = DEFAULT_CALIBRATION) -> SweepResult:
    """A calibration as a :class:`SweepResult` (usable as ``fit(sweep_result=...)``); ``name``: shipped name or path."""
    d = json.loads(calibration_path(name).read_text())
    if "concentration_curves" not in d.get("params", {}):
        fail(f"{calibration_path(name)} is not a calibration (no params.concentration_curves).")
    return SweepResult.from_dict(d)


def calibration_info(sweep: SweepResult, name: str | None = None) -> dict:
    """What a report says about the calibration it used: name, file, preset, grid, seeds, provenance, ratios."""
    p = sweep.params
    ident = sweep.identifiability or {}
    return jsonable({
        "name": name, "file": str(calibration_path(name)) if name else None,
        "preset": p.get("preset"), "grid": p.get("grid"), "betas": p.get("betas"), "seeds": p.get("seeds"),
        "provenance": p.get("provenance"),
        "identifiability_ratio": {k: (ident.get(k) or {}).get("ratio") for k in ("angle", "log_nmse", "c_self",
                                                                               "c_cross")},
    })


def make_calibration(sweep, preset: str | Preset | None = None, provenance: dict | None = None) -> dict:
    """The compact calibration dict of a sweep (SweepResult, its dict, or a sweep.json path).

    Keeps params (with ``concentration_curves``), identifiability and, per cell, the scalars and the per-seed
    NMSE / φ / angle / c / R / drift; drops the spread summaries and λ. ``preset``: when given, the sweep's preset
    must equal it in every parameter that affects the dynamics or the readout (a difference in ``drift_threshold``
    only is accepted); its parameters are then stored and each cell's ``drift_seeds`` / ``drift_flag`` recomputed
    from the per-seed drift with its threshold. ``provenance``: stored under ``params.provenance``."""
    from .sweep import load_sweep_result

    r = load_sweep_result(sweep)
    params = json.loads(json.dumps(r.params))
    if preset is not None:
        p = get_preset(preset)
        old = get_preset(params.get("preset_params") or params.get("preset", "paper")).to_dict()
        new = p.to_dict()
        diff = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k] and k not in _FLAG_ONLY_FIELDS}
        if diff:
            fail(f"make_calibration: the sweep's preset differs from {p.name!r} in {diff}; rerun the sweep.")
        params["preset_params"] = new
        params["preset"] = p.name
    threshold = float((params.get("preset_params") or {}).get("drift_threshold", 0.25))
    points = []
    for pt in r.points:
        q = {k: pt.get(k) for k in _POINT_KEEP if k in pt}
        ps = pt.get("per_seed") or {}
        q["per_seed"] = {k: ps[k] for k in _PER_SEED_KEEP if k in ps}
        drift = np.asarray(ps.get("drift", []), dtype=np.float64)
        q["drift_seeds"] = int((drift > threshold).sum())
        q["drift_flag"] = q["drift_seeds"] > 0
        points.append(q)
    if provenance:
        params["provenance"] = provenance
    return jsonable({"points": points, "params": params, "identifiability": r.identifiability})


def _bracket(axis: np.ndarray, value: float) -> tuple[int, int, float]:
    """Indices (i, j) around value on a sorted log axis and the weight of j (0 at i, 1 at j); clamped at the ends."""
    la, lv = np.log(axis), math.log(value)
    if lv <= la[0]:
        return 0, 0, 0.0
    if lv >= la[-1]:
        n = len(axis) - 1
        return n, n, 0.0
    j = int(np.searchsorted(la, lv))
    i = j - 1
    return i, j, float((lv - la[i]) / (la[j] - la[i]))


def table_point(sweep, beta_self: float, beta_cross: float, how: str = "ratio") -> dict:
    """The surrogate's NMSE and dynamical-SHAP angle at (β_self, β_cross) read from a sweep's cells, no simulation.

    Per seed, log NMSE_X, NMSE_Y and NMSE_{X∪Y} are interpolated bilinearly in (log β_self, log β_cross) between
    the four surrounding cells (β outside the grid: clamped to its edge, flagged); then :func:`cell_shap` gives φ
    (seed means), the angle (``how``; None when the seed-mean NMSE_{X∪Y} >= 1) and log(NMSE_Y / NMSE_X), as in a
    sweep cell. Seeds with a non-finite NMSE in any of those cells are dropped (flagged)."""
    from .sweep import load_sweep_result

    check_choice("how", how, ANGLE_METHODS)
    r = load_sweep_result(sweep)
    if not r.points or "per_seed" not in r.points[0]:
        fail("table_point: the sweep has no per-seed cell values (a calibration or a full sweep.json is needed).")
    bs_axis, bc_axis = r.betas()
    flags = []
    for name, b, axis in (("beta_self", beta_self, bs_axis), ("beta_cross", beta_cross, bc_axis)):
        if not (b is not None and math.isfinite(b) and b > 0):
            fail(f"table_point: {name}={b} must be a positive number.")
        if b < axis[0] * (1 - 1e-9) or b > axis[-1] * (1 + 1e-9):
            flags.append(f"{name} = {b:.4g} is outside the table's β range [{axis[0]:.4g}, {axis[-1]:.4g}]: the "
                         f"edge cells are used")
    cell = {}
    for p in r.points:
        i = int(np.argmin(np.abs(np.log(bs_axis) - math.log(p["beta_self"]))))
        j = int(np.argmin(np.abs(np.log(bc_axis) - math.log(p["beta_cross"]))))
        cell[(i, j)] = p
    i0, i1, wi = _bracket(bs_axis, beta_self)
    j0, j1, wj = _bracket(bc_axis, beta_cross)
    corners = [((i0, j0), (1 - wi) * (1 - wj)), ((i1, j0), wi * (1 - wj)), ((i0, j1), (1 - wi) * wj),
               ((i1, j1), wi * wj)]
    missing = [ij for ij, _ in corners if ij not in cell]
    if missing:
        fail(f"table_point: the sweep has no cell at grid indices {missing}.")
    seeds = list(r.params.get("seeds") or [])
    S = len(cell[(i0, j0)]["per_seed"]["nmse"])
    logs = {}
    for key in ("nmse_x", "nmse_y", "nmse"):
        acc = np.zeros(S)
        for ij, w in corners:
            if w > 0:
                with np.errstate(divide="ignore", invalid="ignore"):
                    acc = acc + w * np.log(np.asarray(cell[ij]["per_seed"][key], dtype=np.float64))
        logs[key] = acc
    ok = np.isfinite(logs["nmse_x"]) & np.isfinite(logs["nmse_y"]) & np.isfinite(logs["nmse"])
    if not ok.any():
        fail("table_point: no seed has finite NMSE in the surrounding cells.")
    if not ok.all():
        flags.append(f"{int((~ok).sum())} of {S} seeds dropped (non-finite NMSE in a surrounding cell)")
    nx_, ny, nxy = (np.exp(logs[k][ok]) for k in ("nmse_x", "nmse_y", "nmse"))
    cs = cell_shap(nx_, ny, nxy, how=how)
    flags += list(cs.flags)
    drift = sum(int(cell[ij].get("drift_seeds", 0) or 0) for ij, w in corners if w > 0)
    if drift:
        flags.append(f"drift: {drift} seed-cells among the surrounding cells extrapolate (mean sin θ moves between "
                     "train and test)")
    used = sorted({ij for ij, w in corners if w > 0})
    return jsonable({
        "beta_self": float(beta_self), "beta_cross": float(beta_cross), "nmse": float(np.median(nxy)),
        "nmse_x": float(np.median(nx_)), "nmse_y": float(np.median(ny)), "phi_x": cs.phi_x, "phi_y": cs.phi_y,
        "angle": cs.angle, "angle_defined": cs.angle_defined, "nmse_xy_mean": cs.nmse_xy_mean,
        "log_nmse_ratio": cs.log_nmse_ratio, "seeds": [s for s, k in zip(seeds, ok) if k] if seeds else None,
        "cells": [[float(bs_axis[i]), float(bc_axis[j])] for i, j in used],
        "per_seed": {"nmse": nxy.tolist(), "nmse_x": nx_.tolist(), "nmse_y": ny.tolist(), **cs.per_seed},
        "method": "table: per-seed log NMSE interpolated bilinearly in (log β_self, log β_cross) between the "
                  "surrounding cells, then dynamical SHAP of the seed means (no simulation)",
        "flags": flags,
    })


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m arbiter.surrogate.calibration",
                                 description="Build a c(β) calibration table (compact sweep) for arbiter diagnose.")
    ap.add_argument("--out", required=True, help="calibration JSON to write")
    ap.add_argument("--sweep", default=None, help="an existing sweep.json to compact (else a sweep is run: ~70 min "
                                                  "of one CPU core for the default)")
    ap.add_argument("--preset", default="responsive", choices=["paper", "responsive"])
    ap.add_argument("--grid", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    from .sweep import sweep

    log = lambda m: print(f"[arbiter calibration] {m}", file=sys.stderr, flush=True)
    if args.sweep:
        src = args.sweep
        cmd = f"compacted from {args.sweep}"
    else:
        log(f"sweep: preset {args.preset}, {args.grid} x {args.grid}, seeds 0-{args.seeds - 1}")
        src = sweep(args.preset, args.grid, args.seeds, log=log)
        cmd = f"sweep(preset={args.preset!r}, grid={args.grid}, seeds={args.seeds})"
    d = make_calibration(src, preset=args.preset,
                         provenance={"built_by": "python -m arbiter.surrogate.calibration", "from": cmd})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, separators=(",", ":")))
    tmp.replace(out)
    log(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
