"""Modality-level experiments on a model and conflict samples: modality Shapley values (docs/methods/shapley.md), key-space
analysis (docs/methods/keyspace.md) and attention-imbalance heat maps (docs/methods/imbalance.md).

The numbers come from the pure metrics (``arbiter.metrics.shapley`` / ``keyspace`` / ``imbalance``); this module
only runs the model through the lens and feeds them.

* :func:`modality_shapley` -- exact Shapley values of the modalities present in a sample (image, text context,
  audio ...), one coalition per group of batch rows, and the preference angle. :func:`modality_shapley_captum`
  is an independent reference path (one forward per coalition, Shapley by captum's ``ShapleyValues``).
* :func:`keyspace` -- attention keys at two modalities' positions, per layer, pooled over samples, into
  :func:`arbiter.metrics.keyspace.keyspace_analysis`; PCA scatter plot.
* :func:`imbalance` -- attention rows of the query (``last``) and values, per layer, into
  :func:`arbiter.metrics.imbalance.attention_imbalance`; [layers, heads] heat map plot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..adapters.base import key_projection
from ..data import ConflictSample
from ..errors import DataError, GroupError, SiteError, TraceError
from ..groups import TokenGroups
from ..util import check_choice, jsonable
from ..metrics.imbalance import ImbalanceResult, attention_imbalance
from ..metrics.keyspace import KeySpaceResult, keyspace_analysis, pooled_pca, subsample
from ..metrics.shapley import ANGLE_METHODS, preference_angle, shapley
from ..probes.base import Ctx, Probe
from ..probes.knockout import Knockout
from .common import answer_ids, module_weight

__all__ = [
    "KEY_KINDS",
    "NEUTRAL_PLAYERS",
    "REFERENCES",
    "REMOVALS",
    "VALUES",
    "ImbalanceExperimentResult",
    "KeySpaceExperimentResult",
    "ModalityShapleyResult",
    "coalitions",
    "imbalance",
    "keyspace",
    "modality_shapley",
    "modality_shapley_captum",
    "neutral_sample",
    "plot_imbalance",
    "plot_keyspace_pca",
    "present_players",
]

REMOVALS = ("knockout", "neutral")
VALUES = ("logprob", "accuracy")
REFERENCES = ("compliant", "competitor", "vision", "text")
KEY_KINDS = ("pre_rope", "post_rope")
NEUTRAL_PLAYERS = ("image", "audio", "context", "instruction", "question")
DEFAULT_PLAYERS = ("image", "audio", "context")

GroupSpec = str | Callable[[TokenGroups], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def _conflict_list(samples) -> list[ConflictSample]:
    samples = list(getattr(samples, "samples", samples))
    if not samples:
        raise DataError("no samples given.")
    return samples


def _index_chunks(samples: Sequence[ConflictSample], batch_size: int) -> list[list[int]]:
    """Indices of batches of samples that agree on having an image and on having audio (the processor needs that)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    by: dict[tuple[bool, bool], list[int]] = {}
    for k, s in enumerate(samples):
        by.setdefault((s.image is not None, s.audio is not None), []).append(k)
    return [same[i:i + batch_size] for same in by.values() for i in range(0, len(same), batch_size)]


def _chunks(samples: Sequence[ConflictSample], batch_size: int) -> list[list[ConflictSample]]:
    return [[samples[k] for k in idx] for idx in _index_chunks(samples, batch_size)]


def _progress(it, enabled: bool, total: int, desc: str):
    from ..progress import progress_bar

    return progress_bar(it, desc, total=total, progress=enabled)


def _tile_inputs(inputs: dict, n: int) -> dict:
    """Every batched input repeated n times one after the other (row j*b + i is sample i), as groups.tile(n)."""
    if n == 1:
        return inputs
    return {k: torch.cat([v] * n, dim=0) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
            for k, v in inputs.items()}


def _mask_of(spec: GroupSpec, groups: TokenGroups) -> torch.Tensor:
    """[batch, positions] bool mask of a group name (``"image"``, ``"image|context"``) or a callable on groups."""
    if callable(spec):
        m = torch.as_tensor(spec(groups)).to(torch.bool).cpu()
        if m.dim() == 1:
            m = m.expand(groups.batch_size, -1)
        if tuple(m.shape) != (groups.batch_size, groups.length):
            raise GroupError(f"a group callable returned shape {tuple(m.shape)}; expected "
                             f"{(groups.batch_size, groups.length)} (batch, positions).")
        return m & ~groups["pad"]
    return groups[spec].cpu()


def _spec_name(spec: GroupSpec) -> str:
    return spec if isinstance(spec, str) else getattr(spec, "__name__", "custom")


# ---------------------------------------------------------------------------------------------------------------
# modality Shapley (docs/methods/shapley.md)


def present_players(samples, candidates: Sequence[str] = DEFAULT_PLAYERS) -> list[str]:
    """The candidate modalities present in every sample: ``image`` / ``audio`` when the sample has one,
    text parts (``context`` ...) when their text is non-empty."""
    samples = _conflict_list(samples)
    out = []
    for p in candidates:
        if p in ("image", "audio"):
            ok = all(getattr(s, p) is not None for s in samples)
        else:
            ok = all(bool(getattr(s, p, "")) for s in samples)
        if ok:
            out.append(p)
    return out


