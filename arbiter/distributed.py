"""Data-parallel diagnosis on ``torch.distributed``: ``torchrun --nproc_per_node N -m arbiter diagnose ...``.

Design (the merged numbers equal the single-process ones): the experiments compute their per-sample
quantities through :func:`arbiter.experiments.common.per_sample`. Outside a distributed run that is just
``fn(samples)``. Inside :func:`sharding`, the samples are cut into exactly the batches a single process would
run (:func:`arbiter.experiments.common.batch_plan`: same grouping by image presence, same ``batch_size``), whole
batches are dealt round-robin to the ranks, each rank runs ``fn`` on its batches only, and the per-sample
results of every rank are all-gathered (``all_gather_object``) and put back in the single-process order. Every
rank then computes the aggregates (MFR, LDAR, I_NSSD, head scores, TopG, blocking, amplification) from the same
per-sample values as a single process would: each forward sees the very same batch (same padding), so the
per-sample values are the same, and the reductions see the same numbers in the same order.

``diagnose`` runs the steps whose results are not per-sample quantities of whole batches on rank 0 only and
broadcasts their results (the modality steps: shapley, keyspace, imbalance, surrogate); rank 0 decides whether a
finished step is reused (resume), writes ``OUT/steps/*.json`` and the report; each rank streams its baseline
traces to ``OUT/traces/baseline/rank{r}/`` and rank 0 then merges them into ``OUT/traces/baseline/``.

Backends: gloo on CPU, nccl when ``--device cuda`` (each rank on ``cuda:LOCAL_RANK``). Collectives wait at most
``ARBITER_DIST_TIMEOUT_MIN`` minutes (default 240) -- the other ranks wait that long for rank 0's modality steps.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ArbiterError

__all__ = ["Group", "DistributedError", "init", "group", "shutdown", "sharding", "local", "active", "is_main",
           "map_batches", "rank_dir", "merge_rank_traces"]


class DistributedError(ArbiterError, RuntimeError):
    """A rank failed or the process group could not be set up."""


@dataclass(frozen=True)
class Group:
    """The default process group, seen from this rank."""

    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        torch.distributed.barrier()


_ACTIVE: contextvars.ContextVar[Group | None] = contextvars.ContextVar("arbiter_distributed", default=None)
_OWNED = False  # whether init() created the process group (then shutdown() destroys it)


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def group() -> Group | None:
    """The initialised default process group with more than one rank, else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                 str(dist.get_backend()))


def init(device: str = "cpu") -> Group | None:
    """Join the process group set up by ``torchrun`` (env ``WORLD_SIZE`` > 1): gloo for ``device="cpu"``, nccl
    for ``"cuda"`` (and ``torch.cuda.set_device(LOCAL_RANK)``). None when not launched by torchrun with several
    processes; the existing group when one is already initialised."""
    global _OWNED
    existing = group()
    if existing is not None:
        return existing
    if _env_world() < 2:
        return None
    dist = torch.distributed
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run without torchrun.")
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda under torchrun, but no CUDA device is available.")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    minutes = float(os.environ.get("ARBITER_DIST_TIMEOUT_MIN", "240"))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=minutes))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"cannot join the torch.distributed process group ({e}); launch with "
                               "`torchrun --nproc_per_node N -m arbiter diagnose ...`.") from e
    _OWNED = True
    return group()


def shutdown(g: Group | None = None) -> None:
    """Destroy the process group if :func:`init` created it."""
    global _OWNED
    if _OWNED and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _OWNED = False


def active() -> Group | None:
    """The group experiments shard over right now (inside :func:`sharding`), else None."""
    return _ACTIVE.get()


def is_main() -> bool:
    """True on rank 0 of an initialised group, and in any non-distributed process."""
    g = group()
    return g is None or g.is_main


@contextlib.contextmanager
def sharding(g: Group | None) -> Iterator[Group | None]:
    """Within the block, :func:`arbiter.experiments.common.per_sample` shards over ``g`` (None: no effect).
    Every rank must then make the same sequence of per_sample calls (run the same code on the same data)."""
    token = _ACTIVE.set(g)
    try:
        yield g
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within the block nothing is sharded (code that runs on one rank only)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# ------------------------------------------------------------------------------------------- gather / merge

def _cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, tuple):
        return tuple(_cpu(v) for v in x)
    if isinstance(x, list):
        return [_cpu(v) for v in x]
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    return x


