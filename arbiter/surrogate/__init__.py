"""Physics surrogate of docs/methods/surrogate.md ([PB]): two populations of phase oscillators with softmax couplings on a Lorenz task.

Oscillators, Lorenz drive, ridge readout, dynamical SHAP, β sweeps with identifiability, and fitting β to a Trace."""

from .fit import ConcentrationTable, FitResult, concentration_table, fit, merge_concentrations, trace_concentrations
from .lorenz import LorenzSignal, lorenz
from .oscillators import PAPER, PRESETS, RESPONSIVE, Draws, Preset, SimResult, draw, get_preset, simulate, substeps_for
from .readout import ReadoutResult, nmse, ridge_readout
from .shap import CellShap, cell_shap, dynamical_shap
from .sweep import SweepResult, beta_grid, identifiability_ratio, sweep

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

_CALIBRATION = ("DEFAULT_CALIBRATION", "load_calibration", "table_point")


def __getattr__(name: str):
    # lazy, so that `python -m arbiter.surrogate.calibration` does not find its module imported already
    if name in _CALIBRATION:
        from . import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module 'arbiter.surrogate' has no attribute {name!r}")
