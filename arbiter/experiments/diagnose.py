"""diagnose: the whole arbitration diagnosis of a model on a conflict data set, step by step and resumable.

Each finished step is written atomically to OUT/steps/<step>.json; a rerun with the same settings skips it.

Steps: baseline (MFR from greedy answers read at their first answer entity, with the counts of answers that mention
both answers or neither: ``mfr.answers``), knockout, heads, blocking (on the samples whose first answer follows the
instruction), amplification (on the others) (every conflict sample, after ``limit``), then the
modality steps on at most ``modality_limit`` (default 32) conflict samples that have an image, taken alternately
from the vision- and the text-instructed ones:

* ``shapley``: exact modality Shapley values (docs/methods/shapley.md) of the players present (image, audio, context), removal by
  knockout (default) or neutral input, v = log P(compliant answer); mean φ and the preference angle (X = image,
  Y = context) overall and split by target.
* ``keyspace``: key-space MMD / JSD per layer, image vs text keys (docs/methods/keyspace.md), with at most ``keyspace_max_n``
  (1,000) keys per modality per layer and ``keyspace_permutations`` (100) permutations (docs/methods/keyspace.md's defaults are
  5,000 and 200: slower, same estimator).
* ``imbalance``: attention imbalance log(N_image / N_context) per (layer, head) at the last token (docs/methods/imbalance.md).
* ``surrogate``: per-layer attention concentrations (image / text queries over image / text keys) inverted
  through the c(β) curves of a shipped calibration (``arbiter.surrogate.calibration``, no integration), the
  surrogate's angle at the fitted β read from the calibration's cells (``surrogate_predict="table"``, default) or
  simulated (``"simulate"``: 5 seeds, about 1-10 min of CPU depending on β), next to the ``shapley`` angle.

Then, when the data file declares a label set (its header ``{"arbiter_dataset": 1, "labels": [...]}``, i.e.
``ConflictDataset.labels``; otherwise it records ``{"skipped": "the data file declares no label set"}``):

* ``attractors``: label perturbation and error attractors (docs/methods/shapley.md,
  :func:`arbiter.experiments.attractors.label_perturbation`) on at most ``attractor_limit`` (24) samples that carry
  a ``label`` (every sample, conflict or not; taken round-robin over the labels so that a cap keeps every label),
  ``attractor_subsets`` (20, seed 0) of the removal sets of 1-4 labels (at most n_labels - 1), every condition
  (all modalities, each one alone); the result's ``to_dict()`` (no per-row scores) plus a short ``summary`` per
  condition (accuracy, the top 5 edges at or above the 2% display threshold, the attractor hierarchy).

A modality step that cannot run on a model or data set (no image, one modality, a token group missing) records
``{"skipped": reason}``; ``skip=("keyspace", ...)`` skips steps on request. A data set without conflict samples
(a pure classification set, e.g. the shipped ``omni_emotion_tiny`` organism's data) records
``{"skipped": "no conflict sample"}`` for the five conflict steps and the modality steps, and runs the
``attractors`` step.

Under torchrun (an initialised process group with several ranks, see :mod:`arbiter.distributed`) the first five
steps shard their per-sample work over the ranks by whole batches and gather it before reducing (the same
numbers as one process); the modality and attractors steps run on rank 0 only; rank 0 reads and writes
``OUT/steps``."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import distributed
from ..data import ConflictDataset
from ..errors import ArbiterError, DataError
from ..lens import attach
from ..util import atomic_write_json, jsonable
from ..probes.base import Probe
from .baseline import evaluate
from ..diagnose_config import HEAD_METHOD_NAMES, HEAD_METHODS, MODALITY_STEPS, SKIPPABLE_STEPS, DiagnoseConfig
from .heads import (
    amplification_experiment,
    attribution_ranking,
    blocking_agreement,
    blocking_experiment,
    compare_rankings,
    dla_ranking,
    exhaustive_ranking,
)
from .head_search import search_ranking
from .knockout_map import knockout_map

STEPS = ("baseline", "knockout", "heads", "blocking", "amplification", "shapley", "keyspace", "imbalance",
         "surrogate", "attractors")
CONFLICT_STEPS = ("baseline", "knockout", "heads", "blocking", "amplification")
NO_CONFLICT = "no conflict sample"


def config_hash(model) -> str:
    cfg = model.config.to_json_string(use_diff=False) if hasattr(model.config, "to_json_string") else str(model.config)
    return hashlib.sha256(cfg.encode()).hexdigest()[:16]


class _Steps:
    """Load finished steps from disk or run them; the key ties a step to the run's settings."""

    def __init__(self, out: Path, key: dict, log: Callable[[str], None]):
        self.dir = out / "steps"
        self.key = key
        self.log = log

    def run(self, name: str, fn: Callable[[], dict], settings: dict | None = None, collective: bool = True) -> dict:
        """``settings``: this step's own settings, added to the run's key (changing them reruns only this step).

        In a distributed diagnosis rank 0 decides whether the step is reused and writes its file; a
        ``collective`` step runs on every rank (its per-sample work sharded), another one on rank 0 only, its
        result broadcast."""
        key = jsonable({**self.key, **settings}) if settings else self.key
        path = self.dir / f"{name}.json"
        g = distributed.active()
        saved = None
        if (g is None or g.is_main) and path.exists():
            try:
                saved = json.loads(path.read_text())
                saved = saved["result"] if saved.get("key") == key else None
            except (OSError, json.JSONDecodeError, KeyError, AttributeError):
                saved = None
        if g is not None:
            saved = g.broadcast(saved)
        if saved is not None:
            self.log(f"[arbiter] {name}: done earlier, reusing {path}")
            return saved
        t = time.perf_counter()
        result = jsonable(fn() if g is None or collective else distributed.run_on_main(g, fn))
        result["seconds"] = round(time.perf_counter() - t, 3)
        if g is None or g.is_main:
            atomic_write_json(path, {"key": key, "result": result})
        self.log(f"[arbiter] {name}: {result['seconds']:.1f} s")
        return result


