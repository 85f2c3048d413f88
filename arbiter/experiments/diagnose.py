"""diagnose: the whole arbitration diagnosis of a model on a conflict data set, step by step and resumable.

Each finished step is written atomically to OUT/steps/<step>.json; a rerun with the same settings skips it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..data import ConflictDataset
from ..lens import attach
from ..metrics._common import jsonable
from .baseline import evaluate
from .heads import (amplification_experiment, attribution_ranking, blocking_experiment, compare_rankings,
                    dla_ranking, exhaustive_ranking)
from .knockout_map import knockout_map

STEPS = ("baseline", "knockout", "heads", "blocking", "amplification")


def _atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(jsonable(obj), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_hash(model) -> str:
    cfg = model.config.to_json_string(use_diff=False) if hasattr(model.config, "to_json_string") else str(model.config)
    return hashlib.sha256(cfg.encode()).hexdigest()[:16]


class _Steps:
    """Load finished steps from disk or run them; the key ties a step to the run's settings."""

    def __init__(self, out: Path, key: dict, log: Callable[[str], None]):
        self.dir = out / "steps"
        self.key = key
        self.log = log

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        path = self.dir / f"{name}.json"
        if path.exists():
            try:
                saved = json.loads(path.read_text())
                if saved.get("key") == self.key:
                    self.log(f"[arbiter] {name}: done earlier, reusing {path}")
                    return saved["result"]
            except (OSError, json.JSONDecodeError):
                pass
        t = time.perf_counter()
        result = jsonable(fn())
        result["seconds"] = round(time.perf_counter() - t, 3)
        _atomic_json(path, {"key": self.key, "result": result})
        self.log(f"[arbiter] {name}: {result['seconds']:.1f} s")
        return result


def diagnose(model, processor, dataset: ConflictDataset, out: str | os.PathLike, limit: int | None = None,
             window: int = 9, top: float = 0.05, batch_size: int = 8, n_random: int = 10,
             alphas=(1.5, 2.0, 3.0, 5.0), head_methods=("exhaustive", "attribution", "dla"),
             generate: bool = True, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run every step and return the report dict (also written to OUT/report.json by arbiter.report)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = [s for s in dataset.samples if s.conflict]
    if limit is not None:
        samples = samples[:limit]
    key = {"config": config_hash(model), "data": str(getattr(dataset, "path", "")), "n": len(samples),
           "window": window, "top": top, "n_random": n_random, "alphas": list(alphas), "generate": generate,
           "dtype": str(next(model.parameters()).dtype)}
    steps = _Steps(out, key, log)
    model.eval()
    with attach(model, processor) as lens:
        base_obj = {}

        def baseline():
            r = evaluate(lens, samples, batch_size, dataset, generate=generate, progress=progress,
                         trace_dir=out / "traces" / "baseline")
            base_obj["r"] = r
            d = r.to_dict()
            d["per_sample"] = {"ids": r.sample_ids, "targets": r.targets, "pi": r.pi.tolist(),
                               "follows": r.follows, "answers": r.answers}
            return d
        base = steps.run("baseline", baseline)
        correct = [f == 1 for f in base["per_sample"]["follows"]]
        kmap = steps.run("knockout", lambda: knockout_map(lens, samples, window=window, batch_size=batch_size,
                                                          dataset=dataset, progress=progress).to_dict())

        def heads():
            rankings = {}
            fns = {"exhaustive": lambda: exhaustive_ranking(lens, samples, batch_size, dataset=dataset,
                                                            progress=progress),
                   "attribution": lambda: attribution_ranking(lens, samples, batch_size, dataset=dataset),
                   "dla": lambda: dla_ranking(lens, samples, batch_size, dataset=dataset)}
            for m in head_methods:
                rankings[m] = fns[m]()
            ref = rankings[head_methods[0]]
            return {"method": ref.method, "ranking": ref.ranking(), "top": [list(h) for h in ref.top(top)],
                    "scores": {m: r.to_dict() for m, r in rankings.items()},
                    "agreement": [compare_rankings(ref, r, top) for m, r in rankings.items() if r is not ref]}
        hd = steps.run("heads", heads)
        topg = [tuple(h) for h in hd["top"]]
        block = steps.run("blocking", lambda: blocking_experiment(
            lens, samples, correct, topg, fraction=top, n_random=n_random, batch_size=batch_size,
            dataset=dataset).to_dict())
        amp = steps.run("amplification", lambda: amplification_experiment(
            lens, samples, correct, topg, alphas=alphas, n_random=n_random, batch_size=batch_size,
            dataset=dataset).to_dict())
        summary = lens.facts.summary()
    summary["config_hash"] = key["config"]
    return {
        "model": summary,
        "n_samples": base["n_samples"],
        "mfr": base["mfr"],
        "mfr_pi": base["mfr_pi"],
        "mfr_source": base["mfr_source"],
        "mam": base["mam"],
        "mam_components": base["mam_components"],
        "ldar": base["ldar"],
        "knockout": kmap["entries"],
        "knockout_window": window,
        "heads": {"method": hd["method"], "ranking": hd["ranking"], "agreement": hd["agreement"],
                  "scores": {m: v["by_target"] for m, v in hd["scores"].items()},
                  "rankings": {m: v["ranking"] for m, v in hd["scores"].items()}},
        "blocking": block,
        "amplification": amp,
        "timing_s": {s: r["seconds"] for s, r in zip(STEPS, (base, kmap, hd, block, amp))},
        "settings": key,
    }
