"""Knockouts on token mixers that are not softmax attention (linear attention, convolutions, state-space layers).

Semantics (proposed, docs/methods.md "Knockouts on every token mixer"): an edited ``attn.mask`` row says which
positions a destination row may see; the row's mixer output is recomputed as if the severed positions had not
been in the sequence at all, by running the layer's own mixer on the sequence with them deleted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SiteError

# mixer kinds whose knockouts are served by deletion (adapters.base.MIXER_KINDS)
DELETION_KINDS = ("linear_attention", "convolution", "state_space")
# keyword arguments of a mixer call that carry a cache (the recomputation runs without one)
CACHE_KWARGS = ("cache", "past_key_values", "cache_params", "past_key_value")


@dataclass
class DeletionRun:
    """One recomputation: sample ``sample`` with ``kept`` positions (ascending, absolute), whose outputs at
    ``kept_index`` fill the destination rows ``rows`` (indices into the current forward's rows)."""

    sample: int
    kept: torch.Tensor
    rows: torch.Tensor
    kept_index: torch.Tensor


def deletion_runs(default: torch.Tensor, edited: torch.Tensor, q_pos: torch.Tensor, layer: int,
                  kind: str) -> list[DeletionRun]:
    """Plan the recomputations an edited mask asks for on a mixer layer.

    ``default`` / ``edited``: [batch, 1|heads, q, k] bool (True = may see), k covering positions 0..k-1 and
    ``q_pos`` the absolute positions of the q rows. Rows whose severed sets are consistent with one deletion
    (each row's severed set is that deletion restricted to the positions up to it) share one run per sample;
    other rows get a run of their own."""
    if edited.shape[1] > 1 and not bool((edited == edited[:, :1]).all()):
        raise SiteError(f"layer {layer} mixes tokens with a {kind} layer, which has no attention heads: a "
                        "head-specific knockout cannot be served there; knock out all heads, or restrict the "
                        "probe's layers to the attention layers (lens.facts.attention_layers).")
    severed = default[:, 0] & ~edited[:, 0]          # [b, q, k]
    q_pos = q_pos.to(severed.device)
    k_len = severed.shape[-1]
    # a row's output is made from its own input: a destination row that is also a source keeps its position
    severed[:, torch.arange(len(q_pos), device=severed.device), q_pos.clamp(max=k_len - 1)] = False
    runs: list[DeletionRun] = []
    positions = torch.arange(k_len)
    for b in range(severed.shape[0]):
        rows = torch.nonzero(severed[b].any(-1)).flatten().cpu()
        if len(rows) == 0:
            continue
        sev = severed[b].cpu()
        union = sev[rows].any(0)
        consistent = [int(r) for r in rows if not bool(union[int(q_pos[r])])
                      and torch.equal(sev[r], union & (positions < int(q_pos[r])))]
        groups: dict[tuple[int, ...], list[int]] = {}
        if consistent:
            groups[tuple(torch.nonzero(union).flatten().tolist())] = consistent
        for r in rows.tolist():
            if r not in consistent:
                groups.setdefault(tuple(torch.nonzero(sev[r]).flatten().tolist()), []).append(r)
        for dropped, members in groups.items():
            keep = torch.ones(k_len, dtype=torch.bool)
            keep[list(dropped)] = False
            keep[[int(q_pos[r]) for r in members]] = True
            last = max(int(q_pos[r]) for r in members)
            kept = positions[keep & (positions <= last)]
            index = torch.searchsorted(kept, torch.tensor([int(q_pos[r]) for r in members]))
            runs.append(DeletionRun(b, kept, torch.tensor(members), index))
    return runs


def recompute(module: torch.nn.Module, args: tuple, kwargs: dict, inputs: torch.Tensor,
              pad_mask: torch.Tensor | None, runs: list[DeletionRun], output: torch.Tensor, layer: int,
              kind: str) -> torch.Tensor:
    """The mixer output with the destination rows of ``runs`` recomputed on their deleted sequences.

    ``inputs``: the mixer's inputs at every position so far [batch, k, hidden]; ``pad_mask``: [batch, k] (True
    = real token) or None. Runs of equal length share one call of the module (no padding is introduced, so
    the recomputation is the module's own computation on each deleted sequence)."""
    call_kwargs = {}
    for name, v in kwargs.items():
        if name in CACHE_KWARGS or name in ("hidden_states", "attention_mask"):
            continue
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            raise SiteError(f"layer {layer} ({kind}, {type(module).__name__}) takes a tensor argument {name!r} that "
                            "arbiter cannot re-index for a knockout; serve this layer with an adapter whose "
                            "token_mixer() returns a module taking hidden_states (and attention_mask) only.")
        call_kwargs[name] = v
    if len(args) > 1:
        raise SiteError(f"layer {layer} ({kind}): {type(module).__name__} is called with positional arguments "
                        "besides the hidden states; arbiter cannot re-run it for a knockout.")
    takes_mask = "attention_mask" in kwargs
    out = output.clone()
    by_length: dict[int, list[DeletionRun]] = {}
    for run in runs:
        by_length.setdefault(len(run.kept), []).append(run)
    for runs_n in by_length.values():
        x = torch.stack([inputs[r.sample, r.kept.to(inputs.device)] for r in runs_n])
        kw = dict(call_kwargs)
        if takes_mask:
            m = None
            if pad_mask is not None:
                m = torch.stack([pad_mask[r.sample, r.kept.to(pad_mask.device)] for r in runs_n])
                m = None if bool(m.all()) else m
            kw["attention_mask"] = m
        for name in CACHE_KWARGS:
            if name in kwargs:
                kw[name] = None
        # forward() itself: the layer's hooks (arbiter's, a user's) see the model's call only, not this one
        y = module.forward(hidden_states=x, **kw) if "hidden_states" in kwargs or not args else module.forward(x, **kw)
        y = y[0] if isinstance(y, tuple) else y
        for j, r in enumerate(runs_n):
            out[r.sample, r.rows.to(out.device)] = y[j, r.kept_index.to(y.device)].to(out.dtype)
    return out
