"""Logit lens, Phi and MAM against values computed by hand."""

import importlib
import json
import math

import pytest
import torch

from arbiter.errors import ArbiterError, DataError
from arbiter.metrics.logit_lens import logit_lens, mam, mam_by_target, mam_components, mam_from_hidden, signal

lens = importlib.import_module("arbiter.metrics.logit_lens")   # the module (arbiter.metrics.logit_lens is the function)
IDENT = lambda x: x  # noqa: E731  identity final norm
# 2-token vocabulary, hidden 2: z(h) = [h0 + 2 h1, 3 h0 - h1]
W2 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])


def test_logit_lens_two_token_vocab():
    # h = [1, 1] -> z = [1 + 2, 3 - 1] = [3, 2]
    z = logit_lens(torch.tensor([1.0, 1.0]), IDENT, W2)
    assert z.tolist() == [3.0, 2.0]
    # the norm is applied first: 2 h -> [6, 4]; a bias is added last
    assert logit_lens(torch.tensor([1.0, 1.0]), lambda x: 2 * x, W2).tolist() == [6.0, 4.0]
    assert logit_lens(torch.tensor([1.0, 1.0]), IDENT, W2, torch.tensor([0.5, -1.0])).tolist() == [3.5, 1.0]


def test_mam_two_token_vocab_all_signals():
    # z = [3, 2], D_p = {0}, D_c = {1}: every signal gives MAM = 3 - 2 = 1
    # (logsumexp_prob: (3 - lse) - (2 - lse) = 1)
    h = torch.tensor([1.0, 1.0])
    for how in ("mean", "max", "logsumexp_prob"):
        assert mam_from_hidden(h, IDENT, W2, [0], [1], how).item() == pytest.approx(1.0, abs=1e-6)
    # logsumexp_prob signal alone: log softmax([3, 2])_0 = -log(1 + e^-1) = -0.3132617
    z = torch.tensor([3.0, 2.0])
    assert signal(z, [0], "logsumexp_prob").item() == pytest.approx(-math.log1p(math.exp(-1)), abs=1e-6)


def test_signals_differ_on_three_tokens():
    # z = [3, 2, 0], D_p = {0, 2}, D_c = {1}
    # mean: (3 + 0)/2 - 2 = -0.5; max: 3 - 2 = 1; logsumexp_prob: log(e^3 + e^0) - log(e^2) = 1 + log(1 + e^-3)
    z = torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64)
    assert mam(z, [0, 2], [1], "mean").item() == pytest.approx(-0.5)
    assert mam(z, [0, 2], [1], "max").item() == pytest.approx(1.0)
    assert mam(z, [0, 2], [1], "logsumexp_prob").item() == pytest.approx(1 + math.log1p(math.exp(-3)), abs=1e-12)


def test_mam_from_hidden_matches_full_lens():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)  # [layers, positions, hidden]
    W = torch.randn(11, 8, generator=g, dtype=torch.float64)
    b = torch.randn(11, generator=g, dtype=torch.float64)
    norm = lambda x: x / x.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
    for how in lens.SIGNALS:
        full = mam(logit_lens(h, norm, W, b), [1, 5], [2, 3, 9], how)
        fast = mam_from_hidden(h, norm, W, [1, 5], [2, 3, 9], how, b)
        assert fast.shape == (3, 4)
        torch.testing.assert_close(fast, full)


def test_components_by_hand():
    # z(h_in=[1,0]) = [1, 3] -> MAM -2; z(h_mid=[1,1]) = [3, 2] -> 1; z(h_out=[0,1]) = [2, -1] -> 3
    # attn = 1 - (-2) = 3; mlp = 3 - 1 = 2
    r = mam_components(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]),
                       IDENT, W2, [0], [1])
    assert (r.mam_in.item(), r.mam_mid.item(), r.mam_out.item()) == (-2.0, 1.0, 3.0)
    assert (r.attn.item(), r.mlp.item()) == (3.0, 2.0)
    d = r.to_dict()
    json.dumps(d)
    assert d["attn"] == 3.0 and d["how"] == "mean"


def test_mam_by_target():
    # vision: sample 0 -> [1, 2]; text: mean of [3, 4] and [5, 6] -> [4, 5]; all = mean of the two = [2.5, 3.5]
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    r = mam_by_target(v, ["vision", "text", "text"])
    assert r.all.tolist() == [2.5, 3.5] and r.vision.tolist() == [1.0, 2.0] and r.text.tolist() == [4.0, 5.0]
    assert (r.n_vision, r.n_text) == (1, 2)
    assert mam_by_target(list(v)).all.tolist() == [3.0, 4.0]
    json.dumps(r.to_dict())


def test_errors():
    z = torch.zeros(3)
    with pytest.raises(DataError):
        signal(z, [], "mean")
    with pytest.raises(DataError):
        signal(z, [0], "median")
    with pytest.raises(DataError):
        signal(z, [3], "mean")
    with pytest.raises(ArbiterError):
        logit_lens(torch.zeros(3), IDENT, W2)
    with pytest.raises(ValueError):
        mam_by_target(torch.zeros(2, 3), ["vision", "audio"])


def test_repeated_ids_count_once():
    # D_m is a set: [0, 0, 2] is {0, 2}; mean over z = [3, 2, 0] at {0, 2} = 1.5 (not (3 + 3 + 0)/3 = 2)
    z = torch.tensor([3.0, 2.0, 0.0])
    assert signal(z, [0, 0, 2]).item() == 1.5
    assert signal(z, {2, 0}, "logsumexp_prob").item() == pytest.approx(signal(z, [0, 2], "logsumexp_prob").item())
