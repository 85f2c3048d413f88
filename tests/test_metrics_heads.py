"""DLA head scores on a 1-layer 2-head model computed by hand; TopG, Spearman and top-k overlap."""

import json
import math

import pytest
import torch

from arbiter.errors import DataError
from arbiter.metrics.head_scores import answer_direction, head_scores, spearman, top_g, topk_overlap
from arbiter.metrics.logit_lens import mam_from_hidden

# 1 layer, 2 heads, head_dim 1, hidden 2. W_O = identity: head 0 writes to dim 0, head 1 to dim 1.
W_O = torch.eye(2)[None]  # [layers=1, hidden=2, heads*head_dim=2]
W_U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # vocab 3
GAMMA = torch.tensor([2.0, 1.0])


def test_head_score_by_hand():
    # head outputs [1] and [2] -> o^{0,0} = [1, 0], o^{0,1} = [0, 2]
    # D_p = {0}, D_c = {1} -> u = [1, -1]; h_final = [3, 4] -> rms = sqrt((9 + 16)/2) = sqrt(12.5) = 3.5355339
    # c^{0,0} = u . (gamma * o) / rms = (1 * 2 * 1) / 3.5355 = 0.5656854
    # c^{0,1} = (-1 * 1 * 2) / 3.5355 = -0.5656854
    head_out = torch.tensor([[[[1.0], [2.0]]]])  # [samples, layers, heads, head_dim]
    r = head_scores(head_out, W_O, W_U, [0], [1], GAMMA, torch.tensor([[3.0, 4.0]]))
    c = 2 / math.sqrt(12.5)
    torch.testing.assert_close(r.score, torch.tensor([[c, -c]], dtype=torch.float64))
    assert r.score[0, 0].item() == pytest.approx(0.5656854, abs=1e-6)
    json.dumps(r.to_dict())


def test_head_score_targets_and_mean_direction():
    # D_p = {0, 2}: u = mean([1,0],[1,1]) - [0,1] = [1, -0.5]
    assert answer_direction(W_U, [0, 2], [1]).tolist() == [1.0, -0.5]
    # sample 0 (vision): as above, score [0.5657, -0.5657]
    # sample 1 (text):  head outputs [1], [1], D_p = {0, 2}, D_c = {1}, h_final = [1, 1] (rms 1)
    #                   c = [1 * 2 * 1, -0.5 * 1 * 1] = [2, -0.5]
    # sample 2 (text):  head outputs [0], [-2], same ids, h_final = [2, 2] (rms 2): c = [0, -0.5 * -2 / 2] = [0, 0.5]
    head_out = torch.tensor([[[[1.0], [2.0]]], [[[1.0], [1.0]]], [[[0.0], [-2.0]]]])
    h_final = torch.tensor([[3.0, 4.0], [1.0, 1.0], [2.0, 2.0]])
    r = head_scores(head_out, W_O, W_U, [[0], [0, 2], [0, 2]], [[1], [1], [1]], GAMMA, h_final,
                    ["vision", "text", "text"])
    s = 2 / math.sqrt(12.5)
    expected = torch.tensor([[s, -s], [2.0, -0.5], [0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(r.per_sample[:, 0], expected)
    # text mean = [1, 0]; vision = [s, -s]; score = average of the two target means
    assert r.by_target["text"][0].tolist() == pytest.approx([1.0, 0.0])
    assert r.score[0].tolist() == pytest.approx([(s + 1) / 2, -s / 2])


def test_head_scores_sum_to_frozen_norm_mam():
    # sum over heads of c = MAM (mean signal) of the attention output under the frozen final norm
    g = torch.Generator().manual_seed(1)
    S, L, H, D, E, V = 2, 3, 4, 5, 8, 13
    head_out = torch.randn(S, L, H, D, generator=g, dtype=torch.float64)
    W = torch.randn(L, E, H * D, generator=g, dtype=torch.float64)
    WU = torch.randn(V, E, generator=g, dtype=torch.float64)
    gam = torch.rand(E, generator=g, dtype=torch.float64) + 0.5
    hf = torch.randn(S, E, generator=g, dtype=torch.float64)
    r = head_scores(head_out, W, WU, [1, 4], [0, 7, 9], gam, hf, eps=1e-6)
    for s in range(S):
        rms = (hf[s].pow(2).mean() + 1e-6).sqrt()
        attn_out = torch.einsum("led,ld->le", W, head_out[s].reshape(L, H * D))  # [L, E]
        m = mam_from_hidden(attn_out, lambda x: gam * x / rms, WU, [1, 4], [0, 7, 9])
        torch.testing.assert_close(r.per_sample[s].sum(-1), m)


def test_top_g():
    sc = torch.tensor([[0.1, 0.9, 0.3], [0.9, -1.0, 0.5]])
    # k = 3: 0.9 at (0,1) and (1,0) tie -> (0,1) first; then 0.5 at (1,2)
    assert top_g(sc, k=3) == [(0, 1), (1, 0), (1, 2)]
    # 5% of 6 heads = 0.3 -> at least 1
    assert top_g(sc) == [(0, 1)]
    assert top_g(sc, fraction=0.5) == [(0, 1), (1, 0), (1, 2)]
    # the SPEC's reference counts: 5% of 28 x 28 = 39, of 32 x 32 = 51
    assert len(top_g(torch.rand(28, 28))) == 39 and len(top_g(torch.rand(32, 32))) == 51
    with pytest.raises(DataError):
        top_g(torch.tensor([[float("nan")]]))


def test_spearman_and_overlap():
    # ranks [1,2,3] vs [1,3,2]: sum d^2 = 2 -> rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]) == pytest.approx(0.5)
    assert spearman(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[4.0, 3.0], [2.0, 1.0]])) == pytest.approx(-1)
    assert math.isnan(spearman([1.0, 1.0], [1.0, 2.0]))
    # top-2 of a: indices {3, 2}; of b: {3, 0} -> 1 shared of 2
    a, b = [0.0, 1.0, 2.0, 3.0], [2.5, 0.0, 1.0, 3.0]
    assert topk_overlap(a, b, 2) == 0.5 and topk_overlap(a, a, 3) == 1.0


def test_shape_errors():
    with pytest.raises(DataError):
        head_scores(torch.zeros(1, 1, 2), W_O, W_U, [0], [1], GAMMA, torch.ones(1, 2))
    with pytest.raises(DataError):
        head_scores(torch.zeros(1, 1, 2, 1), W_O, W_U, [0], [1], GAMMA, torch.ones(2, 2))
