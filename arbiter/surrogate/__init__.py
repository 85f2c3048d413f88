"""Physics surrogate of docs/methods/surrogate.md ([PB]): two populations of phase oscillators with softmax couplings on a Lorenz task.

Oscillators, Lorenz drive, ridge readout, dynamical SHAP, β sweeps with identifiability, and fitting β to a Trace."""

import importlib
import sys
import types

# name -> submodule; loaded on first use (PEP 562), so `arbiter surrogate --help` does not import torch and
# `python -m arbiter.surrogate.calibration` does not find its module imported already
_LAZY = {
    **dict.fromkeys(("ConcentrationTable", "FitResult", "concentration_table", "fit", "merge_concentrations",
                     "trace_concentrations"), "fit"),
    **dict.fromkeys(("LorenzSignal", "lorenz"), "lorenz"),
    **dict.fromkeys(("PAPER", "PRESETS", "RESPONSIVE", "Draws", "Preset", "SimResult", "draw", "get_preset",
                     "simulate", "substeps_for"), "oscillators"),
    **dict.fromkeys(("ReadoutResult", "nmse", "ridge_readout"), "readout"),
    **dict.fromkeys(("CellShap", "cell_shap", "dynamical_shap"), "shap"),
    **dict.fromkeys(("SweepResult", "beta_grid", "identifiability_ratio", "sweep"), "sweep"),
    **dict.fromkeys(("DEFAULT_CALIBRATION", "load_calibration", "table_point"), "calibration"),
}

__all__ = [
    "DEFAULT_CALIBRATION",
    "PAPER",
    "PRESETS",
    "RESPONSIVE",
    "CellShap",
    "ConcentrationTable",
    "Draws",
    "FitResult",
    "LorenzSignal",
    "Preset",
    "ReadoutResult",
    "SimResult",
    "SweepResult",
    "beta_grid",
    "cell_shap",
    "concentration_table",
    "draw",
    "dynamical_shap",
    "fit",
    "get_preset",
    "identifiability_ratio",
    "load_calibration",
    "lorenz",
    "merge_concentrations",
    "nmse",
    "ridge_readout",
    "simulate",
    "substeps_for",
    "sweep",
    "table_point",
    "trace_concentrations",
]



def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        if _LAZY[name] != "calibration":
            globals()[name] = value
        return value
    raise AttributeError(f"module 'arbiter.surrogate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``fit``, ``lorenz`` and ``sweep`` the functions: importing the submodule of the same name (which the
    import system then sets as a package attribute) binds the function instead, as an eager import would."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}" and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
