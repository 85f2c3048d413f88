"""Tests for arbiter.overlays and the image patch grids behind them: recorded attention rows put back on the image's
patch grid (LLaVA, LLaVA-NeXT, Qwen2-VL), compared with the probabilities indexed by hand from the input ids."""

from __future__ import annotations

import io
import warnings

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import arbiter
from arbiter.errors import SiteError, TraceError
from arbiter.groups import TokenGroups
from arbiter.overlays import attention_row, image_attention_figures, patch_grids, sample_images, token_labels
from arbiter.trace import Trace
from helpers import _tiny, image_token_id

matplotlib.use("Agg")


def record_last_rows(tm, inputs):
    """attn.probs of every layer at the last row, recorded inside attach."""
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.record("attn.probs", rows="last") as rec, torch.no_grad():
            tm.model(**inputs)
    return rec.trace


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def last_row_by_hand(trace, inputs, sample: int, layer: int, head: int) -> torch.Tensor:
    """The probabilities of the sample's last real position, found from the attention mask, not from arbiter."""
    last = int(inputs["attention_mask"][sample].nonzero().max())
    rows = trace["rows.attn.probs"]
    r = int(((rows == last) & trace["rowmask.attn.probs"][sample]).nonzero()[0])
    return trace[f"L{layer}.attn.probs"][sample, head, r].float()


def image_positions_by_hand(tm, inputs, sample: int) -> torch.Tensor:
    return (inputs["input_ids"][sample] == image_token_id(tm)).nonzero().flatten()


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- LLaVA


@pytest.fixture(scope="module")
def llava_run():
    tm = _tiny("llava")
    tok = tm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:  # two prompts of different lengths: the first is left-padded
        inputs = dict(tm.processor(text=[tm.prompt("What colour?"), tm.prompt("What colour is the shape here?")],
                                   images=[[tm.make_image(0)], [tm.make_image(1)]], padding=True,
                                   return_tensors="pt"))
    finally:
        tok.padding_side = side
    return tm, inputs, record_last_rows(tm, inputs)


def test_llava_grid_is_the_vision_config_square(llava_run) -> None:
    tm, _, trace = llava_run
    vc = tm.model.config.vision_config
    g = vc.image_size // vc.patch_size  # CLS dropped ("default" strategy): g * g image tokens
    assert trace.meta["groups"]["image_grids"][0] == [
        {"tokens": g * g, "views": [{"name": "image", "offset": 0, "rows": g, "cols": g, "row_stride": g,
                                     "whole_image": False}]}]


def test_llava_overlay_values_are_the_recorded_probabilities_row_major(llava_run) -> None:
    tm, inputs, trace = llava_run
    g = tm.model.config.vision_config.image_size // tm.model.config.vision_config.patch_size
    for sample in (0, 1):  # sample 0 is left-padded
        want = last_row_by_hand(trace, inputs, sample, layer=2, head=1)[image_positions_by_hand(tm, inputs, sample)]
        positions, image = sample_images(TokenGroups.from_dict(trace.meta["groups"]), sample)[0]
        got = patch_grids(attention_row(trace, sample, layer=2, head=1), positions, image)["image"]
        np.testing.assert_array_equal(got, want.reshape(g, g).numpy())


def test_figure_draws_the_grid_on_the_image(llava_run) -> None:
    tm, inputs, trace = llava_run
    g = tm.model.config.vision_config.image_size // tm.model.config.vision_config.patch_size
    picture = tm.make_image(1)
    labels = token_labels(tm.tokenizer, inputs["input_ids"][1])
    fig = trace.show_image_attention(sample=1, layer=0, head=3, image=picture, tokens=labels)
    assert png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    image_ax = fig.axes[0]
    drawn_picture, overlay = image_ax.images
    np.testing.assert_array_equal(np.asarray(drawn_picture.get_array()), np.asarray(picture))
    want = last_row_by_hand(trace, inputs, 1, layer=0, head=3)[image_positions_by_hand(tm, inputs, 1)]
    np.testing.assert_allclose(np.asarray(overlay.get_array()), want.reshape(g, g).numpy(), rtol=0, atol=0)
    assert overlay.get_alpha() == pytest.approx(0.6)
    strip = [ax for ax in fig.axes if ax.get_title().startswith("prompt tokens")][0]
    shown = [t.get_text() for t in strip.get_yticklabels()]
    assert shown[:3] == labels[int(inputs["attention_mask"][1].nonzero().min()):][:3]
    assert f"<image: {g * g} tokens>" in shown


