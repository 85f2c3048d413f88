"""MFR: answer normalisation, matching against D_p / D_c forms, the split by target, the pi > 0.5 variant."""

import json

import pytest

from arbiter.errors import DataError
from arbiter.metrics.mfr import answer_follows, mfr, mfr_from_pi, normalise


def test_normalise():
    assert normalise("  The Red car. ") == "the red car"
    assert normalise("New-York!!") == "newyork"
    assert normalise("U.S.A.") == "usa"
    assert normalise("two\t\nwords") == "two words"
    assert normalise("«Ça»") == "ça"


def test_answer_follows():
    P, C = ["red", "crimson"], ["blue"]
    assert answer_follows("Red.", P, C) == 1
    assert answer_follows("The answer is crimson", P, C) == 1
    assert answer_follows("blue", P, C) == -1
    assert answer_follows("red or blue", P, C) == 0  # both: does not follow
    assert answer_follows("green", P, C) == 0
    assert answer_follows("reddish", P, C) == 0  # whole words only
    assert answer_follows("The answer is red", P, C, match="exact") == 0
    assert answer_follows("RED!", P, C, match="exact") == 1
    assert answer_follows("new york", ["New York City", "new york"], "Boston") == 1
    with pytest.raises(DataError):
        answer_follows("x", ["..."], C)
    with pytest.raises(DataError):
        answer_follows("x", P, C, match="fuzzy")


def test_mfr_split_by_target():
    # s0 vision: follows; s1 vision: answers the competitor; s2 text: follows; s3 text: both -> no; s4 text: follows
    answers = ["A dog.", "cat", "Paris", "paris and rome", "It is Rome"]
    fp = [["dog"], ["dog", "puppy"], ["paris"], ["paris"], ["rome"]]
    fc = [["cat"], ["cat"], ["rome"], ["rome"], ["paris"]]
    r = mfr(answers, fp, fc, ["vision", "vision", "text", "text", "text"])
    # overall 3/5; vision 1/2; text 2/3
    assert r.overall == pytest.approx(0.6) and r.vision == 0.5 and r.text == pytest.approx(2 / 3)
    assert (r.n, r.n_vision, r.n_text, r.follows, r.variant) == (5, 2, 3, [1, 0, 1, 0, 1], "answer")
    json.dumps(r.to_dict())


def test_mfr_from_pi():
    # strictly > 0.5: 0.9 yes, 0.5 no, 0.2 no, 0.51 yes
    r = mfr_from_pi([0.9, 0.5, 0.2, 0.51], ["vision", "vision", "text", "text"])
    assert (r.overall, r.vision, r.text, r.variant) == (0.5, 0.5, 0.5, "pi")
    r = mfr_from_pi([0.9], ["text"])
    assert r.vision is None and r.to_dict()["vision"] is None


def test_mfr_errors():
    with pytest.raises(DataError):
        mfr(["a"], [["a"]], [["b"]], ["audio"])
    with pytest.raises(DataError):
        mfr(["a", "b"], [["a"]], [["b"]], ["text", "text"])
    with pytest.raises(DataError):
        mfr([], [], [], [])
