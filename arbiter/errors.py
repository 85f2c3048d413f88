"""Error classes users can catch: every arbiter failure is an ``ArbiterError``.

Each message says what was wrong and what to do about it."""

from __future__ import annotations


class ArbiterError(Exception):
    """Base class of every error arbiter raises on purpose."""


class UnsupportedModelError(ArbiterError):
    """The model has no adapter and the generic path cannot find its text attention layers."""


class GroupError(ArbiterError, KeyError):
    """A token group is unknown, or empty where a non-empty one is needed."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class SiteError(ArbiterError, ValueError):
    """A hook site, layer or head is unknown or out of range."""


class InterventionError(ArbiterError, ValueError):
    """An intervention was given bad parameters (alpha not finite, patch of the wrong shape, ...)."""


class ProbeError(ArbiterError):
    """A probe raised while the model ran; the message names the probe and the site."""


class TraceError(ArbiterError):
    """A trace file is missing, corrupt, truncated or not an arbiter trace."""


class DataError(ArbiterError, ValueError):
    """A conflict data file or sample is malformed; the message names the file and line."""
