"""Two populations of phase oscillators with softmax (attention-like) couplings, SPEC 11 ([PB]); presets and RK4.

One float64 torch computation integrates every (β cell, seed) pair of a grid at once; seeds are paired across cells."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..metrics._common import check_choice, fail
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


@dataclass(frozen=True)
class Preset:
    """Every parameter of one surrogate configuration (SPEC 11). ``(paper)`` = from [PB]; ``(proposed)`` = ours.

    Model: ``dθ_i/dt = ω_i + Σ_j K0 softmax_j(β_self cos(θ_i-θ_j)) a_ij sin(θ_j-θ_i) + (same over the other
    population with β_cross) + drive_gain · h_i sin θ_i · s_σ(t)``, s_X = drive_scale · x(t), s_Y = drive_scale ·
    y(t) of a Lorenz run.

    - n_x, n_y (paper: 50, 50); k0 (paper: 2 (N_X + N_Y) = 200); ws_k, ws_p (paper: WS k = 10, p = 0.01);
      h ~ U[h_low, h_high] (paper: [-0.5, 0.5]).
    - cross_adjacency (proposed, the paper is silent): ``"independent"`` draws a^X, a^Y and a WS(n, k, p) X→Y
      block per seed, Y→X being its transpose; ``"blocks"`` cuts one WS graph on n_x + n_y nodes into blocks.
    - drive_gain (paper 1; ``responsive`` 3, proposed), drive_scale (proposed 1: the paper's amplitude is unknown),
      drive_x, drive_y (1; 0 zeroes that population's drive: the input-knockout SHAP option of SPEC 11),
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
"""The equations and constants printed in [PB] (SPEC 11). Not expected to reproduce the paper's map: with K0 = 200
the coupling dominates the drive, the populations lock and the softmax is uniform in the reached state."""

RESPONSIVE = Preset(name="responsive", k0=20.0, drive_gain=3.0, omega_std=2.0, features=("sin", "cos2"),
                    beta_min=1e-1, beta_max=1e2)
"""Proposed (SPEC 11): ω ~ N(0, 4), K0 = 20, drive 3 h sin θ s(t), β in 1e-1..1e2, features sin θ and cos 2θ.
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
    """RK4 substeps per dt for a cell (SPEC 11: "dt = 0.01, smaller where β > 1"; the rule is proposed).

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
    """The vector field of B = cells × seeds independent systems (batch index b = cell * S + seed), float64 torch.

    Numerator Σ_j a_ij e^{β(cos δ_ij - 1)} sin δ_ij over graph edges only (each undirected edge once); normaliser
    Z_i = Σ_j e^{β(cos δ_ij - 1)} over the whole group, either ``"dense"`` (the softmax over all keys) or
    ``"series"`` (exact Fourier-Bessel sum N Σ_n ε_n ive(n, β) Re(e^{inθ_i} conj r_n), r_n the group's n-th
    moment, truncated below 1e-17 relative: the same number up to rounding, much cheaper at small β).
    ``"auto"``: series when every β of the batch <= preset.series_max_beta (2: the cross normaliser stays far
    from cancellation), dense otherwise."""

    def __init__(self, preset: Preset, draws: Draws, beta_self: Sequence[float], beta_cross: Sequence[float],
                 method: str = "auto", device: str = "cpu"):
        check_choice("method", method, METHODS)
        self.preset = p = preset
        bs = np.asarray(beta_self, dtype=np.float64).reshape(-1)
        bc = np.asarray(beta_cross, dtype=np.float64).reshape(-1)
        if bs.shape != bc.shape:
            fail(f"beta_self has {bs.size} cells, beta_cross {bc.size}; give one pair per cell.")
        if np.any(bs < 0) or np.any(bc < 0) or not np.all(np.isfinite(bs + bc)):
            fail("β must be finite and >= 0.")
        if max(bs.max(), bc.max()) > BETA_LIMIT:
            fail(f"β up to {BETA_LIMIT} is supported (exp(-2β) must stay a float64); got {max(bs.max(), bc.max())}.")
        if method == "auto":
            method = "series" if max(bs.max(), bc.max()) <= p.series_max_beta else "dense"
        self.method = method
        S, C = len(draws.seeds), bs.size
        self.n_cells, self.n_seeds, self.B = C, S, C * S
        self.dev = torch.device(device)
        f64 = {"dtype": torch.float64, "device": self.dev}
        nx_, n = p.n_x, p.n
        self.nx = nx_
        rep = lambda a: torch.as_tensor(np.tile(a, (C,) + (1,) * (a.ndim - 1)), **f64)
        self.beta_s = torch.as_tensor(np.repeat(bs, S), **f64)
        self.beta_c = torch.as_tensor(np.repeat(bc, S), **f64)
        self.omega = rep(draws.omega)
        self.hg = rep(draws.h) * p.drive_gain
        self.theta0 = rep(draws.theta0)
        self.is_x = torch.zeros(n, **f64)
        self.is_x[:nx_] = 1.0
        # undirected edge list (the softmax weight e^{β(cos δ - 1)} is symmetric, sin δ antisymmetric): each edge
        # is computed once and scattered to both ends; same length for every seed (padding: i = j, weight 0)
        adj = draws.adj
        if not np.array_equal(adj, np.swapaxes(adj, 1, 2)):
            fail("the adjacency must be symmetric (a^Y→X is the transpose of a^X→Y).")
        own = np.zeros((n, n), dtype=bool)
        own[:nx_, :nx_] = own[nx_:, nx_:] = True
        iu = np.triu_indices(n, 1)
        lists = [np.nonzero(adj[s_][iu])[0] for s_ in range(S)]
        E_ = max(1, max(len(e) for e in lists))
        ei, ej = np.zeros((S, E_), dtype=np.int64), np.zeros((S, E_), dtype=np.int64)
        ew, ecross = np.zeros((S, E_)), np.zeros((S, E_), dtype=bool)
        for s_, e in enumerate(lists):
            i_, j_ = iu[0][e], iu[1][e]
            ei[s_, :len(e)], ej[s_, :len(e)], ew[s_, :len(e)] = i_, j_, adj[s_, i_, j_]
            ecross[s_, :len(e)] = ~own[i_, j_]
        self.n_edges = E_
        tile = lambda a: torch.as_tensor(np.tile(a, (C, 1)), device=self.dev)
        self.ei, self.ej, self.ew = tile(ei), tile(ej), tile(ew).to(torch.float64)
        ecr = tile(ecross)
        self.beta_edge = torch.where(ecr, self.beta_c[:, None], self.beta_s[:, None])
        off = (ecr.long() * n)  # scatter slot: row index, + n for the cross numerator
        self.scatter_idx = torch.cat([self.ei + off, self.ej + off], dim=1)
        self.n_own = torch.tensor([nx_] * nx_ + [p.n_y] * p.n_y, **f64)
        self.n_oth = torch.tensor([p.n_y] * nx_ + [nx_] * p.n_y, **f64)
        if method == "series":
            from scipy.special import ive

            self.M = max(series_terms(b) for b in np.concatenate([bs, bc]))
            m = np.arange(0, self.M + 2)
            tab_s = ive(m[:, None], np.repeat(bs, S)[None, :])  # [M+2, B]
            tab_c = ive(m[:, None], np.repeat(bc, S)[None, :])
            self.iv_s, self.iv_c = torch.as_tensor(tab_s[:self.M + 1], **f64), torch.as_tensor(tab_c[:self.M + 1], **f64)
            # d/dβ of the scaled sum gives Σ_j E_ij cos δ_ij: weights (I_{n-1} + I_{n+1}) / 2 e^{-β}
            self.ivd_s = torch.as_tensor(_deriv(tab_s), **f64)
            self.ivd_c = torch.as_tensor(_deriv(tab_c), **f64)
            rep2 = lambda t: t[1:].T.repeat_interleave(2, dim=1).contiguous()
            self.w_s, self.w_c, self.wd_s, self.wd_c = (rep2(t) for t in (self.iv_s, self.iv_c, self.ivd_s, self.ivd_c))
        else:
            blk = torch.zeros(self.B, n, n, **f64)
            blk[:, :nx_, :nx_] = self.beta_s[:, None, None]
            blk[:, nx_:, nx_:] = self.beta_s[:, None, None]
            blk[:, :nx_, nx_:] = self.beta_c[:, None, None]
            blk[:, nx_:, :nx_] = self.beta_c[:, None, None]
            self.beta_blk = blk
        self.is_x_b = self.is_x.bool()

    # -- pieces -------------------------------------------------------------------------------------------------
    def _buffers(self, B: int, dtype, device):
        key = (B, dtype, device)
        if getattr(self, "_buf_key", None) != key:
            E_, n = self.n_edges, self.preset.n
            mk = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)
            self._buf = {"ci": mk(B, E_), "si": mk(B, E_), "cj": mk(B, E_), "sj": mk(B, E_), "arg": mk(B, E_),
                         "src": mk(B, 2 * E_), "out": mk(B, 2 * n)}
            self._buf_key = key
        return self._buf

    def _numerators(self, c: torch.Tensor, s: torch.Tensor):
        """Σ_j a_ij e^{β(cos δ_ij - 1)} sin(θ_j - θ_i) over self and over cross neighbours: [B, N] each.

        Each undirected edge is evaluated once (the weight is symmetric, the sine antisymmetric) into
        preallocated buffers (fresh multi-MB tensors per call cost more than the arithmetic)."""
        B, n = c.shape
        E_ = self.n_edges
        b = self._buffers(B, c.dtype, c.device)
        ci, si, cj, sj, arg, src, out = (b[k] for k in ("ci", "si", "cj", "sj", "arg", "src", "out"))
        torch.gather(c, 1, self.ei, out=ci)
        torch.gather(s, 1, self.ei, out=si)
        torch.gather(c, 1, self.ej, out=cj)
        torch.gather(s, 1, self.ej, out=sj)
        torch.mul(ci, cj, out=arg)
        arg.addcmul_(si, sj).sub_(1.0).mul_(self.beta_edge).exp_()  # e^{β (cos δ - 1)}
        f = src[:, :E_]
        torch.mul(sj, ci, out=f)
        f.sub_(cj.mul_(si)).mul_(self.ew).mul_(arg)  # a_ij E_ij sin(θ_j - θ_i), added to i ...
        torch.neg(f, out=src[:, E_:])  # ... and its negative to j
        out.zero_().scatter_add_(1, self.scatter_idx, src)
        return out[:, :n], out[:, n:]

    def _sums_series(self, c: torch.Tensor, s: torch.Tensor, with_g: bool):
        """Z (and G = Σ_j E_ij cos δ_ij) for self and cross keys, [B, N] each, by the Fourier-Bessel sum."""
        B, n = c.shape
        z = torch.complex(c, s)
        P = torch.view_as_real(torch.cumprod(z.unsqueeze(-1).expand(B, n, self.M), dim=-1)).reshape(B, n, 2 * self.M)
        mx, my = P[:, :self.nx].mean(1), P[:, self.nx:].mean(1)  # [B, 2M]: Re/Im of the moments r_m of X, Y
        tabs = [(self.w_s, self.w_c)] + ([(self.wd_s, self.wd_c)] if with_g else [])
        cols = []
        for ws, wc in tabs:  # ws, wc: [B, 2M] (each ive row repeated for Re and Im)
            cols += [ws * mx, wc * my, ws * my, wc * mx]  # X-row self, X-row cross, Y-row self, Y-row cross
        A = torch.bmm(P, torch.stack(cols, -1))  # [B, N, 4 or 8]
        out = []
        for t, (ts, tc) in enumerate([(self.iv_s, self.iv_c)] + ([(self.ivd_s, self.ivd_c)] if with_g else [])):
            a = A[..., 4 * t:4 * t + 4]
            a_self = torch.where(self.is_x_b, a[..., 0], a[..., 2])
            a_cross = torch.where(self.is_x_b, a[..., 1], a[..., 3])
            out += [self.n_own * (ts[0][:, None] + 2 * a_self), self.n_oth * (tc[0][:, None] + 2 * a_cross)]
        return out

    def _sums_dense(self, c: torch.Tensor, s: torch.Tensor, with_g: bool):
        """The same sums from the full softmax over every key (exp of all N x N logits)."""
        cs = torch.stack([c, s], -1)
        C = torch.bmm(cs, cs.transpose(1, 2))
        E = torch.sub(C, 1.0).mul_(self.beta_blk).exp_()
        nx_ = self.nx
        parts = [E] + ([E.mul(C)] if with_g else [])
        out = []
        for T in parts:
            kx, ky = T[..., :nx_].sum(-1), T[..., nx_:].sum(-1)  # sums over X keys, over Y keys
            out += [torch.where(self.is_x_b, kx, ky), torch.where(self.is_x_b, ky, kx)]
        return out

    def sums(self, theta: torch.Tensor, with_g: bool = False):
        c, s = torch.cos(theta), torch.sin(theta)
        return (self._sums_series if self.method == "series" else self._sums_dense)(c, s, with_g)

    def velocity(self, theta: torch.Tensor, s_x: float, s_y: float) -> torch.Tensor:
        """dθ/dt [B, N] at phases ``theta`` [B, N] with drive values s_X = s_x, s_Y = s_y (drive_scale applied)."""
        c, s = torch.cos(theta), torch.sin(theta)
        num_s, num_c = self._numerators(c, s)
        if self.method == "series":
            zs, zc = self._sums_series(c, s, False)
        else:
            zs, zc = self._sums_dense(c, s, False)
        drive = s_y + (s_x - s_y) * self.is_x
        return self.omega + self.preset.k0 * (num_s / zs + num_c / zc) + self.hg * s * drive

    def concentration(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention concentration exp(H(softmax row)) / N_keys per population: (self [B, 2], cross [B, 2]),
        columns X rows, Y rows; cross = X rows over Y keys and Y rows over X keys. 1 uniform, 1/N one key."""
        zs, zc, gs, gc = self.sums(theta, with_g=True)
        nx_ = self.nx
        out = []
        for z, g, beta, nk in ((zs, gs, self.beta_s, self.n_own), (zc, gc, self.beta_c, self.n_oth)):
            H = torch.log(z) - beta[:, None] * (g / z - 1.0)  # -Σ p log p with log p = β(cos δ - 1) - log Z
            ci = torch.exp(H) / nk
            out.append(torch.stack([ci[:, :nx_].mean(-1), ci[:, nx_:].mean(-1)], -1))
        return out[0], out[1]


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
               store_dtype, progress: Callable | None, c_from: float | None = None):
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
    th = batch.theta0.clone()
    B, n = th.shape
    out = np.empty((B, n_dt - rec0 + 1, n), dtype=store_dtype)
    two_pi = 2 * math.pi
    c_self = torch.zeros(B, 2, dtype=torch.float64, device=th.device)
    c_cross = torch.zeros_like(c_self)
    n_c = 0

    def sample(k: int):
        nonlocal n_c, c_self, c_cross
        if k >= rec0:
            out[:, k - rec0] = torch.remainder(th, two_pi).cpu().numpy().astype(store_dtype, copy=False)
        if k >= c0 and (k - c0) % p.c_every == 0:
            cs, cc = batch.concentration(th)
            c_self += cs
            c_cross += cc
            n_c += 1

    sample(0)
    h2, h6 = h / 2.0, h / 6.0
    f = batch.velocity
    for i in range(n_steps):
        k = 2 * i
        k1 = f(th, sx[k], sy[k])
        k2 = f(th + h2 * k1, sx[k + 1], sy[k + 1])
        k3 = f(th + h2 * k2, sx[k + 1], sy[k + 1])
        k4 = f(th + h * k3, sx[k + 2], sy[k + 2])
        th = th + h6 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        if (i + 1) % substeps == 0:
            sample((i + 1) // substeps)
            if progress is not None and ((i + 1) // substeps) % max(1, n_dt // 10) == 0:
                progress((i + 1) / n_steps)
    if not bool(torch.isfinite(th).all()):
        fail("the oscillators diverged (non-finite phases): lower dt or raise substeps.")
    n_c = max(n_c, 1)
    return out, (c_self / n_c).cpu().numpy(), (c_cross / n_c).cpu().numpy()


def simulate(preset: str | Preset = "paper", beta_self: Sequence[float] | float = 0.0,
             beta_cross: Sequence[float] | float = 0.0, seeds: Iterable[int] = range(10), *,
             signal: LorenzSignal | None = None, t_end: float | None = None, record_from: float = 0.0,
             method: str = "auto", store: str = "float32", device: str = "cpu",
             log: Callable[[str], None] | None = None) -> SimResult:
    """Integrate every (cell, seed): cells are the pairs (beta_self[c], beta_cross[c]), all with the same seeds.

    Cells that share a substep count (:func:`substeps_for`) and a normaliser method run as one batched array
    computation. Deterministic: the seeds fix every random draw and the signal is
    a deterministic RK4 run. ``t_end`` (default preset.t_end) shortens the run; phases are stored from
    ``record_from``; ``store`` ``"float32"`` (default, bounds memory; integration is float64) or ``"float64"``;
    ``log`` receives a progress line every 10% of each batch (a ``paper`` grid is one batch; ``responsive``
    cells split by substep count and normaliser)."""
    p = get_preset(preset)
    check_choice("store", store, ("float32", "float64"))
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
        groups.setdefault((int(sub[c]), meth[c]), []).append(c)
    for g, ((s_, m_), cells) in enumerate(sorted(groups.items())):
        batch = OscillatorBatch(p, draws, bs[cells], bc[cells], method=m_, device=device)
        tg = time.perf_counter()
        head = f"batch {g + 1}/{len(groups)} ({len(cells)} cells x {S} seeds, {s_} substeps, {m_})"

        def progress(frac, head=head, tg=tg):
            log(f"{head}: {frac:.0%} after {time.perf_counter() - tg:.0f} s")

        out, cs, cc = _integrate(batch, signal, s_, t_end, record_from, sdt, progress if log else None)
        theta[cells] = out.reshape(len(cells), S, n_t, p.n)
        c_self[cells] = cs.reshape(len(cells), S, 2)
        c_cross[cells] = cc.reshape(len(cells), S, 2)
    times = record_from + p.dt * np.arange(n_t)
    return SimResult(theta, times, c_self, c_cross, sub, meth, draws.seeds, np.stack([bs, bc], 1), signal, p,
                     time.perf_counter() - t0)