# ---------------------------------------------------------------------------------------------------------------
# modality steps (docs/methods/imbalance.md … docs/methods/surrogate.md)


def modality_samples(samples, limit: int | None) -> list:
    """The samples of the modality steps: those with an image, at most ``limit``, taken alternately from the
    vision- and the text-instructed ones (each keeps its order) so that a cap keeps both targets."""
    import itertools

    with_image = [s for s in samples if s.image is not None]
    v = [s for s in with_image if s.target == "vision"]
    t = [s for s in with_image if s.target == "text"]
    rest = [s for s in with_image if s.target not in ("vision", "text")]
    out = [s for pair in itertools.zip_longest(v, t) for s in pair if s is not None] + rest
    return out if limit is None else out[:limit]


def attractor_samples(samples, labels, limit: int | None) -> list:
    """The samples of the ``attractors`` step: those with a ``label``, at most ``limit``, taken round-robin over the
    labels (in the label set's order, labels outside it last; each label keeps its samples' order) so that a cap
    keeps every label."""
    import itertools

    with_label = [s for s in samples if s.label is not None]
    order = list(labels or []) + [x for x in dict.fromkeys(s.label for s in with_label) if x not in (labels or [])]
    by = [[s for s in with_label if s.label == lab] for lab in order]
    out = [s for group in itertools.zip_longest(*by) for s in group if s is not None]
    return out if limit is None else out[:limit]


def _attractor_summary(r, top: int = 5) -> dict:
    d = r.to_dict()  # scores=False: no per-row label log-probabilities
    summary = {}
    for c, pc in d["per_condition"].items():
        shown = sorted((e for e in pc["edges"] if e["shown"]), key=lambda e: (-e["weight"], e["source"], e["target"]))
        summary[c] = {"accuracy": pc["accuracy"], "accuracy_offered": pc["accuracy_offered"],
                      "n_rows": pc["n_rows"], "n_errors": pc["n_errors"],
                      "top_edges": [{k: e[k] for k in ("source", "target", "count", "weight")} for e in shown[:top]],
                      "hierarchy": [h["label"] for h in pc["hierarchy"]]}
    return {**d, "summary": summary,
            "reading": "labels removed from the prompt's option list (docs/methods/shapley.md, [PB]); per condition (all modalities, "
                       "or one alone with the others neutral) the confusion (rows truth, columns prediction), the "
                       f"error-attractor edges truth -> prediction (weight = share of the condition's errors; shown "
                       f">= {100 * r.threshold:g}%) and the labels ranked by the errors they attract "
                       f"({r.hierarchy_how})"}


