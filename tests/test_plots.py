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
    np.testing.assert_allclose(lines["vision-instructed, last token"], [0.0, 2.0, 3.0])
    np.testing.assert_allclose(lines["text-instructed, last token"], [1.0, -1.0, -2.0])
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
    no_control = BlockingResult(0.05, [[0, 1]], 10, 1.0, 0.4, [], 0.6, None, None).plot()
    np.testing.assert_allclose([p.get_height() for p in no_control.axes[0].patches], [1.0, 0.4])
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


# ------------------------------------------------------------------------------------------ metric results


def test_head_scores_plot_is_the_score_grid(tmp_path):
    from arbiter.metrics import HeadScores

    score = torch.tensor([[0.5, -0.25], [1.0, 0.0]])
    fig = HeadScores(score, torch.zeros(1, 2, 2)).plot(tmp_path / "s.png")
    np.testing.assert_allclose(np.ma.filled(fig.axes[0].images[0].get_array(), np.nan), score.numpy())
    assert _png(tmp_path / "s.png")


def test_ldar_plot_draws_rate_targets_and_chance(tmp_path):
    from arbiter.metrics.ldar import LDARResult

    r = LDARResult(torch.tensor([0.5, 0.75, 1.0]), 4, by_target={"vision": torch.tensor([0.0, 0.5, 1.0])})
    fig = r.plot(tmp_path / "l.png")
    lines = {ln.get_label(): ln.get_ydata() for ln in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["all (n=4)"], [0.5, 0.75, 1.0])
    np.testing.assert_allclose(lines["vision-instructed"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(lines["chance"], [0.5, 0.5])
    assert _png(tmp_path / "l.png")


def test_profile_plot_is_lines_per_layer_or_a_heat_map_per_position():
    from arbiter.metrics.logit_lens import mam_by_target

    per_layer = mam_by_target(torch.tensor([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.0]]), ["vision", "vision", "text"])
    lines = {ln.get_label(): ln.get_ydata() for ln in per_layer.plot().axes[0].get_lines()}
    np.testing.assert_allclose(lines["vision-instructed (n=2)"], [2.0, 3.0])
    np.testing.assert_allclose(lines["all (mean of targets)"], [0.5, 1.5])
    grid = mam_by_target(torch.arange(12.0).view(2, 2, 3))            # [samples, layers, positions]
    np.testing.assert_allclose(np.ma.filled(grid.plot().axes[0].images[0].get_array(), np.nan),
                               [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])
    with pytest.raises(ValueError, match="has no plot"):
        mam_by_target(torch.zeros(2, 2, 2, 2)).plot()


def test_mam_components_plot_averages_all_but_the_layer_dimension():
    from arbiter.metrics.logit_lens import MAMComponents

    attn = torch.tensor([[1.0, 3.0], [0.0, 2.0]])                     # [layers, positions]
    c = MAMComponents(torch.zeros(2, 2), attn, attn - 1, attn, -torch.ones(2, 2))
    ax = c.plot().axes[0]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [2.0, 1.0, -1.0, -1.0])       # attention bars, then MLP bars
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [1.0, 0.0])
    by_position = [p.get_height() for p in c.plot(layer_dim=1).axes[0].patches[:2]]
    np.testing.assert_allclose(by_position, [0.5, 2.5])


def test_mfr_plot_bars_are_overall_vision_text_with_counts():
    from arbiter.metrics.mfr import mfr_from_pi

    r = mfr_from_pi(torch.tensor([0.9, 0.2, 0.8, 0.6]), ["vision", "vision", "text", "text"])
    ax = r.plot().axes[0]
    np.testing.assert_allclose([p.get_height() for p in ax.patches], [0.75, 0.5, 1.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["overall\n(n=4)", "vision\n(n=2)", "text\n(n=2)"]


def test_nssd_plot_histogram_holds_every_defined_sample_and_marks_the_mean():
    from arbiter.metrics import i_nssd

    r = i_nssd(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.5, 0.8, 0.9]))
    ax = r.plot().axes[0]
    assert sum(p.get_height() for p in ax.patches) == 3
    assert ax.get_lines()[0].get_xdata()[0] == pytest.approx(r.value)


def test_baseline_reports_mam_at_the_instruction_anchors_per_target():
    """SPEC 3: MAM per layer at the instruction positions, mean over positions then samples of each target;
    a sample without instruction tokens is left out."""
    instr = [torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.tensor([[5.0], [2.0]]), torch.zeros(2, 0),
             torch.tensor([[-1.0, -3.0], [4.0, 6.0]])]
    r = BaselineResult(list("abcd"), ["vision", "vision", "vision", "text"], torch.full((4,), 0.9), [1] * 4,
                       [""] * 4, torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), instr, [1.0, 1.0], "pi")
    assert r.to_dict()["mam_instruction"] == {"vision": [3.5, 1.0], "text": [-2.0, 5.0]}
    lines = {ln.get_label(): ln.get_ydata() for ln in r.plot().axes[0].get_lines()}
    np.testing.assert_allclose(lines["text-instructed, instruction"], [-2.0, 5.0])
