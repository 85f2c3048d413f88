"""``DiagnoseConfig``: every setting of a diagnosis, with its default and meaning written once, shared by
:func:`arbiter.experiments.diagnose.diagnose` and the ``arbiter diagnose`` command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import DataError

HEAD_METHOD_NAMES = ("exhaustive", "attribution", "attribution-ig", "attribution-ig-layer", "attribution-graddrop",
                     "dla", "search")
"""Head rankings diagnose can run (docs/methods/mfr.md, docs/methods/head-search.md); the first one chosen is the
reference the others are compared with."""
HEAD_METHODS = ("exhaustive", "attribution", "attribution-ig", "attribution-graddrop", "dla")
"""Default head rankings of the heads step; the first is the reference (docs/methods/mfr.md: the exhaustive sweep)."""
MODALITY_STEPS = ("shapley", "keyspace", "imbalance", "surrogate")
"""The modality steps (docs/methods/imbalance.md ... docs/methods/surrogate.md)."""
SKIPPABLE_STEPS = (*MODALITY_STEPS, "attractors")
"""Steps that ``skip`` may leave out (the first four feed each other and the report)."""


@dataclass
class DiagnoseConfig:
    """The settings of one diagnosis. Every field has its default here and nowhere else."""

    limit: int | None = None
    """Conflict samples diagnosed (the first ``limit``; None: all)."""
    window: int = 9
    """Layers per knockout window (docs/methods/knockout.md)."""
    top: float = 0.05
    """Share of heads in TopG (at least one head)."""
    batch_size: int = 8
    """Samples per forward."""
    n_random: int = 10
    """Random head sets compared with TopG when blocking and amplifying."""
    alphas: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0)
    """Amplification factors tried on the failures."""
    head_methods: tuple[str, ...] = HEAD_METHODS
    """Head rankings to run (:data:`HEAD_METHOD_NAMES`); the first is the reference."""
    generate: bool = True
    """Generate answers (MFR from text) besides the first-token π."""
    skip: tuple[str, ...] = ()
    """Steps of :data:`SKIPPABLE_STEPS` to leave out (a tuple, or one comma-separated string)."""
    modality_limit: int | None = 32
    """Samples of the modality steps (None: every conflict sample with an image)."""
    shapley_removal: str = "knockout"
    """How a modality is removed for its Shapley value: ``"knockout"`` or ``"neutral"``."""
    keyspace_max_n: int = 1000
    """Keys per modality and layer in the key-space gap."""
    keyspace_permutations: int = 100
    """Permutations of the key-space MMD test."""
    calibration: str = "responsive_5x5_5seeds"
    """The surrogate's c(β) table: a shipped name or a JSON path (:mod:`arbiter.surrogate.calibration`)."""
    surrogate_predict: str = "table"
    """``"table"`` (interpolate the calibration's cells) or ``"simulate"`` (integrate at the fitted β: minutes)."""
    attractor_limit: int | None = 24
    """Labelled samples of the attractors step (None: all)."""
    attractor_subsets: int | None = 20
    """Removal sets of the attractors step (None: all)."""

    def __post_init__(self) -> None:
        skip = self.skip.split(",") if isinstance(self.skip, str) else self.skip
        self.skip = tuple(x.strip() for x in skip if x and x.strip())
        self.alphas = tuple(float(a) for a in self.alphas)
        self.head_methods = tuple(self.head_methods)
        self.check()

    def check(self) -> None:
        """Raise DataError, saying what to pass instead, for a setting diagnose cannot run."""
        unknown = [m for m in self.head_methods if m not in HEAD_METHOD_NAMES]
        if unknown or not self.head_methods:
            raise DataError(f"head ranking methods {list(self.head_methods)!r}: use some of {list(HEAD_METHOD_NAMES)} "
                            "(the first one is the reference the others are compared with).")
        bad = [x for x in self.skip if x not in SKIPPABLE_STEPS]
        if bad:
            raise DataError(f"skip={bad}: only the steps {', '.join(SKIPPABLE_STEPS)} can be skipped.")
        if self.surrogate_predict not in ("table", "simulate"):
            raise DataError(f"surrogate_predict={self.surrogate_predict!r} is not 'table' or 'simulate'.")
        if self.shapley_removal not in ("knockout", "neutral"):
            raise DataError(f"shapley_removal={self.shapley_removal!r} is not 'knockout' or 'neutral'.")
        for name in ("modality_limit", "attractor_limit", "attractor_subsets", "limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise DataError(f"{name}={v} must be >= 1 (or None for all).")
        for name in ("window", "batch_size", "keyspace_max_n"):
            if getattr(self, name) < 1:
                raise DataError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.n_random < 0 or self.keyspace_permutations < 0:
            raise DataError("n_random and keyspace_permutations must be >= 0.")
        if not 0 < self.top <= 1:
            raise DataError(f"top={self.top} is a share of the heads: pass a number in (0, 1].")

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **settings: Any) -> DiagnoseConfig:
        """A copy with ``settings`` changed; an unknown name is a DataError listing the known ones."""
        unknown = sorted(set(settings) - set(self.fields()))
        if unknown:
            raise DataError(f"diagnose() got unknown settings {unknown}; DiagnoseConfig has {self.fields()}.")
        return dataclasses.replace(self, **settings)

    def to_dict(self) -> dict[str, Any]:
        return {name: (list(v) if isinstance(v, tuple) else v) for name in self.fields()
                for v in [getattr(self, name)]}
