"""arbiter: record, intervene on and measure how multimodal LLMs arbitrate between modalities.

``with arbiter.attach(model, processor) as lens:`` is the entry point; probes are the one extension API."""

from .adapters import Adapter, register_adapter, supported_families
from .errors import (ArbiterError, DataError, GroupError, InterventionError, ProbeError, SiteError, TraceError,
                     UnsupportedModelError)
from .groups import TokenGroups
from .lens import Lens, attach
from .probes import SITES, Ctx, HeadBlock, HeadPatch, HeadScale, Knockout, Probe, Recorder, ResidPatch

__version__ = "0.1.0"

__all__ = ["Adapter", "register_adapter", "supported_families", "ArbiterError", "DataError", "GroupError",
           "InterventionError", "ProbeError", "SiteError", "TraceError", "UnsupportedModelError", "TokenGroups",
           "Lens", "attach", "SITES", "Ctx", "HeadBlock", "HeadPatch", "HeadScale", "Knockout", "Probe", "Recorder",
           "ResidPatch"]


def __getattr__(name):  # lazy: Trace and friends import only when used
    if name in ("Trace", "TraceWriter"):
        from . import trace

        return getattr(trace, name)
    raise AttributeError(f"module 'arbiter' has no attribute {name!r}")
