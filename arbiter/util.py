"""Helpers many modules share: argument checks (``fail``, ``check_choice``, ids, targets), JSON conversion
(``jsonable``, ``ToDict``) and atomic file writes (``atomic_write_text``, ``atomic_write_json``, ``temp_path_beside``)."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is handled: importing util stays light (the CLI's checks)
    import torch

from .errors import DataError

TARGETS = ("vision", "text")


def head_label(layer: int, head: int) -> str:
    """How arbiter names one attention head in reports, figures and sweep settings: ``"L3H5"``."""
    return f"L{int(layer)}H{int(head)}"


def _is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (False without importing torch where nothing has imported it yet)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def fail(message: str) -> None:
    """Raise the error every metric uses for a bad input (a ``DataError``, hence also a ``ValueError``)."""
    raise DataError(message)


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        fail(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}; pass one of those.")
    return value


def as_ids(ids: Any, what: str = "ids") -> list[int]:
    """A non-empty list of distinct token ids (first occurrence order) from a list, tuple, set, tensor or array.

    D_m is a set: several surface forms often share a first token, and a repeated id must not count twice."""
    if _is_tensor(ids) or isinstance(ids, np.ndarray):
        ids = ids.reshape(-1).tolist()
    if isinstance(ids, (int, np.integer)):
        ids = [ids]
    try:
        out = sorted({int(i) for i in ids}) if isinstance(ids, (set, frozenset)) else [int(i) for i in ids]
    except (TypeError, ValueError):
        fail(f"{what} must be a sequence of integer token ids, got {type(ids).__name__}.")
    out = list(dict.fromkeys(out))
    if not out:
        fail(f"{what} is empty: the answer dictionary of a sample needs at least one token id.")
    return out


def check_vocab(ids: Sequence[int], vocab: int, what: str) -> None:
    bad = [i for i in ids if i < 0 or i >= vocab]
    if bad:
        fail(f"{what} holds ids {bad[:5]} outside the vocabulary [0, {vocab}).")


def check_targets(targets: Sequence[str], n: int) -> list[str]:
    targets = list(targets)
    if len(targets) != n:
        fail(f"targets has {len(targets)} entries for {n} samples; give one target per sample.")
    for t in targets:
        if t not in TARGETS:
            fail(f"target {t!r} is not 'vision' or 'text'.")
    return targets


def per_sample_ids(ids: Any, n: int, what: str) -> list[list[int]]:
    """One id list per sample: a list of n id lists, or one id list shared by every sample."""
    if _is_tensor(ids) or isinstance(ids, np.ndarray):
        ids = ids.tolist()
    ids = list(ids)
    if ids and all(isinstance(i, (int, np.integer)) for i in ids):
        return [as_ids(ids, what)] * n
    if len(ids) != n:
        fail(f"{what} has {len(ids)} id lists for {n} samples; give one list per sample (or one shared list).")
    return [as_ids(x, f"{what}[{s}]") for s, x in enumerate(ids)]


def target_means(values: torch.Tensor, targets: Sequence[str] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over the sample axis (dim 0): per target modality, then the plain average of those means.

    Without targets: the plain mean over samples and an empty dict."""
    if targets is None:
        return values.mean(dim=0), {}
    targets = check_targets(targets, values.shape[0])
    import torch

    by: dict[str, torch.Tensor] = {}
    for t in TARGETS:
        idx = [i for i, x in enumerate(targets) if x == t]
        if idx:
            by[t] = values[idx].mean(dim=0)
    return torch.stack(list(by.values())).mean(dim=0), by


def jsonable(x: Any) -> Any:
    """Plain Python types: tensors/arrays to (nested) lists, numpy scalars to float/int, nan/inf to None."""
    if isinstance(x, ToDict):
        return x.to_dict()
    if _is_tensor(x):
        x = x.detach().cpu()
        return jsonable(x.item() if x.ndim == 0 else x.tolist())
    if isinstance(x, np.ndarray):
        return jsonable(x.item() if x.ndim == 0 else x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


class ToDict:
    """Mixin for result dataclasses: ``to_dict()`` gives JSON-ready Python types (non-finite floats become None)."""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import fields

        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- atomic writes

def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_beside(path: Path) -> Path:
    """A new empty file ``.{name}.{random}.tmp`` beside ``path``, created with mode 0666 less the umask (as
    ``open()`` creates files; ``tempfile.mkstemp`` would give 0600, which the rename would carry over)."""
    for _ in range(100):
        name = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return name
    raise FileExistsError(f"cannot create a temporary file beside {path}: 100 names taken")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file beside it and a rename: a reader (or a crash)
    sees the old file or the new one, never half of it. The folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> None:
    """:func:`atomic_write_text` of ``obj`` as JSON (through :func:`jsonable`)."""
    atomic_write_text(path, json.dumps(jsonable(obj), indent=indent))
