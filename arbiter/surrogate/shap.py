"""Dynamical SHAP of docs/methods/surrogate.md: two-player Shapley values of the readout restricted to X, Y or both, v(S) = -NMSE_S.

Corrected form by default (φ(Y) - φ(X) = NMSE_X - NMSE_Y); the paper's printed form, which cancels, behind a flag."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..util import ToDict, fail
from ..metrics.shapley import preference_angle, shapley

__all__ = ["PLAYERS", "CellShap", "cell_shap", "dynamical_shap"]

PLAYERS = ("X", "Y")


def dynamical_shap(nmse_x: float, nmse_y: float, nmse_xy: float, *, printed: bool = False,
                   nmse_empty: float = 1.0) -> dict:
    """φ(X), φ(Y) of the two-player game v(S) = -NMSE_S, v(∅) = -NMSE_∅ = -1 (the mean predictor).

    Corrected (default): exact Shapley through :func:`arbiter.metrics.shapley`, so
    φ(X) = ½[(1 - NMSE_X) + (NMSE_Y - NMSE_XY)], φ(Y) - φ(X) = NMSE_X - NMSE_Y (positive: Y dominates) and
    φ(X) + φ(Y) = 1 - NMSE_XY (efficiency). ``printed=True``: the formula as printed in [PB], read as the
    telescoping sum φ(X) = ½[(v(X) - v(∅)) + (v(X∪Y) - v(X))], which cancels to ½[v(X∪Y) - v(∅)] for both
    players (φ(X) = φ(Y) whatever the data: kept only to show that; docs/methods/surrogate.md)."""
    vals = [float(nmse_x), float(nmse_y), float(nmse_xy), float(nmse_empty)]
    if not all(math.isfinite(v) for v in vals):
        fail(f"dynamical_shap: NMSE values must be finite, got {vals}.")
    table = {frozenset(): -vals[3], frozenset({"X"}): -vals[0], frozenset({"Y"}): -vals[1],
             frozenset({"X", "Y"}): -vals[2]}
    if printed:
        v = lambda *s: table[frozenset(s)]
        px = 0.5 * ((v("X") - v()) + (v("X", "Y") - v("X")))
        py = 0.5 * ((v("Y") - v()) + (v("X", "Y") - v("Y")))
        return {"phi_x": px, "phi_y": py, "efficiency_gap": px + py - (v("X", "Y") - v()), "printed": True}
    r = shapley(table, list(PLAYERS))
    return {"phi_x": r["X"], "phi_y": r["Y"], "efficiency_gap": r.efficiency_gap, "printed": False}


@dataclass
class CellShap(ToDict):
    """Dynamical SHAP of one β cell over its seeds.

    phi_x, phi_y: means over seeds (φ is averaged BEFORE the angle, docs/methods/surrogate.md); angle: preference_angle of those
    means (``how``), None when the seed-mean NMSE_{X∪Y} >= 1 (no arrow: ``angle_defined`` False, a flag says
    so); log_nmse_ratio: mean over seeds of log(NMSE_Y / NMSE_X), which the angle hides; per_seed: every seed's
    φ, angle (nan where that seed's NMSE_{X∪Y} >= 1) and log ratio."""

    phi_x: float
    phi_y: float
    angle: float | None
    angle_defined: bool
    how: str
    printed: bool
    nmse_xy_mean: float
    log_nmse_ratio: float
    per_seed: dict = field(default_factory=dict)
    flags: list = field(default_factory=list)


def cell_shap(nmse_x: Sequence[float], nmse_y: Sequence[float], nmse_xy: Sequence[float], *, how: str = "ratio",
              printed: bool = False) -> CellShap:
    """Dynamical SHAP and preference angle of a cell from per-seed NMSE of the X-only, Y-only and X∪Y readouts."""
    nx_, ny, nxy = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (nmse_x, nmse_y, nmse_xy))
    if not (nx_.size == ny.size == nxy.size) or nx_.size == 0:
        fail("cell_shap: give one NMSE per seed for X, Y and X∪Y (same non-zero length).")
    per = [dynamical_shap(a, b, c, printed=printed) for a, b, c in zip(nx_, ny, nxy)]
    px = np.array([d["phi_x"] for d in per])
    py = np.array([d["phi_y"] for d in per])
    ang = np.array([preference_angle(a, b, how) if c < 1.0 else math.nan for a, b, c in zip(px, py, nxy)])
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log(ny / nx_)
    mx, my, mxy = float(px.mean()), float(py.mean()), float(nxy.mean())
    flags = []
    if mxy >= 1.0:
        angle, defined = None, False
        flags.append(f"angle undefined: mean NMSE_XY = {mxy:.3g} >= 1 (the readout does no better than the mean)")
    else:
        a = preference_angle(mx, my, how)
        angle, defined = (None, False) if math.isnan(a) else (a, True)
        if not defined:
            flags.append("angle undefined: φ(X) = φ(Y) = 0")
    if printed:
        flags.append("printed form: φ(X) = φ(Y) by construction (the paper's formula cancels); the angle is 0")
    return CellShap(mx, my, angle, defined, how, printed, mxy, float(np.mean(lr)),
                    {"phi_x": px.tolist(), "phi_y": py.tolist(), "angle": ang.tolist(), "log_nmse_ratio": lr.tolist()},
                    flags)