def test_token_strip_bars_are_the_row_over_the_prompt(llava_run) -> None:
    tm, inputs, trace = llava_run
    fig = trace.show_image_attention(sample=0, layer=1, head=0)
    strip = [ax for ax in fig.axes if ax.get_title().startswith("prompt tokens")][0]
    widths = np.array([p.get_width() for p in strip.patches])
    row = last_row_by_hand(trace, inputs, 0, layer=1, head=0)
    real = inputs["attention_mask"][0].bool()
    image = inputs["input_ids"][0] == image_token_id(tm)
    # one bar per real non-image token plus one for the image's sum: together the whole row (padding gets none)
    assert len(widths) == int((real & ~image).sum()) + 1
    assert widths.sum() == pytest.approx(float(row[real].sum()), abs=1e-5)
    assert widths.max() >= float(row[image].sum()) - 1e-6


def test_last_token_mean_is_mean_over_layers_and_heads(llava_run) -> None:
    tm, inputs, trace = llava_run
    n_layers, n_heads = tm.model.config.text_config.num_hidden_layers, tm.model.config.text_config.num_attention_heads
    want = torch.stack([last_row_by_hand(trace, inputs, 1, layer, h) for layer in range(n_layers)
                        for h in range(n_heads)]).mean(dim=0)
    torch.testing.assert_close(attention_row(trace, 1), want, rtol=1e-6, atol=1e-7)


def test_head_of_a_recorded_subset_is_found_by_its_number(llava_run) -> None:
    tm, inputs, trace = llava_run
    with arbiter.attach(tm.model, tm.processor) as lens:
        with lens.record("attn.probs", rows="last", heads=[1, 3]) as rec, torch.no_grad():
            tm.model(**inputs)
    torch.testing.assert_close(attention_row(rec.trace, 0, layer=2, head=3),
                               last_row_by_hand(trace, inputs, 0, layer=2, head=3))
    with pytest.raises(SiteError, match=r"head 2 was not recorded at layer 2 \(recorded heads: \[1, 3\]\)"):
        attention_row(rec.trace, 0, layer=2, head=2)


def test_head_without_layer_is_refused(llava_run) -> None:
    with pytest.raises(SiteError, match="head= needs layer="):
        attention_row(llava_run[2], 0, layer=None, head=1)


def test_unrecorded_row_is_a_clear_error(llava_run) -> None:
    with pytest.raises(TraceError, match="no attention row was recorded at position 3"):
        attention_row(llava_run[2], 0, layer=0, position=3)


def test_figure_on_a_given_axes_draws_only_the_image(llava_run) -> None:
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot(1, 1, 1)
    assert llava_run[2].show_image_attention(sample=0, layer=0, ax=ax) is fig
    assert len(ax.images) == 1  # no picture given: the grid alone
    assert png_bytes(fig)[:4] == b"\x89PNG"


def test_grids_survive_save_and_load(llava_run, tmp_path) -> None:
    trace = llava_run[2]
    trace.save(tmp_path / "t.safetensors")
    loaded = Trace.load(tmp_path / "t.safetensors")
    torch.testing.assert_close(attention_row(loaded, 1, layer=3, head=2), attention_row(trace, 1, layer=3, head=2))
    assert loaded.meta["groups"]["image_grids"] == trace.meta["groups"]["image_grids"]


# --------------------------------------------------------------------------- Qwen2-VL


@pytest.fixture(scope="module")
def qwen_run():
    tm = _tiny("qwen2_vl")
    picture = noise_image(84, 56)  # 84 px wide, 56 px high: 6 x 4 patches of 14, merged 2 x 2 -> 2 rows x 3 cols
    inputs = dict(tm.processor(text=[tm.prompt("What colour?")], images=[[picture]], return_tensors="pt"))
    return tm, inputs, record_last_rows(tm, inputs), picture


def test_qwen2_vl_non_square_grid_shape(qwen_run) -> None:
    tm, inputs, trace, _ = qwen_run
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    (image,) = trace.meta["groups"]["image_grids"][0]
    assert image["tokens"] == len(image_positions_by_hand(tm, inputs, 0)) == 6
    assert [(v["rows"], v["cols"]) for v in image["views"]] == [(2, 3)]


