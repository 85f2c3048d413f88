"""Lens: the context manager around a model; activates probes, owns every hook and restores the model on exit.

``attach(model, processor)`` is the entry point; everything model-specific comes from ``adapters``."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from einops import rearrange
from torch import nn

from . import attention as attn_fn
from . import mixers
from .adapters.base import ENCODER_FEATURE_INPUTS, ModelFacts, key_projection, model_facts
from .errors import ArbiterError, GroupError, ProbeError, SiteError, UnsupportedModelError
from .groups import TokenGroups
from .probes.base import ATTENTION_SITES, CROSS_SITES, GLOBAL_SITES, Ctx, Probe, RowSpec, callback_name
from .replay import Capture, ReplayModule, decoder_siblings, map_tensors, repeat_dim0, swap_modules


def attach(model: nn.Module, processor: Any = None, stack: str = "decoder") -> "Lens":
    """Attach arbiter to a Hugging Face model. Use as ``with arbiter.attach(model, processor) as lens:``.

    Inside, untouched layers run exactly as before (bit-identical logits); on exit every hook is removed and the
    attention implementation restored, also when the body raises. ``stack="encoder"`` attaches to an
    encoder-decoder's encoder instead (its layers, groups on its own positions; no logits site)."""
    return Lens(model, processor, stack)

# unit -> {short name: site}: a layer's own attention ("attn") and the cross-attention feeding it ("xattn")
_UNIT_SITES = {unit: {s.split(".", 1)[1]: prefix + s for s in ATTENTION_SITES} for unit, prefix in (("attn", ""),
                                                                                                    ("xattn", "x"))}


_ROUTED_SITES = frozenset(ATTENTION_SITES + CROSS_SITES)
_TRUE = torch.ones((), dtype=torch.bool)   # expanded into the all-True row mask of a forward's start (read-only)


def _spec_key(spec: RowSpec):
    """A row spec as a hashable value: a list of positions as a tuple of ints; anything else as a value equal to no
    other (its plans are not shared)."""
    if isinstance(spec, (str, int)):
        return spec
    try:
        return tuple(int(p) for p in spec)
    except (TypeError, ValueError):
        return object()


def _mask_settings(module, kwargs, cross: bool, b: int, dtype, device) -> tuple:
    """What besides the mask object and the positions decides the rows' masks a layer reads (its causality, sliding
    window, cross-attention, batch, dtype, device): part of their per-forward cache key."""
    return (kwargs.get("is_causal"), getattr(module, "is_causal", True), kwargs.get("sliding_window"), cross, b,
            dtype, device)


