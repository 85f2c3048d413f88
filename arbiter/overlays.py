"""Image-attention overlays: a recorded attention row put back on the image's patch grid and drawn on the image,
next to the same row over the prompt tokens; plus the few figures a diagnosis report shows.

The grid geometry comes from the trace (``meta["groups"]["image_grids"]``, written at record time by the model's
adapter); nothing here knows a model family. Plots need the ``plots`` extra (matplotlib; no pyplot state)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import SiteError, TraceError
from .groups import TokenGroups
from .trace import site_key
from .util import head_label

__all__ = ["patch_grids", "sample_images", "attention_row", "token_labels", "plot_image_attention",
           "show_image_attention", "image_attention_figures"]

_SITE = "attn.probs"


# --------------------------------------------------------------------------- geometry


def patch_grids(row, image_positions: Sequence[int], image: Mapping) -> dict[str, np.ndarray]:
    """The attention ``row`` (one query's probabilities over the keys, indexed by position) on the patch grids of
    one image: ``{view name: [rows, cols] array}``, where patch (r, c) of a view holds
    ``row[image_positions[view.offset + r * view.row_stride + c]]`` (row-major, as ``Adapter.image_grids``
    describes the image). ``image_positions``: the sequence positions of the image's tokens, in order."""
    values = row.detach().float().cpu().numpy() if isinstance(row, torch.Tensor) else np.asarray(row, dtype=float)
    if values.ndim != 1:
        raise ValueError(f"an attention row is 1-D (one value per key position), got shape {values.shape}.")
    pos = np.asarray(list(image_positions), dtype=np.int64)
    if len(pos) != int(image["tokens"]):
        raise ValueError(f"the image has {image['tokens']} tokens in its grid description but {len(pos)} positions "
                         "were given: pass the positions of this image's tokens only, in sequence order.")
    if len(pos) and (pos.min() < 0 or pos.max() >= len(values)):
        raise ValueError(f"image positions {int(pos.min())}..{int(pos.max())} fall outside the row's "
                         f"{len(values)} keys.")
    out = {}
    for view in image["views"]:
        r, c = np.meshgrid(np.arange(view["rows"]), np.arange(view["cols"]), indexing="ij")
        index = view["offset"] + r * view["row_stride"] + c
        if index.size and index.max() >= len(pos):
            raise ValueError(f"view {view['name']!r} reaches token {int(index.max())} of an image of {len(pos)}.")
        out[view["name"]] = values[pos[index]]
    return out


def _groups(trace) -> TokenGroups:
    g = trace.meta.get("groups")
    if not isinstance(g, Mapping):
        raise TraceError("the trace has no token groups in its meta (meta['groups']): record it inside "
                         "arbiter.attach (lens.record) so that the image positions are known.")
    return TokenGroups.from_dict(g)


def _sample_index(groups: TokenGroups, sample: int | str) -> int:
    if isinstance(sample, str):
        if sample not in groups.sample_ids:
            raise TraceError(f"sample {sample!r} is not in the trace (its samples: {groups.sample_ids[:10]}...).")
        return groups.sample_ids.index(sample)
    if not -groups.batch_size <= int(sample) < groups.batch_size:
        raise TraceError(f"sample {sample} is out of range: the trace's groups hold {groups.batch_size} samples.")
    return int(sample) % groups.batch_size


def sample_images(groups: TokenGroups, sample: int) -> list[tuple[list[int], dict]]:
    """The images of one sample as ``(positions of its image tokens, its grid description)``, in order; a
    TraceError where the sample has no image token or the groups hold no grids (the adapter does not know the
    model's patch layout)."""
    positions = groups.positions("image", sample) if "image" in groups else []
    if not positions:
        raise TraceError(f"sample {groups.sample_ids[sample]!r} has no image tokens: there is no image to draw on.")
    if groups.image_grids is None:
        from .adapters.base import families_with

        why = groups.image_grids_problem or (
            "the model's adapter does not say how its image tokens lie on the image (Adapter.image_grids; the "
            f"adapters that do: {', '.join(families_with('image_grids'))}), or the trace was recorded before "
            "arbiter kept image grids")
        raise TraceError(f"the trace holds no image patch grid: {why}. Without it the image attention cannot be put "
                         "back on the image; record with a supported family or give your adapter an image_grids "
                         "method.")
    out, start = [], 0
    for image in groups.image_grids[sample]:
        n = int(image["tokens"])
        out.append((positions[start:start + n], image))
        start += n
    return out


def attention_row(trace, sample: int | str = 0, layer: int | None = None, head: int | None = None,
                  position: int | None = None) -> torch.Tensor:
    """One recorded attention row of a trace, float32 over the key positions: sample ``sample`` (index or id), query
    at ``position`` (default: the sample's last prompt token), ``layer`` / ``head`` (``head=None``: mean over the
    recorded heads; ``layer=None``: mean over every recorded self-attention layer, heads averaged). Needs
    ``L{layer}.attn.probs`` recorded at that row (``lens.record("attn.probs", rows="last")``)."""
    groups = _groups(trace)
    i = _sample_index(groups, sample)
    if position is None:
        position = groups.positions("last", i)[0]
    cross = set((trace.meta.get("model") or {}).get("cross_attention_layers") or [])
    recorded = [lay for lay in trace.layers(_SITE) if lay not in cross]
    if layer is None:
        if head is not None:
            raise SiteError("head= needs layer=: a head index names a head of one layer (layer=None averages "
                            "every layer's heads).")
        layers = recorded
        if not layers:
            raise TraceError(f"the trace has no {_SITE} of a self-attention layer: record "
                             "lens.record('attn.probs', rows='last').")
    else:
        if layer in cross:
            raise SiteError(f"layer {layer} is a cross-attention layer: its keys are not the prompt's positions.")
        if layer not in recorded:
            raise TraceError(f"the trace has no {site_key(_SITE, layer)} (recorded layers: {recorded}); record that "
                             "layer.")
        layers = [layer]
    recorded_rows = trace.rows(_SITE)
    if recorded_rows is None:
        raise TraceError(f"the trace has no recorded rows of {_SITE}: record it with lens.record.")
    rows, rowmask = recorded_rows
    hit = ((rows == position) & rowmask[i]).nonzero().flatten()
    if len(hit) == 0:
        raise TraceError(f"no attention row was recorded at position {position} of sample {groups.sample_ids[i]!r} "
                         f"(recorded rows: {rows.tolist()[:10]}); record rows='last' or include that position.")
    r = int(hit[0])
    heads = trace.meta.get("heads")
    out = []
    for lay in layers:
        probs = trace.site(_SITE, lay)
        if probs.shape[0] != groups.batch_size:
            raise TraceError(f"{site_key(_SITE, lay)} holds {probs.shape[0]} samples but the trace's groups describe "
                             f"{groups.batch_size} (a concatenated trace keeps the first part's groups): use the "
                             "trace of one batch.")
        rows_h = probs[i, :, r, :].float()
        if head is None:
            out.append(rows_h.mean(dim=0))
            continue
        if heads is None:  # every head recorded: the head is its own index
            idx = head if 0 <= head < rows_h.shape[0] else None
        else:  # a head subset recorded (lens.record(..., heads=[...])): its index in the subset
            idx = heads.index(head) if head in heads else None
        if idx is None:
            have = heads if heads is not None else list(range(rows_h.shape[0]))
            raise SiteError(f"head {head} was not recorded at layer {lay} (recorded heads: {have}).")
        out.append(rows_h[idx])
    return torch.stack(out).mean(dim=0)


def token_labels(tokenizer, input_ids) -> list[str]:
    """Readable labels of a sample's tokens, one per position (each id decoded alone, newlines and tabs shown
    escaped), for the token strip of :func:`plot_image_attention`."""
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    return [tokenizer.decode([t]).replace("\n", "\\n").replace("\t", "\\t") for t in ids]


# --------------------------------------------------------------------------- figures


def _as_array(image) -> np.ndarray | None:
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    if hasattr(image, "convert"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def _draw_view(fig, ax, grid: np.ndarray, view: Mapping, picture: np.ndarray | None, vmax: float) -> None:
    rows, cols = grid.shape
    note = ""
    if picture is not None:
        h, w = picture.shape[:2]
        ax.imshow(picture, extent=(0, w, h, 0))
        if not view.get("whole_image") and abs((w / h) / (cols / rows) - 1) > 0.1:
            note = " (stretched)"
            warnings.warn(f"the image is {w}x{h} px but the {view['name']!r} grid is {cols}x{rows} patches and may "
                          "cover only part of it (a processor that center-crops or pads): the grid is stretched over "
                          "the whole image; pass the image as the model saw it", stacklevel=3)
    else:
        h, w = rows, cols
    shown = ax.imshow(grid, extent=(0, w, h, 0), cmap="inferno", vmin=0.0, vmax=vmax, interpolation="nearest",
                      alpha=0.6 if picture is not None else 1.0)
    for k in range(1, cols):
        ax.axvline(k * w / cols, color="white", lw=0.3, alpha=0.5)
    for k in range(1, rows):
        ax.axhline(k * h / rows, color="white", lw=0.3, alpha=0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{view['name']}: {rows}x{cols} patches{note}\nsum {grid.sum():.3f}", fontsize=8)
    bar = fig.colorbar(shown, ax=ax, orientation="horizontal", fraction=0.06, pad=0.04)
    bar.set_label("attention", fontsize=7)
    bar.ax.tick_params(labelsize=6)


def plot_image_attention(row, image_positions: Sequence[int], image: Mapping, *, picture=None,
                         prompt_positions: Sequence[int] | None = None, tokens: Sequence[str] | None = None,
                         title: str | None = None, view: str | None = None, ax=None, path=None):
    """Draw an attention row over one image: per view of the image's grid (:func:`patch_grids`), the patch values
    as a colour overlay (alpha 0.6) on ``picture`` (a PIL image, a path or an array; None: the grid alone) with a
    colour bar (from 0 to the largest patch value, but at least 1% of the row's largest value, so that an image
    the row ignores shows dark instead of its rounding noise stretched); beside it, a bar strip of the row over ``prompt_positions`` (every position given, in order; the
    image's tokens shown as one bar, their sum), labelled with ``tokens[position]`` (default: the position).
    ``ax``: draw only the view ``view`` (default the first) on that Axes. Saves to ``path`` when given; returns
    the Figure."""
    grids = patch_grids(row, image_positions, image)
    if view is not None and view not in grids:
        raise ValueError(f"the image has no view {view!r}; its views: {list(grids)}.")
    names = [view] if view is not None else list(grids)
    picture = _as_array(picture)
    views = {v["name"]: v for v in image["views"]}
    row_max = float(row.max()) if isinstance(row, torch.Tensor) else float(np.max(row))
    vmax = max(max(float(grids[n].max()) for n in names), 0.01 * row_max) or 1.0
    if ax is not None:
        fig = ax.figure
        _draw_view(fig, ax, grids[names[0]], views[names[0]], picture, vmax)
        if title:
            ax.set_title(title, fontsize=8)
        if path is not None:
            fig.savefig(path, dpi=100, bbox_inches="tight")
        return fig
    from matplotlib.figure import Figure

    values = row.detach().float().cpu().numpy() if isinstance(row, torch.Tensor) else np.asarray(row, dtype=float)
    img_pos = list(image_positions)
    first = img_pos[0] if img_pos else None
    img_set = set(img_pos)
    bars = []  # (label, value, is_image)
    for p in (prompt_positions if prompt_positions is not None else range(len(values))):
        if p in img_set:
            if p == first:
                bars.append((f"<image: {len(img_pos)} tokens>", float(values[img_pos].sum()), True))
            continue
        bars.append((tokens[p] if tokens is not None else str(p), float(values[p]), False))
    height = max(3.6, 0.15 * len(bars) + 1.2)
    fig = Figure(figsize=(3.2 * len(names) + 4.2, height))
    # fixed margins (no tight bounding box: that would lay out every token label twice)
    spec = fig.add_gridspec(1, len(names) + 1, width_ratios=[3.2] * len(names) + [3.0], wspace=0.5, left=0.03,
                            right=0.97, top=1 - 0.75 / height, bottom=0.55 / height)
    for k, name in enumerate(names):
        a = fig.add_subplot(spec[0, k])
        _draw_view(fig, a, grids[name], views[name], picture, vmax)
    a = fig.add_subplot(spec[0, len(names)])
    y = np.arange(len(bars))
    a.barh(y, [b[1] for b in bars], color=["tab:orange" if b[2] else "tab:blue" for b in bars], height=0.8)
    a.set_yticks(y, [b[0] for b in bars], fontsize=6)
    a.set_ylim(len(bars) - 0.5, -0.5)
    a.set_xlabel("attention", fontsize=7)
    a.tick_params(axis="x", labelsize=6)
    a.set_title("prompt tokens (image tokens summed)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def show_image_attention(trace, sample: int | str = 0, layer: int | None = None, head: int | None = None,
                         image=None, tokens: Sequence[str] | None = None, image_index: int = 0,
                         view: str | None = None, position: int | None = None, title: str | None = None, ax=None,
                         path=None):
    """The figure of :func:`plot_image_attention` for a recorded trace (``Trace.show_image_attention``): the row of
    :func:`attention_row` (``layer`` / ``head``; None: means), over image ``image_index`` of the sample, drawn on
    ``image`` (PIL image, path or array; None: the grid alone), with the sample's real prompt positions in the
    token strip, labelled by ``tokens`` (one string per position, e.g. :func:`token_labels`)."""
    groups = _groups(trace)
    i = _sample_index(groups, sample)
    row = attention_row(trace, i, layer, head, position)
    images = sample_images(groups, i)
    if not 0 <= image_index < len(images):
        raise TraceError(f"image_index {image_index}: sample {groups.sample_ids[i]!r} has {len(images)} image(s).")
    positions, grid = images[image_index]
    if tokens is not None and len(tokens) < len(row):
        raise ValueError(f"tokens has {len(tokens)} labels but the row covers {len(row)} positions: give one label "
                         "per position of the sample (its padded input ids).")
    generated = set(groups.positions("generated", i))
    prompt = [p for p in groups.positions("all", i) if p < len(row) and p not in generated]
    if title is None:
        pos = groups.positions("last", i)[0] if position is None else position
        who = ("mean over layers and heads" if layer is None else
               f"layer {layer}, mean over heads" if head is None else head_label(layer, head))
        title = f"sample {groups.sample_ids[i]}: attention of position {pos} ({who})"
    return plot_image_attention(row, positions, grid, picture=image, prompt_positions=prompt, tokens=tokens,
                                title=title, view=view, ax=ax, path=path)


# --------------------------------------------------------------------------- the report's figures


def _head_pair(h) -> tuple[int, int, float | None]:
    if isinstance(h, Mapping):
        return int(h["layer"]), int(h["head"]), (float(h["score"]) if h.get("score") is not None else None)
    layer, head = h[:2]
    return int(layer), int(head), None


def image_attention_figures(lens, samples, heads, out, *, dataset=None, per_target: int = 2, top: int = 3,
                            folder: str = "image_attention") -> list[dict]:
    """The report's image-attention figures: for the first ``per_target`` samples with an image of each target
    (vision, text), one figure per head among the first ``top`` of ``heads`` (``(layer, head)`` pairs or ranking
    entries ``{"layer", "head", "score"}``, best first) and one of the last token's mean over layers and heads,
    from one recording forward (``attn.probs`` at the last row). PNGs go to ``out/folder``; returns
    ``[{"path": relative path, "caption", "sample": id, "head": "L#H#" or "last"}]``."""
    chosen = [s for t in ("vision", "text") for s in [x for x in samples if x.image is not None
                                                       and x.target == t][:per_target]]
    if not chosen:
        return []
    batch = lens.encode(chosen, dataset=dataset)
    sample_images(batch.groups, 0)  # a TraceError before the forward where the model's patch grid is unknown
    with torch.no_grad(), lens.record(_SITE, rows="last") as rec:
        lens.model(**batch.inputs, use_cache=False)
    trace = rec.trace
    groups = _groups(trace)
    tokenizer = getattr(lens.processor, "tokenizer", lens.processor)
    folder_path = Path(out) / folder
    folder_path.mkdir(parents=True, exist_ok=True)
    picked = [_head_pair(h) for h in list(heads)[:top]]
    entries = []
    for i, s in enumerate(chosen):
        labels = token_labels(tokenizer, batch.inputs["input_ids"][i])
        picture = s.load_image()
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", s.id)
        who = f"sample {s.id} (instruction: trust the {s.target}; image says '{s.answer_vision}', text says " \
              f"'{s.answer_text}')"
        for rank, (layer, head, score) in [(k + 1, p) for k, p in enumerate(picked)] + [(None, (None, None, None))]:
            tag = "last" if layer is None else head_label(layer, head)
            what = ("the last prompt token, attention averaged over every layer and head" if layer is None else
                    f"head {tag} (#{rank} of the head ranking" + (f", score {score:.3g})" if score is not None
                                                                    else ")") + " at the last prompt token")
            title = ("last token, mean over layers and heads" if layer is None else f"head {tag} at the last token")
            fig = show_image_attention(trace, i, layer, head, image=picture, tokens=labels,
                                       title=f"{s.id} ({s.target}-instructed): {title}")
            row = attention_row(trace, i, layer, head)
            positions, grid = sample_images(groups, i)[0]
            share = float(row[positions].sum())
            shape = " + ".join(f"{v['rows']}x{v['cols']}" for v in grid["views"])
            name = f"{safe}_{tag}.png"
            fig.savefig(folder_path / name, dpi=90)
            entries.append({
                "path": f"{folder}/{name}", "sample": s.id, "head": tag,
                "caption": f"{who}: where {what} looks. Left: its attention over the {shape} image patches, drawn on "
                           f"the image (brighter = more; colours span 0 to the largest patch, at least 1% of the row's "
                           f"largest value; the colour bar gives the probabilities; the patches hold {share:.1%} of "
                           "the row). Right: the same row over the "
                           "prompt tokens, the image's tokens summed in one orange bar.",
            })
    return entries
