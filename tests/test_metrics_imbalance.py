"""Attention imbalance on 3 key tokens, computed by hand; GQA mapping, options and errors."""

import json
import math

import pytest
import torch

from arbiter.errors import GroupError
from arbiter.metrics.imbalance import attention_imbalance

# one layer, 2 query heads sharing 1 KV head (GQA), head_dim 2, hidden 2, 3 keys
# values v = [[1, 0], [0, 1], [2, 2]]; T_1 = {0}, T_2 = {1, 2}
V = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])[None, None]  # [layers, kv_heads, keys, head_dim]
# head 0: alpha = [0.5, 0.3, 0.2], W_O^(0) = I;  head 1: alpha = [0.2, 0.2, 0.6], W_O^(1) = 2 I
ALPHA = torch.tensor([[[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]])  # [layers, heads, keys]
W_O = torch.cat([torch.eye(2), 2 * torch.eye(2)], dim=1)[None]  # [layers, hidden, heads*head_dim]
T1 = torch.tensor([True, False, False])
T2 = ~T1
# head 0: A_1 = 0.5, A_2 = 0.5; sum_{T1} = 0.5 [1,0] -> N_1 = 0.5
#         sum_{T2} = 0.3 [0,1] + 0.2 [2,2] = [0.4, 0.7] -> N_2 = sqrt(0.65) = 0.8062258
#         imbalance = log(0.5 / 0.8062258) = -0.4777557
# head 1: A_1 = 0.2, A_2 = 0.8; N_1 = ||2 * [0.2, 0]|| = 0.4
#         sum_{T2} = 0.2 [0,1] + 0.6 [2,2] = [1.2, 1.4] -> x2 -> N_2 = sqrt(2.4^2 + 2.8^2) = sqrt(13.6) = 3.6878178
#         imbalance = log(0.4 / 3.6878178) = -2.2213256
IMB0 = math.log(0.5 / math.sqrt(0.65))
IMB1 = math.log(0.4 / math.sqrt(13.6))


def test_three_tokens_by_hand():
    r = attention_imbalance(ALPHA, V, W_O, T1, T2)
    assert r.mass_1.tolist()[0] == pytest.approx([0.5, 0.2]) and r.mass_2.tolist()[0] == pytest.approx([0.5, 0.8])
    assert r.norm_1.tolist()[0] == pytest.approx([0.5, 0.4])
    assert r.norm_2.tolist()[0] == pytest.approx([math.sqrt(0.65), math.sqrt(13.6)])
    assert r.imbalance.tolist()[0] == pytest.approx([IMB0, IMB1])
    assert IMB0 == pytest.approx(-0.4777557, abs=1e-6) and IMB1 == pytest.approx(-2.2213256, abs=1e-6)
    assert r.scalar == pytest.approx((abs(IMB0) + abs(IMB1)) / 2)
    json.dumps(r.to_dict())


def test_share_and_per_token():
    # share: N_1 / (N_1 + N_2); head 0: 0.5 / (0.5 + 0.8062258) = 0.3827866
    r = attention_imbalance(ALPHA, V, W_O, T1, T2, how="share")
    s0, s1 = 0.5 / (0.5 + math.sqrt(0.65)), 0.4 / (0.4 + math.sqrt(13.6))
    assert r.imbalance.tolist()[0] == pytest.approx([s0, s1])
    assert r.scalar == pytest.approx((abs(s0 - 0.5) + abs(s1 - 0.5)) / 2)
    # per-token: N_2 / |T_2| = N_2 / 2 -> head 0: log(0.5 / 0.4031129) = 0.2153914; masses halve too
    r = attention_imbalance(ALPHA, V, W_O, T1, T2, per_token=True)
    assert r.imbalance[0, 0].item() == pytest.approx(math.log(0.5 / (math.sqrt(0.65) / 2)))
    assert r.mass_2.tolist()[0] == pytest.approx([0.25, 0.4])


def test_samples_axis_and_swap():
    # two samples: the second swaps the modalities -> its imbalance is the negative; the heat map averages to 0
    alpha = torch.stack([ALPHA, ALPHA])
    v = torch.stack([V, V])
    masks1 = torch.stack([T1, T2])
    masks2 = torch.stack([T2, T1])
    r = attention_imbalance(alpha, v, W_O, masks1, masks2)
    assert r.per_sample.shape == (2, 1, 2)
    assert r.per_sample[1].tolist()[0] == pytest.approx([-IMB0, -IMB1])
    assert r.imbalance.abs().max().item() < 1e-12 and r.scalar < 1e-12


def test_errors():
    with pytest.raises(GroupError):
        attention_imbalance(ALPHA, V, W_O, torch.zeros(3, dtype=torch.bool), T2)
    with pytest.raises(ValueError):
        attention_imbalance(ALPHA, V, W_O, T1, T2, how="ratio")
    with pytest.raises(ValueError):
        attention_imbalance(ALPHA, V, W_O[:, :, :3], T1, T2)
