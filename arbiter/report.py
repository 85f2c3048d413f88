"""Report: a diagnosis written as report.json, PNG figures, report.md and a self-contained report.html that say in
words what was found (heads, routes, winners, restorations), each claim linked to its captioned figure.

``Report.load(path)`` reads a report.json back for later use (e.g. steering from its head ranking)."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .util import head_label


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


# ============================================================================================ figures (PNG)


def _plots(report: dict, out: Path) -> dict[str, Path]:
    """Draw the report's figures into ``out``: {figure name: path}. Empty without matplotlib (the report then
    says that each figure was not drawn, and why)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return {}
    paths: dict[str, Path] = {}

    def save(fig, name):
        p = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110, bbox_inches="tight")  # long tick labels (knockout edges) stay in the picture
        plt.close(fig)
        paths[name] = p

    if _conflict_ran(report):
        _conflict_plots(report, save)
    _modality_plots(report, plt, save)
    at = _ok(report, "attractors")
    if at and at.get("per_condition"):
        p = out / "attractors.png"
        _attractor_result(at).plot(p)  # a matplotlib Figure (no pyplot state to close)
        paths["attractors"] = p
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


def _conflict_plots(report: dict, save) -> None:
    """The conflict steps' figures, drawn by :mod:`arbiter.experiments.plots` from the report's dicts."""
    from .experiments import plots

    save(plots.plot_mam_ldar(report), "mam_ldar")
    if report.get("knockout"):
        save(plots.plot_knockout_map({"entries": report["knockout"], "window": report.get("knockout_window")}),
             "knockout_map")
    if report["heads"]["ranking"]:
        save(plots.plot_head_scores(report["heads"], top=report["blocking"].get("heads") or [],
                                    n_layers=report["model"]["n_layers"]), "heads")
    if (report["blocking"].get("by_ranking") or {}).get("curves"):
        save(plots.plot_blocking_agreement(report["blocking"]["by_ranking"]), "head_rankings_blocked")
    save(plots.plot_blocking(report["blocking"]), "blocking")
    if (report.get("amplification") or {}).get("restored"):
        save(plots.plot_amplification(report["amplification"]), "amplification")


def _ok(report: dict, key: str) -> dict | None:
    """A section of the report when it ran (not absent, not skipped)."""
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
                      [f"{g[0]}\nangle {_num(g[2], 1)}°" if g[2] is not None else f"{g[0]}\nangle n/a" for g in groups])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"Modality Shapley values (v = {sh['value']} of the {sh['reference']} answer, removal "
                     f"{sh['removal']}, n={sh['n_samples']})", ylabel="mean φ")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8, loc="best")
        save(fig, "shapley")

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
        ax.legend(fontsize=8, loc="best")
        if pca:
            ax = axes[0, 1]
            a, b = np.asarray(pca["a"], dtype=float).reshape(-1, 2), np.asarray(pca["b"], dtype=float).reshape(-1, 2)
            ax.scatter(a[:, 0], a[:, 1], s=6, alpha=0.6, label=m1)
            ax.scatter(b[:, 0], b[:, 1], s=6, alpha=0.6, label=m2)
            ex = pca.get("explained") or [0, 0]
            ax.set(title=f"layer {pca['layer']} keys, first two pooled PCs", xlabel=f"PC1 ({100 * ex[0]:.1f}%)",
                   ylabel=f"PC2 ({100 * ex[1]:.1f}%)" if len(ex) > 1 else "PC2")
            ax.legend(fontsize=8, loc="best")
        save(fig, "keyspace")

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
        save(fig, "imbalance")

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
        ax.set(title=f"Surrogate fit: angle pred {_num(su.get('angle_pred'), 1)}° vs measured "
                     f"{_num(su.get('angle_measured'), 1)}°", xlabel="β", ylabel="attention concentration c",
               ylim=(0, 1.05))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the axes, off the curves
        save(fig, "surrogate")


def _nan_grid(v):
    """Nested lists with None (JSON for nan) back to floats."""
    if isinstance(v, list):
        return [_nan_grid(x) for x in v]
    return float("nan") if v is None else v


# ============================================================================================ numbers in words