def _split(x: Any, sizes: Sequence[int], dim: int) -> list[Any]:
    """Cut a per-sample result into per-batch pieces (tensors along ``dim``, lists along their items)."""
    if isinstance(x, torch.Tensor):
        return list(torch.split(x, list(sizes), dim=dim))
    if isinstance(x, list):
        out, i = [], 0
        for n in sizes:
            out.append(x[i:i + n])
            i += n
        return out
    if isinstance(x, tuple):
        cols = [_split(v, sizes, dim) for v in x]
        return [tuple(c[j] for c in cols) for j in range(len(sizes))]
    if isinstance(x, dict):
        cols = {k: _split(v, sizes, dim) for k, v in x.items()}
        return [{k: c[j] for k, c in cols.items()} for j in range(len(sizes))]
    raise DistributedError(f"per-sample results must be tensors, lists, tuples or dicts of them, not "
                           f"{type(x).__name__}.")


def _cat(pieces: list[Any], dim: int) -> Any:
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(pieces, dim=dim)
    if isinstance(first, list):
        return [v for p in pieces for v in p]
    if isinstance(first, tuple):
        return tuple(_cat([p[i] for p in pieces], dim) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in pieces], dim) for k in first}
    raise DistributedError(f"cannot merge per-sample results of type {type(first).__name__}.")


def map_batches(g: Group, fn: Callable[[list], Any], samples: Sequence, plan: Sequence[Sequence[int]],
                dim: int = 0) -> Any:
    """Run ``fn`` on this rank's whole batches of ``plan`` (batch j goes to rank j % world), gather every rank's
    per-sample results and return them in plan order: what ``fn(samples)`` returns in one process."""
    plan = [list(b) for b in plan]
    if not plan:
        return fn(list(samples))
    mine = [j for j in range(len(plan)) if j % g.world == g.rank]
    part = [samples[i] for j in mine for i in plan[j]]
    payload: tuple
    try:
        payload = ("ok", mine, [len(plan[j]) for j in mine], _cpu(fn(part)) if part else None)
    except BaseException as e:  # noqa: BLE001 - every rank must reach the gather, then all raise
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        payload = ("error", g.rank, e, None)
    parts = g.all_gather(payload)
    for p in parts:
        if p[0] == "error":
            if p[1] == g.rank:
                raise p[2]
            if isinstance(p[2], ArbiterError):
                raise p[2]
            raise DistributedError(f"rank {p[1]} failed: {type(p[2]).__name__}: {p[2]}")
    pieces: dict[int, Any] = {}
    for _, js, sizes, res in parts:
        if res is None:
            continue
        for j, piece in zip(js, _split(res, sizes, dim)):
            pieces[j] = piece
    return _cat([pieces[j] for j in range(len(plan))], dim)


def run_on_main(g: Group | None, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only (not sharded), its result broadcast to every rank (errors too)."""
    if g is None:
        return fn()
    payload = None
    if g.is_main:
        try:
            with local():
                payload = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - the other ranks wait in the broadcast: tell them
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                payload = ("error", DistributedError("rank 0 was interrupted"))
                g.broadcast(payload)
                raise
            payload = ("error", e)
            g.broadcast(payload)
            raise
    payload = g.broadcast(payload)
    if payload[0] == "error":
        err = payload[1]
        raise err if isinstance(err, ArbiterError) else DistributedError(
            f"rank 0 failed: {type(err).__name__}: {err}")
    return payload[1]


# ------------------------------------------------------------------------------------------- traces

def rank_dir(directory: str | os.PathLike | None) -> Path | None:
    """Where this rank streams a trace directory: ``directory`` itself, or ``directory/rank{r}`` when sharded."""
    if directory is None:
        return None
    g = active()
    return Path(directory) if g is None else Path(directory) / f"rank{g.rank}"


def merge_rank_traces(directory: str | os.PathLike) -> bool:
    """On rank 0 of a sharded run, after every rank closed its writer: move the shards of ``directory/rank*/``
    into ``directory`` (renumbered, rank 0's first) under one manifest, so that ``read_trace_dir(directory)``
    reads every sample. No-op (False) outside a sharded run, on other ranks, or when a rank's folder is not
    visible here (no shared file system: the per-rank folders stay as they are)."""
    import json

    from .trace import MANIFEST_NAME, MANIFEST_VERSION, load_manifest, shard_name
    from .util import atomic_write_text

    g = active()
    if g is None or not g.is_main:
        return False
    root = Path(directory)
    parts = [root / f"rank{r}" for r in range(g.world)]
    if not all((p / MANIFEST_NAME).is_file() for p in parts):
        return False
    manifests = [load_manifest(p) for p in parts]
    for old in root.glob("shard-*.safetensors"):
        old.unlink()
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    shards, schema = [], None
    for p, m in zip(parts, manifests):
        schema = schema or m.get("schema")
        for entry in m["shards"]:
            name = shard_name(len(shards))
            os.replace(p / entry["file"], root / name)
            shards.append({**entry, "file": name})
    merged = {"arbiter_trace_dir": MANIFEST_VERSION, "meta": manifests[0].get("meta"), "schema": schema,
              "shards": shards, "merged_from_ranks": g.world}
    atomic_write_text(root / MANIFEST_NAME, json.dumps(merged, indent=1))
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
    return True
