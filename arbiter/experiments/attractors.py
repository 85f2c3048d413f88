"""Label perturbation and error attractors (docs/methods/attractors.md, after the [PB] emotion protocol on CREMA-D).

A classification prompt lists the allowed labels; the perturbation removes 1-4 of them from that list (every
subset of those sizes, or a seeded sample of them), per input condition (all modalities present, or one
modality alone with the others replaced by neutral inputs: :func:`arbiter.experiments.modality.neutral_sample`,
i.e. silent audio = "face only", black frames = "voice only"). The model's answer is read from its next-token
distribution restricted to the labels still offered. Errors give, per condition, a confusion matrix, a directed
error-attractor graph and an attractor hierarchy.

* :func:`label_perturbation` -- runs the model (batched: one prompt row per sample x condition x removal set,
  ``batch_size`` rows per forward; a clip's audio features computed once for all its rows) and returns an
  :class:`AttractorResult` (``to_dict()``, ``plot()``).
* :func:`removal_subsets`, :func:`label_token_ids`, :func:`offered_sample` -- the pieces, usable alone.
* :func:`error_graph`, :func:`attraction` -- the pure computations on counts / predictions.

**Label set.** ``labels=`` if given, else the data set's declared labels (docs/methods/conflict-samples.md: the data file's first line
``{"arbiter_dataset": 1, "labels": [...]}``, loaded into ``ConflictDataset.labels``; pass the
:class:`arbiter.data.ConflictDataset` as ``samples`` or as ``dataset=``). Each sample's true label is its
``label`` field (docs/methods/conflict-samples.md). Without a label set, or with a sample whose label is missing or not in the set,
a :class:`arbiter.errors.DataError` says what to pass. :data:`CREMA_D_LABELS` holds docs/methods/attractors.md's six labels.

**Design choices** (docs/methods/attractors.md fixes the protocol; the points below are **proposed** where the method is silent):

* (paper) A sample whose true label was removed is always an error; its prediction (the fallback label) is
  recorded (:meth:`AttractorResult.fallback`) and counts as an error in the confusion, graph and hierarchy.
  Option ``forced="exclude"``: such rows are not run at all (predictions ``None``).
* (proposed) Answer reading: each label's token set is docs/methods/conflict-samples.md's Answer-Entity-Dictionary rule applied to the
  label (first token of " label", "label", " Label", "Label", unknown / special ids skipped), minus the ids
  shared by two labels; the label's score is log sum_{v in set} softmax(z)_v at the last prompt position,
  and the prediction is the argmax over the labels still offered (ties: the earlier label in the label set).
  Option ``tokens="space"``: only the first token of " label" (two labels with the same first token are an
  error). One gather + logsumexp on the whole batch, no loop over tokens.
* (proposed) Where the options go: the text ``{labels}`` inside the sample's question, instruction or context
  is replaced by the offered labels, in the label set's order, joined by ``sep`` (", "); when no field holds
  ``{labels}``, ``options`` (default " Answer with one of: {labels}.") is appended to the question. The
  substitution happens after the neutral replacement (a neutralised context loses its ``{labels}``, and the
  options then go after the question).
* (proposed) Sampling: ``max_subsets`` draws that many removal sets uniformly without replacement from the
  enumeration (``numpy.random.default_rng(seed)``), kept in enumeration order; the same sets are used for
  every sample and condition, so conditions are paired.
* (proposed) Graph: edge i -> j (i != j) with count = errors with truth i and prediction j in the condition,
  weight = count / the condition's errors; an edge is hidden in the plot when weight < ``threshold`` (0.02),
  and kept in the data with ``shown: false``.
* (proposed formula for the method's "rank labels by the error mass they attract across perturbation sets that keep
  them") ``hierarchy="share"``: score_j = (errors predicted j) / (errors of rows where j was offered and the
  truth is not j), i.e. the share of the errors j could have attracted that it did attract. Options:
  ``"count"`` (errors predicted j) and ``"net"`` (in-weight minus out-weight in the graph). All three are in
  ``to_dict()["per_condition"][c]["attraction"]``; labels are ranked by the chosen one (descending, ties in
  label order, undefined scores last).
* (proposed) Condition similarity (the method's "errors with both modalities resemble face-only errors"): cosine
  similarity of two conditions' error-weight matrices (:meth:`AttractorResult.similarity`).
* Conditions are named ``"all"`` and ``"<modality>_only"`` (e.g. ``"image_only"`` = face only, audio silent);
  with a single modality there is only ``"all"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import AnswerDictionary, ConflictSample, encode_ids, unwrap_tokenizer
from ..errors import DataError
from ..util import check_choice, jsonable
from .modality import DEFAULT_PLAYERS, NEUTRAL_PLAYERS, neutral_sample, present_players

__all__ = [
    "CREMA_D_LABELS",
    "DEFAULT_OPTIONS",
    "DISPLAY_THRESHOLD",
    "FORCED",
    "HIERARCHIES",
    "TOKEN_RULES",
    "AttractorResult",
    "PromptRow",
    "attraction",
    "error_graph",
    "label_perturbation",
    "label_token_ids",
    "offered_sample",
    "plot_attractors",
    "removal_subsets",
]

CREMA_D_LABELS = ("happy", "neutral", "sad", "angry", "disgust", "fear")
"""docs/methods/attractors.md's six CREMA-D emotion labels, in that page's order."""
DEFAULT_OPTIONS = " Answer with one of: {labels}."
DISPLAY_THRESHOLD = 0.02
FORCED = ("include", "exclude")
TOKEN_RULES = ("dictionary", "space")
HIERARCHIES = ("share", "count", "net")
_PLACEHOLDER = "{labels}"
_TEXT_FIELDS = ("question", "instruction", "context")


# ---------------------------------------------------------------------------------------------------------------
# the pieces


def removal_subsets(labels: Sequence[str], sizes: Sequence[int] = (1, 2, 3, 4), max_subsets: int | None = None,
                    seed: int = 0) -> list[tuple[str, ...]]:
    """The label sets removed from the prompt: every subset of ``labels`` of each size in ``sizes`` (ascending
    sizes, ``itertools.combinations`` order within a size: 6 labels and sizes 1-4 give 6 + 15 + 20 + 15 = 56),
    or, when ``max_subsets`` is smaller than that, a uniform sample of ``max_subsets`` of them without
    replacement (``numpy.random.default_rng(seed)``), kept in enumeration order. Size 0 (the unperturbed prompt)
    is allowed; at least one label must stay offered (sizes <= len(labels) - 1)."""
    labels = list(labels)
    n = len(labels)
    sizes = sorted({int(k) for k in sizes})
    if not sizes:
        raise DataError("sizes is empty; give the numbers of labels to remove, e.g. (1, 2, 3, 4).")
    bad = [k for k in sizes if not 0 <= k <= n - 1]
    if bad:
        raise DataError(f"sizes {bad} cannot be removed from {n} labels: remove between 0 and {n - 1} (at least "
                        "one label must stay offered).")
    subsets = [c for k in sizes for c in itertools.combinations(labels, k)]
    if max_subsets is not None:
        if int(max_subsets) < 1:
            raise DataError(f"max_subsets must be >= 1 (or None for all subsets), got {max_subsets}.")
        if int(max_subsets) < len(subsets):
            rng = np.random.default_rng(seed)
            keep = sorted(int(i) for i in rng.choice(len(subsets), size=int(max_subsets), replace=False))
            subsets = [subsets[i] for i in keep]
    return subsets


def label_token_ids(tokenizer, labels: Sequence[str], rule: str = "dictionary") -> list[list[int]]:
    """The token ids that stand for each label in the next-token distribution (see the module notes).

    ``rule="dictionary"`` (default, proposed): docs/methods/conflict-samples.md's Answer-Entity-Dictionary rule on the label alone (first
    token of " label", "label" and their capitalised forms; unknown / special ids skipped), then the ids that two
    labels share are dropped. ``"space"``: the first token of " label" only. ``tokenizer``: a tokenizer or a
    processor holding one. Raises :class:`DataError` when a label ends with no id of its own."""
    check_choice("tokens", rule, TOKEN_RULES)
    labels = list(labels)
    if rule == "dictionary":
        sets = []
        for lab in labels:
            try:
                sets.append(set(AnswerDictionary.build(tokenizer, [lab], [], allow_empty_c=True).ids_p))
            except DataError:
                sets.append(set())  # no usable first token: reported below
        count: dict[int, int] = {}
        for s in sets:
            for i in s:
                count[i] = count.get(i, 0) + 1
        out = [sorted(i for i in s if count[i] == 1) for s in sets]
        empty = [lab for lab, ids in zip(labels, out) if not ids]
        if empty:
            raise DataError(f"labels {empty} have no first-token id of their own (every variant's first token is "
                            "shared with another label, or unknown); rename the labels so that their first tokens "
                            "differ, or pass tokens='space'.")
        return out
    tok = unwrap_tokenizer(tokenizer)
    out = []
    for lab in labels:
        enc = encode_ids(tok, " " + lab.strip()) if lab.strip() else []
        if not lab.strip() or not enc:
            raise DataError(f"label {lab!r} encodes to no token; give non-empty labels.")
        out.append([int(enc[0])])
    firsts: dict[int, str] = {}
    for lab, ids in zip(labels, out):
        if ids[0] in firsts:
            raise DataError(f"labels {firsts[ids[0]]!r} and {lab!r} share the first token of ' label' (id {ids[0]}), "
                            "so the next token cannot tell them apart; use tokens='dictionary' or rename a label.")
        firsts[ids[0]] = lab
    return out


def offered_sample(sample: ConflictSample, offered: Sequence[str], options: str = DEFAULT_OPTIONS,
                   sep: str = ", ") -> ConflictSample:
    """A copy of ``sample`` whose prompt lists ``offered``: ``{labels}`` in its question / instruction / context
    becomes ``sep.join(offered)``; when no field holds ``{labels}``, ``options`` (with its ``{labels}`` filled)
    is appended to the question."""
    listed = sep.join(offered)
    changes = {f: getattr(sample, f).replace(_PLACEHOLDER, listed) for f in _TEXT_FIELDS
               if _PLACEHOLDER in getattr(sample, f)}
    if not changes:
        changes = {"question": sample.question + options.replace(_PLACEHOLDER, listed)}
    return dataclasses.replace(sample, **changes)


@dataclass(frozen=True)
class PromptRow:
    """One prompt of the perturbation: ``sample`` is ready to encode (neutral inputs in place, offered labels
    listed); ``sample_id`` / ``label`` are the source sample's, ``condition`` the condition's name."""

    sample: ConflictSample
    sample_id: str
    label: str
    condition: str
    removed: tuple[str, ...]
    offered: tuple[str, ...]


Scorer = Callable[[list[PromptRow]], torch.Tensor]
"""rows -> [len(rows), n_labels] label scores (log-probabilities); only the offered labels' columns are read."""


