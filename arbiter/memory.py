"""Memory budgets: sizes people write ("8GiB"), the memory free on a device, and the peak a call adds.

Sweeps size their chunks from a budget (default: half the memory free on the model's device) and the peak that
one forward of the batch adds (measured: CUDA's allocator statistics, or the tensor storage torch operations hold,
:class:`AllocationMeter`), so that a chunk never holds more rows than fit."""

from __future__ import annotations

import os
import re
import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import ArbiterError

DEFAULT_SHARE = 0.5
"""Share of the device's free memory a sweep may use when no budget is given."""
ENV = "ARBITER_MEMORY_BUDGET"
"""Environment variable with the default budget (a size such as "8GiB"); the command line's --memory-budget."""

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a size such as ``"8GiB"``, ``"512MB"``, ``"1.5e9"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ArbiterError(f"a memory budget must be positive, got {value!r}.")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ArbiterError(f"cannot read the memory size {value!r}: write e.g. 8GiB, 512MB or a number of bytes.")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ArbiterError(f"a memory budget must be positive, got {value!r}.")
    return n


def format_bytes(n: int | float) -> str:
    """A size for a message: ``"340 KiB"``, ``"1.2 MiB"``, ``"3.1 GiB"`` (bytes below 1 KiB as they are)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}" if abs(n) < 10 * size else f"{n / size:.0f} {unit}"
    return f"{int(n)} bytes"


def _proc_kib(path: str, field: str) -> int | None:
    """A ``kB`` field of a /proc file (``/proc/meminfo``'s MemAvailable, ``/proc/self/status``'s VmRSS), or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def free_bytes(device: torch.device | str) -> int | None:
    """Memory free on ``device`` now: CUDA's free memory, or the host's MemAvailable; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    kib = _proc_kib("/proc/meminfo", "MemAvailable")
    return None if kib is None else kib * 1024


def budget_bytes(device: torch.device | str, budget: int | float | str | None = None) -> int | None:
    """The budget in bytes: ``budget`` as given, else ``$ARBITER_MEMORY_BUDGET``, else ``DEFAULT_SHARE`` of the
    memory free on ``device``."""
    if budget is None:
        budget = os.environ.get(ENV) or None
    if budget is not None:
        return parse_bytes(budget)
    free = free_bytes(device)
    return None if free is None else int(free * DEFAULT_SHARE)


class AllocationMeter(TorchDispatchMode):
    """Counts the bytes of tensor storage that torch operations create while it is active: ``live`` (still held)
    and ``peak`` (the most held at once), freed storages subtracted when torch frees them. Views and in-place results
    add nothing. It sees every tensor an operation returns (on any device), not the scratch a native kernel uses
    inside itself: a measure of what a call holds, free of the allocator's caching (a CPU allocator keeps freed
    memory, so the process's resident size cannot say what a call added)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._held: dict[int, int] = {}   # id of a live storage's finaliser key -> bytes

    def _freed(self, key: int) -> None:
        self.live -= self._held.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        aliased = [r.alias_info is not None for r in func._schema.returns]
        if len(aliased) == 1 and len(outs) > 1:   # one returned list of tensors (split, unbind): one alias for all
            aliased = aliased * len(outs)
        for i, t in enumerate(outs):
            if not isinstance(t, torch.Tensor) or (i < len(aliased) and aliased[i]):
                continue   # a view of an input or an in-place result: no new memory
            storage = t.untyped_storage()
            n = storage.nbytes()
            if n == 0:
                continue
            key = id(storage)
            if key in self._held:
                continue
            self._held[key] = n
            weakref.finalize(storage, self._freed, key)
            self.live += n
            self.peak = max(self.peak, self.live)
        return out


def measure(fn: Callable[[], Any], device: torch.device | str) -> tuple[int, int, Any]:
    """(the peak memory ``fn`` adds on ``device`` above what was in use before it, the memory it still holds when it
    returns, both in bytes; fn's result). CUDA: the allocator's statistics; elsewhere: the tensor storage ``fn``'s
    operations hold (:class:`AllocationMeter`, which leaves out native kernels' internal scratch)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return (int(torch.cuda.max_memory_allocated(device) - before),
                int(torch.cuda.memory_allocated(device) - before), result)
    with AllocationMeter() as meter:   # no gc.collect(): it costs ~0.3 s a call and the meter needs none
        result = fn()
    return int(meter.peak), int(meter.live), result


def peak_added(fn: Callable[[], Any], device: torch.device | str) -> tuple[int, Any]:
    """(the peak memory ``fn`` adds on ``device``, bytes; fn's result): :func:`measure` without the held part."""
    peak, _, result = measure(fn, device)
    return peak, result
