"""LDAR on constructed margins: TopK aggregation, latent vs final decision, per-layer rate."""

import json

import pytest
import torch

from arbiter.errors import DataError
from arbiter.metrics.ldar import latent_decision, ldar, topk_positions

# sample A, [layers=2, instruction positions=3]
#   layer 0: m = [0.1, -2, 1.5] -> top-2 |m|: -2, 1.5 -> mean -0.25 -> d = -1
#   layer 1: m = [3, -1, 0.5]  -> top-2: 3, -1      -> mean 1     -> d = +1
#   final MAM^L_last = +0.7 -> d* = +1: matches at layer 1 only
# sample B
#   layer 0: m = [0.2, 0.3, -0.1] -> top-2: 0.3, 0.2 -> +1
#   layer 1: m = [-1, -1, 2]      -> top-2: 2, -1 (first of the tied -1s) -> mean 0.5 -> +1
#   final = -0.4 -> d* = -1: matches nowhere
A = torch.tensor([[0.1, -2.0, 1.5], [3.0, -1.0, 0.5]])
B = torch.tensor([[0.2, 0.3, -0.1], [-1.0, -1.0, 2.0]])


def test_latent_decision_by_hand():
    assert latent_decision(A).tolist() == [-1.0, 1.0]
    assert latent_decision(B).tolist() == [1.0, 1.0]
    # K = 1: only the largest |m|: A -> [-2, 3] -> [-1, +1]; K = 3 (all): A layer 0 mean = -0.4/3 -> -1
    assert latent_decision(A, k=1).tolist() == [-1.0, 1.0]
    assert latent_decision(A, k=3).tolist() == [-1.0, 1.0]
    # K larger than the number of positions uses all of them
    assert latent_decision(A, k=10).tolist() == latent_decision(A, k=3).tolist()


def test_topk_ties_are_deterministic():
    # |m| = [1, 1, 1, 0.5]: the stable order keeps positions 0 and 1 -> mean 0 -> sign 0 (an exact tie)
    m = torch.tensor([1.0, -1.0, -1.0, 0.5])
    assert topk_positions(m, 2).tolist() == [0, 1]
    assert latent_decision(m, 2).item() == 0.0


def test_ldar_rate_by_hand():
    r = ldar(torch.stack([A, B]), torch.tensor([0.7, -0.4]), targets=["vision", "text"])
    # layer 0: A no, B no -> 0/2; layer 1: A yes, B no -> 1/2
    assert r.rate.tolist() == [0.0, 0.5]
    assert r.by_target["vision"].tolist() == [0.0, 1.0] and r.by_target["text"].tolist() == [0.0, 0.0]
    assert (r.n_samples, r.n_excluded, r.k, r.final, r.chance) == (2, 0, 2, "mam", 0.5)
    json.dumps(r.to_dict())


def test_ldar_variable_positions_and_answer_option():
    # C has one instruction position: layer 0 m = 0.5 -> +1, layer 1 m = -0.5 -> -1; its final MAM -1 -> d* = -1
    C = torch.tensor([[0.5], [-0.5]])
    r = ldar([A, B, C], [0.7, -0.4, -1.0])
    assert r.rate.tolist() == pytest.approx([0.0, 2 / 3])
    # final decision from the answers: A followed the compliant modality (+1), B neither (0: excluded), C competitor
    r2 = ldar([A, B, C], final_answer=[1, None, -1])
    assert r2.rate.tolist() == [0.0, 1.0] and (r2.n_samples, r2.n_excluded, r2.final) == (2, 1, "answer")


def test_ldar_errors():
    with pytest.raises(DataError):
        ldar([A], None)
    with pytest.raises(DataError):
        ldar([A], [1.0], final_answer=[1])
    with pytest.raises(DataError):
        ldar([A], final_answer=[2])
    with pytest.raises(DataError):
        ldar([A], final_answer=[0])
    with pytest.raises(DataError):
        latent_decision(torch.zeros(2, 0))
    with pytest.raises(DataError):
        latent_decision(A, k=0)
