"""Linear probes: a planted direction is found exactly from its layer on; clear errors; real recorded traces."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import arbiter
from arbiter.data import ConflictSample
from arbiter.errors import DataError
from arbiter.probing import LinearProbeResult, linear
from arbiter.testing import tiny

N_LAYERS, N_SAMPLES, HIDDEN, PLANT_FROM = 8, 200, 32, 3


def _planted(strength: float = 3.0):
    """Gaussian noise [8, 200, 32]; from layer 3 on, the label shifts every sample by ±strength along one unit
    direction (6 noise standard deviations between the class means: decodable almost perfectly)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N_SAMPLES) % 2
    x = torch.randn(N_LAYERS, N_SAMPLES, HIDDEN, generator=g)
    u = torch.randn(HIDDEN, generator=g)
    u = u / u.norm()
    x[PLANT_FROM:] += strength * (2 * y.float() - 1)[None, :, None] * u
    return x, y


def test_planted_direction_is_decodable_exactly_from_its_layer_on():
    x, y = _planted()
    res = linear(x, labels=y.tolist())
    assert isinstance(res, LinearProbeResult)
    assert res.layers == list(range(N_LAYERS))
    assert res.accuracy.shape == res.std.shape == (N_LAYERS,)
    assert res.fold_accuracy.shape == (N_LAYERS, 5)
    assert res.chance == 0.5
    assert np.all(np.abs(res.accuracy[:PLANT_FROM] - 0.5) <= 0.12), res.accuracy
    assert np.all(res.accuracy[PLANT_FROM:] >= 0.95), res.accuracy
    assert np.allclose(res.accuracy, res.fold_accuracy.mean(1)) and np.allclose(res.std, res.fold_accuracy.std(1))
    assert res.best_layer >= PLANT_FROM


def test_probe_is_deterministic_and_labels_can_be_any_hashable():
    x, y = _planted()
    names = ["cat" if v else ("dog", 1) for v in y.tolist()]     # strings and tuples mixed
    a = linear(x, labels=y.tolist(), layers=[0, 5])
    b = linear(x, labels=names, layers=[0, 5])
    c = linear(list(x[[0, 5]]), labels=np.array(y), seed=0)      # a list of [samples, hidden] per layer
    assert a.layers == b.layers == [0, 5] and c.layers == [0, 1]
    assert np.array_equal(a.fold_accuracy, b.fold_accuracy)
    assert np.array_equal(a.fold_accuracy, c.fold_accuracy)
    assert b.classes == [("dog", 1), "cat"]
    d = linear({0: x[0], 5: x[5]}, labels=y)                     # a {layer: features} mapping
    assert d.layers == [0, 5] and np.array_equal(d.fold_accuracy, a.fold_accuracy)
    assert not np.array_equal(linear(x, labels=y, layers=[0], seed=1).fold_accuracy, a.fold_accuracy[:1])


def test_chance_is_the_majority_class_rate():
    x, _ = _planted()
    y = [0] * 150 + [1] * 50
    res = linear(x, labels=y, layers=[0], cv=4)
    assert res.chance == 0.75 and res.fold_accuracy.shape == (1, 4)


def test_to_dict_is_json_ready_and_plot_returns_a_figure(tmp_path):
    from matplotlib.figure import Figure

    x, y = _planted()
    res = linear(x, labels=y, layers=[0, 3, 7], cv=3)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["layers"] == [0, 3, 7] and len(d["accuracy"]) == 3 and d["chance"] == 0.5 and d["cv"] == 3
    path = tmp_path / "probe.png"
    fig = res.plot(path)
    assert isinstance(fig, Figure) and path.stat().st_size > 0
    ax = fig.axes[0]
    assert list(ax.lines[0].get_xdata()) == [0, 3, 7]
    assert np.allclose(ax.lines[0].get_ydata(), res.accuracy)
    assert np.allclose(ax.lines[1].get_ydata(), [0.5, 0.5])        # the chance line


# ------------------------------------------------------------------------------------------------------ errors


def test_label_count_mismatch_is_a_clear_error():
    x, y = _planted()
    with pytest.raises(DataError, match="199 labels for 200 samples"):
        linear(x, labels=y.tolist()[:-1])
    with pytest.raises(DataError, match="labels"):
        linear(x)


def test_a_single_class_is_a_clear_error():
    x, _ = _planted()
    with pytest.raises(DataError, match="at least two classes"):
        linear(x, labels=["same"] * N_SAMPLES)


