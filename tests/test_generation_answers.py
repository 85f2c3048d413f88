"""Answers from generation on a trained organism made to babble after its first token: the generated MFR is the
first-token MFR, the both / neither counts are the babble's, and diagnose blocks the first-answer-correct samples."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import arbiter
from arbiter import organisms
from arbiter.data import COLOURS, SHAPES, generate_synthetic
from arbiter.experiments.baseline import evaluate
from arbiter.experiments.diagnose import MODALITY_STEPS, diagnose
from arbiter.metrics import mfr


class _Babble(LogitsProcessor):
    """Leaves the first generated token to the model, then forces ``ids`` in turn (no end token ever)."""

    def __init__(self, ids: list[int]):
        self.ids, self.start = ids, None

    def __call__(self, input_ids, scores):
        if self.start is None:  # the first step of this generate() call
            self.start = input_ids.shape[1]
            return scores
        out = torch.full_like(scores, float("-inf"))
        out[:, self.ids[(input_ids.shape[1] - self.start - 1) % len(self.ids)]] = 0.0
        return out


def _babbling(model, words: list[str], tok) -> None:
    """Every ``model.generate`` call answers with the model's own first token, then the words in turn."""
    ids = []
    for w in words:
        got = tok(" " + w, add_special_tokens=False)["input_ids"]
        assert len(got) == 1, (w, got)
        ids.append(got[0])
    plain = model.generate

    def generate(*args, **kwargs):
        return plain(*args, logits_processor=LogitsProcessorList([_Babble(ids)]), **kwargs)
    model.generate = generate


def _first_token_words(lens, samples, dataset) -> list[str]:
    """The greedy first answer word of each sample from one plain forward (argmax at the last position)."""
    tok = lens.processor.tokenizer
    words = []
    for i in range(0, len(samples), 8):
        batch = lens.encode(samples[i:i + 8], dataset=dataset)
        with torch.no_grad():
            top = lens.model(**batch.inputs).logits[:, -1].argmax(-1)
        words += [tok.decode([int(t)]).strip().lower() for t in top]
    return words


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """llava_tiny_s0 on held-out instruction wordings: it fails on some vision-instructed conflicts there."""
    ds = generate_synthetic(tmp_path_factory.mktemp("heldout"), 48, seed=11, image_size=56, paraphrases="heldout")
    return ds, [s for s in ds.samples if s.conflict][:24]


@pytest.mark.slow
def test_generated_mfr_of_a_babbling_model_equals_its_first_token_mfr(heldout):
    ds, samples = heldout
    model, processor, _ = organisms.load("llava_tiny_s0")
    words = list(COLOURS) + list(SHAPES)            # every answer of the data: each babble mentions D_p and D_c
    _babbling(model, words, processor.tokenizer)
    with arbiter.attach(model, processor) as lens:
        first = _first_token_words(lens, samples, ds)
        base = evaluate(lens, samples, 8, ds, generate=True, max_new_tokens=1 + len(words), progress=False)
    expected = {s.id: int(w == s.answer_compliant) for s, w in zip(samples, first)}
    got = {i: int(f == 1) for i, f in zip(base.sample_ids, base.follows)}
    assert got == expected
    assert 0 < sum(expected.values()) < len(samples)   # some failures: the comparison is not all-or-nothing
    assert all(a.split()[1:] == words for a in base.answers)        # the babble is there, never an end token
    assert base.answer_counts()["both"] == len(samples) and base.answer_counts()["neither"] == 0
    assert base.to_dict()["mfr"]["answers"] == {"both": 24, "neither": 0, "n": 24, "by_target": {
        t: {"both": n, "neither": 0, "n": n} for t, n in (("vision", sum(s.target == "vision" for s in samples)),
                                                         ("text", sum(s.target == "text" for s in samples)))}}
    # the earlier reading (an answer mentioning both is no answer) scores every babbling sample as a failure
    contains = mfr(base.answers, [s.forms_compliant for s in samples], [s.forms_competitor for s in samples],
                   [s.target for s in samples], match="contains")
    assert contains.overall == 0.0


@pytest.mark.slow
def test_diagnose_blocks_the_first_answer_correct_samples_and_amplifies_the_others(heldout, tmp_path):
    ds, samples = heldout
    model, processor, _ = organisms.load("llava_tiny_s0")
    babble = ["red", "circle", "blue"]                # diagnose generates 4 tokens: first answer + 3 babbled
    _babbling(model, babble, processor.tokenizer)
    with arbiter.attach(model, processor) as lens:
        first = _first_token_words(lens, samples[:16], ds)
    rep = diagnose(model, processor, ds, tmp_path / "out", limit=16, window=3, head_methods=("exhaustive",),
                   n_random=1, alphas=(2.0,), skip=(*MODALITY_STEPS, "attractors"), progress=False,
                   log=lambda *a: None)
    correct = {s.id for s, w in zip(samples[:16], first) if w == s.answer_compliant}
    assert 0 < len(correct) < 16
    assert set(rep["blocking"]["sample_ids"]) == correct
    assert set(rep["amplification"]["sample_ids"]) == {s.id for s in samples[:16]} - correct
    said = [[w, *babble] for w in first]
    both = sum(s.answer_compliant in ws and s.answer_competitor in ws for s, ws in zip(samples[:16], said))
    neither = sum(s.answer_compliant not in ws and s.answer_competitor not in ws for s, ws in zip(samples[:16], said))
    assert {k: rep["mfr"]["answers"][k] for k in ("both", "neither", "n")} == {"both": both, "neither": neither,
                                                                               "n": 16}
    by = {t: [s.id in correct for s in samples[:16] if s.target == t] for t in ("vision", "text")}
    assert rep["mfr"]["vision"] == pytest.approx(sum(by["vision"]) / len(by["vision"]))
    assert rep["mfr"]["text"] == pytest.approx(sum(by["text"]) / len(by["text"]))
    json.dumps(rep)
