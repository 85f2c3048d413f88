"""The public hook-site API: named sites, the ``Probe`` base class users subclass, and the ``Ctx`` it receives.

Every built-in recorder and intervention is a Probe on these same sites; there is no second mechanism."""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence, Union

import torch

from ..errors import SiteError

if TYPE_CHECKING:  # pragma: no cover
    from ..groups import TokenGroups
    from ..lens import Lens

RowSpec = Union[str, int, Sequence[int]]

# site name -> (where it is served, editable, layout). Documented in README "Sites".
SITES: dict[str, tuple[str, bool, str]] = {
    "embed": ("pre-hook of layer 0", True, "[batch, seq, hidden] residual stream entering layer 0"),
    "resid.pre": ("pre-hook of the decoder layer", True, "[batch, seq, hidden] residual entering the layer"),
    "attn.q": ("attention function", True, "[batch, heads, seq, head_dim] queries after RoPE"),
    "attn.k": ("attention function", True, "[batch, kv_heads, keys, head_dim] keys after RoPE (rows = new keys)"),
    "attn.v": ("attention function", True, "[batch, kv_heads, keys, head_dim] values (rows = new keys)"),
    "attn.k_pre": ("hook of k_proj", False, "[batch, seq, kv_heads, head_dim] keys as k_proj emits them, before "
                                            "RoPE and norms (read only; layers with a k_proj Linear)"),
    "attn.mask": ("attention function", True, "[batch, 1|heads, seq, keys] bool, True = may attend; an edit "
                                              "is a -inf added to the scores before softmax (served under SDPA)"),
    "attn.scores": ("attention function", True, "[batch, heads, rows, keys] pre-softmax scores, masked; an edit "
                                                "recomputes the rows it names (the kernel runs the others)"),
    "attn.probs": ("attention function", True, "[batch, heads, rows, keys] attention probabilities; an edit "
                                               "recomputes the rows it names (the kernel runs the others)"),
    "attn.head_out": ("pre-hook of o_proj", True, "[batch, seq, heads, head_dim] per-head outputs (o_proj input)"),
    "attn.out": ("hook of the attention module", True, "[batch, seq, hidden] attention block output"),
    "resid.mid": ("pre-hook of the pre-MLP norm", False, "[batch, seq, hidden] residual between attention and MLP "
                                                         "(read only)"),
    "mlp.out": ("hook of the MLP", True, "[batch, seq, hidden] MLP output"),
    "resid.post": ("hook of the decoder layer", True, "[batch, seq, hidden] residual leaving the layer"),
    "logits": ("hook of the unembedding", True, "[batch, seq, vocab] final logits"),
}
GLOBAL_SITES = ("embed", "logits")
ATTENTION_SITES = ("attn.q", "attn.k", "attn.v", "attn.mask", "attn.scores", "attn.probs")
# the same sites on a cross-attention that feeds a layer besides its own token mixer (an encoder-decoder's
# cross-attention, gated cross-attention blocks between decoder layers): keys are another sequence's positions
CROSS_SITES = tuple("x" + site for site in ATTENTION_SITES)
for _site in ATTENTION_SITES:
    _where, _editable, _layout = SITES[_site]
    SITES["x" + _site] = (_where + " of the layer's cross-attention", _editable, _layout.replace("seq", "rows"))
ALIASES = {"attn": "attn.probs", "probs": "attn.probs", "scores": "attn.scores", "queries": "attn.q",
           "keys": "attn.k", "values": "attn.v", "heads": "attn.head_out", "resid": "resid.post",
           "mlp": "mlp.out", "q": "attn.q", "k": "attn.k", "v": "attn.v", "xattn": "xattn.probs"}


def batch_row_mask(batch_rows: Sequence[int] | None, batch: int) -> torch.Tensor | None:
    """[batch] bool on the CPU: True on the chosen batch rows (those beyond the batch ignored); None: every row."""
    if batch_rows is None:
        return None
    keep = torch.zeros(batch, dtype=torch.bool)
    keep[[r for r in batch_rows if r < batch]] = True
    return keep


def canonical_site(name: str) -> str:
    site = ALIASES.get(name, name)
    if site not in SITES:
        raise SiteError(f"unknown site {name!r}; sites are {', '.join(SITES)} (aliases: "
                        f"{', '.join(f'{k}->{v}' for k, v in ALIASES.items())}).")
    return site


