"""Progress bars of long experiments: one helper, :func:`progress_bar`, that every experiment uses.

Bars are tqdm bars labelled with what they sweep; shown on a terminal only, switched off by ``progress=False`` or
the environment variable ``ARBITER_PROGRESS=0`` (``ARBITER_PROGRESS=1`` shows them in logs and pipes too)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from .errors import DataError

ENV = "ARBITER_PROGRESS"
"""Environment variable: ``0`` / ``false`` / ``off`` hides every bar, ``1`` / ``true`` / ``on`` shows them even
when the output is not a terminal; unset: bars on a terminal only."""

_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def bars_disabled(progress: bool | None = True) -> bool | None:
    """tqdm's ``disable`` for a call with ``progress``: True (no bar) when ``progress`` is False or ``ARBITER_PROGRESS``
    is off, False (a bar) when ``ARBITER_PROGRESS`` is on, else None (tqdm's own rule: a bar only on a terminal)."""
    if progress is False:
        return True
    env = os.environ.get(ENV, "").strip().lower()
    if env in _OFF:
        return True
    if env in _ON:
        return False
    if env:
        raise DataError(f"{ENV}={os.environ[ENV]!r}: use 0 (no progress bars) or 1 (always), or leave it unset "
                        "(bars on a terminal only).")
    return None


def progress_bar(iterable: Iterable | None = None, desc: str = "", *, total: int | None = None,
                 unit: str = "batch", progress: bool | None = True, leave: bool = True, **kw: Any):
    """A tqdm bar over ``iterable`` labelled ``desc`` (say what it sweeps: ``"head sweep: layer×head"``), or the
    iterable itself when bars are off (:func:`bars_disabled`). ``leave=False`` for a bar nested in another one
    (it disappears when done). With ``iterable=None`` it returns a bar to ``update()`` by hand (a no-op object
    with the same methods when off)."""
    disable = bars_disabled(progress)
    if disable is True:
        return iterable if iterable is not None else _NoBar()
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable, **kw)


class _NoBar:
    """Stands in for a tqdm bar updated by hand when bars are off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
