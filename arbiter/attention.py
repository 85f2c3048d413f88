"""The attention router: arbiter's one attention function, registered and switched through transformers' public API.

Untouched layers call the implementation the user loaded (SDPA, eager, flash, any registered kernel), bit-exact;
layers with attention-level probes get their masks edited and their requested rows read by the model's own eager
function on the row-sliced queries."""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from typing import TYPE_CHECKING, Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask,
                                        flash_attention_mask, sdpa_mask)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .adapters.base import module_eager_function
from .errors import SiteError, UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from .lens import Lens

# attention module -> (lens, layer index); entries live only while a Lens is attached
RUNTIME: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[Lens, int]]" = weakref.WeakKeyDictionary()

PREFIX = "arbiter_"
# id(text config) -> [weak reference to it, base implementation, number of Lenses routing it]: an encoder-decoder
# whose stacks share one config is switched once and restored when the last of its Lenses closes
_SHARED: dict[int, list] = {}
# mask functions whose masks arbiter can read and edit: None, 2D padding masks, 4D bool or float masks
EDITABLE_MASKS = (sdpa_mask, eager_mask, flash_attention_mask)


def routed_name(base: str) -> str:
    """The registered name that routes through arbiter and falls back to ``base`` (e.g. ``arbiter_sdpa``)."""
    return PREFIX + base


def base_function(base: str, module: torch.nn.Module) -> Callable:
    """The attention function ``base`` names, as transformers would dispatch it for this module."""
    if base == "eager":
        return module_eager_function(module)
    return ALL_ATTENTION_FUNCTIONS[base]


def _make(base: str) -> Callable:
    def arbiter_attention(module, query, key, value, attention_mask, **kwargs):
        fn = base_function(base, module)
        entry = RUNTIME.get(module)
        if entry is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        lens, layer, *unit = entry
        return lens._runtime.attention(layer, module, fn, base, query, key, value, attention_mask, kwargs, *unit)

    arbiter_attention.__name__ = f"arbiter_{base}_attention"
    return arbiter_attention


def register(base: str) -> str:
    """Register the routed twin of ``base`` (attention function + the base's own mask function); idempotent."""
    name = routed_name(base)
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS.valid_keys():
            raise UnsupportedModelError(
                f"the model's text attention runs {base!r}, which transformers' AttentionInterface does not know, "
                "so arbiter cannot route it; load the model with attn_implementation='sdpa' or 'eager'.")
        if base not in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
            raise UnsupportedModelError(
                f"the model's text attention runs {base!r}, which has no mask function in transformers' "
                "AttentionMaskInterface; load the model with attn_implementation='sdpa' or 'eager'.")
        AttentionInterface.register(name, _make(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def config_path(model: torch.nn.Module, target) -> list[str] | None:
    """Sub-config keys leading from ``model.config`` to ``target`` ([] for the top config), None if not found."""
    todo = [(model.config, [])]
    seen = set()
    while todo:
        cfg, path = todo.pop(0)
        if cfg is target:
            return path
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None:
                todo.append((sub, [*path, key]))
    return None


class AttentionRouter:
    """Switches a model's text stack to arbiter's routed attention and back, with ``set_attn_implementation``."""

    def __init__(self, model: torch.nn.Module, text_config):
        self.model = model
        self.text_config = text_config
        self.base: str | None = None
        self.path: list[str] | None = None

    def _request(self, implementation: str):
        req: object = {"": implementation}   # the text stack alone, not the sub-configs nested in it
        for key in reversed(self.path or []):
            req = {key: req}
        return req

    def install(self) -> None:
        shared = _SHARED.get(id(self.text_config))
        if shared is not None and shared[0]() is self.text_config and \
                self.text_config._attn_implementation == routed_name(shared[1]):
            shared[2] += 1   # another stack of the same model, attached by its own Lens: already routed
            self.base, self.path = shared[1], config_path(self.model, self.text_config)
            return
        base = self.text_config._attn_implementation or "sdpa"
        if base.startswith(PREFIX):
            raise UnsupportedModelError("this model is already routed through arbiter (another Lens is attached "
                                        "to it); detach that Lens first.")
        self.path = config_path(self.model, self.text_config)
        if self.path is None or not hasattr(self.model, "set_attn_implementation"):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: arbiter switches attention through the model's "
                "set_attn_implementation(), but the text config is not reachable from model.config's sub-configs.")
        name = register(base)
        self.base = base
        try:
            self.model.set_attn_implementation(self._request(name))
        except Exception as e:  # noqa: BLE001 - transformers validates every sub-model, not only the text stack
            with contextlib.suppress(Exception):
                self.model.set_attn_implementation(self._request(base))
            self.base = None
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: switching its text attention to {name!r} through "
                f"set_attn_implementation() failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the model "
                "is left as it was. Load the model (all its sub-models) with an attention implementation they "
                "support, e.g. attn_implementation='eager'.") from e
        if self.text_config._attn_implementation != name:
            self.model.set_attn_implementation(self._request(base))
            raise UnsupportedModelError(
                f"{type(self.model).__name__} did not accept attention implementation {name!r} through "
                "set_attn_implementation() (its modeling code does not dispatch through AttentionInterface), so "
                "arbiter cannot see its attention; attention sites and knockouts are not available for it.")
        _SHARED[id(self.text_config)] = [weakref.ref(self.text_config), base, 1]

    def remove(self) -> None:
        if self.base is None:
            return
        shared = _SHARED.get(id(self.text_config))
        if shared is not None and shared[0]() is self.text_config:
            shared[2] -= 1
            if shared[2] > 0:   # another Lens still routes this config
                self.base = None
                return
            del _SHARED[id(self.text_config)]
        if self.text_config._attn_implementation != self.base:
            self.model.set_attn_implementation(self._request(self.base))
        self.base = None

    def check_editable(self) -> None:
        """Attention-level probes need masks arbiter can read: raise a clear error where they cannot be."""
        if ALL_MASK_ATTENTION_FUNCTIONS[self.base] not in EDITABLE_MASKS:
            raise SiteError(f"attention sites need a mask arbiter can read and edit (None, a 2D padding mask or a "
                            f"4D mask); this model runs {self.base!r}, whose masks are of another kind. Call "
                            "model.set_attn_implementation('sdpa') (or 'eager') before attaching.")


