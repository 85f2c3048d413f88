"""Figures of a surrogate sweep (docs/methods/surrogate.md): the β map of preference arrows coloured by NMSE, and predicted vs true attractors.

Both take a SweepResult (or its dict) and return a matplotlib Figure, saved when a path is given."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .sweep import SweepResult

__all__ = ["arrow_map", "attractor_plot"]


def _as_result(res) -> SweepResult:
    return res if isinstance(res, SweepResult) else SweepResult.from_dict(res)


def arrow_map(result, path: str | Path | None = None, title: str | None = None):
    """Arrows at (log10 β_self, log10 β_cross): direction = preference angle θ (0° right = balanced, +90° up = only
    Y, -90° down = only X), colour = median NMSE_{X∪Y}; a grey cross where the angle is undefined (NMSE >= 1).
    The title states the preset and the angle's identifiability ratio."""
    import matplotlib
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    r = _as_result(result)
    pts = r.points
    lx = np.array([math.log10(p["beta_self"]) for p in pts])
    ly = np.array([math.log10(p["beta_cross"]) for p in pts])
    nm = np.array([np.nan if p["nmse"] is None else p["nmse"] for p in pts], dtype=float)
    ang = np.array([np.nan if p["angle"] is None else p["angle"] for p in pts], dtype=float)
    fig = Figure(figsize=(6.4, 5.4))
    ax = fig.add_subplot(1, 1, 1)
    finite = nm[np.isfinite(nm)]
    norm = colors.Normalize(vmin=float(finite.min()) if finite.size else 0.0,
                            vmax=float(finite.max()) if finite.size and finite.max() > finite.min() else 1.0)
    cmap = matplotlib.colormaps["viridis"]
    step = min(np.diff(np.unique(lx)).min() if len(np.unique(lx)) > 1 else 1.0,
               np.diff(np.unique(ly)).min() if len(np.unique(ly)) > 1 else 1.0)
    L = 0.4 * step
    ok = np.isfinite(ang)
    if ok.any():
        u = np.cos(np.radians(ang[ok])) * L
        v = np.sin(np.radians(ang[ok])) * L
        ax.quiver(lx[ok] - u / 2, ly[ok] - v / 2, u, v, nm[ok], cmap=cmap, norm=norm, angles="xy",
                  scale_units="xy", scale=1, width=0.012)
    if (~ok).any():
        ax.scatter(lx[~ok], ly[~ok], marker="x", color="0.5", s=40, label="angle undefined (NMSE ≥ 1)")
        ax.legend(loc="upper left", fontsize=8)
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="NMSE (X∪Y, median over seeds)")
    pad = 0.6 * step
    ax.set_xlim(lx.min() - pad, lx.max() + pad)
    ax.set_ylim(ly.min() - pad, ly.max() + pad)
    ax.set_xlabel("log10 β_self")
    ax.set_ylabel("log10 β_cross")
    ident = r.identifiability.get("angle", {}).get("ratio")
    preset = r.params.get("preset", "?")
    ax.set_title(title or f"preset '{preset}': preference angle (→ balanced, ↑ Y, ↓ X)\n"
                          f"angle identifiability ratio {ident if ident is None else round(ident, 2)}", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(str(path), dpi=110)
    return fig


def attractor_plot(result, path: str | Path | None = None):
    """For the lowest and highest diagonal cells (median-NMSE seed, X∪Y readout): z(t) true vs predicted, t = 50..70,
    and the (x, z) projection of the true and the predicted attractor."""
    from matplotlib.figure import Figure

    r = _as_result(result)
    ex = [r.examples[k] for k in sorted(r.examples)]
    fig = Figure(figsize=(10, 3.6 * max(1, len(ex))))
    if not ex:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no stored predictions (examples are kept in memory by sweep(), not in sweep.json)",
                ha="center", va="center")
        ax.set_axis_off()
    for i, e in enumerate(ex):
        a1 = fig.add_subplot(len(ex), 2, 2 * i + 1)
        a1.plot(e["t"], e["z"], color="k", lw=1.0, label="true z")
        a1.plot(e["t"], e["z_hat"], color="C1", lw=1.0, ls="--", label="predicted ẑ")
        a1.set_xlabel("t")
        a1.set_ylabel("z")
        a1.set_title(f"β_self={e['beta_self']:.3g}, β_cross={e['beta_cross']:.3g}, seed {e['seed']}: "
                     f"NMSE {e['nmse']:.3g}", fontsize=9)
        a1.legend(fontsize=8)
        a2 = fig.add_subplot(len(ex), 2, 2 * i + 2)
        a2.plot(e["x"], e["z"], color="k", lw=0.8, label="true (x, z)")
        a2.plot(e["x"], e["z_hat"], color="C1", lw=0.8, alpha=0.8, label="predicted (x, ẑ)")
        a2.set_xlabel("x")
        a2.set_ylabel("z")
        a2.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(str(path), dpi=110)
    return fig