def _no_image_reason(lens, msamples, all_samples, dataset) -> str | None:
    """Why the image-vs-text steps cannot run here (None: they can)."""
    if not all_samples:
        return "no conflict sample"
    if not msamples:
        return "no conflict sample has an image: the modality steps compare image and text"
    batch = lens.encode(msamples[:1], dataset=dataset)
    if "image" not in batch.groups or not bool(batch.groups["image"].any()):
        return ("the encoded prompt has no image token (a text-only model, or the processor dropped the image): "
                "the modality steps compare image and text")
    return None


def _shapley_summary(r) -> dict:
    from ..metrics.shapley import preference_angle

    d = r.to_dict()

    def angle(rows) -> float | None:
        if r.angle_players is None or not rows:
            return None
        x, y = (r.players.index(p) for p in r.angle_players)
        m = r.phi[rows].mean(dim=0)
        return preference_angle(float(m[x]), float(m[y]), r.angle_how)
    by = {t: [i for i, x in enumerate(r.targets) if x == t] for t in ("vision", "text")}
    return {
        "players": d["players"], "removal": d["removal"], "value": d["value"], "reference": d["reference"],
        "n_samples": d["n_samples"], "n_by_target": {t: len(v) for t, v in by.items()},
        "mean": d["mean"], "mean_by_target": d["mean_by_target"],
        "angle": d["angle"], "angle_by_target": {t: angle(v) for t, v in by.items() if v},
        "angle_players": d["angle_players"], "angle_how": d["angle_how"],
        "efficiency_gap": d["efficiency_gap"],
        "v_empty_mean": float(r.v_empty.mean()), "v_full_mean": float(r.v_full.mean()),
        "per_sample": {"ids": d["sample_ids"], "targets": d["targets"], "phi": d["phi"], "v_empty": d["v_empty"],
                       "v_full": d["v_full"], "angle": d["per_sample_angle"]},
        "reading": "phi: contribution of each modality to log P(compliant answer), exact Shapley over all "
                   "coalitions (docs/methods/shapley.md); angle +90 = only Y (text context) matters, -90 = only X (image)",
    }


def _keyspace_summary(k, plot_points: int) -> dict:
    import numpy as np

    d = k.to_dict()
    d.pop("per_layer", None)
    intra = [(a + b) / 2 if a is not None and b is not None else None for a, b in zip(d["intra_a"], d["intra_b"])]
    mmd = np.array([x if x is not None else np.nan for x in d["mmd"]], dtype=np.float64)
    itr = np.array([x if x is not None else np.nan for x in intra], dtype=np.float64)
    ok = np.isfinite(mmd)
    summary = {"mmd_mean": float(np.nanmean(mmd)) if ok.any() else None,
               "intra_mean": float(np.nanmean(itr)) if np.isfinite(itr).any() else None,
               "mmd_max": float(np.nanmax(mmd)) if ok.any() else None,
               "layer_max": int(k.layers[int(np.nanargmax(mmd))]) if ok.any() else None,
               "jsd_mean": float(np.nanmean(k.jsd)) if np.isfinite(k.jsd).any() else None}
    if summary["mmd_mean"] is not None and summary["intra_mean"]:
        summary["ratio"] = summary["mmd_mean"] / summary["intra_mean"]
    pca = None
    if summary["layer_max"] is not None and summary["layer_max"] in k.pca2:
        a, b, expl = k.pca2[summary["layer_max"]]
        pca = {"layer": summary["layer_max"], "a": np.round(a[:plot_points], 4), "b": np.round(b[:plot_points], 4),
               "explained": expl}
    return {**d, "intra": intra, "summary": summary, "pca2": pca,
            "reading": "MMD between image and text keys per layer (cross) vs between random halves of one "
                       "modality (intra, the baseline); docs/methods/keyspace.md"}