@functools.lru_cache(maxsize=None)
def callback_name(site: str) -> str:
    """The Probe method serving ``site`` (``attn.probs`` -> ``attn_probs``); asked once per site and layer."""
    return site.replace(".", "_")


@dataclass
class Ctx:
    """What a probe callback knows about where it is.

    ``positions`` are the absolute positions (cache indices) of the rows handed to the callback (query rows
    for attention sites, new key rows for attn.k / attn.v, sequence rows elsewhere); ``row_mask[b, r]`` says
    whether row r belongs to the requested group for sample b (rows are the union over the batch)."""

    lens: "Lens"
    site: str
    layer: int | None
    step: int
    groups: "TokenGroups"
    positions: torch.Tensor
    row_mask: torch.Tensor
    query_positions: torch.Tensor | None = None
    key_positions: torch.Tensor | None = None
    cross: bool = False
    extra: dict = field(default_factory=dict)
    unit: str = "attn"   # "xattn" in the callbacks of a layer's cross-attention (CROSS_SITES)

    @property
    def batch_size(self) -> int:
        return self.row_mask.shape[0]

    @property
    def heads(self) -> tuple[int, int, int]:
        """(query heads, KV heads, head_dim) of this layer."""
        if self.layer is None:
            return (0, 0, 0)
        return self.lens.facts.cross_heads(self.layer) if self.unit == "xattn" else self.lens.facts.heads(self.layer)

    def on_device(self, t: torch.Tensor, device) -> torch.Tensor:
        """A CPU tensor this forward shares across layers (``group()``'s masks, ``row_mask``) on ``device``: copied
        once per forward, without making the host wait for the device."""
        return self.lens._runtime.to_device(t, device)

    def per_forward(self, owner: Any, build: Callable[[], Any], *key) -> Any:
        """``build()``, once per forward for ``owner`` (a probe), this callback's rows and keys and ``key``
        (hashable): what a probe derives from the token groups alone, not from the layer's values (a knockout's
        severed edges), is the same in every layer of a forward."""
        return self.lens._runtime.per_forward("probe", (owner, self.positions, self.key_positions), build,
                                              self.site, self.cross, self.layer if self.cross else None, self.unit,
                                              *key)

    def group(self, name: str, over: str = "rows") -> torch.Tensor:
        """Group mask restricted to this callback's rows (``over="rows"``) or keys (``over="keys"``): [batch, n]."""
        pos = self.positions if over == "rows" else self.key_positions
        facts, rt = self.lens.facts, self.lens._runtime
        # the same group over the same positions recurs in every layer of a forward: built once per forward
        return rt.per_forward("group", (pos,), lambda: self._group(name, over, pos, facts, rt), name, over,
                              self.cross and over == "keys", self.layer if self.cross else None, self.unit)

    def _group(self, name: str, over: str, pos: torch.Tensor, facts, rt) -> torch.Tensor:
        if over == "keys" and self.cross:
            inside = facts.cross_key_groups(self.layer, unit=self.unit)
            if inside or facts.encoder is None:   # every key is in the groups the adapter names, or in none
                val = any(part in inside for part in name.split("|"))
                return torch.full((self.batch_size, len(pos)), val, dtype=torch.bool)
            return rt.encoder_key_mask(name, pos)   # an encoder's positions, grouped from its inputs
        if over == "keys" and facts.encoder is not None:
            return rt.decoder_key_mask(name, pos)
        m = self.groups.mask(name, length=int(max(int(pos.max()) + 1 if len(pos) else 0, self.groups.length)))
        return m[:, pos.cpu()]


