"""Benchmark section on the shipped trained organism (llava_tiny): the full knockout map and the exhaustive
head ranking against their naive loops (one forward per setting and batch), and attribution patching's cost
(first order, 4-step integrated gradients, AtP* GradDrop).

    python benchmarks/organism.py [--samples 96] [--window 3] [--threads 1] [--json OUT.json]

Same run, same encoded batches; the batched and loop paths are timed round-robin (one untimed warm-up round),
and their values are compared (max |Δπ|, max |Δ head drop|): the speed-up is only reported for equal results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import arbiter
from arbiter import organisms
from arbiter.experiments.common import batches, margin_from_logits, pi_from_logits
from arbiter.experiments.heads import attribution_ranking, exhaustive_ranking
from arbiter.experiments.knockout_map import EDGE_FAMILIES, knockout_map
from arbiter.probes.head_interventions import HeadScale
from arbiter.sweep import knockout_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import _median_times  # round-robin timing, shared with benchmarks/run.py


def bench_organism(name: str = "llava_tiny", samples: int = 96, window: int = 3, batch_size: int = 8,
                   repeats: int = 1) -> dict[str, Any]:
    """Flat figures (``organism_*`` keys), see the module docstring."""
    model, processor, ds = organisms.load(name)
    conflict = [s for s in ds.samples if s.conflict][:samples]
    r: dict[str, Any] = {"organism": name, "organism_samples": len(conflict), "organism_window": window}
    with arbiter.attach(model, processor) as lens, torch.no_grad():
        items = list(batches(lens, conflict, batch_size, ds))
        settings = [s.meta for s in knockout_settings(lens, EDGE_FAMILIES, window)]
        heads = [(layer, h) for layer in lens.facts.attention_layers for h in range(lens.facts.heads(layer)[0])]

        def plain():
            out = []
            for it in items:
                lens.use(it.batch.groups)
                out.append(model(**it.batch.inputs).logits[:, -1])
            return out

        def kmap():
            return knockout_map(lens, conflict, window=window, batch_size=batch_size, dataset=ds)

        def kloop():  # one forward per (setting, batch); settings whose edge a batch lacks are skipped too
            out = []
            for it in items:
                g = it.batch.groups
                lens.use(g)
                for m in settings:
                    if not bool((g[m["src"]].any(1) & g[m["dst"]].any(1)).any()):
                        continue
                    with lens.knockout(m["src"], m["dst"], layers=m["layers"], allow_empty=True):
                        lg = model(**it.batch.inputs).logits[:, -1]
                    out.append(((m["src"], m["dst"], m["center"]), pi_from_logits(lg, it.ids_p, it.ids_c)))
            return out

        def hsweep():
            return exhaustive_ranking(lens, conflict, batch_size, dataset=ds)

        def hloop():
            drops = torch.zeros(len(conflict), len(heads))
            row = 0
            for it in items:
                lens.use(it.batch.groups)
                base = margin_from_logits(model(**it.batch.inputs).logits[:, -1], it.ids_p, it.ids_c)
                for j, (layer, h) in enumerate(heads):
                    with lens.probe(HeadScale([(layer, h)], alpha=0.0), layers=[layer]):
                        m = margin_from_logits(model(**it.batch.inputs).logits[:, -1], it.ids_p, it.ids_c)
                    drops[row:row + it.size, j] = base - m
                row += it.size
            return drops

        t = _median_times({"plain": plain, "kmap": kmap, "kloop": kloop, "hsweep": hsweep, "hloop": hloop}, repeats)
    # equal results first
    km = t["kmap"][1]
    loop_pi: dict[tuple, list] = {}
    for key, pi in t["kloop"][1]:
        loop_pi.setdefault(key, []).append(pi)
    diffs = [abs(e["pi"] - float(torch.cat(loop_pi[(e["src"], e["dst"], e["center"])]).mean()))
             for e in km.entries if (e["src"], e["dst"], e["center"]) in loop_pi]
    ex = t["hsweep"][1]
    sweep_drops = ex.per_sample.flatten(1)[:, :len(heads)]
    r.update({
        "organism_plain_forward_s": t["plain"][0],
        "organism_knockout_settings": len(settings),
        "organism_knockout_map_s": t["kmap"][0], "organism_knockout_loop_s": t["kloop"][0],
        "organism_knockout_speedup": t["kloop"][0] / t["kmap"][0],
        "organism_knockout_max_abs_diff": max(diffs) if diffs else None,
        "organism_heads": len(heads),
        "organism_head_sweep_s": t["hsweep"][0], "organism_head_loop_s": t["hloop"][0],
        "organism_head_sweep_speedup": t["hloop"][0] / t["hsweep"][0],
        "organism_head_max_abs_diff": float((sweep_drops - t["hloop"][1]).abs().max()),
    })
    with arbiter.attach(model, processor) as lens:  # attribution: time / plain forward time, same samples
        for method, steps in (("atp", 1), ("ig", 4), ("graddrop", 1)):
            t0 = time.perf_counter()
            att = attribution_ranking(lens, conflict, batch_size, dataset=ds, method=method, steps=steps)
            s = time.perf_counter() - t0
            key = {"atp": "organism_attribution", "ig": "organism_attribution_ig4",
                   "graddrop": "organism_attribution_graddrop"}[method]
            r[f"{key}_s"] = s
            r[f"{key}_forward_equivalents_measured"] = s / t["plain"][0]
            r[f"{key}_forward_equivalents"] = att.cost_forward_equivalents
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="llava_tiny")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = bench_organism(args.name, args.samples, args.window, repeats=args.repeats)
    for k, v in r.items():
        print(f"{k:<48} {v:.4g}" if isinstance(v, float) else f"{k:<48} {v}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