def _imbalance_summary(im) -> dict:
    d = im.to_dict()
    d.pop("per_sample", None)
    d["heat"] = d.pop("imbalance", None)
    heat = im.heat.detach().to("cpu").double()
    finite = torch.isfinite(heat)
    per_layer = [float(row[f].mean()) if bool(f.any()) else None for row, f in zip(heat, finite)]
    abs_layer = [float(row[f].abs().mean()) if bool(f.any()) else None for row, f in zip(heat, finite)]
    return {**d, "per_layer_mean": per_layer, "per_layer_abs_mean": abs_layer,
            "share_m1_larger": float((heat[finite] > 0).double().mean()) if bool(finite.any()) else None,
            "reading": f"log(N_{im.modalities[0]} / N_{im.modalities[1]}) of the output norms per (layer, head) "
                       f"at the {im.query} token, mean over samples; scalar = mean |log ratio| (docs/methods/imbalance.md)"}


class _Concentrations(Probe):
    """Per layer and sample, trace_concentrations of the attention rows (image / text queries over image / text
    keys), computed as the rows pass and dropped: one layer's probabilities in memory at a time."""

    reads: ClassVar = {"attn.probs": "all"}

    def __init__(self, x: str, y: str):
        super().__init__()
        self.x, self.y = x, y
        self.parts: list[tuple[int, dict]] = []

    def attn_probs(self, ctx, probs):
        from ..surrogate.fit import concentrations_result, probs_concentrations

        if ctx.cross:
            return
        probs = probs.detach().to("cpu", torch.float32)
        rows, rmask = ctx.positions.detach().cpu(), ctx.row_mask.cpu()
        length = max(probs.shape[-1], int(rows.max()) + 1)
        b = probs.shape[0]
        mx, my = (ctx.groups.mask(g, length=length).expand(b, -1) for g in (self.x, self.y))
        for i in range(b):  # one part per sample: the merge is then exact
            entry = probs_concentrations(probs[i:i + 1], rows, rmask[i:i + 1], mx[i:i + 1], my[i:i + 1])
            self.parts.append((1.0, concentrations_result({int(ctx.layer): entry}, self.x, self.y, "visible", 2)))


def lens_concentrations(lens, samples, batch_size: int, dataset=None, x: str = "image", y: str = "text",
                        progress: bool = True) -> dict:
    """docs/methods/surrogate.md's attention concentrations (:func:`arbiter.surrogate.trace_concentrations`) of a model on samples,
    computed batch by batch without keeping attention maps, merged over samples."""
    from ..surrogate.fit import merge_concentrations

    from ..progress import progress_bar

    probe = _Concentrations(x, y)
    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    for chunk in progress_bar(chunks, "surrogate: attention concentrations", progress=progress):
        batch = lens.encode(chunk, dataset=dataset)
        with torch.no_grad(), lens.probe(probe, layers="all"):
            lens.model(**batch.inputs, use_cache=False)
    if not probe.parts:
        raise DataError("no self-attention layer gave attention rows for the concentrations.")
    out = merge_concentrations(probe.parts)  # one part per (sample, layer)
    out.pop("parts", None)
    out["n_samples"] = len(samples)
    return out


def surrogate_warnings(flags: list[str], angle_ratio: float | None, fitted: bool) -> list[str]:
    """The surrogate fit's flags that limit what its numbers mean, in words, shortest first: β not fitted, the
    predicted angle independent of β, concentrations outside the calibration (overall, and how many layers).
    The standing caveats (what the angle is, how c is normalised) stay in ``flags`` only."""
    from ..surrogate.sweep import IDENTIFIABLE_ABOVE

    out = []
    if not fitted:
        out.append("β could not be fitted: the surrogate has no prediction for this model.")
    if angle_ratio is None or not angle_ratio > IDENTIFIABLE_ABOVE:
        r = "unknown" if angle_ratio is None else f"{angle_ratio:.2f}"
        out.append(f"uninformative: the surrogate's predicted angle barely depends on β (identifiability ratio {r}, "
                   f"at most {IDENTIFIABLE_ABOVE:g}), so angle_pred says nothing about this model; compare the "
                   "fitted β only.")
    out += [f"overall concentration {f.removeprefix('overall: ')}" for f in flags if f.startswith("overall: ")]
    layer_flags = [f for f in flags if f.startswith("layer ")]
    if layer_flags:
        layers = sorted({int(f.split()[1].rstrip(":")) for f in layer_flags})
        out.append(f"{len(layers)} layer(s) ({', '.join(map(str, layers))}) have a concentration outside the "
                   "calibration's range: their β is clipped to the table's end (see flags).")
    out += [f for f in flags if f.startswith(("table: ", "simulation: "))]
    return out