def _span(idx: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) of the sorted row indices ``idx`` (CPU) where they are consecutive; None where they are not, or
    where there are none."""
    n = len(idx)
    if not n:
        return None
    first, last = _ends(idx)
    return (first, first + n) if last - first == n - 1 else None


def _ends(t: torch.Tensor) -> tuple[int, int]:
    """(first, last) element of a non-empty 1D CPU tensor; a short one (the last row, a group's rows) is read at once,
    with no indexing operation dispatched per end."""
    if len(t) <= 64:
        values = t.tolist()
        return int(values[0]), int(values[-1])
    return int(t[0]), int(t[-1])


@functools.lru_cache(maxsize=64)
def _plans_for(signature: tuple) -> dict:
    """The attention plans (``_Runtime.attention_plan``) of a probe set, filled as layers ask for them and shared by
    every probe set with the same signature (which sites of which layers are served, at which steps, with which
    modes and row specs: all a plan depends on), so that entering the same probes again (a recorder per batch)
    does not rebuild them in every layer."""
    return {}


@dataclass
class _Active:
    probe: Probe
    layers: dict[str, frozenset[int]]  # site -> the layers it is served on (global sites: none)
    steps: str
    specs: dict[str, tuple[str, RowSpec]]


def _resolve_layers(spec, n_layers: int, valid: Sequence[int], who: str) -> frozenset[int]:
    if spec is None or (isinstance(spec, str) and spec == "all"):
        return frozenset(valid)
    if isinstance(spec, int):
        spec = [spec]
    out = set()
    for layer in spec:
        if not isinstance(layer, (int,)) and not (isinstance(layer, torch.Tensor) and layer.dim() == 0):
            raise SiteError(f"{who}: layers must be 'all', an int or a list of ints; got {spec!r}.")
        layer = int(layer)
        if layer < 0:
            layer += n_layers
        if not 0 <= layer < n_layers:
            raise SiteError(f"{who}: layer {layer} is out of range; this model has {n_layers} text layers "
                            f"(0..{n_layers - 1}).")
        out.add(layer)
    return frozenset(out)


class _Runtime:
    """Per-attach dispatch state: which probe reads/edits which (site, layer), current step and positions."""

    def __init__(self, lens: "Lens"):
        self.lens = lens
        self.active: list[_Active] = []
        self.table: dict[tuple[str, int | None], list[_Active]] = {}
        # (site, layer) -> the entries served at a prefill step / at a decode step (read at every call)
        self._by_step: tuple[dict, dict] = ({}, {})
        self._plans: dict = {}
        self.step = 0
        self.offset = 0          # absolute position of the first row of the current forward chunk
        self.q_len = 0
        self.batch = 0
        self.groups: TokenGroups | None = None
        # the groups of a forward that began with no probe active, built only if one is then needed (a probe
        # activated between the prefill and the decode steps of a generation): () -> TokenGroups
        self.pending_groups: Callable[[], TokenGroups] | None = None
        self._rows_cache: dict = {}
        self.mixer_inputs: dict[int, tuple] = {}   # layer -> (inputs so far, padding mask) for mixer knockouts
        # an encoder-decoder's decoder: token groups over the encoder's positions (the keys of its cross-attention)
        self.encoder_groups: TokenGroups | None = None
        self.encoder_modality: str | None = None   # every encoder position is this modality (a feature encoder)
        self.encoder_why = "the encoder has not run under this Lens yet"   # why the groups are unknown
        self.encoder_fresh = False   # the encoder ran since the decoder's last prefill
        self.embedded_ids: torch.Tensor | None = None   # the ids the input embedding last received

    # -- table -------------------------------------------------------------------------------------------
    def rebuild(self) -> None:
        self.mixer_inputs = {}   # a probe came or went: no mixer history outlives the generation it served
        table: dict[tuple[str, int | None], list[_Active]] = {}
        for a in self.active:
            for site in a.specs:
                layers = [None] if site in GLOBAL_SITES else sorted(a.layers.get(site, ()))
                for layer in layers:
                    table.setdefault((site, layer), []).append(a)
        self.table = table
        same: dict[tuple, list[_Active]] = {}

        def served(site: str, lst: list[_Active], prefill: bool) -> list[_Active]:
            # the same probes at a site's every layer: one list object (dispatch() resolves their rows once per
            # forward for all those layers)
            lst = [a for a in lst if a.steps == "all" or (a.steps == "prefill") == prefill]
            return same.setdefault((site, *map(id, lst)), lst)
        self._by_step = tuple({key: served(key[0], lst, prefill) for key, lst in table.items()}
                              for prefill in (False, True))
        self._plans = _plans_for(tuple(
            (key, tuple((a.steps, a.specs[key[0]][0], _spec_key(a.specs[key[0]][1])) for a in lst))
            for key, lst in table.items() if key[0] in _ROUTED_SITES))

    def attention_plan(self, unit: str, layer: int) -> tuple[dict, dict, bool, tuple] | None:
        """(site names, which sites have probes, whether scores / probs are edited, the row specs of the score /
        probability probes) of a routed attention call at the current step, None where no probe is on it; built
        once per probe set."""
        key = (unit, layer, self.step == 0)
        if key not in self._plans:
            site = _UNIT_SITES[unit]
            served = self._by_step[key[2]]   # what entries() reads, looked up directly (once per probe set)
            has = {s: bool(served.get((name, layer))) for s, name in site.items()}
            on_rows = [a.specs[site[s]] for s in ("scores", "probs") for a in served.get((site[s], layer), ())]
            eager = any(mode == "edit" for mode, _ in on_rows)
            reads = tuple(spec if isinstance(spec, (str, int)) else tuple(spec) for _, spec in on_rows)
            self._plans[key] = (site, has, eager, reads) if any(has.values()) else None
        return self._plans[key]

    def entries(self, site: str, layer: int | None) -> list[_Active]:
        """The probes served at (site, layer) at the current step (prefill or decode)."""
        return self._by_step[self.step == 0].get((site, layer), [])

    # -- positions ---------------------------------------------------------------------------------------
    def chunk_positions(self, n: int | None = None) -> torch.Tensor:
        """The absolute positions of this chunk's rows (the last ``n``), one tensor per forward (never edited)."""
        n = self.q_len if n is None else n
        return self.positions_range(self.offset, self.offset + n)

    def positions_range(self, start: int, stop: int) -> torch.Tensor:
        """``torch.arange(start, stop)``, built once per forward (never edited)."""
        key = ("positions", start, stop)
        hit = self._rows_cache.get(key)
        if hit is None:
            hit = self._rows_cache[key] = torch.arange(start, stop)
            self._rows_cache[("range", id(hit))] = (hit, (start, stop))
        return hit

    def position_span(self, positions: torch.Tensor) -> tuple[int, int]:
        """(first, last + 1) of sorted positions (a forward's rows or keys, a union of rows): known without reading
        the tensor where it came from :meth:`positions_range`."""
        hit = self._rows_cache.get(("range", id(positions)))
        if hit is not None and hit[0] is positions:
            return hit[1]
        if not len(positions):
            return 0, 0
        first, last = _ends(positions)
        return first, last + 1

    def per_forward(self, name: str, anchors: tuple, build: Callable[[], Any], *extra,
                    keep: Callable[[Any], bool] | None = None) -> Any:
        """``build()``, once per forward for these ``anchors`` (tensors the forward shares: positions, rows, masks)
        and ``extra`` (hashable settings). The entry holds the anchors, so their ids cannot be reused by other tensors
        while it lives, and a hit is checked to be the very same objects: never another tensor's result. ``keep``:
        whether to keep a result (default: always; large ones may be rebuilt instead of held for the forward)."""
        key = (name, *extra, *map(id, anchors))
        hit = self._rows_cache.get(key)
        if hit is not None:
            for x, y in zip(hit[0], anchors):
                if x is not y:
                    break
            else:
                return hit[1]
        out = build()
        if keep is None or keep(out):
            self._rows_cache[key] = (anchors, out)
        return out

    def resolve_rows(self, spec: RowSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [R], row_mask [b, R]) of the requested rows among ``positions``."""
        spec_key = spec if isinstance(spec, (str, int)) else tuple(spec)
        return self.per_forward("rows", (positions,), lambda: self._resolve_rows(spec, positions), spec_key)

    def _resolve_rows(self, spec: RowSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch
        if isinstance(spec, str) and spec == "all":
            out = (positions, torch.ones(b, len(positions), dtype=torch.bool))
        elif isinstance(spec, str):
            g = self.groups
            # positions are sorted and distinct (a forward's rows or keys, a union of rows): consecutive ones (the
            # usual case) are a slice of the group's mask, a view, no gather
            start, stop = self.position_span(positions)
            sub = g.window(spec, start, stop) if stop - start == len(positions) else \
                g.mask(spec, length=max(g.length, stop))[:, positions]
            if sub.shape[0] == 1 and b > 1:
                sub = sub.expand(b, -1)
            cols = sub.any(dim=0)
            out = (positions[cols], sub[:, cols])
        else:
            want = torch.as_tensor([spec] if isinstance(spec, int) else list(spec), dtype=torch.long)
            want = torch.where(want < 0, want + self.groups.prompt_length, want)
            sel = torch.isin(positions, want)
            out = (positions[sel], torch.ones(b, int(sel.sum()), dtype=torch.bool))
        return out

    def encoder_key_mask(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        """[batch, keys] mask of group ``name`` over the encoder positions a cross-attention reads."""
        g = self.encoder_groups
        if g is None and self.encoder_modality is not None:   # every position is one modality, whatever its length
            n = int(positions.max()) + 1 if len(positions) else 0
            every = torch.ones(max(self.batch, 1), n, dtype=torch.bool)
            g = TokenGroups({m: (every if m == self.encoder_modality else torch.zeros_like(every))
                             for m in ("image", "video", "audio", "text", "pad")})
        if g is None:
            raise GroupError(f"group {name!r} over the encoder's positions (the keys of the decoder's "
                             f"cross-attention): arbiter cannot place them in token groups here ({self.encoder_why}). "
                             "Run the model on its own inputs (input_ids with the modality placeholders, or the "
                             "modality features), not on encoder_outputs computed outside the Lens.")
        if g.batch_size not in (1, self.batch):
            raise GroupError(f"the encoder's token groups are for a batch of {g.batch_size} but the decoder runs a "
                             f"batch of {self.batch} (beam search or expanded encoder outputs?); run a batch of "
                             "one row per sample.")
        parts = [p.strip() for p in name.split("|")]
        unknown = [p for p in parts if p not in g and p not in ("last", "generated", "all")]
        if unknown and not all(self.groups is not None and p in self.groups for p in unknown):
            g[unknown[0]]   # raises GroupError naming the groups there are
        n = max(int(positions.max()) + 1 if len(positions) else 0, g.length)
        m = torch.zeros(g.batch_size, n, dtype=torch.bool)
        for p in parts:
            if p in g:
                m |= g.mask(p, length=n)
        if m.shape[0] == 1 and self.batch > 1:
            m = m.expand(self.batch, -1)
        return m[:, positions.cpu()]

    def decoder_key_mask(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        """[batch, keys] mask of group ``name`` over the decoder's own positions, for a name that may exist only
        over the encoder's positions (an encoder-decoder's ``image``): no decoder position is in it."""
        g = self.groups
        length = int(max(int(positions.max()) + 1 if len(positions) else 0, g.length))
        enc = self.encoder_groups
        m = torch.zeros(g.batch_size, length, dtype=torch.bool)
        for p in (p.strip() for p in name.split("|")):
            if p in g or enc is None or p not in enc:
                m |= g.mask(p, length=length)   # raises GroupError for a name neither stack has
        return m[:, positions.cpu()]

    def to_device(self, t: torch.Tensor, device, *anchors) -> torch.Tensor:
        """``t``, a tensor arbiter built on the CPU (rows, group masks), on ``device``: copied once per forward and,
        on an accelerator, from pinned memory without making the host wait for the device (a blocking copy from
        pageable memory synchronises the stream). ``t`` is derived from ``anchors`` (tensors this forward shares;
        default ``t`` itself) and, while they live, is the same: the cache holds them, so their ids stay unique."""
        device = torch.device(device)
        if t.device == device:
            return t

        def copy():
            src = t.pin_memory() if device.type == "cuda" and t.device.type == "cpu" else t
            return src.to(device, non_blocking=src.is_pinned()), src   # the pinned source lives as long as the copy
        return self.per_forward("on_device", (*(anchors or (t,)),), copy, str(device))[0]

    def ctx(self, site, layer, positions, row_mask, **kw) -> Ctx:
        return Ctx(lens=self.lens, site=site, layer=layer, step=self.step, groups=self.groups,
                   positions=positions, row_mask=row_mask, **kw)

    # -- dispatch on a [b, seq, ...]-like tensor along ``dim`` -------------------------------------------
    def run_site(self, site: str, layer: int | None, value: torch.Tensor, dim: int,
                 positions: torch.Tensor, **ctx_kw) -> torch.Tensor:
        entries = self.entries(site, layer)
        if not entries:
            return value
        for probe, callback, edit, rows, row_mask, idx in self.dispatch(site, entries, positions, value.device):
            part = value if idx is None else value.index_select(dim, idx)
            ctx = self.ctx(site, layer, rows, row_mask, **ctx_kw)
            try:
                out = callback(ctx, part)
            except ArbiterError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised with the probe and site named
                raise self.probe_error(probe, site, ctx, e) from e
            if edit:
                out = self.check_edit(probe, site, layer, part, out)
                value = out if idx is None else value.index_copy(dim, idx, out.to(value.dtype))
        return value

    def dispatch(self, site: str, entries: list[_Active], positions: torch.Tensor, device) -> tuple:
        """(probe, its callback, whether it edits, its rows' positions, row mask, their indices among ``positions`` on
        ``device`` or None for all of them) of each probe ``entries`` serves at ``site`` with rows among
        ``positions``; a probe none of whose rows is there is left out. The same in every layer whose probes are the
        same (``rebuild`` makes their entry lists one object): built once per forward."""
        def build():
            out = []
            for a in entries:
                mode, spec = a.specs[site]
                rows, row_mask = self.resolve_rows(spec, positions)
                if rows.shape[0] == 0:
                    continue
                # the rows' indices among ``positions`` (sorted, not always consecutive: the union of several
                # readers' rows, the rows a row-sliced mask edit recomputes)
                idx = None if rows.shape[0] == positions.shape[0] else \
                    self.to_device(torch.searchsorted(positions, rows), device)
                out.append((a.probe, getattr(a.probe, callback_name(site)), mode == "edit", rows, row_mask, idx))
            return tuple(out)
        return self.per_forward("dispatch", (entries, positions), build, site, device)

    @staticmethod
    def probe_error(probe: Probe, site: str, ctx: Ctx, e: Exception) -> ProbeError:
        return ProbeError(f"probe {probe!r} raised {type(e).__name__} at site {site!r}, layer {ctx.layer}, "
                          f"step {ctx.step}: {e}. The model was left untouched by arbiter.")

    @staticmethod
    def check_edit(probe, site, layer, before, after):
        if not isinstance(after, torch.Tensor):
            raise ProbeError(f"probe {probe!r} edits {site!r} (layer {layer}) but returned "
                             f"{type(after).__name__}; an editing callback must return the new tensor.")
        if site in ("attn.mask", "xattn.mask"):
            try:
                if after.shape != before.shape:   # (the check is costly per layer; equal shapes need none)
                    torch.broadcast_shapes(after.shape, before.shape)
            except RuntimeError:
                raise ProbeError(f"probe {probe!r} returned an attn.mask of shape {tuple(after.shape)} at layer "
                                 f"{layer}; expected one broadcastable with {tuple(before.shape)}.") from None
            return after.to(torch.bool)
        if after.shape != before.shape:
            raise ProbeError(f"probe {probe!r} returned shape {tuple(after.shape)} for {site!r} at layer {layer}; "
                             f"expected {tuple(before.shape)} (same shape as the value it received).")
        if after.device != before.device:
            raise ProbeError(f"probe {probe!r} returned a tensor on {after.device} for {site!r} at layer {layer}; "
                             f"the value it received is on {before.device}: return the edit there.")
        # an edit computed in another precision (an fp32 vector added to a bf16 model) runs on in the model's
        # precision, as the rows of a partial edit always did
        return after.to(before.dtype)

    # -- attention -----------------------------------------------------------------------------------------
    def attention(self, layer, module, base, kind, query, key, value, attention_mask, kwargs, unit="attn"):
        """One routed attention call of ``layer``; ``unit`` is "attn" (the layer's mixer) or "xattn" (the
        cross-attention feeding it, served on CROSS_SITES)."""
        plan = self.attention_plan(unit, layer)
        if plan is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        site, has, eager, reads = plan
        cross = unit == "xattn" or self.lens.facts.layers[layer].cross
        b, _, q_len, _ = query.shape
        k_len = key.shape[2]
        if not cross and k_len > self.offset + q_len:
            raise SiteError(f"layer {layer}: {type(module).__name__} attends over {k_len} keys while the sequence has "
                            f"{self.offset + q_len} positions, so its keys mix in another sequence (merged self- and "
                            "cross-attention); arbiter cannot place those keys in token groups, so attention sites "
                            "are not served on this layer.")
        q_pos = self.chunk_positions(q_len)
        k_pos = self.positions_range(0, k_len) if cross else \
            self.positions_range(self.offset + q_len - k_len, self.offset + q_len)
        new_k = k_pos if cross else q_pos
        kw = dict(query_positions=q_pos, key_positions=k_pos, cross=cross, unit=unit)
        if has["q"]:
            query = self.run_site(site["q"], layer, query, 2, q_pos, **kw)
        for name, t in (("k", "key"), ("v", "value")):
            if has[name]:
                cur = key if t == "key" else value
                start = k_len - new_k.shape[0]
                if start == 0:
                    cur = self.run_site(site[name], layer, cur, 2, new_k, **kw)
                else:
                    tail = self.run_site(site[name], layer, cur[:, :, start:], 2, new_k, **kw)
                    cur = torch.cat([cur[:, :, :start], tail], dim=2)
                key, value = (cur, value) if t == "key" else (key, cur)
        if eager:   # scores or probabilities edited: the kernel on every row, the rows the probes name recomputed
            return self.recompute_edited(layer, module, base, query, key, value, attention_mask, kwargs, q_pos, kw,
                                         site, has, reads, cross)
        if has["mask"]:
            mask_rows = self.mask_edit_rows(layer, site, q_pos, kw)
            if mask_rows is not None and attn_fn.row_kwargs(kwargs, q_pos[:1], q_len, key.shape[2]) is not None:
                read = has["scores"] or has["probs"]   # readers beside: their rows too (a few, or the whole layer)
                rows = self.edit_rows(q_pos, reads, mask_rows) if read else (None, mask_rows[1])
                if rows is not None:
                    return self.row_sliced(layer, module, base, kind, query, key, value, attention_mask, kwargs, q_pos,
                                           kw, site, (mask_rows[0], rows[1]), cross, reads if read else ())
        # a read alone (no mask edit) builds its rows' masks itself, once per forward
        mask_b = mask_f = None
        edited = shared = False
        empty = None
        if has["mask"]:
            mask_b, mask_f, edited, empty, shared = self.whole_mask(layer, module, site, attention_mask, kwargs, b,
                                                                    q_pos, k_pos, kw, query.dtype, query.device)
        ran = None   # the kernel's result, where it had to run first
        if has["probs"] and not edited and kind == "eager" and attn_fn.fuses_output(kwargs):
            # the eager kernel computes every row's probabilities itself: readers take their rows from its weights
            ran = base(module, query, key, value, attention_mask, **kwargs)
            if ran[1] is not None and tuple(ran[1].shape[-2:]) == (q_len, k_len):
                self.read_rows(layer, module, query, key, value, mask_b, mask_f, kwargs, q_pos, kw, site, reads,
                               empty, attention_mask, shared, weights=ran[1])
                return ran
        # rows are read before the kernel runs, while the layer's keys are still in the cache (measured on a CPU,
        # hidden 64, 624 tokens: 0.36 ms per layer before the kernel, 0.70 after it)
        fused = None   # an edited call whose every row is read (a decode step): output and probabilities at once
        if has["scores"] or has["probs"]:
            fused = self.read_rows(layer, module, query, key, value, mask_b, mask_f, kwargs, q_pos, kw, site, reads,
                                   empty, attention_mask, shared, output=edited and attn_fn.fuses_output(kwargs))
        if fused is not None:   # (probabilities returned as weights where the kernel is eager, as it would)
            out = (fused[0], fused[1] if kind == "eager" else None)
        elif edited:   # (a mask edited once per forward made additive once too)
            out = attn_fn.masked_attention(kind, base, module, query, key, value, mask_b, mask_f, kwargs,
                                           self.additive_mask(mask_b, mask_f, query.dtype) if shared else None)
        else:
            out = ran if ran is not None else base(module, query, key, value, attention_mask, **kwargs)
        if empty is not None:   # cross-attention rows left with no key: output zero (no wait on the device)
            o = out[0]  # [b, q, h, d]
            keep = (~empty).transpose(1, 2)[..., None].to(o.dtype)  # [b, q, h|1, 1]
            out = (o * keep, out[1])
        return out

    def whole_mask(self, layer, module, site, attention_mask, kwargs, b, q_pos, k_pos, kw, dtype, device) -> tuple:
        """The mask of every row of the call, as the attn.mask editors leave it: (bool mask, the model's float values
        or None, edited, empty rows (see edit_mask), shared). ``shared``: edited once per forward and reused by every
        layer with the same mask, layer kind and head count, where the call has few rows (a decode step) and its
        editors' edit is the same in every layer (``Probe.mask_edit_per_forward``)."""
        cross = kw["cross"]

        def edit():
            m_b, m_f = attn_fn.bool_mask(attention_mask, module, kwargs, b, q_pos, k_pos, cross, device)
            if attention_mask is not None and \
                    m_b.untyped_storage().data_ptr() == attention_mask.untyped_storage().data_ptr():
                m_b = m_b.clone()   # the model's own mask, which every layer reads: editors get a copy
            return (*self.edit_mask(layer, site, m_b, q_pos, k_pos, kw, cross), m_f)
        (m_b, edited, empty, m_f), shared = self.edit_once(
            "whole_mask_edit", layer, site, kw, q_pos.shape[0], (attention_mask, q_pos, k_pos), edit,
            *_mask_settings(module, kwargs, cross, b, dtype, device))
        return m_b, m_f, edited, empty, shared

    def edit_once(self, name: str, layer: int, site: dict, kw: dict, n_rows: int, anchors: tuple,
                  build: Callable[[], Any], *extra) -> tuple[Any, bool]:
        """(``build()``: an edit by the layer's attn.mask editors of a mask of ``n_rows`` rows, shared): made once per
        forward (:meth:`per_forward` on ``anchors`` and ``extra``) and reused by every layer with the same editors,
        head count, attention unit (and cross-attention layer), where the mask has few rows (``KEPT_MASK_ROWS``) and
        every editor's edit is the same in every layer (``Probe.mask_edit_per_forward``); else made in this layer."""
        entries = self.entries(site["mask"], layer)
        if n_rows > self.KEPT_MASK_ROWS or not all(a.probe.mask_edit_per_forward for a in entries):
            return build(), False
        cross = kw["cross"]
        return self.per_forward(name, (*anchors, *(a.probe for a in entries)), build, self.lens.facts.heads(layer),
                                cross, layer if cross else None, kw["unit"], *extra), True

    def edit_mask(self, layer, site, mask_b, q_pos, k_pos, kw, cross):
        """The attn.mask editors' mask for the rows at ``q_pos``: (mask, edited, empty). A self-attention row left
        with no key keeps its own position (never NaN); a cross-attention row left with none is marked in
        ``empty`` [b, h|1, rows] (its output is zeroed) and keeps every key meanwhile."""
        # an editor may also write into the mask it is handed: the tensor's version counter says so, or (inference
        # tensors keep none) a comparison with a copy taken before, for editors that do not declare they never do
        # (``Probe.writes_masks_in_place``: the comparison makes the host wait on an accelerator)
        before, version = mask_b, _version(mask_b)
        compare = version is None and any(a.probe.writes_masks_in_place for a in self.entries(site["mask"], layer))
        snapshot = mask_b.clone() if compare else None
        mask_b = self.run_site(site["mask"], layer, mask_b, 2, q_pos, **kw)
        if mask_b is before and (_version(mask_b) == version if version is not None
                                 else not compare or torch.equal(mask_b, snapshot)):
            return mask_b, False, None
        if mask_b.shape != before.shape:
            mask_b = mask_b.expand(torch.broadcast_shapes(mask_b.shape, before.shape))
        if cross:
            empty = ~mask_b.any(dim=-1)
            return mask_b | empty[..., None], True, empty
        mask_b, _ = attn_fn.protect_empty_rows(mask_b, q_pos.to(mask_b.device), k_pos.to(mask_b.device))
        return mask_b, True, None

    ROW_SLICE_SHARE = 0.25   # mask edits on at most this share of a call's query rows recompute only those rows
    KEPT_MASK_ROWS = 64      # the masks of at most this many rows are kept for the forward (built once, reused)

    def mask_edit_rows(self, layer: int, site: dict, q_pos: torch.Tensor, kw: dict) -> tuple | None:
        """The only rows the layer's attn.mask editors can change, as ([batch, rows] bool over the call's rows, the
        indices of the rows any sample has), when every editor names them (``Probe.attn_mask_rows``) and they are at
        most ``ROW_SLICE_SHARE`` of the call's rows (none, in a one-row call: a decode step whose row the editors
        leave alone runs the kernel alone); None: the whole layer is recomputed with the edited mask."""
        entries = self.entries(site["mask"], layer)
        # editors whose rows do not depend on the layer (a knockout: its destination) are asked once per forward
        if all(getattr(a.probe, "mask_rows_per_forward", False) for a in entries):
            return self.per_forward("mask_rows", (q_pos, *(a.probe for a in entries)),
                                    lambda: self._mask_edit_rows(entries, layer, site, q_pos, kw))
        return self._mask_edit_rows(entries, layer, site, q_pos, kw)

    def _mask_edit_rows(self, entries, layer, site, q_pos, kw) -> tuple | None:
        union = None
        for a in entries:
            ctx = self.ctx(site["mask"], layer, q_pos, torch.ones(self.batch, len(q_pos), dtype=torch.bool), **kw)
            rows = a.probe.attn_mask_rows(ctx)
            if rows is None:
                return None
            union = rows if union is None else union | rows
        if union is None:
            return None
        rows = union.any(dim=0).nonzero().flatten()
        if len(rows) > self.ROW_SLICE_SHARE * len(q_pos):
            return None
        return (union.expand(self.batch, -1) if union.shape[0] == 1 else union), rows

    def row_sliced(self, layer, module, base, kind, query, key, value, attention_mask, kwargs, q_pos, kw, site,
                   rows: tuple, cross: bool, reads: tuple = ()):
        """The layer's own kernel on every row, then the rows an attn.mask edit can change recomputed alone with
        the edited mask: other rows bit-identical to the untouched layer, flash kernels kept. ``rows``: ([b, q] bool:
        the (sample, row) pairs the edit can change, [n] indices: those rows and the rows of the layer's score /
        probability readers, whose row specs ``reads`` holds; they read the edited mask's rows)."""
        out = base(module, query, key, value, attention_mask, **kwargs)
        which, rows = rows    # [b, q]: the (sample, row) pairs the edit can change; [n]: the rows among them
        if rows.shape[0] == 0:
            return out
        dev = query.device
        rows_d = self.to_device(rows, dev)
        b = query.shape[0]
        k_pos = kw["key_positions"]
        row_pos = self.per_forward("row_positions", (q_pos, rows), lambda: q_pos[rows])
        mask_b, mask_f, _ = self.read_masks(module, attention_mask, kwargs, b, q_pos, k_pos, row_pos, rows_d, cross,
                                            query.dtype, dev)
        # the rows' mask is built once per forward (read_masks); each layer's editors get a copy they may write into,
        # or edit it once per forward where they may (edit_once; the mask read_masks keeps holds its settings)
        (mask_b, edited, empty), shared = self.edit_once(
            "mask_edit", layer, site, kw, row_pos.shape[0], (mask_b, row_pos),
            lambda: self.edit_mask(layer, site, mask_b.clone(), row_pos, k_pos, kw, cross))
        # the rows' queries: gathered contiguous where readers' scores multiply them too (a strided view would be
        # copied there), else a view where the rows are consecutive (the kernel takes them strided)
        q_rows = query.index_select(2, rows_d) if reads else self.row_queries(query, rows, rows_d) if edited else None
        sub = None
        # the edited mask made additive (for the readers' eager function, for the kernel recomputing the rows): once
        # per forward where shared
        additive = self.additive_mask(mask_b, mask_f, query.dtype) if shared and (reads or edited) else None
        if reads:
            # rows edited and read: their output comes from the readers' eager call (one computation, not two)
            sub = self.serve_reads(layer, module, q_rows, key, value, mask_b, mask_f, additive, kwargs, row_pos, rows,
                                   q_pos.shape[0], kw, site, empty[..., None] if empty is not None else None,
                                   output=edited and attn_fn.fuses_output(kwargs))
        if not edited:
            return out
        if sub is None:
            sub = attn_fn.masked_attention(kind, base, module, q_rows, key, value, mask_b, mask_f,
                                           attn_fn.row_kwargs(kwargs, rows, q_pos.shape[0], key.shape[2]), additive)
        # [b, 1, n]: the rows each sample's edit changes (the others keep the kernel's); None: every sample's
        take = self.per_forward("row_take", (which, rows),
                                lambda: None if bool(which[:, rows].all()) else
                                self.to_device(which[:, rows], dev)[:, None], str(dev))
        return attn_fn.merge_rows(out, rows_d, sub[0], sub[1], take, empty)

    def additive_mask(self, mask_b: torch.Tensor, mask_f: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """``float_mask(mask_b, mask_f, dtype)``, once per forward for these mask objects (an edit the layers
        share)."""
        return self.per_forward("additive", (mask_b, mask_f), lambda: attn_fn.float_mask(mask_b, mask_f, dtype), dtype)

    def row_queries(self, query: torch.Tensor, rows: torch.Tensor, rows_d: torch.Tensor) -> torch.Tensor:
        """The queries of the rows at indices ``rows`` (CPU; ``rows_d``: on the query's device): a view where they are
        consecutive (the last row, a group's run), else a gather."""
        span = self.per_forward("row_span", (rows,), lambda: _span(rows))
        return query[:, :, span[0]:span[1]] if span is not None else query.index_select(2, rows_d)

    def _rows_union(self, q_pos, specs: tuple, device) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """(positions, indices among ``q_pos`` on ``device``, (start, stop) when the indices are consecutive) of the
        rows asked for by ``specs`` (the row specs of a layer's score / probability readers). The same union recurs
        in every layer of a forward: built once per forward."""
        def build():
            if any(isinstance(s, str) and s == "all" for s in specs):
                rows = q_pos
            elif len(set(specs)) == 1:   # one reader's rows (or several readers of the same rows)
                rows, row_mask = self.resolve_rows(specs[0], q_pos)
                # its readers resolve their spec again over these rows: the same rows and mask
                self.per_forward("rows", (rows,), lambda: (rows, row_mask), specs[0])
            else:   # each reader's rows are sorted positions: their union, sorted, without Python lists
                rows = torch.unique(torch.cat([self.resolve_rows(s, q_pos)[0] for s in specs]))
            idx = (rows - self.position_span(q_pos)[0]) if len(rows) else rows
            return rows, self.to_device(idx, device), _span(idx)
        return self.per_forward("rows_union", (q_pos,), build, specs, device)

    def read_masks(self, module, attention_mask, kwargs, b, q_pos, k_pos, rows, idx, cross, dtype, device):
        """(bool, float values or None, additive) masks of the rows at positions ``rows`` (``idx`` among the call's)
        of the model's own unedited mask. Every layer of a forward that receives the same mask object reads the same
        rows: built once per forward (the cache entry holds the mask object, so it can never match another mask)."""
        def build():
            if attention_mask is None or attention_mask.dim() == 2:   # rebuilt from positions: the rows alone
                mb, mf = attn_fn.bool_mask(attention_mask, module, kwargs, b, rows, k_pos, cross, device)
            else:
                mb, mf = attn_fn.bool_mask(attention_mask, module, kwargs, b, q_pos, k_pos, cross, device)
                mb, mf = mb.index_select(2, idx), (mf.index_select(2, idx) if mf is not None else None)
            return mb, mf, attn_fn.float_mask(mb, mf, dtype)
        if rows.shape[0] > self.KEPT_MASK_ROWS:   # many rows: not kept for the next layer (memory)
            return build()
        # rows, q_pos and k_pos are tensors this forward shares; the mask object is the model's for this forward
        return self.per_forward("read_masks", (attention_mask, q_pos, k_pos, rows), build,
                                *_mask_settings(module, kwargs, cross, b, dtype, device))

    def unedited_rows(self, module, attention_mask, kwargs, query, q_pos, kw, reads) -> tuple:
        """(rows, their indices, span, bool mask, float mask, additive mask) of the rows ``reads`` asks for, under the
        model's own unedited mask (masks None where no row is asked for). The same in every layer of a forward that
        receives the same mask: one cache lookup per layer (masks of many rows are not kept, as in read_masks)."""
        def build():
            rows, idx, span = self._rows_union(q_pos, reads, query.device)
            if rows.shape[0] == 0:
                return rows, idx, span, None, None, None
            return (rows, idx, span, *self.read_masks(module, attention_mask, kwargs, query.shape[0], q_pos,
                                                      kw["key_positions"], rows, idx, kw["cross"], query.dtype,
                                                      query.device))
        return self.per_forward("unedited_rows", (attention_mask, q_pos, kw["key_positions"]), build, reads,
                                *_mask_settings(module, kwargs, kw["cross"], query.shape[0], query.dtype,
                                                query.device),
                                keep=lambda out: out[0].shape[0] <= self.KEPT_MASK_ROWS)

    def read_rows(self, layer, module, query, key, value, mask_b, mask_f, kwargs, q_pos, kw, site, reads,
                  empty=None, attention_mask=None, shared=False, output=False,
                  weights: torch.Tensor | None = None) -> tuple | None:
        """Hand the requested rows' scores / probabilities to the layer's readers (``reads``: their row specs);
        ``mask_b`` None: the model's own mask, unedited (read from ``attention_mask``); ``shared``: ``mask_b`` is the
        forward's, edited once for every layer (its rows are then cut once too). ``output``: where the rows read are
        every row of the call, return the call's (output, probabilities) from the readers' eager call (None where
        they are not, or no probability reader is on the layer). ``weights``: the probabilities of every row, as the
        layer's eager kernel returned them with the mask the readers read; their rows are handed over as they are."""
        if mask_b is None:
            rows, idx, span, mb, mf, additive = self.unedited_rows(module, attention_mask, kwargs, query, q_pos, kw,
                                                                   reads)
            if rows.shape[0] == 0:
                return None
        else:
            rows, idx, span = self._rows_union(q_pos, reads, query.device)
            if rows.shape[0] == 0:
                return None

            def cut():
                m_b = mask_b.index_select(2, idx)
                m_f = mask_f.index_select(2, idx) if mask_f is not None else None
                return m_b, m_f, (attn_fn.float_mask(m_b, m_f, query.dtype) if shared else None)
            mb, mf, additive = self.per_forward("edited_rows", (mask_b, mask_f, idx), cut, query.dtype) if shared \
                else cut()
        # consecutive rows (the last, a group's run): a view of the queries, no gather
        q_rows = query[:, :, span[0]:span[1]] if span is not None else query.index_select(2, idx)
        cut = empty.index_select(2, idx)[..., None] if empty is not None else None
        given = None if weights is None else \
            weights[:, :, span[0]:span[1]] if span is not None else weights.index_select(2, idx)
        return self.serve_reads(layer, module, q_rows, key, value, mb, mf, additive, kwargs, rows, idx,
                                q_pos.shape[0], kw, site, cut, output=output and rows.shape[0] == q_pos.shape[0],
                                probs=given)

    def serve_reads(self, layer, module, q_rows, key, value, mb, mf, additive, kwargs, rows, idx, q_len, kw, site,
                    cut, output=False, probs: torch.Tensor | None = None) -> tuple | None:
        """Hand the scores / probabilities of the rows at positions ``rows`` (``idx``: their indices among the call's
        ``q_len``; ``q_rows``: their queries; ``mb`` / ``mf`` / ``additive``: their masks; ``cut`` [b, h|1, rows, 1]:
        cross-attention rows left with no key, or None) to the layer's readers. ``output``: return the rows'
        (output, probabilities) from the same eager call (:func:`~arbiter.attention.row_attention`; None where no
        probability reader is on the layer), for rows an edit recomputes. ``probs``: the rows' probabilities, already
        computed by the layer's eager kernel."""
        scored, read = self.entries(site["scores"], layer), self.entries(site["probs"], layer)
        key = attn_fn.plain_keys(key, q_rows) if scored or (read and probs is None) else key   # (kernel's rows: none)
        if scored:
            scores = attn_fn.row_scores(module, q_rows, key, mb, mf, kwargs)
            if cut is not None:   # a cross-attention row with every key severed: every score masked
                scores = scores.masked_fill(cut, torch.finfo(scores.dtype).min)
            self.run_site(site["scores"], layer, scores, 2, rows, **kw)
        if read and probs is not None:
            self.run_site(site["probs"], layer, probs, 2, rows, **kw)
        elif read:
            rkw = kwargs if rows.shape[0] == q_len else attn_fn.row_kwargs(kwargs, idx, q_len, key.shape[2])
            if rkw is None:
                raise SiteError(f"layer {layer}: {type(module).__name__}'s attention receives per-query tensors "
                                f"({', '.join(attn_fn.score_terms(kwargs))}) arbiter cannot cut to the requested "
                                "rows; record attn.probs with rows='all' on this layer.")
            if output:
                fused = attn_fn.row_attention(module, q_rows, key, value, mb, mf, rkw, additive)
                probs = fused[1]
            else:
                fused, probs = None, attn_fn.row_probs(module, q_rows, key, value, mb, mf, rkw, additive)
            if cut is not None:   # ... and no attention at all: the row's output is zero
                probs = probs.masked_fill(cut, 0.0)
            self.run_site(site["probs"], layer, probs, 2, rows, **kw)
            return fused
        return None

    def recompute_edited(self, layer, module, base, query, key, value, attention_mask, kwargs, q_pos, kw, site, has,
                         reads, cross):
        """A layer whose attn.scores or attn.probs are edited: the layer's own kernel on every row, then the rows its
        score / probability probes and mask editors name recomputed from their scores (every row where those are more
        than ``ROW_SLICE_SHARE`` of the call's, or a mask editor does not name its rows). A (sample, head, row) whose
        mask, scores and probabilities came back unchanged keeps the kernel's output, bit for bit."""
        attn_fn.check_score_edit(module, layer)
        out = base(module, query, key, value, attention_mask, **kwargs)
        rows = self.recompute_rows(layer, site, q_pos, kw, has, reads)
        dev, b, k_pos = query.device, query.shape[0], kw["key_positions"]
        if rows is None:   # every row
            row_pos, idx, q_rows = q_pos, None, query
            mask_b, mask_f = attn_fn.bool_mask(attention_mask, module, kwargs, b, q_pos, k_pos, cross, dev)
        else:
            row_pos, idx = rows
            if row_pos.shape[0] == 0:
                return out
            idx = self.to_device(idx, dev)
            q_rows = query.index_select(2, idx)
            mask_b, mask_f, _ = self.read_masks(module, attention_mask, kwargs, b, q_pos, k_pos, row_pos, idx, cross,
                                                query.dtype, dev)
        changed = empty = None   # changed: [b, h|1, rows], where the mask, scores or probabilities were edited
        if has["mask"]:
            edited_b, edited, empty = self.edit_mask(layer, site, mask_b.clone(), row_pos, k_pos, kw, cross)
            if edited:
                changed, mask_b = (edited_b != mask_b).any(-1), edited_b
        scores = attn_fn.row_scores(module, q_rows, attn_fn.plain_keys(key, query), mask_b, mask_f, kwargs)
        cut = empty[..., None] if empty is not None else None
        if cut is not None:   # a cross-attention row with every key severed: every score masked, no attention
            scores = scores.masked_fill(cut, torch.finfo(scores.dtype).min)
        if has["scores"]:
            scores, changed = self.run_edited(site["scores"], layer, scores, row_pos, kw, changed)
        probs = attn_fn.softmax_probs(scores, query.dtype)
        if cut is not None:
            probs = probs.masked_fill(cut, 0.0)
        if has["probs"]:
            probs, changed = self.run_edited(site["probs"], layer, probs, row_pos, kw, changed)
        if changed is None:   # every editor gave back what it received
            return out
        # an eager kernel's weights take the edited rows' probabilities too
        return attn_fn.merge_rows(out, idx, attn_fn.eager_output(probs, value), probs, changed, empty)

    def recompute_rows(self, layer, site, q_pos, kw, has, reads) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positions, indices among the call's rows) of the rows an edit of scores or probabilities recomputes: those
        the layer's score / probability probes (``reads``: their row specs) and mask editors name; None: every row
        (more than ``ROW_SLICE_SHARE`` of them, or a mask editor that does not name its rows)."""
        mask_rows = None
        if has["mask"]:
            mask_rows = self.mask_edit_rows(layer, site, q_pos, kw)
            if mask_rows is None:
                return None
        return self.edit_rows(q_pos, reads, mask_rows)

    def edit_rows(self, q_pos, reads: tuple, mask_rows: tuple | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positions, indices among the call's rows) of the rows named by the layer's score / probability probes
        (``reads``: their row specs) and by its mask editors (``mask_rows``, from mask_edit_rows), built once per
        forward; None where they are more than ``ROW_SLICE_SHARE`` of the call's rows."""
        def build():
            pos = self._rows_union(q_pos, reads, torch.device("cpu"))[0]
            if mask_rows is not None and mask_rows[1].shape[0]:
                pos = torch.unique(torch.cat([pos, q_pos[mask_rows[1]]]))
            if pos.shape[0] > self.ROW_SLICE_SHARE * q_pos.shape[0]:
                return None
            return pos, pos - self.position_span(q_pos)[0]
        return self.per_forward("edit_rows", (q_pos,) if mask_rows is None else (q_pos, mask_rows[1]), build, reads)

    def run_edited(self, name: str, layer: int, value: torch.Tensor, positions: torch.Tensor, kw: dict,
                   changed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """run_site on a score or probability site, and ``changed`` [b, h|1, rows] or-ed with the (sample, head, row)
        its editors changed: compared with what they received, or every row where one wrote into it."""
        if all(a.specs[name][0] != "edit" for a in self.entries(name, layer)):
            return self.run_site(name, layer, value, 2, positions, **kw), changed
        version = _version(value)
        before = value if version is not None else value.clone()   # an inference tensor keeps no version: a copy
        out = self.run_site(name, layer, value, 2, positions, **kw)
        if version is not None and _version(value) != version:   # written into: every row counts as edited
            diff = torch.ones(value.shape[:-1], dtype=torch.bool, device=value.device)
        elif out is value and version is not None:
            return out, changed
        else:
            diff = (out != before).any(-1)
        return out, diff if changed is None else changed | diff


class Lens:
    """A model with arbiter attached. Create it with ``arbiter.attach(model, processor)``."""

    def __init__(self, model: nn.Module, processor: Any = None, stack: str = "decoder"):
        self.model = model
        self.processor = processor
        self.facts: ModelFacts = model_facts(model, stack)
        self._runtime = _Runtime(self)
        self._handles: list = []
        self._services: list = []     # undo functions of active capture / replay blocks (close() runs them)
        self._router = attn_fn.AttentionRouter(model, self.facts.text_config)
        self._entered = False
        self.groups: TokenGroups | None = None

    # -- attach / detach -------------------------------------------------------------------------------------
    def __enter__(self) -> "Lens":
        if self._entered:
            raise ProbeError("this Lens is already attached; nest probes inside it instead of re-entering.")
        if any(lf.attn in attn_fn.RUNTIME or lf.cross_attn in attn_fn.RUNTIME for lf in self.facts.layers):
            raise UnsupportedModelError(f"this model's {self.facts.stack} stack is already routed through arbiter "
                                        "(another Lens is attached to it); detach that Lens first, or nest your "
                                        "probes in it. (An encoder-decoder's encoder and decoder may each have "
                                        "their own Lens at once: attach(model, stack='encoder') beside "
                                        "attach(model).)")
        self._router.install()
        # attention computing inline (no AttentionInterface call): the adapter's stand-ins, swapped in while attached
        self._stand_ins = self.facts.attention_stand_ins()
        try:
            self._unswap = swap_modules(self.model, self._stand_ins) if self._stand_ins else None
        except BaseException:
            self._router.remove()
            raise
        try:
            self._install_base()
        except BaseException:   # a failed attach leaves the model as it was
            self.close()
            raise
        self._entered = True
        return self

    def _install_base(self) -> None:
        """The runtime's registrations and the hooks every attach needs (undone by :meth:`close`)."""
        for lf in self.facts.layers:
            if lf.attn is not None:
                attn_fn.RUNTIME[lf.attn] = (self, lf.index)
                if lf.attn in self._stand_ins:
                    attn_fn.RUNTIME[self._stand_ins[lf.attn]] = (self, lf.index)
            if lf.cross_attn is not None:
                attn_fn.RUNTIME[lf.cross_attn] = (self, lf.index, "xattn")
        self._base_handles = []   # filled one by one: a failure half-way leaves close() every handle made
        for m in self.facts.input_modules():
            self._base_handles.append(m.register_forward_pre_hook(self._on_model, with_kwargs=True))
        self._base_handles.append(self.facts.decoder.register_forward_pre_hook(self._on_decoder, with_kwargs=True))
        if self.facts.encoder is not None:   # the decoder reads an encoder: group its positions at each run
            self._base_handles.append(
                self.facts.encoder.register_forward_pre_hook(self._on_encoder, with_kwargs=True))
        if self.facts.encoder is not None or self.facts.stack == "encoder":
            try:   # a model whose class does not implement it: encoders fed merged embeddings go ungrouped
                embed = self.model.get_input_embeddings()
            except (NotImplementedError, AttributeError):
                embed = None
            if isinstance(embed, nn.Module):
                self._base_handles.append(embed.register_forward_pre_hook(self._on_embed))

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Detach: remove every hook, deactivate every probe, restore the attention implementation."""
        for a in list(self._runtime.active):
            with contextlib.suppress(Exception):
                a.probe.on_detach(self)
        self._runtime.active.clear()
        self._runtime.pending_groups = None
        self._runtime.rebuild()
        self._remove_hooks()
        self._end_services()
        for h in getattr(self, "_base_handles", []):
            h.remove()
        self._base_handles = []
        for lf in self.facts.layers:
            if lf.attn is not None:
                attn_fn.RUNTIME.pop(lf.attn, None)
            if lf.cross_attn is not None:
                attn_fn.RUNTIME.pop(lf.cross_attn, None)
        for stand_in in getattr(self, "_stand_ins", {}).values():
            attn_fn.RUNTIME.pop(stand_in, None)
        if getattr(self, "_unswap", None) is not None:
            self._unswap()
            self._unswap = None
        self._router.remove()
        self._entered = False

    # -- hooks -----------------------------------------------------------------------------------------------
    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _install_hooks(self) -> None:
        """One hook per (site, layer) that some active probe uses; attention sites need none."""
        self._remove_hooks()
        rt = self._runtime
        needed = {key for key, lst in rt.table.items() if lst and key[0] not in ATTENTION_SITES + CROSS_SITES}
        f = self.facts
        for site, layer in sorted(needed, key=lambda k: (k[0], -1 if k[1] is None else k[1])):
            lf = f.layers[layer] if layer is not None else None
            if site == "embed":
                self._handles.append(f.layers[0].layer.register_forward_pre_hook(
                    self._pre_hook(site, None), with_kwargs=True))
            elif site == "resid.pre":
                self._handles.append(lf.layer.register_forward_pre_hook(self._pre_hook(site, layer), with_kwargs=True))
            elif site == "resid.mid":
                if lf.mid_norm is None:
                    raise SiteError(f"layer {layer} has no pre-MLP norm, so resid.mid is not available there.")
                self._handles.append(lf.mid_norm.register_forward_pre_hook(self._pre_hook(site, layer),
                                                                          with_kwargs=True))
            elif site == "attn.head_out":
                if lf.out_proj is None:
                    raise SiteError(f"layer {layer} has no attention output projection (attn.head_out).")
                self._handles.append(lf.out_proj.register_forward_pre_hook(self._head_hook(layer), with_kwargs=True))
            elif site == "attn.k_pre":
                self._handles.append(self._k_pre_module(layer).register_forward_hook(self._k_pre_hook(layer)))
            elif site in ("attn.out", "mlp.out", "resid.post", "logits"):
                mod = {"attn.out": (lf.attn if lf.attn_out is None else lf.attn_out) if lf else None,
                       "mlp.out": lf.mlp if lf else None,
                       "resid.post": lf.layer if lf else None, "logits": f.lm_head}[site]
                if mod is None:
                    raise SiteError(f"site {site!r} is not available at layer {layer} of this model.")
                self._handles.append(mod.register_forward_hook(self._post_hook(site, layer)))
        for (site, layer), lst in rt.table.items():  # attn.mask on a token mixer that is not softmax attention
            if site == "attn.mask" and lst and layer is not None and f.layers[layer].attn is None:
                self._handles.append(f.layers[layer].mixer.register_forward_hook(self._mixer_hook(layer),
                                                                                with_kwargs=True))

    def _mixer_hook(self, layer):
        """Serve attn.mask edits on a linear-attention / convolution / state-space layer by deletion (mixers.py):
        the mixer's inputs are kept over the forward calls of a generation so decode steps recompute exactly."""
        rt = self._runtime
        lf = self.facts.layers[layer]
        busy = [False]

        def hook(module, args, kwargs, output):
            if busy[0]:
                return None
            x = kwargs.get("hidden_states", args[0] if args else None)
            am = kwargs.get("attention_mask")
            pad = am.bool() if isinstance(am, torch.Tensor) and am.dim() == 2 else None
            b, q_len = x.shape[0], x.shape[1]
            if rt.offset == 0:
                inputs = x
            else:
                hist = rt.mixer_inputs.get(layer)
                if hist is None or hist[0].shape[1] != rt.offset:
                    raise SiteError(f"a knockout on layer {layer} ({lf.mixer_kind}) must be active from the prefill "
                                    "of a generation: the layer's inputs at earlier positions are needed to "
                                    "recompute its rows.")
                inputs = torch.cat([hist[0], x], dim=1)
                if hist[1] is not None or pad is not None:
                    old = hist[1] if hist[1] is not None else torch.ones(b, rt.offset, dtype=torch.bool,
                                                                         device=x.device)
                    new = pad[:, -q_len:] if pad is not None else torch.ones(b, q_len, dtype=torch.bool,
                                                                             device=x.device)
                    pad = torch.cat([old, new], dim=1)
            # kept for the decode steps of a generation only (a forward without a cache needs no history)
            if any(kwargs.get(name) is not None for name in mixers.CACHE_KWARGS):
                rt.mixer_inputs[layer] = (inputs, pad)
            q_pos = rt.chunk_positions(q_len)
            k_pos = torch.arange(inputs.shape[1])
            default, _ = attn_fn.bool_mask(pad, module, {}, b, q_pos, k_pos, False, x.device)
            edited = rt.run_site("attn.mask", layer, default, 2, q_pos, query_positions=q_pos, key_positions=k_pos,
                                 cross=False)
            if edited is default:
                return None
            edited = edited.expand(torch.broadcast_shapes(edited.shape, default.shape))
            runs = mixers.deletion_runs(default, edited, q_pos, layer, lf.mixer_kind)
            if not runs:
                return None
            y = output[0] if isinstance(output, tuple) else output
            busy[0] = True
            try:
                y = mixers.recompute(module, args, kwargs, inputs, pad, runs, y, layer, lf.mixer_kind)
            finally:
                busy[0] = False
            return (y, *output[1:]) if isinstance(output, tuple) else y
        return hook

    def _pre_hook(self, site, layer):
        rt = self._runtime

        def hook(module, args, kwargs):
            if args:
                x = args[0]
                d = _seq_dim(x, rt)
                new = rt.run_site(site, layer, x, d, rt.chunk_positions(x.shape[d]))
                if new is not x:
                    return (new, *args[1:]), kwargs
            elif "hidden_states" in kwargs:
                x = kwargs["hidden_states"]
                d = _seq_dim(x, rt)
                new = rt.run_site(site, layer, x, d, rt.chunk_positions(x.shape[d]))
                if new is not x:
                    kwargs = dict(kwargs, hidden_states=new)
                    return args, kwargs
            return None
        return hook

    def _head_hook(self, layer):
        rt = self._runtime
        nh, _, hd = self.facts.heads(layer)

        def hook(module, args, kwargs):
            x = args[0]
            heads = rearrange(x, "b s (h d) -> b s h d", h=nh, d=hd)
            new = rt.run_site("attn.head_out", layer, heads, 1, rt.chunk_positions(x.shape[1]))
            if new is not heads:
                return (rearrange(new, "b s h d -> b s (h d)"), *args[1:]), kwargs
            return None
        return hook

    def _k_pre_module(self, layer):
        k = _k_proj(self.facts.layers[layer])
        if k is None:
            attn = self.facts.layers[layer].attn
            raise SiteError(f"attn.k_pre reads the k_proj output, but layer {layer}'s attention "
                            f"({type(attn).__name__ if attn is not None else 'none'}) has no k_proj Linear (e.g. a "
                            "layer that reuses another layer's keys); read attn.k (keys after RoPE) there instead.")
        return k

    def _k_pre_hook(self, layer):
        rt = self._runtime
        _, nkv, hd = self.facts.heads(layer)

        def hook(module, args, output):
            rt.run_site("attn.k_pre", layer, rearrange(output, "b s (h d) -> b s h d", h=nkv, d=hd), 1,
                        rt.chunk_positions(output.shape[1]))
            return None
        return hook

    def _post_hook(self, site, layer):
        rt = self._runtime

        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            if not isinstance(x, torch.Tensor):
                x = getattr(output, "last_hidden_state", None)
                if x is None:
                    return None
            d = _seq_dim(x, rt)
            new = rt.run_site(site, layer, x, d, rt.chunk_positions(x.shape[d]))
            if new is x:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    def _on_model(self, module, args, kwargs):
        """Forward of a module that receives the model's inputs (the model; see ``Adapter.input_modules``): at
        prefill, take the batch's groups (from encode(), or read from the input ids), over the sequence the decoder
        runs (``ModelFacts.sequence_groups``: modality masks and prepended positions the adapter reads off the
        inputs)."""
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if self.facts.encoder is not None:   # an encoder-decoder's decoder runs its own ids (the encoder: above)
            ids = kwargs.get("decoder_input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = _cache_length(cache)
        if past == 0 and ids is not None and ids.dim() == 2:
            def build() -> TokenGroups:
                g = self.groups
                # groups over the ids, or over the decoder's sequence (the ids plus positions the model puts
                # before them)
                lengths = (ids.shape[1], ids.shape[1] + self.facts.prefix_length(kwargs))
                if g is not None and g.batch_size == ids.shape[0] and g.length not in lengths \
                        and g.prompt_length in lengths:
                    g.truncate(g.prompt_length)
                if g is None or g.batch_size != ids.shape[0] or g.length not in lengths:
                    mask = (_padding_mask({"attention_mask": kwargs.get("decoder_attention_mask")}, ids)
                            if self.facts.encoder is not None else kwargs.get("attention_mask"))
                    g = TokenGroups.from_input_ids(ids, mask, self.facts.modality_token_ids,
                                                   kwargs.get("mm_token_type_ids"))
                if g.length == ids.shape[1]:
                    g = self.facts.sequence_groups(g, kwargs)
                return g
            rt = self._runtime
            if rt.active:
                rt.groups, rt.pending_groups = build(), None
            else:   # nothing reads groups in this forward (reading the ids would make the host wait on a device)
                rt.groups, rt.pending_groups = None, build
        return None

    def companion(self, stack: str) -> "Lens | None":
        """The Lens attached to this model's other stack (``"encoder"``: an encoder-decoder's encoder), if any."""
        other = self.facts.encoder if stack == "encoder" else None
        for m in other.modules() if other is not None else ():
            entry = attn_fn.RUNTIME.get(m)
            if entry is not None and entry[0] is not self:
                return entry[0]
        return None

    def _on_embed(self, module, args):
        """The input embedding's ids: an encoder that receives merged embeddings (image features scattered into
        the prompt's placeholder positions) is grouped by the ids they were embedded from."""
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point() and args[0].dim() == 2:
            self._runtime.embedded_ids = args[0]
        return None

    def _on_encoder(self, module, args, kwargs):
        """An encoder-decoder's encoder starts: token groups over its positions, read from its inputs: ids (their
        modality placeholders), the ids its merged embeddings came from, or one modality's features."""
        rt = self._runtime
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        ids = kwargs.get("input_ids")
        if ids is None and first is not None and not first.is_floating_point():
            ids = first
        emb = kwargs.get("inputs_embeds")
        if ids is None and emb is not None and rt.embedded_ids is not None \
                and tuple(rt.embedded_ids.shape) == tuple(emb.shape[:2]):
            ids = rt.embedded_ids
        rt.embedded_ids = None
        rt.encoder_groups, rt.encoder_modality, rt.encoder_fresh = None, None, True
        if ids is not None and ids.dim() == 2:
            g = self.groups   # set with use() / encode(): the encoder's prompt, with any groups the user added
            rt.encoder_groups = g if (g is not None and g.length == ids.shape[1] and g.batch_size == ids.shape[0]) \
                else TokenGroups.from_input_ids(ids, _padding_mask(kwargs, ids), self.facts.modality_token_ids)
            return None
        main = getattr(module, "main_input_name", None)
        given = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)] + ([main] if first is not None else [])
        rt.encoder_modality = next((ENCODER_FEATURE_INPUTS[k] for k in given if k in ENCODER_FEATURE_INPUTS), None)
        if rt.encoder_modality is None:
            rt.encoder_why = (f"the encoder ran on {', '.join(given) or 'no tensor input'}: neither token ids nor "
                              "embeddings of known ids nor one modality's features")
        return None

    def _on_decoder(self, module, args, kwargs):
        rt = self._runtime
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            emb = kwargs.get("input_ids", args[0] if args else None)
        if emb is None:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = _cache_length(cache)
        rt.batch, rt.q_len, rt.offset = emb.shape[0], emb.shape[1], past
        rt._rows_cache = {}
        embedded, rt.embedded_ids = rt.embedded_ids, None
        if self.facts.stack == "encoder" and past == 0 and kwargs.get("inputs_embeds") is not None \
                and embedded is not None and tuple(embedded.shape) == tuple(emb.shape[:2]) \
                and not (self.groups is not None and self.groups.length == rt.q_len):
            # an encoder run on merged embeddings (generate() runs it without the model's forward): its groups
            # are read off the ids those embeddings came from, at every run
            rt.groups = TokenGroups.from_input_ids(embedded, _padding_mask(kwargs, embedded),
                                                   self.facts.modality_token_ids)
        if past == 0 and self.facts.encoder is not None:
            if not rt.encoder_fresh:   # encoder_outputs from elsewhere: groups of an earlier run would be stale
                rt.encoder_groups, rt.encoder_modality = None, None
                rt.encoder_why = ("the encoder did not run in this call (encoder_outputs were passed in), so its "
                                  "positions' groups are unknown")
            rt.encoder_fresh = False
        rt.step = 0 if past == 0 else rt.step + 1
        if not rt.active:   # no probe reads groups in this forward: built when one asks (pending_groups)
            return None
        if rt.pending_groups is not None:
            rt.groups, rt.pending_groups = rt.pending_groups(), None
        if rt.groups is None or (past == 0 and rt.q_len not in (rt.groups.length, rt.groups.prompt_length)):
            # (an encoder-decoder's decoder: groups set with use() / encode() describe the encoder's prompt)
            base = self.groups if (self.groups is not None and self.facts.encoder is None
                                   and rt.q_len in (self.groups.length, self.groups.prompt_length)) else None
            ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
            if base is None and self.facts.encoder is not None and ids is not None and ids.dim() == 2 \
                    and not ids.is_floating_point() and past == 0:   # an encoder-decoder's decoder: its own ids
                base = TokenGroups.from_input_ids(ids, _padding_mask(kwargs, ids), self.facts.modality_token_ids)
            if base is None:
                mask = kwargs.get("attention_mask")
                am = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                base = TokenGroups({"pad": ~am.bool().cpu() if am is not None
                                    else torch.zeros(rt.batch, rt.q_len, dtype=torch.bool)})
                base.add("last", torch.nn.functional.one_hot(torch.tensor([rt.q_len - 1] * rt.batch),
                                                             rt.q_len).bool())
            rt.groups = base
        g = rt.groups
        if past == 0 and g.length > rt.q_len:
            g.truncate(rt.q_len)
        if g.batch_size not in (1, rt.batch):
            raise GroupError(f"the token groups are for a batch of {g.batch_size} but the model runs a batch of "
                             f"{rt.batch} (beam search or a different input?); encode the batch you run.")
        total = past + rt.q_len
        if total > g.length:
            g.extend(total - g.length)
        for a in rt.active:   # (the probes that look at a forward's start: the others need no context built)
            if type(a.probe).on_forward is not Probe.on_forward:
                # every row of every sample: one True seen at every place (read-only, no fill made per forward)
                a.probe.on_forward(rt.ctx("forward", None, rt.chunk_positions(), _TRUE.expand(rt.batch, rt.q_len)))
        return None

    # -- probes ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def probe(self, probe: Probe, layers: Any = None, steps: str | None = None) -> Iterator[Probe]:
        """Activate a probe for the ``with`` block; yields the probe (read ``probe.result()`` after)."""
        if not self._entered:
            raise ProbeError("activate probes inside `with arbiter.attach(model) as lens:`.")
        specs = probe.site_specs()
        layer_spec = layers if layers is not None else probe.layers
        site_layers = self._site_layers(specs, layer_spec, type(probe).__name__, type(probe))
        steps = steps or probe.steps
        if steps not in ("all", "prefill", "decode"):
            raise SiteError(f"steps must be 'all', 'prefill' or 'decode', got {steps!r}.")
        entry = _Active(probe, site_layers, steps, specs)
        probe.served_layers = {site: sorted(layers) for site, layers in site_layers.items()}
        probe.on_attach(self)
        rt = self._runtime
        rt.active.append(entry)
        try:
            rt.rebuild()
            self._install_hooks()
            yield probe
        finally:
            if entry in rt.active:
                rt.active.remove(entry)
            rt.rebuild()
            self._install_hooks()
            probe.on_detach(self)

    def _site_layers(self, specs, layer_spec, who: str, probe_type=None) -> dict[str, frozenset[int]]:
        """The layers each site of a probe is served on: the chosen layers where the site exists. An explicit
        layer lacking a site is an error naming the layer's token mixer; ``"all"`` serves every layer that has it,
        and a knockout that cannot sever some layer's token mixer is an error, never a skipped layer."""
        f = self.facts
        chosen = _resolve_layers(layer_spec, f.n_layers, range(f.n_layers), who)
        explicit = not (layer_spec is None or (isinstance(layer_spec, str) and layer_spec == "all"))
        routed_sites = [s for s in specs if s in ATTENTION_SITES]
        if f.merged_encoder and routed_sites:
            raise SiteError(f"{who}: {', '.join(routed_sites)} cannot be served on this model: {f.merged_encoder}; "
                            "arbiter cannot place those keys in token groups. The residual, MLP, attn.head_out and "
                            "attn.out sites work; attach(model, stack='encoder') serves the encoder's attention.")
        if specs.get("attn.mask", ("read",))[0] == "edit" and f.unserved:
            raise SiteError(f"{who}: this model also mixes tokens through modules arbiter does not route "
                            f"({'; '.join(f.unserved[:3])}{' ...' if len(f.unserved) > 3 else ''}), so a knockout "
                            "would leave those paths open. Record and head interventions work on the routed "
                            "attention; knockouts on this architecture are not supported yet.")
        out: dict[str, frozenset[int]] = {}
        optional = getattr(probe_type, "optional_sites", frozenset())
        for site in specs:
            if site in GLOBAL_SITES:
                continue
            # a layer that mixes no tokens (an MLP- or MoE-only block) has no path for a knockout to sever
            need = frozenset(i for i in chosen if not (site == "attn.mask" and f.layers[i].mixer_kind == "none"))
            have = frozenset(i for i in need if self._has_site(site, f.layers[i]))
            missing = sorted(need - have)
            if missing and (explicit or site == "attn.mask") and not (site in CROSS_SITES
                                                                     and site in optional):
                lf = f.layers[missing[0]]
                what = ("a knockout (attn.mask) cannot be served there: arbiter does not know how it mixes tokens; "
                        "register an adapter whose token_mixer() names the module" if site == "attn.mask"
                        else f"site {site!r} does not exist there" + (
                            "; keys before RoPE need a k_proj Linear: read attn.k (keys after RoPE) instead"
                            if site == "attn.k_pre" else ""))
                why = lf.skip_reason or "the module is missing"
                raise SiteError(f"{who}: layers {missing} lack it ({why}); {what}.")
            out[site] = have
        routed = ATTENTION_SITES + CROSS_SITES
        if any(s in routed for s in specs) and any(
                f.layers[i].mixer_kind in ("attention", "cross_attention") or s in CROSS_SITES
                for s in specs if s in routed for i in out[s]):
            self._router.check_editable()
        inline: dict[nn.Module, list[int]] = {}  # attention the router would not see (no AttentionInterface call)
        for i in sorted({i for s in specs if s in ATTENTION_SITES for i in out[s] if f.layers[i].attn is not None}):
            attn = getattr(self, "_stand_ins", {}).get(f.layers[i].attn, f.layers[i].attn)
            inline.setdefault(attn, []).append(i)
        for attn, layers in inline.items():
            attn_fn.check_dispatch(attn, layers, who)
        return out

    @staticmethod
    def _has_site(site: str, lf) -> bool:
        if site in CROSS_SITES:
            return lf.cross_attn is not None
        if site == "attn.mask":
            return lf.attn is not None or (lf.mixer is not None and lf.mixer_kind in mixers.DELETION_KINDS)
        if site == "attn.k_pre":
            return lf.attn is not None and _k_proj(lf) is not None
        if site == "attn.head_out":
            return lf.out_proj is not None
        if site in ATTENTION_SITES or site == "attn.out":
            return lf.attn is not None
        if site == "resid.mid":
            return lf.mid_norm is not None
        if site == "mlp.out":
            return lf.mlp is not None
        return True

    # -- conveniences built on probes --------------------------------------------------------------------------
    def window(self, center: int, size: int = 9) -> list[int]:
        """Layers [max(0, c - floor(k/2)), min(L, c + ceil(k/2))) (docs/methods/knockout.md)."""
        n = self.facts.n_layers
        if not 0 <= center < n:
            raise SiteError(f"window centre {center} is out of range; this model has {n} text layers.")
        if size < 1:
            raise SiteError(f"window size must be >= 1, got {size}.")
        return list(range(max(0, center - size // 2), min(n, center + (size + 1) // 2)))

    @property
    def all_layers(self) -> list[int]:
        return list(range(self.facts.n_layers))

    def use(self, groups: TokenGroups | None) -> None:
        """Set the token groups of the batch you are about to run (encode() does this for you). On an
        encoder-decoder's decoder they are the groups of the encoder's prompt (the keys of the cross-attention);
        the decoder's own positions are grouped from its ids."""
        self.groups = groups
        if self.facts.encoder is None:
            self._runtime.groups, self._runtime.pending_groups = groups, None

    def record(self, *what: str, layers: Any = "all", rows: RowSpec = "all", heads: Sequence[int] | None = None,
               steps: str = "all"):
        """Record sites into a Trace: ``with lens.record("attn", "resid", rows="last") as rec: ...; rec.trace``."""
        from .probes.record import Recorder

        return self.probe(Recorder(*what, rows=rows, heads=heads), layers=layers, steps=steps)

    def knockout(self, src: str, dst: str, layers: Any = "all", heads: Sequence[int] | None = None,
                 batch_rows: Sequence[int] | None = None, steps: str = "all", allow_empty: bool = False):
        """Sever attention from queries in ``dst`` to keys in ``src`` (pre-softmax, composed with the model's mask)."""
        from .probes.knockout import Knockout

        return self.probe(Knockout(src, dst, heads=heads, batch_rows=batch_rows, allow_empty=allow_empty),
                          layers=layers, steps=steps)

    def block_heads(self, heads: Iterable[tuple[int, int]], mode: str = "zero", reference: Any = None,
                    rows: RowSpec = "all", batch_rows: Sequence[int] | None = None, steps: str = "all"):
        """Zero (``mode="zero"``) or mean-ablate (``mode="mean"``, with ``reference`` inputs or a trace) heads."""
        from .probes.head_interventions import HeadBlock

        p = HeadBlock(heads, mode=mode, reference=reference, rows=rows, batch_rows=batch_rows)
        return self.probe(p, layers=p.layer_list, steps=steps)

    def amplify_heads(self, heads: Iterable[tuple[int, int]], alpha: float | Sequence[float] = 2.0,
                      rows: RowSpec = "all", batch_rows: Sequence[int] | None = None, steps: str = "all"):
        """Scale heads' outputs (o_proj input slices) by ``alpha``."""
        from .probes.head_interventions import HeadScale

        p = HeadScale(heads, alpha=alpha, rows=rows, batch_rows=batch_rows)
        return self.probe(p, layers=p.layer_list, steps=steps)

    def patch_heads(self, heads: Iterable[tuple[int, int]], source: Any, rows: RowSpec = "all",
                    batch_rows: Sequence[int] | None = None, steps: str = "prefill"):
        """Replace heads' outputs by those recorded in ``source`` (a Trace with attn.head_out, or {layer: tensor})."""
        from .probes.head_interventions import HeadPatch

        p = HeadPatch(heads, source, rows=rows, batch_rows=batch_rows)
        return self.probe(p, layers=p.layer_list, steps=steps)

    def patch_resid(self, layer: int, source: Any, rows: RowSpec = "all", site: str = "resid.post",
                    batch_rows: Sequence[int] | None = None, steps: str = "prefill"):
        """Replace the residual stream at ``layer`` (``resid.post`` or ``resid.pre``) and rows by ``source``."""
        from .probes.head_interventions import ResidPatch

        return self.probe(ResidPatch(site, source, rows=rows, batch_rows=batch_rows), layers=[layer], steps=steps)

    def steer(self, plan, steps: str = "all"):
        """Apply a SteeringPlan (from ``Report.steering``) for the ``with`` block; works in generate()."""
        plan.check(self.model)
        p = plan.probe()
        return self.probe(p, layers=p.layer_list, steps=steps)

    def encode(self, samples, **kw):
        """Conflict samples -> model inputs + TokenGroups (see arbiter.encode.encode_samples)."""
        from .encode import encode_samples

        batch = encode_samples(self, samples, **kw)
        self.use(batch.groups)
        return batch

    # -- services: capture a clean run, replay it (prefix reuse in sweeps) ------------------------------------
    @contextlib.contextmanager
    def capture(self, heads: Iterable[int] = ()) -> Iterator[Capture]:
        """Record, during the block's forward, every decoder layer's output and the output of each module beside
        the decoder (vision / audio towers, projectors) that ran exactly once before it; yields the Capture
        (filled on exit) that :meth:`replay` plays back. ``heads``: layers whose per-head outputs (the input of
        the attention output projection) are recorded as well, so that a replay may start at such a layer's
        output projection; recorded only where the attention module ran once and returned its output
        projection's result itself (checked on the call), else left out. The hooks are the Lens's, removed on exit
        or close()."""
        cap = Capture()
        calls: dict[nn.Module, int] = {}
        started = [False]
        handles = [self.facts.decoder.register_forward_pre_hook(lambda *_: started.__setitem__(0, True))]

        def enc_hook(mod, args, output):
            calls[mod] = calls.get(mod, 0) + 1
            if not started[0]:
                cap.encoders[mod] = map_tensors(output, lambda t: t.detach())

        def layer_hook(index):
            def hook(mod, args, output):
                t = (output[0] if isinstance(output, tuple) else output).detach().clone()
                cap.layers[index] = (t, *output[1:]) if isinstance(output, tuple) else t
            return hook

        for mod in decoder_siblings(self.model, self.facts.decoder):
            handles.append(mod.register_forward_hook(enc_hook))
        for lf in self.facts.layers:
            handles.append(lf.layer.register_forward_hook(layer_hook(lf.index)))
        # layer -> [attention calls, projection calls, its input, its output, the input's in-place version then]
        seen: dict[int, list] = {}
        for i in sorted(set(int(i) for i in heads)):
            lf = self.facts.layers[i] if 0 <= i < self.facts.n_layers else None
            if lf is None or lf.attn is None or lf.out_proj is None or lf.cross_attn is not None:
                continue
            attn = self._stand_ins.get(lf.attn, lf.attn)
            seen[i] = [0, 0, None, None, None]

            def attn_pre(mod, args, _s=seen[i]):
                _s[0] += 1

            def proj_pre(mod, args, _s=seen[i]):
                _s[1] += 1
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                # the projection's input is the attention's own temporary: kept as it is (no copy), its in-place
                # version checked when the block ends; an inference tensor keeps no version, so it is copied
                # (a view into a larger buffer is copied too: the buffer would stay alive uncounted)
                _s[2] = None if x is None else x.detach().clone() if x.is_inference() or \
                    x.untyped_storage().nbytes() > x.numel() * x.element_size() else x.detach()
                _s[4] = None if _s[2] is None else _version(_s[2])

            def proj_post(mod, args, output, _s=seen[i]):
                _s[3] = output

            def attn_post(mod, args, output, _s=seen[i], _i=i):
                first = output[0] if isinstance(output, tuple) else output
                if _s[0] == 1 and _s[1] == 1 and _s[2] is not None and first is _s[3]:
                    rest = map_tensors(output[1:], lambda t: t.detach()) if isinstance(output, tuple) else None
                    cap.heads[_i] = (_s[2], rest)
                _s[2] = _s[3] = None   # (the version stays: the kept tensor is checked against it at the end)
            handles += [attn.register_forward_pre_hook(attn_pre), attn.register_forward_hook(attn_post),
                        # first of its pre-hooks: the attention's own output, before any edit at attn.head_out
                        # (an active probe's edit runs again on the replay)
                        lf.out_proj.register_forward_pre_hook(proj_pre, prepend=True),
                        lf.out_proj.register_forward_hook(proj_post)]

        def undo() -> None:
            for h in handles:
                h.remove()
        self._services.append(undo)
        try:
            yield cap
        finally:
            self._end_services(undo)
            for mod in [m for m in cap.encoders if calls.get(m) != 1]:
                del cap.encoders[mod]
            res = self.facts.residual
            for i in list(cap.heads):
                out = cap.layers.get(i)
                out = out[0] if isinstance(out, tuple) else out
                # kept where the attention ran once, nothing wrote into its per-head outputs since, and they lead
                # with the batch, as the layer's output does
                t = cap.heads[i][0]
                if seen[i][0] != 1 or out is None or _version(t) != seen[i][4] or \
                        t.shape[0] != out.shape[res.batch_dim(out)]:
                    del cap.heads[i]

    @contextlib.contextmanager
    def replay(self, layer_outputs: dict, upto: int, n: int = 1, encoder_outputs: dict | None = None,
               heads: dict | None = None) -> Iterator[None]:
        """For the block, decoder layers ``< upto`` return ``layer_outputs[i]`` and each module in
        ``encoder_outputs`` its recorded output (both as from :meth:`capture`), every batch repeated ``n`` times,
        without running: their work is skipped. Each is swapped in its parent for a stand-in module (whose
        hooks, and the original's, do not run) and put back on exit, also on an exception or close(). An
        encoder in eval mode treats the images of a batch independently, so its output for ``cat([x] * n)`` is
        ``cat([f(x)] * n)``. ``heads`` (``Capture.heads``): where it holds layer ``upto``, that layer's attention
        is replayed too, up to its output projection, which runs (with its hooks: attn.head_out is served) on
        the recorded per-head outputs; the rest of the layer runs.

        A probe active on what does not run is refused (it would see nothing, or its edit would be lost): any
        site of a layer below ``upto`` (and ``embed`` when ``upto > 0``), and at a layer whose attention is
        replayed, the attention's own sites, ``attn.out`` and an edit of ``resid.pre`` (or of ``embed`` at layer
        0)."""
        from .errors import InterventionError

        f = self.facts
        if not 0 <= upto <= f.n_layers:
            raise InterventionError(f"replay: upto={upto} is out of range (0..{f.n_layers}).")
        if upto > 0 and not f.prefix_replay:
            raise InterventionError(f"replay: this model's layers ({f.family}) read state that earlier layers leave "
                                    "outside their outputs, so a layer prefix cannot be replayed; use upto=0.")
        missing = [i for i in range(upto) if i not in layer_outputs]
        if missing:
            raise InterventionError(f"replay: no recorded output for layers {missing}; record them with "
                                    "lens.capture().")
        attention = heads is not None and upto in heads and upto < f.n_layers
        if attention and not f.prefix_replay:
            raise InterventionError(f"replay: this model's layers ({f.family}) read state that their attention "
                                    "leaves outside its output, so it cannot be replayed; leave heads out.")
        why = self.replay_refusal(upto, attention)
        if why:
            raise InterventionError(f"replay: {why}.")
        res = f.residual

        def repeat_layer(out):
            if isinstance(out, tuple):
                return (res.repeat_batch(out[0], n), *out[1:])
            return res.repeat_batch(out, n)

        stand_ins = {f.layers[i].layer: ReplayModule(f.layers[i].layer, layer_outputs[i], repeat_layer)
                     for i in range(upto)}
        if attention:
            lf = f.layers[upto]
            proj = lf.out_proj

            def run_projection(recorded):
                per_head, rest = recorded
                # always a copy: an edit at attn.head_out may write into it
                out = proj(torch.cat([per_head] * n, dim=0))
                return out if rest is None else (out, *repeat_dim0(rest, n))
            attn = self._stand_ins.get(lf.attn, lf.attn)
            stand_ins[attn] = ReplayModule(attn, heads[upto], run_projection)
        for mod, out in (encoder_outputs or {}).items():
            stand_ins[mod] = ReplayModule(mod, out, lambda o: repeat_dim0(o, n))
        undo = swap_modules(self.model, stand_ins)
        self._services.append(undo)
        try:
            yield
        finally:
            self._end_services(undo)

    @contextlib.contextmanager
    def last_row_only(self) -> Iterator[None]:
        """For the block, the last decoder layer runs its output projection and its MLP on the last position only:
        pre-hooks cut their inputs (the per-head outputs, the pre-MLP norm's input) to the last row, and the
        layer's residual adds spread that row over the others. Only the last row of the layer's output, and of
        what the model computes from it, is then right: for forwards that read the last position's logits alone
        (``logits_to_keep=1``), which skip about half of that layer's work. Check it against a full forward before
        trusting it on a model (:func:`arbiter.sweep.sweep` does, once per clean run); refused where the layer
        lacks an output projection or a pre-MLP norm, mixes tokens otherwise than by self-attention, carries
        stacked residual streams, or where a probe is active on the layer."""
        from .errors import InterventionError

        why = self.last_row_refusal()
        if why:
            raise InterventionError(f"last_row_only: {why}; run the forward whole.")
        f = self.facts
        lf = f.layers[-1]
        res = f.residual

        def last_row(mod, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            dim = res.seq_dim(x)
            return (x.narrow(dim, x.shape[dim] - 1, 1), *args[1:])
        handles = [lf.out_proj.register_forward_pre_hook(last_row), lf.mid_norm.register_forward_pre_hook(last_row)]

        def undo() -> None:
            for h in handles:
                h.remove()
        self._services.append(undo)
        try:
            yield
        finally:
            self._end_services(undo)

    def last_row_refusal(self) -> str | None:
        """Why :meth:`last_row_only` cannot serve this model with the probes now active (None: it can)."""
        f = self.facts
        lf = f.layers[-1]
        why = ("its residual carries stacked streams" if f.residual.stacked else
               "it has no attention output projection" if lf.out_proj is None or lf.attn is None else
               "it has no pre-MLP norm" if lf.mid_norm is None else
               "it has a cross-attention" if lf.cross_attn is not None else
               f"it mixes tokens by {lf.mixer_kind}" if lf.mixer_kind != "attention" else None)
        if why:
            return f"the last layer ({lf.index}) cannot run on its last row alone: {why}"
        for a in self._runtime.active:
            sites = sorted(site for site, layers in a.layers.items() if lf.index in layers)
            if sites:
                return (f"{type(a.probe).__name__} is active on {', '.join(sites)} at layer {lf.index}, whose other "
                        "rows would not be computed")
        return None

    def replay_refusal(self, upto: int, attention: bool = False) -> str | None:
        """Why :meth:`replay` up to ``upto`` (``attention``: with that layer's attention replayed) would leave an
        active probe unserved (None: it would not); see :meth:`replay`."""
        replayed_sites = set(ATTENTION_SITES) | set(CROSS_SITES) | {"attn.k_pre", "attn.out"}
        for a in self._runtime.active:
            name = type(a.probe).__name__
            if upto > 0 and "embed" in a.specs:
                return (f"{name} is active on 'embed', which does not run when layers below {upto} are replayed; "
                        "run it outside the replay (a sweep: reuse_prefix=False)")
            if attention and upto == 0 and a.specs.get("embed", ("read",))[0] == "edit":
                return (f"{name} edits 'embed', but layer 0's attention is replayed from a clean run; run it outside "
                        "the replay, or replay without heads (a sweep: reuse_attention=False)")
            for site, layers in a.layers.items():
                below = sorted(i for i in layers if i < upto)
                if below:
                    return (f"{name} is active on {site} at layers {below}, which do not run when layers below "
                            f"{upto} are replayed; run it outside the replay (a sweep: reuse_prefix=False)")
                if attention and upto in layers and (
                        site in replayed_sites or (site == "resid.pre" and a.specs[site][0] == "edit")):
                    return (f"{name} is active on {site} at layer {upto}, whose attention is replayed from a clean "
                            "run up to its output projection; run it outside the replay, or replay without heads "
                            "(a sweep: reuse_attention=False)")
        return None

    def _end_services(self, which=None) -> None:
        """Undo one active capture / replay (``which``), or all of them, newest first."""
        for undo in reversed([u for u in self._services if which is None or u is which]):
            self._services.remove(undo)
            undo()

    def __repr__(self) -> str:
        return (f"Lens({type(self.model).__name__}, family={self.facts.family}, layers={self.facts.n_layers}, "
                f"attached={self._entered})")


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference tensors (``torch.inference_mode``), which keep none."""
    return None if t.is_inference() else t._version


def _seq_dim(x: torch.Tensor, rt: _Runtime) -> int:
    """Sequence dim of a residual-like tensor, as the model's adapter lays it out (1 for [batch, seq, hidden])."""
    return rt.lens.facts.residual.seq_dim(x)


def _k_proj(lf) -> nn.Linear | None:
    """The layer's key projection (the attn.k_pre site), or None where its attention has no k_proj Linear."""
    return key_projection(lf.attn)


def _padding_mask(kwargs, ids: torch.Tensor) -> torch.Tensor | None:
    """The call's 2D padding mask when it matches ``ids`` (a decoder may receive the encoder's mask), else None."""
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(ids.shape) else None


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except Exception:  # noqa: BLE001 - legacy tuple caches
        try:
            return int(cache[0][0].shape[-2])
        except Exception:  # noqa: BLE001
            return 0