def error_graph(confusion: torch.Tensor, threshold: float = DISPLAY_THRESHOLD) -> dict[str, torch.Tensor]:
    """The error-attractor graph of one condition from its confusion counts [labels, labels] (rows truth,
    columns prediction): ``counts`` (off-diagonal counts, diagonal 0: no self-loops), ``weights`` = counts / total
    errors (all 0 without errors), ``shown`` = count > 0 and weight >= ``threshold`` (an edge under the threshold
    is hidden in the plot, kept in the data)."""
    c = torch.as_tensor(confusion).to(torch.float64).clone()
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise DataError(f"confusion must be a square [labels, labels] matrix, got shape {tuple(c.shape)}.")
    c.fill_diagonal_(0.0)
    total = float(c.sum())
    w = c / total if total > 0 else torch.zeros_like(c)
    return {"counts": c, "weights": w, "shown": (c > 0) & (w >= float(threshold))}


def attraction(true: torch.Tensor, predicted: torch.Tensor, offered: torch.Tensor, n_labels: int,
               how: str = "share") -> torch.Tensor:
    """Attractor score per label [n_labels] (float64) for one condition.

    true [samples] label index; predicted [samples, subsets] label index (-1 = not run); offered [subsets,
    labels] bool. ``how``: ``"share"`` (errors predicted j / errors of the rows that offered j and whose truth
    is not j; NaN when there is no such error), ``"count"`` (errors predicted j), ``"net"`` (in-weight minus
    out-weight of :func:`error_graph`)."""
    check_choice("hierarchy", how, HIERARCHIES)
    true = torch.as_tensor(true).long()
    pred = torch.as_tensor(predicted).long()
    offered = torch.as_tensor(offered).bool()
    run = pred >= 0
    err = run & (pred != true[:, None])
    onehot = torch.nn.functional.one_hot(pred.clamp(min=0), n_labels).bool() & err[..., None]   # [S, P, L]
    attracted = onehot.sum(dim=(0, 1)).to(torch.float64)
    if how == "count":
        return attracted
    if how == "net":
        w = error_graph(_confusion(true, pred, n_labels))["weights"]
        return w.sum(dim=0) - w.sum(dim=1)
    not_truth = true[:, None] != torch.arange(n_labels)[None, :]                                 # [S, L]
    chance = err[..., None] & offered[None, :, :] & not_truth[:, None, :]                        # [S, P, L]
    denom = chance.sum(dim=(0, 1)).to(torch.float64)
    return torch.where(denom > 0, attracted / denom.clamp(min=1), torch.full_like(attracted, math.nan))


