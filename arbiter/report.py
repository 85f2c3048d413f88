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
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for t, style in (("vision", "-o"), ("text", "-s")):
        v = report["mam"].get(t) or []
        if v:
            ax[0].plot(range(len(v)), v, style, label=f"{t}-instructed")
    ax[0].axhline(0, color="grey", lw=0.8)
    ax[0].set(title="MAM at the last token (logit lens)", xlabel="layer", ylabel="Φ_p − Φ_c")
    ax[0].legend()
    ld = [x if x is not None else float("nan") for x in report["ldar"]]
    ax[1].plot(range(len(ld)), ld, "-o", color="C2")
    ax[1].axhline(0.5, color="grey", ls="--", lw=0.8, label="chance")
    ax[1].set(title="LDAR (instruction anchors, TopK=2)", xlabel="layer", ylim=(0, 1.05))
    ax[1].legend()
    save(fig, "mam_ldar.png")

    entries = report.get("knockout") or []
    if entries:
        names = []
        for e in entries:
            n = f"{e['src']}→{e['dst']}"
            if n not in names:
                names.append(n)
        centers = sorted({e["center"] for e in entries})
        import numpy as np

        grid = np.full((len(names), len(centers)), np.nan)
        for e in entries:
            grid[names.index(f"{e['src']}→{e['dst']}"), centers.index(e["center"])] = \
                e["nssd"] if e["nssd"] is not None else np.nan
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(centers) + 3), 0.35 * len(names) + 1.5))
        lim = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(centers)), centers)
        ax.set(title=f"Knockout map: I_NSSD (window {report.get('knockout_window')})", xlabel="centre layer")
        fig.colorbar(im, ax=ax)
        save(fig, "knockout_map.png")

    ranking = report["heads"]["ranking"]
    if ranking:
        import numpy as np

        L = report["model"]["n_layers"]
        H = max(r["head"] for r in ranking) + 1
        grid = np.full((L, H), np.nan)
        for r in ranking:
            grid[r["layer"], r["head"]] = r["score"]
        top = report["blocking"].get("heads") or []
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        im = ax[0].imshow(grid, aspect="auto", cmap="viridis")
        ax[0].set(title=f"head scores ({report['heads']['method']})", xlabel="head", ylabel="layer")
        fig.colorbar(im, ax=ax[0])
        counts = np.bincount([h[0] for h in top], minlength=L)
        ax[1].bar(range(L), counts)
        ax[1].set(title=f"TopG heads per layer ({len(top)} heads)", xlabel="layer", ylabel="count")
        save(fig, "heads.png")

    b, a = report["blocking"], report["amplification"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    if b.get("mfr_random"):
        ax[0].bar(["base", "TopG", "random"], [b["mfr_base"], b["mfr_top"],
                                               sum(b["mfr_random"]) / len(b["mfr_random"])],
                  yerr=[0, 0, b.get("relative_drop_random_sd") or 0], color=["grey", "C3", "C0"])
    ax[0].set(title=f"Blocking on correct samples (n={b.get('n_samples')})", ylabel="MFR", ylim=(0, 1.05))
    if a.get("restored"):
        ax[1].plot(a["alpha"], a["restored"], "-o", label="TopG")
        ax[1].errorbar(a["alpha"], a["restored_random_mean"], yerr=a["restored_random_sd"], fmt="-s",
                       label="random heads")
        ax[1].legend()
    ax[1].set(title=f"Amplification on failures (n={a.get('n_failed')})", xlabel="alpha",
              ylabel="restored fraction", ylim=(0, 1.05))
    save(fig, "blocking_amplification.png")
    return paths


def _fmt(x) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def markdown(report: dict) -> str:
    m, b, a = report["mfr"], report["blocking"], report["amplification"]
    ld = [x for x in report["ldar"] if x is not None]
    ko = sorted((e for e in report["knockout"] if e["nssd"] is not None), key=lambda e: e["nssd"])[:5]
    agree = "; ".join(f"{g['method']}: Spearman {_fmt(g['spearman'])}, TopG overlap {_fmt(g['topg_overlap'])}"
                      for g in report["heads"].get("agreement", []))
    lines = [
        f"# arbiter diagnosis: {report['model']['class']}",
        "",
        f"{report['n_samples']} conflict samples; model {report['model']['n_layers']} layers × "
        f"{report['model']['n_heads']} heads.",
        "",
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
        "",
        "Most negative knockouts (I_NSSD < 0 hurts instruction following):",
        "",
    ]
    for e in ko:
        lines.append(f"- {e['src']} → {e['dst']} around layer {e['center']}: I_NSSD {_fmt(e['nssd'])}, "
                     f"MFR {_fmt(e['mfr'])}")
    lines += ["", "Definitions: ../shared/SPEC.md sections 3–7 (MAM, I_NSSD, LDAR, MFR, head scores); choices "
              "marked proposed there are documented in arbiter.metrics.", ""]
    return "\n".join(lines)


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
    body = "".join(f"<p>{html.escape(line)}</p>" if not line.startswith("|") else
                   f"<pre>{html.escape(line)}</pre>" for line in md.splitlines() if line)
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>arbiter report</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}img{max-width:100%}"
        "pre{margin:0}</style></head><body>" + body + imgs + "</body></html>")
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html",
            **{p.stem: p for p in pngs}}