def neutral_sample(sample: ConflictSample, absent: Sequence[str]) -> ConflictSample:
    """A copy of ``sample`` with the ``absent`` players replaced by neutral inputs (docs/methods/shapley.md): a black image of the
    same size, silent audio of the same length (zeros), an empty string for a text part (context, instruction,
    question). A player the sample does not have stays absent (no black image is added to a text-only sample)."""
    changes: dict[str, Any] = {}
    for p in absent:
        if p not in NEUTRAL_PLAYERS:
            raise DataError(f"removal='neutral' knows how to neutralise {', '.join(NEUTRAL_PLAYERS)}; player {p!r} "
                            "has no neutral input (use removal='knockout' for any token group).")
        if p == "image":
            if sample.image is not None:
                from PIL import Image

                changes["image"] = Image.new("RGB", sample.load_image().size, (0, 0, 0))
        elif p == "audio":
            if sample.audio is not None:
                if not isinstance(sample.audio, np.ndarray):
                    raise DataError(f"sample {sample.id!r}: removal='neutral' needs the audio as a numpy waveform "
                                    f"(got {type(sample.audio).__name__}); load the clip first.")
                changes["audio"] = np.zeros_like(sample.audio)
        else:
            changes[p] = ""
    return dataclasses.replace(sample, **changes) if changes else sample


def coalitions(players: Sequence[str]) -> list[frozenset]:
    """All 2^n coalitions; index j holds player k iff bit k of j is set (0 = empty, 2^n - 1 = all players)."""
    n = len(players)
    return [frozenset(p for k, p in enumerate(players) if j >> k & 1) for j in range(2 ** n)]


def _reference_ids(lens, sample: ConflictSample, reference: str) -> list[int]:
    ids_p, ids_c = answer_ids(lens, sample)
    if reference == "compliant":
        ids = ids_p
    elif reference == "competitor":
        ids = ids_c
    else:  # "vision" / "text": the answer supported by that modality
        ids = ids_p if (sample.target == reference or not sample.conflict) else ids_c
    if not ids:
        raise DataError(f"sample {sample.id!r}: the reference answer ({reference}) has no token ids "
                        "(an agreement sample has no competitor); pick another reference or drop the sample.")
    return ids


def _values(last_logits: torch.Tensor, ids: Sequence[Sequence[int]], value: str) -> torch.Tensor:
    """v per row from last-position logits [rows, vocab]; row r scores ids[r % len(ids)].

    ``logprob``: log P(D) = logsumexp over D of log_softmax (float64). ``accuracy``: 1 if argmax over the whole
    vocabulary lies in D, else 0."""
    z = last_logits.detach().to(torch.float64)
    n = len(ids)
    out = torch.empty(z.shape[0], dtype=torch.float64)
    if value == "logprob":
        logp = torch.log_softmax(z, dim=-1)
        for r in range(z.shape[0]):
            out[r] = torch.logsumexp(logp[r, list(ids[r % n])], dim=-1)
    else:
        top = z.argmax(dim=-1)
        for r in range(z.shape[0]):
            out[r] = float(int(top[r]) in set(ids[r % n]))
    return out


