"""Exact Shapley values (additive game, hand-computed games, efficiency) and the preference angle."""

import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arbiter.errors import DataError
from arbiter.metrics.shapley import preference_angle, shapley


def test_additive_game_gives_player_values():
    w = {"image": 1.5, "text": -0.5, "audio": 2.0}
    r = shapley(lambda S: sum(w[p] for p in S), ["image", "text", "audio"])
    assert r.values == pytest.approx(w)
    assert r.v_empty == 0.0 and r.v_full == pytest.approx(3.0) and abs(r.efficiency_gap) < 1e-12


def test_two_players_by_hand():
    # v({}) = 0, v(a) = 1, v(b) = 2, v(ab) = 5
    # phi_a = 1/2 (v(a) - v({})) + 1/2 (v(ab) - v(b)) = 1/2 + 3/2 = 2; phi_b = 1/2 * 2 + 1/2 * 4 = 3
    table = {(): 0.0, ("a",): 1.0, ("b",): 2.0, ("a", "b"): 5.0}
    r = shapley(table)
    assert r.players == ["a", "b"] and r["a"] == pytest.approx(2.0) and r["b"] == pytest.approx(3.0)
    d = r.to_dict()
    json.dumps(d)
    assert d["values"] == {"a": 2.0, "b": 3.0}


def test_three_player_majority_game():
    # v(S) = 1 if |S| >= 2: symmetric players -> 1/3 each
    r = shapley(lambda S: float(len(S) >= 2), [1, 2, 3])
    assert [r[p] for p in (1, 2, 3)] == pytest.approx([1 / 3] * 3)


def test_errors():
    with pytest.raises(DataError):
        shapley({(): 0.0, ("a",): 1.0, ("b",): 1.0})  # missing {a, b}
    with pytest.raises(DataError):
        shapley(lambda S: 0.0)
    with pytest.raises(DataError):
        shapley(lambda S: 0.0, list("abcde"))
    assert shapley(lambda S: len(S), list("abcde"), max_players=5)["a"] == pytest.approx(1.0)


def test_preference_angle_by_hand():
    # ratio: 90 (3 - 1) / (1 + 3) = 45; atan2: 2 atan2(3, 1) - 90 = 2 * 71.565051 - 90 = 53.130102
    assert preference_angle(1.0, 3.0) == pytest.approx(45.0)
    assert preference_angle(1.0, 3.0, "atan2") == pytest.approx(2 * math.degrees(math.atan2(3, 1)) - 90)
    assert preference_angle(1.0, 3.0, "atan2") == pytest.approx(53.130102, abs=1e-6)
    for how in ("ratio", "atan2"):
        assert preference_angle(2.0, 2.0, how) == pytest.approx(0.0)
        assert preference_angle(2.0, 0.0, how) == pytest.approx(-90.0)
        assert preference_angle(0.0, 2.0, how) == pytest.approx(90.0)
        assert math.isnan(preference_angle(0.0, 0.0, how))
    # negative phi: ratio uses |phi|; atan2 clips at 0
    assert preference_angle(-1.0, 1.0) == pytest.approx(90.0)
    assert preference_angle(-1.0, 1.0, "atan2") == pytest.approx(90.0)
    with pytest.raises(DataError):
        preference_angle(1.0, 1.0, "polar")


values = st.floats(-100, 100, allow_nan=False, allow_infinity=False)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.lists(values, min_size=16, max_size=16))
def test_property_efficiency_and_symmetry(n, vals):
    players = list(range(n))
    coalitions = [frozenset(c) for k in range(n + 1) for c in itertools.combinations(players, k)]
    table = {c: vals[i] for i, c in enumerate(coalitions)}
    r = shapley(table, players)
    # efficiency: sum phi = v(N) - v({})
    assert sum(r.values.values()) == pytest.approx(table[frozenset(players)] - table[frozenset()], abs=1e-9)
    # a null player (adds nothing anywhere) gets 0
    t2 = {c | {"null"}: v for c, v in table.items()} | table
    if n < 4:
        assert shapley(t2, players + ["null"])["null"] == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(values, values)
def test_property_angle_range_and_antisymmetry(x, y):
    a = preference_angle(x, y)
    if math.isnan(a):
        assert x == 0 and y == 0
    else:
        assert -90.0 <= a <= 90.0 and preference_angle(y, x) == -a