def _confusion(true: torch.Tensor, pred: torch.Tensor, n_labels: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """[labels, labels] counts (truth x prediction) of the run rows (pred >= 0), optionally only where ``rows``."""
    t = true[:, None].expand_as(pred)
    keep = pred >= 0
    if rows is not None:
        keep = keep & rows
    return torch.bincount(t[keep] * n_labels + pred[keep], minlength=n_labels * n_labels).reshape(n_labels, n_labels)


def _rank(scores: torch.Tensor) -> list[int]:
    """Label indices by descending score; NaN last; ties keep the label order."""
    vals = scores.tolist()
    return sorted(range(len(vals)), key=lambda j: (math.isnan(vals[j]), -vals[j] if not math.isnan(vals[j]) else 0, j))


# ---------------------------------------------------------------------------------------------------------------
# the result


@dataclass
class AttractorResult:
    """Label perturbation over ``conditions`` x samples x removal sets (docs/methods/attractors.md).

    ``labels``: the label set (index order of every matrix); ``conditions``: name -> modalities kept (the others
    were replaced by neutral inputs); ``subsets``: the removed label sets; ``true`` [samples] label index;
    ``predicted`` [conditions, samples, subsets] label index (-1: not run, ``forced="exclude"``);
    ``label_logprobs`` [conditions, samples, subsets, labels]: each label's log P(token set) in the full
    next-token distribution (NaN where not run). Per condition: :meth:`confusion`, :meth:`fallback`,
    :meth:`graph`, :meth:`edges`, :meth:`hierarchy`, :meth:`accuracy`; across conditions :meth:`similarity`."""

    labels: list[str]
    conditions: dict[str, list[str]]
    players: list[str]
    subsets: list[tuple[str, ...]]
    sample_ids: list[str]
    true: torch.Tensor
    predicted: torch.Tensor
    label_logprobs: torch.Tensor
    threshold: float = DISPLAY_THRESHOLD
    hierarchy_how: str = "share"
    forced: str = "include"
    settings: dict = field(default_factory=dict)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _c(self, condition: str | None) -> int:
        names = list(self.conditions)
        if condition is None:
            return 0
        if condition not in names:
            raise DataError(f"unknown condition {condition!r}; this result has {names}.")
        return names.index(condition)

    @property
    def offered(self) -> torch.Tensor:
        """[subsets, labels] bool: the label was listed in the prompt."""
        return torch.tensor([[lab not in s for lab in self.labels] for s in self.subsets], dtype=torch.bool)

    @property
    def forced_rows(self) -> torch.Tensor:
        """[samples, subsets] bool: the sample's true label was removed (an error by construction)."""
        off = self.offered
        return ~off[:, self.true].T if len(self.subsets) else torch.zeros(len(self.sample_ids), 0, dtype=torch.bool)

    # -- per condition ---------------------------------------------------------------------------------------
    def confusion(self, condition: str | None = None) -> torch.Tensor:
        """[labels, labels] counts, rows = truth, columns = prediction, over every run row (forced ones too)."""
        return _confusion(self.true, self.predicted[self._c(condition)], len(self.labels))

    def fallback(self, condition: str | None = None) -> torch.Tensor:
        """[labels, labels] counts of the rows whose true label was removed: truth x the fallback label chosen."""
        return _confusion(self.true, self.predicted[self._c(condition)], len(self.labels), rows=self.forced_rows)

    def graph(self, condition: str | None = None) -> dict[str, torch.Tensor]:
        """:func:`error_graph` of the condition's confusion at this result's threshold."""
        return error_graph(self.confusion(condition), self.threshold)

    def edges(self, condition: str | None = None) -> list[dict]:
        """Every edge with at least one error: source (truth), target (prediction), count, weight, shown."""
        g = self.graph(condition)
        L = len(self.labels)
        return [{"source": self.labels[i], "target": self.labels[j], "count": int(g["counts"][i, j]),
                 "weight": float(g["weights"][i, j]), "shown": bool(g["shown"][i, j])}
                for i in range(L) for j in range(L) if g["counts"][i, j] > 0]

    def attraction(self, condition: str | None = None, how: str | None = None) -> torch.Tensor:
        """:func:`attraction` scores [labels] (``how`` default: this result's ``hierarchy_how``)."""
        return attraction(self.true, self.predicted[self._c(condition)], self.offered, len(self.labels),
                          how or self.hierarchy_how)

    def hierarchy(self, condition: str | None = None, how: str | None = None) -> list[dict]:
        """Labels ranked as attractors (strongest first): label, score, rank (1 = dominant attractor)."""
        s = self.attraction(condition, how)
        return [{"label": self.labels[j], "score": float(s[j]), "rank": r + 1} for r, j in enumerate(_rank(s))]

    def accuracy(self, condition: str | None = None, offered_only: bool = False) -> float:
        """Share of run rows predicted right (``offered_only``: only rows whose true label was offered)."""
        pred = self.predicted[self._c(condition)]
        keep = pred >= 0
        if offered_only:
            keep = keep & ~self.forced_rows
        n = int(keep.sum())
        return float((pred == self.true[:, None])[keep].sum()) / n if n else math.nan

    def accuracy_by_size(self, condition: str | None = None) -> dict[int, float]:
        """Accuracy per number of removed labels."""
        pred = self.predicted[self._c(condition)]
        sizes = torch.tensor([len(s) for s in self.subsets], dtype=torch.long)
        out = {}
        for k in sorted(set(sizes.tolist())):
            keep = (pred >= 0) & (sizes == k)[None, :]
            n = int(keep.sum())
            out[int(k)] = float((pred == self.true[:, None])[keep].sum()) / n if n else math.nan
        return out

    def similarity(self) -> dict[str, dict[str, float]]:
        """Cosine similarity of the conditions' error-weight matrices (NaN when a condition has no error)."""
        w = {c: self.graph(c)["weights"].flatten() for c in self.conditions}
        out: dict[str, dict[str, float]] = {}
        for a in self.conditions:
            out[a] = {}
            for b in self.conditions:
                na, nb = float(w[a].norm()), float(w[b].norm())
                out[a][b] = float(w[a] @ w[b]) / (na * nb) if na > 0 and nb > 0 else math.nan
        return out

    def predictions(self, condition: str | None = None) -> list[list[str | None]]:
        """[samples][subsets] predicted label names (None: not run)."""
        pred = self.predicted[self._c(condition)]
        return [[self.labels[int(p)] if p >= 0 else None for p in row] for row in pred]

    # -- output ----------------------------------------------------------------------------------------------
    def to_dict(self, scores: bool = False) -> dict:
        """JSON-ready dict: settings, subsets, per-condition counts / confusion / fallback / edges / hierarchy /
        attraction (all three rules) / accuracies, condition similarity and every prediction; ``scores=True``
        adds ``label_logprobs``."""
        per = {}
        for c in self.conditions:
            pred = self.predicted[self._c(c)]
            run = pred >= 0
            per[c] = {
                "kept": self.conditions[c],
                "n_rows": int(run.sum()),
                "n_errors": int((run & (pred != self.true[:, None])).sum()),
                "n_forced": int((run & self.forced_rows).sum()),
                "accuracy": self.accuracy(c),
                "accuracy_offered": self.accuracy(c, offered_only=True),
                "accuracy_by_size": {str(k): v for k, v in self.accuracy_by_size(c).items()},
                "confusion": self.confusion(c),
                "fallback": self.fallback(c),
                "edges": self.edges(c),
                "hierarchy": self.hierarchy(c),
                "attraction": {h: dict(zip(self.labels, self.attraction(c, h).tolist())) for h in HIERARCHIES},
                "predictions": self.predictions(c),
            }
        d = {
            "labels": self.labels, "conditions": self.conditions, "players": self.players,
            "subsets": [list(s) for s in self.subsets], "n_subsets": len(self.subsets),
            "sample_ids": self.sample_ids, "true_labels": [self.labels[int(t)] for t in self.true],
            "threshold": self.threshold, "hierarchy_how": self.hierarchy_how, "forced": self.forced,
            "settings": self.settings, "per_condition": per, "similarity": self.similarity(),
        }
        if scores:
            d["label_logprobs"] = self.label_logprobs
        return jsonable(d)

    def plot(self, path=None, conditions: Sequence[str] | None = None):
        """Per condition: the error-attractor graph (top) and the confusion matrix (bottom); see
        :func:`plot_attractors`."""
        return plot_attractors(self, path=path, conditions=conditions)


# ---------------------------------------------------------------------------------------------------------------
# the model run


def _model_device_dtype(model) -> tuple[Any, Any]:
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else None)
    return None, None


