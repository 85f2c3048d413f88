"""I_NSSD: exact zero for a no-op, signs, a value computed by hand, the options, and two properties."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arbiter.errors import DataError
from arbiter.metrics.nssd import (compliance_prob, i_nssd, i_nssd_from_probs, jsd, nssd_values)


def H2(p):  # binary entropy in bits
    return -sum(x * math.log2(x) for x in (p, 1 - p) if x > 0)


def test_noop_is_exactly_zero():
    pis = [0.0, 0.1, 0.3, 0.5, 1 / 3, 0.7000000000000001, 1.0]
    for how in ("signed_jsd", "normalised_signed_change", "relative_change"):
        r = i_nssd(pis, pis, how)
        assert r.value == 0.0 and all(v == 0.0 for v in r.per_sample.tolist())
    # JSD of identical distributions is exactly 0, not 1e-17
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).exp().softmax(-1)
    assert jsd(p, p).item() == 0.0
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.05, 0.05, 0.9]])
    for how in ("signed_jsd", "three_outcome"):
        assert i_nssd_from_probs(probs, probs.clone(), [0], [1], how).value == 0.0
    logits = torch.randn(3, 7)
    assert i_nssd_from_probs(logits, logits.clone(), [0, 2], [1], from_logits=True).value == 0.0


def test_known_value_half_to_quarter():
    # B = (0.5, 0.5), B' = (0.25, 0.75), M = (0.375, 0.625)
    # JSD in bits = H2(0.375) - (H2(0.5) + H2(0.25)) / 2 = 0.954434 - (1 + 0.811278)/2 = 0.048795
    # pi lowered -> negative: I_NSSD = -0.048795
    expected = -(H2(0.375) - (H2(0.5) + H2(0.25)) / 2)
    assert expected == pytest.approx(-0.048795, abs=1e-6)
    r = i_nssd([0.5], [0.25])
    assert r.value == pytest.approx(expected, abs=1e-12)
    assert i_nssd([0.25], [0.5]).value == pytest.approx(-expected, abs=1e-12)
    # extreme change: pi 1 -> 0 gives -1 (disjoint outcomes, JSD = ln 2)
    assert i_nssd([1.0], [0.0]).value == -1.0


def test_from_probs_computes_pi():
    # P(D_p) = 0.2 + 0.1 = 0.3, P(D_c) = 0.3 -> pi = 0.5; intervened: P(D_p) = 0.1, P(D_c) = 0.3 -> pi' = 0.25
    probs = torch.tensor([[0.2, 0.3, 0.1, 0.4]], dtype=torch.float64)
    probs2 = torch.tensor([[0.05, 0.3, 0.05, 0.6]], dtype=torch.float64)
    assert compliance_prob(probs, [0, 2], [1]).item() == pytest.approx(0.5)
    r = i_nssd_from_probs(probs, probs2, [[0, 2]], [[1]])
    assert r.value == pytest.approx(i_nssd([0.5], [0.25]).value, abs=1e-12)


def test_options_by_hand():
    # normalised signed change: 0.5 -> 0.25: -0.25/0.5 = -0.5; 0.5 -> 0.75: 0.25/(1-0.5) = 0.5; 0.2 -> 0.6: 0.4/0.8
    r = i_nssd([0.5, 0.5, 0.2], [0.25, 0.75, 0.6], "normalised_signed_change")
    assert r.per_sample.tolist() == pytest.approx([-0.5, 0.5, 0.5]) and r.value == pytest.approx(1 / 6)
    # relative change: 0.5 -> 0.25 = -50 %; pi = 0 < pi' is undefined and left out
    r = i_nssd([0.5, 0.0], [0.25, 0.1], "relative_change")
    assert r.value == pytest.approx(-50.0) and (r.n, r.n_undefined) == (1, 1)
    assert r.to_dict()["per_sample"] == [pytest.approx(-50.0), None]
    json.dumps(r.to_dict())


def test_three_outcome_by_hand():
    # clean T = (0.5, 0.25, 0.25) (pi = 2/3), intervened T' = (0.25, 0.25, 0.5) (pi' = 1/2): sign -1
    # M = (0.375, 0.25, 0.375); KL(T||M) = 0.5 log2(4/3) + 0.25 log2(2/3) = 0.207519 - 0.146241 = 0.061278 bits,
    # KL(T'||M) is the same by symmetry -> JSD = 0.061278 bits -> I = -0.061278
    expected = -(0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3))
    probs, probs2 = torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([[0.25, 0.25, 0.5]])
    r = i_nssd_from_probs(probs, probs2, [0], [1], "three_outcome")
    assert r.value == pytest.approx(expected, abs=1e-7) and expected == pytest.approx(-0.061278, abs=1e-6)
    # binary for comparison: B = (2/3, 1/3) -> (1/2, 1/2), M = (7/12, 5/12)
    binary = -(H2(7 / 12) - (H2(2 / 3) + H2(0.5)) / 2)
    assert i_nssd_from_probs(probs, probs2, [0], [1]).value == pytest.approx(binary, abs=1e-7)


def test_errors():
    with pytest.raises(DataError):
        i_nssd([0.5], [1.5])
    with pytest.raises(DataError):
        i_nssd([0.5], [0.4], "three_outcome")
    with pytest.raises(DataError):
        i_nssd([0.5], [0.4], "kl")
    with pytest.raises(DataError):
        i_nssd_from_probs(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.0]]), [0], [1])


unit = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(unit, unit)
def test_property_bounded_and_antisymmetric(a, b):
    for how in ("signed_jsd", "normalised_signed_change"):
        x = nssd_values(torch.tensor([a]), torch.tensor([b]), how).item()
        y = nssd_values(torch.tensor([b]), torch.tensor([a]), how).item()
        assert -1.0 <= x <= 1.0
        if how == "signed_jsd":
            assert x == -y  # exact: JSD is symmetric, the sign flips
        assert (x > 0) == (b > a) and (x < 0) == (b < a) or x == 0.0  # sign follows pi' - pi


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.001, 10.0), min_size=3, max_size=6),
       st.lists(st.floats(0.001, 10.0), min_size=3, max_size=6))
def test_property_jsd_range_and_identity(u, w):
    n = min(len(u), len(w))
    p = torch.tensor(u[:n], dtype=torch.float64)
    q = torch.tensor(w[:n], dtype=torch.float64)
    p, q = p / p.sum(), q / q.sum()
    d = jsd(p, q, bits=True).item()
    assert 0.0 <= d <= 1.0
    assert jsd(p, q).item() == jsd(q, p).item()
    assert jsd(p, p).item() == 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 10.0, allow_subnormal=False), min_size=3, max_size=8),
       st.lists(st.floats(0.0, 10.0, allow_subnormal=False), min_size=3, max_size=8))
def test_jsd_equals_scipys_jensen_shannon(u, w):
    """The package's one Jensen-Shannon divergence (used by I_NSSD and the key-space gap) is scipy's, squared (scipy
    returns the distance), in bits and nats, zeros included. (Subnormal entries: scipy's own mixture underflows
    there and it returns inf; see the next test.)"""
    from hypothesis import assume
    from scipy.spatial.distance import jensenshannon

    n = min(len(u), len(w))
    p, q = torch.tensor(u[:n], dtype=torch.float64), torch.tensor(w[:n], dtype=torch.float64)
    assume(float(p.sum()) > 0 and float(q.sum()) > 0)
    p, q = p / p.sum(), q / q.sum()
    assert math.isclose(jsd(p, q, bits=True).item(), jensenshannon(p.numpy(), q.numpy(), base=2) ** 2,
                        rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(jsd(p, q).item(), jensenshannon(p.numpy(), q.numpy()) ** 2, rel_tol=1e-9, abs_tol=1e-12)


def test_jsd_of_a_subnormal_entry_is_its_closed_form_not_the_maximum():
    """p = (0, 1, 0), q = (0, 1, s) with s the smallest subnormal: the mixture's last entry (s / 2) underflows to 0.
    Exactly, JSD = s/2 · ln 2 (a float 0.0); before, the term s · log(s / 0) made it the maximum, ln 2."""
    s = 5e-324
    p = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 1.0, s], dtype=torch.float64)
    assert jsd(p, q).item() == 0.0 and jsd(q, p).item() == 0.0
    assert jsd(p, q, bits=True).item() == 0.0
