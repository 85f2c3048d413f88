"""Knockout: sever attention edges from key group ``src`` to query group ``dst`` (docs/methods/knockout.md).

It edits the ``attn.mask`` site: a False entry is finfo.min added to the score before the softmax, so the
remaining weights renormalise; the model's own mask (padding, sliding window, bidirectional blocks) is kept."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from ..errors import GroupError, SiteError
from .base import Ctx, Probe, batch_row_mask


class Knockout(Probe):
    """Queries in ``dst`` cannot attend to keys in ``src`` in the chosen layers (and heads, and batch rows).

    A query row whose every key would be masked keeps its own position (documented, never NaN); in a
    cross-attention layer, and in the cross-attention feeding a layer (``xattn.mask``, e.g. gated cross-attention
    blocks), such a row gets a zero attention output. There ``src`` matches every key or none,
    as the adapter's ``cross_key_groups`` say (e.g. ``src="image"``). A group empty for the whole batch raises
    GroupError unless ``allow_empty=True``, in which case the knockout is a bit-exact no-op there."""

    edits = {"attn.mask": "all", "xattn.mask": "all"}
    KEEP_ELEMENTS = 1 << 20   # kept-edge masks up to this many elements are built once per forward
    writes_masks_in_place = False   # returns a new mask (or the one it got, untouched)
    mask_rows_per_forward = True   # attn_mask_rows depends on the destination group only, not on the layer
    mask_edit_per_forward = True   # mask & the severed edges of this forward (per head count): the same in every layer
    optional_sites = frozenset({"xattn.mask"})   # a layer's cross-attention, severed where the layer has one

    def __init__(self, src: str, dst: str, heads: Sequence[int] | None = None,
                 batch_rows: Sequence[int] | None = None, allow_empty: bool = False):
        super().__init__()
        if not isinstance(src, str) or not isinstance(dst, str) or not src or not dst:
            raise GroupError(f"Knockout needs group names for src and dst, got src={src!r}, dst={dst!r}.")
        self.src, self.dst = src, dst
        self.heads = None if heads is None else sorted(set(int(h) for h in heads))
        self.batch_rows = None if batch_rows is None else sorted(set(int(r) for r in batch_rows))
        self.allow_empty = allow_empty
        self._head_sel: dict[int, torch.Tensor] = {}   # head count -> the chosen heads, [heads] bool on the CPU
        self._checked_step = None
        self._warned = False

    def on_attach(self, lens) -> None:
        self._warned = False
        if self.heads is not None:
            nh = min(lens.facts.heads(layer)[0] for layer in lens.facts.attention_layers)
            bad = [h for h in self.heads if not 0 <= h < nh]
            if bad:
                raise SiteError(f"Knockout: heads {bad} out of range; layers have {nh} heads (0..{nh - 1}).")

    def on_forward(self, ctx: Ctx) -> None:
        if ctx.step != 0:
            return
        rt, facts = ctx.lens._runtime, ctx.lens.facts
        if facts.encoder is not None:
            self._check_encoder_paths(ctx)
        if self.allow_empty:
            return
        for name in (self.src, self.dst):
            if name == "generated" or name in facts.cross_key_groups():
                continue
            if name == self.src and facts.encoder is not None:   # keys in the decoder or over the encoder
                n = rt.encoder_groups.length if rt.encoder_groups is not None else 1
                m = rt.encoder_key_mask(name, torch.arange(n)).any(dim=1)
                m = m | rt.decoder_key_mask(name, torch.arange(ctx.groups.length)).any(dim=1)
            else:
                m = ctx.groups[name]  # raises on unknown names
            if not bool(m.any()):
                raise GroupError(f"Knockout {self.src}->{self.dst}: group {name!r} is empty for every sample of "
                                 "this batch, so the knockout would do nothing; pass allow_empty=True if intended.")

    def _check_encoder_paths(self, ctx: Ctx) -> None:
        """An encoder-decoder's decoder: the knockout severs the cross-attention edges from the encoder's ``src``
        positions. Where the encoder's other positions hold more than ``src`` (e.g. an image and a prompt), its
        self-attention carries ``src`` into them: say so, unless an encoder Lens severs ``src`` there too."""
        enc = ctx.lens._runtime.encoder_groups
        if enc is None or self._warned:
            return
        parts = [p.strip() for p in self.src.split("|")]
        real = ~enc["pad"]
        src = torch.zeros_like(real)
        for p in parts:
            if p in enc:
                src |= enc[p]
        if not bool(src.any()) or not bool((real & ~src).any()):
            return   # the encoder holds src only, or none of it: its positions carry nothing else
        companion = ctx.lens.companion("encoder")
        if companion is not None and any(
                isinstance(a.probe, Knockout) and a.probe.src == self.src and a.probe.heads is None
                and len(a.layers.get("attn.mask", ())) == companion.facts.n_layers
                for a in companion._runtime.active):
            return
        self._warned = True
        warnings.warn(
            f"Knockout {self.src}->{self.dst} on an encoder-decoder's decoder severs the cross-attention edges "
            f"from the encoder's {self.src!r} positions; the encoder's other positions still carry {self.src!r} "
            "(its self-attention mixes them). To sever every path, knock it out in the encoder too, in every "
            f"layer: `with arbiter.attach(model, stack='encoder') as enc, enc.knockout({self.src!r}, 'text'):` "
            "around this one.", UserWarning, stacklevel=2)

    def _dst_rows(self, ctx: Ctx) -> torch.Tensor:
        """[b, q] on the CPU: the destination group's rows in the chosen batch rows."""
        q = ctx.group(self.dst, over="rows")
        keep = batch_row_mask(self.batch_rows, q.shape[0])
        return q if keep is None else q & keep[:, None]

    def attn_mask_rows(self, ctx: Ctx) -> torch.Tensor:
        """The rows the knockout edits: the destination group's (in the chosen batch rows)."""
        if self.heads is not None and not self.heads:   # no head chosen: nothing to sever
            return torch.zeros_like(ctx.group(self.dst, over="rows"))
        return self._dst_rows(ctx)

    def attn_mask(self, ctx: Ctx, mask: torch.Tensor) -> torch.Tensor:
        if self.heads is not None and not self.heads:
            return mask
        nh = ctx.heads[0] if self.heads is not None else None
        if nh == 0:
            lf = ctx.lens.facts.layers[ctx.layer]
            raise SiteError(f"Knockout heads={self.heads}: layer {ctx.layer} mixes tokens with a "
                            f"{lf.mixer_kind} layer, which has no attention heads, so a head-specific knockout "
                            "cannot be served there; knock out all heads, or pass "
                            "layers=lens.facts.attention_layers.")
        # the edges kept depend on the groups alone: built once per forward (one AND per layer) where they are
        # small (a few rows: the row-sliced path); a whole layer's [b, q, k] is rebuilt per layer, never held
        if mask.shape[0] * mask.shape[-2] * mask.shape[-1] <= self.KEEP_ELEMENTS:
            keep = ctx.per_forward(self, lambda: self._kept_edges(ctx, mask.device, nh), nh, str(mask.device))
        else:
            keep = self._kept_edges(ctx, mask.device, nh)
        return mask if keep is None else mask & keep

    def _kept_edges(self, ctx: Ctx, device, nh: int | None) -> torch.Tensor | None:
        """[b, 1|h, q, k]: False on the edges dst -> src this knockout severs; None: it severs none here."""
        q = self._dst_rows(ctx)                  # [b, q], on the CPU: the checks below never wait on the device
        k = ctx.group(self.src, over="keys")     # [b, k]
        if not bool(q.any()) or not bool(k.any()):
            return None
        q, k = ctx.on_device(q, device), ctx.on_device(k, device)
        sever = q[:, None, :, None] & k[:, None, None, :]      # [b, 1, q, k]
        if self.heads is not None:   # built on the CPU once per head count: its device copy is made once per forward
            sel = self._head_sel.get(nh)
            if sel is None:
                sel = self._head_sel[nh] = torch.zeros(nh, dtype=torch.bool)
                sel[self.heads] = True
            sever = sever & ctx.on_device(sel, device)[None, :, None, None]
        return ~sever

    def xattn_mask(self, ctx: Ctx, mask: torch.Tensor) -> torch.Tensor:
        """The cross-attention feeding a layer: the same edit, its keys grouped by the adapter."""
        return self.attn_mask(ctx, mask)

    def __repr__(self) -> str:
        return f"Knockout({self.src!r}->{self.dst!r}, heads={self.heads})"