class _AudioFeatureCache:
    """Stands in for the processor's feature extractor while the scorer encodes a batch: each distinct waveform
    (keyed by its content and the call's options) is featurised once and its rows reused, so the prompt rows of one
    sample and condition (which differ only in the offered labels) share one log-mel computation. Cached only for
    ``padding="max_length"`` calls (a processor that pads every clip to 30 s: about 40 ms per clip), where a clip's
    features do not depend on the other clips of the batch; any other call goes straight through. ``size``: clips
    kept (the rows of a sample and condition are consecutive, so a few suffice)."""

    def __init__(self, fe, size: int = 32):
        self.fe, self.size = fe, size
        self.store: OrderedDict[tuple, dict] = OrderedDict()
        self.calls = self.clips = 0  # clips featurised / clips asked for (tests, diagnostics)

    def __getattr__(self, name):
        fe = self.__dict__.get("fe")
        if fe is None:
            raise AttributeError(name)
        return getattr(fe, name)

    def __call__(self, audio, *args, **kwargs):
        from transformers import BatchFeature

        if (args or kwargs.get("padding") != "max_length" or not isinstance(audio, (list, tuple)) or not audio
                or not all(isinstance(a, np.ndarray) and a.ndim == 1 for a in audio)):
            return self.fe(audio, *args, **kwargs)
        opts = repr(sorted(kwargs.items()))
        keys = [(hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest(), str(a.dtype), a.shape, opts)
                for a in audio]
        new = {k: a for k, a in zip(keys, audio) if k not in self.store}
        if new:
            out = self.fe(list(new.values()), **kwargs)
            if not all(hasattr(v, "shape") and len(v.shape) and v.shape[0] == len(new) for v in out.values()):
                return self.fe(audio, **kwargs)  # not one row per clip: no cache
            for i, k in enumerate(new):
                self.store[k] = {name: v[i] for name, v in out.items()}
            self.calls += len(new)
        self.clips += len(keys)
        rows = [self.store[k] for k in keys]
        for k in keys:
            self.store.move_to_end(k)
        while len(self.store) > max(self.size, len(set(keys))):
            self.store.popitem(last=False)
        stack = lambda v: torch.stack(v) if isinstance(v[0], torch.Tensor) else np.stack(v)
        return BatchFeature({name: stack([r[name] for r in rows]) for name in rows[0]})

    @contextlib.contextmanager
    def installed(self, processor):
        """The processor calls this cache instead of its feature extractor inside the block."""
        names = [n for n in ("feature_extractor", "audio_processor") if vars(processor).get(n) is self.fe]
        for n in names:
            setattr(processor, n, self)
        try:
            yield
        finally:
            for n in names:
                setattr(processor, n, self.fe)


