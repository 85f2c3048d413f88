"""Report: write a diagnosis as report.json, PNG plots, a short report.md and a self-contained report.html.

``Report.load(path)`` reads a report.json back for later use (e.g. steering from its head ranking)."""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError


@dataclass
class Report:
    """A diagnosis report (the dict written to report.json)."""

    data: dict
    path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Report":
        p = Path(path)
        if p.is_dir():
            p = p / "report.json"
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise DataError(f"no report at {p}: run `arbiter diagnose ... --out DIR` first.") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{p} is not valid JSON ({e}); rerun arbiter diagnose.") from None
        for k in ("model", "heads", "mfr"):
            if k not in data:
                raise DataError(f"{p} is not an arbiter report (no {k!r} key).")
        return cls(data, p)

    def __getitem__(self, key):
        return self.data[key]

    def steering(self, top: float = 0.05, alpha: float = 2.0, toward: str = "instruction", rows: str = "all"):
        """A SteeringPlan amplifying the TopG heads of this report's ranking (see arbiter.steer)."""
        from .steer import plan_from_report

        return plan_from_report(self, top=top, alpha=alpha, toward=toward, rows=rows)


def _plots(report: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return []
    paths = []

    def save(fig, name):
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=110, bbox_inches="tight")  # long tick labels (knockout edges) stay in the picture
        plt.close(fig)
        paths.append(p)

    if _conflict_ran(report):
        _conflict_plots(report, plt, save)
    _modality_plots(report, plt, save)
    at = _ok(report, "attractors")
    if at and at.get("per_condition"):
        p = out / "attractors.png"
        _attractor_result(at).plot(p)  # a matplotlib Figure (no pyplot state to close)
        paths.append(p)
    return paths


def _conflict_ran(report: dict) -> bool:
    """The conflict steps ran (a data set without conflict samples records them as skipped)."""
    m = report.get("mfr")
    return isinstance(m, dict) and "skipped" not in m


def _attractor_result(d: dict):
    """An :class:`arbiter.experiments.attractors.AttractorResult` back from its ``to_dict()`` (predictions only:
    the label scores are not in the report, and the plot does not need them)."""
    import torch

    from .experiments.attractors import AttractorResult

    labels = list(d["labels"])
    index = {lab: j for j, lab in enumerate(labels)}
    conds = {c: list(v) for c, v in d["conditions"].items()}
    pred = torch.tensor([[[index[p] if p is not None else -1 for p in row]
                          for row in d["per_condition"][c]["predictions"]] for c in conds], dtype=torch.long)
    pred = pred.reshape(len(conds), len(d["sample_ids"]), len(d["subsets"]))
    return AttractorResult(labels=labels, conditions=conds, players=list(d["players"]),
                           subsets=[tuple(x) for x in d["subsets"]], sample_ids=list(d["sample_ids"]),
                           true=torch.tensor([index[t] for t in d["true_labels"]], dtype=torch.long),
                           predicted=pred, label_logprobs=torch.full((*pred.shape, len(labels)), float("nan"),
                                                                     dtype=torch.float64),
                           threshold=float(d["threshold"]), hierarchy_how=d["hierarchy_how"], forced=d["forced"],
                           settings=dict(d.get("settings") or {}))


def _conflict_plots(report: dict, plt, save) -> None:
    """The conflict steps' figures, drawn by :mod:`arbiter.experiments.plots` from the report's dicts."""
    from .experiments import plots

    save(plots.plot_mam_ldar(report), "mam_ldar.png")
    if report.get("knockout"):
        save(plots.plot_knockout_map({"entries": report["knockout"], "window": report.get("knockout_window")}),
             "knockout_map.png")
    if report["heads"]["ranking"]:
        save(plots.plot_head_scores(report["heads"], top=report["blocking"].get("heads") or [],
                                    n_layers=report["model"]["n_layers"]), "heads.png")
    if (report["blocking"].get("by_ranking") or {}).get("curves"):
        save(plots.plot_blocking_agreement(report["blocking"]["by_ranking"]), "head_rankings_blocked.png")
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    plots.plot_blocking(report["blocking"], ax=ax[0])
    plots.plot_amplification(report["amplification"], ax=ax[1])
    save(fig, "blocking_amplification.png")


