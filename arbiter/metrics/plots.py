"""Plots of the metric results (docs/methods/logit-lens.md … docs/methods/mfr.md): MAM profiles and their attention / MLP split, LDAR, MFR, I_NSSD, head
scores; and the small figure helpers that :mod:`arbiter.experiments.plots` shares.

Every function draws on ``ax`` / ``axes`` when given (else on a new matplotlib ``Figure``, no pyplot state), saves
to ``path`` when given and returns the Figure. Needs the ``plots`` extra (matplotlib)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["plot_profile", "plot_mam_components", "plot_ldar", "plot_mfr", "plot_nssd", "plot_score_grid"]


def figure_axes(given: Any, n: int, size: tuple[float, float]):
    """(figure, list of n axes): the given ones (one Axes, or n of them), or those of a new Figure."""
    if given is not None:
        axes = list(given) if n > 1 else [given]
        if len(axes) != n:
            raise ValueError(f"this plot draws on {n} axes, got {len(axes)}.")
        return axes[0].figure, axes
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, list(np.atleast_1d(fig.subplots(1, n)))


def finish(fig, path):
    """Save to ``path`` (when given; tight box, so long tick labels stay in the picture) and return the figure."""
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def integer_ticks(*axis) -> None:
    """Integer ticks on the given x/y axes (layers, heads, counts)."""
    from matplotlib.ticker import MaxNLocator

    for a in axis:
        a.set_major_locator(MaxNLocator(integer=True))


def _np(x) -> np.ndarray:
    return (x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float))


def plot_score_grid(grid, title: str = "head scores", path=None, ax=None, cmap: str = "viridis"):
    """Heat map of a [layers, heads] table (NaN cells blank), with a colour bar."""
    g = _np(grid)
    if g.ndim != 2:
        raise ValueError(f"a score grid is [layers, heads], got shape {g.shape}.")
    fig, (a,) = figure_axes(ax, 1, (2.0 + 0.5 * g.shape[1], 1.5 + 0.35 * g.shape[0]))
    im = a.imshow(g, aspect="auto", cmap=cmap)
    a.set(title=title, xlabel="head", ylabel="layer")
    fig.colorbar(im, ax=a)
    integer_ticks(a.xaxis, a.yaxis)
    return finish(fig, path)


def plot_profile(profile, path=None, ax=None, ylabel: str = "MAM (Φ_p − Φ_c)", xlabel: str = "layer"):
    """A :class:`~arbiter.metrics.logit_lens.TargetProfile`: one line per target and their average when it is per layer
    ([layers]); a heat map of the average when it is [layers, positions]; bars when it is one number."""
    a_ = _np(profile.all)
    if a_.ndim > 2:
        raise ValueError(f"a profile of shape {a_.shape} has no plot: average it to [layers] or [layers, positions].")
    fig, (a,) = figure_axes(ax, 1, (6, 3.6))
    series = [("all (mean of targets)", profile.all)] + [
        (f"{t}-instructed (n={n})", v) for t, v, n in (("vision", profile.vision, profile.n_vision),
                                                      ("text", profile.text, profile.n_text)) if v is not None]
    if a_.ndim == 2:
        im = a.imshow(a_, aspect="auto", cmap="RdBu", vmin=-np.nanmax(np.abs(a_)), vmax=np.nanmax(np.abs(a_)))
        fig.colorbar(im, ax=a, label=ylabel)
        a.set(title="all (mean of targets)", xlabel="position", ylabel=xlabel)
        integer_ticks(a.yaxis)
    elif a_.ndim == 1:
        for label, v in series:
            a.plot(range(len(_np(v))), _np(v), "-o", label=label, lw=2.2 if label.startswith("all") else 1.2)
        a.axhline(0, color="grey", lw=0.8)
        a.set(xlabel=xlabel, ylabel=ylabel)
        a.legend(fontsize=8)
        integer_ticks(a.xaxis)
    else:
        a.bar([s[0].split(" ")[0] for s in series], [float(_np(v)) for _, v in series])
        a.set(ylabel=ylabel)
    return finish(fig, path)


def plot_mam_components(components, path=None, ax=None, layer_dim: int = 0):
    """A :class:`~arbiter.metrics.logit_lens.MAMComponents`: the attention and MLP contributions per layer (bars) and
    the MAM after the layer (line), averaged over every dimension but ``layer_dim``."""
    def per_layer(t):
        v = _np(t)
        if v.ndim == 0:
            return v[None]
        return np.moveaxis(v, layer_dim, 0).reshape(v.shape[layer_dim], -1).mean(1)
    attn, mlp, out = per_layer(components.attn), per_layer(components.mlp), per_layer(components.mam_out)
    fig, (a,) = figure_axes(ax, 1, (6, 3.6))
    x = np.arange(len(attn))
    a.bar(x - 0.2, attn, 0.4, label="ΔMAM attention")
    a.bar(x + 0.2, mlp, 0.4, label="ΔMAM MLP")
    a.plot(x, out, "-o", color="k", label="MAM after the layer")
    a.axhline(0, color="grey", lw=0.8)
    a.set(title=f"MAM split per layer ({components.how})", xlabel="layer", ylabel="MAM")
    a.legend(fontsize=8)
    integer_ticks(a.xaxis)
    return finish(fig, path)


def plot_ldar(result, path=None, ax=None):
    """An :class:`~arbiter.metrics.ldar.LDARResult`: the rate per layer, per target, and the chance level."""
    fig, (a,) = figure_axes(ax, 1, (6, 3.6))
    rate = _np(result.rate)
    a.plot(range(len(rate)), rate, "-o", color="k", lw=2.2, label=f"all (n={result.n_samples})")
    for t, v in (result.by_target or {}).items():
        a.plot(range(len(_np(v))), _np(v), "-s", label=f"{t}-instructed")
    a.axhline(result.chance, color="grey", ls="--", lw=0.8, label="chance")
    a.set(title=f"LDAR (TopK={result.k}, final decision from {result.final})", xlabel="layer", ylabel="LDAR",
          ylim=(0, 1.05))
    a.legend(fontsize=8)
    integer_ticks(a.xaxis)
    return finish(fig, path)


def plot_mfr(result, path=None, ax=None):
    """An :class:`~arbiter.metrics.mfr.MFRResult`: overall, vision- and text-instructed MFR with their counts."""
    fig, (a,) = figure_axes(ax, 1, (4.5, 3.4))
    rows = [(f"overall\n(n={result.n})", result.overall), (f"vision\n(n={result.n_vision})", result.vision),
            (f"text\n(n={result.n_text})", result.text)]
    a.bar([r[0] for r in rows], [np.nan if r[1] is None else r[1] for r in rows], color=["grey", "C0", "C1"])
    a.set(title=f"MFR ({result.variant})", ylabel="MFR", ylim=(0, 1.05))
    return finish(fig, path)


def plot_nssd(result, path=None, ax=None, bins: int = 20):
    """An :class:`~arbiter.metrics.nssd.NSSDResult`: the per-sample I_NSSD (histogram) and its mean (line)."""
    fig, (a,) = figure_axes(ax, 1, (5, 3.4))
    v = _np(result.per_sample).reshape(-1)
    v = v[np.isfinite(v)]
    a.hist(v, bins=bins, color="C0")
    a.axvline(result.value, color="C3", label=f"mean {result.value:.4g} (n={result.n})")
    a.axvline(0, color="grey", lw=0.8)
    a.set(title=f"I_NSSD per sample ({result.how})", xlabel="I_NSSD (< 0: the intervention hurts π)",
          ylabel="samples")
    a.legend(fontsize=8)
    return finish(fig, path)
