"""Shared plumbing for experiments: batches of encoded conflict samples with their answer ids, π and MAM metrics.

Everything here is architecture-agnostic: it uses only the Lens, TokenGroups and the metrics package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..data import AnswerDictionary, ConflictSample
from ..encode import Batch, tokenizer_of
from ..errors import DataError


@dataclass
class Item:
    """One encoded batch: the Batch, per-sample answer ids (D_p, D_c) and targets."""

    batch: Batch
    ids_p: list[list[int]]
    ids_c: list[list[int]]
    targets: list[str]

    @property
    def size(self) -> int:
        return len(self.targets)


def answer_ids(lens, sample: ConflictSample) -> tuple[list[int], list[int]]:
    d = AnswerDictionary.for_sample(tokenizer_of(lens.processor), sample)
    return list(d.ids_p), list(d.ids_c)


def batch_plan(samples: Sequence[ConflictSample], batch_size: int = 8) -> list[list[int]]:
    """Indices of the batches :func:`batches` runs: samples with and without images in separate batches."""
    groups: dict[bool, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.image is not None, []).append(i)
    return [same[i:i + batch_size] for same in groups.values() for i in range(0, len(same), batch_size)]


def batches(lens, samples: Sequence[ConflictSample], batch_size: int = 8, dataset=None,
            device=None, dtype=None) -> Iterator[Item]:
    """Encode samples in batches (samples with and without images go to separate batches)."""
    for idx in batch_plan(samples, batch_size):
        chunk = [samples[i] for i in idx]
        batch = lens.encode(chunk, dataset=dataset, device=device, dtype=dtype)
        ids = [answer_ids(lens, s) for s in chunk]
        yield Item(batch, [p for p, _ in ids], [c for _, c in ids], [s.target for s in chunk])


def per_sample(fn: Callable[[list[ConflictSample]], Any], samples: Sequence[ConflictSample], batch_size: int = 8,
               dim: int = 0) -> Any:
    """``fn(samples)``, where ``fn`` runs ``batches(lens, samples, batch_size, ...)`` and returns per-sample
    results in batch order (tensors with the samples along ``dim``, lists, or tuples / dicts of them).

    In a distributed diagnosis (inside :func:`arbiter.distributed.sharding`) each rank runs ``fn`` on its own
    whole batches and gets every rank's results back in the same order: the same value as one process."""
    from .. import distributed

    g = distributed.active()
    if g is None:
        return fn(list(samples))
    return distributed.map_batches(g, fn, samples, batch_plan(samples, batch_size), dim)


def module_weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>`` detached, also when accelerate offloaded it (``device_map`` with "disk" / "cpu"
    offload leaves a meta tensor on the module and the real one in its hook's weights map)."""
    w = getattr(module, name)
    if w.device.type == "meta":
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
            wmap = getattr(h, "weights_map", None)
            if wmap is not None and name in wmap:
                real = wmap[name]
                return real.detach().to(getattr(h, "execution_device", None) or real.device)
        raise DataError(f"{type(module).__name__}.{name} is on the meta device and no accelerate offload hook "
                        "holds its value; load the model's weights before running experiments.")
    return w.detach()


def answer_logsumexp(logits: torch.Tensor, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """log P(D) per row from last-position logits [rows, vocab] (rows = len(ids) * k, tiled)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    n = len(ids)
    out = torch.empty(logits.shape[0], dtype=torch.float32)
    for r in range(logits.shape[0]):
        idx = ids[r % n]
        out[r] = torch.logsumexp(logp[r, idx], dim=-1) if idx else float("-inf")
    return out


def pi_from_logits(logits: torch.Tensor, ids_p, ids_c) -> torch.Tensor:
    """π = P(D_p) / (P(D_p) + P(D_c)) at the last position (docs/methods/i-nssd.md), rows tiled over samples."""
    lp, lc = answer_logsumexp(logits, ids_p), answer_logsumexp(logits, ids_c)
    return torch.sigmoid(lp - lc)


def margin_from_logits(logits: torch.Tensor, ids_p, ids_c) -> torch.Tensor:
    """Final-layer MAM (mean signal, docs/methods/mam.md) at the last position: mean z over D_p − mean z over D_c."""
    n = len(ids_p)
    out = torch.empty(logits.shape[0], dtype=torch.float32)
    for r in range(logits.shape[0]):
        p, c = ids_p[r % n], ids_c[r % n]
        out[r] = logits[r, p].float().mean() - (logits[r, c].float().mean() if c else 0.0)
    return out


def metric_pi_and_margin(ids_p, ids_c):
    """Sweep metric: [rows, 2] = (π, MAM) from the last position's logits."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return torch.stack([pi_from_logits(last, ids_p, ids_c), margin_from_logits(last, ids_p, ids_c)], dim=1)
    return metric


def clean_metric(lens, inputs: dict, metric: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``metric(logits)`` of one plain forward without gradients, the logits of the last position only where the
    model takes ``logits_to_keep`` (metrics read the last row)."""
    from ..sweep import forward_kwargs

    with torch.no_grad():
        logits = lens.model(**{k: v for k, v in inputs.items() if k != "labels"}, **forward_kwargs(lens, True)).logits
    return metric(logits)


def by_target(values: torch.Tensor, targets: Sequence[str]) -> dict[str, float]:
    """{"overall": mean of the per-target means, "vision": .., "text": ..} (NaN-free: missing target -> None)."""
    out: dict[str, float | None] = {}
    means = []
    for t in ("vision", "text"):
        sel = torch.tensor([x == t for x in targets], dtype=torch.bool)
        if bool(sel.any()):
            out[t] = float(values[sel].float().mean())
            means.append(out[t])
        else:
            out[t] = None
    out["overall"] = float(sum(means) / len(means)) if means else None
    return out


def require_conflicts(samples: Sequence[ConflictSample], what: str) -> list[ConflictSample]:
    conf = [s for s in samples if s.conflict]
    if not conf:
        raise DataError(f"{what} needs conflict samples (\"conflict\": true); the data has none.")
    return conf