def _num(x, digits: int = 3) -> str:
    """A number for people: ``n/a`` for missing or non-finite, else ``digits`` decimals (integers as such)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        text = f"{x:.{digits}f}"
        if float(text) == 0:  # no "-0.000": a value that rounds to 0 is shown as 0
            text = f"{0.0:.{digits}f}"
        return text.replace("-", "−")  # the minus sign, as in the formulas
    return str(x)


def _fmt(x) -> str:
    return _num(x, 3)


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.0f}%"


def _head(layer: int, head: int) -> str:
    return head_label(layer, head)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _layers_span(layers) -> str:
    layers = list(layers or [])
    if not layers:
        return "no layer"
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"


def _skipped(report: dict, key: str) -> str | None:
    d = report.get(key)
    if d is None:
        return "not run"
    return d.get("skipped") if isinstance(d, dict) else None


# ============================================================================================ definitions


# Every metric the report shows: anchor -> (name, docs page under docs/methods/, one-line definition).
DEFINITIONS: dict[str, tuple[str, str, str]] = {
    "mfr": ("MFR (modality-following ratio)", "mfr.md",
            "the share of conflict samples whose answer is the instructed modality's answer (from the greedy "
            "generation, or from π > 0.5)."),
    "pi": ("π (compliance probability)", "i-nssd.md",
           "π = P(D_p) / (P(D_p) + P(D_c)) on the next-token distribution at the last prompt token: the probability "
           "of the instructed modality's answer against its competitor's."),
    "mam": ("MAM (modality arbitration margin)", "mam.md",
            "MAM = Φ_p(h) − Φ_c(h): the logit-lens signal of the instructed modality's answers minus the "
            "competitor's, per layer; above 0 the position leans to the instructed answer."),
    "phi": ("Φ_p − Φ_c", "logit-lens.md",
            "Φ_m(h) = mean over the answer tokens v of modality m of z(h)_v, with z(h) = W_U · Norm_final(h) "
            "(the logit lens; the mean over D_m is arbiter's proposal); Φ_p − Φ_c is the MAM."),
    "ldar": ("LDAR (latent decision alignment rate)", "ldar.md",
             "per layer, the share of samples whose latent decision at the instruction tokens (sign of the mean MAM "
             "of the 2 instruction positions with the largest |MAM|) equals the final decision; chance is 0.5 "
             "(this operationalisation is arbiter's proposal)."),
    "knockout": ("Attention knockout", "knockout.md",
                 "queries of one token group may not attend to keys of another in a window of layers around a "
                 "centre layer (scores set to −∞ before the softmax)."),
    "nssd": ("I_NSSD (normalized signed structural divergence)", "i-nssd.md",
             "sign(π′ − π) · JSD((π, 1 − π) ‖ (π′, 1 − π′)) / ln 2, averaged over samples, in [−1, 1]; below 0 an "
             "intervention hurts instruction following (the formula is arbiter's proposal)."),
    "head-scores": ("Head scores", "head-rankings.md",
                    "the exhaustive reference: the drop of the final MAM when one head's output is zeroed, averaged "
                    "per instruction then over instructions; cheaper rankings are compared with it."),
    "topg": ("TopG", "arbitration-heads.md", "the top 5% of heads by score (at least one)."),
    "roles": ("Head roles", "arbitration-heads.md",
              "vision expert: its score under the image instruction is positive and at least twice its score under "
              "the text instruction; text expert: the reverse; hub: otherwise, it matters under both "
              "instructions (arbiter's proposal)."),
    "agreement": ("Ranking agreement", "head-rankings.md",
                  "Spearman correlation of a ranking's scores with the reference's, the overlap of their TopG, and "
                  "the reference's own split-half Spearman as a ceiling."),
    "blocking": ("Blocking", "arbitration-heads.md",
                 "TopG zeroed on the samples the model answers correctly; the MFR left and its relative drop, "
                 "against random head sets of the same size (mean ± sd over the draws)."),
    "captured": ("Captured share of the deletion curve", "head-rankings.md",
                 "Σ_k (drop of the final MAM with a ranking's top k heads zeroed) / the same sum for the reference "
                 "ranking (arbiter's proposal)."),
    "amplification": ("Amplification", "arbitration-heads.md",
                      "TopG outputs multiplied by α on the samples the model gets wrong; restored fraction = share "
                      "of them with π > 0.5 afterwards, against random head sets of the same size."),
    "image-attention": ("Image attention", "image-attention.md",
                        "a head's attention row at the last prompt token (or the mean over every layer and head) "
                        "over the image tokens, put back on the processor's patch grid and drawn on the image."),
    "shapley": ("Modality Shapley value φ", "shapley.md",
                "the exact Shapley value of each modality for v(S) = the score of the answer with only the "
                "modalities in S present."),
    "angle": ("Preference angle θ", "shapley.md",
              "θ = 90° · (φ(Y) − φ(X)) / (|φ(X)| + |φ(Y)|): 0° balanced, +90° only Y, −90° only X (arbiter's "
              "proposal)."),
    "keyspace": ("Key-space MMD / JSD", "keyspace.md",
                 "maximum mean discrepancy (Gaussian kernel) and per-component Jensen-Shannon divergence between "
                 "the key vectors at image and at text positions, against random halves of one modality (the "
                 "estimators are arbiter's proposal)."),
    "imbalance": ("Attention imbalance", "imbalance.md",
                  "log(N_1 / N_2) with N_m = ‖W_O^(h) Σ_{j∈T_m} α_j v_j‖ the norm of what a head reads from "
                  "modality m at the last token; attention mass A_m = Σ_{j∈T_m} α_j (formulas proposed by arbiter)."),
    "surrogate": ("Physics surrogate", "surrogate.md",
                  "two populations of phase oscillators coupled through softmax attention (β_self, β_cross) fitted "
                  "to the model's attention concentrations; its identifiability ratio says whether a quantity "
                  "depends on β at all (the fit to a model is arbiter's proposal)."),
    "attractors": ("Label attractors", "attractors.md",
                   "labels removed from the prompt's option list; the graph of errors from true to predicted label "
                   "and the labels ranked by the error mass they attract."),
}


def _docs_folder() -> Path | None:
    """The methods docs: docs/methods of the source tree arbiter runs from (a checkout or an editable install), else
    the copy a wheel ships as arbiter/_methods_docs (setup.py's build hook); None when neither is there."""
    here = Path(__file__).resolve().parent
    for p in (here.parent / "docs" / "methods", here / "_methods_docs"):
        if p.is_dir() and any(p.glob("*.md")):
            return p
    return None


def _copy_methods_docs(out: Path) -> None:
    """Copy the methods pages the report links to into ``out/methods/``, so the report folder stands alone (it can
    be moved or shared and its definitions still open)."""
    folder = _docs_folder()
    if folder is None:
        return
    dst = out / "methods"
    dst.mkdir(exist_ok=True)
    for page in sorted({page for _, page, _ in DEFINITIONS.values()}):
        if (folder / page).exists():
            shutil.copyfile(folder / page, dst / page)


def _docs_href(page: str, out: Path | None) -> str | None:
    """The link to a methods page: the report folder's own copy (``methods/<page>``, written by :func:`write`),
    else the source page on this machine, else None."""
    if out is not None and (Path(out) / "methods" / page).exists():
        return f"methods/{page}"
    folder = _docs_folder()
    if folder is None or not (folder / page).exists():
        return None
    target = folder / page
    if out is None:
        return target.as_uri()
    return Path(os.path.relpath(target, Path(out).resolve())).as_posix()


def _d(key: str, text: str | None = None) -> str:
    """Inline link to the report's definition of ``key``."""
    return f"[{text or DEFINITIONS[key][0]}](#def-{key})"


# ============================================================================================ document model
# Inline text uses three marks only: [text](href), **bold**, `code`; both renderers understand them.


@dataclass
class _Doc:
    blocks: list = field(default_factory=list)
    figures: int = 0

    def h(self, level: int, text: str, anchor: str | None = None):
        self.blocks.append(("h", level, text, anchor))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def ul(self, items: list[str], cls: str | None = None):
        if items:
            self.blocks.append(("ul", items, cls))

    def note(self, text: str):
        """A step with nothing to show: what and why."""
        self.blocks.append(("note", text))

    def table(self, header: list[str], rows: list[list[str]], caption: str | None = None):
        self.blocks.append(("table", header, rows, caption))

    def fig(self, name: str, caption: str, anchor: str, alt: str, path: str | None = None):
        """A figure: ``name`` is a drawn PNG's name (without .png), or ``path`` a file relative to the report."""
        self.figures += 1
        self.blocks.append(("fig", name, caption, anchor, alt, path, self.figures))

    def grid(self, start: bool):
        """Figures between grid(True) and grid(False) sit side by side in the HTML page (one after the other in
        Markdown)."""
        self.blocks.append(("grid", start))

    def raw_summary(self, items: list[str]):
        self.blocks.append(("summary", items))


def _document(report: dict, docs_out: Path | None = None) -> _Doc:
    """The whole report as blocks: the summary in words, then one section per step, then the definitions."""
    doc = _Doc()
    m = report["model"]
    doc.h(1, f"arbiter diagnosis: {m['class']}", "top")
    facts = [f"{_plural(report['n_samples'], 'conflict sample')}",
             f"model: {m['n_layers']} layers × {m['n_heads']} heads"]
    st = report.get("settings") or {}
    if st.get("data"):
        facts.append(f"data: `{st['data']}`")
    if report.get("knockout_window"):
        facts.append(f"knockout window {report['knockout_window']} layers")
    doc.p("; ".join(facts) + ".")
    doc.h(2, "What was found", "summary")
    doc.raw_summary(_summary(report))
    if _conflict_ran(report):
        _mfr_section(doc, report)
        _decision_section(doc, report)
        _knockout_section(doc, report)
        _heads_section(doc, report)
        _blocking_section(doc, report)
        _amplification_section(doc, report)
    else:
        doc.h(2, "Conflict steps", "conflict")
        doc.note("The conflict steps (baseline, knockout map, head rankings, blocking, amplification) were skipped: "
                 f"{_skipped(report, 'mfr')}.")
    _image_attention_section(doc, report)
    _modality_sections(doc, report)
    _attractor_section(doc, report)
    _steering_section(doc, report)
    _run_section(doc, report)
    _definitions_section(doc, report, docs_out)
    return doc


# -------------------------------------------------------------------------------------------- analysis helpers


def _topg(report: dict) -> list[tuple[int, int]]:
    b = report.get("blocking") or {}
    heads = b.get("heads") if isinstance(b, dict) else None
    if heads:
        return [(int(h[0]), int(h[1])) for h in heads]
    ranking = (report.get("heads") or {}).get("ranking") or []
    k = max(1, int(math.floor(0.05 * len(ranking) + 0.5))) if ranking else 0
    return [(r["layer"], r["head"]) for r in ranking[:k]]


def _by_target(report: dict) -> dict:
    h = report.get("heads") or {}
    return (h.get("scores") or {}).get(h.get("method"), {}) or {}


def _roles(report: dict, heads) -> dict[tuple[int, int], str]:
    """Each head's role by :func:`arbiter.steer.head_roles` (the rule the steering command uses)."""
    from .steer import head_roles

    raw = head_roles(_by_target(report), list(heads))
    words = {"vision-expert": "vision expert", "text-expert": "text expert", "shared-hub": "hub"}
    return {h: words.get(raw[f"{h[0]},{h[1]}"], raw[f"{h[0]},{h[1]}"]) for h in heads}


def _score(grid, layer, head):
    try:
        v = grid[layer][head]
    except (IndexError, KeyError, TypeError):
        return None
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _reads(report: dict, layer: int, head: int) -> dict | None:
    """What a head reads at the query token (from the imbalance step): masses and output-norm log ratio."""
    im = _ok(report, "imbalance")
    if not im or layer not in (im.get("layers") or []):
        return None
    r = im["layers"].index(layer)
    m1, m2 = im["modalities"]
    a1, a2 = _score(im.get("mass_1"), r, head), _score(im.get("mass_2"), r, head)
    ratio = _score(im.get("heat"), r, head)
    if a1 is None and a2 is None:
        return None
    group = None
    if ratio is not None and abs(ratio) >= math.log(1.5):
        group = m1 if ratio > 0 else m2
    elif a1 is not None and a2 is not None and max(a1, a2) >= 1.5 * min(a1, a2):
        group = m1 if a1 > a2 else m2
    return {"m1": m1, "m2": m2, "a1": a1, "a2": a2, "ratio": ratio, "group": group, "query": im["query"],
            "how": im.get("how")}


def _reads_words(r: dict | None) -> str:
    if r is None:
        return "not measured (the imbalance step did not run)"
    what = (f"of {r['m1']} and {r['m2']}, it reads the {r['group']}" if r["group"] else
            f"it reads the {r['m1']} and the {r['m2']} alike")
    ratio = f", log(N_{r['m1']} / N_{r['m2']}) {_num(r['ratio'], 2)}" if r["ratio"] is not None and \
        r.get("how") == "log_ratio" else ""
    return f"{what}: attention mass {_num(r['a1'], 3)} vs {_num(r['a2'], 3)}{ratio}"


def _entries(report: dict, src: str, dst: str) -> list[dict]:
    return sorted((e for e in report.get("knockout") or [] if e["src"] == src and e["dst"] == dst),
                  key=lambda e: e["center"])


def _entry_route(report: dict, src: str, dst: str = "last", threshold: float = 0.05) -> dict | None:
    """Where a group's knockout into ``dst`` hurts most, and from which centre on it stops mattering."""
    es = [e for e in _entries(report, src, dst) if e.get("edge_present", True) and e.get("nssd") is not None]
    if not es:
        return None
    worst = min(es, key=lambda e: e["nssd"])
    hurting = [e for e in es if e["nssd"] <= -threshold]
    return {"worst": worst, "hurting": hurting, "threshold": threshold,
            "last_hurting": max((e["center"] for e in hurting), default=None)}


# -------------------------------------------------------------------------------------------- summary


def _summary(report: dict) -> list[str]:
    items = []
    if not _conflict_ran(report):
        items.append(f"The conflict steps did not run ({_skipped(report, 'mfr')}): no instruction-following, head or "
                     "knockout result.")
    else:
        items.append(_summary_mfr(report))
        items.append(_summary_heads(report))
        items.append(_summary_routes(report))
        items.append(_summary_amplification(report))
    sh = _ok(report, "shapley")
    if sh and sh.get("mean"):
        x, y = sh.get("angle_players") or ("X", "Y")
        items.append(f"**Removing modalities** ({_d('shapley', 'Shapley values')}): "
                     + ", ".join(f"φ({p}) {_num(v, 2)}" for p, v in sh["mean"].items())
                     + f"; {_d('angle', 'preference angle')} {_num(sh.get('angle'), 1)}° (+90° only {y}, −90° only "
                       f"{x}) ([figure](#fig-shapley)).")
    at = _ok(report, "attractors")
    if at and at.get("summary"):
        parts = [f"{c}: {' > '.join(sm['hierarchy'][:2])}" for c, sm in at["summary"].items() if sm.get("hierarchy")]
        items.append(f"**{_d('attractors', 'Label attractors')}** (the labels errors fall on most): "
                     + "; ".join(parts) + " ([section](#attractors)).")
    return items


def _summary_mfr(report: dict) -> str:
    mf = report["mfr"]
    parts = []
    for t, own, other in (("vision", "image", "text"), ("text", "text", "image")):
        v = mf.get(t)
        if v is None:
            continue
        wins = own if v >= 0.5 else other
        parts.append(f"told to trust the {own}, the model follows the {own} in {_pct(v)} of samples (the "
                     f"**{wins} wins**)")
    src = "generated answers" if report.get("mfr_source") == "generation" else "π > 0.5"
    ans = mf.get("answers") if isinstance(mf.get("answers"), dict) else None
    extra = (f"; {ans.get('both', 0)} generations mention both answers, {ans.get('neither', 0)} neither"
             if ans else "")
    body = "; ".join(parts) if parts else f"overall MFR {_pct(mf.get('overall'))}"
    return (f"**Which modality wins** ({_d('mfr', 'MFR')} from {src}): {body}{extra} ([table](#mfr)).")


def _summary_heads(report: dict) -> str:
    heads = _topg(report)
    if not heads:
        return "**Arbitration heads**: none ranked (no head has a finite score) ([section](#heads))."
    roles = _roles(report, heads)
    named = []
    for k, h in enumerate(heads):
        r = _reads(report, *h) if k < 6 else None  # the first six in full; the others named with their role
        reads = f"; {_reads_words(r)} at the last token" if r else ""
        named.append(f"**{_head(*h)}**, {roles[h]}{reads}" if k < 6 else f"**{_head(*h)}** ({roles[h]})")
    b = report.get("blocking") or {}
    block = ""
    if b.get("n_samples"):
        rnd = (f"; random heads of the same number: drop {_num(b.get('relative_drop_random_mean'), 2)} ± "
               f"{_num(b.get('relative_drop_random_sd'), 2)}" if b.get("relative_drop_random_mean") is not None
               else "")
        block = (f" Blocking {'it' if len(heads) == 1 else 'them'} on the {b['n_samples']} correctly answered "
                 f"samples takes MFR from {_num(b.get('mfr_base'), 2)} to {_num(b.get('mfr_top'), 2)} (relative "
                 f"drop {_num(b.get('relative_drop_top'), 2)}{rnd}) ([figure](#fig-blocking)).")
    method = (report.get("heads") or {}).get("method")
    return (f"**Arbitration heads** ({_d('topg', 'TopG')} of the {method} {_d('head-scores', 'ranking')}, with "
            f"their {_d('roles', 'roles')}): " + " · ".join(named) + f" ([figure](#fig-heads)).{block}")


def _summary_routes(report: dict) -> str:
    parts = []
    for src, label in (("image", "The image"), ("context", "The text context")):
        r = _entry_route(report, src)
        if r is None:
            es = _entries(report, src, "last")
            if es and not any(e.get("edge_present", True) for e in es):
                parts.append(f"{label}: no {src} tokens in these prompts (empty group, not measured).")
            continue
        w = r["worst"]
        if w["nssd"] > -r["threshold"]:
            parts.append(f"{label} → last token: cutting it changes little at any layer (lowest "
                         f"{_d('nssd', 'I_NSSD')} {_num(w['nssd'], 3)}).")
            continue
        t = "vision" if src == "image" else "text"
        tmfr = w.get(f"mfr_{t}")
        after = (f"; cut from centre layer {r['last_hurting'] + 1} on, it no longer matters (I_NSSD above "
                 f"−{r['threshold']:g})"
                 if r["last_hurting"] is not None and r["last_hurting"] + 1 <= max(e["center"] for e in
                                                                                   _entries(report, src, "last"))
                 else "")
        parts.append(f"{label} enters the last token around {_layers_span(w.get('layers'))}: cutting {src} → last "
                     f"there gives {_d('nssd', 'I_NSSD')} {_num(w['nssd'], 3)}"
                     + (f" ({t}-instructed MFR {_num(tmfr, 2)} instead of {_num(report['mfr_pi'].get(t), 2)})"
                        if tmfr is not None and isinstance(report.get("mfr_pi"), dict) else "") + after + ".")
    ld = [x for x in report.get("ldar") or [] if x is not None]
    if ld:
        best = max(range(len(report["ldar"])), key=lambda i: report["ldar"][i] if report["ldar"][i] is not None
                   else -1)
        parts.append(f"The latent decision at the instruction tokens agrees with the final answer at most "
                     f"{_pct(report['ldar'][best])} of the time (layer {best}; {_d('ldar', 'LDAR')}, chance 50%) "
                     f"([figure](#fig-mam-ldar)).")
    if not parts:
        return "**Where each modality enters**: no knockout into the last token was measured ([section](#knockout))."
    return "**Where each modality enters** ([knockout map](#fig-knockout)): " + " ".join(parts)


def _summary_amplification(report: dict) -> str:
    a = report.get("amplification") or {}
    if "skipped" in a:
        return f"**Restoring failures**: amplification skipped ({a['skipped']}) ([section](#amplification))."
    n = a.get("n_failed") or 0
    if not n or not a.get("restored"):
        return (f"**Restoring failures**: nothing to restore: the model follows the instruction on every one of the "
                f"{report['n_samples']} diagnosed samples, so {_d('amplification', 'amplification')} had no failure "
                f"to work on ([section](#amplification)).")
    best = max(range(len(a["restored"])), key=lambda i: a["restored"][i])
    rm = a.get("restored_random_mean") or []
    rs = a.get("restored_random_sd") or []
    rnd = (f"; random heads of the same number restore {_pct(rm[best])} ± {_pct(rs[best])}" if best < len(rm)
           else "")
    base = (f" ({_pct(a['restored_base'])} already had π > 0.5 unamplified)" if a.get("restored_base") else "")
    return (f"**Restoring failures** ({_d('amplification', 'amplification')}): of {_plural(n, 'failure')}, "
            f"scaling the arbitration heads by α = {a['alpha'][best]:g} restores {_pct(a['restored'][best])}{base}"
            f"{rnd} ([figure](#fig-amplification)).")


# -------------------------------------------------------------------------------------------- sections


def _mfr_section(doc: _Doc, report: dict) -> None:
    doc.h(2, "Which modality wins under each instruction", "mfr")
    mf, mp = report["mfr"], report.get("mfr_pi") or {}
    src = {"generation": "greedy generation, first answer mentioned", "pi": "π > 0.5"}.get(report.get("mfr_source"),
                                                                                           report.get("mfr_source"))
    doc.p(f"{_d('mfr')} per instruction: the share of samples whose answer is the instructed modality's. "
          f"Main column from {src}; the {_d('pi', 'π')} > 0.5 column ignores third answers.")
    rows = []
    counts = {"vision": mf.get("n_vision"), "text": mf.get("n_text"), "overall": mf.get("n")}
    for t, label in (("vision", "trust the image (vision-instructed)"), ("text", "trust the text (text-instructed)"),
                     ("overall", "all conflict samples")):
        if mf.get(t) is None and mp.get(t) is None:
            continue
        rows.append([label] + ([_num(counts[t])] if any(v is not None for v in counts.values()) else [])
                    + [_num(mf.get(t), 3), _num(mp.get(t), 3)])
    with_n = any(v is not None for v in counts.values())
    doc.table(["instruction"] + (["samples"] if with_n else []) + [f"MFR ({report.get('mfr_source')})",
                                                                   "MFR (π > 0.5)"], rows)
    ans = mf.get("answers") if isinstance(mf.get("answers"), dict) else None
    if ans:
        by = ans.get("by_target") if isinstance(ans.get("by_target"), dict) else {}
        split = "; ".join(f"{t}-instructed: both {v.get('both', 0)}, neither {v.get('neither', 0)} of {v.get('n')}"
                          for t, v in by.items() if isinstance(v, dict))
        doc.p(f"Generated answers that mention **both** modalities' answers: {ans.get('both', 0)}; **neither**: "
              f"{ans.get('neither', 0)}" + (f" of {ans['n']}" if ans.get("n") is not None else "")
              + (f" ({split})" if split else "") + " (each is scored on the first answer it mentions; one "
              "mentioning neither follows no modality).")


def _decision_section(doc: _Doc, report: dict) -> None:
    doc.h(2, "Where the decision forms: margin and latent decision per layer", "decision")
    mam = report.get("mam") or {}
    lines = []
    for t in ("vision", "text"):
        v = mam.get(t) or []
        pos = next((i for i in range(len(v)) if v[i] is not None and all(x is not None and x > 0 for x in v[i:])),
                   None)
        if v:
            lines.append(f"{t.capitalize()}-instructed samples: the last token leans to the instructed answer "
                         + (f"from layer {pos} on" if pos is not None else "at no layer for good")
                         + f" (final {_d('mam', 'MAM')} {_num(v[-1], 2)})")
    if lines:
        doc.p(". ".join(lines) + ".")
    doc.fig("mam_ldar", f"Left: the {_d('mam', 'MAM')} ({_d('phi', 'Φ_p − Φ_c')}) per layer at the last token "
                        "(solid) and at the instruction tokens (dotted), per instruction; look for the layer where "
                        "each solid curve crosses 0 for good, and whether the instruction tokens lean the same way. "
                        f"Right: the {_d('ldar', 'LDAR')} per layer; the dashed line is chance (0.5): the further "
                        "above it, the earlier the instruction tokens carry the final decision.",
            "fig-mam-ldar", "MAM and LDAR per layer")


def _knockout_section(doc: _Doc, report: dict) -> None:
    doc.h(2, "Where each modality enters: the knockout map", "knockout")
    entries = report.get("knockout") or []
    if not entries:
        doc.note("Knockout map: nothing to show (no knockout was run).")
        return
    w = report.get("knockout_window")
    doc.p(f"Each cell: the {_d('nssd', 'I_NSSD')} of an {_d('knockout', 'attention knockout')} of one edge family "
          f"(source group → destination group) in a window of {w} layers around a centre layer. Below 0: cutting "
          "that route hurts instruction following. **—/empty**: no sample has tokens in one of the two groups (e.g. "
          "no system prompt), so nothing was cut; **0.000** means the route was cut and nothing changed.")
    doc.fig("knockout_map", "I_NSSD per edge family (rows) and centre layer (columns). Look for the dark red cells: "
                            "the routes and layers that instruction following depends on (image → last for the "
                            "vision-instructed samples, context → last for the text-instructed ones). Grey rows "
                            "marked empty have no tokens in one of their groups.", "fig-knockout",
            "knockout map of I_NSSD")
    names, centers = [], sorted({e["center"] for e in entries})
    cell: dict = {}
    for e in entries:
        n = f"{e['src']} → {e['dst']}"
        if n not in names:
            names.append(n)
        cell[(n, e["center"])] = e
    def value(n, c):
        e = cell.get((n, c))
        if e is None:
            return ""
        return "—/empty" if e.get("edge_present") is False else _num(e.get("nssd"), 3)

    if len(centers) <= 10:
        doc.table(["edge family"] + [f"centre {c}" for c in centers],
                  [[n] + [value(n, c) for c in centers] for n in names],
                  f"I_NSSD per edge family and centre layer (window {w}).")
    else:  # many layers: one row per centre layer, so that the table keeps to the page's width
        doc.table(["centre layer"] + names, [[str(c)] + [value(n, c) for n in names] for c in centers],
                  f"I_NSSD per centre layer and edge family (window {w}).")
    worst = sorted((e for e in entries if e.get("nssd") is not None and e.get("edge_present", True)),
                   key=lambda e: e["nssd"])[:5]
    if worst:
        doc.table(["knockout", "layers", "I_NSSD", "MFR under knockout", "vision-instructed MFR",
                   "text-instructed MFR"],
                  [[f"{e['src']} → {e['dst']}", _layers_span(e.get("layers")), _num(e["nssd"], 3),
                    _num(e.get("mfr"), 2), _num(e.get("mfr_vision"), 2), _num(e.get("mfr_text"), 2)] for e in worst],
                  "The five most harmful knockouts (MFR here from π > 0.5).")


def _heads_section(doc: _Doc, report: dict) -> None:
    hd = report["heads"]
    doc.h(2, "Which heads arbitrate", "heads")
    ranking = hd.get("ranking") or []
    if not ranking:
        doc.note("Head ranking: nothing to show (no head has a finite score).")
        return
    topg = _topg(report)
    shown = [(r["layer"], r["head"]) for r in ranking[:max(5, len(topg))]]
    roles = _roles(report, shown)
    by = _by_target(report)
    doc.p(f"{_d('head-scores')} from the **{hd['method']}** ranking; the {_plural(len(topg), 'head')} of "
          f"{_d('topg', 'TopG')} are the arbitration heads. A head's {_d('roles', 'role')} compares its score under "
          "each instruction; what it reads is its attention at the last token (from the imbalance step).")
    rows = []
    score = {(r["layer"], r["head"]): r["score"] for r in ranking}
    for h in shown:
        rows.append([f"{_head(*h)}{' (TopG)' if h in topg else ''}", _num(score[h], 3),
                     _num(_score(by.get("vision"), *h), 3), _num(_score(by.get("text"), *h), 3), roles[h],
                     _reads_words(_reads(report, *h))])
    doc.table(["head", "score", "score, trust image", "score, trust text", "role", "reads at the last token"], rows,
              f"The {len(shown)} best-ranked heads.")
    doc.fig("heads", "Left: every head's score (layer × head); the brightest cells are the arbitration heads. "
                     "Right: how many TopG heads each layer holds.", "fig-heads", "head scores")
    ag = hd.get("agreement") or []
    if ag:
        ceiling = next((g.get("reference_split_half") for g in ag if g.get("reference_split_half")), None)
        doc.table(["ranking", "Spearman with the reference", "Spearman with |reference|", "TopG overlap",
                   "top-3 overlap"],
                  [[g["method"], _num(g.get("spearman"), 3), _num(g.get("spearman_abs_reference"), 3),
                    _num(g.get("topg_overlap"), 2), _num(g.get("top3_overlap"), 2)] for g in ag],
                  f"{_d('agreement', 'Agreement')} of the cheaper rankings with {hd['method']}"
                  + (f" (ceiling: the reference against itself on random halves, Spearman "
                     f"{_num(ceiling['spearman_mean'], 3)} ± {_num(ceiling['spearman_sd'], 3)})." if ceiling else "."))
    cost = _head_costs(hd)
    if cost:
        doc.p(cost)


def _head_costs(hd: dict) -> str | None:
    """Each ranking's forward-equivalents per batch beside the exhaustive sweep's L·H + 1, and why the search cost
    more where it did (None for a report written before they were recorded)."""
    fe, ex = hd.get("forward_equivalents") or {}, hd.get("exhaustive_forward_equivalents")
    if not fe or not ex:
        return None
    parts = [f"{m} {_num(float(v), 1)} ({_num(float(v) / ex, 2)} of the exhaustive)" for m, v in fe.items()
             if v is not None and m != "exhaustive"]
    why = None
    if hd.get("search"):
        from .experiments.head_search import costlier_than_exhaustive
        why = costlier_than_exhaustive(hd["search"])
    return (f"Cost in forward-equivalents per batch: exhaustive sweep {_num(float(ex), 0)}"
            + ("; " + "; ".join(parts) if parts else "") + "." + (f" {why}" if why else ""))


def _blocking_section(doc: _Doc, report: dict) -> None:
    b = report["blocking"]
    doc.h(2, "Blocking the arbitration heads", "blocking")
    if "skipped" in b:
        doc.note(f"Blocking: skipped ({b['skipped']}).")
        return
    if not b.get("n_samples"):
        doc.note("Blocking: nothing to show: no correctly answered sample to block (or no TopG head).")
        return
    rnd = b.get("mfr_random") or []
    doc.p(f"{_d('blocking', 'Blocking')}: the TopG heads ({', '.join(_head(*h) for h in _topg(report))}) zeroed on the "
          f"{b['n_samples']} samples the model answers correctly; the control blocks {len(rnd)} random sets of the "
          "same size.")
    rows = [["clean", _num(b.get("mfr_base"), 3), ""],
            ["TopG blocked", _num(b.get("mfr_top"), 3), _num(b.get("relative_drop_top"), 3)]]
    if rnd:
        mean = sum(rnd) / len(rnd)
        sd = math.sqrt(sum((x - mean) ** 2 for x in rnd) / (len(rnd) - 1)) if len(rnd) > 1 else 0.0
        rows.append([f"random heads ({len(rnd)} draws, mean ± sd)", f"{_num(mean, 3)} ± {_num(sd, 3)}",
                     f"{_num(b.get('relative_drop_random_mean'), 3)} ± {_num(b.get('relative_drop_random_sd'), 3)}"])
    doc.table(["heads blocked", "MFR", "relative drop"], rows)
    doc.fig("blocking", "MFR on the correctly answered samples: clean, with the TopG heads blocked, and with random "
                        "head sets of the same size blocked (mean ± sd). The TopG bar should fall well below the "
                        "random one if these heads arbitrate.", "fig-blocking", "blocking TopG against random heads")
    ba = b.get("by_ranking")
    if ba and ba.get("summary"):
        k = ba["k_topg"]
        rnd = ba.get("random") or {}
        rows = [[mth, " ".join(_head(*h) for h in v.get("topg_heads") or []), _num(v.get("topg_mfr"), 3),
                 _num(v.get("captured"), 2)] for mth, v in ba["summary"].items()]
        if rnd.get("captured_mean") is not None:
            rows.append([f"random head orders ({rnd.get('n')})", "", "",
                         f"{_num(rnd['captured_mean'], 2)} ± {_num(rnd.get('captured_sd'), 2)}"])
        doc.table(["ranking", "its TopG", "MFR with its TopG blocked", "captured"], rows,
                  f"Each ranking's TopG blocked ({_plural(k, 'head')}, {ba['n_samples']} correct samples), and its "
                  f"share of the {ba['reference']} deletion curve over k = {', '.join(map(str, ba['ks']))} "
                  f"({_d('captured', 'captured')}).")
        doc.fig("head_rankings_blocked", "Each ranking's top k heads zeroed together. Left: the drop of the final "
                                         "MAM; right: the MFR left. A cheap ranking is as good as the reference "
                                         "(black) where its curve follows the black one; the dotted grey curve is "
                                         "random head orders.", "fig-rankings-blocked", "deletion curves")


def _amplification_section(doc: _Doc, report: dict) -> None:
    a = report["amplification"]
    doc.h(2, "Restoring failures by amplification", "amplification")
    if "skipped" in a:
        doc.note(f"Amplification: skipped ({a['skipped']}).")
        return
    if not a.get("n_failed") or not a.get("restored"):
        doc.note(f"Amplification: no failures to restore: the model follows the instruction on all "
                 f"{report['n_samples']} diagnosed samples. `arbiter steer` runs the same experiment on a data file "
                 "with failures (e.g. unseen instruction wordings or noisy images).")
        return
    rm, rs = a.get("restored_random_mean") or [], a.get("restored_random_sd") or []
    base = a.get("restored_base")
    doc.p(f"{_d('amplification', 'Amplification')} on the {_plural(a['n_failed'], 'failure')} (samples answered "
          f"against the instruction): the TopG heads' outputs scaled by α; the control scales random head sets of the "
          "same size."
          + (f" A failure is an answer generated against the instruction, a restoration π > 0.5 afterwards; "
             f"{_pct(base)} of the failures already have π > 0.5 with no scaling (row α = 1), the floor both "
             "columns start from." if base is not None else ""))
    rows = [["1 (unscaled)", _num(base, 3), _num(base, 3)]] if base is not None else []
    doc.table(["α", "restored (TopG)", "restored (random heads, mean ± sd)"],
              rows + [[f"{al:g}", _num(r, 3), f"{_num(rm[i], 3)} ± {_num(rs[i], 3)}" if i < len(rm) else "n/a"]
                      for i, (al, r) in enumerate(zip(a["alpha"], a["restored"]))])
    doc.fig("amplification", "Share of the failures restored (π > 0.5 afterwards) per α: TopG (circles) against "
                             "random heads (squares, mean ± sd). A TopG curve well above the random one says these "
                             "heads carry the instruction.", "fig-amplification", "amplification on failures")


def _image_attention_section(doc: _Doc, report: dict) -> None:
    doc.h(2, "Where the heads look on the image", "image-attention")
    ia = report.get("image_attention")
    if ia is None:
        doc.note("No image-attention figures (this report has no image-attention section: it was written without "
                 "that step, or by an arbiter version without it).")
        return
    if isinstance(ia, dict):
        doc.note(f"No image-attention figures ({ia.get('skipped') or 'the step recorded no figure'}).")
        return
    if not ia:
        doc.note("No image-attention figures (no diagnosed sample has an image).")
        return
    doc.p(f"{_d('image-attention')}: for a few samples of each instruction, where the arbitration heads (named "
          "L#H#) and the last token (mean over every layer and head) look. Left of each figure: the attention over "
          "the image patches drawn on the image; right: the same attention over the prompt tokens.")
    samples: dict = {}
    for i, e in enumerate(ia):
        samples.setdefault(e.get("sample"), []).append((i, e))
    for sample, entries in samples.items():
        doc.h(3, f"Sample {sample}", None)
        doc.grid(True)
        for i, e in entries:
            who = "the last token (all heads)" if e.get("head") == "last" else f"head {e.get('head')}"
            doc.fig("", e.get("caption") or "", f"fig-image-attention-{i}",
                    f"image attention of {who} on sample {sample}", path=e.get("path"))
        doc.grid(False)


def _modality_sections(doc: _Doc, report: dict) -> None:
    if not any(k in report for k in ("shapley", "keyspace", "imbalance", "surrogate")):
        return
    doc.h(2, "Modalities", "modalities")
    sh = _ok(report, "shapley")
    doc.h(3, "What each modality contributes (Shapley values)", "shapley")
    if sh:
        mean = ", ".join(f"φ({p}) {_fmt(v)}" for p, v in sh["mean"].items())
        by = "; ".join(f"{t}-instructed: " + ", ".join(f"φ({p}) {_fmt(v)}" for p, v in m.items()) +
                       f", angle {_num((sh.get('angle_by_target') or {}).get(t), 1)}°"
                       for t, m in (sh.get("mean_by_target") or {}).items())
        x, y = sh.get("angle_players") or ("X", "Y")
        doc.p(f"Modality Shapley ({_d('shapley', 'φ')}; {sh['n_samples']} samples, removal {sh['removal']}, v = "
              f"{sh['value']} of the {sh['reference']} answer): {mean}; {_d('angle', 'preference angle')} "
              f"{_num(sh.get('angle'), 1)}° (+90° only {y}, −90° only {x}); {by}. Efficiency gap "
              f"{_fmt(sh.get('efficiency_gap'))} (φ sums to v(all) − v(none) up to this).")
        doc.fig("shapley", "Mean Shapley value of each modality, over all samples and per instruction; the angle under "
                           "each group says which modality the answer's score rests on (0° balanced).",
                "fig-shapley", "modality Shapley values")
    else:
        doc.note(f"Modality Shapley: skipped ({_skipped(report, 'shapley')}).")
    ks = _ok(report, "keyspace")
    doc.h(3, "Are image keys and text keys apart? (key space)", "keyspace")
    if ks:
        sm = ks.get("summary") or {}
        doc.p(f"{_d('keyspace', 'Key space')} ({ks['modalities'][0]} vs {ks['modalities'][1]} keys, {ks['keys']}): "
              f"cross-modal MMD {_fmt(sm.get('mmd_mean'))} (mean over layers; max {_fmt(sm.get('mmd_max'))} at layer "
              f"{sm.get('layer_max')}) vs intra-modal {_fmt(sm.get('intra_mean'))} (ratio {_fmt(sm.get('ratio'))}); "
              f"JSD {_fmt(sm.get('jsd_mean'))} bits. For scale, the paper this measure comes from (Unveiling "
              "Intrinsic Text Bias in MLLMs through Attention Key-Space Analysis, arXiv:2510.26721, 2025) reports "
              "a cross-modal MMD of about 0.408 against 0.012 within a modality on two 7B MLLMs.")
        doc.fig("keyspace", "Left: MMD between image and text keys per layer (solid) against the MMD between random "
                            "halves of one modality (dashed): a solid curve far above the dashed ones means the two "
                            "modalities' keys occupy different regions. Right: the keys of the layer with the largest "
                            "gap on their first two principal components.", "fig-keyspace", "key-space MMD")
    else:
        doc.note(f"Key space: skipped ({_skipped(report, 'keyspace')}).")
    im = _ok(report, "imbalance")
    doc.h(3, "Which modality each head reads (attention imbalance)", "imbalance")
    if im:
        pl = im.get("per_layer_mean") or []
        m1, m2 = im["modalities"]
        doc.p(f"{_d('imbalance', 'Attention imbalance')} log(N_{m1} / N_{m2}) at the {im['query']} token: mean "
              f"|imbalance| {_fmt(im.get('scalar'))}; per layer "
              + ", ".join(f"{layer}: {_num(v, 2)}" for layer, v in zip(im.get("layers") or [], pl))
              + f"; share of heads with N_{m1} > N_{m2}: {_fmt(im.get('share_m1_larger'))}.")
        doc.fig("imbalance", f"log(N_{m1} / N_{m2}) per (layer, head): red heads read mostly the {m1}, blue heads "
                             f"mostly the {m2}; compare with the arbitration heads named above.", "fig-imbalance",
                "attention imbalance heat map")
    else:
        doc.note(f"Attention imbalance: skipped ({_skipped(report, 'imbalance')}).")
    su = _ok(report, "surrogate")
    doc.h(3, "Physics surrogate", "surrogate")
    if su:
        cal = su.get("calibration") or {}
        ratio = su.get("angle_identifiability_ratio")
        note = " (≤ 2: the predicted angle does not depend on β here)" if ratio is None or ratio <= 2 else ""
        doc.p(f"{_d('surrogate', 'Surrogate')} ({cal.get('preset')} preset, calibration {cal.get('name')}: "
              f"{cal.get('grid')} × {cal.get('grid')} grid, seeds {cal.get('seeds')}; prediction "
              f"{su.get('prediction')}): β_self {_fmt(su.get('beta_self'))}, β_cross {_fmt(su.get('beta_cross'))}; "
              f"predicted angle {_num(su.get('angle_pred'), 1)}° (NMSE {_fmt(su.get('nmse'))}) vs measured "
              f"{_num(su.get('angle_measured'), 1)}°; angle identifiability ratio {_fmt(ratio)}{note}.")
        flags = su.get("flags") or []
        if flags:
            doc.p("Warnings of the fit:")
            doc.ul(list(flags), "warnings")
        doc.fig("surrogate", "The calibration's attention concentration c(β) (lines) and the model's measured "
                             "concentrations (stars) with the β they map to; a star on a flat part of a curve means β "
                             "is poorly determined.", "fig-surrogate", "surrogate fit")
    else:
        doc.note(f"Surrogate: skipped ({_skipped(report, 'surrogate')}).")


def _attractor_section(doc: _Doc, report: dict) -> None:
    if "attractors" not in report:
        return
    doc.h(2, "Label attractors", "attractors")
    at = _ok(report, "attractors")
    if not at:
        doc.note(f"Label perturbation: skipped ({_skipped(report, 'attractors')}).")
        return
    st = at.get("settings") or {}
    items = [f"{_d('attractors', 'Label perturbation')}: {len(at['sample_ids'])} labelled samples × "
             f"{at['n_subsets']} removal sets (sizes {st.get('sizes')}"
             f"{', all' if st.get('exhaustive') else ', seeded sample'}) "
             f"of the labels {', '.join(at['labels'])}; a removed true label counts as an error ({at['forced']}); "
             f"hierarchy by {at['hierarchy_how']}; edges shown at ≥ {100 * at['threshold']:g}% of a condition's "
             "errors."]
    for c, sm in (at.get("summary") or {}).items():
        edges = ", ".join(f"{e['source']} → {e['target']} {100 * e['weight']:.0f}%" for e in sm["top_edges"]) or "none"
        kept = "+".join(at["conditions"].get(c) or []) or "nothing"
        items.append(f"{c} ({kept} kept): accuracy {_fmt(sm['accuracy'])} (true label offered: "
                     f"{_fmt(sm.get('accuracy_offered'))}), {sm['n_errors']} errors of {sm['n_rows']}; top edges "
                     f"{edges}; attractors {' > '.join(sm['hierarchy'])}.")
    sim = (at.get("similarity") or {}).get("all") or {}
    if len(sim) > 1:
        items.append("Error-pattern similarity with all (cosine of the error weights): "
                     + ", ".join(f"{c} {_fmt(v)}" for c, v in sim.items() if c != "all") + ".")
    doc.ul(items)
    doc.fig("attractors", "Per condition (which modalities the model gets), the confusion and the error-attractor "
                          "graph: arrows go from the true label to the predicted one, thicker for more errors; the "
                          "labels at the top of the hierarchy are where errors fall.", "fig-attractors",
            "label attractors")


def _steering_section(doc: _Doc, report: dict) -> None:
    s = report.get("steering")
    if not isinstance(s, dict):
        return
    doc.h(2, "Steering", "steering")
    keys = [k for k in s if isinstance(s[k], (int, float, str)) and k not in ("data", "diagnosis")]
    doc.table(["quantity", "value"], [[k, _num(s[k], 3)] for k in keys],
              "The steering section written by `arbiter steer` (steering.png in its folder).")


def _run_section(doc: _Doc, report: dict) -> None:
    timing = {k: v for k, v in (report.get("timing_s") or {}).items() if isinstance(v, (int, float))}
    if not timing:
        return
    doc.h(2, "Steps and their time", "run")
    doc.table(["step", "seconds"], [[k, _num(float(v), 1)] for k, v in timing.items()],
              "Wall time of each step of this run (a step resumed from an earlier run shows that run's time).")


def _definitions_section(doc: _Doc, report: dict, docs_out: Path | None) -> None:
    doc.h(2, "Definitions", "definitions")
    folder = _docs_folder()
    doc.p("Every measure shown above, in one line; the linked page of arbiter's methods docs gives the formula, the "
          "options and where the definition is arbiter's own proposal."
          + ("" if folder else " (The methods docs live in the `docs/methods/` folder of arbiter's source; they were "
                               "not found next to this installation.)"))
    items = []
    for key, (name, page, text) in DEFINITIONS.items():
        href = _docs_href(page, docs_out)
        link = f" [docs/methods/{page}]({href})" if href else f" (docs/methods/{page})"
        items.append(f"<a:def-{key}>**{name}**: {text}{link}")
    doc.ul(items, "definitions")


# ============================================================================================ renderers


_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_ANCHOR = re.compile(r"^<a:([A-Za-z0-9_-]+)>")


def _inline_html(text: str) -> str:
    s = html.escape(text, quote=False)
    s = _LINK.sub(lambda m: f'<a href="{m.group(2).replace(chr(34), "&quot;")}">{m.group(1)}</a>', s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)


def _cell_md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"[−+-]?\d[\d.]*( ± [−+-]?\d[\d.]*)?|n/a|—/empty", str(text)))


