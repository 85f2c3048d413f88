"""Physics surrogate of SPEC 11 ([PB]): two populations of phase oscillators with softmax couplings on a Lorenz task.

Oscillators, Lorenz drive, ridge readout, dynamical SHAP, β sweeps with identifiability, and fitting β to a Trace."""

from .fit import ConcentrationTable, FitResult, concentration_table, fit, trace_concentrations
from .lorenz import LorenzSignal, lorenz
from .oscillators import PAPER, PRESETS, RESPONSIVE, Draws, Preset, SimResult, draw, get_preset, simulate, substeps_for
from .readout import ReadoutResult, nmse, ridge_readout
from .shap import CellShap, cell_shap, dynamical_shap
from .sweep import SweepResult, beta_grid, identifiability_ratio, sweep

__all__ = [
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
    "lorenz",
    "nmse",
    "ridge_readout",
    "simulate",
    "substeps_for",
    "sweep",
    "trace_concentrations",
]
