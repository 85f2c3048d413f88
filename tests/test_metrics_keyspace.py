"""Key-space MMD and JSD: hand-computed kernels and bandwidth, identical vs separated samples, permutation p."""

import json
import math

import numpy as np
import pytest
import torch

from arbiter.errors import DataError
from arbiter.metrics.keyspace import (keyspace_analysis, keyspace_jsd, keyspace_mmd, median_bandwidth,
                                      mmd2_unbiased, pooled_pca, subsample)

X = np.array([[0.0], [1.0]])
Y = np.array([[0.0], [2.0]])


def test_mmd2_by_hand():
    # linear kernel: Kxx off-diagonal 0*1 = 0; Kyy off-diagonal 0*2 = 0; Kxy = {0, 0, 0, 2} -> mean 0.5
    # MMD^2_u = 0 + 0 - 2 * 0.5 = -1
    assert mmd2_unbiased(X, Y, "linear") == pytest.approx(-1.0)
    # Gaussian, sigma = 1: k = exp(-d^2 / 2). Kxx off = e^-0.5; Kyy off = e^-2;
    # Kxy: k(0,0)=1, k(0,2)=e^-2, k(1,0)=e^-0.5, k(1,2)=e^-0.5 -> mean (1 + e^-2 + 2 e^-0.5)/4
    # MMD^2_u = e^-0.5 + e^-2 - (1 + e^-2 + 2 e^-0.5)/2 = 0.5 e^-2 - 0.5 = -0.4323324
    assert mmd2_unbiased(X, Y, "gaussian", bandwidth=1.0) == pytest.approx(0.5 * math.exp(-2) - 0.5)
    # polynomial (x.y/d + 1)^3, d = 1: Kxx off (0+1)^3 = 1, Kyy off 1, Kxy {1, 1, 1, 27} -> mean 7.5; 1 + 1 - 15
    assert mmd2_unbiased(X, Y, "polynomial") == pytest.approx(-13.0)
    # multi-bandwidth = mean of the Gaussian kernels at 0.5, 1, 2 x sigma
    multi = np.mean([mmd2_unbiased(X, Y, "gaussian", bandwidth=s) for s in (0.5, 1.0, 2.0)])
    assert mmd2_unbiased(X, Y, "multi_gaussian", bandwidth=1.0) == pytest.approx(multi)


def test_median_bandwidth_by_hand():
    # pooled points 0, 1, 0, 2: distances 1, 0, 2, 1, 1, 2 -> sorted 0 1 1 1 2 2 -> median 1
    assert median_bandwidth(np.concatenate([X, Y])) == 1.0
    # default Gaussian bandwidth is that median
    assert mmd2_unbiased(X, Y) == pytest.approx(0.5 * math.exp(-2) - 0.5)


def test_identical_samples_give_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 6))
    r = keyspace_mmd(a, a.copy(), n_permutations=50)
    # MMD^2_u(X, X) = 2 mean_{i!=j} k - 2 mean_{i,j} k < 0 -> clipped -> exactly 0
    assert r.mmd2 < 0 and r.mmd == 0.0
    assert r.p_value > 0.5


def test_separated_gaussians():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(150, 8))
    b = rng.normal(size=(150, 8)) + 3.0
    r = keyspace_mmd(torch.tensor(a), torch.tensor(b), n_permutations=99, seed=3)
    assert r.mmd > 0.5
    assert r.p_value == pytest.approx(1 / 100)  # no permutation reaches the observed value
    assert r.intra_a < 0.2 * r.mmd and r.intra_b < 0.2 * r.mmd
    assert len(r.intra_a_splits) == 5 and r.bandwidth > 0
    # every kernel option separates them
    for k in ("multi_gaussian", "linear", "polynomial"):
        rk = keyspace_mmd(a, b, kernel=k, n_permutations=19)
        assert rk.mmd > 0.5 and rk.p_value == pytest.approx(1 / 20)
    # fixed seed: the same numbers again
    assert keyspace_mmd(a, b, n_permutations=99, seed=3).to_dict() == r.to_dict()


def test_jsd_by_hand():
    # one component, 2 bins over the pooled 0.5-99.5 percentiles [0, 1]: edges 0, 0.5, 1
    # a = 0, 0, 1, 1 -> (0.5, 0.5); b = 0, 1, 1, 1 -> (0.25, 0.75); JSD = H2(0.375) - (1 + H2(0.25))/2 = 0.048795 bits
    a = np.array([[0.0], [0.0], [1.0], [1.0]])
    b = np.array([[0.0], [1.0], [1.0], [1.0]])
    H2 = lambda p: -(p * math.log2(p) + (1 - p) * math.log2(1 - p))  # noqa: E731
    r = keyspace_jsd(a, b, bins=2, preprocess=False)
    assert r.jsd == pytest.approx(H2(0.375) - (1 + H2(0.25)) / 2, abs=1e-8)
    # disjoint: a all 0, b all 1 -> ~1 bit (eps = 1e-10 keeps it finite, just under 1)
    r = keyspace_jsd(np.zeros((4, 1)), np.ones((4, 1)), bins=2, preprocess=False)
    assert r.jsd == pytest.approx(1.0, abs=1e-8) and r.jsd < 1.0
    # identical: exactly 0
    assert keyspace_jsd(a, a.copy(), preprocess=False).jsd == 0.0


def test_preprocessing():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 5))
    s1, s2 = subsample(x, 10, seed=4), subsample(x, 10, seed=4)
    assert s1.shape == (10, 5) and np.array_equal(s1, s2)
    assert subsample(x, 100).shape == (30, 5)
    p = pooled_pca(x[:20] * 100 + 7, x[20:] * 100 + 7, n_components=3)
    pooled = np.concatenate([p.a, p.b])
    assert pooled.shape == (30, 3)
    assert np.allclose(pooled.mean(0), 0) and np.all(np.diff(pooled.var(0)) <= 1e-12)
    assert p.explained.sum() <= 1 + 1e-12
    # scale and shift do not change the z-scored result
    p2 = pooled_pca(x[:20], x[20:], n_components=3)
    assert np.allclose(np.abs(p.a), np.abs(p2.a))


def test_analysis_and_errors():
    rng = np.random.default_rng(3)
    r = keyspace_analysis(rng.normal(size=(80, 12)), rng.normal(size=(90, 12)) + 1.0, n_permutations=20,
                          max_n=70, n_components=6)
    assert (r.n_a, r.n_b) == (70, 70) and len(r.jsd.per_component) == 6 and len(r.explained) == 6
    json.dumps(r.to_dict())
    with pytest.raises(DataError):
        keyspace_mmd(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(DataError):
        keyspace_mmd(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(DataError):
        mmd2_unbiased(X, Y, "rbf")
