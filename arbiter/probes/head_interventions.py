"""Head-level and residual interventions: scale (block / amplify), mean-ablate and patch heads; patch residuals.

All edit the ``attn.head_out`` site (the o_proj input seen as [batch, seq, heads, head_dim]) or ``resid.*``."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..errors import InterventionError, SiteError
from ..trace import Trace, site_key
from .base import Ctx, Probe, RowSpec, batch_row_mask


def _check_heads(heads: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for item in heads:
        try:
            layer, head = item
            out.append((int(layer), int(head)))
        except (TypeError, ValueError):
            raise InterventionError(f"heads must be (layer, head) pairs, got {item!r}.") from None
    return out


def _validate_range(lens, heads: list[tuple[int, int]], who: str) -> None:
    n = lens.facts.n_layers
    for layer, head in heads:
        if not 0 <= layer < n:
            raise SiteError(f"{who}: layer {layer} out of range; this model has {n} text layers (0..{n - 1}).")
        nh, nkv, _ = lens.facts.heads(layer)
        if nh == 0:
            raise SiteError(f"{who}: layer {layer} has no softmax attention ({lens.facts.layers[layer].skip_reason}).")
        if not 0 <= head < nh:
            raise SiteError(f"{who}: head {head} out of range at layer {layer}: it has {nh} query heads "
                            f"(0..{nh - 1}) sharing {nkv} KV heads; head indices name query heads, not KV groups.")


def _row_factor(ctx: Ctx, batch_rows: Sequence[int] | None, device) -> torch.Tensor:
    """[b, R] bool on ``device``: where the intervention applies (row belongs to the group for that sample, batch
    row chosen); built on the CPU and copied without making the host wait on an accelerator."""
    m, keep = ctx.row_mask, batch_row_mask(batch_rows, ctx.row_mask.shape[0])
    return ctx.on_device(m if keep is None else m & keep[:, None], device)


def _head_selection(cache: dict, heads: Sequence[tuple[int, int]], layer: int, n_heads: int) -> torch.Tensor:
    """[heads] bool on the CPU: the chosen heads of ``layer`` (kept in ``cache``: one tensor per layer, so its
    device copy is made once per forward)."""
    key = ("sel", layer, n_heads)
    if key not in cache:
        sel = torch.zeros(n_heads, dtype=torch.bool)
        sel[[h for lay, h in heads if lay == layer]] = True
        cache[key] = sel
    return cache[key]


class HeadScale(Probe):
    """Multiply heads' outputs by ``alpha`` (amplification; ``alpha=0`` blocks). ``alpha`` may be one number or
    one per head. ``table`` instead gives per batch row scales: {layer: tensor [batch, heads]} (used by sweeps,
    where each batch row carries a different setting)."""

    def __init__(self, heads: Iterable[tuple[int, int]] = (), alpha: float | Sequence[float] = 2.0,
                 rows: RowSpec = "all", batch_rows: Sequence[int] | None = None,
                 table: Mapping[int, torch.Tensor] | None = None):
        super().__init__()
        self.heads = _check_heads(heads)
        alphas = [alpha] * len(self.heads) if isinstance(alpha, (int, float)) else list(alpha)
        if len(alphas) != len(self.heads):
            raise InterventionError(f"got {len(alphas)} alphas for {len(self.heads)} heads.")
        for a in alphas:
            if not isinstance(a, (int, float)) or not math.isfinite(a):
                raise InterventionError(f"alpha must be a finite number, got {a!r}.")
        self.alphas = [float(a) for a in alphas]
        self.table = {int(k): torch.as_tensor(v, dtype=torch.float32) for k, v in (table or {}).items()}
        for k, v in self.table.items():
            if v.dim() != 2 or not torch.isfinite(v).all():
                raise InterventionError(f"table[{k}] must be a finite [batch, heads] tensor, got {tuple(v.shape)}.")
        self._table_ones = {k: bool((v == 1).all()) for k, v in self.table.items()}
        self.layer_list = sorted({layer for layer, _ in self.heads} | set(self.table))
        self.batch_rows = None if batch_rows is None else [int(r) for r in batch_rows]
        self._edits = {"attn.head_out": rows}
        self._reads = {}
        # every row of every sample scaled: the factor is per head alone (no per-row selection to build)
        self._every_row = isinstance(rows, str) and rows == "all" and self.batch_rows is None
        self._factors: dict[tuple, torch.Tensor | None] = {}   # scales, factors, head selections (CPU): built once

    def on_attach(self, lens) -> None:
        _validate_range(lens, self.heads, type(self).__name__)
        for layer, t in self.table.items():
            _validate_range(lens, [(layer, t.shape[1] - 1)], type(self).__name__)

    def _layer_scale(self, layer: int, b: int, nh: int) -> torch.Tensor | None:
        """float32 scales of ``layer`` on the CPU, built once: [b, heads] from ``table``, else [heads] (None: every
        head at 1)."""
        if layer in self.table:
            t = self.table[layer]
            if t.shape[0] != b or t.shape[1] != nh:
                raise InterventionError(f"table[{layer}] is {tuple(t.shape)} but the batch has {b} rows and {nh} "
                                        "heads.")
            return None if self._table_ones[layer] else t
        key = ("scale", layer, nh)
        if key not in self._factors:
            vals = [1.0] * nh
            for (lay, h), a in zip(self.heads, self.alphas):
                if lay == layer:
                    vals[h] = a
            self._factors[key] = None if all(v == 1.0 for v in vals) else torch.tensor(vals)
        return self._factors[key]

    def _factor(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """What multiplies ``x`` [b, rows, heads, dim] on every row (None: nothing to scale), built once per layer,
        shape and dtype on the CPU: [1 | b, 1, heads, dim] in x's dtype (a full head dim: a product with no
        broadcast inside a row runs 1.5-4x faster on a CPU than one against [.., heads, 1])."""
        b, _, nh, hd = x.shape
        key = ("every", layer, b, nh, hd, x.dtype)
        if key not in self._factors:
            scale = self._layer_scale(layer, b, nh)
            if scale is None:
                self._factors[key] = None
            else:
                f = scale.to(x.dtype)
                f = f[None, None, :, None] if f.dim() == 1 else f[:, None, :, None]
                self._factors[key] = f.expand(-1, -1, -1, hd).contiguous()
        return self._factors[key]

    def attn_head_out(self, ctx: Ctx, x: torch.Tensor) -> torch.Tensor:
        # factors are built on the CPU and copied with ctx.on_device: no host wait on an accelerator
        if self._every_row:
            f = self._factor(ctx.layer, x)
            return x if f is None else x * ctx.on_device(f, x.device)
        b, _, nh, _ = x.shape
        scale = self._layer_scale(ctx.layer, b, nh)
        if scale is None:
            return x
        scale = ctx.on_device(scale, x.device)
        where = _row_factor(ctx, self.batch_rows, x.device)                       # [b, R]
        per = scale[:, None, :] if scale.dim() == 2 else scale[None, None, :]
        factor = torch.where(where[:, :, None], per, torch.ones((), device=x.device))
        return x * factor[..., None].to(x.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(heads={self.heads}, alpha={self.alphas})"


class HeadBlock(HeadScale):
    """Block heads: ``mode="zero"`` sets their output to 0; ``mode="mean"`` replaces it by its mean over a
    reference (a dict of model inputs run once at activation, a Trace with ``attn.head_out``, or
    {layer: tensor [..., heads, head_dim]})."""

    def __init__(self, heads: Iterable[tuple[int, int]], mode: str = "zero", reference: Any = None,
                 rows: RowSpec = "all", batch_rows: Sequence[int] | None = None):
        heads = _check_heads(heads)
        super().__init__(heads, alpha=0.0, rows=rows, batch_rows=batch_rows)
        if mode not in ("zero", "mean"):
            raise InterventionError(f"HeadBlock mode must be 'zero' or 'mean', got {mode!r}.")
        if mode == "mean" and reference is None:
            raise InterventionError("HeadBlock(mode='mean') needs reference= inputs, a Trace or {layer: tensor}.")
        self.mode, self.reference = mode, reference
        self._means: dict[int, torch.Tensor] = {}

    def on_attach(self, lens) -> None:
        super().on_attach(lens)
        if self.mode != "mean":
            return
        ref = self.reference
        if isinstance(ref, Mapping) and ref and all(isinstance(k, str) for k in ref) and not _is_trace(ref):
            from .record import Recorder

            rec = Recorder("attn.head_out")
            with lens.probe(rec, layers=self.layer_list), torch.no_grad():
                lens.model(**ref)
            ref = rec.trace
        for layer in self.layer_list:
            t = ref.site("attn.head_out", layer) if _is_trace(ref) else ref[layer]
            self._means[layer] = t.reshape(-1, t.shape[-2], t.shape[-1]).float().mean(0)

    def attn_head_out(self, ctx: Ctx, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "zero":
            return super().attn_head_out(ctx, x)
        mean = ctx.on_device(self._means[ctx.layer], x.device).to(x.dtype)        # [heads, d]
        sel = ctx.on_device(_head_selection(self._factors, self.heads, ctx.layer, x.shape[2]), x.device)
        where = _row_factor(ctx, self.batch_rows, x.device)[:, :, None] & sel[None, None, :]
        return torch.where(where[..., None], mean[None, None], x)


def _is_trace(obj) -> bool:
    return isinstance(obj, Trace)


def _source_tensor(source: Any, site: str, layer: int) -> torch.Tensor:
    key = site_key(site, layer)
    if _is_trace(source) or (isinstance(source, Mapping) and key in source):
        return source[key]
    if isinstance(source, Mapping) and layer in source:
        return source[layer]
    if isinstance(source, torch.Tensor):
        return source
    raise InterventionError(f"patch source has no {key!r} (nor an entry for layer {layer}); record it with "
                            f"lens.record(...) on the source run.")


class HeadPatch(Probe):
    """Replace heads' outputs by those of another run (``source``: a Trace recorded with rows="all",
    or {layer: tensor [batch, seq, heads, head_dim]})."""

    def __init__(self, heads: Iterable[tuple[int, int]], source: Any, rows: RowSpec = "all",
                 batch_rows: Sequence[int] | None = None):
        super().__init__()
        self.heads = _check_heads(heads)
        self.source = source
        self.layer_list = sorted({layer for layer, _ in self.heads})
        self.batch_rows = batch_rows
        self._edits = {"attn.head_out": rows}
        self._reads = {}
        self._sel: dict = {}   # per layer: the chosen heads, [heads] bool on the CPU

    def on_attach(self, lens) -> None:
        _validate_range(lens, self.heads, "HeadPatch")
        for layer in self.layer_list:
            _source_tensor(self.source, "attn.head_out", layer)

    def attn_head_out(self, ctx: Ctx, x: torch.Tensor) -> torch.Tensor:
        src = _source_tensor(self.source, "attn.head_out", ctx.layer)
        full_len = int(ctx.positions.max()) + 1
        if src.dim() != 4 or src.shape[0] not in (1, x.shape[0]) or src.shape[2:] != x.shape[2:] \
                or src.shape[1] < full_len:
            raise InterventionError(f"HeadPatch source for layer {ctx.layer} has shape {tuple(src.shape)}; expected "
                                    f"[{x.shape[0]}, >={full_len}, {x.shape[2]}, {x.shape[3]}] (record it with "
                                    "rows='all' on an input of the same length).")
        # the source's rows: its one copy to the device (as large as the rows patched) is not cached per forward
        src = src[:, ctx.on_device(ctx.positions, src.device)].to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
        sel = ctx.on_device(_head_selection(self._sel, self.heads, ctx.layer, x.shape[2]), x.device)
        where = _row_factor(ctx, self.batch_rows, x.device)[:, :, None] & sel[None, None, :]
        return torch.where(where[..., None], src, x)


class ResidPatch(Probe):
    """Replace the residual stream (``resid.post`` or ``resid.pre``) at one layer and chosen rows by ``source``
    (a Trace, {layer: tensor} or a tensor [batch, seq, hidden])."""

    def __init__(self, site: str, source: Any, rows: RowSpec = "all", batch_rows: Sequence[int] | None = None):
        super().__init__()
        if site not in ("resid.post", "resid.pre"):
            raise InterventionError(f"ResidPatch patches 'resid.post' or 'resid.pre', not {site!r}.")
        self.site, self.source, self.batch_rows = site, source, batch_rows
        self._edits = {site: rows}
        self._reads = {}

    def _patch(self, ctx: Ctx, x: torch.Tensor) -> torch.Tensor:
        src = _source_tensor(self.source, self.site, ctx.layer)
        full_len = int(ctx.positions.max()) + 1
        if src.dim() != 3 or src.shape[0] not in (1, x.shape[0]) or src.shape[2] != x.shape[2] \
                or src.shape[1] < full_len:
            raise InterventionError(f"ResidPatch source has shape {tuple(src.shape)}; expected [{x.shape[0]}, "
                                    f">={full_len}, {x.shape[2]}].")
        src = src[:, ctx.on_device(ctx.positions, src.device)].to(x.device, x.dtype).expand(x.shape[0], -1, -1)
        where = _row_factor(ctx, self.batch_rows, x.device)
        return torch.where(where[..., None], src, x)

    def resid_post(self, ctx: Ctx, x: torch.Tensor) -> torch.Tensor:
        return self._patch(ctx, x)

    def resid_pre(self, ctx: Ctx, x: torch.Tensor) -> torch.Tensor:
        return self._patch(ctx, x)
