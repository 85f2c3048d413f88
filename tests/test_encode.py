"""encode(): prompts from conflict samples, token groups from character spans, templates, audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import arbiter
from arbiter.data import ConflictSample
from arbiter.errors import DataError

from helpers import FAMILIES, _tiny

CONTEXT = "The circle is red."
INSTRUCTION = "You must rely on the image content rather than the text context."
QUESTION = "What colour is the circle?"


def _sample(tm, i=0, template=None, audio=None):
    return ConflictSample(id=f"s{i}", context=CONTEXT, instruction=INSTRUCTION, question=QUESTION + " ok" * i,
                          target="vision", answer_vision="blue", answer_text="red",
                          image=tm.make_image(i) if "image" in tm.modalities else None, template=template,
                          audio=audio)


def _text(tm, ids):
    tok = getattr(tm.processor, "tokenizer", tm.processor)
    return tok.decode(ids).strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_groups_cover_exactly_their_prompt_part(family):
    tm = _tiny(family)
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode([_sample(tm, 0), _sample(tm, 1)])
    g, ids = batch.groups, batch.inputs["input_ids"]
    pre = g.length - ids.shape[1]  # positions the model runs before the ids (GIT's prepended image), in the groups
    assert pre == 0 or bool(g["image"][:, :pre].all())
    for i in range(2):
        assert _text(tm, ids[i][g["context"][i, pre:]]) == CONTEXT
        assert _text(tm, ids[i][g["instruction"][i, pre:]]) == INSTRUCTION
        assert _text(tm, ids[i][g["question"][i, pre:]]) == QUESTION + " ok" * i
        assert int(g["last"][i].sum()) == 1 and bool(g["last"][i, -1])   # left padding: last column
        if "image" in tm.modalities and family != "mllama":
            assert int(g["image"][i].sum()) > 0
        assert not (g["image"][i] & g["text"][i]).any()


def test_template_places_the_instruction_after_the_question():
    tm = _tiny("qwen2_vl")
    tpl = "{image}Text context: {context}\n{question}\n{instruction}"
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode([_sample(tm, template=tpl)])
    g = batch.groups
    q, ins, img = (g[n][0].nonzero().flatten() for n in ("question", "instruction", "image"))
    assert img.max() < q.min() and q.max() < ins.min()
    assert _text(tm, batch.inputs["input_ids"][0][g["instruction"][0]]) == INSTRUCTION


def test_audio_path_is_read_and_needs_an_audio_placeholder(tmp_path):
    from scipy.io import wavfile

    tm = _tiny("qwen2_5_omni")
    rate = tm.processor.feature_extractor.sampling_rate
    wav = (tm.make_audio(0) * 32767).astype(np.int16)
    wavfile.write(tmp_path / "a.wav", rate, wav)
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode([_sample(tm, template="{image}{audio}{context} {instruction} {question}",
                                     audio=str(tmp_path / "a.wav"))])
        assert int(batch.groups["audio"][0].sum()) > 0
        with torch.no_grad():
            assert torch.isfinite(tm.model(**batch.inputs).logits).all()
        with pytest.raises(DataError, match="audio"):
            lens.encode([_sample(tm, template="{image}{context} {instruction} {question}",
                                 audio=str(tmp_path / "a.wav"))])


def test_mixed_image_and_text_only_batch_is_refused():
    tm = _tiny("llava")
    a, b = _sample(tm, 0), _sample(tm, 1)
    b.image = None
    with arbiter.attach(tm.model, tm.processor) as lens, pytest.raises(DataError, match="separately"):
        lens.encode([a, b])
