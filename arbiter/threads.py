"""CPU threads on a shared machine: the cores the load average leaves idle (the surrogate's worker cap) and the
torch intra-op thread count of the model paths (``--threads``, env ``ARBITER_THREADS``, else the idle cores).

No torch import here: the command line reads it before deciding to load anything."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ArbiterError

ENV = "ARBITER_THREADS"
"""Environment variable that fixes the model paths' torch thread count (a positive integer)."""


def cpu_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS reports one, else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (None where the OS gives none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def idle_cores(cap: int | None = None) -> int:
    """The cores that the 1-minute load average leaves idle, rounded, at least 1 and at most ``cap``; all cores
    (up to ``cap``) where the OS gives no load average. On a machine whose other jobs keep the cores busy, a thread
    beyond the idle cores only time-slices with the others (and torch's intra-op threads wait for the slowest)."""
    idle = _idle(cpu_cores(), load_average())
    return max(1, min(idle, cap)) if cap is not None else idle


def _idle(cores: int, load: float | None) -> int:
    return cores if load is None else max(1, round(cores - load))


@dataclass(frozen=True)
class ThreadChoice:
    """How many torch intra-op threads to use, and why (printed in the command line's log)."""

    count: int
    source: str
    """``"--threads"``, ``"ARBITER_THREADS"`` or ``"idle cores"``."""
    cores: int
    load: float | None

    def describe(self) -> str:
        """E.g. ``1 torch thread (idle cores: load 3.4 on 2 cores)``."""
        threads = f"{self.count} torch thread{'s' * (self.count != 1)}"
        if self.source == "idle cores":
            load = "no load average" if self.load is None else f"load {self.load:.1f}"
            return f"{threads} (idle cores: {load} on {self.cores} cores)"
        return f"{threads} ({self.source})"


def choose_threads(threads: int | None = None, cap: int | None = None) -> ThreadChoice:
    """The model paths' torch thread count: ``threads`` if given, else env ``ARBITER_THREADS``, else the idle cores
    (at least 1, at most ``cap``: the caller passes torch's own count, which honours OMP_NUM_THREADS and counts
    physical cores). Raises ArbiterError on a count below 1 or an unreadable variable."""
    cores, load = cpu_cores(), load_average()
    if threads is not None:
        if int(threads) < 1:
            raise ArbiterError(f"--threads {threads}: must be >= 1.")
        return ThreadChoice(int(threads), "--threads", cores, load)
    env = os.environ.get(ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ArbiterError(f"{ENV}={env!r}: must be a positive integer (the torch thread count); unset it to use "
                               "the idle cores.")
        return ThreadChoice(n, ENV, cores, load)
    idle = _idle(cores, load)
    return ThreadChoice(max(1, min(idle, cap)) if cap is not None else idle, "idle cores", cores, load)