class _LensScorer:
    """Label log-probabilities at the last prompt position from one batched forward (audio features cached per
    waveform: :class:`_AudioFeatureCache`)."""

    def __init__(self, lens, ids: list[list[int]], dataset):
        self.lens, self.dataset = lens, dataset
        fe = getattr(lens.processor, "feature_extractor", None)
        self.features = _AudioFeatureCache(fe) if fe is not None and callable(fe) else None
        m = max(len(x) for x in ids)
        self.index = torch.tensor([x + [x[0]] * (m - len(x)) for x in ids], dtype=torch.long)       # [L, m]
        self.valid = torch.tensor([[k < len(x) for k in range(m)] for x in ids], dtype=torch.bool)
        self.device, dtype = _model_device_dtype(lens.model)
        self.dtype = dtype if dtype not in (None, torch.float32) else None
        import inspect

        self.kwargs = {"use_cache": False}
        if "logits_to_keep" in inspect.signature(lens.model.forward).parameters:
            self.kwargs["logits_to_keep"] = 1  # only the last row is read: no [batch, seq, vocab] logits

    def __call__(self, rows: list[PromptRow]) -> torch.Tensor:
        with self.features.installed(self.lens.processor) if self.features is not None else contextlib.nullcontext():
            batch = self.lens.encode([r.sample for r in rows], dataset=self.dataset, device=self.device,
                                     dtype=self.dtype)
        with torch.no_grad():
            z = self.lens.model(**batch.inputs, **self.kwargs).logits[:, -1]
        logp = torch.log_softmax(z.detach().to("cpu", torch.float64), dim=-1)
        vocab = logp.shape[-1]
        if int(self.index.max()) >= vocab:
            raise DataError(f"label token ids reach {int(self.index.max())} but the model's vocabulary has {vocab} "
                            "entries; the processor's tokenizer does not belong to this model.")
        g = logp[:, self.index].masked_fill(~self.valid, -math.inf)                                # [n, L, m]
        return torch.logsumexp(g, dim=-1)