def test_qwen2_vl_overlay_values_are_the_recorded_probabilities_row_major(qwen_run) -> None:
    tm, inputs, trace, picture = qwen_run
    want = last_row_by_hand(trace, inputs, 0, layer=3, head=2)[image_positions_by_hand(tm, inputs, 0)]
    fig = trace.show_image_attention(sample=0, layer=3, head=2, image=picture)
    overlay = fig.axes[0].images[1]
    np.testing.assert_array_equal(np.asarray(overlay.get_array()), want.reshape(2, 3).numpy())
    assert png_bytes(fig)[:4] == b"\x89PNG"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_vl_token_order_is_row_major_on_the_image(family: str) -> None:
    """Where the processor puts each merged token on the picture: blocks of (patch x merge) px with distinct grey
    levels; merged token k (the processor's patches merge^2 k ... merge^2 (k + 1) - 1) must carry the grey of
    block divmod(k, cols), as the adapter's row-major grid says."""
    tm = _tiny(family)
    ip = tm.processor.image_processor
    block, merge = ip.patch_size * ip.merge_size, ip.merge_size
    rows, cols = 2, 3
    grey = np.arange(rows * cols).reshape(rows, cols) * 40 + 20
    pixels = np.kron(grey, np.ones((block, block))).astype(np.uint8)
    out = ip(images=[Image.fromarray(pixels).convert("RGB")], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, rows * merge, cols * merge]]
    patches = out["pixel_values"].reshape(rows * cols, merge * merge, 3, -1)  # [token, its patches, channel, t*p*p]
    red = patches[:, :, 0].mean(dim=(1, 2)).numpy() * ip.image_std[0] + ip.image_mean[0]
    np.testing.assert_allclose(red * 255, grey.reshape(-1), atol=0.5)


# --------------------------------------------------------------------------- LLaVA-NeXT


def test_llava_next_base_and_tile_views_match_the_ids() -> None:
    tm = _tiny("llava_next")
    side = tm.model.config.vision_config.image_size // tm.model.config.vision_config.patch_size  # 3 for the tiny
    picture = noise_image(2 * tm.model.config.vision_config.image_size, tm.model.config.vision_config.image_size)
    inputs = dict(tm.processor(text=[tm.prompt("What colour?")], images=[[picture]], return_tensors="pt"))
    trace = record_last_rows(tm, inputs)
    (image,) = trace.meta["groups"]["image_grids"][0]
    # a 2:1 image picks the [s, 2s] pinpoint: 1 x 2 tiles, a side x 2 side grid, nothing to unpad, a newline per row
    assert [(v["name"], v["offset"], v["rows"], v["cols"], v["row_stride"]) for v in image["views"]] == [
        ("base", 0, side, side, side), ("tiles", side * side, side, 2 * side, 2 * side + 1)]
    positions = image_positions_by_hand(tm, inputs, 0)
    assert image["tokens"] == len(positions) == side * side + side * (2 * side + 1)
    row = last_row_by_hand(trace, inputs, 0, layer=1, head=1)
    grids = patch_grids(attention_row(trace, 0, layer=1, head=1), positions.tolist(), image)
    tiles = positions[side * side:].reshape(side, 2 * side + 1)[:, :-1]  # drop each row's newline token
    np.testing.assert_array_equal(grids["tiles"], row[tiles].numpy())
    np.testing.assert_array_equal(grids["base"], row[positions[:side * side]].reshape(side, side).numpy())


# --------------------------------------------------------------------------- unknown geometry


def _trace_without_grid(problem: str | None = None) -> Trace:
    groups = TokenGroups.from_input_ids(torch.tensor([[1, 5, 5, 5, 5, 2]]), modality_token_ids={"image": [5]})
    if problem is not None:
        groups = groups.with_image_grids([{"tokens": 9, "views": []}])
    probs = torch.full((1, 1, 1, 6), 1 / 6)
    return Trace({"L0.attn.probs": probs, "rows.attn.probs": torch.tensor([5]),
                  "rowmask.attn.probs": torch.tensor([[True]])}, {"groups": groups.to_dict()})


def test_unknown_grid_is_a_clear_error() -> None:
    with pytest.raises(TraceError, match="no image patch grid: the model's adapter does not say"):
        _trace_without_grid().show_image_attention(layer=0)


