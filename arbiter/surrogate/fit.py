"""Fit the surrogate's β to a recorded MLLM (docs/methods/surrogate.md, proposed bridge): attention concentration per layer from a Trace.

Inverts the tabulated c(β) curves of a preset (monotone in log β; clipped and flagged outside), then simulates."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..util import ToDict, check_choice, fail, jsonable
from ..trace import site_key
from .oscillators import Preset, get_preset
from .sweep import IDENTIFIABLE_ABOVE, SweepResult, evaluate_cells, load_sweep_result, sweep

__all__ = [
    "ConcentrationTable",
    "FitResult",
    "cached_sweep",
    "concentration",
    "concentration_table",
    "fit",
    "merge_concentrations",
    "trace_concentrations",
]

COUNTS = ("visible", "all")
CURVES = ("marginal", "diagonal")


# ----------------------------------------------------------------------------------------------- the MLLM side


def concentration(probs: torch.Tensor, key_mask: torch.Tensor, visible: torch.Tensor | None = None,
                  min_keys: int = 2) -> torch.Tensor:
    """exp(H(p restricted to the keys, renormalised)) / key count for each row of probs [..., K].

    key_mask [K] or [..., K]: the key set; visible (same shape as probs or broadcastable; None = all): keys
    the row can attend to; the count is the number of visible keys in the set. Rows with no mass on the set or
    fewer than ``min_keys`` visible keys give nan."""
    p = probs.to(torch.float64) * key_mask.to(torch.float64)
    vis = key_mask.to(torch.bool) if visible is None else (key_mask.to(torch.bool) & visible.to(torch.bool))
    vis = vis.expand_as(p)
    mass = p.sum(-1)
    q = p / mass.clamp_min(1e-300)[..., None]
    ent = -torch.where(q > 0, q * torch.log(q.clamp_min(1e-300)), torch.zeros_like(q)).sum(-1)
    cnt = vis.sum(-1).to(torch.float64)
    c = torch.exp(ent) / cnt.clamp_min(1.0)
    bad = (mass <= 0) | (cnt < min_keys)
    return torch.where(bad, torch.full_like(c, math.nan), c)


def probs_concentrations(P: torch.Tensor, rows: torch.Tensor, row_mask: torch.Tensor, x_mask: torch.Tensor,
                         y_mask: torch.Tensor, *, count: str = "visible", min_keys: int = 2) -> dict:
    """One layer's concentrations (see :func:`trace_concentrations`) from tensors: ``P`` [batch, heads, rows, keys]
    attention probabilities, ``rows`` [rows] their absolute positions, ``row_mask`` [batch, rows] which sample owns
    a row, ``x_mask`` / ``y_mask`` [batch, length >= keys and > every row position] the two token groups."""
    check_choice("count", count, COUNTS)
    P = P.to(torch.float64)
    if P.dim() != 4:
        fail(f"attention probabilities of shape {tuple(P.shape)}; expected [batch, heads, rows, keys].")
    b, _h, R, K = P.shape
    rows, rmask = rows.to(torch.long), row_mask.to(torch.bool)
    if rows.shape != (R,) or rmask.shape != (b, R):
        fail(f"{R} attention rows of {b} samples but row positions {tuple(rows.shape)} and row mask "
             f"{tuple(rmask.shape)}.")
    mx, my = x_mask.to(torch.bool), y_mask.to(torch.bool)
    kpos = torch.arange(K)
    vals = {k: [] for k in ("c_self_x", "c_cross_x", "c_self_y", "c_cross_y")}
    nrows = {"x": 0, "y": 0}
    for i in range(b):
        for q_name, q_mask, own, oth in (("x", mx, mx, my), ("y", my, my, mx)):
            sel = rmask[i] & q_mask[i, rows]
            if not bool(sel.any()):
                continue
            nrows[q_name] += int(sel.sum())
            Pi = P[i][:, sel]  # [h, r, K]
            qpos = rows[sel]
            vis = None
            if count == "visible":
                vis = (kpos[None, :] <= qpos[:, None])[None] | (Pi > 0)
            for key_name, kmask in (("self", own[i, :K]), ("cross", oth[i, :K])):
                c = concentration(Pi, kmask, vis, min_keys)  # [h, r]
                ch = torch.nanmean(c, dim=1)  # rows -> per head
                vals[f"c_{key_name}_{q_name}"].append(float(torch.nanmean(ch)) if bool(torch.isfinite(ch).any())
                                                      else math.nan)
    entry = {}
    for k, v in vals.items():
        v = np.array(v, dtype=np.float64)
        entry[k] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
    entry["c_self"] = _nanmean([entry["c_self_x"], entry["c_self_y"]])
    entry["c_cross"] = _nanmean([entry["c_cross_x"], entry["c_cross_y"]])
    entry["n_rows_x"], entry["n_rows_y"] = nrows["x"], nrows["y"]
    return entry


def concentrations_result(per: dict, x: str, y: str, count: str, min_keys: int) -> dict:
    """The dict :func:`trace_concentrations` returns, from its per-layer entries ({layer: entry})."""
    overall = {k: _nanmean([per[l][k] for l in per]) for k in _C_KEYS}
    return {"layers": [int(l) for l in per], "per_layer": per, "overall": overall, "x": x, "y": y,
            "count": count, "min_keys": min_keys}


def trace_concentrations(trace, x: str = "image", y: str = "text", *, count: str = "visible", min_keys: int = 2,
                         layers: Sequence[int] | None = None, site: str = "attn.probs") -> dict:
    """Per layer, the attention concentration of X-query rows over X keys (self) and over Y keys (cross), and of
    Y-query rows over Y keys (self) and over X keys (cross), averaged over rows, then heads, then samples.

    Needs the trace's ``attn.probs`` [batch, heads, rows, keys] per layer and ``trace.meta["groups"]``
    (TokenGroups.to_dict); row positions and which sample owns a row from the trace's recorded rows (else rows =
    all positions when rows == keys). ``count`` (proposed): ``"visible"`` divides exp(H) by the keys of the set
    the row can see (key position <= query position, or non-zero probability: bidirectional image blocks),
    ``"all"`` by every key of the set. Rows with fewer than ``min_keys`` such keys are skipped (a single key
    would read as uniform). Returns {"layers", "per_layer": {layer: {...}}, "overall": layer means, "x", "y"}."""
    from ..groups import TokenGroups

    check_choice("count", count, COUNTS)
    if "groups" not in trace.meta:
        fail("trace_concentrations: the trace has no meta['groups'] (record it through a Lens with groups).")
    groups = TokenGroups.from_dict(trace.meta["groups"])
    for g in (x, y):
        if g not in groups:
            fail(f"trace_concentrations: no token group {g!r} in the trace; it has {groups.names}.")
    layers = trace.layers(site) if layers is None else list(layers)
    if not layers:
        fail(f"trace_concentrations: the trace has no '{site}' tensors (record attention probabilities).")
    recorded = trace.rows(site)
    per = {}
    for layer in layers:
        P = trace.site(site, layer)
        if P.dim() != 4:
            fail(f"{site_key(site, layer)} has shape {tuple(P.shape)}; expected [batch, heads, rows, keys].")
        b, _h, R, K = P.shape
        if recorded is not None:
            rows, rmask = recorded
        elif R == K:
            rows, rmask = torch.arange(K), torch.ones(b, R, dtype=torch.bool)
        else:
            fail(f"{site_key(site, layer)} has {R} rows and {K} keys but the trace has no recorded row positions.")
        length = max(K, int(rows.max()) + 1)
        per[int(layer)] = probs_concentrations(P, rows, rmask, groups.mask(x, length=length),
                                               groups.mask(y, length=length), count=count, min_keys=min_keys)
    return concentrations_result(per, x, y, count, min_keys)


_C_KEYS = ("c_self", "c_cross", "c_self_x", "c_self_y", "c_cross_x", "c_cross_y")


def merge_concentrations(parts: Sequence[tuple[float, dict]]) -> dict:
    """One :func:`trace_concentrations` dict from several (weight, dict) parts, e.g. one per sample (weight 1) or
    per batch (weight = its samples): per layer, each of c_self_x, c_self_y, c_cross_x, c_cross_y is the weighted
    mean over the parts where it is finite, then c_self / c_cross are the means of their x and y parts (as in
    :func:`trace_concentrations`; with one part per sample the result equals that function on one trace of all
    the samples); row counts add up; ``overall`` is again the mean over layers. The parts must share x, y, count
    and min_keys."""
    parts = [(float(w), d) for w, d in parts if d is not None]
    if not parts:
        fail("merge_concentrations: no parts.")
    first = parts[0][1]
    for _, d in parts[1:]:
        for k in ("x", "y", "count", "min_keys"):
            if d.get(k) != first.get(k):
                fail(f"merge_concentrations: parts disagree on {k!r} ({first.get(k)!r} vs {d.get(k)!r}).")
    layers = sorted({int(l) for _, d in parts for l in d["layers"]})
    per = {}
    for layer in layers:
        have = [(w, d["per_layer"].get(layer, d["per_layer"].get(str(layer)))) for w, d in parts]
        have = [(w, e) for w, e in have if e is not None]
        entry = {}
        for k in _C_KEYS[2:]:
            vw = [(e[k], w) for w, e in have if e.get(k) is not None and math.isfinite(e[k])]
            entry[k] = sum(v * w for v, w in vw) / sum(w for _, w in vw) if vw and sum(w for _, w in vw) > 0 \
                else math.nan
        entry["c_self"] = _nanmean([entry["c_self_x"], entry["c_self_y"]])
        entry["c_cross"] = _nanmean([entry["c_cross_x"], entry["c_cross_y"]])
        entry["n_rows_x"] = sum(int(e.get("n_rows_x", 0)) for _, e in have)
        entry["n_rows_y"] = sum(int(e.get("n_rows_y", 0)) for _, e in have)
        per[layer] = entry
    overall = {k: _nanmean([per[l][k] for l in per]) for k in _C_KEYS}
    return {"layers": layers, "per_layer": per, "overall": overall, "x": first.get("x"), "y": first.get("y"),
            "count": first.get("count"), "min_keys": first.get("min_keys"), "parts": len(parts)}


def _nanmean(v) -> float:
    a = np.array(v, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else math.nan


# ----------------------------------------------------------------------------------------------- the c(β) table


@dataclass
class ConcentrationTable(ToDict):
    """c_self(β_self) and c_cross(β_cross) of a preset and seed set, tabulated from a sweep.

    ``curve`` (proposed): ``"marginal"`` averages c_self over β_cross (and seeds) at each β_self (and c_cross
    over β_self); ``"diagonal"`` uses the β_self = β_cross cells. ``flags`` say where a curve had to be made
    monotone or is flat. Inversion: PCHIP of log β against c (monotone), clipped at the ends."""

    beta: list
    c_self: list
    c_cross: list
    curve: str
    preset: str
    seeds: list
    flags: list = field(default_factory=list)

    def invert(self, c: float, which: str = "self") -> tuple[float | None, list]:
        """β for a measured concentration; (None, flags) when the curve is flat or c is nan."""
        from scipy.interpolate import PchipInterpolator

        check_choice("which", which, ("self", "cross"))
        flags = []
        if c is None or not math.isfinite(c):
            return None, [f"c_{which} is not available (no rows with enough keys)"]
        beta = np.asarray(self.beta, dtype=np.float64)
        cv = np.asarray(self.c_self if which == "self" else self.c_cross, dtype=np.float64)
        if cv.shape != beta.shape or beta.size < 1:
            fail(f"concentration table: {beta.size} β values but {cv.size} c_{which} values.")
        cv = np.minimum.accumulate(cv)  # c falls with β; a noisy rise is flattened (flagged at tabulation)
        keep = np.concatenate([[True], np.diff(cv) < -1e-9 * np.maximum(1.0, np.abs(cv[:-1]))])
        b_k, c_k = beta[keep], cv[keep]
        if len(c_k) < 2:
            return None, [(f"c_{which}(β) is flat over the table ({cv.min():.4g}..{cv.max():.4g}): β is not "
                          f"identifiable from c under preset '{self.preset}'")]
        lo, hi = float(c_k.min()), float(c_k.max())
        if c > hi:
            flags.append(f"c_{which} = {c:.4g} is above the tabulated range [{lo:.4g}, {hi:.4g}]: clipped to "
                         f"β = {b_k[0]:.4g} (the lowest tabulated β), not extrapolated")
            return float(b_k[0]), flags
        if c < lo:
            flags.append(f"c_{which} = {c:.4g} is below the tabulated range [{lo:.4g}, {hi:.4g}]: clipped to "
                         f"β = {b_k[-1]:.4g} (the highest tabulated β), not extrapolated")
            return float(b_k[-1]), flags
        f = PchipInterpolator(c_k[::-1], np.log(b_k[::-1]))
        return float(np.exp(f(c))), flags


def concentration_table(result, curve: str = "marginal") -> ConcentrationTable:
    """The c(β) curves of a sweep (:class:`SweepResult`, its dict, or a path to sweep.json)."""
    check_choice("curve", curve, CURVES)
    r = load_sweep_result(result)
    cc = r.params.get("concentration_curves")
    if not cc:
        fail("concentration_table: the sweep has no 'concentration_curves' (run arbiter.surrogate.sweep).")
    cs, cx = list(cc[f"c_self_{curve}"]), list(cc[f"c_cross_{curve}"])
    flags = []
    for name, v in (("c_self", cs), ("c_cross", cx)):
        a = np.asarray(v, dtype=np.float64)
        if np.any(np.diff(a) > 1e-9):
            flags.append(f"{name}(β) is not monotone decreasing over the table ({np.round(a, 4).tolist()}); the "
                         f"inversion uses its running minimum")
        if a.max() - a.min() < 1e-3:
            flags.append(f"{name}(β) varies by {a.max() - a.min():.2g} over the table: β is not identifiable from it")
    if curve == "marginal":
        rng = cc.get("c_self_range_over_beta_cross") or []
        if rng and max(rng) > 0.05:
            flags.append(f"c_self also depends on β_cross (range up to {max(rng):.3g} across β_cross at fixed "
                         f"β_self): the marginal curve averages over it")
    return ConcentrationTable(list(cc["beta"]), cs, cx, curve, r.params.get("preset", "?"), list(r.params["seeds"]),
                              flags)


# ----------------------------------------------------------------------------------------------- sweeps, cached

_MEMO: dict = {}


def cached_sweep(preset: str | Preset = "responsive", grid: int = 5, seeds=10, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> SweepResult:
    """A sweep computed once per (preset parameters, grid, seeds): kept in memory, and as JSON under
    ``cache_dir`` when given (the file name holds a hash of the parameters)."""
    p = get_preset(preset)
    seeds = list(range(int(seeds))) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    key = json.dumps({"preset": p.to_dict(), "grid": int(grid), "seeds": seeds}, sort_keys=True)
    if key in _MEMO:
        return _MEMO[key]
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"sweep-{p.name}-{grid}x{grid}-{len(seeds)}seeds-{digest}.json" if cache_dir else None
    if path is not None and path.exists():
        r = SweepResult.from_dict(json.loads(path.read_text()))
    else:
        r = sweep(p, grid, seeds, log=log)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(r.to_dict()))
            tmp.replace(path)
    _MEMO[key] = r
    return r


# ----------------------------------------------------------------------------------------------- fit


@dataclass
class FitResult(ToDict):
    """β fitted to a trace, and what the surrogate predicts there.

    beta_self, beta_cross: from the layer-mean concentrations (None where not invertible); angle_pred, nmse:
    the surrogate simulated at those β with the table's seeds (angle None: undefined); angle_measured: the
    caller's docs/methods/shapley.md modality Shapley angle, shown next to it; identifiability: the sweep's ratios (angle,
    log NMSE, c): an angle ratio near or below 1 means the predicted angle carries no information about β;
    layers: per layer c and fitted β with flags; flags: every clip, flat curve and caveat."""

    beta_self: float | None
    beta_cross: float | None
    angle_pred: float | None
    nmse: float | None
    angle_measured: float | None
    identifiability: dict
    flags: list
    layers: list
    concentrations: dict
    table: dict
    params: dict


PREDICTS = ("simulate", "table")


def fit(trace, *, x: str = "image", y: str = "text", sweep_result=None, preset: str | Preset = "responsive",
        grid: int = 5, seeds=10, curve: str = "marginal", angle_measured: float | None = None, how: str = "ratio",
        count: str = "visible", min_keys: int = 2, cache_dir: str | Path | None = None,
        concentrations: dict | None = None, predict: str = "simulate",
        log: Callable[[str], None] | None = None) -> FitResult:
    """Fit β_self, β_cross to a recorded MLLM (docs/methods/surrogate.md, proposed): modality X = ``x`` and Y = ``y`` token groups.

    1. :func:`trace_concentrations` per layer; 2. the c(β) curves of ``sweep_result`` (a SweepResult, dict or
    sweep.json path; default: :func:`cached_sweep` of ``preset``, ``grid``, ``seeds``, which integrates the whole
    grid: about an hour of CPU for the 5 x 5 ``responsive`` grid with 5 seeds); 3. invert per layer and
    for the layer means (monotone PCHIP in log β; outside the table: clipped to its end and flagged, never
    extrapolated); 4. simulate the preset at the overall β with the table's seeds (angle ``how``).
    Caveats (in the flags): the MLLM's c is normalised by its own key counts, the oscillators' by N = 50; the
    surrogate angle is a readout-restriction SHAP, not docs/methods/shapley.md's input-removal Shapley.

    Options: ``concentrations``: a precomputed :func:`trace_concentrations` dict (e.g. merged over batches; then
    ``trace`` is not read and may be None); ``predict``: ``"simulate"`` (default, step 4) or ``"table"``: the angle
    and NMSE at the fitted β are read from the sweep's cells (:func:`arbiter.surrogate.calibration.table_point`,
    bilinear in log β per seed; no integration), e.g. with the shipped calibration
    (:func:`arbiter.surrogate.calibration.load_calibration`)."""
    check_choice("predict", predict, PREDICTS)
    if concentrations is not None:
        conc = concentrations
    else:
        conc = trace_concentrations(trace, x, y, count=count, min_keys=min_keys)
    sw = (load_sweep_result(sweep_result) if sweep_result is not None
          else cached_sweep(preset, grid, seeds, cache_dir, log))
    p = get_preset(sw.params.get("preset_params") or sw.params.get("preset", "responsive"))
    table = concentration_table(sw, curve)
    flags = list(table.flags)
    if p.name != "responsive":
        flags.append(f"the c(β) table comes from preset '{p.name}'; docs/methods/surrogate.md inverts the 'responsive' preset "
                     f"(under 'paper' c stays ≈ 1 and β is not identifiable)")
    layers = []
    for layer in conc["layers"]:
        e = conc["per_layer"][layer]
        bs, fs = table.invert(e["c_self"], "self")
        bc, fc = table.invert(e["c_cross"], "cross")
        layers.append({"layer": layer, **e, "beta_self": bs, "beta_cross": bc,
                       "flags": [f"layer {layer}: {m}" for m in fs + fc]})
        flags += [f"layer {layer}: {m}" for m in fs + fc]
    ov = conc["overall"]
    bs, fs = table.invert(ov["c_self"], "self")
    bc, fc = table.invert(ov["c_cross"], "cross")
    flags += [f"overall: {m}" for m in fs + fc]
    ident = dict(sw.identifiability)
    ar = (ident.get("angle") or {}).get("ratio")
    if ar is None or not (ar > IDENTIFIABLE_ABOVE):
        flags.append(f"the angle's identifiability ratio is {ar if ar is None else round(ar, 3)} (<= "
                     f"{IDENTIFIABLE_ABOVE}): the predicted angle carries no information about β in this surrogate")
    flags.append("the surrogate angle is a dynamical SHAP (readout restricted to X, Y or both), not docs/methods/shapley.md's "
                 "input-removal modality Shapley: compare with that caveat")
    flags.append("c of the MLLM is normalised by its own key counts, c of the oscillators by N = "
                 f"{p.n_x}/{p.n_y}: the bridge assumes the fraction of effectively attended keys transfers")
    angle_pred = nm = None
    sim_point = None
    if bs is not None and bc is not None and predict == "table":
        from .calibration import table_point

        sim_point = table_point(sw, bs, bc, how=how)
        angle_pred, nm = sim_point["angle"], sim_point["nmse"]
        flags += [f"table: {m}" for m in sim_point["flags"]]
    elif bs is not None and bc is not None:
        pts, _, _, _ = evaluate_cells(p, [(bs, bc)], table.seeds, how=how, log=log)
        sim_point = pts[0]
        angle_pred, nm = sim_point["angle"], sim_point["nmse"]
        flags += [f"simulation: {m}" for m in sim_point["flags"]]
    else:
        flags.append("β could not be fitted (see above): no simulation")
    params = {"x": conc.get("x", x), "y": conc.get("y", y), "curve": curve, "count": conc.get("count", count),
              "min_keys": conc.get("min_keys", min_keys), "angle_method": how, "predict": predict,
              "preset": p.name, "seeds": table.seeds, "simulated_point": sim_point,
              "beta_label": "attention concentration and synchrony"}
    return FitResult(bs, bc, angle_pred, nm, angle_measured, jsonable(ident), flags, layers, conc, table.to_dict(),
                     params)