def _samples_and_dataset(samples, dataset):
    if dataset is None and hasattr(samples, "labels") and hasattr(samples, "template_for"):
        dataset = samples
    out = list(getattr(samples, "samples", samples))
    if not out:
        raise DataError("no samples given.")
    return out, dataset


def _label_set(labels, dataset, samples: list[ConflictSample]) -> list[str]:
    if labels is None:
        labels = getattr(dataset, "labels", None) if dataset is not None else None
    if labels is None:
        raise DataError("label perturbation needs the label set: pass labels=[...] (e.g. "
                        "arbiter.experiments.attractors.CREMA_D_LABELS), or load a data file whose first line "
                        "declares it: {\"arbiter_dataset\": 1, \"labels\": [...]} (docs/methods/conflict-samples.md), and pass that dataset.")
    labels = [str(x) for x in labels]
    if len(labels) < 2:
        raise DataError(f"the label set needs at least 2 labels, got {labels}.")
    if len(set(labels)) != len(labels):
        raise DataError(f"the label set has duplicates: {labels}.")
    for s in samples:
        if s.label is None:
            raise DataError(f"sample {s.id!r} has no 'label'; every sample of a classification data set needs its "
                            "true label (docs/methods/conflict-samples.md and docs/methods/attractors.md).")
        if s.label not in labels:
            raise DataError(f"sample {s.id!r}: label {s.label!r} is not in the label set {labels}.")
    return labels


def _conditions(players: list[str], conditions) -> dict[str, list[str]]:
    default = {"all": list(players)}
    if len(players) > 1:
        default.update({f"{p}_only": [p] for p in players})
    if conditions is None:
        return default
    if isinstance(conditions, Mapping):
        out = {str(k): list(v) for k, v in conditions.items()}
    else:
        out = {}
        for name in conditions:
            if name == "all":
                out[name] = list(players)
            elif isinstance(name, str) and name.endswith("_only") and name[:-5] in players:
                out[name] = [name[:-5]]
            else:
                raise DataError(f"unknown condition {name!r}; use 'all' or '<player>_only' with a player of "
                                f"{players}, or pass a mapping name -> modalities kept.")
    if not out:
        raise DataError("conditions is empty.")
    for name, kept in out.items():
        bad = [p for p in kept if p not in players]
        if bad:
            raise DataError(f"condition {name!r} keeps {bad}, which are not players {players}.")
    return out


def _preload(sample: ConflictSample, processor) -> ConflictSample:
    """Read the image and the audio once (every prompt row of the sample reuses them)."""
    changes: dict[str, Any] = {}
    if sample.image is not None and not hasattr(sample.image, "size"):
        changes["image"] = sample.load_image()
    if sample.audio is not None and not isinstance(sample.audio, np.ndarray):
        from ..encode import load_audio

        changes["audio"] = load_audio(sample, processor)
    return dataclasses.replace(sample, **changes) if changes else sample


