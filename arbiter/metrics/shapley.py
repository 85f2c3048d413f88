"""Exact modality Shapley values over all coalitions (docs/methods/shapley.md, [PB]) and the X-vs-Y preference angle.

The value function is given, never computed here: a callable on frozensets or a table of coalition values."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..util import ToDict, check_choice, fail

ANGLE_METHODS = ("ratio", "atan2")

__all__ = ["ANGLE_METHODS", "ShapleyResult", "shapley", "preference_angle"]


@dataclass
class ShapleyResult(ToDict):
    """values: player -> phi (in ``players`` order); v_empty = v({}), v_full = v(all players);
    efficiency_gap = sum(phi) - (v_full - v_empty), 0 up to rounding."""

    values: dict[Hashable, float]
    players: list[Hashable]
    v_empty: float
    v_full: float
    efficiency_gap: float = 0.0
    coalition_values: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, player: Hashable) -> float:
        return self.values[player]


def _key(c: Iterable[Hashable]) -> frozenset:
    return frozenset(c)


def _label(c: frozenset, order: Sequence[Hashable]) -> str:
    return "{" + ", ".join(str(p) for p in order if p in c) + "}"


def shapley(value: Callable[[frozenset], float] | Mapping[Iterable[Hashable], float],
            players: Sequence[Hashable] | None = None, *, max_players: int = 4) -> ShapleyResult:
    """Exact Shapley values phi_i = sum_{S subset N minus i} |S|! (n-|S|-1)! / n! (v(S u {i}) - v(S)).

    value: a callable taking a frozenset of players (each coalition is evaluated once), or a mapping from
    coalitions (frozenset / set / tuple of players, including the empty one) to v(S). players: the player
    order (needed with a callable; inferred from a mapping's keys, sorted by name, when omitted).
    ``max_players`` (4, docs/methods/shapley.md): exact enumeration costs 2^n evaluations; raise it deliberately for more.
    Returns :class:`ShapleyResult`."""
    table: dict[frozenset, float] | None = None
    if isinstance(value, Mapping):
        table = {}
        for k, v in value.items():
            key = _key([k] if isinstance(k, str) else k)
            table[key] = float(v)
        if players is None:
            players = sorted(set().union(*table.keys()), key=str)
    elif not callable(value):
        fail("value must be a callable v(frozenset) -> float or a mapping {coalition: value}.")
    if players is None:
        fail("players is required when value is a callable.")
    players = list(players)
    if len(set(players)) != len(players):
        fail(f"players has duplicates: {players}.")
    n = len(players)
    if n == 0:
        fail("no players.")
    if n > max_players:
        fail(f"{n} players: exact Shapley enumerates 2^{n} coalitions; docs/methods/shapley.md covers n <= {max_players} "
             f"(pass max_players={n} to do it anyway).")
    cache: dict[frozenset, float] = {}

    def v(c: frozenset) -> float:
        if c not in cache:
            if table is not None:
                if c not in table:
                    fail(f"the value table has no entry for coalition {_label(c, players)}; give all 2^{n}.")
                cache[c] = table[c]
            else:
                x = float(value(c))  # type: ignore[operator]
                if not math.isfinite(x):
                    fail(f"v({_label(c, players)}) = {x} is not finite.")
                cache[c] = x
        return cache[c]

    fact = [math.factorial(i) for i in range(n + 1)]
    phi: dict[Hashable, float] = {}
    for p in players:
        others = [q for q in players if q != p]
        total = 0.0
        for size in range(n):
            w = fact[size] * fact[n - size - 1] / fact[n]
            for s in itertools.combinations(others, size):
                S = frozenset(s)
                total += w * (v(S | {p}) - v(S))
        phi[p] = total
    v0, vN = v(frozenset()), v(frozenset(players))
    gap = sum(phi.values()) - (vN - v0)
    return ShapleyResult(phi, players, v0, vN, gap, {_label(c, players): x for c, x in cache.items()})


def preference_angle(phi_x: float, phi_y: float, how: str = "ratio") -> float:
    """Preference angle in degrees between modality X and modality Y (docs/methods/shapley.md, proposed).

    ``"ratio"`` (default): theta = 90 * (phi_Y - phi_X) / (|phi_X| + |phi_Y|) in [-90, 90]; 0 balanced, +90 only Y,
    -90 only X. ``"atan2"`` (option): 2 * atan2(phi_Y, phi_X) - 90 with both phi clipped at 0 first.
    nan when both phi are 0 (after clipping for ``"atan2"``): no preference is defined."""
    check_choice("how", how, ANGLE_METHODS)
    x, y = float(phi_x), float(phi_y)
    if not (math.isfinite(x) and math.isfinite(y)):
        fail(f"phi_x={x}, phi_y={y} must be finite.")
    if how == "ratio":
        den = abs(x) + abs(y)
        return min(90.0, max(-90.0, 90.0 * ((y - x) / den))) if den > 0 else math.nan
    x, y = max(x, 0.0), max(y, 0.0)
    if x == 0.0 and y == 0.0:
        return math.nan
    return 2.0 * math.degrees(math.atan2(y, x)) - 90.0
