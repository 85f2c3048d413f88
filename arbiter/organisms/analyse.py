"""Where an organism's decisive heads sit and what they read: the figures its README and the closing notes report.

``python -m arbiter.organisms.analyse llava_tiny --out OUT [--window 3]`` runs ``arbiter diagnose`` on the
organism's shipped data (report in OUT), then adds ``OUT/heads_analysis.json``:

* ``layer_histogram``: for the top ``--top-heads`` heads of each ranking (exhaustive blocking, attribution
  patching, DLA), how many sit in each layer, plus the per-layer sum of |exhaustive score|;
* ``reads``: for every head, the attention mass its ``last``-position query puts on each prompt part (image,
  context, instruction, constraint, question, other), mean over the conflict samples, split by target; and
  for the top heads, which part dominates (so a head that *reads the instruction* is told apart from one
  that *carries one modality's content*);
* ``roles``: :func:`arbiter.steer.head_roles` of the top heads (vision-expert / text-expert / shared hub).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import arbiter
from arbiter import report as report_mod
from arbiter.experiments.diagnose import diagnose
from arbiter.organisms import load
from arbiter.steer import head_roles

PARTS = ("image", "context", "instruction", "constraint", "question")


@torch.no_grad()
def attention_reads(model, processor, samples, dataset=None, batch_size: int = 16) -> dict[str, Any]:
    """Mean attention mass of each head's last-position query on each prompt part, per target.

    Returns {"parts": [...], "vision": [layers, heads, parts+1], "text": [...]}: the last column is "other"
    (template and special tokens, the query's own position)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    with arbiter.attach(model, processor) as lens:
        n_layers = lens.facts.n_layers
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            batch = lens.encode(chunk, dataset=dataset)
            with lens.record("attn", rows="last") as rec:
                model(**batch.inputs)
            g = batch.groups
            masks = []
            for p in PARTS:
                try:
                    masks.append(g.mask(p).float())
                except arbiter.errors.GroupError:
                    masks.append(torch.zeros_like(g.mask("all").float()))
            masks = torch.stack(masks, 1)  # [b, parts, seq]
            layers = []
            for layer in range(n_layers):
                probs = rec.trace.site("attn.probs", layer).float()  # [b, heads, 1, seq]
                mass = torch.einsum("bhs,bps->bhp", probs[:, :, -1], masks)
                layers.append(torch.cat([mass, (1 - mass.sum(-1, keepdim=True)).clamp_min(0)], -1))
            m = torch.stack(layers, 1).numpy()  # [b, layers, heads, parts+1]
            for j, s in enumerate(chunk):
                sums[s.target] = sums.get(s.target, 0) + m[j]
                counts[s.target] = counts.get(s.target, 0) + 1
    out: dict[str, Any] = {"parts": list(PARTS) + ["other"]}
    for t in sums:
        out[t] = (sums[t] / counts[t]).round(4).tolist()
    return out


def layer_histogram(ranking: list[dict], n_layers: int, k: int) -> list[int]:
    hist = [0] * n_layers
    for r in ranking[:k]:
        hist[r["layer"]] += 1
    return hist


def analyse(name: str, out: str | Path, window: int = 3, top_heads: int = 6, limit: int | None = None,
            top: float = 0.05) -> dict[str, Any]:
    out = Path(out)
    torch.manual_seed(0)
    model, processor, ds = load(name)
    rep = diagnose(model, processor, ds, out, limit=limit, window=window, top=top)
    report_mod.write(rep, out)
    n_layers = rep["model"]["n_layers"] if "n_layers" in rep["model"] else model.config.get_text_config(
    ).num_hidden_layers
    rankings = rep["heads"]["rankings"]
    hist = {m: layer_histogram(r, n_layers, top_heads) for m, r in rankings.items()}
    mass = [0.0] * n_layers
    for r in rankings["exhaustive"]:
        mass[r["layer"]] += abs(r["score"])
    samples = [s for s in ds.samples if s.conflict][:limit]
    reads = attention_reads(model, processor, samples, dataset=ds)
    parts = reads["parts"]
    top_list = [(r["layer"], r["head"]) for r in rankings["exhaustive"][:top_heads]]
    described = []
    for layer, head in top_list:
        row = {"layer": layer, "head": head}
        for t in ("vision", "text"):
            if t in reads:
                v = reads[t][layer][head]
                row[f"reads_{t}"] = dict(zip(parts, v))
                row[f"dominant_{t}"] = parts[int(np.argmax(v))]
        described.append(row)
    scores = rep["heads"]["scores"]["exhaustive"]
    result = {
        "organism": name,
        "window": window,
        "top_heads": top_heads,
        "layer_histogram": hist,
        "exhaustive_abs_score_per_layer": [round(x, 5) for x in mass],
        "top": described,
        "roles": head_roles(scores, top_list),
        "reads": reads,
        "agreement": rep["heads"]["agreement"],
        "blocking_agreement": {k: rep["blocking"].get("by_ranking", {}).get(k) for k in ("ks", "summary", "random")},
    }
    (out / "heads_analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m arbiter.organisms.analyse", description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("--out", required=True)
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--top-heads", type=int, default=6)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    r = analyse(args.name, args.out, args.window, args.top_heads, args.limit)
    print(json.dumps({k: r[k] for k in ("layer_histogram", "exhaustive_abs_score_per_layer", "roles")}, indent=1))
    for row in r["top"]:
        print(row["layer"], row["head"], row.get("dominant_vision"), row.get("dominant_text"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