def test_too_few_samples_per_fold_is_a_clear_error():
    x, _ = _planted()
    with pytest.raises(DataError, match="fewer than cv=5"):
        linear(x, labels=[1] * 197 + [0] * 3)


def test_missing_site_in_a_trace_lists_what_exists():
    trace = arbiter.Trace({"L0.attn.probs": torch.rand(4, 2, 1, 5), "L1.attn.probs": torch.rand(4, 2, 1, 5),
                           "logits": torch.rand(4, 1, 7)})
    with pytest.raises(DataError, match=r"no tensors for site 'resid\.post'.*attn\.probs, logits"):
        linear(trace, labels=[0, 1, 0, 1], cv=2)
    trace = arbiter.Trace({"L0.resid.post": torch.rand(4, 1, 8)})
    with pytest.raises(DataError, match=r"layers \[2\]; it has layers \[0\]"):
        linear(trace, labels=[0, 1, 0, 1], layers=[2], cv=2)


def test_wrong_feature_shapes_are_clear_errors():
    with pytest.raises(DataError, match=r"\[layers, samples, hidden\]"):
        linear(torch.rand(10, 4), labels=[0, 1] * 5)
    with pytest.raises(DataError, match="out of range"):
        linear(torch.rand(2, 10, 4), labels=[0, 1] * 5, layers=[2], cv=2)


def test_missing_scikit_learn_says_how_to_install_it(monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)      # None in sys.modules: "import sklearn..." fails
    x, y = _planted()
    with pytest.raises(ImportError, match=r"pip install 'arbiter-mllm\[probing\]'"):
        linear(x, labels=y)


# ------------------------------------------------------------------------------------------- a real recording


def test_linear_probe_on_a_recorded_trace_of_tiny_llava():
    """Two groups of inputs that differ only by their image (label = which image), six text contexts each."""
    tm = tiny("llava")
    contexts = ["The circle is red.", "The square is blue.", "A green triangle.", "There are two dogs.",
                "The sky is dark.", "A yellow star and a black cat."]
    samples = [ConflictSample(id=f"{img}-{i}", context=c, instruction="Describe the image in one word.",
                              question="What colour is the shape in the image?", target="vision",
                              answer_vision="red", answer_text="blue", image=tm.make_image(img))
               for img in (0, 1) for i, c in enumerate(contexts)]
    labels = [f"image{s.id.split('-')[0]}" for s in samples]
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode(samples)
        with lens.record("resid.post", rows="last") as last, lens.record("resid.post") as every, torch.no_grad():
            tm.model(**batch.inputs)
    n_layers = lens.facts.n_layers
    res = linear(last.trace, labels=labels, cv=3)
    assert res.layers == list(range(n_layers)) and res.site == "resid.post"
    assert res.accuracy.shape == (n_layers,) and ((res.accuracy >= 0) & (res.accuracy <= 1)).all()
    assert res.chance == 0.5 and res.n_samples == 12 and res.classes == ["image0", "image1"]
    assert res.meta["sample_ids"] == [s.id for s in samples]
    # the trace path takes the same features as stacking them by hand
    by_hand = torch.stack([last.trace[f"L{layer}.resid.post"][:, 0] for layer in range(n_layers)])
    assert np.array_equal(linear(by_hand, labels=labels, cv=3).fold_accuracy, res.fold_accuracy)
    # all rows: mean over each sample's real (non-pad) rows
    pad = batch.groups["pad"]
    assert pad.any(), "the contexts differ in length, so the batch is left-padded"
    mean = linear(every.trace, labels=labels, cv=3, layers=[0, n_layers - 1])
    assert mean.layers == [0, n_layers - 1] and ((mean.accuracy >= 0) & (mean.accuracy <= 1)).all()
    x = every.trace[f"L{n_layers - 1}.resid.post"].double()
    keep = (~pad).double()[..., None]
    by_hand = ((x * keep).sum(1) / keep.sum(1))[None]
    ref = linear(by_hand, labels=labels, cv=3)
    assert np.allclose(ref.fold_accuracy[0], mean.fold_accuracy[1])
    # one chosen row (the last) equals rows="last"
    one = linear(every.trace, labels=labels, cv=3, rows=-1)
    assert np.array_equal(one.fold_accuracy, res.fold_accuracy)