def _ok(report: dict, key: str) -> dict | None:
    """A modality section of the report when it ran (not absent, not skipped)."""
    d = report.get(key)
    return d if isinstance(d, dict) and "skipped" not in d else None


def _modality_plots(report: dict, plt, save) -> None:
    import numpy as np

    sh = _ok(report, "shapley")
    if sh and sh.get("mean"):
        players = list(sh["players"])
        groups = [("all", sh["mean"], sh.get("angle"))] + [
            (f"{t}-instructed", sh["mean_by_target"][t], (sh.get("angle_by_target") or {}).get(t))
            for t in ("vision", "text") if t in (sh.get("mean_by_target") or {})]
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) * len(players) / 2 + 3), 3.6))
        w = 0.8 / len(players)
        for k, p in enumerate(players):
            ax.bar(np.arange(len(groups)) + (k - (len(players) - 1) / 2) * w, [g[1].get(p, 0.0) for g in groups], w,
                   label=p)
        ax.set_xticks(range(len(groups)),
                      [f"{g[0]}\nangle {_fmt(g[2])}°" if g[2] is not None else f"{g[0]}\nangle n/a" for g in groups])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"Modality Shapley values (v = {sh['value']} of the {sh['reference']} answer, removal "
                     f"{sh['removal']}, n={sh['n_samples']})", ylabel="mean φ")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
        save(fig, "shapley.png")

    ks = _ok(report, "keyspace")
    if ks and ks.get("layers"):
        nan = lambda v: [x if x is not None else np.nan for x in v]
        pca = ks.get("pca2")
        fig, axes = plt.subplots(1, 2 if pca else 1, figsize=(10 if pca else 5.5, 3.6), squeeze=False)
        ax = axes[0, 0]
        m1, m2 = ks["modalities"]
        ax.plot(ks["layers"], nan(ks["mmd"]), "-o", label=f"cross ({m1} vs {m2})")
        ax.plot(ks["layers"], nan(ks["intra_a"]), "--s", label=f"intra {m1} (random halves)")
        ax.plot(ks["layers"], nan(ks["intra_b"]), "--^", label=f"intra {m2} (random halves)")
        ax.set(title=f"Key-space MMD per layer ({ks['keys']})", xlabel="layer", ylabel="MMD")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        if pca:
            ax = axes[0, 1]
            a, b = np.asarray(pca["a"], dtype=float).reshape(-1, 2), np.asarray(pca["b"], dtype=float).reshape(-1, 2)
            ax.scatter(a[:, 0], a[:, 1], s=6, alpha=0.6, label=m1)
            ax.scatter(b[:, 0], b[:, 1], s=6, alpha=0.6, label=m2)
            ex = pca.get("explained") or [0, 0]
            ax.set(title=f"layer {pca['layer']} keys, first two pooled PCs", xlabel=f"PC1 ({100 * ex[0]:.1f}%)",
                   ylabel=f"PC2 ({100 * ex[1]:.1f}%)" if len(ex) > 1 else "PC2")
            ax.legend(fontsize=8)
        save(fig, "keyspace.png")

    im = _ok(report, "imbalance")
    if im and im.get("heat"):
        import torch

        from .experiments.modality import ImbalanceExperimentResult, plot_imbalance
        from .metrics.imbalance import ImbalanceResult

        t = lambda k: torch.tensor(np.asarray(_nan_grid(im[k]), dtype=np.float64))
        res = ImbalanceExperimentResult(im["layers"], tuple(im["modalities"]), im["query"], im.get("sample_ids", []),
                                        ImbalanceResult(t("heat"), im["scalar"] if im["scalar"] is not None else
                                                        float("nan"), t("mass_1"), t("mass_2"), t("norm_1"),
                                                        t("norm_2"), t("heat")[None], im["how"], im["per_token"]))
        heat = res.heat
        fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 0.4 * heat.shape[1]), 1.8 + 0.3 * heat.shape[0]))
        plot_imbalance(res, ax=ax)
        save(fig, "imbalance.png")

    su = _ok(report, "surrogate")
    tab = (su or {}).get("table") or {}
    if su and tab.get("beta"):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.semilogx(tab["beta"], tab["c_self"], "-o", label="c_self(β) (calibration)")
        ax.semilogx(tab["beta"], tab["c_cross"], "-s", label="c_cross(β) (calibration)")
        c = su.get("concentrations") or {}
        for k, b, st in (("c_self", su.get("beta_self"), "C0"), ("c_cross", su.get("beta_cross"), "C1")):
            if c.get(k) is not None and b is not None:
                ax.plot([b], [c[k]], "*", ms=14, color=st, label=f"MLLM {k} = {c[k]:.3f} → β = {b:.3g}")
        ax.set(title=f"Surrogate fit: angle pred {_fmt(su.get('angle_pred'))}° vs measured "
                     f"{_fmt(su.get('angle_measured'))}°", xlabel="β", ylabel="attention concentration c",
               ylim=(0, 1.05))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
        save(fig, "surrogate.png")