def label_perturbation(lens, samples, labels: Sequence[str] | None = None, *, players: Sequence[str] | None = None,
                       conditions: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
                       sizes: Sequence[int] = (1, 2, 3, 4), max_subsets: int | None = None, seed: int = 0,
                       forced: str = "include", tokens: str = "dictionary", options: str = DEFAULT_OPTIONS,
                       sep: str = ", ", threshold: float = DISPLAY_THRESHOLD, hierarchy: str = "share",
                       batch_size: int = 16, dataset=None, scorer: Scorer | None = None,
                       progress: bool = True) -> AttractorResult:
    """Label perturbation and error attractors (docs/methods/attractors.md, [PB]); see the module notes for every choice.

    lens: an attached :class:`arbiter.Lens` (None when ``scorer`` is given). samples: classification samples
    (a list, or a :class:`arbiter.data.ConflictDataset` whose ``labels`` give the label set), each with its
    ``label``. labels: the label set (required when the data set declares none).
    players: modalities that define the conditions (default: those of image, audio, context present in every
    sample); conditions: ``"all"`` and ``"<player>_only"`` by default (the other players replaced by neutral
    inputs: black image, silent audio, empty text), or a list of such names, or a mapping name -> players kept.
    sizes / max_subsets / seed: the removal sets (:func:`removal_subsets`; 56 with six labels).
    forced: ``"include"`` (the method: rows whose true label was removed run and count as errors) or ``"exclude"``.
    tokens: ``"dictionary"`` or ``"space"`` (:func:`label_token_ids`). options / sep: how the offered labels
    enter the prompt (:func:`offered_sample`). threshold: display threshold of the graph (0.02). hierarchy:
    ``"share"``, ``"count"`` or ``"net"``. batch_size: prompt rows per forward. dataset: the ConflictDataset
    (file template and labels) when ``samples`` is a plain list. scorer: optional callable rows -> [rows,
    labels] label scores replacing the model (tests, other back ends). Returns :class:`AttractorResult`."""
    check_choice("forced", forced, FORCED)
    check_choice("tokens", tokens, TOKEN_RULES)
    check_choice("hierarchy", hierarchy, HIERARCHIES)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    if not 0.0 <= float(threshold) <= 1.0:
        raise DataError(f"threshold must be in [0, 1], got {threshold}.")
    if _PLACEHOLDER not in options:
        raise DataError(f"options must contain {_PLACEHOLDER} (where the offered labels go), got {options!r}.")
    samples, dataset = _samples_and_dataset(samples, dataset)
    labels = _label_set(labels, dataset, samples)
    if lens is None and scorer is None:
        raise DataError("label_perturbation needs an attached lens (or a scorer).")
    players = present_players(samples, DEFAULT_PLAYERS) if players is None else list(players)
    bad = [p for p in players if p not in NEUTRAL_PLAYERS]
    if bad or len(set(players)) != len(players):
        raise DataError(f"players must be distinct modalities with a neutral input ({', '.join(NEUTRAL_PLAYERS)}), "
                        f"got {players}.")
    conds = _conditions(players, conditions)
    subsets = removal_subsets(labels, sizes, max_subsets, seed)
    if scorer is None:
        from ..encode import tokenizer_of

        scorer = _LensScorer(lens, label_token_ids(tokenizer_of(lens.processor), labels, tokens), dataset)
    processor = getattr(lens, "processor", None)
    L, C, S, P = len(labels), len(conds), len(samples), len(subsets)
    index = {lab: j for j, lab in enumerate(labels)}
    true = torch.tensor([index[s.label] for s in samples], dtype=torch.long)

    # one prompt row per (condition, sample, removal set); rows of samples with the same media go together
    rows: dict[tuple[bool, bool], list[tuple[PromptRow, tuple[int, int, int]]]] = {}
    for si, s in enumerate(samples):
        base = _preload(s, processor)
        for ci, kept in enumerate(conds.values()):
            neutral = neutral_sample(base, [p for p in players if p not in kept])
            for pi, removed in enumerate(subsets):
                if forced == "exclude" and s.label in removed:
                    continue
                offered = tuple(lab for lab in labels if lab not in removed)
                row = PromptRow(offered_sample(neutral, offered, options, sep), s.id, s.label,
                                list(conds)[ci], tuple(removed), offered)
                rows.setdefault((s.image is not None, s.audio is not None), []).append((row, (ci, si, pi)))
    chunks = [same[i:i + batch_size] for same in rows.values() for i in range(0, len(same), batch_size)]
    logprobs = torch.full((C, S, P, L), math.nan, dtype=torch.float64)
    predicted = torch.full((C, S, P), -1, dtype=torch.long)
    from ..progress import progress_bar

    it = progress_bar(chunks, f"label perturbation: {C} conditions × {S} samples × {P} removal sets",
                      total=len(chunks), progress=progress)
    for chunk in it:
        got = torch.as_tensor(scorer([r for r, _ in chunk])).detach().to("cpu", torch.float64)
        if tuple(got.shape) != (len(chunk), L):
            raise DataError(f"the scorer returned shape {tuple(got.shape)} for {len(chunk)} rows; expected "
                            f"{(len(chunk), L)} (rows, labels).")
        if bool(got.isnan().any()):
            raise DataError("the label scores contain NaN (check the model's dtype / inputs).")
        off = torch.tensor([[lab in r.offered for lab in labels] for r, _ in chunk], dtype=torch.bool)
        # -inf among offered labels stays below any finite score but above the labels not offered
        restricted = torch.where(off, got.clamp(min=torch.finfo(torch.float64).min), -math.inf)
        pred = restricted.argmax(dim=-1)
        ci, si, pi = (torch.tensor(x) for x in zip(*(where for _, where in chunk)))
        logprobs[ci, si, pi] = got
        predicted[ci, si, pi] = pred
    settings = {"sizes": sorted({int(k) for k in sizes}), "max_subsets": max_subsets, "seed": seed,
                "exhaustive": P == sum(math.comb(L, k) for k in {int(k) for k in sizes}),
                "tokens": tokens, "options": options, "sep": sep, "batch_size": batch_size,
                "removal": "neutral", "n_samples": S}
    return AttractorResult(labels=labels, conditions=conds, players=players, subsets=subsets,
                           sample_ids=[s.id for s in samples], true=true, predicted=predicted,
                           label_logprobs=logprobs, threshold=float(threshold), hierarchy_how=hierarchy,
                           forced=forced, settings=settings)


