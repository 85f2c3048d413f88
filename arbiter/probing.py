"""Linear probes on recorded activations: cross-validated logistic regression per layer.

``linear(trace, labels=...)`` answers "from which layer on is this label linearly decodable?"; needs scikit-learn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch

from .adapters.base import residual_layout
from .errors import DataError
from .trace import site_key

__all__ = ["LinearProbeResult", "linear"]


@dataclass
class LinearProbeResult:
    """Per-layer cross-validated accuracy of a linear probe.

    ``accuracy[i]`` / ``std[i]``: mean / standard deviation over the folds for layer ``layers[i]``;
    ``fold_accuracy``: [layers, folds]; ``chance``: the majority-class rate (what always guessing the most
    frequent label scores); ``classes``: the distinct labels, in order of first appearance."""

    layers: list[int]
    accuracy: np.ndarray
    std: np.ndarray
    chance: float
    fold_accuracy: np.ndarray
    classes: list[Any]
    n_samples: int
    site: str | None = None
    cv: int = 5
    C: float = 1.0
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def best_layer(self) -> int:
        """The layer with the highest mean accuracy (the first one on ties)."""
        return self.layers[int(np.argmax(self.accuracy))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (classes as strings)."""
        return {
            "layers": list(self.layers),
            "accuracy": [float(a) for a in self.accuracy],
            "std": [float(s) for s in self.std],
            "chance": float(self.chance),
            "fold_accuracy": [[float(a) for a in row] for row in self.fold_accuracy],
            "classes": [str(c) for c in self.classes],
            "n_samples": int(self.n_samples),
            "site": self.site,
            "cv": int(self.cv),
            "C": float(self.C),
            "seed": int(self.seed),
            **({"meta": dict(self.meta)} if self.meta else {}),
        }

    def plot(self, path: Any = None, ax: Any = None, title: str | None = None):
        """Accuracy (± std over folds) against layer, with a dashed chance line. Returns the matplotlib Figure;
        saves it to ``path`` when given. Needs matplotlib (``pip install 'arbiter-mllm[plots]'``)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("LinearProbeResult.plot needs matplotlib: pip install 'arbiter-mllm[plots]'") from e
        if ax is None:
            fig = Figure(figsize=(6.0, 3.6), layout="constrained")
            ax = fig.subplots()
        else:
            fig = ax.figure
        acc, std = np.asarray(self.accuracy, float), np.asarray(self.std, float)
        ax.plot(self.layers, acc, marker="o", label="linear probe")
        ax.fill_between(self.layers, acc - std, acc + std, alpha=0.2)
        ax.axhline(self.chance, linestyle="--", color="grey", label=f"chance ({self.chance:.2f})")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"accuracy ({self.cv}-fold CV)")
        ax.set_ylim(min(0.0, float(np.min(acc - std)) if len(acc) else 0.0), 1.02)
        ax.set_title(title or (f"linear probe on {self.site}" if self.site else "linear probe"))
        ax.legend(loc="lower right")
        if path is not None:
            fig.savefig(path)
        return fig


# ---------------------------------------------------------------------------------------------------- features


def _row_weights(trace, site: str, b: int, r: int) -> torch.Tensor:
    """[b, r] weights for averaging over recorded rows: the rows that belong to each sample (``rowmask``) and are
    not padding (``meta["groups"]["pad"]`` at the recorded positions ``rows.{site}``)."""
    w = torch.ones(b, r, dtype=torch.bool)
    positions, rowmask = trace.rows(site) or (None, None)
    if rowmask is not None and tuple(rowmask.shape) == (b, r):
        w &= rowmask.bool()
    pad = (trace.meta.get("groups") or {}).get("groups", {}).get("pad")
    if positions is not None and pad is not None and len(positions) == r and len(pad) == b:
        pos = positions.tolist()
        for i, pad_pos in enumerate(pad):
            pads = set(pad_pos)
            for j, p in enumerate(pos):
                if p in pads:
                    w[i, j] = False
    empty = ~w.any(dim=1)
    w[empty] = True  # a sample with no selected row (should not happen) falls back to the plain mean
    return w


def _from_trace(trace, site: str, rows, layers) -> tuple[list[int], list[np.ndarray]]:
    available = trace.layers(site)
    if not available:
        raise DataError(f"the trace has no tensors for site {site!r} (names like 'L0.{site}'); it has sites "
                        f"{', '.join(trace.sites()) or 'none'}. Record it with lens.record({site!r}, ...).")
    chosen = available if layers is None else [int(layer) for layer in layers]
    missing = [layer for layer in chosen if layer not in available]
    if missing:
        raise DataError(f"the trace has no {site!r} for layers {missing}; it has layers {available}.")
    layout = residual_layout((trace.meta.get("model") or {}).get("family"))
    feats = []
    for layer in chosen:
        t = layout.main_stream(trace.site(site, layer))  # stacked residual streams -> the one the model reads out
        if t.dim() == 2:          # [batch, hidden]: already one vector per sample
            x = t
        elif t.dim() == 3:        # [batch, rows, hidden]
            b, r, _ = t.shape
            if rows is None:
                w = _row_weights(trace, site, b, r).to(torch.float64)
                x = (t.to(torch.float64) * w[..., None]).sum(1) / w.sum(1, keepdim=True)
            else:
                idx = [rows] if isinstance(rows, int) else list(rows)
                bad = [i for i in idx if not -r <= int(i) < r]
                if bad:
                    raise DataError(f"rows {bad} out of range: {site_key(site, layer)} has {r} recorded rows "
                                    f"(indices -{r}..{r - 1}).")
                x = t[:, [int(i) for i in idx]].to(torch.float64).mean(1)
        else:
            raise DataError(f"{site_key(site, layer)} has shape {tuple(t.shape)}; expected [batch, rows, hidden] "
                            "(or [batch, hidden]).")
        feats.append(x.detach().cpu().to(torch.float64).numpy())
    return chosen, feats


def _from_tensors(data, layers) -> tuple[list[int], list[np.ndarray]]:
    if isinstance(data, Mapping):
        keys = sorted(int(k) for k in data)
        arrays = {int(k): v for k, v in data.items()}
        chosen = keys if layers is None else [int(layer) for layer in layers]
        missing = [layer for layer in chosen if layer not in arrays]
        if missing:
            raise DataError(f"no features for layers {missing}; the mapping has layers {keys}.")
        feats = [_as_2d(arrays[layer], f"layer {layer}") for layer in chosen]
        return chosen, feats
    if isinstance(data, (list, tuple)):
        data = [_as_2d(x, f"layer {i}") for i, x in enumerate(data)]
        arr = np.stack(data) if data else np.zeros((0, 0, 0))
    else:
        arr = data.detach().cpu().to(torch.float64).numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.ndim != 3:
        raise DataError(f"features must be [layers, samples, hidden]; got shape {tuple(arr.shape)}.")
    n_layers = arr.shape[0]
    chosen = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise DataError(f"layers {bad} out of range; the features have {n_layers} layers (0..{n_layers - 1}).")
    return chosen, [np.asarray(arr[layer], dtype=np.float64) for layer in chosen]


def _as_2d(x, what: str) -> np.ndarray:
    a = x.detach().cpu().to(torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    if a.ndim != 2:
        raise DataError(f"features of {what} must be [samples, hidden]; got shape {tuple(a.shape)}.")
    return a


def _encode_labels(labels, n: int) -> tuple[np.ndarray, list[Hashable]]:
    if labels is None:
        raise DataError("linear() needs labels=: one label per sample.")
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    elif isinstance(labels, np.ndarray):
        labels = labels.tolist()
    labels = list(labels)
    if len(labels) != n:
        raise DataError(f"got {len(labels)} labels for {n} samples; give one label per sample (in batch order).")
    index: dict[Hashable, int] = {}
    y = np.empty(n, dtype=np.int64)
    for i, lab in enumerate(labels):
        try:
            y[i] = index.setdefault(lab, len(index))
        except TypeError:
            raise DataError(f"label {lab!r} (sample {i}) is not hashable; use strings, numbers or tuples.") from None
    return y, list(index)


# ---------------------------------------------------------------------------------------------------- probing


def linear(trace_or_tensors, site: str = "resid.post", labels: Sequence[Hashable] | None = None,
           rows: int | Sequence[int] | None = None, layers: Sequence[int] | None = None, cv: int = 5,
           seed: int = 0, C: float = 1.0) -> LinearProbeResult:
    """Fit a cross-validated logistic-regression probe per layer and report its accuracy.

    ``trace_or_tensors``: an ``arbiter.Trace`` (features from ``trace.site(site, l)``, [batch, rows, hidden]:
    the recorded row ``rows`` (an index, or a list of indices to average; negative counts from the end), or by
    default the mean over the recorded rows that belong to the sample, padding excluded), or features
    [layers, samples, hidden] (a tensor / array, a list of [samples, hidden], or a {layer: [samples, hidden]} dict).
    ``labels``: one hashable label per sample (two or more classes). ``layers``: which layers (default: all).

    Each layer gets ``StandardScaler`` + ``LogisticRegression(C=C)`` evaluated on ``cv`` stratified, shuffled folds
    (``seed``; the same folds for every layer, so layers are comparable); fully deterministic.
    Needs scikit-learn: ``pip install 'arbiter-mllm[probing]'``."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from threadpoolctl import threadpool_limits
    except ImportError as e:
        raise ImportError("arbiter.probing.linear needs scikit-learn: pip install 'arbiter-mllm[probing]'") from e
    from .trace import Trace

    if isinstance(trace_or_tensors, Trace):
        chosen, feats = _from_trace(trace_or_tensors, site, rows, layers)
        site_name: str | None = site
        meta = {"sample_ids": trace_or_tensors.meta.get("sample_ids")} if trace_or_tensors.meta.get(
            "sample_ids") else {}
    else:
        if rows is not None:
            raise DataError("rows= selects recorded rows of a Trace; features given as [layers, samples, hidden] "
                            "have one vector per sample already.")
        chosen, feats = _from_tensors(trace_or_tensors, layers)
        site_name, meta = None, {}
    if not chosen:
        raise DataError("no layers to probe (layers=[]).")
    n = feats[0].shape[0]
    for layer, x in zip(chosen, feats):
        if x.shape[0] != n:
            raise DataError(f"layer {layer} has {x.shape[0]} samples but layer {chosen[0]} has {n}.")
        if not np.isfinite(x).all():
            raise DataError(f"layer {layer}: the features contain NaN or inf.")
    y, classes = _encode_labels(labels, n)
    counts = np.bincount(y, minlength=len(classes))
    if n == 0:
        raise DataError("no samples to probe.")
    if len(classes) < 2:
        raise DataError(f"all {n} samples have the label {classes[0]!r}: a probe needs at least two classes.")
    cv = int(cv)
    if cv < 2:
        raise DataError(f"cv must be at least 2 folds, got {cv}.")
    if counts.min() < cv:
        rare = classes[int(np.argmin(counts))]
        raise DataError(f"label {rare!r} has only {int(counts.min())} sample(s), fewer than cv={cv} folds; "
                        "use fewer folds or more samples.")
    if not C > 0:
        raise DataError(f"C must be positive, got {C}.")

    folds = list(StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed).split(np.zeros(n), y))
    scores = np.zeros((len(chosen), cv))
    # probe-sized problems are dominated by thread start-up costs (10x slower next to torch's thread pools)
    with threadpool_limits(limits=1):
        for i, x in enumerate(feats):
            for j, (train, test) in enumerate(folds):
                clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
                clf.fit(x[train], y[train])
                scores[i, j] = float((clf.predict(x[test]) == y[test]).mean())
    return LinearProbeResult(layers=list(chosen), accuracy=scores.mean(axis=1), std=scores.std(axis=1),
                             chance=float(counts.max() / n), fold_accuracy=scores, classes=classes, n_samples=n,
                             site=site_name, cv=cv, C=float(C), seed=int(seed), meta=meta)