def _nan_grid(v):
    """Nested lists with None (JSON for nan) back to floats."""
    if isinstance(v, list):
        return [_nan_grid(x) for x in v]
    return float("nan") if v is None else v


def _fmt(x) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def markdown(report: dict) -> str:
    lines = [
        f"# arbiter diagnosis: {report['model']['class']}",
        "",
        f"{report['n_samples']} conflict samples; model {report['model']['n_layers']} layers × "
        f"{report['model']['n_heads']} heads.",
        "",
    ]
    if _conflict_ran(report):
        lines += _conflict_markdown(report)
    else:
        lines += ["The conflict steps (baseline, knockout map, head rankings, blocking, amplification) were skipped: "
                  f"{_skipped(report, 'mfr')}."]
    lines += _modality_markdown(report)
    lines += _attractor_markdown(report)
    lines += ["", "Definitions: arbiter's docs/methods.md, sections 3–11 (MAM, I_NSSD, LDAR, MFR, head scores, "
              "imbalance, key space, modality Shapley, surrogate); definitions marked proposed there are "
              "arbiter's own choices.", ""]
    return "\n".join(lines)


def _conflict_markdown(report: dict) -> list[str]:
    m, b, a = report["mfr"], report["blocking"], report["amplification"]
    ld = [x for x in report["ldar"] if x is not None]
    ko = sorted((e for e in report["knockout"] if e["nssd"] is not None), key=lambda e: e["nssd"])[:5]
    agreement = report["heads"].get("agreement", [])
    agree = "; ".join(f"{g['method']}: Spearman {_fmt(g['spearman'])} (against |reference| "
                      f"{_fmt(g.get('spearman_abs_reference'))}), TopG overlap {_fmt(g['topg_overlap'])}"
                      for g in agreement)
    ceiling = next((g.get("reference_split_half") for g in agreement if g.get("reference_split_half")), None)
    if ceiling:
        agree += (f" (ceiling: the reference against itself on random halves, Spearman "
                  f"{_fmt(ceiling['spearman_mean'])} ± {_fmt(ceiling['spearman_sd'])})")
    lines = [
        "| measure | value |", "|---|---|",
        f"| MFR overall / vision / text ({report.get('mfr_source')}) | {_fmt(m['overall'])} / {_fmt(m['vision'])} / "
        f"{_fmt(m['text'])} |",
        f"| MFR from π > 0.5 | {_fmt(report['mfr_pi']['overall'])} |",
        f"| LDAR last layer / max | {_fmt(ld[-1] if ld else None)} / {_fmt(max(ld) if ld else None)} |",
        f"| Blocking TopG ({len(b.get('heads', []))} heads): MFR | {_fmt(b.get('mfr_top'))} (relative drop "
        f"{_fmt(b.get('relative_drop_top'))}; random {_fmt(b.get('relative_drop_random_mean'))} ± "
        f"{_fmt(b.get('relative_drop_random_sd'))}) |",
        f"| Amplification: restored fraction by alpha {a.get('alpha')} | {a.get('restored')} (random "
        f"{[round(x, 3) for x in a.get('restored_random_mean', [])]}; {a.get('n_failed')} failures) |",
        f"| Head-ranking agreement with {report['heads']['method']} | {agree or 'n/a'} |",
        *_blocking_agreement_rows(b.get("by_ranking")),
        "",
        "Most negative knockouts (I_NSSD < 0 hurts instruction following):",
        "",
    ]
    for e in ko:
        lines.append(f"- {e['src']} → {e['dst']} around layer {e['center']}: I_NSSD {_fmt(e['nssd'])}, "
                     f"MFR {_fmt(e['mfr'])}")
    return lines