def _forward_last(lens, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return lens.model(**inputs, use_cache=False).logits[:, -1]


@contextlib.contextmanager
def _knockouts(lens, absent_rows: dict[str, list[int]]) -> Iterator[None]:
    """Knock out every attention edge from each player's tokens to every position (``dst="all"``), in every
    layer, on the given batch rows: nothing outside the group can read it any more."""
    with contextlib.ExitStack() as stack:
        for p, rows in absent_rows.items():
            if rows:
                stack.enter_context(lens.probe(Knockout(p, "all", batch_rows=rows, allow_empty=True),
                                               layers="all"))
        yield


def _player_present(lens, groups: TokenGroups, sample_idx: int, sample: ConflictSample, player: str,
                    removal: str) -> bool:
    if removal == "knockout":
        return bool(groups[player][sample_idx].any())
    if player in ("image", "audio"):
        return getattr(sample, player) is not None
    return bool(getattr(sample, player, ""))


def _check_players(players: Sequence[str], removal: str) -> list[str]:
    players = list(players)
    if not players:
        raise DataError("modality Shapley needs at least one player.")
    if len(set(players)) != len(players):
        raise DataError(f"players has duplicates: {players}.")
    if len(players) > 4:
        raise DataError(f"{len(players)} players: exact Shapley enumerates 2^n coalitions; docs/methods/shapley.md covers n <= 4.")
    if removal == "neutral":
        bad = [p for p in players if p not in NEUTRAL_PLAYERS]
        if bad:
            raise DataError(f"removal='neutral' cannot neutralise {bad}; neutral inputs exist for "
                            f"{', '.join(NEUTRAL_PLAYERS)} (use removal='knockout' for other token groups).")
    return players


@dataclass
class ModalityShapleyResult:
    """Per-sample modality Shapley values (docs/methods/shapley.md).

    ``phi`` [samples, players]; ``coalition_values`` [samples, 2^n] with column j the value of coalition j (player
    k in it iff bit k of j is set: column 0 = no player, last column = all players), ``coalitions`` their player
    lists; ``v_empty`` / ``v_full`` [samples]; ``present`` [samples, players]: whether the sample has the player
    (an absent player is a null player, phi = 0); ``efficiency_gap``: max over samples of
    |sum phi - (v_full - v_empty)|. The angle (``angle_players`` = (X, Y), ``angle_how``) is taken on the mean phi
    over samples (:attr:`angle`); +90 = only Y matters, -90 = only X."""

    players: list[str]
    removal: str
    value: str
    reference: str
    sample_ids: list[str]
    targets: list[str]
    phi: torch.Tensor
    coalition_values: torch.Tensor
    coalitions: list[list[str]]
    present: torch.Tensor
    efficiency_gap: float
    angle_players: tuple[str, str] | None = None
    angle_how: str = "ratio"
    extra: dict = field(default_factory=dict)

    @property
    def v_empty(self) -> torch.Tensor:
        return self.coalition_values[:, 0]

    @property
    def v_full(self) -> torch.Tensor:
        return self.coalition_values[:, -1]

    def __getitem__(self, player: str) -> torch.Tensor:
        return self.phi[:, self.players.index(player)]

    @property
    def mean(self) -> dict[str, float]:
        """Mean phi over samples, per player."""
        return {p: float(self.phi[:, k].mean()) for k, p in enumerate(self.players)}

    def mean_by_target(self) -> dict[str, dict[str, float]]:
        out = {}
        for t in ("vision", "text"):
            sel = [i for i, x in enumerate(self.targets) if x == t]
            if sel:
                out[t] = {p: float(self.phi[sel, k].mean()) for k, p in enumerate(self.players)}
        return out

    def _angle(self, phi_row: torch.Tensor) -> float:
        if self.angle_players is None:
            return math.nan
        x, y = (self.players.index(p) for p in self.angle_players)
        return preference_angle(float(phi_row[x]), float(phi_row[y]), self.angle_how)

    @property
    def angle(self) -> float:
        """Preference angle of the mean phi (degrees; nan without two players or when both mean phi are 0)."""
        return self._angle(self.phi.mean(dim=0))

    @property
    def per_sample_angle(self) -> list[float]:
        return [self._angle(row) for row in self.phi]

    def to_dict(self) -> dict:
        return jsonable({
            "players": self.players, "removal": self.removal, "value": self.value, "reference": self.reference,
            "n_samples": len(self.sample_ids), "sample_ids": self.sample_ids, "targets": self.targets,
            "mean": self.mean, "mean_by_target": self.mean_by_target(),
            "angle": self.angle, "angle_players": list(self.angle_players) if self.angle_players else None,
            "angle_how": self.angle_how, "per_sample_angle": self.per_sample_angle,
            "phi": self.phi, "coalitions": self.coalitions, "coalition_values": self.coalition_values,
            "v_empty": self.v_empty, "v_full": self.v_full, "present": self.present,
            "efficiency_gap": self.efficiency_gap, **self.extra,
        })


def _coalition_values_knockout(lens, chunk: list[ConflictSample], players: list[str], coal: list[frozenset],
                               ids: list[list[int]], value: str, per_forward: int, dataset) -> tuple:
    batch = lens.encode(chunk, dataset=dataset)
    groups = batch.groups
    b = len(chunk)
    present = [[_player_present(lens, groups, i, s, p, "knockout") for p in players] for i, s in enumerate(chunk)]
    vals = torch.empty(b, len(coal), dtype=torch.float64)
    try:
        for start in range(0, len(coal), per_forward):
            js = list(range(start, min(len(coal), start + per_forward)))
            n = len(js)
            absent = {p: [r * b + i for r, j in enumerate(js) if p not in coal[j] for i in range(b)] for p in players}
            lens.use(groups.tile(n))
            with _knockouts(lens, absent):
                last = _forward_last(lens, _tile_inputs(batch.inputs, n))
            v = _values(last, ids, value)
            for r, j in enumerate(js):
                vals[:, j] = v[r * b:(r + 1) * b]
    finally:
        lens.use(groups)
    return vals, present


def _coalition_values_neutral(lens, chunk: list[ConflictSample], players: list[str], coal: list[frozenset],
                              ids: list[list[int]], value: str, per_forward: int, dataset) -> tuple:
    b = len(chunk)
    present = [[_player_present(lens, None, i, s, p, "neutral") for p in players] for i, s in enumerate(chunk)]
    vals = torch.empty(b, len(coal), dtype=torch.float64)
    for start in range(0, len(coal), per_forward):
        js = list(range(start, min(len(coal), start + per_forward)))
        rows = [neutral_sample(s, [p for p in players if p not in coal[j]]) for j in js for s in chunk]
        batch = lens.encode(rows, dataset=dataset)
        last = _forward_last(lens, batch.inputs)
        v = _values(last, ids, value)
        for r, j in enumerate(js):
            vals[:, j] = v[r * b:(r + 1) * b]
    return vals, present


def modality_shapley(lens, samples, players: Sequence[str] | None = None, removal: str = "knockout",
                     value: str = "logprob", reference: str = "compliant", batch_size: int = 4,
                     coalitions_per_forward: int | None = None, dataset=None,
                     angle: tuple[str, str] | None = None, angle_how: str = "ratio",
                     progress: bool = True) -> ModalityShapleyResult:
    """Exact modality Shapley values per sample (docs/methods/shapley.md, [PB]) over all 2^n coalitions of ``players``.

    players: token-group / sample-part names, n <= 4 (default: those of image, audio, context present in every
    sample, :func:`present_players`). v(S) is the score of the model's next-token distribution at the last prompt
    position with only the players in S present:

    * ``value="logprob"`` (default): log P(D) = log sum_{v in D} softmax(z)_v, D = the reference answer's
      first-token ids (the Answer Entity Dictionary, docs/methods/conflict-samples.md); ``"accuracy"``: 1 if argmax_v z_v is in D.
    * ``reference``: ``"compliant"`` (y_p, default), ``"competitor"`` (y_c), ``"vision"`` / ``"text"`` (the
      answer that modality supports; on an agreement sample, its single answer).
    * ``removal="knockout"`` (default): the absent players' tokens are knocked out as keys for every query
      position (``Knockout(player, "all")``) in every attention layer, so no other token reads them (their
      positions stay in the sequence: RoPE positions do not shift). Coalitions are batched: the encoded batch is
      tiled, one coalition per group of batch rows (``batch_rows``), ``coalitions_per_forward`` coalitions per
      forward (default all 2^n). Works for any token group (``instruction``, ``image|context`` ...).
      ``"neutral"``: the absent players are replaced by neutral inputs (:func:`neutral_sample`: black image of
      the same size, silent audio of the same length, empty text) and the prompt is re-encoded; coalitions are
      batched as rows of one padded batch.

    A player a sample lacks is a null player there (phi = 0 exactly, ``present`` False). Angle: ``angle`` =
    (X, Y) players (default the first two), ``angle_how`` ``"ratio"`` or ``"atan2"``
    (:func:`arbiter.metrics.shapley.preference_angle`), on the mean phi over samples. Returns
    :class:`ModalityShapleyResult`."""
    check_choice("removal", removal, REMOVALS)
    check_choice("value", value, VALUES)
    check_choice("reference", reference, REFERENCES)
    check_choice("angle_how", angle_how, ANGLE_METHODS)
    samples = _conflict_list(samples)
    if players is None:
        players = present_players(samples)
        if not players:
            raise DataError("none of image, audio, context is present in every sample; pass players=.")
    players = _check_players(players, removal)
    if angle is not None:
        angle = tuple(angle)
        if len(angle) != 2 or any(p not in players for p in angle) or angle[0] == angle[1]:
            raise DataError(f"angle must name two different players of {players}, got {angle!r}.")
    elif len(players) >= 2:
        angle = (players[0], players[1])
    coal = coalitions(players)
    per_call = len(coal) if coalitions_per_forward is None else int(coalitions_per_forward)
    if per_call < 1:
        raise DataError(f"coalitions_per_forward must be >= 1, got {per_call}.")
    run = _coalition_values_knockout if removal == "knockout" else _coalition_values_neutral
    V = torch.empty(len(samples), len(coal), dtype=torch.float64)
    present_all: list = [None] * len(samples)
    chunks = _index_chunks(samples, batch_size)
    for idx in _progress(chunks, progress, len(chunks), f"modality shapley: {len(coal)} coalitions"):
        chunk = [samples[k] for k in idx]
        ids = [_reference_ids(lens, s, reference) for s in chunk]
        vals, present = run(lens, chunk, players, coal, ids, value, per_call, dataset)
        V[idx] = vals
        for k, row in zip(idx, present):
            present_all[k] = row
    order = samples  # results keep the order the samples were given in
    phi = torch.empty(len(order), len(players), dtype=torch.float64)
    gap = 0.0
    index = {c: j for j, c in enumerate(coal)}
    for i in range(len(order)):
        res = shapley(lambda S, _i=i: float(V[_i, index[S]]), players)
        phi[i] = torch.tensor([res.values[p] for p in players], dtype=torch.float64)
        gap = max(gap, abs(res.efficiency_gap))
    return ModalityShapleyResult(
        players=players, removal=removal, value=value, reference=reference,
        sample_ids=[s.id for s in order], targets=[s.target for s in order], phi=phi, coalition_values=V,
        coalitions=[[p for p in players if p in c] for c in coal], present=torch.tensor(present_all),
        efficiency_gap=gap, angle_players=angle, angle_how=angle_how)


def modality_shapley_captum(lens, samples, players: Sequence[str], removal: str = "knockout",
                            value: str = "logprob", reference: str = "compliant", dataset=None) -> torch.Tensor:
    """Reference path for :func:`modality_shapley`: phi [samples, players] from captum's ``ShapleyValues``.

    The features are one presence scalar per player (1 present, baseline 0 absent; feature mask = one group per
    player); the forward function runs the model once per (sample, coalition), unbatched, with the absent
    players removed as in :func:`modality_shapley` (``lens.knockout(player, "all")`` nested, or a re-encoded
    neutral sample). Slow (one forward per coalition and sample); meant for cross-checks."""
    from captum.attr import ShapleyValues

    check_choice("removal", removal, REMOVALS)
    check_choice("value", value, VALUES)
    check_choice("reference", reference, REFERENCES)
    samples = _conflict_list(samples)
    players = _check_players(players, removal)
    out = torch.empty(len(samples), len(players), dtype=torch.float64)
    for i, s in enumerate(samples):
        out[i] = _captum_one(lens, s, players, removal, value, reference, dataset, ShapleyValues)
    return out


def _captum_one(lens, sample: ConflictSample, players: list[str], removal: str, value: str, reference: str,
                dataset, ShapleyValues) -> torch.Tensor:
    ids = [_reference_ids(lens, sample, reference)]
    cache: dict[frozenset, float] = {}

    def v(S: frozenset) -> float:
        if S not in cache:
            absent = [p for p in players if p not in S]
            if removal == "knockout":
                batch = lens.encode([sample], dataset=dataset)
                with contextlib.ExitStack() as stack:
                    for p in absent:
                        stack.enter_context(lens.knockout(p, "all", allow_empty=True))
                    last = _forward_last(lens, batch.inputs)
            else:
                batch = lens.encode([neutral_sample(sample, absent)], dataset=dataset)
                last = _forward_last(lens, batch.inputs)
            cache[S] = float(_values(last, ids, value)[0])
        return cache[S]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([v(frozenset(p for k, p in enumerate(players) if float(row[k]) > 0.5)) for row in x],
                            dtype=torch.float64)

    n = len(players)
    x = torch.ones(1, n, dtype=torch.float64)
    attr = ShapleyValues(forward).attribute(x, baselines=torch.zeros_like(x), feature_mask=torch.arange(n)[None])
    return attr[0].to(torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# key-space analysis (docs/methods/keyspace.md)


class _KeyCollector(Probe):
    """Reads ``attn.k`` (post-RoPE) and keeps, per layer, the key vectors at the positions of two masks."""

    reads: ClassVar = {"attn.k": "all"}

    def __init__(self, masks: tuple[torch.Tensor, torch.Tensor], kv_head: int | None,
                 store: dict[int, tuple[list, list]]):
        super().__init__()
        self.masks, self.kv_head, self.store = masks, kv_head, store

    def attn_k(self, ctx: Ctx, value: torch.Tensor) -> None:
        if ctx.cross:
            return
        v = value.detach().permute(0, 2, 1, 3)  # [b, rows, kv, hd]
        _collect(self.store, ctx.layer, v, ctx.positions.cpu(), self.masks, self.kv_head)


def _collect(store, layer: int, v: torch.Tensor, positions: torch.Tensor, masks, kv_head: int | None) -> None:
    """v [b, rows, kv, hd] at absolute ``positions``: append the rows each mask selects (per sample)."""
    if kv_head is not None:
        if not 0 <= kv_head < v.shape[2]:
            raise SiteError(f"kv_head={kv_head} is out of range; layer {layer} has {v.shape[2]} KV heads.")
        v = v[:, :, kv_head]
    else:
        v = v.reshape(v.shape[0], v.shape[1], -1)
    v = v.to("cpu", torch.float32)
    keep = positions < masks[0].shape[1]
    pos = positions[keep]
    v = v[:, keep.to(v.device)]
    a_list, b_list = store.setdefault(layer, ([], []))
    for m, lst in ((masks[0], a_list), (masks[1], b_list)):
        sel = m[:, pos]  # [b, rows]
        for i in range(v.shape[0]):
            if bool(sel[i].any()):
                lst.append(v[i][sel[i]].numpy().copy())


class _PreRopeKeyCollector(Probe):
    """Reads ``attn.k_pre`` (the k_proj output, before RoPE and any k-norm) and keeps, per layer, the key vectors
    at the positions of two masks."""

    reads: ClassVar = {"attn.k_pre": "all"}

    def __init__(self, masks: tuple[torch.Tensor, torch.Tensor], kv_head: int | None,
                 store: dict[int, tuple[list, list]]):
        super().__init__()
        self.masks, self.kv_head, self.store = masks, kv_head, store

    def attn_k_pre(self, ctx: Ctx, value: torch.Tensor) -> None:
        _collect(self.store, ctx.layer, value.detach(), ctx.positions.cpu(), self.masks, self.kv_head)


def _self_attention_layers(lens, layers) -> list[int]:
    f = lens.facts
    valid = [i for i in f.attention_layers if not f.layers[i].cross]
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return valid
    chosen = [int(x) + (f.n_layers if int(x) < 0 else 0) for x in ([layers] if isinstance(layers, int) else layers)]
    bad = [x for x in chosen if x not in valid]
    if bad:
        raise SiteError(f"layers {bad} are not self-attention layers of this model (those are {valid}).")
    return sorted(set(chosen))


@dataclass
class KeySpaceExperimentResult:
    """Key-space analysis per layer (docs/methods/keyspace.md) between modalities ``a`` and ``b``.

    ``results[layer]``: the :class:`arbiter.metrics.keyspace.KeySpaceResult` (None where a modality has < 2 keys);
    arrays over ``layers``: :attr:`mmd`, :attr:`intra_a`, :attr:`intra_b`, :attr:`p_value`, :attr:`jsd`;
    ``n_a`` / ``n_b``: keys pooled per layer before subsampling; ``pca2[layer]``: (a [m, 2], b [m, 2], explained
    [2]) -- the first two pooled-PCA coordinates of at most ``plot_points`` keys per modality, for the scatter
    plot."""

    layers: list[int]
    modalities: tuple[str, str]
    keys: str
    kv_head: int | None
    results: dict[int, KeySpaceResult | None]
    n_a: dict[int, int]
    n_b: dict[int, int]
    pca2: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def _arr(self, get) -> np.ndarray:
        return np.array([get(self.results[l]) if self.results.get(l) is not None else np.nan for l in self.layers],
                        dtype=np.float64)

    @property
    def mmd(self) -> np.ndarray:
        return self._arr(lambda r: r.mmd.mmd)

    @property
    def intra_a(self) -> np.ndarray:
        return self._arr(lambda r: r.mmd.intra_a)

    @property
    def intra_b(self) -> np.ndarray:
        return self._arr(lambda r: r.mmd.intra_b)

    @property
    def p_value(self) -> np.ndarray:
        return self._arr(lambda r: np.nan if r.mmd.p_value is None else r.mmd.p_value)

    @property
    def jsd(self) -> np.ndarray:
        return self._arr(lambda r: r.jsd.jsd)

    def to_dict(self) -> dict:
        return jsonable({
            "modalities": list(self.modalities), "keys": self.keys, "kv_head": self.kv_head, "layers": self.layers,
            "mmd": self.mmd, "intra_a": self.intra_a, "intra_b": self.intra_b, "p_value": self.p_value,
            "jsd": self.jsd, "n_a": [self.n_a.get(l, 0) for l in self.layers],
            "n_b": [self.n_b.get(l, 0) for l in self.layers], "settings": self.settings,
            "per_layer": {str(l): (r.to_dict() if r is not None else None) for l, r in self.results.items()},
        })

    def plot(self, layer: int | None = None, path=None, ax=None):
        """PCA scatter of one layer (default: the layer with the largest MMD); see :func:`plot_keyspace_pca`."""
        return plot_keyspace_pca(self, layer, path=path, ax=ax)


def keyspace(lens, samples, modalities: tuple[GroupSpec, GroupSpec] = ("image", "text"), keys: str = "pre_rope",
             kv_head: int | None = None, layers: Any = "all", batch_size: int = 4, dataset=None,
             max_n: int = 5000, n_components: int = 50, jsd_components: int = 10, kernel: str = "gaussian",
             n_permutations: int = 200, n_splits: int = 5, seed: int = 0, plot_points: int = 1000,
             progress: bool = True) -> KeySpaceExperimentResult:
    """Key-space analysis (docs/methods/keyspace.md, [KS]) of a model's attention keys at two modalities' positions, per layer.

    modalities: two token groups (names such as ``"image"``, ``"text"``, ``"context"``, ``"image|audio"``, or
    callables ``groups -> [batch, positions] bool``); default image vs text (every non-modality prompt token).
    keys: ``"pre_rope"`` (default, docs/methods/keyspace.md: the ``attn.k_pre`` site, the output of each layer's k_proj Linear;
    before any k-norm) or ``"post_rope"`` (the ``attn.k`` site: keys after RoPE, as attention sees them).
    kv_head: one KV head's keys (option), or None to concatenate all KV heads (default).
    Keys are pooled over samples per layer (self-attention layers only: cross-attention keys have no text
    positions; with ``keys="pre_rope"`` and ``layers="all"``, layers without their own k_proj -- KV-shared layers
    that reuse an earlier layer's keys -- are skipped and listed in ``settings["skipped_layers"]``) and passed to
    :func:`arbiter.metrics.keyspace.keyspace_analysis` with ``max_n`` (5,000), ``n_components`` (50),
    ``jsd_components`` (10), ``kernel``, ``n_permutations`` (200), ``n_splits`` (5), ``seed``.
    Returns :class:`KeySpaceExperimentResult`."""
    check_choice("keys", keys, KEY_KINDS)
    if len(modalities) != 2:
        raise DataError(f"modalities must be two token groups, got {modalities!r}.")
    samples = _conflict_list(samples)
    chosen = _self_attention_layers(lens, layers)
    skipped: dict[int, str] = {}
    if keys == "pre_rope" and isinstance(layers, str) and layers == "all":
        for layer in chosen:
            if key_projection(lens.facts.layers[layer].attn) is None:
                skipped[layer] = "no k_proj Linear (e.g. a KV-shared layer reusing an earlier layer's keys)"
        chosen = [layer for layer in chosen if layer not in skipped]
    if not chosen:
        raise SiteError("this model has no self-attention layer to read keys from"
                        + (" with a k_proj (try keys='post_rope')." if skipped else "."))
    store: dict[int, tuple[list, list]] = {}
    chunks = list(_chunks(samples, batch_size))
    for chunk in _progress(chunks, progress, len(chunks), f"key space: keys of {len(chosen)} layers"):
        batch = lens.encode(chunk, dataset=dataset)
        masks = (_mask_of(modalities[0], batch.groups), _mask_of(modalities[1], batch.groups))
        collector = _KeyCollector if keys == "post_rope" else _PreRopeKeyCollector
        with lens.probe(collector(masks, kv_head, store), layers=chosen), torch.no_grad():
            lens.model(**batch.inputs, use_cache=False)
    results: dict[int, KeySpaceResult | None] = {}
    n_a, n_b, pca2 = {}, {}, {}
    for layer in chosen:
        a_l, b_l = store.get(layer, ([], []))
        a = np.concatenate(a_l) if a_l else np.zeros((0, 1), dtype=np.float32)
        b = np.concatenate(b_l) if b_l else np.zeros((0, 1), dtype=np.float32)
        n_a[layer], n_b[layer] = int(a.shape[0]), int(b.shape[0])
        if a.shape[0] < 2 or b.shape[0] < 2:
            results[layer] = None
            continue
        results[layer] = keyspace_analysis(a, b, kernel=kernel, max_n=max_n, n_components=n_components,
                                           jsd_components=jsd_components, n_permutations=n_permutations,
                                           n_splits=n_splits, seed=seed)
        if plot_points > 0:
            rng = np.random.default_rng(seed)
            pca = pooled_pca(subsample(a, plot_points, rng), subsample(b, plot_points, rng), n_components=2)
            pca2[layer] = (pca.a.astype(np.float32), pca.b.astype(np.float32), pca.explained)
    if all(r is None for r in results.values()):
        raise GroupError(f"modalities {[_spec_name(m) for m in modalities]}: fewer than 2 key positions in some "
                         "modality at every layer; check that the samples contain both.")
    settings = {"max_n": max_n, "n_components": n_components, "jsd_components": jsd_components, "kernel": kernel,
                "n_permutations": n_permutations, "n_splits": n_splits, "seed": seed, "n_samples": len(samples),
                "skipped_layers": {str(k): v for k, v in skipped.items()}}
    return KeySpaceExperimentResult(chosen, (_spec_name(modalities[0]), _spec_name(modalities[1])), keys, kv_head,
                                    results, n_a, n_b, pca2, settings)


def plot_keyspace_pca(result: KeySpaceExperimentResult, layer: int | None = None, path=None, ax=None):
    """Scatter of the first two pooled-PCA components of the two modalities' keys at ``layer`` (default: the
    layer with the largest MMD). Saves to ``path`` when given; returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    if not result.pca2:
        raise DataError("no PCA coordinates were kept (plot_points=0, or no layer had keys of both modalities).")
    if layer is None:
        mmd = {l: result.results[l].mmd.mmd for l in result.pca2 if result.results.get(l) is not None}
        layer = max(mmd, key=mmd.get)
    if layer not in result.pca2:
        raise DataError(f"layer {layer} has no PCA coordinates; layers with them: {sorted(result.pca2)}.")
    a, b, expl = result.pca2[layer]
    fig = ax.figure if ax is not None else Figure(figsize=(5, 4.5))
    ax = ax or fig.add_subplot(111)
    ax.scatter(a[:, 0], a[:, 1] if a.shape[1] > 1 else np.zeros(len(a)), s=6, alpha=0.6, label=result.modalities[0])
    ax.scatter(b[:, 0], b[:, 1] if b.shape[1] > 1 else np.zeros(len(b)), s=6, alpha=0.6, label=result.modalities[1])
    r = result.results.get(layer)
    title = f"layer {layer} keys ({result.keys})"
    if r is not None:
        title += f": MMD {r.mmd.mmd:.3f} (intra {r.mmd.intra_a:.3f} / {r.mmd.intra_b:.3f})"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"PC1 ({100 * float(expl[0]):.1f}%)")
    if len(expl) > 1:
        ax.set_ylabel(f"PC2 ({100 * float(expl[1]):.1f}%)")
    ax.legend(fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# attention imbalance (docs/methods/imbalance.md)


@dataclass
class ImbalanceExperimentResult:
    """Attention imbalance heat map (docs/methods/imbalance.md): ``result`` is the metric's :class:`ImbalanceResult` over all samples
    (``imbalance`` [layers, heads], ``scalar``, masses, norms, ``per_sample`` [samples, layers, heads]); ``layers``
    the layer index of each heat-map row; ``modalities`` (m1, m2): imbalance > 0 means m1's output norm is larger."""

    layers: list[int]
    modalities: tuple[str, str]
    query: str
    sample_ids: list[str]
    result: ImbalanceResult

    @property
    def heat(self) -> torch.Tensor:
        return self.result.imbalance

    @property
    def scalar(self) -> float:
        return self.result.scalar

    def to_dict(self) -> dict:
        return jsonable({"layers": self.layers, "modalities": list(self.modalities), "query": self.query,
                         "n_samples": len(self.sample_ids), "sample_ids": self.sample_ids, **self.result.to_dict()})

    def plot(self, path=None, ax=None):
        return plot_imbalance(self, path=path, ax=ax)


def _query_rows(trace, site: str, groups: TokenGroups, query: str) -> list[int]:
    """For each sample, the index of its query row among the recorded rows."""
    recorded = trace.rows(site)
    if recorded is None:
        raise TraceError(f"the trace holds no recorded rows of {site}: record it with lens.record(..., rows=...).")
    pos, rmask = recorded
    q = groups[query]
    out = []
    for i in range(q.shape[0]):
        want = q[i].nonzero().flatten()
        if len(want) != 1:
            raise GroupError(f"query group {query!r} selects {len(want)} positions in sample {groups.sample_ids[i]!r}; "
                             "the imbalance needs exactly one query position per sample (e.g. 'last').")
        hit = ((pos == int(want[0])) & rmask[i]).nonzero().flatten()
        out.append(int(hit[0]))
    return out


def _imbalance_by_shape(alpha: list, v: list, W_O: list, m1, m2, **kw) -> ImbalanceResult:
    """attention_imbalance over layers whose heads may differ in width or KV sharing (sliding vs global layers):
    one call per group of layers of equal shapes, the [layers, heads] maps put back in layer order."""
    if len({a.shape[1] for a in alpha}) != 1:
        raise SiteError("the imbalance heat map needs the same number of query heads in every chosen layer; pass "
                        "layers= with layers of one head count.")
    groups: dict[tuple, list[int]] = {}
    for j, (vj, wj) in enumerate(zip(v, W_O)):
        groups.setdefault((tuple(vj.shape[1:]), tuple(wj.shape)), []).append(j)
    fields = ("imbalance", "mass_1", "mass_2", "norm_1", "norm_2")
    out = {f: None for f in fields + ("per_sample",)}
    res = None
    for idx in groups.values():
        res = attention_imbalance(torch.stack([alpha[j] for j in idx], 1), torch.stack([v[j] for j in idx], 1),
                                  torch.stack([W_O[j] for j in idx]), m1, m2, **kw)
        for f in fields + ("per_sample",):
            val = getattr(res, f)
            dim = 1 if f == "per_sample" else 0
            if out[f] is None:
                shape = list(val.shape)
                shape[dim] = len(alpha)
                out[f] = val.new_full(shape, float("nan"))
            out[f].index_copy_(dim, torch.tensor(idx), val)
    heat = out["imbalance"]
    scalar = float(heat.abs().mean()) if res.how == "log_ratio" else float((heat - 0.5).abs().mean())
    return ImbalanceResult(heat, scalar, out["mass_1"], out["mass_2"], out["norm_1"], out["norm_2"],
                           out["per_sample"], res.how, res.per_token)


def imbalance(lens, samples, modalities: tuple[GroupSpec, GroupSpec] = ("image", "context"), query: str = "last",
              how: str = "log_ratio", per_token: bool = False, eps: float = 0.0, layers: Any = "all",
              batch_size: int = 4, dataset=None, progress: bool = True) -> ImbalanceExperimentResult:
    """Attention imbalance heat map over (layer, head) (docs/methods/imbalance.md, after [MI]; proposed formulas).

    Records, per batch, the attention row of the ``query`` position (``attn.probs``, default ``last``) and the
    values (``attn.v``) of every self-attention layer, and calls
    :func:`arbiter.metrics.imbalance.attention_imbalance` with W_O = each layer's ``out_proj.weight``.
    modalities: (m1, m2) token groups (names or callables on the groups); default image vs context (``"text"`` is
    every non-modality prompt token). ``how`` (``"log_ratio"`` log(N_1/N_2), or ``"share"``), ``per_token``,
    ``eps`` as in the metric. Batches are combined exactly: the heat map is the mean of the per-sample maps, the
    masses and norms are sample-weighted means. Returns :class:`ImbalanceExperimentResult`."""
    if len(modalities) != 2:
        raise DataError(f"modalities must be two token groups, got {modalities!r}.")
    samples = _conflict_list(samples)
    chosen = _self_attention_layers(lens, layers)
    if not chosen:
        raise SiteError("this model has no self-attention layer.")
    W_O = [module_weight(lens.facts.layers[l].out_proj).to("cpu", torch.float64) for l in chosen]
    parts: list[tuple[int, ImbalanceResult]] = []
    order: list[int] = []
    chunks = _index_chunks(samples, batch_size)
    for idx in _progress(chunks, progress, len(chunks), f"imbalance: layer×head of {len(chosen)} layers"):
        chunk = [samples[k] for k in idx]
        batch = lens.encode(chunk, dataset=dataset)
        g = batch.groups
        m1, m2 = _mask_of(modalities[0], g), _mask_of(modalities[1], g)
        for name, m in ((modalities[0], m1), (modalities[1], m2)):
            empty = [g.sample_ids[i] for i in range(m.shape[0]) if not bool(m[i].any())]
            if empty:
                raise GroupError(f"modality {_spec_name(name)!r} has no token in sample(s) {empty}; the imbalance "
                                 "compares two non-empty token sets.")
        with torch.no_grad(), lens.record("attn.probs", layers=chosen, rows=query) as rp, \
                lens.record("attn.v", layers=chosen, rows="all") as rv:
            lens.model(**batch.inputs, use_cache=False)
        tp, tv = rp.trace, rv.trace
        r = _query_rows(tp, "attn.probs", g, query)
        b = len(chunk)
        alpha = [tp.site("attn.probs", l)[torch.arange(b), :, r] for l in chosen]  # per layer [b, H, K]
        v = [tv.site("attn.v", l) for l in chosen]                                  # per layer [b, KV, K, D]
        K = alpha[0].shape[-1]
        if any(x.shape[2] != K for x in v) or m1.shape[1] < K:
            raise SiteError(f"attention keys ({K}) and values / prompt positions ({m1.shape[1]}) disagree; the "
                            "imbalance needs a plain prefill forward.")
        res = _imbalance_by_shape(alpha, v, W_O, m1[:, :K], m2[:, :K], how=how, per_token=per_token, eps=eps)
        parts.append((b, res))
        order.extend(idx)
    N = sum(n for n, _ in parts)

    def wmean(get):
        return sum(n * get(r) for n, r in parts) / N
    inv = [0] * N
    for row, k in enumerate(order):
        inv[k] = row
    per_sample = torch.cat([r.per_sample for _, r in parts])[inv]  # in the order the samples were given in
    heat = per_sample.mean(dim=0)
    scalar = float(heat.abs().mean()) if how == "log_ratio" else float((heat - 0.5).abs().mean())
    total = ImbalanceResult(heat, scalar, wmean(lambda r: r.mass_1), wmean(lambda r: r.mass_2),
                            wmean(lambda r: r.norm_1), wmean(lambda r: r.norm_2), per_sample, how, per_token)
    return ImbalanceExperimentResult(chosen, (_spec_name(modalities[0]), _spec_name(modalities[1])), query,
                                     [s.id for s in samples], total)


def plot_imbalance(result: ImbalanceExperimentResult, path=None, ax=None):
    """Heat map [layers, heads] of the imbalance (diverging colours centred on balance). Returns the Figure."""
    from matplotlib.figure import Figure

    heat = result.heat.detach().cpu().numpy().astype(np.float64)
    centre = 0.0 if result.result.how == "log_ratio" else 0.5
    finite = heat[np.isfinite(heat)]
    span = float(np.max(np.abs(finite - centre))) if finite.size else 1.0
    span = span if span > 0 else 1.0
    fig = ax.figure if ax is not None else Figure(figsize=(2.0 + 0.35 * heat.shape[1], 1.5 + 0.3 * heat.shape[0]))
    ax = ax or fig.add_subplot(111)
    im = ax.imshow(heat, cmap="RdBu_r", vmin=centre - span, vmax=centre + span, aspect="auto")
    m1, m2 = result.modalities
    label = f"log(N_{m1} / N_{m2})" if result.result.how == "log_ratio" else f"N_{m1} / (N_{m1} + N_{m2})"
    fig.colorbar(im, ax=ax, label=label)
    ax.set_yticks(range(len(result.layers)), [str(l) for l in result.layers])
    ax.set_xticks(range(heat.shape[1]))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"attention imbalance {m1} vs {m2} at {result.query} (scalar {result.scalar:.3f})", fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
