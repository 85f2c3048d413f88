"""TokenGroups read off input ids, checked against a per-position computation written out independently."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arbiter.groups import TokenGroups

MODALITY_IDS = {"image": [3], "video": [4, 5], "audio": []}


def _expected(ids: list[list[int]], real: list[list[bool]]) -> dict[str, list[list[bool]]]:
    """Every built-in group of from_input_ids, position by position in plain Python."""
    out: dict[str, list[list[bool]]] = {k: [] for k in ("image", "video", "audio", "pad", "text", "last", "all")}
    for row, ok in zip(ids, real):
        image = [t == 3 and r for t, r in zip(row, ok)]
        video = [t in (4, 5) and r for t, r in zip(row, ok)]
        last_real = max([i for i, r in enumerate(ok) if r], default=0)   # a sample with no real position: 0
        out["image"].append(image)
        out["video"].append(video)
        out["audio"].append([False] * len(row))
        out["pad"].append([not r for r in ok])
        out["text"].append([r and not (i or v) for r, i, v in zip(ok, image, video)])
        out["last"].append([i == last_real for i in range(len(row))])
        out["all"].append(list(ok))
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), b=st.integers(1, 4), s=st.integers(1, 12), masked=st.booleans())
def test_groups_from_ids_equal_a_per_position_computation(data, b, s, masked):
    ids = [data.draw(st.lists(st.integers(0, 6), min_size=s, max_size=s)) for _ in range(b)]
    real = [data.draw(st.lists(st.booleans(), min_size=s, max_size=s)) if masked else [True] * s for _ in range(b)]
    mask = torch.tensor(real, dtype=torch.long) if masked else None
    g = TokenGroups.from_input_ids(torch.tensor(ids), mask, MODALITY_IDS)
    for name, want in _expected(ids, real).items():
        assert g[name].tolist() == want, name
    assert not g["generated"].any()


def test_groups_do_not_share_the_callers_bool_mask():
    mask = torch.tensor([[False, True, True]])
    g = TokenGroups.from_input_ids(torch.tensor([[7, 8, 9]]), mask, {"image": [3]})   # no modality position
    mask[0, 1] = False   # the caller reuses its mask
    assert g["text"].tolist() == [[False, True, True]]


def test_image_grids_are_handed_out_by_the_image_positions_they_were_given():
    ids = torch.tensor([[3, 3, 1, 0], [3, 3, 3, 3]])
    g = TokenGroups.from_input_ids(ids, None, {"image": [3]})
    images = [{"tokens": 2, "views": ["a"]}, {"tokens": 1, "views": ["b"]}, {"tokens": 3, "views": ["c"]}]
    out = g.with_image_grids(images)
    images[0]["tokens"] = 99   # the caller's list changes after the call: the groups keep what they were given
    out.truncate(1)            # and so do later edits of the masks
    assert out.image_grids == [[{"tokens": 2, "views": ["a"]}], [{"tokens": 1, "views": ["b"]},
                                                                  {"tokens": 3, "views": ["c"]}]]
    assert out.image_grids_problem is None
    assert g.image_grids is None   # the groups it came from are unchanged


def test_image_grids_that_do_not_add_up_say_why():
    g = TokenGroups.from_input_ids(torch.tensor([[3, 3, 1]]), None, {"image": [3]})
    out = g.with_image_grids([{"tokens": 3, "views": []}])
    assert out.image_grids is None
    assert "has 2 image tokens in its ids, but the grids of its images give 3" in out.image_grids_problem
    assert "1 of the 2 images" in g.with_image_grids([{"tokens": 2, "views": []}] * 2).image_grids_problem


def test_extend_appends_generated_positions_to_generated_and_all_only_each_group_its_own_tensor():
    ids = torch.tensor([[3, 7, 8], [0, 3, 9]])
    real = torch.tensor([[True, True, True], [False, True, True]])
    g = TokenGroups.from_input_ids(ids, real, MODALITY_IDS)
    before = {name: g[name].clone() for name in g.names}
    g.extend(2)
    assert g.length == 5
    for name in before:
        assert torch.equal(g[name][:, :3], before[name])
        assert g[name][:, 3:].tolist() == [[name in ("generated", "all")] * 2] * 2, name
    g["image"][0, 4] = True   # written into one group: no other changes
    assert not g["text"][0, 4] and not g["pad"][0, 4] and g["generated"][0, 4]


def test_a_window_of_a_union_equals_the_slice_of_the_whole_union_padded_past_the_end():
    ids = torch.tensor([[3, 7, 8, 3], [0, 3, 9, 9]])
    real = torch.tensor([[True, True, True, True], [False, True, True, True]])
    g = TokenGroups.from_input_ids(ids, real, MODALITY_IDS)
    g.extend(1)
    for name in ("image", "last|generated", "image | text", "pad|image|last"):
        whole = g.mask(name, length=8)
        for start, stop in ((0, 5), (3, 5), (4, 5), (2, 8), (6, 8), (1, 1)):
            assert torch.equal(g.window(name, start, stop), whole[:, start:stop]), (name, start, stop)


def test_groups_without_a_pad_mask_cover_every_position():
    g = TokenGroups({"image": torch.tensor([[True, False, False]])})
    assert g["all"].tolist() == [[True, True, True]]
    assert g["generated"].tolist() == [[False, False, False]]