def _blocking_agreement_rows(ba: dict | None) -> list[str]:
    """Each ranking's own TopG blocked, and the share of the reference's deletion curve it reaches."""
    if not ba or not ba.get("summary"):
        return []
    parts = [f"{m}: MFR {_fmt(v['topg_mfr'])}, captures {_fmt(v['captured'])}" for m, v in ba["summary"].items()
             if m != ba["reference"]]
    rnd = ba.get("random") or {}
    chance = (f" (random head orders capture {_fmt(rnd['captured_mean'])} ± {_fmt(rnd.get('captured_sd'))})"
              if rnd.get("captured_mean") is not None else "")
    k = ba["k_topg"]
    return [f"| Each ranking's TopG blocked ({k} head{'s' if k != 1 else ''}, {ba['n_samples']} correct samples), "
            f"and its share of the {ba['reference']} deletion curve over k = {ba['ks']} | {'; '.join(parts)}{chance} |"]


def _skipped(report: dict, key: str) -> str | None:
    d = report.get(key)
    if d is None:
        return "not run"
    return d.get("skipped") if isinstance(d, dict) else None


def _modality_markdown(report: dict) -> list[str]:
    if not any(k in report for k in ("shapley", "keyspace", "imbalance", "surrogate")):
        return []
    lines = ["", "## Modalities", ""]
    sh = _ok(report, "shapley")
    if sh:
        mean = ", ".join(f"φ({p}) {_fmt(v)}" for p, v in sh["mean"].items())
        by = "; ".join(f"{t}-instructed: " + ", ".join(f"φ({p}) {_fmt(v)}" for p, v in m.items()) +
                       f", angle {_fmt((sh.get('angle_by_target') or {}).get(t))}°"
                       for t, m in (sh.get("mean_by_target") or {}).items())
        x, y = sh.get("angle_players") or ("X", "Y")
        lines += [f"- Modality Shapley ({sh['n_samples']} samples, removal {sh['removal']}, v = {sh['value']} of the "
                  f"{sh['reference']} answer): {mean}; preference angle {_fmt(sh.get('angle'))}° (+90° only {y}, "
                  f"−90° only {x}); {by}. Efficiency gap {_fmt(sh.get('efficiency_gap'))}."]
    else:
        lines += [f"- Modality Shapley: skipped ({_skipped(report, 'shapley')})."]
    ks = _ok(report, "keyspace")
    if ks:
        sm = ks.get("summary") or {}
        lines += [f"- Key space ({ks['modalities'][0]} vs {ks['modalities'][1]} keys, {ks['keys']}): cross-modal MMD "
                  f"{_fmt(sm.get('mmd_mean'))} (mean over layers; max {_fmt(sm.get('mmd_max'))} at layer "
                  f"{sm.get('layer_max')}) vs intra-modal {_fmt(sm.get('intra_mean'))} (ratio {_fmt(sm.get('ratio'))}); "
                  f"JSD {_fmt(sm.get('jsd_mean'))} bits. Paper: ≈ 0.408 vs ≈ 0.012."]
    else:
        lines += [f"- Key space: skipped ({_skipped(report, 'keyspace')})."]
    im = _ok(report, "imbalance")
    if im:
        pl = im.get("per_layer_mean") or []
        lines += [f"- Attention imbalance log(N_{im['modalities'][0]} / N_{im['modalities'][1]}) at the {im['query']} "
                  f"token: mean |imbalance| {_fmt(im.get('scalar'))}; per layer "
                  f"{[round(v, 2) if v is not None else None for v in pl]}; "
                  f"share of heads with N_{im['modalities'][0]} > N_{im['modalities'][1]}: "
                  f"{_fmt(im.get('share_m1_larger'))}."]
    else:
        lines += [f"- Attention imbalance: skipped ({_skipped(report, 'imbalance')})."]
    su = _ok(report, "surrogate")
    if su:
        cal = su.get("calibration") or {}
        ratio = su.get("angle_identifiability_ratio")
        note = " (≤ 2: the predicted angle does not depend on β here)" if ratio is None or ratio <= 2 else ""
        lines += [f"- Surrogate (SPEC 11, {cal.get('preset')} preset, calibration {cal.get('name')}: "
                  f"{cal.get('grid')} × {cal.get('grid')} grid, seeds {cal.get('seeds')}; prediction "
                  f"{su.get('prediction')}): β_self {_fmt(su.get('beta_self'))}, β_cross {_fmt(su.get('beta_cross'))}"
                  f"; predicted angle {_fmt(su.get('angle_pred'))}° (NMSE {_fmt(su.get('nmse'))}) vs measured "
                  f"{_fmt(su.get('angle_measured'))}°; angle identifiability ratio "
                  f"{_fmt(ratio)}{note}; {len(su.get('flags') or [])} flags in report.json."]
    else:
        lines += [f"- Surrogate: skipped ({_skipped(report, 'surrogate')})."]
    return lines