def _surrogate_summary(fr, calib: dict, predict: str, n: int) -> dict:
    d = fr.to_dict()
    ident = d.get("identifiability") or {}
    pt = d["params"].get("simulated_point") or {}
    ratio = (ident.get("angle") or {}).get("ratio")
    return {
        "warnings": surrogate_warnings(d["flags"], ratio, d["beta_self"] is not None and d["beta_cross"] is not None),
        "beta_self": d["beta_self"], "beta_cross": d["beta_cross"], "angle_pred": d["angle_pred"],
        "angle_measured": d["angle_measured"], "nmse": d["nmse"],
        "angle_identifiability_ratio": (ident.get("angle") or {}).get("ratio"),
        "c_identifiability_ratio": {k: (ident.get(k) or {}).get("ratio") for k in ("c_self", "c_cross")},
        "prediction": predict,
        "prediction_method": pt.get("method", "simulation of the preset at the fitted β with the table's seeds"),
        "calibration": calib, "n_samples": n, "x": d["params"]["x"], "y": d["params"]["y"],
        "concentrations": d["concentrations"].get("overall"),
        "layers": [{k: e.get(k) for k in ("layer", "c_self", "c_cross", "beta_self", "beta_cross")}
                   for e in d["layers"]],
        "point": {k: v for k, v in pt.items() if k not in ("per_seed", "spread")},
        "table": {k: d["table"].get(k) for k in ("beta", "c_self", "c_cross", "curve")},
        "flags": d["flags"], "beta_label": d["params"].get("beta_label"),
        "reading": "β fitted to the MLLM's attention concentration (docs/methods/surrogate.md, proposed bridge); angle_pred is the "
                   "surrogate's dynamical-SHAP angle there, angle_measured the MLLM's modality Shapley angle "
                   "(image vs context, docs/methods/shapley.md): different quantities, and an angle identifiability ratio <= 2 "
                   "means angle_pred does not depend on β",
    }


