"""nnsight interop: arbiter inside an nnsight trace, and nnsight-native interventions for remote (NDIF) execution.

Two ways to combine the libraries on the same model:

* **Local mixing** -- ``attach_nnsight(nn_model, processor)`` attaches arbiter to the torch model an nnsight
  wrapper (``NNsight`` / ``LanguageModel``) holds. Arbiter's probes are ordinary torch forward hooks plus an
  attention function registered with transformers, so ``lens.block_heads``, ``lens.amplify_heads``,
  ``lens.patch_resid``, ``lens.knockout``, ``lens.record`` ... stay active inside ``with nn_model.trace(...)``,
  next to nnsight's own ``.output`` / ``.save()``.
* **Remote execution** -- on NDIF the model runs on a server that executes the nnsight trace body, not arbiter's
  Python hooks. ``block_heads_nnsight`` and ``patch_resid_nnsight`` express head block / amplify and residual
  patching as nnsight edits (``.input`` of the attention output projection, ``.input`` / ``.output`` of a decoder
  layer) at module paths computed by ``nnsight_sites`` from arbiter's adapter facts, so no model-specific code is
  needed. Compute the sites *outside* the trace (plain strings and ints, cheap to ship) and call the functions
  *inside* it. These functions use only torch and nnsight (``nnsight.register`` this module to ship it by value).

Not expressible remotely here: knockout (``lens.knockout``) and every ``attn.*`` site except ``attn.head_out``
(q/k/v/mask/scores/probs) live inside the attention function arbiter registers with transformers, which a server
does not run; this module offers no remote knockout. Head patching (``lens.patch_heads``) is the same o_proj-input
edit as blocking and is left to a plain nnsight assignment.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange

__all__ = [
    "NnsightSites",
    "amplify_heads_nnsight",
    "attach_nnsight",
    "block_heads_nnsight",
    "nnsight_sites",
    "patch_resid_nnsight",
    "resolve",
]


def _torch_module(nn_model: Any) -> torch.nn.Module:
    """The torch module an nnsight wrapper (an ``Envoy``: ``NNsight``, ``LanguageModel``...) wraps."""
    if isinstance(nn_model, torch.nn.Module):
        return nn_model
    mod = getattr(nn_model, "_module", None)          # nnsight >= 0.5 (0.8.1: Envoy._module)
    if not isinstance(mod, torch.nn.Module):
        mod = getattr(nn_model, "_model", None)       # older nnsight
    if not isinstance(mod, torch.nn.Module):
        raise TypeError(f"expected an nnsight-wrapped model (NNsight / LanguageModel) or a torch module, "
                        f"got {type(nn_model).__name__}.")
    return mod


def attach_nnsight(nn_model: Any, processor: Any = None):
    """``arbiter.attach`` on the model an nnsight wrapper holds: ``with attach_nnsight(nm, proc) as lens:``, then
    arbiter probes (``lens.block_heads(...)``, ``lens.record(...)``...) run inside ``with nm.trace(...)``.
    Local execution only (arbiter's hooks are Python on this machine); for ``remote=True`` use the ``*_nnsight``
    functions of this module."""
    from ..lens import attach

    return attach(_torch_module(nn_model), processor)


@dataclass(frozen=True)
class NnsightSites:
    """Module paths (relative to the nnsight root envoy, as in ``model.named_modules()``) and head geometry of
    each decoder layer: plain data, computed once from arbiter's adapter facts and shipped with a remote trace."""

    layers: tuple[str, ...]                          # decoder layer (resid.pre = its input, resid.post = its output)
    out_proj: tuple[str | None, ...]                 # attention output projection (its input = per-head outputs)
    heads: tuple[tuple[int, int], ...]               # (query heads, head_dim) per layer; (0, 0) = no attention
    resid_stacked: bool = False                      # residual sites are stacked streams (facts.residual)


def nnsight_sites(facts_or_lens: Any) -> NnsightSites:
    """Sites from a ``Lens``, its ``ModelFacts``, or a torch / nnsight-wrapped model (facts inferred by arbiter)."""
    if isinstance(facts_or_lens, NnsightSites):
        return facts_or_lens
    facts = getattr(facts_or_lens, "facts", None)
    if facts is None and hasattr(facts_or_lens, "layers") and hasattr(facts_or_lens, "text_config"):
        facts = facts_or_lens
    if facts is None:
        from ..adapters.base import model_facts

        facts = model_facts(_torch_module(facts_or_lens))
    names = {id(m): n for n, m in facts.model.named_modules()}
    layers, outs, heads = [], [], []
    for i, lf in enumerate(facts.layers):
        layers.append(names[id(lf.layer)])
        outs.append(names[id(lf.out_proj)] if lf.out_proj is not None and lf.attn is not None else None)
        nh, _, hd = facts.heads(i) if lf.attn is not None else (0, 0, 0)
        heads.append((int(nh), int(hd)))
    return NnsightSites(tuple(layers), tuple(outs), tuple(heads), facts.residual.stacked)


def resolve(nn_model: Any, path: str) -> Any:
    """The envoy at a dotted module path (``"model.language_model.layers.3.self_attn.o_proj"``)."""
    env = nn_model
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _positions(pos: int | Sequence[int] | None, n: int) -> list[int] | None:
    if pos is None:
        return None
    out = [int(pos)] if isinstance(pos, int) else [int(p) for p in pos]
    return [p + n if p < 0 else p for p in out]


def block_heads_nnsight(nn_model: Any, sites: Any, heads: Iterable[tuple[int, int]],
                        alpha: float | Sequence[float] = 0.0, positions: int | Sequence[int] | None = None) -> None:
    """Inside ``with nn_model.trace(...)``: multiply heads' outputs (their slice of the o_proj input) by ``alpha``
    (0: block, as ``lens.block_heads``; >1: amplify, as ``lens.amplify_heads``), at all or the given sequence
    positions. ``alpha`` is one number or one per head. Layers are edited in ascending order; call this before
    reading anything later in the forward (nnsight requires module access in execution order)."""
    sites = nnsight_sites(sites)
    heads = [(int(layer), int(h)) for layer, h in heads]
    alphas = [float(alpha)] * len(heads) if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if len(alphas) != len(heads):
        raise ValueError(f"got {len(alphas)} alphas for {len(heads)} heads.")
    by_layer: dict[int, dict[int, float]] = {}
    for (layer, h), a in zip(heads, alphas):
        if not 0 <= layer < len(sites.layers):
            raise ValueError(f"layer {layer} out of range (0..{len(sites.layers) - 1}).")
        nh, _ = sites.heads[layer]
        if sites.out_proj[layer] is None or not 0 <= h < nh:
            raise ValueError(f"head {h} out of range at layer {layer} ({nh} query heads).")
        by_layer.setdefault(layer, {})[h] = a
    for layer in sorted(by_layer):
        nh, hd = sites.heads[layer]
        env = resolve(nn_model, sites.out_proj[layer])
        x = env.input                                                    # [batch, seq, heads * head_dim]
        scale = torch.ones(nh, dtype=torch.float32)
        for h, a in by_layer[layer].items():
            scale[h] = a
        factor = scale[None, None, :].expand(x.shape[0], x.shape[1], nh)
        pos = _positions(positions, x.shape[1])
        if pos is not None:
            keep = torch.zeros(x.shape[1], dtype=torch.bool)
            keep[pos] = True
            factor = torch.where(keep[None, :, None], factor, torch.ones(()))
        heads_view = rearrange(x, "b s (h d) -> b s h d", h=nh, d=hd)
        env.input = rearrange(heads_view * factor[..., None].to(x.device, x.dtype), "b s h d -> b s (h d)")


def amplify_heads_nnsight(nn_model: Any, sites: Any, heads: Iterable[tuple[int, int]],
                          alpha: float | Sequence[float] = 2.0,
                          positions: int | Sequence[int] | None = None) -> None:
    """``block_heads_nnsight`` with ``alpha=2.0`` by default (as ``lens.amplify_heads``)."""
    block_heads_nnsight(nn_model, sites, heads, alpha=alpha, positions=positions)


def patch_resid_nnsight(nn_model: Any, sites: Any, layer: int, source: torch.Tensor,
                        positions: int | Sequence[int] | None = None, site: str = "resid.post") -> None:
    """Inside ``with nn_model.trace(...)``: replace the residual stream at ``layer`` (``resid.post``: the decoder
    layer's output; ``resid.pre``: its input) at all or the given positions by ``source`` [batch or 1, seq,
    hidden] (e.g. a tensor saved from another invoke or run), as ``lens.patch_resid(layer, source, rows=...)``."""
    sites = nnsight_sites(sites)
    if site not in ("resid.post", "resid.pre"):
        raise ValueError(f"patch_resid_nnsight patches 'resid.post' or 'resid.pre', not {site!r}.")
    if sites.resid_stacked:
        raise ValueError("patch_resid_nnsight patches one [batch, seq, hidden] stream, but this model's residual "
                         "sites are stacked streams (lens.facts.residual.stacked); that is not supported.")
    if not 0 <= int(layer) < len(sites.layers):
        raise ValueError(f"layer {layer} out of range (0..{len(sites.layers) - 1}).")
    env = resolve(nn_model, sites.layers[int(layer)])
    if site == "resid.pre":
        x = env.input
    else:
        out = env.output
        x = out[0] if isinstance(out, tuple) else out
    if source.dim() != 3 or source.shape[0] not in (1, x.shape[0]) or source.shape[2] != x.shape[2] \
            or source.shape[1] < x.shape[1]:
        raise ValueError(f"source has shape {tuple(source.shape)}; expected [{x.shape[0]}, >={x.shape[1]}, "
                         f"{x.shape[2]}].")
    src = source[:, : x.shape[1]].to(x.device, x.dtype).expand(x.shape[0], -1, -1)
    pos = _positions(positions, x.shape[1])
    if pos is None:
        new = src.clone()
    else:
        keep = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        keep[pos] = True
        new = torch.where(keep[None, :, None], src, x)
    if site == "resid.pre":
        env.input = new
    else:
        env.output = (new, *out[1:]) if isinstance(out, tuple) else new
