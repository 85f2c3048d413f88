"""The one attention function arbiter registers with transformers' AttentionInterface (and its mask function).

Untouched layers go straight to the stock SDPA / eager function (bit-exact); layers with attention-level
probes get masks edited (knockout under SDPA) and only the requested rows of scores / probabilities."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .adapters.base import module_eager_function

if TYPE_CHECKING:  # pragma: no cover
    from .lens import Lens

# attention module -> (lens, layer index); entries live only while a Lens is attached
RUNTIME: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[Lens, int]]" = weakref.WeakKeyDictionary()

IMPLEMENTATIONS = {"sdpa": "arbiter_sdpa", "eager": "arbiter_eager"}


def _base_function(kind: str, module: torch.nn.Module) -> Callable:
    return sdpa_attention_forward if kind == "sdpa" else module_eager_function(module)


def _make(kind: str) -> Callable:
    def arbiter_attention(module, query, key, value, attention_mask, **kwargs):
        entry = RUNTIME.get(module)
        base = _base_function(kind, module)
        if entry is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        lens, layer = entry
        return lens._runtime.attention(layer, module, base, kind, query, key, value, attention_mask, kwargs)

    arbiter_attention.__name__ = f"arbiter_{kind}_attention"
    return arbiter_attention


def register() -> None:
    """Register ``arbiter_sdpa`` / ``arbiter_eager`` (function + mask function). Idempotent."""
    for kind, name in IMPLEMENTATIONS.items():
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make(kind))
            AttentionMaskInterface.register(name, sdpa_mask if kind == "sdpa" else eager_mask)


# -- helpers used by the runtime ---------------------------------------------------------------------------

def bool_mask(attention_mask, module, kwargs, b: int, q_pos: torch.Tensor, k_pos: torch.Tensor,
              cross: bool, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own mask as bool [b, 1|h, q, k] (True = may attend) and, for float masks, the float values."""
    q, k = len(q_pos), len(k_pos)
    if attention_mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if causal and not cross:
            m = (q_pos[:, None] >= k_pos[None, :]).to(device)
        else:
            m = torch.ones(q, k, dtype=torch.bool, device=device)
        return m.expand(b, 1, q, k), None
    am = attention_mask
    if am.dtype == torch.bool:
        return am.expand(b, am.shape[1], q, k) if am.shape[0] == 1 else am, None
    m = am > torch.finfo(am.dtype).min / 2
    return (m.expand(b, am.shape[1], q, k) if am.shape[0] == 1 else m), am


def protect_empty_rows(m: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with every key masked keep their own position (documented; never NaN). Returns (mask, empty rows)."""
    empty = ~m.any(dim=-1)  # [b, h, q]
    if not bool(empty.any()):
        return m, empty
    diag = (k_pos[None, :] == q_pos[:, None]).to(m.device)  # [q, k]
    return m | (empty[..., None] & diag), empty


def row_scores(module, query_rows, key, mask_rows_bool, mask_rows_float, kwargs) -> torch.Tensor:
    """Pre-softmax scores of the given query rows, as eager attention computes them (softcap, mask)."""
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
        scores = scores.masked_fill(~mask_rows_bool, torch.finfo(scores.dtype).min)
    else:
        scores = scores.masked_fill(~mask_rows_bool, torch.finfo(scores.dtype).min)
    return scores


def softmax_probs(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


def eager_output(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    n_rep = probs.shape[1] // value.shape[1]
    out = torch.matmul(probs, repeat_kv(value, n_rep))
    return out.transpose(1, 2).contiguous()