def _render_markdown(doc: _Doc, drawn: set[str] | None) -> str:
    out: list[str] = []
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            _, level, text, anchor = b
            if anchor and level > 1:
                out += [f'<a id="{anchor}"></a>', ""]
            out += [f"{'#' * level} {text}", ""]
        elif kind == "p":
            out += [b[1], ""]
        elif kind == "note":
            out += [f"> {b[1]}", ""]
        elif kind in ("ul", "summary"):
            for item in b[1]:
                a = _ANCHOR.match(item)
                item = (f'<a id="{a.group(1)}"></a>' + item[a.end():]) if a else item
                out.append(f"- {item}")
            out.append("")
        elif kind == "table":
            _, header, rows, caption = b
            if caption:
                out += [caption, ""]
            out += ["| " + " | ".join(_cell_md(h) for h in header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(_cell_md(c) for c in row) + " |" for row in rows]
            out.append("")
        elif kind == "grid":
            continue
        elif kind == "fig":
            _, name, caption, anchor, alt, path, number = b
            file = path or f"{name}.png"
            if path is None and drawn is not None and name not in drawn:
                out += [f"> Figure {number} ({alt}) not drawn: matplotlib is not installed "
                        "(`pip install 'arbiter-mllm[plots]'`).", ""]
                continue
            out += [f'<a id="{anchor}"></a>', "", f"![{alt}]({file})", "", f"*Figure {number}. {caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#fff;color:#1f2328;font:16px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",
Arial,sans-serif}
main{max-width:1080px;margin:0 auto;padding:20px 32px 64px}
h1{font-size:1.75em;margin:.3em 0 .2em;overflow-wrap:anywhere}
h2{font-size:1.35em;margin:2em 0 .6em;padding-bottom:.25em;border-bottom:1px solid #d1d9e0}
h3{font-size:1.1em;margin:1.5em 0 .4em}
p,li,figcaption{overflow-wrap:anywhere}
td,th{overflow-wrap:break-word}
a{color:#0969da;text-decoration:none} a:hover{text-decoration:underline}
code{font:.9em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f6f8fa;padding:.1em .3em;
border-radius:4px}
.summary{background:#f6f8fa;border:1px solid #d1d9e0;border-radius:8px;padding:.6em 1.4em .6em 2.4em}
.summary li{margin:.45em 0}
.note{margin:.8em 0;padding:.6em 1em;border-left:4px solid #9a6700;background:#fff8c5;border-radius:0 6px 6px 0}
.table-wrap{max-width:100%;overflow-x:auto;margin:.6em 0 1em}
table{border-collapse:collapse;font-size:.9em}
.table-caption{font-weight:600;margin:.2em 0 .4em}
th,td{border:1px solid #d1d9e0;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fbfcfd}
figure{margin:1.2em 0;padding:.6em;border:1px solid #e6eaef;border-radius:8px}
figure img{display:block;max-width:100%;height:auto;margin:0 auto}
figcaption{font-size:.92em;color:#424a53;margin-top:.5em}
figcaption b{color:#1f2328}
.figure-grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:0 14px;align-items:start}
.figure-grid figure{margin:.6em 0}
ul.definitions li{margin:.35em 0}
ul.warnings li{color:#6e4500}
nav{font-size:.92em;color:#59636e}
nav a{margin-right:.2em}
:target{scroll-margin-top:12px}
li:target,figure:target{outline:2px solid #0969da;outline-offset:2px}
"""


def _render_html(doc: _Doc, out: Path | None, drawn: dict[str, Path] | None) -> str:
    parts: list[str] = []
    toc = [(b[3], b[2]) for b in doc.blocks if b[0] == "h" and b[1] == 2 and b[3]]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            _, level, text, anchor = b
            parts.append(f'<h{level}{f" id={chr(34)}{anchor}{chr(34)}" if anchor else ""}>{_inline_html(text)}'
                         f"</h{level}>")
            if level == 1 and toc:
                parts.append("<nav>Sections: " + " · ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in toc)
                             + "</nav>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "note":
            parts.append(f'<p class="note">{_inline_html(b[1])}</p>')
        elif kind in ("ul", "summary"):
            cls = "summary" if kind == "summary" else b[2]
            items = []
            for item in b[1]:
                a = _ANCHOR.match(item)
                ident = f' id="{a.group(1)}"' if a else ""
                items.append(f"<li{ident}>{_inline_html(item[a.end():] if a else item)}</li>")
            parts.append(f'<ul{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>' + "".join(items) + "</ul>")
        elif kind == "table":
            _, header, rows, caption = b
            cap = f'<p class="table-caption">{_inline_html(caption)}</p>' if caption else ""
            head = "<tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in header) + "</tr>"
            body = "".join("<tr>" + "".join(
                f'<td{" class=" + chr(34) + "num" + chr(34) if _is_number(c) else ""}>{_inline_html(str(c))}</td>'
                for c in row) + "</tr>" for row in rows)
            parts.append(f'<div class="table-wrap">{cap}<table><thead>{head}</thead><tbody>{body}</tbody></table>'
                         "</div>")
        elif kind == "grid":
            parts.append('<div class="figure-grid">' if b[1] else "</div>")
        elif kind == "fig":
            _, name, caption, anchor, alt, path, number = b
            src = _figure_source(name, path, out, drawn)
            cap = f"<figcaption><b>Figure {number}.</b> {_inline_html(caption)}</figcaption>"
            if isinstance(src, str):
                parts.append(f'<figure id="{anchor}"><img alt="{html.escape(alt)}" src="{src}"/>{cap}</figure>')
            else:
                parts.append(f'<figure id="{anchor}"><p class="note">{html.escape(src[0])}</p>{cap}</figure>')
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(doc.blocks[0][2])}</title><style>{_CSS}</style></head><body><main>"
            + "".join(parts) + "</main></body></html>")


def _figure_source(name: str, path: str | None, out: Path | None, drawn: dict[str, Path] | None):
    """A data: URI of the figure's PNG (the page stays one file), or (why it is missing,)."""
    if path is not None:
        if out is None:
            return path
        p = (out / path).resolve()
        if not p.is_file():
            return (f"figure file {path} is missing from the report folder.",)
    else:
        if drawn is None:
            return f"{name}.png"
        if name not in drawn:
            return ("figure not drawn: matplotlib is not installed (pip install 'arbiter-mllm[plots]').",)
        p = drawn[name]
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()


# ============================================================================================ public entry points


def markdown(report: dict, out: str | os.PathLike | None = None, drawn: set[str] | None = None) -> str:
    """report.md's text: the summary in words, a section per step, the definitions. ``out``: the folder the file
    goes to (for relative links to the methods docs); ``drawn``: the figures that exist (None: all expected)."""
    return _render_markdown(_document(report, Path(out) if out is not None else None), drawn)


def html_page(report: dict, out: str | os.PathLike | None = None, drawn: dict[str, Path] | None = None) -> str:
    """report.html's text: the same content as :func:`markdown`, figures embedded as data: URIs."""
    return _render_html(_document(report, Path(out) if out is not None else None),
                        Path(out) if out is not None else None, drawn)


def write(report: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, the PNG figures, report.md, a self-contained report.html and the methods pages they link
    to (``methods/``) into ``out``."""
    from .util import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    pngs = _plots(report, out)
    _copy_methods_docs(out)
    (out / "report.md").write_text(markdown(report, out, set(pngs)))
    (out / "report.html").write_text(html_page(report, out, pngs))
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html", **pngs}
