"""Probes: the public hook-site API (base.py) and the built-ins written on it (record, knockout, heads).

Subclass ``Probe`` to read or edit named sites on any supported architecture."""

from .base import ALIASES, SITES, Ctx, Probe, canonical_site
from .head_interventions import HeadBlock, HeadPatch, HeadScale, ResidPatch
from .knockout import Knockout
from .record import Recorder

__all__ = ["ALIASES", "SITES", "Ctx", "Probe", "canonical_site", "HeadBlock", "HeadPatch", "HeadScale",
           "ResidPatch", "Knockout", "Recorder"]