# ---------------------------------------------------------------------------------------------------------------
# plot


def _draw_graph(ax, result: AttractorResult, condition: str) -> None:
    from matplotlib.patches import Circle, FancyArrowPatch

    L = len(result.labels)
    g = result.graph(condition)
    score = result.attraction(condition)
    finite = score[torch.isfinite(score)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    import matplotlib

    cmap = matplotlib.colormaps["Reds"]
    ang = [math.pi / 2 - 2 * math.pi * j / L for j in range(L)]
    pos = [(math.cos(a), math.sin(a)) for a in ang]
    nodes = []
    for j, lab in enumerate(result.labels):
        s = float(score[j])
        t = 0.15 if not math.isfinite(s) or hi <= lo else 0.15 + 0.7 * (s - lo) / (hi - lo)
        c = Circle(pos[j], 0.2, facecolor=cmap(t), edgecolor="black", lw=0.8, zorder=3, gid=f"node:{lab}")
        ax.add_patch(c)
        nodes.append(c)
        ax.text(pos[j][0], pos[j][1], lab, ha="center", va="center", fontsize=6, zorder=4)
    for i in range(L):
        for j in range(L):
            if not bool(g["shown"][i, j]):
                continue
            w = float(g["weights"][i, j])
            arrow = FancyArrowPatch(pos[i], pos[j], patchA=nodes[i], patchB=nodes[j], arrowstyle="-|>",
                                    connectionstyle="arc3,rad=0.18", mutation_scale=8 + 14 * w, lw=0.6 + 9 * w,
                                    color="tab:blue", alpha=0.75, zorder=2,
                                    gid=f"edge:{result.labels[i]}->{result.labels[j]}")
            ax.add_patch(arrow)
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")
    ax.axis("off")
    n_err = int(g["counts"].sum())
    top = result.hierarchy(condition)[0]["label"] if n_err else "-"
    ax.set_title(f"{condition}: {n_err} errors, acc {result.accuracy(condition):.2f}\n"
                 f"top attractor {top} (edges >= {100 * result.threshold:g}% shown)", fontsize=8)


def _draw_confusion(ax, result: AttractorResult, condition: str) -> None:
    m = result.confusion(condition).numpy()
    ax.imshow(m, cmap="Blues")
    L = len(result.labels)
    ax.set_xticks(range(L), result.labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(L), result.labels, fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    vmax = m.max() if m.size else 0
    for i in range(L):
        for j in range(L):
            if m[i, j]:
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] > 0.6 * vmax else "black")


def plot_attractors(result: AttractorResult, path=None, conditions: Sequence[str] | None = None):
    """One column per condition: the error-attractor graph on a circle (arrow width by edge weight, edges under
    the threshold hidden, node colour by attractor score) over the confusion matrix. Matplotlib only. Saves to
    ``path`` when given; returns the Figure."""
    from matplotlib.figure import Figure

    conds = list(conditions) if conditions is not None else list(result.conditions)
    for c in conds:
        result._c(c)
    n = len(conds)
    fig = Figure(figsize=(3.6 * n, 7.4))
    for k, c in enumerate(conds):
        _draw_graph(fig.add_subplot(2, n, k + 1), result, c)
        _draw_confusion(fig.add_subplot(2, n, n + k + 1), result, c)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