class Probe:
    """Base class for probes: read (and, if declared, edit) named sites while the model runs.

    Declare ``reads = {site: rows}`` and/or ``edits = {site: rows}``; rows is ``"all"``, a group name
    (``"last"``, ``"instruction"``, ``"image|context"``), or absolute positions. For each site define a method
    named after it with dots as underscores, ``def attn_probs(self, ctx, value)``. A read's return value is
    ignored; an edit must return the new value, same shape. ``layers`` picks the layers (``"all"``, a list,
    a range); ``steps`` picks ``"all"``, ``"prefill"`` or ``"decode"`` forward calls of ``generate()``.
    Use ``self.emit(key, tensor)`` to collect results and ``result()`` to read them; state may be kept
    across samples and decode steps. Several probes on one site run in activation order (outer ``with``
    first), each edit seeing the previous one's output; reads see the value as edited by earlier probes.
    """

    # sites served only on the layers that have them, never an error elsewhere (a knockout's cross-attention)
    optional_sites: ClassVar[frozenset[str]] = frozenset()
    # an attn.mask editor that never writes into the mask it is handed (it returns a new one, or that one untouched)
    # may say so: under torch.inference_mode arbiter then need not compare the mask with a copy to find out
    writes_masks_in_place: ClassVar[bool] = True
    # an attn.mask editor whose edit depends only on the forward (its groups and positions), the mask rows it is
    # handed and the layer's head count, never on the layer itself, may say so: where it edits a few rows (the
    # row-sliced path), arbiter then edits those rows once per forward and reuses the result in every layer that
    # hands it the same mask rows and head count
    mask_edit_per_forward: ClassVar[bool] = False
    reads: ClassVar[Mapping[str, RowSpec]] = {}
    edits: ClassVar[Mapping[str, RowSpec]] = {}
    layers: Any = "all"
    steps: str = "all"

    def __init__(self) -> None:
        self._emitted: dict[Any, list[torch.Tensor]] = defaultdict(list)

    # -- declarations, resolved by the lens ----------------------------------------------------------------
    def site_specs(self) -> dict[str, tuple[str, RowSpec]]:
        """{site: ("read"|"edit", rows)} with aliases resolved; checks that callbacks exist."""
        out: dict[str, tuple[str, RowSpec]] = {}
        for mode, decl in (("read", type(self).reads if not hasattr(self, "_reads") else self._reads),
                           ("edit", type(self).edits if not hasattr(self, "_edits") else self._edits)):
            for name, rows in decl.items():
                site = canonical_site(name)
                if mode == "edit" and not SITES[site][1]:
                    raise SiteError(f"{type(self).__name__}: site {site!r} is read-only; edit resid.pre of the "
                                    "next layer, attn.out or mlp.out instead.")
                if not callable(getattr(self, callback_name(site), None)):
                    raise SiteError(f"{type(self).__name__} declares site {site!r} but has no method "
                                    f"{callback_name(site)}(self, ctx, value).")
                if site in out and out[site][0] != mode:
                    mode = "edit"
                out[site] = (mode, rows)
        if not out:
            raise SiteError(f"{type(self).__name__} declares no site: set reads = {{site: rows}} or edits.")
        return out

    # -- collecting ---------------------------------------------------------------------------------------
    def emit(self, key: Any, value: torch.Tensor) -> None:
        """Keep a detached copy of ``value`` under ``key`` (e.g. the layer)."""
        self._emitted[key].append(value.detach().clone() if isinstance(value, torch.Tensor) else value)

    def reset(self) -> None:
        self._emitted = defaultdict(list)

    def result(self) -> Any:
        """Default: one emit per key -> tensors stacked over sorted keys (e.g. [layers, ...]) when shapes agree,
        else {key: value}; several emits per key (decode steps, several forwards) -> {key: [values]}."""
        if not self._emitted:
            return None
        keys = sorted(self._emitted, key=lambda k: (str(type(k)), k))
        if all(len(self._emitted[k]) == 1 for k in keys):
            vals = [self._emitted[k][0] for k in keys]
            if all(isinstance(v, torch.Tensor) for v in vals) and len({tuple(v.shape) for v in vals}) == 1:
                return torch.stack(vals)
            return {k: v for k, v in zip(keys, vals)}
        return {k: list(self._emitted[k]) for k in keys}

    def attn_mask_rows(self, ctx: Ctx) -> torch.Tensor | None:
        """Optional, for a probe that edits ``attn.mask``: the query rows its edit can change, as a [batch, rows]
        bool over ``ctx.positions``, or None (any row; the default). Where every mask editor of a layer names its
        rows and they are few, the Lens runs the layer's own kernel for every row and recomputes those rows
        alone (then the edit receives only those rows of the mask). A probe whose rows are the same in every
        layer of a forward sets ``mask_rows_per_forward = True`` and is asked once per forward."""
        return None

    # -- lifecycle hooks (optional) ------------------------------------------------------------------------
    def on_attach(self, lens: "Lens") -> None:
        """Called when the probe is activated (validate parameters against the model here). ``served_layers``
        ({site: [layers]}, set by the Lens just before) says on which layers each site will be called."""

    def on_detach(self, lens: "Lens") -> None:
        """Called when the probe's ``with`` block ends, also on exceptions."""

    def on_forward(self, ctx: Ctx) -> None:
        """Called at the start of every forward call of the text decoder (one per decode step)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
