"""MFR: answer normalisation, the first answer entity against D_p / D_c forms, both / neither counts, the split by
target, the pi > 0.5 variant."""

import json

import pytest

from arbiter.errors import DataError
from arbiter.metrics.mfr import answer_follows, first_line, mention_counts, mfr, mfr_from_pi, normalise, read_answer


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
    assert answer_follows("red or blue", P, C) == 1  # the first answer entity decides
    assert answer_follows("blue or red", P, C) == -1
    assert answer_follows("red or blue", P, C, match="contains") == 0  # both: does not follow
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
    # s0 vision: follows; s1 vision: answers the competitor; s2 text: follows; s3 text: competitor first -> no;
    # s4 text: follows
    answers = ["A dog.", "cat", "Paris", "rome and paris", "It is Rome"]
    fp = [["dog"], ["dog", "puppy"], ["paris"], ["paris"], ["rome"]]
    fc = [["cat"], ["cat"], ["rome"], ["rome"], ["paris"]]
    r = mfr(answers, fp, fc, ["vision", "vision", "text", "text", "text"])
    # overall 3/5; vision 1/2; text 2/3
    assert r.overall == pytest.approx(0.6) and r.vision == 0.5 and r.text == pytest.approx(2 / 3)
    assert (r.n, r.n_vision, r.n_text, r.follows, r.variant) == (5, 2, 3, [1, 0, 1, 0, 1], "answer")
    assert r.answers == {"both": 1, "neither": 0, "n": 5}
    json.dumps(r.to_dict())


def test_the_first_answer_entity_decides_and_babble_after_it_is_counted_not_scored():
    # a model that answers in one word and keeps going: "cyan blue white white" (D_p = cyan, D_c = white)
    r = read_answer("cyan blue white white", ["cyan"], ["white"])
    assert (r.follows, r.mentions, r.text) == (1, "both", "cyan blue white white")
    r = read_answer(" White, not cyan.", ["cyan"], ["white"])
    assert (r.follows, r.mentions) == (-1, "both")
    # words outside the dictionary before the answer do not count; whole words only
    assert read_answer("I think it is bluish cyan", ["cyan"], ["blue"]).follows == 1
    assert read_answer("the answer is green", ["cyan"], ["white"]).mentions == "neither"
    assert read_answer("the answer is green", ["cyan"], ["white"]).follows == 0


def test_an_answer_stops_at_its_first_newline_after_leading_blank_lines():
    assert first_line("\n\n  red\nblue") == "red"
    r = read_answer("\nred\nblue blue", ["red"], ["blue"])
    assert (r.follows, r.mentions) == (1, "compliant")       # the second line is not the answer
    r = read_answer("green\nred", ["red"], ["blue"])
    assert (r.follows, r.mentions) == (0, "neither")


def test_at_one_position_the_longer_form_wins_and_a_shared_form_is_undecided():
    assert read_answer("dark red car", ["dark red"], ["dark"]).follows == 1
    assert read_answer("dark car", ["dark red"], ["dark"]).follows == -1
    r = read_answer("navy", ["navy", "dark blue"], ["navy"])   # a form in both dictionaries
    assert (r.follows, r.mentions) == (0, "both")


def test_mention_counts_of_hand_made_answers():
    P, C = ["red"], ["blue"]
    texts = ["red", "blue", "red blue", "blue red red", "green", "", "Red!\nblue"]
    # mentions: compliant, competitor, both, both, neither, neither, compliant (the second line is cut)
    got = [read_answer(t, P, C).mentions for t in texts]
    assert got == ["compliant", "competitor", "both", "both", "neither", "neither", "compliant"]
    assert mention_counts(got) == {"both": 2, "neither": 2, "n": 7}
    r = mfr(texts, [P] * 7, [C] * 7, ["vision"] * 7)
    assert r.follows == [1, 0, 1, 0, 0, 0, 1] and r.answers == {"both": 2, "neither": 2, "n": 7}
    with pytest.raises(DataError):
        mention_counts(["maybe"])


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
