"""Plots of the conflict results (docs/methods/mam.md … docs/methods/mfr.md): MAM / LDAR, the knockout map, head scores, blocking, amplification and
each ranking's blocking curves, drawn from the results' ``to_dict()`` form, so a report read back from JSON draws alike.

Every function takes the result or its dict, draws on ``ax`` / ``axes`` when given (else on a new matplotlib
``Figure``, no pyplot state), saves to ``path`` when given and returns the Figure. Needs the ``plots`` extra."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..metrics.plots import figure_axes, finish, integer_ticks, plot_score_grid

__all__ = ["plot_mam_ldar", "plot_knockout_map", "plot_head_scores", "plot_blocking", "plot_amplification",
           "plot_blocking_agreement"]


def _dict(result: Any) -> dict:
    return result.to_dict() if hasattr(result, "to_dict") else result


def plot_mam_ldar(result, path=None, axes=None):
    """MAM per layer at the last token and at the instruction anchors (dotted), by target, and LDAR per layer: a
    :class:`~arbiter.experiments.baseline.BaselineResult` or any dict with ``mam`` (``mam_instruction``) and
    ``ldar`` (a report)."""
    d = _dict(result)
    fig, (a0, a1) = figure_axes(axes, 2, (10, 3.6))
    for i, (t, marker) in enumerate((("vision", "o"), ("text", "s"))):
        v = (d.get("mam") or {}).get(t) or []
        if v:
            a0.plot(range(len(v)), v, f"-{marker}", color=f"C{i}", label=f"{t}-instructed, last token")
        v = (d.get("mam_instruction") or {}).get(t) or []
        if v:
            a0.plot(range(len(v)), v, f":{marker}", color=f"C{i}", mfc="none", label=f"{t}-instructed, instruction")
    a0.axhline(0, color="grey", lw=0.8)
    a0.set(title="MAM (logit lens)", xlabel="layer", ylabel="Φ_p − Φ_c")
    if a0.get_legend_handles_labels()[0]:  # below the axes: four curves leave no free corner inside
        a0.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    ld = [x if x is not None else float("nan") for x in d.get("ldar") or []]
    a1.plot(range(len(ld)), ld, "-o", color="C2", label="LDAR")
    a1.axhline(0.5, color="grey", ls="--", lw=0.8, label="chance")
    a1.set(title="LDAR (instruction anchors, TopK=2)", xlabel="layer", ylim=(0, 1.05))
    a1.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    integer_ticks(a0.xaxis, a1.xaxis)
    return finish(fig, path)


def plot_knockout_map(result, path=None, ax=None):
    """I_NSSD per (edge family, centre layer): a :class:`~arbiter.experiments.knockout_map.KnockoutMap` or a dict
    with ``entries`` and ``window``. Cells carry their value (up to 16 centre layers); an edge family whose groups
    no sample has (``edge_present`` false: nothing was cut) is a grey row labelled "(empty)", not a 0."""
    d = _dict(result)
    entries = d.get("entries") or []
    names: list[str] = []
    for e in entries:
        if f"{e['src']}→{e['dst']}" not in names:
            names.append(f"{e['src']}→{e['dst']}")
    centers = sorted({e["center"] for e in entries})
    grid = np.full((len(names), len(centers)), np.nan)
    empty = np.zeros((len(names), len(centers)), dtype=bool)
    for e in entries:
        i, j = names.index(f"{e['src']}→{e['dst']}"), centers.index(e["center"])
        grid[i, j] = e["nssd"] if e["nssd"] is not None else np.nan
        empty[i, j] = e.get("edge_present") is False
    grid[empty] = np.nan                                   # not measured: no value to colour
    fig, (a,) = figure_axes(ax, 1, (max(5, 0.6 * len(centers) + 3.5), 0.35 * len(names) + 1.5))
    lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    import matplotlib

    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#d9d9d9")
    im = a.imshow(grid if grid.size else np.zeros((1, 1)), cmap=cmap, vmin=-(lim or 1.0), vmax=lim or 1.0,
                  aspect="auto")
    row_empty = empty.all(1) if empty.size else np.zeros(len(names), dtype=bool)
    a.set_yticks(range(len(names)), [f"{n} (empty)" if row_empty[i] else n for i, n in enumerate(names)])
    a.set_xticks(range(len(centers)), centers)
    if len(centers) <= 16:
        for i in range(len(names)):
            for j in range(len(centers)):
                v = grid[i, j]
                text = "empty" if empty[i, j] else ("n/a" if not np.isfinite(v) else f"{v + 0.0:.2f}")
                text = "0.00" if text == "-0.00" else text  # a value that rounds to 0 is 0, unsigned
                dark = np.isfinite(v) and abs(v) > 0.6 * (lim or 1.0)
                a.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "#333333")
    a.set(title=f"Knockout map: I_NSSD (window {d.get('window')})", xlabel="centre layer")
    fig.colorbar(im, ax=a)
    return finish(fig, path)


def plot_head_scores(ranking, path=None, axes=None, top=None, fraction: float = 0.05, n_layers: int | None = None):
    """Heat map of the (layer, head) scores and the TopG heads per layer: a
    :class:`~arbiter.experiments.heads.HeadRanking` or a dict with ``method`` and ``ranking``. ``top``: the TopG
    heads (default: the first round(fraction · ranked heads) of the ranking, :func:`arbiter.metrics.top_g`'s rule);
    ``n_layers`` (default: the highest ranked layer + 1)."""
    d = _dict(ranking)
    rows = d.get("ranking") or []
    if not rows:
        raise ValueError("the ranking has no scored head to plot.")
    n_layers = n_layers or max(r["layer"] for r in rows) + 1
    grid = np.full((n_layers, max(r["head"] for r in rows) + 1), np.nan)
    for r in rows:
        grid[r["layer"], r["head"]] = r["score"]
    if top is None:
        k = max(1, int(math.floor(fraction * len(rows) + 0.5 + 1e-9)))
        top = [(r["layer"], r["head"]) for r in rows[:k]]
    fig, (a0, a1) = figure_axes(axes, 2, (10, 3.6))
    plot_score_grid(grid, title=f"head scores ({d.get('method')})", ax=a0)
    a1.bar(range(n_layers), np.bincount([h[0] for h in top], minlength=n_layers))
    a1.set(title=f"TopG heads per layer ({len(top)} head{'s' if len(top) != 1 else ''})", xlabel="layer",
           ylabel="count")
    integer_ticks(a1.xaxis, a1.yaxis)  # layers and counts are integers
    return finish(fig, path)


def plot_blocking(result, path=None, ax=None):
    """MFR on correct samples: clean, TopG blocked, random head sets blocked (mean ± sd): a
    :class:`~arbiter.experiments.heads.BlockingResult` or its dict."""
    b = _dict(result)
    fig, (a,) = figure_axes(ax, 1, (5, 3.4))
    rnd = b.get("mfr_random") or []
    if b.get("n_samples"):
        names, vals, err = ["base", "TopG"], [b["mfr_base"], b["mfr_top"]], [0.0, 0.0]
        if rnd:  # the control, when random sets were drawn
            names.append("random")
            vals.append(float(np.mean(rnd)))
            err.append(float(np.std(rnd, ddof=1)) if len(rnd) > 1 else 0.0)
        a.bar(names, vals, yerr=err, color=["grey", "C3", "C0"][:len(names)])
    else:
        a.text(0.5, 0.5, "nothing blocked\n(no correct sample or no TopG head)", ha="center", va="center",
               transform=a.transAxes)
    a.set(title=f"Blocking on correct samples (n={b.get('n_samples')})", ylabel="MFR", ylim=(0, 1.05))
    return finish(fig, path)


def plot_amplification(result, path=None, ax=None):
    """Restored fraction of failures per alpha, TopG against random head sets: a
    :class:`~arbiter.experiments.heads.AmplificationResult` or its dict."""
    r = _dict(result)
    fig, (a,) = figure_axes(ax, 1, (5, 3.4))
    if r.get("restored"):
        a.plot(r["alpha"], r["restored"], "-o", label="TopG")
        a.errorbar(r["alpha"], r["restored_random_mean"], yerr=r["restored_random_sd"], fmt="-s",
                   label="random heads")
        a.legend()
    else:  # no failed sample among those diagnosed: say so instead of an empty panel
        a.text(0.5, 0.5, "no failures to restore among these samples\n(arbiter steer runs the same experiment "
               "on a\ndata set with failures)", ha="center", va="center", transform=a.transAxes)
    a.set(title=f"Amplification on failures (n={r.get('n_failed')})", xlabel="alpha", ylabel="restored fraction",
          ylim=(0, 1.05))
    return finish(fig, path)


def plot_blocking_agreement(result, path=None, axes=None):
    """Each ranking's deletion curve (drop of the final MAM with its top k heads zeroed) and the MFR left, the
    reference in black, random head orders dotted: a :class:`~arbiter.experiments.heads.BlockingAgreement` or its
    dict."""
    d = _dict(result)
    if not d.get("curves"):
        raise ValueError("the blocking agreement has no curve (no correct sample was blocked).")
    fig, (a0, a1) = figure_axes(axes, 2, (10, 3.4))
    for i, (m, c) in enumerate(d["curves"].items()):
        style = dict(lw=2.2, color="k") if m == d["reference"] else dict(color=f"C{i}")
        a0.plot(d["ks"], c["margin_drop"], "-o", label=m, **style)
        a1.plot(d["ks"], c["mfr"], "-o", label=m, **style)
    rnd = d.get("random") or {}
    if rnd.get("margin_drop_mean"):
        a0.plot(d["ks"], rnd["margin_drop_mean"], ":", color="grey", label=f"random ({rnd['n']} orders)")
        a1.plot(d["ks"], rnd["mfr_mean"], ":", color="grey", label=f"random ({rnd['n']} orders)")
    a0.set(title="Deletion curves: each ranking's top k heads zeroed", xlabel="k (heads)",
           ylabel="drop of the final MAM")
    a1.set(title=f"MFR on correct samples (n={d.get('n_samples')})", xlabel="k (heads)", ylabel="MFR",
           ylim=(0, 1.05))
    a0.legend(fontsize=8)
    integer_ticks(a0.xaxis, a1.xaxis)
    return finish(fig, path)
