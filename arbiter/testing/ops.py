"""Counting the tensor operations a forward dispatches, by decoder layer: the work an arbiter path adds per layer
and per forward, free of the load (benchmarks/run.py's fixed section, tests/test_ops_per_layer.py)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode


# operations that alias their input although their schema does not say so (matmul's reshape of a copy it made)
ALIASES = frozenset({"_unsafe_view"})


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations a forward dispatches, views left out (``is_view``, and :data:`ALIASES`; each of
    the others is a kernel launch on an accelerator, or a copy), by where they run: ``"before"`` the first decoder layer, or the index of the layer
    that last began (its hooks, and after the last layer the rest of the forward, count there). ``names`` holds the
    same counts by operation name."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        super().__init__()
        self.counts: dict[Any, int] = {}
        self.names: dict[Any, dict[str, int]] = {}
        self.place: Any = "before"
        self._layers = layers
        self._hooks: list = []

    def __enter__(self):
        for i, layer in enumerate(self._layers):   # first among the layer's pre-hooks: its hooks count in it
            self._hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "place", i),
                                                               prepend=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in ALIASES:
            self.counts[self.place] = self.counts.get(self.place, 0) + 1
            names = self.names.setdefault(self.place, {})
            names[name] = names.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_ops(run: Callable[[], Any], layers: Sequence[torch.nn.Module]) -> OpCounter:
    """The operations of ``run()`` (one forward) by place (see :class:`OpCounter`), after one uncounted call (a
    probe's one-time set-up)."""
    run()
    with OpCounter(layers) as counter:
        run()
    return counter


def ops_added(fn: Callable[[], Any], plain: Callable[[], Any], layers: Sequence[torch.nn.Module],
              plain_layers: Sequence[torch.nn.Module] | None = None) -> tuple[int, int]:
    """(operations, views left out, that ``fn``'s forward adds to the plain forward's in each layer between the first
    and the last, the same in all of them; those it adds once per forward: the rest of what it adds). Counted, not
    timed: the work a path adds per layer on any device. ``plain_layers``: the plain forward's layers where it runs
    another copy of the model. Raises where the middle layers differ (the count per layer would be ill-defined)."""
    a, b = count_ops(fn, layers).counts, count_ops(plain, plain_layers or layers).counts
    added = [a.get(i, 0) - b.get(i, 0) for i in range(len(layers))]
    if len(layers) < 3 or len(set(added[1:-1])) > 1:
        raise ValueError(f"the operations added per layer are not the same in the middle layers (at least three "
                         f"layers needed): {added}")
    per_layer = added[1]
    return per_layer, sum(a.values()) - sum(b.values()) - per_layer * len(layers)