def _conflict_steps(lens, samples, dataset, steps, out, window, top, batch_size, n_random, alphas, head_methods,
                    generate, progress):
    """The five conflict steps (baseline, knockout, heads, blocking, amplification), each resumable."""
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
    follows = dict(zip(base["per_sample"]["ids"], base["per_sample"]["follows"]))  # batch order -> sample order
    correct = [follows[s.id] == 1 for s in samples]
    kmap = steps.run("knockout", lambda: knockout_map(lens, samples, window=window, batch_size=batch_size,
                                                      dataset=dataset, progress=progress).to_dict())

    def heads():
        rankings = {}
        fns = {"exhaustive": lambda: exhaustive_ranking(lens, samples, batch_size, dataset=dataset,
                                                        progress=progress),
               "attribution": lambda: attribution_ranking(lens, samples, batch_size, dataset=dataset,
                                                          progress=progress),
               "attribution-ig": lambda: attribution_ranking(lens, samples, batch_size, dataset=dataset,
                                                             method="ig", steps=4, progress=progress),
               "attribution-ig-layer": lambda: attribution_ranking(lens, samples, batch_size, dataset=dataset,
                                                                   method="ig-layer", steps=4, progress=progress),
               "attribution-graddrop": lambda: attribution_ranking(lens, samples, batch_size, dataset=dataset,
                                                                   method="graddrop", progress=progress),
               "dla": lambda: dla_ranking(lens, samples, batch_size, dataset=dataset, progress=progress),
               "search": lambda: search_ranking(lens, samples, batch_size, dataset=dataset, cover_top=top,
                                                progress=progress)}
        for m in head_methods:
            rankings[m] = fns[m]()
        ref = rankings[head_methods[0]]
        n_heads = sum(lens.facts.heads(layer)[0] for layer in lens.facts.attention_layers)
        return {"method": ref.method, "ranking": ref.ranking(), "top": [list(h) for h in ref.top(top)],
                "scores": {m: r.to_dict() for m, r in rankings.items()},
                "agreement": [compare_rankings(ref, r, top) for m, r in rankings.items() if r is not ref],
                # forward-equivalents per batch of each ranking, beside the exhaustive sweep's L·H + 1
                "forward_equivalents": {m: r.cost_forward_equivalents for m, r in rankings.items()},
                "exhaustive_forward_equivalents": float(n_heads + 1)}
    hd = steps.run("heads", heads, {"head_methods": list(head_methods)})
    topg = [tuple(h) for h in hd["top"]]

    def blocking():
        res = blocking_experiment(lens, samples, correct, topg, fraction=top, n_random=n_random,
                                  batch_size=batch_size, dataset=dataset, progress=progress).to_dict()
        if len(hd["scores"]) > 1:  # docs/methods/mfr.md: each cheap ranking's TopG blocked too (and its deletion curve)
            # the search ranks the heads it blocked alone; its deletion curve goes on by its bounds (its "order")
            orders = {m: (v["search"]["order"] if "search" in v else v) for m, v in hd["scores"].items()}
            res["by_ranking"] = blocking_agreement(lens, samples, correct, orders, fraction=top,
                                                   n_random=n_random, batch_size=batch_size,
                                                   dataset=dataset, progress=progress).to_dict()
        return res
    block = steps.run("blocking", blocking, {"head_methods": list(head_methods)})
    amp = steps.run("amplification", lambda: amplification_experiment(
        lens, samples, correct, topg, alphas=alphas, n_random=n_random, batch_size=batch_size,
        dataset=dataset, progress=progress).to_dict())
    return base, kmap, hd, block, amp


def _image_attention(lens, samples, dataset, hd, out, log) -> list[dict]:
    """The report's image-attention figures (:func:`arbiter.overlays.image_attention_figures`): 2 samples per target,
    the reference ranking's top 3 heads and the last token's mean, from one recording forward; [] (logged) where the
    model's patch grid is unknown or matplotlib is missing."""
    from ..overlays import image_attention_figures

    t = time.perf_counter()
    try:
        entries = image_attention_figures(lens, samples, hd.get("ranking") or [], out, dataset=dataset)
    except (ArbiterError, ImportError) as e:
        log(f"[arbiter] image attention: no figures ({type(e).__name__}: {e})")
        return []
    log(f"[arbiter] image attention: {len(entries)} figures, {time.perf_counter() - t:.1f} s")
    return entries