# -- helpers used by the runtime ---------------------------------------------------------------------------

def bool_mask(attention_mask, module, kwargs, b: int, q_pos: torch.Tensor, k_pos: torch.Tensor,
              cross: bool, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own mask as bool [b, 1|h, q, k] (True = may attend) and, for float masks, the float values.

    Reads every mask form transformers hands an attention function: None (causal, or all keys for
    cross-attention), a 2D padding mask (flash kernels; causal and sliding window rebuilt from the call's
    kwargs), a 4D bool mask (SDPA) or a 4D float mask (eager)."""
    q, k = len(q_pos), len(k_pos)
    if attention_mask is None or attention_mask.dim() == 2:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if causal and not cross:
            m = q_pos[:, None] >= k_pos[None, :]
            window = kwargs.get("sliding_window")
            if window:
                m = m & ((q_pos[:, None] - k_pos[None, :]) < window)
            m = m.to(device)
        else:
            m = torch.ones(q, k, dtype=torch.bool, device=device)
        m = m.expand(b, 1, q, k)
        if attention_mask is not None:
            m = m & attention_mask[:, -k:].to(device=device, dtype=torch.bool)[:, None, None, :]
        return m, None
    am = attention_mask
    if am.dim() != 4:
        raise SiteError(f"arbiter cannot read an attention mask of shape {tuple(am.shape)}; attention sites need "
                        "a 2D padding mask or a 4D mask (load the model with attn_implementation='sdpa').")
    am = am[..., -k:] if am.shape[-1] != k else am
    if am.dtype == torch.bool:
        return am.expand(b, am.shape[1], q, k) if am.shape[0] == 1 else am, None
    m = am > torch.finfo(am.dtype).min / 2
    return (m.expand(b, am.shape[1], q, k) if am.shape[0] == 1 else m), am


def protect_empty_rows(m: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with every key masked keep their own position (documented; never NaN). Returns (mask, empty rows)."""
    empty = ~m.any(dim=-1)  # [b, h, q]
    if m.device.type == "cpu" and not bool(empty.any()):   # on an accelerator: no wait, the OR below is a no-op
        return m, empty
    diag = (k_pos[None, :] == q_pos[:, None]).to(m.device)  # [q, k]
    return m | (empty[..., None] & diag), empty


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim tensor holding ``value``, made once per (value, dtype, device): the masks built at every forward use
    it as an operand only (on an accelerator, no fill launched each time)."""
    return torch.full((), value, dtype=dtype, device=device)


def float_mask(mask_bool: torch.Tensor, mask_float: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask for eager attention: the model's float values where allowed and where the model masks
    too (rows it masks entirely, padding rows, keep its exact softmax: some models' own masks mix finfo.min and
    -inf there), finfo.min where only the (edited) bool mask masks."""
    lowest = _constant(torch.finfo(dtype).min, dtype, mask_bool.device)
    if mask_float is None:
        return torch.where(mask_bool, _constant(0.0, dtype, mask_bool.device), lowest)
    model = mask_float.to(dtype)
    return torch.where(mask_bool | (model <= lowest / 2), model, lowest)


# tensor keyword arguments of attention calls that do not enter the scores of eager / SDPA attention
_POSITIONAL_KWARGS = frozenset({"position_ids", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "s_aux",
                                "sinks", "max_length_q", "max_length_k"})


def score_terms(kwargs) -> list[str]:
    """Tensor keyword arguments that may add to the attention scores (a position bias, ...): arbiter's own score
    formula does not know them."""
    return sorted([k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in _POSITIONAL_KWARGS])


def row_kwargs(kwargs, rows: torch.Tensor, q_len: int, k_len: int) -> dict | None:
    """The call's keyword arguments for a subset of its query rows: per-query-and-key tensors ([..., q, k], e.g. a
    position bias) cut to those rows; None when a tensor has a query dimension arbiter cannot place."""
    terms = score_terms(kwargs)
    if not terms:
        return kwargs
    out = dict(kwargs)
    for name in terms:
        v = kwargs[name]
        if v.dim() >= 2 and v.shape[-2] == q_len and v.shape[-1] == k_len:
            out[name] = v.index_select(-2, rows.to(v.device)) if v.shape[-2] > 1 else v
        elif q_len in v.shape and q_len > 1:
            return None
    return out


def plain_keys(key: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The keys a computation of a few query rows multiplies. Keys usually arrive as a [batch, keys, heads, dim]
    buffer seen as [batch, heads, keys, dim]: the scores' matmul would gather them transposed (a slow strided copy;
    measured warm, 4 × 4 heads × 624 keys, one row: 123 µs against 55 µs with the plain copy first), so they are
    copied plainly first (grouped keys are copied contiguous by repeat_kv anyway)."""
    return key.contiguous() if key.shape[1] == query.shape[1] and not key.is_contiguous() else key


def row_scores(module, query_rows, key, mask_rows_bool, mask_rows_float, kwargs) -> torch.Tensor:
    """Pre-softmax scores of the given query rows (scaling, softcap, mask), as eager attention forms them.

    Eager functions return probabilities only, so this is the one place arbiter forms scores itself; layers
    whose eager function adds terms to the softmax (attention sinks) refuse score edits (see ``check_score_edit``)."""
    extra = score_terms(kwargs)
    if extra:
        raise SiteError(f"{type(module).__name__}'s attention receives {', '.join(extra)}, which may add to its scores; "
                        "arbiter's score formula (scaling, softcap, mask) does not include it, so attn.scores cannot "
                        "be served here. Read attn.probs (computed by the module's own eager function) instead.")
    n_rep = query_rows.shape[1] // key.shape[1]
    k = repeat_kv(key, n_rep)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", query_rows.shape[-1] ** -0.5)
    scores = torch.matmul(query_rows, k.transpose(2, 3)) * scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask_rows_float is not None:
        scores = scores + mask_rows_float
    return scores.masked_fill(~mask_rows_bool, torch.finfo(scores.dtype).min)


def row_probs(module, query_rows, key, value, mask_rows_bool, mask_rows_float, kwargs,
              additive: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities of the given query rows, computed by the module's own eager attention function
    (its scaling, softcap, sinks and dtype handling), with the (possibly edited) mask of those rows; ``additive``:
    that mask already in float_mask's form."""
    # the values enter only the output, which is not wanted here: an empty head dimension (same dtype, device and
    # heads) spares the probs @ values product and its read of every value (tests: probabilities bit-identical for
    # every eager function transformers ships)
    return _eager_rows(module, query_rows, key, value.narrow(-1, 0, 0), mask_rows_bool, mask_rows_float, kwargs,
                       additive)[1]


def row_attention(module, query_rows, key, value, mask_rows_bool, mask_rows_float, kwargs,
                  additive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [b, rows, heads, dim], probabilities [b, heads, rows, keys]) of the given query rows from one call of
    the module's own eager function: rows that an edited mask recomputes and a reader reads are computed once (their
    probabilities are :func:`row_probs`' bit for bit; their output is the masked computation's, in the eager
    function's arithmetic). Only where the call has no dropout (see :func:`fuses_output`)."""
    return _eager_rows(module, query_rows, key, value, mask_rows_bool, mask_rows_float, kwargs, additive)


def fuses_output(kwargs) -> bool:
    """Whether an edited row's output may come from the eager call that reads its probabilities: not where the call
    applies dropout (the probabilities read are those before dropout; the output has it)."""
    return not kwargs.get("dropout")


def _eager_rows(module, query_rows, key, value, mask_rows_bool, mask_rows_float, kwargs, additive):
    mask = float_mask(mask_rows_bool, mask_rows_float, query_rows.dtype) if additive is None else additive
    out, probs = module_eager_function(module)(module, query_rows, key, value, mask, **{**kwargs, "dropout": 0.0})
    if probs is None or probs.shape[-1] != key.shape[2]:
        raise SiteError(f"{type(module).__name__}'s eager attention function did not return [batch, heads, rows, "
                        f"keys] probabilities (got {None if probs is None else tuple(probs.shape)}); attn.probs "
                        "cannot be read on this layer.")
    return out, probs


@functools.lru_cache(maxsize=None)
def dispatches(cls: type) -> bool:
    """Whether an attention module class's forward calls transformers' attention interface (so the router sees it),
    read off its source; True where the source cannot be read."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True
    return "ALL_ATTENTION_FUNCTIONS" in src or "AttentionInterface" in src


def check_dispatch(module, layers: list[int], who: str) -> None:
    """Attention-level sites need the module to call the attention function: refuse one that computes inline."""
    if not dispatches(type(module)):
        raise SiteError(f"{who}: layers {layers} run {type(module).__name__}, which computes attention inline instead "
                        "of calling transformers' AttentionInterface, so arbiter can neither read nor edit it there "
                        "(attn.q/k/v/mask/scores/probs, knockouts). Register an adapter whose attention_stand_ins() "
                        "routes it (as arbiter/adapters/git.py does for GIT), or use the attn.head_out, attn.out and "
                        "residual sites.")


def check_score_edit(module, layer: int) -> None:
    """Editing scores or probabilities recomputes the layer from scores; refuse layers whose softmax has extra terms."""
    if getattr(module, "sinks", None) is not None:
        raise SiteError(f"layer {layer}: {type(module).__name__} adds attention sinks to its softmax, which "
                        "arbiter's score-level recomputation does not model; edit attn.mask (knockout) or "
                        "attn.head_out instead, or read attn.probs (served by the model's own eager function).")


def softmax_probs(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


def eager_output(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    n_rep = probs.shape[1] // value.shape[1]
    out = torch.matmul(probs, repeat_kv(value, n_rep))
    return out.transpose(1, 2).contiguous()


def merge_rows(out: tuple, idx: torch.Tensor | None, rows_out: torch.Tensor, rows_weights: torch.Tensor | None,
               take: torch.Tensor | None, empty: torch.Tensor | None) -> tuple:
    """A kernel's result ``out`` (output [b, q, h, d], weights [b, h, q, k] or None) with the rows at ``idx`` (None:
    every row) recomputed: ``rows_out`` [b, rows, h, d] and ``rows_weights`` [b, h, rows, k] taken where ``take``
    [b, h|1, rows] says (None: everywhere), the kernel's kept elsewhere; rows in ``empty`` [b, h|1, rows] (a
    cross-attention row left with no key) output zero."""
    o, weights = out
    rows_out = rows_out.to(o.dtype)
    if empty is not None:
        rows_out = rows_out * (~empty).transpose(1, 2)[..., None].to(rows_out.dtype)
    if take is not None:
        rows_out = torch.where(take.transpose(1, 2)[..., None], rows_out, o if idx is None else o.index_select(1, idx))
    if weights is not None and rows_weights is not None:
        w = rows_weights.to(weights.dtype)
        if take is not None:
            w = torch.where(take[..., None], w, weights if idx is None else weights.index_select(2, idx))
        weights = w if idx is None else weights.index_copy(2, idx, w)
    if idx is None:
        return rows_out, weights
    # the kernel's output is the call's own tensor: written in place unless autograd may need it
    return (o.index_copy(1, idx, rows_out) if o.requires_grad else o.index_copy_(1, idx, rows_out)), weights


def masked_attention(base: str, fn: Callable, module, query, key, value, mask_bool, mask_float, kwargs,
                     additive: torch.Tensor | None = None):
    """Attention with an edited mask: the eager function under eager, SDPA otherwise (flash kernels take no dense
    mask, so an edited layer switches to SDPA; untouched layers keep the kernel). ``additive``: the mask already in
    float_mask's form (built once per forward where the edit is shared by the layers): SDPA then takes it as it is
    instead of turning the bool mask into an additive one in every layer (not beside a position bias, which SDPA
    combines with a bool mask its own way)."""
    if base == "eager":
        return fn(module, query, key, value,
                  float_mask(mask_bool, mask_float, query.dtype) if additive is None else additive, **kwargs)
    if additive is not None and kwargs.get("position_bias") is None:
        return sdpa_attention_forward(module, query, key, value, additive, **kwargs)
    return sdpa_attention_forward(module, query, key, value, mask_bool, **kwargs)
