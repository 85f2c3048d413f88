"""Prefix replay, the pieces behind ``Lens.capture`` / ``Lens.replay``: stand-in modules that return a recorded
output, and the swap that puts them in place of the real modules in their parents (and back).

No hooks and no patched ``forward`` here: the Lens owns every handle and every swap, and undoes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Capture:
    """What ``Lens.capture`` recorded in its block: ``layers[i]`` the output of decoder layer i (detached);
    ``encoders[module]`` the output of each module beside the decoder that ran exactly once before it;
    ``heads[i]`` (layers asked for) layer i's per-head outputs, the input of its attention output projection, and
    the rest of its attention module's output (a tuple's other items, or None), where that module returned its
    output projection's result itself."""

    layers: dict[int, Any] = field(default_factory=dict)
    encoders: dict[nn.Module, Any] = field(default_factory=dict)
    heads: dict[int, tuple[torch.Tensor, Any]] = field(default_factory=dict)


def map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Apply ``fn`` to every tensor in a (nested) output: tensors, tuples, lists, dicts and ModelOutputs."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):  # ModelOutput is an OrderedDict subclass; rebuilt with its own type
        mapped = {k: map_tensors(v, fn) for k, v in obj.items()}
        try:
            return type(obj)(**mapped)
        except TypeError:
            return type(obj)(mapped)
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def repeat_dim0(obj, n: int):
    """Every tensor of ``obj`` as ``n`` copies stacked along dim 0 (scalars unchanged)."""
    return map_tensors(obj, lambda t: torch.cat([t] * n, dim=0) if t.dim() > 0 else t)


def decoder_siblings(model: nn.Module, decoder: nn.Module) -> list[nn.Module]:
    """Siblings of the decoder and of each module that holds it, up to the model: the modules that may run before
    it (vision / audio towers, projectors; a language model's lm_head is among them but runs after the decoder,
    so the capture never records it)."""
    parent = {id(k): m for m in model.modules() for k in m.children()}
    out: list[nn.Module] = []
    node = decoder
    while id(node) in parent:
        up = parent[id(node)]
        out.extend(k for k in up.children() if k is not node and all(k is not o for o in out))
        node = up
    return out


class ReplayModule(nn.Module):
    """Stands in for ``original`` in its parent: whatever it is called with, returns ``make(output)``.

    ``original`` stays a submodule (parameters, device and dtype read as before) and every attribute the
    model's code reads (``layer.self_attn``, ``tower.dtype``) falls through to it; its forward and its hooks
    do not run."""

    def __init__(self, original: nn.Module, output: Any, make: Callable[[Any], Any]):
        super().__init__()
        self.original = original
        self._output = output
        self._make = make

    def forward(self, *args, **kwargs):
        return self._make(self._output)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)


def swap_modules(root: nn.Module, stand_ins: dict[nn.Module, nn.Module]) -> Callable[[], None]:
    """Put ``stand_ins[m]`` in place of every module ``m`` in each parent under ``root`` that holds it (a
    ModuleList index or an attribute); returns the function that puts the originals back."""
    slots = [(parent, name, child) for parent in root.modules() for name, child in parent.named_children()
             if child in stand_ins]
    done = []
    try:
        for parent, name, child in slots:
            setattr(parent, name, stand_ins[child])
            done.append((parent, name, child))
    except BaseException:
        for parent, name, child in reversed(done):
            setattr(parent, name, child)
        raise

    def restore() -> None:
        for parent, name, child in reversed(done):
            setattr(parent, name, child)
    return restore