def diagnose(model, processor, dataset: ConflictDataset, out: str | os.PathLike, config: DiagnoseConfig | None = None,
             *, progress: bool = True, log: Callable[[str], None] = print, **settings: Any) -> dict:
    """Run every step and return the report dict (also written to OUT/report.json by arbiter.report).

    ``config``: the settings (:class:`arbiter.experiments.config.DiagnoseConfig`, where each default and meaning is
    written; None: the defaults), with ``settings`` changed by name (``diagnose(..., window=3, skip="keyspace")``;
    an unknown name is a DataError). ``progress``: bars over the batches; ``log``: where the step lines go."""
    cfg = (config or DiagnoseConfig()).replace(**settings)
    limit, window, top, batch_size, n_random, alphas = (cfg.limit, cfg.window, cfg.top, cfg.batch_size, cfg.n_random,
                                                        cfg.alphas)
    head_methods, generate, skip, modality_limit = cfg.head_methods, cfg.generate, cfg.skip, cfg.modality_limit
    shapley_removal, keyspace_max_n, keyspace_permutations = (cfg.shapley_removal, cfg.keyspace_max_n,
                                                              cfg.keyspace_permutations)
    calibration, surrogate_predict = cfg.calibration, cfg.surrogate_predict
    attractor_limit, attractor_subsets = cfg.attractor_limit, cfg.attractor_subsets
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = [s for s in dataset.samples if s.conflict]
    if limit is not None:
        samples = samples[:limit]
    key = {"config": config_hash(model), "data": str(getattr(dataset, "path", "")), "n": len(samples),
           "window": window, "top": top, "n_random": n_random, "alphas": list(alphas), "generate": generate,
           "dtype": str(next(model.parameters()).dtype)}
    g = distributed.group()  # torchrun: samples sharded over the ranks, same numbers (see arbiter.distributed)
    if g is not None and not g.is_main:
        log, progress = (lambda *a, **k: None), False
    steps = _Steps(out, key, log)
    model.eval()
    with attach(model, processor) as lens, distributed.sharding(g):
        if not samples:  # a pure classification data set: nothing to arbitrate; the attractors step still runs
            base, kmap, hd, block, amp = (steps.run(n, lambda: {"skipped": NO_CONFLICT}) for n in CONFLICT_STEPS)
        else:
            base, kmap, hd, block, amp = _conflict_steps(lens, samples, dataset, steps, out, window, top, batch_size,
                                                         n_random, alphas, head_methods, generate, progress)
        msamples = modality_samples(samples, modality_limit)
        mkey = {"modality_limit": modality_limit, "modality_ids": [x.id for x in msamples]}
        reason = _no_image_reason(lens, msamples, samples, dataset)

        def guarded(name, fn):
            def run():
                if reason is not None:
                    return {"skipped": reason}
                try:
                    return fn()
                except ArbiterError as e:  # the model or data cannot give this measure: say why, go on
                    log(f"[arbiter] {name}: skipped ({type(e).__name__}: {e})")
                    return {"skipped": f"{type(e).__name__}: {e}"}
            return run

        def user_skipped(name):
            return {"skipped": f"skipped on request (skip={name!r})", "seconds": 0.0}

        def shapley():
            from .modality import modality_shapley, present_players

            players = present_players(msamples)
            if "image" not in players or len(players) < 2:
                return {"skipped": f"modality Shapley needs the image and another modality in every sample; "
                                   f"present: {players}"}
            angle = ("image", "context") if "context" in players else (players[0], players[1])
            r = modality_shapley(lens, msamples, players=players, removal=shapley_removal, batch_size=batch_size,
                                 dataset=dataset, angle=angle, progress=progress)
            return _shapley_summary(r)
        shap = user_skipped("shapley") if "shapley" in skip else steps.run(
            "shapley", guarded("shapley", shapley), {**mkey, "removal": shapley_removal}, collective=False)

        def keyspace_step():
            from .modality import keyspace

            pts = 300
            k = keyspace(lens, msamples, modalities=("image", "text"), batch_size=batch_size, dataset=dataset,
                         max_n=keyspace_max_n, n_permutations=keyspace_permutations, plot_points=pts,
                         progress=progress)
            return _keyspace_summary(k, pts)
        ks = user_skipped("keyspace") if "keyspace" in skip else steps.run(
            "keyspace", guarded("keyspace", keyspace_step),
            {**mkey, "max_n": keyspace_max_n, "permutations": keyspace_permutations}, collective=False)

        def imbalance_step():
            from .modality import imbalance

            return _imbalance_summary(imbalance(lens, msamples, modalities=("image", "context"), query="last",
                                                batch_size=batch_size, dataset=dataset, progress=progress))
        imb = user_skipped("imbalance") if "imbalance" in skip else steps.run(
            "imbalance", guarded("imbalance", imbalance_step), mkey, collective=False)

        angle_measured = shap.get("angle") if "skipped" not in shap else None

        def surrogate_step():
            from ..surrogate.calibration import calibration_info, load_calibration
            from ..surrogate.fit import fit

            conc = lens_concentrations(lens, msamples, batch_size, dataset, x="image", y="text", progress=progress)
            calib = load_calibration(calibration)
            fr = fit(None, concentrations=conc, sweep_result=calib, angle_measured=angle_measured,
                     predict=surrogate_predict, how="ratio", log=None if not progress else log)
            res = _surrogate_summary(fr, calibration_info(calib, calibration), surrogate_predict, len(msamples))
            if res["beta_self"] is None or res["beta_cross"] is None:
                why = [f for f in res["flags"] if "overall" in f] or res["flags"][:2]
                return {"skipped": "β could not be fitted: " + "; ".join(why), **{k: res[k] for k in (
                    "warnings", "concentrations", "layers", "calibration", "flags", "angle_measured")}}
            return res
        sur = user_skipped("surrogate") if "surrogate" in skip else steps.run(
            "surrogate", guarded("surrogate", surrogate_step),
            {**mkey, "calibration": calibration, "predict": surrogate_predict, "angle_measured": angle_measured},
            collective=False)

        labels = getattr(dataset, "labels", None)
        asamples = attractor_samples(dataset.samples, labels, attractor_limit) if labels else []

        def attractors_step():
            from .attractors import label_perturbation

            if not labels:
                return {"skipped": "the data file declares no label set"}
            if not asamples:
                return {"skipped": "no sample carries a label"}
            try:
                sizes = [k for k in (1, 2, 3, 4) if k < len(labels)]  # at least one label stays offered
                r = label_perturbation(lens, asamples, labels, dataset=dataset, sizes=sizes or (1,),
                                       max_subsets=attractor_subsets, seed=0, batch_size=batch_size, progress=progress)
            except ArbiterError as e:  # e.g. labels without a first token of their own: say why, go on
                log(f"[arbiter] attractors: skipped ({type(e).__name__}: {e})")
                return {"skipped": f"{type(e).__name__}: {e}"}
            return _attractor_summary(r)
        att = user_skipped("attractors") if "attractors" in skip else steps.run(
            "attractors", attractors_step, {"attractor_limit": attractor_limit, "attractor_subsets": attractor_subsets,
                                            "labels": labels, "attractor_ids": [x.id for x in asamples]},
            collective=False)
        image_attention = _image_attention(lens, samples, dataset, hd, out, log) if g is None or g.is_main else []
        summary = lens.facts.summary()
    summary["config_hash"] = key["config"]
    if "skipped" in base:  # no conflict sample: the conflict measures are absent, said so
        why = {"skipped": base["skipped"]}
        main = {"n_samples": 0, "mfr": why, "mfr_pi": why, "mfr_source": None, "mam": why, "mam_components": why,
                "ldar": [], "knockout": [], "knockout_window": window, "heads": why, "blocking": block,
                "amplification": amp}
    else:
        main = {
            "n_samples": base["n_samples"],
            "mfr": base["mfr"],
            "mfr_pi": base["mfr_pi"],
            "mfr_source": base["mfr_source"],
            "mam": base["mam"],
            "mam_instruction": base.get("mam_instruction"),
            "mam_components": base["mam_components"],
            "ldar": base["ldar"],
            "knockout": kmap["entries"],
            "knockout_window": window,
            "heads": {"method": hd["method"], "ranking": hd["ranking"], "agreement": hd["agreement"],
                      "scores": {m: v["by_target"] for m, v in hd["scores"].items()},
                      "rankings": {m: v["ranking"] for m, v in hd["scores"].items()},
                      "forward_equivalents": hd.get("forward_equivalents"),
                      "exhaustive_forward_equivalents": hd.get("exhaustive_forward_equivalents"),
                      **({"search": hd["scores"]["search"]["search"]} if "search" in hd["scores"] else {})},
            "blocking": block,
            "amplification": amp,
        }
    return {
        "model": summary,
        **main,
        "shapley": shap,
        "keyspace": ks,
        "imbalance": imb,
        "surrogate": sur,
        "attractors": att,
        "image_attention": image_attention,
        "timing_s": {s: r.get("seconds") for s, r in zip(STEPS, (base, kmap, hd, block, amp, shap, ks, imb, sur,
                                                                  att))},
        "settings": {**key, "modality_limit": modality_limit, "n_modality_samples": len(msamples),
                     "skip": list(skip), "shapley_removal": shapley_removal, "keyspace_max_n": keyspace_max_n,
                     "keyspace_permutations": keyspace_permutations, "calibration": calibration,
                     "surrogate_predict": surrogate_predict, "attractor_limit": attractor_limit,
                     "attractor_subsets": attractor_subsets, "n_attractor_samples": len(asamples)},
    }
