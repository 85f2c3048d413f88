"""Recorder: the built-in probe that copies chosen sites, layers, heads and rows into a Trace.

Attention probabilities and scores are computed only for the requested rows, so recording stays on SDPA."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Sequence

import torch

from ..errors import SiteError
from .base import ATTENTION_SITES as CROSS_BASE
from .base import GLOBAL_SITES, SITES, Ctx, Probe, RowSpec, canonical_site

_HEAD_DIM = {"attn.q": 1, "attn.scores": 1, "attn.probs": 1, "attn.head_out": 2, "attn.k": 1, "attn.v": 1,
             "attn.mask": 1, "attn.k_pre": 2}
_KV_SITES = ("attn.k", "attn.v", "attn.k_pre")
_HEAD_DIM.update({"x" + site: dim for site, dim in list(_HEAD_DIM.items()) if site in CROSS_BASE})
_KV_SITES = _KV_SITES + ("xattn.k", "xattn.v")


class Recorder(Probe):
    """Record sites into ``self.trace`` (an ``arbiter.Trace``).

    Tensor names are ``L{layer}.{site}`` (global sites: ``embed``, ``logits``); a second forward call (a decode
    step, another batch) adds ``@{call}``: ``L3.attn.probs@1``. ``rows.{site}@{call}`` holds the absolute
    positions of the recorded rows and ``rowmask.{site}@{call}`` which sample each row belongs to.
    ``heads`` keeps only those query heads (KV heads ``h // group`` for keys and values).

    On an accelerator the recorded tensors stay on the device while the model runs and move to the host at the
    start of the next forward or when the trace is read, so recording makes the host wait on the device once per
    forward at most, not once per layer; beyond ``DEVICE_HOLD_BYTES`` held there, they move at once (bounded memory)."""

    DEVICE_HOLD_BYTES = 1 << 28   # recorded bytes kept on an accelerator during a forward (256 MiB)

    def __init__(self, *what: str, rows: RowSpec = "all", heads: Sequence[int] | None = None):
        super().__init__()
        sites = [canonical_site(w) for w in what] or ["resid.post"]
        self._reads = {s: ("all" if s in ("attn.mask", "xattn.mask") else rows) for s in sites}
        self._edits = {}
        self.heads = None if heads is None else sorted(set(int(h) for h in heads))
        self.sites = sites
        self.rows = rows
        self._store: dict[tuple[str, int | None], list[torch.Tensor]] = defaultdict(list)
        self._rows: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._calls: dict[tuple[str, int | None], int] = defaultdict(int)
        self._trace = None
        self._lens = None
        self._on_device: list[tuple[tuple, int]] = []   # (store key, index) of recorded tensors not yet on the host
        self._device_bytes = 0
        self._head_index: dict[tuple, torch.Tensor] = {}
        self._groups = None   # the token groups of the last forward recorded (the trace's meta)

    def on_attach(self, lens) -> None:
        self._lens = lens
        if self.heads is not None:
            nh = max(lens.facts.heads(layer)[0] for layer in lens.facts.attention_layers)
            bad = [h for h in self.heads if not 0 <= h < nh]
            if bad:
                raise SiteError(f"Recorder: heads {bad} out of range; layers have {nh} heads (0..{nh - 1}).")

    def _keep(self, ctx: Ctx, value: torch.Tensor) -> None:
        site = ctx.site
        if self.heads is not None and site in _HEAD_DIM and ctx.layer is not None:
            nh, nkv, _ = ctx.heads
            hs = self.heads
            if site in _KV_SITES:
                hs = sorted({h // (nh // nkv) for h in hs})
            index = self._head_index.get(tuple(hs))
            if index is None:   # one CPU tensor per head list: its device copy is made once per forward
                index = self._head_index[tuple(hs)] = torch.tensor(hs)
            value = value.detach().index_select(_HEAD_DIM[site], ctx.on_device(index, value.device))   # a copy
        else:
            value = value.detach().clone()   # a copy the model cannot change later
        key = (site, ctx.layer)
        call = len(self._store[key])
        self._store[key].append(value)   # on an accelerator it stays there until the forward is over
        if self._held_on_device(value):
            self._on_device.append((key, call))
            self._device_bytes += value.numel() * value.element_size()
            if self._device_bytes > self.DEVICE_HOLD_BYTES:
                self._to_host()
        if (site, call) not in self._rows:   # the same rows at every layer of a call: kept once
            self._rows[(site, call)] = (ctx.positions.clone(), ctx.row_mask.clone())
        self._calls[key] += 1
        self._trace = None

    # one callback per site, all the same
    def embed(self, ctx, v): self._keep(ctx, v)
    def resid_pre(self, ctx, v): self._keep(ctx, v)
    def attn_q(self, ctx, v): self._keep(ctx, v)
    def attn_k(self, ctx, v): self._keep(ctx, v)
    def attn_v(self, ctx, v): self._keep(ctx, v)
    def attn_k_pre(self, ctx, v): self._keep(ctx, v)
    def attn_mask(self, ctx, v): self._keep(ctx, v)
    def attn_scores(self, ctx, v): self._keep(ctx, v)
    def attn_probs(self, ctx, v): self._keep(ctx, v)
    def attn_head_out(self, ctx, v): self._keep(ctx, v)
    def attn_out(self, ctx, v): self._keep(ctx, v)
    def resid_mid(self, ctx, v): self._keep(ctx, v)
    def mlp_out(self, ctx, v): self._keep(ctx, v)
    def resid_post(self, ctx, v): self._keep(ctx, v)
    def logits(self, ctx, v): self._keep(ctx, v)
    def xattn_q(self, ctx, v): self._keep(ctx, v)
    def xattn_k(self, ctx, v): self._keep(ctx, v)
    def xattn_v(self, ctx, v): self._keep(ctx, v)
    def xattn_mask(self, ctx, v): self._keep(ctx, v)
    def xattn_scores(self, ctx, v): self._keep(ctx, v)
    def xattn_probs(self, ctx, v): self._keep(ctx, v)

    @staticmethod
    def _held_on_device(value: torch.Tensor) -> bool:
        """Whether a recorded tensor waits on its device for the end of the forward (on an accelerator)."""
        return not value.is_cpu

    def _to_host(self) -> None:
        """Move the tensors recorded on an accelerator to the host (the host waits for the device here)."""
        for key, i in self._on_device:
            self._store[key][i] = self._store[key][i].to("cpu")
        self._on_device.clear()
        self._device_bytes = 0

    def on_forward(self, ctx: Ctx) -> None:
        self._to_host()   # the previous forward's tensors: device memory held for one forward at most
        self._groups = ctx.groups   # those of the forward recorded (the Lens may run others before the trace is read)

    @property
    def trace(self):
        """The recorded tensors as an ``arbiter.Trace`` (built on first access)."""
        self._to_host()
        if self._trace is None:
            self._trace = self._build()
        return self._trace

    def result(self):
        return self.trace

    def _layers_not_run(self) -> dict[str, list[int]]:
        """{site: layers} served to this recorder on which the model never called the site (it skipped the layer:
        e.g. a cross-attention layer without its image input); warned once and kept in the trace's metadata."""
        served = getattr(self, "served_layers", None) or {}
        out = {}
        for site, layers in served.items():
            if site in GLOBAL_SITES:
                continue
            seen = {layer for (s, layer) in self._store if s == site}
            missing = sorted(set(layers) - seen)
            if seen and missing:
                out[site] = missing
        if out and not getattr(self, "_warned_not_run", False):
            self._warned_not_run = True
            warnings.warn(f"Recorder: the model did not run some layers it was asked to record ({out}; it skipped "
                          "them in its forward, e.g. cross-attention layers without their image input), so those "
                          "sites have no tensor there; trace.meta['layers_not_run'] lists them.", stacklevel=3)
        return out

    def _build(self):
        from ..trace import Trace, rows_keys, site_key

        tensors: dict[str, torch.Tensor] = {}
        for (site, layer), values in self._store.items():
            for i, v in enumerate(values):
                tensors[site_key(site, None if site in GLOBAL_SITES else layer, i)] = v
        for (site, call), (pos, rmask) in self._rows.items():
            rows_name, mask_name = rows_keys(site, call)
            tensors[rows_name] = pos.to(torch.long)
            tensors[mask_name] = rmask.to(torch.bool)
        lens = self._lens
        meta = {
            "arbiter": "trace",
            "model": lens.facts.summary() if lens is not None else {},
            "sites": self.sites,
            "layers": sorted({layer for (_, layer) in self._store if layer is not None}),
            "rows": self.rows if isinstance(self.rows, (str, int)) else list(self.rows),
            "heads": self.heads,
            "calls": max(self._calls.values()) if self._calls else 0,
            "site_layouts": {s: SITES[s][2] for s in self.sites},
        }
        not_run = self._layers_not_run()
        if not_run:
            meta["layers_not_run"] = not_run
        groups = self._groups
        if groups is not None:
            meta["groups"] = groups.to_dict()
            meta["sample_ids"] = groups.sample_ids
        return Trace(tensors, meta)
