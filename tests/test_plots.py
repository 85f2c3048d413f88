"""plot() of the conflict results: each draws its own numbers (read back from the figure) and saves a PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from arbiter.experiments.baseline import BaselineResult  # noqa: E402
from arbiter.experiments.heads import (  # noqa: E402
    AmplificationResult,
    BlockingAgreement,
    BlockingResult,
    HeadRanking,
)
from arbiter.experiments.knockout_map import KnockoutMap  # noqa: E402


def _png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_plot_draws_the_mam_profile_per_target_and_ldar(tmp_path):
    mam = torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 4.0], [1.0, -1.0, -2.0]])
    r = BaselineResult(["a", "b", "c"], ["vision", "vision", "text"], torch.tensor([0.9, 0.8, 0.7]), [1, 1, 1],
                       ["", "", ""], mam, torch.zeros(3, 3), torch.zeros(3, 3), [], [0.5, None, 1.0], "pi")
    fig = r.plot(tmp_path / "b.png")
    lines = {ln.get_label(): ln.get_ydata() for ln in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["vision-instructed"], [0.0, 2.0, 3.0])
    np.testing.assert_allclose(lines["text-instructed"], [1.0, -1.0, -2.0])
    np.testing.assert_allclose(fig.axes[1].get_lines()[0].get_ydata(), [0.5, np.nan, 1.0])
    assert _png(tmp_path / "b.png")


def test_knockout_map_plot_is_the_nssd_table(tmp_path):
    entries = [{"src": s, "dst": "last", "center": c, "nssd": v, "mfr": 1.0}
               for s, c, v in (("image", 0, -0.5), ("image", 1, 0.0), ("context", 0, None), ("context", 1, 0.25))]
    fig = KnockoutMap(entries, window=3, n_samples=4).plot(tmp_path / "k.png")
    grid = np.ma.filled(fig.axes[0].images[0].get_array(), np.nan)
    np.testing.assert_allclose(grid, [[-0.5, 0.0], [np.nan, 0.25]])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["image→last", "context→last"]
    assert fig.axes[0].images[0].get_clim() == (-0.5, 0.5)  # symmetric around 0
    assert _png(tmp_path / "k.png")


def test_head_ranking_plot_shows_scores_and_topg_per_layer(tmp_path):
    scores = torch.tensor([[0.1, 0.9], [0.5, float("nan")], [0.0, 0.3]])
    fig = HeadRanking("exhaustive", scores).plot(tmp_path / "h.png", fraction=0.4)  # 40% of 6 heads: 2
    heat = np.ma.filled(fig.axes[0].images[0].get_array(), np.nan)
    np.testing.assert_allclose(heat, scores.numpy())
    bars = next(a for a in fig.axes if a.get_title().startswith("TopG"))  # not the colour bar
    assert [p.get_height() for p in bars.patches] == [1, 1, 0]
    assert "2 heads" in bars.get_title()
    assert _png(tmp_path / "h.png")


def test_blocking_plot_bars_are_base_topg_and_random_mean(tmp_path):
    r = BlockingResult(0.05, [[0, 1]], 10, 1.0, 0.4, [0.9, 0.7], 0.6, 0.2, 0.14)
    fig = r.plot(tmp_path / "bl.png")
    np.testing.assert_allclose([p.get_height() for p in fig.axes[0].patches], [1.0, 0.4, 0.8])
    empty = BlockingResult(0.05, [], 0, float("nan"), float("nan"), [], None, None, None).plot()
    assert "nothing blocked" in empty.axes[0].texts[0].get_text()
    assert _png(tmp_path / "bl.png")


def test_amplification_plot_draws_topg_and_random_or_says_there_were_no_failures(tmp_path):
    r = AmplificationResult([1.5, 2.0], [0.2, 0.6], [0.1, 0.1], [0.05, 0.0], 5, [[0, 1]])
    fig = r.plot(tmp_path / "a.png")
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [0.2, 0.6])
    none = AmplificationResult([2.0], [], [], [], 0, [[0, 1]]).plot()
    assert "no failures" in none.axes[0].texts[0].get_text()
    assert _png(tmp_path / "a.png")


def test_blocking_agreement_plot_draws_every_curve_and_the_chance_level(tmp_path):
    r = BlockingAgreement("ex", [1, 2], 1, 8, 1.0,
                          {"ex": {"heads": [[0, 0], [0, 1]], "mfr": [0.5, 0.25], "margin_drop": [1.0, 2.0]},
                           "gd": {"heads": [[0, 1], [0, 0]], "mfr": [0.75, 0.25], "margin_drop": [0.5, 2.0]}},
                          {}, {"n": 2, "mfr_mean": [1.0, 0.9], "margin_drop_mean": [0.1, 0.2]})
    fig = r.plot(tmp_path / "ba.png")
    lines = {ln.get_label(): ln.get_ydata() for ln in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["gd"], [0.5, 2.0])
    np.testing.assert_allclose(lines["random (2 orders)"], [0.1, 0.2])
    np.testing.assert_allclose({ln.get_label(): ln.get_ydata() for ln in fig.axes[1].get_lines()}["ex"], [0.5, 0.25])
    with pytest.raises(ValueError, match="no curve"):
        BlockingAgreement("ex", [1], 1, 0, float("nan"), {}, {}).plot()
    assert _png(tmp_path / "ba.png")


def test_plots_draw_on_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.subplots(1, 3)
    r = AmplificationResult([2.0], [0.5], [0.1], [0.0], 2, [[0, 1]])
    assert r.plot(ax=ax[2]) is fig and len(ax[2].get_lines()) >= 1
    with pytest.raises(ValueError, match="draws on 2 axes"):
        BlockingAgreement("ex", [1], 1, 1, 1.0, {"ex": {"heads": [[0, 0]], "mfr": [1.0], "margin_drop": [0.1]}},
                          {}).plot(axes=[ax[0]])
