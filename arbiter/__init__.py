"""arbiter: record, intervene on and measure how multimodal LLMs arbitrate between modalities.

``with arbiter.attach(model, processor) as lens:`` is the entry point; probes are the one extension API.
Names load lazily (PEP 562): ``import arbiter`` imports neither torch nor transformers until one is used."""

from __future__ import annotations

import importlib
import importlib.util

from .errors import (ArbiterError, DataError, GroupError, InterventionError, ProbeError, SiteError, TraceError,
                     UnsupportedModelError)

__version__ = "0.1.0"

# public name -> the submodule that defines it (imported on first access)
_LAZY = {
    "Adapter": "adapters", "register_adapter": "adapters", "supported_families": "adapters",
    "TokenGroups": "groups",
    "Lens": "lens", "attach": "lens",
    "SITES": "probes", "Ctx": "probes", "HeadBlock": "probes", "HeadPatch": "probes", "HeadScale": "probes",
    "Knockout": "probes", "Probe": "probes", "Recorder": "probes", "ResidPatch": "probes",
    "Trace": "trace", "TraceWriter": "trace",
}

__all__ = ["Adapter", "register_adapter", "supported_families", "ArbiterError", "DataError", "GroupError",
           "InterventionError", "ProbeError", "SiteError", "TraceError", "UnsupportedModelError", "TokenGroups",
           "Lens", "attach", "SITES", "Ctx", "HeadBlock", "HeadPatch", "HeadScale", "Knockout", "Probe", "Recorder",
           "ResidPatch", "Trace", "TraceWriter"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later accesses skip this function
        return value
    # submodules as attributes (`arbiter.report`, `arbiter.organisms`) without an explicit import
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'arbiter' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