def test_sample_without_image_tokens_is_told() -> None:
    groups = TokenGroups.from_input_ids(torch.tensor([[1, 4, 2]]), modality_token_ids={"image": [5]})
    trace = Trace({"L0.attn.probs": torch.full((1, 1, 1, 3), 1 / 3), "rows.attn.probs": torch.tensor([2]),
                   "rowmask.attn.probs": torch.tensor([[True]])}, {"groups": groups.to_dict()})
    with pytest.raises(TraceError, match="has no image tokens"):
        trace.show_image_attention(layer=0)


def test_grid_count_mismatch_is_told() -> None:
    with pytest.raises(TraceError, match="has 4 image tokens in its ids, but the grids of its images give 9"):
        _trace_without_grid(problem="mismatch").show_image_attention(layer=0)


def test_colour_scale_floor_keeps_an_ignored_image_dark() -> None:
    from arbiter.overlays import plot_image_attention

    image = {"tokens": 4, "views": [{"name": "image", "offset": 0, "rows": 2, "cols": 2, "row_stride": 2}]}
    row = torch.tensor([0.9, 1e-9, 2e-9, 3e-9, 4e-9, 0.1 - 1e-8])
    overlay = plot_image_attention(row, [1, 2, 3, 4], image).axes[0].images[0]
    assert overlay.get_clim() == (0.0, pytest.approx(0.009))  # 1% of the row's 0.9, not the patches' 4e-9
    row = torch.tensor([0.5, 0.1, 0.2, 0.05, 0.05, 0.1])
    overlay = plot_image_attention(row, [1, 2, 3, 4], image).axes[0].images[0]
    assert overlay.get_clim() == (0.0, pytest.approx(0.2))  # the largest patch


def test_stretched_grid_warns() -> None:
    image = {"tokens": 4, "views": [{"name": "image", "offset": 0, "rows": 2, "cols": 2, "row_stride": 2}]}
    from arbiter.overlays import plot_image_attention

    with pytest.warns(UserWarning, match="stretched over the whole image"):
        fig = plot_image_attention(torch.full((6,), 1 / 6), [1, 2, 3, 4], image, picture=noise_image(40, 20))
    assert "(stretched)" in fig.axes[0].get_title()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whole = {**image, "views": [{**image["views"][0], "whole_image": True}]}
        fig = plot_image_attention(torch.full((6,), 1 / 6), [1, 2, 3, 4], whole, picture=noise_image(40, 20))
    assert "(stretched)" not in fig.axes[0].get_title()


# --------------------------------------------------------------------------- groups carry the grids


def test_groups_select_and_tile_keep_each_samples_grids() -> None:
    ids = torch.tensor([[5, 5, 1, 1], [5, 5, 5, 5]])
    g = TokenGroups.from_input_ids(ids, modality_token_ids={"image": [5]}, sample_ids=["a", "b"])
    a = {"tokens": 2, "views": [{"name": "image", "offset": 0, "rows": 1, "cols": 2, "row_stride": 2}]}
    b = {"tokens": 4, "views": [{"name": "image", "offset": 0, "rows": 2, "cols": 2, "row_stride": 2}]}
    g = g.with_image_grids([a, b])
    assert g.image_grids == [[a], [b]]
    assert g.select([1]).image_grids == [[b]]
    assert g.tile(2).image_grids == [[a], [b], [a], [b]]
    assert g.expand(2).image_grids == [[a], [a], [b], [b]]
    assert TokenGroups.from_dict(g.to_dict()).image_grids == [[a], [b]]


# --------------------------------------------------------------------------- the report's figures


@pytest.mark.slow
def test_report_figures_for_each_target(tmp_path) -> None:
    from arbiter import organisms

    model, processor, ds = organisms.load("llava_tiny")
    samples = [s for s in ds.samples if s.conflict and s.image is not None]
    with arbiter.attach(model, processor) as lens:
        entries = image_attention_figures(lens, samples, [{"layer": 0, "head": 2, "score": 0.5}, (1, 0)], tmp_path,
                                          dataset=ds, per_target=1, top=3)
    first = {t: next(s for s in samples if s.target == t).id for t in ("vision", "text")}
    assert [(e["sample"], e["head"]) for e in entries] == [
        (sid, h) for sid in (first["vision"], first["text"]) for h in ("L0H2", "L1H0", "last")]
    for e in entries:
        assert e["path"].startswith("image_attention/") and e["path"].endswith(".png")
        assert (tmp_path / e["path"]).read_bytes()[:4] == b"\x89PNG"
        assert e["sample"] in e["caption"]
    assert "#1 of the head ranking, score 0.5" in entries[0]["caption"]