def _attractor_markdown(report: dict) -> list[str]:
    if "attractors" not in report:
        return []
    at = _ok(report, "attractors")
    if not at:
        return ["", "## Label attractors", "", f"- Label perturbation: skipped ({_skipped(report, 'attractors')})."]
    st = at.get("settings") or {}
    lines = ["", "## Label attractors", "",
             f"- Label perturbation (SPEC 10): {len(at['sample_ids'])} labelled samples × {at['n_subsets']} removal "
             f"sets (sizes {st.get('sizes')}{', all' if st.get('exhaustive') else ', seeded sample'}) of the labels "
             f"{', '.join(at['labels'])}; a removed true label counts as an error ({at['forced']}); hierarchy by "
             f"{at['hierarchy_how']}; edges shown at ≥ {100 * at['threshold']:g}% of a condition's errors."]
    for c, sm in (at.get("summary") or {}).items():
        edges = ", ".join(f"{e['source']} → {e['target']} {100 * e['weight']:.0f}%" for e in sm["top_edges"]) or "none"
        kept = "+".join(at["conditions"].get(c) or []) or "nothing"
        lines.append(f"- {c} ({kept} kept): accuracy {_fmt(sm['accuracy'])} (true label offered: "
                     f"{_fmt(sm.get('accuracy_offered'))}), {sm['n_errors']} errors of {sm['n_rows']}; top edges "
                     f"{edges}; attractors {' > '.join(sm['hierarchy'])}.")
    sim = (at.get("similarity") or {}).get("all") or {}
    if len(sim) > 1:
        lines.append("- Error-pattern similarity with all (cosine of the error weights): "
                     + ", ".join(f"{c} {_fmt(v)}" for c, v in sim.items() if c != "all") + ".")
    return lines


def _html_line(line: str) -> str:
    if line.startswith("|"):
        return f"<pre>{html.escape(line)}</pre>"
    if line.startswith("#"):
        level = min(3, len(line) - len(line.lstrip("#")))
        return f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>"
    if line.startswith("- "):
        return f"<p>• {html.escape(line[2:])}</p>"
    return f"<p>{html.escape(line)}</p>"


def write(report: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, the PNG plots, report.md and a self-contained report.html into ``out``."""
    from .experiments.diagnose import _atomic_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_json(out / "report.json", report)
    pngs = _plots(report, out)
    md = markdown(report)
    (out / "report.md").write_text(md + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
    imgs = "".join(f'<h3>{html.escape(p.stem)}</h3><img alt="{html.escape(p.stem)}" '
                   f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"/>' for p in pngs)
    body = "".join(_html_line(line) for line in md.splitlines() if line)
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>arbiter report</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}img{max-width:100%}"
        "pre{margin:0}</style></head><body>" + body + imgs + "</body></html>")
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html",
            **{p.stem: p for p in pngs}}
