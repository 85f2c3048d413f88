"""Lorenz signal of docs/methods/surrogate.md: one RK4 trajectory per run, shared by every β cell and every seed.

Values between grid points come from cubic Hermite interpolation with the Lorenz vector field as exact slopes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..util import fail

__all__ = ["LorenzSignal", "lorenz", "lorenz_field"]


def lorenz_field(state: np.ndarray, sigma: float = 10.0, rho: float = 28.0, b: float = 8.0 / 3.0) -> np.ndarray:
    """The Lorenz vector field (dx, dy, dz)/dt for states [..., 3]."""
    x, y, z = state[..., 0], state[..., 1], state[..., 2]
    return np.stack([sigma * (y - x), x * (rho - z) - y, x * y - b * z], axis=-1)


@dataclass
class LorenzSignal:
    """A Lorenz trajectory on the grid ``t0 + k * dt`` (k = 0..len-1): ``states`` [T, 3] and ``slopes`` [T, 3].

    ``at(t)`` evaluates it anywhere in range (cubic Hermite; exact on grid points). ``params`` holds sigma, rho,
    b, the start state and dt, so a result can state its numerics."""

    t0: float
    dt: float
    states: np.ndarray
    slopes: np.ndarray
    params: dict = field(default_factory=dict)

    @property
    def t_end(self) -> float:
        return self.t0 + (len(self.states) - 1) * self.dt

    @property
    def times(self) -> np.ndarray:
        return self.t0 + self.dt * np.arange(len(self.states))

    def at(self, t) -> np.ndarray:
        """States at times ``t`` (scalar or array), shape ``t.shape + (3,)``."""
        t = np.asarray(t, dtype=np.float64)
        u = (t - self.t0) / self.dt
        if np.any(u < -1e-9) or np.any(u > len(self.states) - 1 + 1e-9):
            fail(f"Lorenz signal covers [{self.t0}, {self.t_end}]; asked for t in [{t.min()}, {t.max()}].")
        from scipy.interpolate import CubicHermiteSpline

        spline = CubicHermiteSpline(self.times, self.states, self.slopes, axis=0)
        return spline(np.clip(t, self.t0, self.t_end))


def lorenz(t0: float = -10.0, t_end: float = 80.0, dt: float = 0.005, x0=(1.0, 1.0, 1.0), sigma: float = 10.0,
           rho: float = 28.0, b: float = 8.0 / 3.0) -> LorenzSignal:
    """Integrate the Lorenz system with classical RK4 at step ``dt`` from ``x0`` at ``t0`` to ``t_end``.

    Defaults (docs/methods/surrogate.md, proposed where the paper is silent): sigma 10, rho 28, b 8/3, start (1, 1, 1) at t = -10.
    The trajectory is chaotic: two step sizes agree only statistically after a few tens of time units, which is
    why one signal is made per run and shared by every cell and seed."""
    if not (dt > 0 and t_end > t0):
        fail(f"lorenz: need dt > 0 and t_end > t0 (got dt={dt}, t0={t0}, t_end={t_end}).")
    n = round((t_end - t0) / dt)
    if abs(t0 + n * dt - t_end) > 1e-6 * max(1.0, abs(t_end)):
        fail(f"lorenz: (t_end - t0) / dt = {(t_end - t0) / dt} is not an integer number of steps.")
    out = np.empty((n + 1, 3))
    x, y, z = (float(v) for v in x0)
    out[0] = x, y, z
    h, h2 = dt, dt / 2.0

    def f(x, y, z):
        return sigma * (y - x), x * (rho - z) - y, x * y - b * z

    for i in range(1, n + 1):  # plain floats: ~20x faster than numpy on 3-vectors
        a1, b1, c1 = f(x, y, z)
        a2, b2, c2 = f(x + h2 * a1, y + h2 * b1, z + h2 * c1)
        a3, b3, c3 = f(x + h2 * a2, y + h2 * b2, z + h2 * c2)
        a4, b4, c4 = f(x + h * a3, y + h * b3, z + h * c3)
        x += h / 6.0 * (a1 + 2 * a2 + 2 * a3 + a4)
        y += h / 6.0 * (b1 + 2 * b2 + 2 * b3 + b4)
        z += h / 6.0 * (c1 + 2 * c2 + 2 * c3 + c4)
        if not math.isfinite(x + y + z):
            fail(f"lorenz: the trajectory diverged at t = {t0 + i * dt} (dt={dt} too large?).")
        out[i] = x, y, z
    slopes = lorenz_field(out, sigma, rho, b)
    params = {"sigma": sigma, "rho": rho, "b": b, "x0": [float(v) for v in x0], "t0": t0, "t_end": t_end, "dt": dt,
              "method": "RK4; cubic Hermite between grid points"}
    return LorenzSignal(float(t0), float(dt), out, slopes, params)
