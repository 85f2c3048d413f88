"""Memory budgets: sizes people write ("8GiB"), the memory free on a device, and the peak a call adds.

Sweeps size their chunks from a budget (default: half the memory free on the model's device) and the peak that
one forward of the batch adds (measured on CUDA; estimated from the model's widths on a CPU, whose allocator
keeps freed memory), so that a chunk never holds more rows than fit."""

from __future__ import annotations

import gc
import os
import re
from typing import Any, Callable

import torch

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


def peak_added(fn: Callable[[], Any], device: torch.device | str) -> tuple[int | None, Any]:
    """(the peak memory ``fn`` adds on ``device`` above what was in use before it, in bytes, or None where it cannot
    be read; fn's result). CUDA: max_memory_allocated; CPU: the process's peak resident memory (Linux: the kernel's
    peak counter, reset through /proc/self/clear_refs)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before), result
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None, fn()
    before = _proc_kib("/proc/self/status", "VmRSS")
    result = fn()
    peak = _proc_kib("/proc/self/status", "VmHWM")
    if before is None or peak is None:
        return None, result
    return max(0, (peak - before) * 1024), result


def forward_peak_estimate(config, batch: int, seq: int, dtype: torch.dtype) -> int:
    """Bytes one forward of ``batch`` x ``seq`` tokens holds at its peak beyond the weights, from the text config's
    widths: the residual stream and one layer's transients (queries, keys, values, attention output, the MLP's
    up / gate / activation, a [heads, seq, seq] score matrix where the attention kernel forms one)."""
    def widest(name: str, default: int) -> int:   # a per-layer list of widths: the widest layer
        v = getattr(config, name, None)
        v = max(v) if isinstance(v, (list, tuple)) and v else v
        return int(v) if isinstance(v, (int, float)) and v else default

    hidden = widest("hidden_size", 0)
    inter = widest("intermediate_size", 4 * hidden)
    heads = widest("num_attention_heads", 1)
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    per_token = hidden * 8 + inter * 3          # residual, norm, q, k, v, attention out, o_proj; up, gate, act
    return int(size * batch * (seq * per_token + heads * seq * seq))
