"""Two populations of phase oscillators with softmax (attention-like) couplings, docs/methods/surrogate.md ([PB]); presets and RK4.

One torch computation integrates every (β cell, seed) pair of a grid at once (float64 phases; the vector field in
float64 or float32); seeds are paired across cells."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..threads import idle_cores
from ..util import check_choice, fail
from .lorenz import LorenzSignal, lorenz

__all__ = [
    "PAPER",
    "PRESETS",
    "RESPONSIVE",
    "Draws",
    "OscillatorBatch",
    "Preset",
    "SimResult",
    "draw",
    "get_preset",
    "make_signal",
    "series_terms",
    "simulate",
    "substeps_for",
    "ws_adjacency",
]

CROSS_ADJACENCY = ("independent", "blocks")
FEATURES = ("sin", "cos", "sin2", "cos2")
METHODS = ("auto", "series", "dense")
BETA_LIMIT = 300.0  # exp(-2 beta) must stay a normal float64 in the dense normaliser
BETA_LIMIT_F32 = 40.0  # the same for float32
DTYPES = ("float64", "float32")
SERIES_TOL = {"float64": 1e-17, "float32": 1e-10}
"""Fourier-Bessel truncation (:func:`series_terms`) per field dtype: below the dtype's rounding (float32: 1.2e-7
relative), so that truncating costs nothing measurable and a float32 field skips the terms it cannot resolve
(M = 11 instead of 16 at β = 1: about 20% less time per field evaluation on the default grid)."""
LARGE_BATCH = 64  # systems per batch from which OscillatorBatch uses its operation-heavy, byte-light paths
SMALL_SCATTER = 2048  # (seed, edge) pairs up to which the general edges are scattered by index_add


@dataclass(frozen=True)
class Preset:
    """Every parameter of one surrogate configuration (docs/methods/surrogate.md). ``(paper)`` = from [PB]; ``(proposed)`` = ours.

    Model: ``dθ_i/dt = ω_i + Σ_j K0 softmax_j(β_self cos(θ_i-θ_j)) a_ij sin(θ_j-θ_i) + (same over the other
    population with β_cross) + drive_gain · h_i sin θ_i · s_σ(t)``, s_X = drive_scale · x(t), s_Y = drive_scale ·
    y(t) of a Lorenz run.

    - n_x, n_y (paper: 50, 50); k0 (paper: 2 (N_X + N_Y) = 200); ws_k, ws_p (paper: WS k = 10, p = 0.01);
      h ~ U[h_low, h_high] (paper: [-0.5, 0.5]).
    - cross_adjacency (proposed, the paper is silent): ``"independent"`` draws a^X, a^Y and a WS(n, k, p) X→Y
      block per seed, Y→X being its transpose; ``"blocks"`` cuts one WS graph on n_x + n_y nodes into blocks.
    - drive_gain (paper 1; ``responsive`` 3, proposed), drive_scale (proposed 1: the paper's amplitude is unknown),
      drive_x, drive_y (1; 0 zeroes that population's drive: the input-knockout SHAP option of docs/methods/surrogate.md),
      omega_std (paper 0; ``responsive`` 2, proposed: we read "ω ~ N(0, 4)" as variance 4).
    - features (paper: ``("sin",)``; ``responsive``: sin θ and cos 2θ, proposed); an intercept is always added.
    - beta_min, beta_max: the default log-spaced grid range (paper 1e-4..1; ``responsive`` 1e-1..1e2, proposed);
      beta_max_extended: the extended-range option (1e2).
    - numerics (proposed, stated in every result): dt 0.01, start t_start = -10 with Lorenz at lorenz_x0 and
      uniform phases, [t_start, 0) discarded, ridge fit [0, t_fit], validation (t_fit, t_train], refit [0, t_train],
      test (t_train, t_end]; lorenz_dt (None: dt / 2); ridge ``lambdas``; ``substeps`` (``"auto"`` or an int, see
      :func:`substeps_for`) with ``substep_scale``; ``series_max_beta`` (method ``auto`` uses the exact Fourier-Bessel
      normaliser up to that β and the dense softmax above it); ``c_every`` (attention concentration sampled every
      that many dt steps); ``drift_threshold`` (the extrapolation flag: a seed whose oscillators' mean sin θ moves
      by more than this, averaged over oscillators, between [0, t_train] and the test window)."""

    name: str = "paper"
    n_x: int = 50
    n_y: int = 50
    k0: float = 200.0
    ws_k: int = 10
    ws_p: float = 0.01
    cross_adjacency: str = "independent"
    h_low: float = -0.5
    h_high: float = 0.5
    drive_gain: float = 1.0
    drive_scale: float = 1.0
    drive_x: float = 1.0
    drive_y: float = 1.0
    omega_std: float = 0.0
    features: tuple = ("sin",)
    beta_min: float = 1e-4
    beta_max: float = 1.0
    beta_max_extended: float = 100.0
    dt: float = 0.01
    t_start: float = -10.0
    t_fit: float = 20.0
    t_train: float = 30.0
    t_end: float = 80.0
    lorenz_sigma: float = 10.0
    lorenz_rho: float = 28.0
    lorenz_b: float = 8.0 / 3.0
    lorenz_x0: tuple = (1.0, 1.0, 1.0)
    lorenz_dt: float | None = None
    lambdas: tuple = tuple(10.0 ** k for k in range(-8, 1))
    substeps: str | int = "auto"
    substep_scale: float = 2.0
    series_max_beta: float = 2.0
    c_every: int = 10
    drift_threshold: float = 0.25

    def __post_init__(self):
        check_choice("cross_adjacency", self.cross_adjacency, CROSS_ADJACENCY)
        for f in self.features:
            check_choice("feature", f, FEATURES)
        if self.cross_adjacency == "independent" and self.n_x != self.n_y:
            fail(f"cross_adjacency='independent' draws a square WS(n, k, p) X→Y block; n_x={self.n_x} != "
                 f"n_y={self.n_y}: use cross_adjacency='blocks' or equal sizes.")
        if not (self.t_start < 0 < self.t_fit < self.t_train < self.t_end):
            fail("need t_start < 0 < t_fit < t_train < t_end.")
        if self.ws_k >= min(self.n_x, self.n_y):
            fail(f"ws_k={self.ws_k} must be below the population sizes.")

    @property
    def n(self) -> int:
        return self.n_x + self.n_y

    def replace(self, **changes) -> Preset:
        """A copy with some parameters changed (tuples given as lists are converted)."""
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


PAPER = Preset()
"""The equations and constants printed in [PB] (docs/methods/surrogate.md). Not expected to reproduce the paper's map: with K0 = 200
the coupling dominates the drive, the populations lock and the softmax is uniform in the reached state."""

RESPONSIVE = Preset(name="responsive", k0=20.0, drive_gain=3.0, omega_std=2.0, features=("sin", "cos2"),
                    beta_min=1e-1, beta_max=1e2)
"""Proposed (docs/methods/surrogate.md): ω ~ N(0, 4), K0 = 20, drive 3 h sin θ s(t), β in 1e-1..1e2, features sin θ and cos 2θ.
Here β moves the attention concentration c; label β "attention concentration and synchrony", not "preference"."""

PRESETS = {"paper": PAPER, "responsive": RESPONSIVE}


def get_preset(preset: str | Preset | dict = "paper", **overrides) -> Preset:
    """A preset by name (``paper``, ``responsive``), a Preset or a dict, with keyword overrides."""
    if isinstance(preset, str):
        check_choice("preset", preset, tuple(PRESETS))
        preset = PRESETS[preset]
    elif isinstance(preset, dict):
        preset = Preset.from_dict(preset)
    elif not isinstance(preset, Preset):
        fail(f"preset must be a name, a Preset or a dict, got {type(preset).__name__}.")
    return preset.replace(**overrides) if overrides else preset


# ----------------------------------------------------------------------------------------------- random draws


def ws_adjacency(n: int, k: int, p: float, seed: int) -> np.ndarray:
    """Symmetric 0/1 adjacency [n, n] of a Watts-Strogatz graph: ring of k nearest neighbours, each edge rewired
    with probability p (no self-loops, no multi-edges).

    Same algorithm and random stream as ``networkx.watts_strogatz_graph(n, k, p, seed)`` (``random.Random(seed)``;
    a test checks the two agree), without needing networkx."""
    import random

    if not (0 < k < n):
        fail(f"Watts-Strogatz: need 0 < k < n (got n={n}, k={k}).")
    rng = random.Random(int(seed))
    a = np.zeros((n, n), dtype=bool)
    nodes = list(range(n))
    for j in range(1, k // 2 + 1):
        for u in nodes:
            v = (u + j) % n
            a[u, v] = a[v, u] = True
    for j in range(1, k // 2 + 1):
        for u in nodes:
            v = (u + j) % n
            if rng.random() < p:
                w = rng.choice(nodes)
                skipped = False
                while w == u or a[u, w]:
                    w = rng.choice(nodes)
                    if a[u].sum() >= n - 1:
                        skipped = True
                        break
                if not skipped:
                    a[u, v] = a[v, u] = False
                    a[u, w] = a[w, u] = True
    return a.astype(np.float64)


@dataclass
class Draws:
    """What a seed fixes (graph, fields, start phases, frequencies), identical in every β cell (paired seeds).

    adj [S, N, N] (rows: receiving oscillator; X first, then Y), h, theta0, omega [S, N]."""

    seeds: list
    adj: np.ndarray
    h: np.ndarray
    theta0: np.ndarray
    omega: np.ndarray


def draw(preset: Preset, seeds: Iterable[int]) -> Draws:
    """Per seed: ``numpy.random.default_rng(seed)`` gives three WS graph seeds, then θ0 ~ U[0, 2π), h ~ U[h_low,
    h_high], ω ~ N(0, omega_std²) (ω drawn even when omega_std = 0, so both presets share graphs, h and θ0)."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        fail("no seeds.")
    nx_, ny, n = preset.n_x, preset.n_y, preset.n
    S = len(seeds)
    adj = np.zeros((S, n, n))
    h, th, om = np.zeros((S, n)), np.zeros((S, n)), np.zeros((S, n))
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        gs = rng.integers(0, 2**31 - 1, size=3)
        th[i] = rng.uniform(0.0, 2 * math.pi, n)
        h[i] = rng.uniform(preset.h_low, preset.h_high, n)
        om[i] = rng.normal(0.0, 1.0, n) * preset.omega_std
        if preset.cross_adjacency == "blocks":
            adj[i] = ws_adjacency(n, preset.ws_k, preset.ws_p, gs[0])
        else:
            adj[i, :nx_, :nx_] = ws_adjacency(nx_, preset.ws_k, preset.ws_p, gs[0])
            adj[i, nx_:, nx_:] = ws_adjacency(ny, preset.ws_k, preset.ws_p, gs[1])
            block = ws_adjacency(nx_, preset.ws_k, preset.ws_p, gs[2])
            adj[i, :nx_, nx_:] = block
            adj[i, nx_:, :nx_] = block.T
    return Draws(seeds, adj, h, th, om)


# ----------------------------------------------------------------------------------------------- numerics


def series_terms(beta: float, tol: float = 1e-17) -> int:
    """Fourier-Bessel terms M so that I_n(β) / I_0(β) < tol for every n > M (at least 1)."""
    from scipy.special import ive

    if beta <= 0:
        return 1
    n = np.arange(0, int(beta + 40 * math.sqrt(beta) + 60))
    r = ive(n, beta) / ive(0, beta)
    small = np.nonzero(r < tol)[0]
    return max(1, int(small[0]) if len(small) else len(n))


def substeps_for(beta_self: float, beta_cross: float, preset: Preset) -> int:
    """RK4 substeps per dt for a cell (docs/methods/surrogate.md: "dt = 0.01, smaller where β > 1"; the rule is proposed).

    ``preset.substeps`` an int: that. ``"auto"``: 1 while max β <= 1, else the smallest power of two >=
    dt · K0 · max β / substep_scale (the softmax's phase derivative scales like K0 β): 1 for every ``paper`` cell
    of the default grid; 1, 2 and 16 for ``responsive`` cells with max β = 3.2, 17.8 and 100. The Lorenz drive
    is the same run whatever the count (interpolated at the stage times).

    Our check (``responsive``, β = 100, 2 seeds, t in [0, 10]): against 32 substeps the median phase error is
    5e-8 at 16, 1e-6 at 8, 3e-5 at 4 and 8e-4 at 1, and c agrees within 0.3% even at 1 substep; but the driven
    oscillators show phase slips, so single-seed NMSE and angle move by up to ~0.05 and ~20° between substep
    counts: only their statistics over seeds are reproducible, as for the chaotic Lorenz signal itself."""
    if not isinstance(preset.substeps, str):
        s = int(preset.substeps)
        if s < 1:
            fail(f"substeps={s} must be >= 1.")
        return s
    check_choice("substeps", preset.substeps, ("auto",))
    b = max(float(beta_self), float(beta_cross))
    if b <= 1.0:
        return 1
    need = preset.dt * preset.k0 * b / preset.substep_scale
    return 1 if need <= 1 else 2 ** math.ceil(math.log2(need) - 1e-12)


class OscillatorBatch:
    """The vector field of B = cells × seeds independent systems (batch index b = cell * S + seed), one torch
    computation (float64 by default; ``dtype="float32"`` evaluates the field in float32, see :func:`simulate`).

    Numerator Σ_j a_ij e^{β(cos δ_ij - 1)} sin δ_ij over graph edges only (each undirected edge once); normaliser
    Z_i = Σ_j e^{β(cos δ_ij - 1)} over the whole group, either ``"dense"`` (the softmax over all keys) or
    ``"series"`` (exact Fourier-Bessel sum N Σ_n ε_n ive(n, β) Re(e^{inθ_i} conj r_n), r_n the group's n-th
    moment, truncated below 1e-17 relative, 1e-10 for a float32 field (``SERIES_TOL``): the same number up to
    rounding, much cheaper at small β).
    ``"auto"``: series when every β of the batch <= preset.series_max_beta (2: the cross normaliser stays far
    from cancellation), dense otherwise.

    Layout: internally every array is [seeds, oscillators, cells] (cells innermost: a seed's graph is the same in
    every cell). Edges of the Watts-Strogatz ring lattice (``lattice``) are evaluated on shifted views of the
    phases, without gathering or scattering; the other edges (rewired ones, other graphs) by one row gather of
    their endpoints and one sparse (CSR) product that scatters them, with weight and sign, to both ends. The
    Fourier-Bessel contraction runs over power planes [n, seeds, oscillators, cells]. Small batches are bound by
    the number of array operations, large ones by bytes moved: ``large`` (default: B >= LARGE_BATCH) picks the
    ring-lattice views and a power-by-power series loop, otherwise the general edge list and one batched matrix
    product; every path gives the same numbers up to rounding (tests check them against each other and against
    a term-by-term loop). :meth:`velocity` and :meth:`concentration` take and return the public [B, N] layout;
    the integrator works in the internal one (:meth:`velocity_internal`) with preallocated buffers."""

    def __init__(self, preset: Preset, draws: Draws, beta_self: Sequence[float], beta_cross: Sequence[float],
                 method: str = "auto", device: str = "cpu", dtype: str = "float64", lattice: bool | str = "auto",
                 large: bool | None = None):
        check_choice("method", method, METHODS)
        check_choice("dtype", dtype, DTYPES)
        self.preset = p = preset
        bs = np.asarray(beta_self, dtype=np.float64).reshape(-1)
        bc = np.asarray(beta_cross, dtype=np.float64).reshape(-1)
        if bs.shape != bc.shape:
            fail(f"beta_self has {bs.size} cells, beta_cross {bc.size}; give one pair per cell.")
        if np.any(bs < 0) or np.any(bc < 0) or not np.all(np.isfinite(bs + bc)):
            fail("β must be finite and >= 0.")
        limit = BETA_LIMIT if dtype == "float64" else BETA_LIMIT_F32
        if max(bs.max(), bc.max()) > limit:
            fail(f"β up to {limit} is supported in {dtype} (exp(-2β) must stay a normal {dtype}); got "
                 f"{max(bs.max(), bc.max())}.")
        if method == "auto":
            method = "series" if max(bs.max(), bc.max()) <= p.series_max_beta else "dense"
        self.method = method
        S, C = len(draws.seeds), bs.size
        self.n_cells, self.n_seeds, self.B = C, S, C * S
        # small batches are bound by the number of array operations, large ones by the bytes moved: the ring-lattice
        # views and the power-by-power series loop (fewer bytes, more operations) pay from LARGE_BATCH systems on
        large = self.B >= LARGE_BATCH if large is None else bool(large)
        self.lattice = large if lattice == "auto" else bool(lattice)
        self.series_loop = large
        self.dev = torch.device(device)
        self.dtype = torch.float64 if dtype == "float64" else torch.float32
        fx = {"dtype": self.dtype, "device": self.dev}
        nx_, ny, n = p.n_x, p.n_y, p.n
        self.nx, self.n = nx_, n
        # per-seed quantities broadcast over cells: [S, N, 1]; per-cell β: [C]
        col = lambda a: torch.as_tensor(np.asarray(a)[:, :, None], **fx)
        self.omega_i = col(draws.omega)
        self.has_omega = bool(np.any(draws.omega != 0))
        self.hg_i = col(draws.h * p.drive_gain)
        # the phases (state, RK4 sums) stay float64 whatever dtype the vector field is evaluated in
        self.theta0_i = torch.as_tensor(draws.theta0[:, :, None], dtype=torch.float64,
                                        device=self.dev).expand(S, n, C).contiguous()
        # internal cell order: by the number of Fourier-Bessel terms each cell needs, so that the series loop
        # runs power n only over the (trailing) cells that need it
        tol = SERIES_TOL[dtype]
        self.m_cell = np.array([max(series_terms(a, tol), series_terms(b, tol)) for a, b in zip(bs, bc)])
        perm = np.argsort(self.m_cell, kind="stable") if method == "series" else np.arange(C)
        self._perm = None if np.array_equal(perm, np.arange(C)) else torch.as_tensor(perm, device=self.dev)
        self._inv = None if self._perm is None else torch.as_tensor(np.argsort(perm), device=self.dev)
        self.m_cell = self.m_cell[perm]
        bs_i, bc_i = bs[perm], bc[perm]
        self.beta_s_c = torch.as_tensor(bs_i, **fx)  # [C], internal order
        self.beta_c_c = torch.as_tensor(bc_i, **fx)
        # the public [B, N] views (b = cell * S + seed)
        self.beta_s = torch.as_tensor(np.repeat(bs, S), **fx)
        self.beta_c = torch.as_tensor(np.repeat(bc, S), **fx)
        self.theta0 = self.from_internal(self.theta0_i)
        adj = draws.adj
        if not np.array_equal(adj, np.swapaxes(adj, 1, 2)):
            fail("the adjacency must be symmetric (a^Y→X is the transpose of a^X→Y).")
        rest = self._ring_blocks(adj)  # the Watts-Strogatz ring lattice as strided views; ``rest``: other edges
        # the remaining edges, each undirected edge once (the softmax weight e^{β(cos δ - 1)} is symmetric, sin δ
        # antisymmetric): one row gather of their endpoints, one sparse product scatters them to both ends
        own = np.zeros((n, n), dtype=bool)
        own[:nx_, :nx_] = own[nx_:, nx_:] = True
        iu = np.triu_indices(n, 1)
        lists = [np.nonzero(rest[s_][iu])[0] for s_ in range(S)]
        E_ = max(len(e) for e in lists)
        self.n_edges = E_  # per seed, padded (i = j = 0, no scatter entry)
        ei, ej = np.zeros((S, E_), dtype=np.int64), np.zeros((S, E_), dtype=np.int64)
        ew, ecross = np.zeros((S, E_)), np.zeros((S, E_), dtype=bool)
        for s_, e in enumerate(lists):
            i_, j_ = iu[0][e], iu[1][e]
            ei[s_, :len(e)], ej[s_, :len(e)], ew[s_, :len(e)] = i_, j_, rest[s_, i_, j_]
            ecross[s_, :len(e)] = ~own[i_, j_]
        srow = (np.arange(S) * n)[:, None]
        # gather rows of the [cos; sin] buffer [2 * S * N, C]: c_i, s_i, c_j, s_j of every (seed, edge)
        SN = S * n
        self.gather_idx = torch.as_tensor(np.concatenate([(srow + ei).ravel(), (SN + srow + ei).ravel(),
                                                          (srow + ej).ravel(), (SN + srow + ej).ravel()]),
                                          device=self.dev)
        self.beta_edge = torch.where(torch.as_tensor(ecross.reshape(-1, 1), device=self.dev), self.beta_c_c[None, :],
                                     self.beta_s_c[None, :]).contiguous()  # [S * E, C]
        self.nbeta_edge = -self.beta_edge
        # scatter matrix [2 * S * N (self rows, then cross rows), S * E]: +a_ij to row i, -a_ij to row j
        live = ew.ravel() != 0
        rows_i = (ecross * SN + srow + ei).ravel()[live]
        rows_j = (ecross * SN + srow + ej).ravel()[live]
        cols = np.arange(S * E_)[live]
        w = ew.ravel()[live]
        self.scatter = _csr(np.concatenate([rows_i, rows_j]), np.concatenate([cols, cols]),
                            np.concatenate([w, -w]), (2 * SN, S * E_), self.dtype, self.dev)
        # a few edges (the rewired ones next to the ring lattice): two index_add calls cost less than the sparse
        # product's fixed overhead; padding and weights enter as a multiplier (0 for padding)
        self.scatter_small = S * E_ <= SMALL_SCATTER
        if self.scatter_small:
            self.rows_i = torch.as_tensor((ecross * SN + srow + ei).ravel(), device=self.dev)
            self.rows_j = torch.as_tensor((ecross * SN + srow + ej).ravel(), device=self.dev)
            self.edge_w = None if np.all(ew == 1.0) else torch.as_tensor(ew.reshape(-1, 1), **fx)
        self.n_own = torch.tensor([nx_] * nx_ + [ny] * ny, **fx)
        self.n_oth = torch.tensor([ny] * nx_ + [nx_] * ny, **fx)
        if method == "series":
            from scipy.special import ive

            self.M = int(self.m_cell.max())
            m = np.arange(0, self.M + 2)
            tab_s = ive(m[:, None], bs_i[None, :])  # [M+2, C]
            tab_c = ive(m[:, None], bc_i[None, :])
            # d/dβ of the scaled sum gives Σ_j E_ij cos δ_ij: weights (I_{n-1} + I_{n+1}) / 2 e^{-β}
            tabs = [tab_s[:self.M + 1], tab_c[:self.M + 1], _deriv(tab_s), _deriv(tab_c)]  # [M+1, C] each
            # weights 2 ive(n, β_cell) for n = 1..M, repeated for Re and Im: [M, 2C] (interleaved like view_as_real)
            w4 = [torch.as_tensor(np.repeat(2.0 * t[1:], 2, axis=1), **fx) for t in tabs]
            M_ = self.M
            # columns (Z_self, Z_cross[, G_self, G_cross]); a row of group g pairs the self weights with g's power
            # sums and the cross weights with the other group's
            self._series_w = {False: torch.stack(w4[:2], 1)[:, None, :, None],  # [M, 1, cols, 1, 2C]
                              True: torch.stack(w4, 1)[:, None, :, None]}
            t0 = np.stack([t[0] for t in tabs])  # [4, C]: ive_0 (or its d/dβ) of the four columns
            keys = np.stack([self.n_own.cpu().numpy(), self.n_oth.cpu().numpy()] * 2)  # [4, N]: keys per row
            base = torch.as_tensor(keys[:, :, None] * t0[:, None, :], **fx)  # [4, N, C]: N_keys ive_0
            self._series_base = {False: base[:2].contiguous(), True: base}
            # the same tables for the few-systems path: weights [cols, C, 1, 2M] ((n, re/im) innermost), base
            # [C, N, cols]
            self._series_w_small = torch.stack([w.view(M_, C, 2).permute(1, 0, 2).reshape(C, 1, 2 * M_) for w in w4])
            self._series_base_small = base.permute(2, 1, 0).contiguous()
        else:
            blk = np.zeros((C, n, n))
            blk[:, :nx_, :nx_] = blk[:, nx_:, nx_:] = bs[:, None, None]
            blk[:, :nx_, nx_:] = blk[:, nx_:, :nx_] = bc[:, None, None]
            self.beta_blk = torch.as_tensor(np.repeat(blk, S, axis=0), **fx)  # [B, N, N], b = cell * S + seed
        self.is_x_b = torch.zeros(n, dtype=torch.bool, device=self.dev)
        self.is_x_b[:nx_] = True
        self._buf: dict = {}

    def _ring_blocks(self, adj: np.ndarray) -> np.ndarray:
        """Find the ring lattice of the Watts-Strogatz graphs (node i linked to i ± 1..k/2 within a population and,
        for the X→Y block, to the same positions ± 0..k/2 of the other one): those edges are evaluated on
        shifted views of the phases (no gather, no scatter); a lattice position absent from a seed's graph gets
        the logit -inf (weight e^{-inf} = 0 exactly). Blocks covering fewer than half of their edges are skipped.
        Returns the adjacency of the edges left for the general edge list (rewired ones, other layouts)."""
        S, nx_, n, K = adj.shape[0], self.nx, self.n, self.preset.ws_k // 2
        self.ring = []
        rest = adj.copy()
        ng = nx_
        if not (self.lattice and 2 * nx_ == n and K >= 1 and 2 * K + 1 < ng and np.all((adj == 0) | (adj == 1))):
            return rest
        i = np.arange(ng)
        fx = {"dtype": self.dtype, "device": self.dev}
        specs = [("self", [(g * ng, g * ng) for g in (0, 1)], np.arange(1, K + 1), self.beta_s_c),
                 ("cross", [(0, ng)], np.arange(-K, K + 1), self.beta_c_c)]
        for kind, groups, offs, beta in specs:
            rows = np.array([[r0 + i for _ in offs] for r0, _ in groups])  # [G, D, ng]
            cols = np.array([[q0 + (i + d) % ng for d in offs] for _, q0 in groups])
            present = adj[:, rows, cols] != 0  # [S, G, D, ng]
            # edges of this kind in the graphs (self: each undirected edge once; cross: the X→Y block)
            n_edges = sum(np.count_nonzero(adj[:, r0:r0 + ng, q0:q0 + ng]) for r0, q0 in groups)
            n_edges = n_edges // 2 if kind == "self" else n_edges
            if present.sum() < 0.5 * max(1, n_edges):
                continue
            for s_ in range(S):
                rr, cc = rows[present[s_]], cols[present[s_]]
                rest[s_, rr, cc] = rest[s_, cc, rr] = 0.0
            pres = torch.as_tensor(present[..., None], device=self.dev)
            bias = torch.where(pres, -beta, torch.tensor(-math.inf, **fx)).contiguous()  # [S, G, D, ng, C]
            self.ring.append({"kind": kind, "d0": int(offs[0]), "nd": len(offs), "bias": bias, "beta": beta})
        return rest

    def _ring_views(self, b: dict) -> None:
        """Strided views of the padded phase buffer and of the edge-term buffers for every ring block."""
        S, C, ng, K = self.n_seeds, self.n_cells, self.nx, self.preset.ws_k // 2
        mk = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.dev)
        pn = b["pn"] = mk(2, S, 2, ng + 2 * K, C)  # cos, sin per group with K wrapped nodes on each side
        for blk in self.ring:
            nd, d0 = blk["nd"], blk["d0"]
            G = 2 if blk["kind"] == "self" else 1
            views = []
            for x in (pn[0], pn[1]):  # [S, 2, L, C]
                st = x.stride()
                xi = x[:, :G, None, K:K + ng]  # row oscillator i (self: both groups; cross: X)
                src = x if G == 2 else x[:, 1:2]  # column oscillator j = i + d (cross: in Y)
                xj = src.as_strided((S, G, nd, ng, C), (st[0], st[1], st[2], st[2], st[3]),
                                    src.storage_offset() + (K + d0) * st[2])
                views += [xi, xj]
            blk["ci"], blk["cj"], blk["si"], blk["sj"] = views
            # edge terms f[d, i] with K wrapped positions on each side, so that column sums are strided views
            fp = mk(S, G, nd, ng + 2 * K, C)
            st = fp.stride()
            blk["fp"], blk["f"], blk["t2"] = fp, fp[:, :, :, K:K + ng], mk(S, G, nd, ng, C)
            # column j collects f[d, j - d]: position K + j - d of the padded axis
            blk["fcol"] = fp.as_strided((S, G, nd, ng, C), (st[0], st[1], st[2] - st[3], st[3], st[4]),
                                        fp.storage_offset() + (K - d0) * st[3])
            blk["tmp"] = mk(S, G, ng, C)

    # -- layout ---------------------------------------------------------------------------------------------------
    def to_internal(self, theta: torch.Tensor) -> torch.Tensor:
        """[B, N] (b = cell * S + seed) -> [S, N, C] (cells in internal order; contiguous copy)."""
        x = theta.reshape(self.n_cells, self.n_seeds, self.n)
        if self._perm is not None:
            x = x.index_select(0, self._perm)
        return x.permute(1, 2, 0).contiguous()

    def from_internal(self, x: torch.Tensor) -> torch.Tensor:
        """[S, N, C] -> [B, N] (copy)."""
        x = x.permute(2, 0, 1)
        if self._inv is not None:
            x = x.index_select(0, self._inv)
        return x.reshape(self.B, self.n)

    def _buffers(self) -> dict:
        """Preallocated work arrays, and the per-power views of them that the series loop uses (made once)."""
        if not self._buf:
            S, n, C, E_, nx_ = self.n_seeds, self.n, self.n_cells, self.n_edges, self.nx
            mk = lambda *shape, dt=self.dtype: torch.empty(*shape, dtype=dt, device=self.dev)
            b = {"cs": mk(2, S, n, C), "th": mk(S, n, C), "v": mk(S, n, C), "g": mk(4 * S * E_, C),
                 "t1": mk(S * E_, C), "t2": mk(S * E_, C), "num": mk(2, S, n, C)}
            if self.ring:
                self._ring_views(b)
            if self.method == "series" and (self.series_loop or 2 * nx_ != n):  # (else _sums_series_small)
                cdt = torch.complex128 if self.dtype == torch.float64 else torch.complex64
                M = self.M
                P = torch.zeros(M, S, n, C, dtype=cdt, device=self.dev)  # cells never use powers beyond their own
                b["pow_start"] = [int(np.searchsorted(self.m_cell, k, side="right")) for k in range(M)]
                R = torch.view_as_real(P).view(M, S, n, 2 * C)  # [power, seed, oscillator, (cell, re/im)]
                # power sums over the X, Y, X oscillators: self columns read groups (X, Y), cross ones (Y, X)
                psum = mk(M, S, 3, 2 * C)
                b.update(pow=P, psum=psum)
                rows = [slice(0, n)] if 2 * nx_ == n else [slice(0, nx_), slice(nx_, n)]
                for cols in (2, 4):
                    Q, acc = mk(M, S, cols, 2, 2 * C), mk(S, cols, n, 2 * C)
                    b[f"q{cols}"], b[f"acc{cols}"], b[f"a{cols}"] = Q, acc, mk(S, cols, n, C)
                    # power k (n = k + 1) only for the cells with m_cell > k: a trailing slice of the (sorted)
                    # cells, i.e. of the interleaved (cell, re/im) axis
                    start = [2 * c0 for c0 in b["pow_start"]]
                    plan = []
                    views = [(acc.view(S, cols, 2, nx_, 2 * C), R.view(M, S, 1, 2, nx_, 2 * C), Q.unsqueeze(-2))] \
                        if len(rows) == 1 else [(acc[:, :, r], R[:, :, None, r], Q[:, :, :, g, None])
                                                for g, r in enumerate(rows)]
                    for av, Rv, Qv in views:
                        terms = [(av[..., c0:], Rv[k][..., c0:], Qv[k][..., c0:]) for k, c0 in enumerate(start)
                                 if k and c0 < 2 * C]
                        plan.append((av, Rv, Qv, terms))
                    b[f"plan{cols}"] = plan
            self._buf = b
        return self._buf

    # -- pieces (internal layout [S, N, C]) ------------------------------------------------------------------------
    def _trig(self, th: torch.Tensor):
        """cos θ, sin θ into the [cos; sin] buffer (a float64 state is rounded to a float32 field's dtype first)."""
        b = self._buffers()
        cs = b["cs"]
        if th.dtype != self.dtype:
            th = b["th"].copy_(th)
        torch.cos(th, out=cs[0])
        torch.sin(th, out=cs[1])
        return cs[0], cs[1]

    def _numerators(self):
        """Σ_j a_ij e^{β(cos δ_ij - 1)} sin(θ_j - θ_i) over self and over cross neighbours, [S, N, C] each, from
        the cos / sin written by :meth:`_trig`. Ring-lattice edges: elementwise passes over shifted views of the
        phases, row sums and column (anti-diagonal) sums; other edges: one row gather and one sparse product."""
        b = self._buffers()
        S, C, K = self.n_seeds, self.n_cells, self.preset.ws_k // 2
        num = b["num"]
        if self.ring:
            ng = self.nx
            pn = b["pn"]
            pn[:, :, :, K:K + ng].copy_(b["cs"].view(2, S, 2, ng, C))
            pn[:, :, :, :K].copy_(pn[:, :, :, ng:ng + K])
            pn[:, :, :, K + ng:].copy_(pn[:, :, :, K:2 * K])
            done = set()
            for blk in self.ring:
                ci, cj, si, sj, f, t2 = blk["ci"], blk["cj"], blk["si"], blk["sj"], blk["f"], blk["t2"]
                torch.mul(ci, cj, out=f)
                f.addcmul_(si, sj)  # cos δ
                torch.addcmul(blk["bias"], f, blk["beta"], out=f).exp_()  # e^{β (cos δ - 1)}, 0 off the graph
                torch.mul(sj, ci, out=t2)
                t2.addcmul_(cj, si, value=-1.0)  # sin(θ_j - θ_i)
                f.mul_(t2)
                fp = blk["fp"]
                fp[..., :K, :].copy_(fp[..., ng:ng + K, :])
                fp[..., K + ng:, :].copy_(fp[..., K:2 * K, :])
                torch.sum(blk["fcol"], 2, out=blk["tmp"])  # Σ_d f[d, j - d]: what column j receives (negated)
                if blk["kind"] == "self":
                    rows = num[0].view(S, 2, ng, C)
                    torch.sum(f, 2, out=rows)
                    rows.sub_(blk["tmp"])
                    done.add(0)
                else:
                    torch.sum(f, 2, out=num[1][:, :ng].unsqueeze(1))
                    torch.neg(blk["tmp"], out=num[1][:, ng:].unsqueeze(1))
                    done.add(1)
            for k in {0, 1} - done:
                num[k].zero_()
        if self.n_edges:
            SE = S * self.n_edges
            g, t1, t2 = b["g"], b["t1"], b["t2"]
            if C == 1:  # one cell: a flat gather (row gathers of single elements are slower)
                torch.index_select(b["cs"].view(-1), 0, self.gather_idx, out=g.view(-1))
            else:
                torch.index_select(b["cs"].view(-1, C), 0, self.gather_idx, out=g)
            ci, si, cj, sj = g[:SE], g[SE:2 * SE], g[2 * SE:3 * SE], g[3 * SE:]
            torch.mul(ci, cj, out=t1)
            t1.addcmul_(si, sj)  # cos δ
            torch.addcmul(self.nbeta_edge, t1, self.beta_edge, out=t1).exp_()  # e^{β (cos δ - 1)}
            torch.mul(sj, ci, out=t2)
            t2.addcmul_(cj, si, value=-1.0)  # sin(θ_j - θ_i)
            t1.mul_(t2)
            flat = num.view(-1, C)
            if self.scatter_small:
                if self.edge_w is not None:
                    t1.mul_(self.edge_w)
                if not self.ring:
                    flat.zero_()
                flat.index_add_(0, self.rows_i, t1).index_add_(0, self.rows_j, t1, alpha=-1.0)
            else:
                torch.addmm(flat, self.scatter, t1, beta=1.0 if self.ring else 0.0, out=flat)
        elif not self.ring:
            num.zero_()
        return num[0], num[1]

    def _sums_series(self, c: torch.Tensor, s: torch.Tensor, with_g: bool):
        """Z (and G = Σ_j E_ij cos δ_ij) for self and cross keys, [S, N, C] each, by the Fourier-Bessel sum:
        powers e^{inθ_j} (n = 1..M) by repeated doubling, their sums over each group, then the weighted sum over
        n of each row's powers against its group's (self) and the other group's (cross) power sums, as a running
        multiply-add over the power planes (all into preallocated buffers)."""
        nx_, M = self.nx, self.M
        cols = 4 if with_g else 2
        if not self.series_loop and 2 * nx_ == self.n:
            return self._sums_series_small(c, s, cols)
        b = self._buffers()
        P, psum = b["pow"], b["psum"]
        torch.complex(c, s, out=P[0])
        m = 1
        while m < M:  # z^{m+1..m+k} = z^{1..k} z^m, for the cells that need power m + 1 (a trailing slice)
            k, c0 = min(m, M - m), b["pow_start"][m]
            torch.mul(P[:k, ..., c0:], P[m - 1:m, ..., c0:], out=P[m:m + k, ..., c0:])
            m += k
        R = torch.view_as_real(P).view(M, c.shape[0], self.n, -1)
        torch.sum(R[:, :, :nx_], 2, out=psum[:, :, 0])
        torch.sum(R[:, :, nx_:], 2, out=psum[:, :, 1])
        psum[:, :, 2].copy_(psum[:, :, 0])
        Q, W = b[f"q{cols}"], self._series_w[with_g]
        for k in range(cols):  # column k: self (even k) pairs rows of group g with sums of g, cross with the other
            torch.mul(psum[:, :, k % 2:k % 2 + 2], W[:, :, k], out=Q[:, :, k])
        acc, A = b[f"acc{cols}"], b[f"a{cols}"]
        for av, Rv, Qv, terms in b[f"plan{cols}"]:
            if self.series_loop:  # running multiply-add over the power planes: no [M, ...] temporary
                torch.mul(Rv[0], Qv[0], out=av)
                for a_, r_, q_ in terms:
                    a_.addcmul_(r_, q_)
            else:
                torch.sum(torch.mul(Rv, Qv), 0, out=av)
        torch.add(acc[..., 0::2], acc[..., 1::2], out=A).add_(self._series_base[with_g])  # Re·Re + Im·Im + N ive_0
        return [A[:, k] for k in range(cols)]

    def _sums_series_small(self, c: torch.Tensor, s: torch.Tensor, cols: int):
        """:meth:`_sums_series` for few systems (operation-bound): powers [S, C, N, M] by one cumulative product,
        then one batched matrix product per (seed, cell, group) of its powers [nx, 2M] with its weighted power
        sums [2M, cols]. Returns [S, N, C] views."""
        S, n, C = c.shape
        nx_, M = self.nx, self.M
        z = torch.complex(c, s).permute(0, 2, 1)  # [S, C, N]
        R = torch.view_as_real(torch.cumprod(z.unsqueeze(-1).expand(S, C, n, M), dim=-1)).view(S, C, 2, nx_, 2 * M)
        sums = R.sum(3)  # [S, C, 2 (group), 2M]
        sums3 = torch.cat([sums, sums[:, :, :1]], 2)  # groups X, Y, X: self reads (X, Y), cross (Y, X)
        coef = torch.empty(S, C, 2, cols, 2 * M, dtype=c.dtype, device=c.device)
        W = self._series_w_small
        for k in range(cols):
            torch.mul(sums3[:, :, k % 2:k % 2 + 2], W[k], out=coef[:, :, :, k])
        A = torch.bmm(R.view(S * C * 2, nx_, 2 * M), coef.view(S * C * 2, cols, 2 * M).transpose(1, 2))
        A = A.view(S, C, n, cols).add_(self._series_base_small[:, :, :cols])  # [S, C, N, cols]
        return [A[..., k].transpose(1, 2) for k in range(cols)]

    def _sums_dense(self, c: torch.Tensor, s: torch.Tensor, with_g: bool):
        """The same sums from the full softmax over every key (exp of all N x N logits)."""
        cs = torch.stack([self.from_internal(c), self.from_internal(s)], -1)  # [B, N, 2]
        Cm = torch.bmm(cs, cs.transpose(1, 2))
        E = torch.sub(Cm, 1.0).mul_(self.beta_blk).exp_()
        nx_ = self.nx
        parts = [E] + ([E.mul(Cm)] if with_g else [])
        out = []
        for T in parts:
            kx, ky = T[..., :nx_].sum(-1), T[..., nx_:].sum(-1)  # sums over X keys, over Y keys
            out += [torch.where(self.is_x_b, kx, ky), torch.where(self.is_x_b, ky, kx)]
        return [self.to_internal(o) for o in out]

    def _sums(self, th: torch.Tensor, with_g: bool):
        c, s = self._trig(th)
        return (self._sums_series if self.method == "series" else self._sums_dense)(c, s, with_g)

    def velocity_internal(self, th: torch.Tensor, s_x: float, s_y: float, out: torch.Tensor | None = None):
        """dθ/dt in the internal layout [S, N, C] (``out``: a preallocated [S, N, C] result)."""
        c, s = self._trig(th)
        num_s, num_c = self._numerators()
        if self.method == "series":
            zs, zc = self._sums_series(c, s, False)
        else:
            zs, zc = self._sums_dense(c, s, False)
        v = torch.div(num_s, zs, out=out if out is not None and out.dtype == self.dtype else self._buffers()["v"])
        v.addcdiv_(num_c, zc).mul_(self.preset.k0)
        if self.has_omega:
            v.add_(self.omega_i)
        nx_ = self.nx
        v[:, :nx_].addcmul_(self.hg_i[:, :nx_], s[:, :nx_], value=float(s_x))
        v[:, nx_:].addcmul_(self.hg_i[:, nx_:], s[:, nx_:], value=float(s_y))
        return v if out is None or v is out else out.copy_(v)

    def concentration_internal(self, th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`concentration` from internal-layout phases; returns the public (self [B, 2], cross [B, 2])."""
        zs, zc, gs, gc = self._sums(th, with_g=True)
        nx_ = self.nx
        out = []
        for z, g, beta, nk in ((zs, gs, self.beta_s_c, self.n_own), (zc, gc, self.beta_c_c, self.n_oth)):
            H = torch.log(z) - beta * (g / z - 1.0)  # -Σ p log p with log p = β(cos δ - 1) - log Z
            ci = torch.exp(H) / nk[:, None]
            m = torch.stack([ci[:, :nx_].mean(1), ci[:, nx_:].mean(1)], -1)  # [S, C, 2]
            m = m.transpose(0, 1)  # [C, S, 2]
            out.append((m if self._inv is None else m.index_select(0, self._inv)).reshape(self.B, 2))
        return out[0], out[1]

    # -- public layout [B, N] ---------------------------------------------------------------------------------
    def sums(self, theta: torch.Tensor, with_g: bool = False):
        """Normalisers (Z_self, Z_cross[, G_self, G_cross]) [B, N] at phases [B, N]."""
        return [self.from_internal(x) for x in self._sums(self.to_internal(theta), with_g)]

    def velocity(self, theta: torch.Tensor, s_x: float, s_y: float) -> torch.Tensor:
        """dθ/dt [B, N] at phases ``theta`` [B, N] with drive values s_X = s_x, s_Y = s_y (drive_scale applied)."""
        return self.from_internal(self.velocity_internal(self.to_internal(theta), s_x, s_y))

    def concentration(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention concentration exp(H(softmax row)) / N_keys per population: (self [B, 2], cross [B, 2]),
        columns X rows, Y rows; cross = X rows over Y keys and Y rows over X keys. 1 uniform, 1/N one key."""
        return self.concentration_internal(self.to_internal(theta))


def _csr(rows, cols, vals, shape, dtype, device) -> torch.Tensor:
    """A sparse CSR matrix from (row, col, value) triples without duplicates."""
    order = np.lexsort((cols, rows))
    rows, cols, vals = np.asarray(rows)[order], np.asarray(cols)[order], np.asarray(vals)[order]
    crow = np.zeros(shape[0] + 1, dtype=np.int64)
    np.add.at(crow, rows + 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(torch.as_tensor(np.cumsum(crow)), torch.as_tensor(cols, dtype=torch.int64),
                                       torch.as_tensor(vals, dtype=dtype), size=shape, device=device)


def _deriv(tab: np.ndarray) -> np.ndarray:
    """Rows m = 0..M of e^{-β} dI_m/dβ = e^{-β} (I_{m-1} + I_{m+1}) / 2 from a table of ive rows 0..M+1."""
    M1 = tab.shape[0] - 1
    prev = np.concatenate([tab[1:2], tab[:M1 - 1]], 0)  # I_{-1} = I_1
    return (prev + tab[1:M1 + 1]) / 2.0


# ----------------------------------------------------------------------------------------------- integration


@dataclass
class SimResult:
    """Integrated phases and what was tracked on the way.

    theta [C, S, T, N] phases mod 2π at ``times`` [T] (every dt from record_from to t_end; float32 unless asked);
    c_self, c_cross [C, S, 2] attention concentration averaged over time (t >= record_from, every c_every dt) and
    over the oscillators of each population (columns X, Y); substeps [C]; method [C]; seeds; betas [C, 2];
    signal (the shared Lorenz run); seconds (wall time of the integration)."""

    theta: np.ndarray
    times: np.ndarray
    c_self: np.ndarray
    c_cross: np.ndarray
    substeps: np.ndarray
    method: list
    seeds: list
    betas: np.ndarray
    signal: LorenzSignal
    preset: Preset
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def make_signal(preset: Preset, t_end: float | None = None) -> LorenzSignal:
    """The Lorenz run shared by a whole sweep: RK4 at lorenz_dt (default dt / 2) from t_start to t_end."""
    return lorenz(preset.t_start, preset.t_end if t_end is None else t_end,
                  preset.lorenz_dt or preset.dt / 2.0, preset.lorenz_x0, preset.lorenz_sigma, preset.lorenz_rho,
                  preset.lorenz_b)


def _integrate(batch: OscillatorBatch, signal: LorenzSignal, substeps: int, t_end: float, record_from: float,
               store_dtype, progress: Callable | None, c_from: float | None = None, out: np.ndarray | None = None):
    """RK4 of one batch from preset.t_start to t_end; phases mod 2π stored every dt from record_from into ``out``
    ([B, T, N], or [cells, seeds, T, N] for a (view of a) result array; allocated when None). Returns (out,
    c_self [B, 2], c_cross [B, 2]). Stage values and the RK4 sum live in preallocated buffers."""
    p = batch.preset
    dt = p.dt
    h = dt / substeps
    n_dt = round((t_end - p.t_start) / dt)
    rec0 = round((record_from - p.t_start) / dt)
    c0 = rec0 if c_from is None else round((c_from - p.t_start) / dt)
    if not 0 <= rec0 <= n_dt:
        fail(f"record_from={record_from} must lie in [{p.t_start}, {t_end}].")
    n_steps = n_dt * substeps
    stage_t = p.t_start + (h / 2.0) * np.arange(2 * n_steps + 1)
    sig = signal.at(stage_t) * p.drive_scale
    sx, sy = (sig[:, 0] * p.drive_x).tolist(), (sig[:, 1] * p.drive_y).tolist()
    fast = isinstance(batch, OscillatorBatch)
    if fast:  # internal layout [S, N, C]; stored and reported in the public [B, N] one
        th = batch.theta0_i.clone()
        B, n = batch.B, batch.n
        f, conc, public = batch.velocity_internal, batch.concentration_internal, batch.from_internal
    else:  # a stand-in batch (tests): velocity(th, s_x, s_y) -> new tensor, concentration(th)
        th = batch.theta0.clone()
        B, n = th.shape

        def f(x, a, b, out):
            return out.copy_(batch.velocity(x, a, b))

        conc, public = batch.concentration, (lambda x: x)
    n_t = n_dt - rec0 + 1
    if out is None:
        out = np.empty((B, n_t, n), dtype=store_dtype)
    elif out.shape[-2:] != (n_t, n) or int(np.prod(out.shape[:-2])) != B:
        fail(f"_integrate: out has shape {out.shape}, needs {B} systems x ({n_t}, {n}).")
    lead = out.shape[:-2] + (n,)
    two_pi = 2 * math.pi
    c_self = torch.zeros(B, 2, dtype=torch.float64, device=th.device)
    c_cross = torch.zeros_like(c_self)
    n_c = 0
    tmp, wrapped = torch.empty_like(th), torch.empty_like(th)
    kdt = batch.dtype if fast else th.dtype  # stage slopes in the field's dtype; phases and their sums float64
    k1, k2, k3, k4 = (torch.empty_like(th, dtype=kdt) for _ in range(4))
    wrap = fast and kdt != th.dtype  # a float32 field: keep the float64 phases in [0, 2π) so that rounding them
    # to float32 costs at most 2.4e-7 rad (an exact change of representative: the field is 2π-periodic)

    def sample(k: int):
        nonlocal n_c
        if k >= rec0:
            torch.remainder(th, two_pi, out=wrapped)
            out[..., k - rec0, :] = public(wrapped).cpu().numpy().reshape(lead)
        if k >= c0 and (k - c0) % p.c_every == 0:
            cs, cc = conc(th)
            c_self.add_(cs)
            c_cross.add_(cc)
            n_c += 1

    sample(0)
    h2, h6 = h / 2.0, h / 6.0
    for i in range(n_steps):
        k = 2 * i
        f(th, sx[k], sy[k], out=k1)
        f(torch.add(th, k1, alpha=h2, out=tmp), sx[k + 1], sy[k + 1], out=k2)
        f(torch.add(th, k2, alpha=h2, out=tmp), sx[k + 1], sy[k + 1], out=k3)
        f(torch.add(th, k3, alpha=h, out=tmp), sx[k + 2], sy[k + 2], out=k4)
        th.add_(k1.add_(k2, alpha=2.0).add_(k3, alpha=2.0).add_(k4), alpha=h6)
        if wrap:
            th.remainder_(two_pi)
        if (i + 1) % substeps == 0:
            sample((i + 1) // substeps)
            if progress is not None and ((i + 1) // substeps) % max(1, n_dt // 10) == 0:
                progress((i + 1) / n_steps)
    if not bool(torch.isfinite(th).all()):
        fail("the oscillators diverged (non-finite phases): lower dt or raise substeps.")
    n_c = max(n_c, 1)
    return out, (c_self / n_c).cpu().numpy(), (c_cross / n_c).cpu().numpy()


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily set torch's intra-op thread count (None: leave it); restored on exit."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def resolve_workers(workers: int | None) -> int:
    """Worker threads for batched work. None: torch's intra-op thread count (the cores torch would use), capped by
    the cores that the 1-minute load average leaves idle (at least 1): on a shared machine whose other jobs keep
    the cores busy, a second worker only time-slices with the first (measured on 2 cores at load ~4: the default
    sweep took 210 s with 2 workers, 157 s with 1). The worker count never changes the results (a test checks)."""
    if workers is None:
        return idle_cores(cap=torch.get_num_threads())
    w = int(workers)
    if w < 1:
        fail(f"workers={w} must be >= 1.")
    return w


def _parts(cells: Sequence[int], S: int, workers: int) -> list:
    """Split a batch of cells x S seeds into at most ``workers`` sub-batches (cells, seed slice): whole cells
    when there are enough, else slices of the seeds."""
    cells = list(cells)
    if workers <= 1 or len(cells) * S <= 1:
        return [(cells, slice(0, S))]
    if len(cells) >= workers:
        return [([cells[i] for i in idx], slice(0, S)) for idx in np.array_split(np.arange(len(cells)), workers)]
    k = min(workers, S)
    return [(cells, slice(int(a[0]), int(a[-1]) + 1)) for a in np.array_split(np.arange(S), k)]


def _subset(d: Draws, sl: slice) -> Draws:
    return Draws(d.seeds[sl], d.adj[sl], d.h[sl], d.theta0[sl], d.omega[sl])


def simulate(preset: str | Preset = "paper", beta_self: Sequence[float] | float = 0.0,
             beta_cross: Sequence[float] | float = 0.0, seeds: Iterable[int] = range(10), *,
             signal: LorenzSignal | None = None, t_end: float | None = None, record_from: float = 0.0,
             method: str = "auto", store: str = "float32", device: str = "cpu", dtype: str = "float64",
             workers: int | None = None, batch_cells: int | None = None,
             log: Callable[[str], None] | None = None) -> SimResult:
    """Integrate every (cell, seed): cells are the pairs (beta_self[c], beta_cross[c]), all with the same seeds.

    Cells that share a substep count (:func:`substeps_for`) and a normaliser method run as one batched array
    computation (``batch_cells``: at most that many cells per batch; 1 = a per-point loop, kept to measure what
    batching buys). Deterministic: the seeds fix every random draw and the signal is a deterministic RK4 run; the
    systems are independent, so the split into batches and workers does not change the result beyond rounding
    (a test checks). ``t_end`` (default preset.t_end) shortens the run; phases are stored from ``record_from``;
    ``store`` ``"float32"`` (default, bounds memory) or ``"float64"``; ``dtype``: the vector field in ``"float64"``
    (default) or ``"float32"`` (cells with β > BETA_LIMIT_F32 = 40 are batched apart and stay float64; about twice
    as fast; the phases and the RK4 sums stay float64 and are kept in
    [0, 2π), so the field's inputs are rounded by at most 2.4e-7 rad, the resolution of the float32 store: over the
    default paper run the phases stay within 3e-7 rad of float64; chaotic cells, e.g. ``responsive`` at large β,
    amplify any rounding difference, so there only statistics over seeds agree, as between float64 runs with
    reordered sums); ``workers`` threads each integrate a share of the batch, torch's intra-op threading off in
    every case (one fat task per core instead of a synchronisation per array operation; None: see
    :func:`resolve_workers`);
    ``log`` receives a progress line every 10% of each batch."""
    p = get_preset(preset)
    check_choice("store", store, ("float32", "float64"))
    check_choice("dtype", dtype, DTYPES)
    bs = np.atleast_1d(np.asarray(beta_self, dtype=np.float64)).reshape(-1)
    bc = np.atleast_1d(np.asarray(beta_cross, dtype=np.float64)).reshape(-1)
    if bs.size == 1 and bc.size > 1:
        bs = np.full_like(bc, bs[0])
    if bc.size == 1 and bs.size > 1:
        bc = np.full_like(bs, bc[0])
    if bs.shape != bc.shape:
        fail(f"beta_self has {bs.size} cells and beta_cross {bc.size}.")
    t_end = p.t_end if t_end is None else float(t_end)
    if signal is None:
        signal = make_signal(p, t_end)
    if signal.t0 > p.t_start + 1e-9 or signal.t_end < t_end - 1e-9:
        fail(f"the Lorenz signal covers [{signal.t0}, {signal.t_end}]; the run needs [{p.t_start}, {t_end}].")
    if not p.t_start <= record_from <= t_end:
        fail(f"record_from={record_from} must lie in [t_start, t_end] = [{p.t_start}, {t_end}].")
    workers = resolve_workers(workers)
    draws = draw(p, seeds)
    C, S = bs.size, len(draws.seeds)
    sub = np.array([substeps_for(a, b, p) for a, b in zip(bs, bc)])
    if method == "auto":
        meth = ["series" if max(a, b) <= p.series_max_beta else "dense" for a, b in zip(bs, bc)]
    else:
        check_choice("method", method, METHODS)
        meth = [method] * C
    n_t = round((t_end - record_from) / p.dt) + 1
    sdt = np.float32 if store == "float32" else np.float64
    theta = np.empty((C, S, n_t, p.n), dtype=sdt)
    c_self = np.empty((C, S, 2))
    c_cross = np.empty((C, S, 2))
    t0 = time.perf_counter()
    groups: dict = {}
    for c in range(C):
        f64 = dtype == "float32" and max(bs[c], bc[c]) > BETA_LIMIT_F32  # then batched apart, in float64
        groups.setdefault((int(sub[c]), meth[c], f64), []).append(c)
    batches = []
    for (s_, m_, _), cells in sorted(groups.items()):
        step = len(cells) if not batch_cells else max(1, int(batch_cells))
        batches += [(s_, m_, cells[a:a + step]) for a in range(0, len(cells), step)]

    def run_part(s_, m_, cells, sl, progress):
        # a float32 field only where exp(-2β) stays a normal float32; batches with larger β run in float64
        dt_ = dtype if max(bs[cells].max(), bc[cells].max()) <= BETA_LIMIT_F32 else "float64"
        batch = OscillatorBatch(p, _subset(draws, sl), bs[cells], bc[cells], method=m_, device=device, dtype=dt_)
        contiguous = cells == list(range(cells[0], cells[-1] + 1))
        view = theta[cells[0]:cells[-1] + 1, sl] if contiguous else np.empty((len(cells), sl.stop - sl.start, n_t,
                                                                                   p.n), sdt)
        _, cs, cc = _integrate(batch, signal, s_, t_end, record_from, sdt, progress, out=view)
        if not contiguous:
            theta[np.ix_(cells, range(sl.start, sl.stop))] = view
        c_self[np.ix_(cells, range(sl.start, sl.stop))] = cs.reshape(len(cells), -1, 2)
        c_cross[np.ix_(cells, range(sl.start, sl.stop))] = cc.reshape(len(cells), -1, 2)

    n_parts = 1
    for g, (s_, m_, cells) in enumerate(batches):
        tg = time.perf_counter()
        head = f"batch {g + 1}/{len(batches)} ({len(cells)} cells x {S} seeds, {s_} substeps, {m_})"

        def progress(frac, head=head, tg=tg):
            log(f"{head}: {frac:.0%} after {time.perf_counter() - tg:.0f} s")

        parts = _parts(cells, S, workers)
        n_parts = max(n_parts, len(parts))
        # torch's intra-op threads stay off: the arrays are small, so splitting each operation over threads buys
        # little and costs a synchronisation per operation, which on a shared machine can cost a scheduler slice
        # (observed: 50x slower); the parallelism is one fat task per worker instead
        with torch_threads(1):
            if len(parts) == 1:
                run_part(s_, m_, parts[0][0], parts[0][1], progress if log else None)
                continue
            with ThreadPoolExecutor(len(parts)) as ex:
                futs = [ex.submit(run_part, s_, m_, cl, sl, progress if (log and j == 0) else None)
                        for j, (cl, sl) in enumerate(parts)]
                for fu in futs:
                    fu.result()
    times = record_from + p.dt * np.arange(n_t)
    return SimResult(theta, times, c_self, c_cross, sub, meth, draws.seeds, np.stack([bs, bc], 1), signal, p,
                     time.perf_counter() - t0, extra={"dtype": dtype, "workers": n_parts, "batches": len(batches)})
