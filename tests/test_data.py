"""Tests of arbiter.data: loader and its errors, prompt parts and spans, answer dictionary,
normalisation and the synthetic generator."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from arbiter.data import (
    COLOUR_RGB,
    COLOURS,
    DEFAULT_USER_TURN,
    FORMAT_CONSTRAINT,
    IA_TEXT_INSTRUCTION,
    IA_VISION_INSTRUCTION,
    PART_NAMES,
    POSITION_TEMPLATES,
    SHAPES,
    TEXT_INSTRUCTIONS,
    VISION_INSTRUCTIONS,
    AnswerDictionary,
    ConflictDataset,
    ConflictSample,
    build_prompt_parts,
    generate_synthetic,
    load_jsonl,
    normalise_answer,
    prompt_spans,
    synthetic_vocabulary,
)
from arbiter.errors import ArbiterError, DataError

# --------------------------------------------------------------------------------------------------
# helpers


def _write_image(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format="PNG")
    return path


def _sample(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": "s1",
        "context": "The ball is blue.",
        "instruction": IA_VISION_INSTRUCTION,
        "question": "What colour is the ball?",
        "target": "vision",
        "answer_vision": "red",
        "answer_text": "blue",
    }
    d.update(over)
    return d


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _tokenizer(words: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")


# --------------------------------------------------------------------------------------------------
# loader


def test_load_happy_path(tmp_path: Path) -> None:
    _write_image(tmp_path / "img" / "a.png")
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"arbiter_dataset": 1, "template": "{image}\nQ: {question}\n{context}\n{instruction}", "note": "x"},
            _sample(image="img/a.png", aliases_vision=["crimson"], source="mc2"),
            "",
            _sample(
                id="s2", target="text", answer_vision="cat", answer_text="cat", conflict=False,
                template="{question} {instruction} {context}",
            ),
            _sample(id=3, target="text"),
        ],
    )
    ds = load_jsonl(path)
    assert isinstance(ds, ConflictDataset)
    assert len(ds) == 3
    assert [s.id for s in ds] == ["s1", "s2", "3"]
    assert ds.template == "{image}\nQ: {question}\n{context}\n{instruction}"
    assert ds.labels is None
    assert ds.meta == {"note": "x"}
    assert ds.path == path
    s1, s2, s3 = ds
    assert s1.image == str((tmp_path / "img" / "a.png").resolve())
    assert s1.aliases_vision == ["crimson"] and s1.aliases_text == []
    assert s1.extra == {"source": "mc2"}
    assert s1.conflict is True
    assert s1.answer_compliant == "red" and s1.answer_competitor == "blue"
    assert s1.forms_compliant == ["red", "crimson"] and s1.forms_competitor == ["blue"]
    assert s3.answer_compliant == "blue" and s3.answer_competitor == "red"
    assert s2.conflict is False and s2.image is None
    assert ds.template_for(s1) == ds.template
    assert ds.template_for(s2) == "{question} {instruction} {context}"
    img = s1.load_image()
    assert img.mode == "RGB" and img.size == (8, 8) and img.getpixel((0, 0)) == (200, 10, 10)
    assert ds[1] is s2
    assert isinstance(ds[0:2], ConflictDataset) and len(ds[0:2]) == 2 and ds[0:2].template == ds.template
    assert ds.by_id("3") is s3


def test_labels_header(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"arbiter_dataset": 1, "labels": ["happy", "sad"]}, _sample(label="sad")],
    )
    ds = load_jsonl(path)
    assert ds.labels == ["happy", "sad"] and ds[0].label == "sad"


BAD_IMAGE = "BAD_IMAGE"


@pytest.mark.parametrize(
    ("rows", "line", "needle"),
    [
        ([_sample(), '{"id": "s2", "context": '], 2, "invalid JSON"),
        ([_sample(), "[1, 2]"], 2, "JSON object"),
        ([_sample(), _sample(id="s2"), {k: v for k, v in _sample(id="s3").items() if k != "question"}], 3, "'question'"),
        ([{"arbiter_dataset": 1}, _sample(target="audio")], 2, "'target'"),
        ([_sample(answer_text="Red.")], 1, "'answer_vision' and 'answer_text'"),
        ([_sample(), _sample(id="s2"), _sample()], 3, "duplicate id 's1' (first used on line 1)"),
        ([_sample(image="missing.png")], 1, "'image'"),
        ([_sample(image=BAD_IMAGE)], 1, "cannot read"),
        ([{"arbiter_dataset": 2}, _sample()], 1, "bad header"),
        ([_sample(), {"arbiter_dataset": 1}], 2, "bad header"),
        ([{"arbiter_dataset": 1, "labels": "happy"}], 1, "'labels'"),
        ([{"arbiter_dataset": 1, "template": "{image} {instructions}"}], 1, "{instructions}"),
        ([_sample(template="{question} {contxt}")], 1, "{contxt}"),
        ([_sample(context=3)], 1, "'context'"),
        ([_sample(conflict="yes")], 1, "'conflict'"),
        ([_sample(aliases_text="navy")], 1, "'aliases_text'"),
        ([_sample(answer_vision="  ")], 1, "'answer_vision'"),
        ([{"arbiter_dataset": 1, "labels": ["a", "b"]}, _sample(label="a"), _sample(id="s2", label="c")], 3, "'label'"),
        ([{"arbiter_dataset": 1, "labels": ["a", "b"]}, _sample()], 2, "'label'"),
        ([_sample(image="ok.png", template="{question}")], 1, "{image}"),
    ],
)
def test_load_errors(tmp_path: Path, rows: list[Any], line: int, needle: str) -> None:
    _write_image(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    rows = [_sample(image="bad.png") if isinstance(r, dict) and r.get("image") == BAD_IMAGE else r for r in rows]
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    msg = str(info.value)
    assert f"{path}:{line}:" in msg
    assert needle in msg
    assert isinstance(info.value, ArbiterError) and isinstance(info.value, ValueError)


def test_missing_field_names_field_and_sample(tmp_path: Path) -> None:
    row = _sample()
    del row["answer_text"]
    path = _write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing required field 'answer_text' \(sample 's1'\)"):
        load_jsonl(path)


def test_missing_file_and_skip_image_check(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    path = _write_jsonl(tmp_path / "d.jsonl", [_sample(image="bad.png")])
    ds = load_jsonl(path, check_images=False)  # exists, so only the PIL check is skipped
    with pytest.raises(DataError, match=r"sample 's1': cannot read image .*bad\.png"):
        ds[0].load_image()


def test_load_image_errors() -> None:
    s = ConflictSample(**_sample())
    with pytest.raises(DataError, match="no image"):
        s.load_image()
    s.image = Image.new("L", (4, 4), 7)
    assert s.load_image().mode == "RGB" and s.load_image().getpixel((1, 1)) == (7, 7, 7)


def test_to_dict_and_save_roundtrip(tmp_path: Path) -> None:
    _write_image(tmp_path / "src" / "img" / "a.png", (1, 2, 3))
    src = _write_jsonl(
        tmp_path / "src" / "data.jsonl",
        [{"arbiter_dataset": 1, "labels": ["x", "y"]}, _sample(image="img/a.png", label="x", extra_key=[1, 2])],
    )
    ds = load_jsonl(src)
    d = ds[0].to_dict(relative_to=tmp_path / "src")
    assert d["image"] == "img/a.png" and d["extra_key"] == [1, 2] and d["label"] == "x"
    assert "conflict" not in d and "aliases_vision" not in d and "template" not in d
    assert list(d)[:7] == ["id", "context", "instruction", "question", "target", "answer_vision", "answer_text"]
    mem = ConflictSample(**_sample(id="m/1", label="y"), image=Image.new("RGB", (5, 5), (9, 9, 9)))
    both = ConflictDataset([*ds, mem], labels=ds.labels)
    out = both.save_jsonl(tmp_path / "out" / "copy.jsonl")
    lines = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"arbiter_dataset": 1, "labels": ["x", "y"]}
    assert json.loads(lines[1])["image"] == "../src/img/a.png"
    assert json.loads(lines[2])["image"] == "copy_images/m_1.png"
    back = load_jsonl(out)
    assert [s.id for s in back] == ["s1", "m/1"]
    assert back[0].load_image().getpixel((0, 0)) == (1, 2, 3)
    assert back[1].load_image().getpixel((0, 0)) == (9, 9, 9)
    assert back[0].extra == {"extra_key": [1, 2]}


def test_save_rejects_in_memory_audio(tmp_path: Path) -> None:
    ds = ConflictDataset([ConflictSample(**_sample(), audio=np.zeros(10))])
    with pytest.raises(DataError, match="in-memory audio"):
        ds.save_jsonl(tmp_path / "a.jsonl")


def test_dataset_duplicate_ids_and_filter() -> None:
    a = ConflictSample(**_sample(id="a"))
    b = ConflictSample(**_sample(id="b", target="text"))
    c = ConflictSample(**_sample(id="c", target="text", answer_text="red", conflict=False))
    with pytest.raises(DataError, match="duplicate sample id 'a'"):
        ConflictDataset([a, a])
    ds = ConflictDataset([a, b, c], template="{question}")
    assert [s.id for s in ds.filter(target="text")] == ["b", "c"]
    assert [s.id for s in ds.filter(conflict=True)] == ["a", "b"]
    assert [s.id for s in ds.filter(target="text", conflict=False)] == ["c"]
    assert [s.id for s in ds.filter(predicate=lambda s: s.id != "a")] == ["b", "c"]
    assert ds.filter(target="vision").template == "{question}"
    with pytest.raises(DataError):
        ds.filter(target="image")


# --------------------------------------------------------------------------------------------------
# prompt parts and spans


def test_default_prompt_parts() -> None:
    s = ConflictSample(**_sample(instruction=IA_TEXT_INSTRUCTION + " " + FORMAT_CONSTRAINT), image="x.png")
    parts = build_prompt_parts(s, None)
    assert parts == [
        ("image", ""),
        ("literal", "Text context: "),
        ("context", "The ball is blue."),
        ("literal", "\n"),
        ("instruction", IA_TEXT_INSTRUCTION),
        ("literal", " "),
        ("constraint", FORMAT_CONSTRAINT),
        ("literal", "\n"),
        ("question", "What colour is the ball?"),
    ]
    text, spans = prompt_spans(parts)
    expected = DEFAULT_USER_TURN.format(
        context="The ball is blue.", instruction=s.instruction, question="What colour is the ball?"
    )
    assert text == expected
    assert spans["image"] == [(0, 0)]
    assert text[slice(*spans["constraint"][0])] == FORMAT_CONSTRAINT
    assert text[slice(*spans["instruction"][0])] == IA_TEXT_INSTRUCTION
    assert len(spans["literal"]) == 4
    # no image: no image segment
    s.image = None
    assert [n for n, _ in build_prompt_parts(s)][0] == "literal"


def test_templated_prompt_parts_and_placeholders() -> None:
    s = ConflictSample(**_sample(instruction="Trust the image.", template="{image}Q: {question} [{instruction}] {ctx}"))
    s.image = "x.png"
    parts = build_prompt_parts(s)  # falls back to sample.template; {ctx} is not a placeholder: literal
    assert parts == [
        ("image", ""),
        ("literal", "Q: "),
        ("question", "What colour is the ball?"),
        ("literal", " ["),
        ("instruction", "Trust the image."),
        ("literal", "] {ctx}"),
    ]
    text, spans = prompt_spans(parts, placeholders={"image": "<image>"})
    assert text == "<image>Q: What colour is the ball? [Trust the image.] {ctx}"
    assert spans["image"] == [(0, 7)]
    assert text[slice(*spans["question"][0])] == "What colour is the ball?"
    # an explicit template wins over the sample's
    parts2 = build_prompt_parts(s, "{context}|{question}")
    assert prompt_spans(parts2)[0] == "The ball is blue.|What colour is the ball?"
    # the constraint alone, also in the question
    s2 = ConflictSample(**_sample(instruction=FORMAT_CONSTRAINT, question="Colour? " + FORMAT_CONSTRAINT + "\n"))
    parts3 = build_prompt_parts(s2, "{instruction}#{question}")
    assert parts3 == [
        ("constraint", FORMAT_CONSTRAINT),
        ("literal", "#"),
        ("question", "Colour?"),
        ("literal", " "),
        ("constraint", FORMAT_CONSTRAINT),
        ("literal", "\n"),
    ]


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="{}"), max_size=30)


@given(st.lists(st.tuples(st.sampled_from(PART_NAMES), st.text(max_size=20)), max_size=12))
def test_prompt_spans_recovers_segments(parts: list[tuple[str, str]]) -> None:
    text, spans = prompt_spans(parts)
    assert text == "".join(t for _, t in parts)
    cursor = {name: 0 for name in spans}
    for name, seg in parts:
        start, end = spans[name][cursor[name]]
        cursor[name] += 1
        assert text[start:end] == seg
    assert sum(len(v) for v in spans.values()) == len(parts)


@settings(max_examples=60)
@given(
    context=_text,
    instruction=_text,
    question=_text,
    constraint=st.booleans(),
    position=st.sampled_from(sorted(POSITION_TEMPLATES)),
)
def test_build_prompt_parts_matches_template(
    context: str, instruction: str, question: str, constraint: bool, position: str
) -> None:
    if constraint:
        instruction = instruction + " " + FORMAT_CONSTRAINT
    s = ConflictSample(**_sample(context=context, instruction=instruction, question=question), image="x.png")
    template = POSITION_TEMPLATES[position]
    parts = build_prompt_parts(s, template)
    text, spans = prompt_spans(parts)
    assert text == template.format(image="", context=context, instruction=instruction, question=question)
    for name, seg in parts:
        assert name in PART_NAMES
        if name not in ("image", "literal"):
            assert seg
    if constraint:
        assert [text[a:b] for a, b in spans["constraint"]][0] == FORMAT_CONSTRAINT


# --------------------------------------------------------------------------------------------------
# answer dictionary


def test_answer_dictionary_ids_and_shared_removed() -> None:
    tok = _tokenizer(["red", "Red", "crimson", "blue", "Blue", "navy", "dark", "Dark"])
    v = tok.get_vocab()
    d = AnswerDictionary.build(tok, ["red", "crimson", "dark red"], ["Blue", "dark blue", "teal"], sample_id="s9")
    # "dark red" and "dark blue" both start with "dark"/"Dark": removed; "teal" and "Crimson" are unknown: skipped
    assert d.ids_p == sorted([v["red"], v["Red"], v["crimson"]])
    assert d.ids_c == sorted([v["blue"], v["Blue"]])
    assert d.shared == sorted([v["dark"], v["Dark"]])
    assert d.tensor_p().dtype.is_floating_point is False and d.tensor_p().tolist() == d.ids_p
    assert d.tensor_c().tolist() == d.ids_c
    assert d.to_dict()["forms_c"] == ["Blue", "dark blue", "teal"]
    assert v["[UNK]"] not in d.ids_p + d.ids_c and v["[BOS]"] not in d.ids_p + d.ids_c


def test_answer_dictionary_for_sample_and_errors() -> None:
    tok = _tokenizer(["red", "blue", "navy", "dark"])
    v = tok.get_vocab()
    s = ConflictSample(**_sample(target="text", aliases_text=["navy"]))
    d = AnswerDictionary.for_sample(tok, s)
    assert d.ids_p == sorted([v["blue"], v["navy"]]) and d.ids_c == [v["red"]]
    assert d.forms_p == ["blue", "navy"] and d.forms_c == ["red"]
    with pytest.raises(DataError) as info:
        AnswerDictionary.for_sample(tok, ConflictSample(**_sample(answer_vision="dark red", answer_text="dark blue")))
    msg = str(info.value)
    assert "sample 's1'" in msg and "'dark red'" in msg and "'dark blue'" in msg and "D_p" in msg
    with pytest.raises(DataError, match="D_c"):
        AnswerDictionary.build(tok, ["red"], ["purple"])
    agree = ConflictSample(**_sample(answer_text="red", conflict=False))
    d2 = AnswerDictionary.for_sample(tok, agree)  # equal answers: D_p kept, D_c empty
    assert d2.ids_p == [v["red"]] and d2.ids_c == [] and d2.forms_c == []


def test_answer_dictionary_agreement_sample() -> None:
    tok = _tokenizer(["red", "scarlet"])
    agree = ConflictSample(**_sample(answer_text="red", aliases_vision=["scarlet"], conflict=False))
    d = AnswerDictionary.for_sample(tok, agree)
    v = tok.get_vocab()
    assert d.ids_p == sorted([v["red"], v["scarlet"]]) and d.ids_c == []
    # an agreement sample with two different true answers keeps both sets
    both = ConflictSample(**_sample(answer_text="scarlet", conflict=False))
    d2 = AnswerDictionary.for_sample(tok, both)
    assert d2.ids_p == [v["red"]] and d2.ids_c == [v["scarlet"]]


# --------------------------------------------------------------------------------------------------
# normalisation


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("Red.", "red"), ("  The Red-Circle! ", "the redcircle"), ("BLUE\n", "blue"), ("«Dark   blue»", "dark blue"), ("", "")],
)
def test_normalise_answer(raw: str, norm: str) -> None:
    assert normalise_answer(raw) == norm


def test_one_normaliser_serves_data_and_mfr() -> None:
    from arbiter.metrics import normalise

    assert normalise is normalise_answer
    assert normalise_answer("ＲＥＤ") == "red"          # full-width letters: NFKC folds them, everywhere


# --------------------------------------------------------------------------------------------------
# synthetic generator


def test_instruction_lists() -> None:
    for lst, ia in ((VISION_INSTRUCTIONS, IA_VISION_INSTRUCTION), (TEXT_INSTRUCTIONS, IA_TEXT_INSTRUCTION)):
        assert lst[0].text == ia and not lst[0].heldout
        assert len(lst) >= 6 + 1
        assert sum(x.heldout for x in lst) == 2
        assert len({x.text for x in lst}) == len(lst)
    assert set(COLOUR_RGB) == set(COLOURS)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ConflictDataset]:
    out = tmp_path_factory.mktemp("synth")
    return out, generate_synthetic(out, 40, seed=3)


def _read_all(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_generator_deterministic(tmp_path: Path, synth: tuple[Path, ConflictDataset]) -> None:
    out, _ = synth
    again = tmp_path / "again"
    generate_synthetic(again, 40, seed=3)
    a, b = _read_all(out), _read_all(again)
    assert a == b
    assert len(a) == 41
    other = tmp_path / "other"
    generate_synthetic(other, 40, seed=4)
    assert _read_all(other)["data.jsonl"] != a["data.jsonl"]


def test_generator_content(synth: tuple[Path, ConflictDataset]) -> None:
    out, ds = synth
    assert len(ds) == 40 and ds.path == out / "data.jsonl" and ds.template is None
    assert ds.meta["generator"]["seed"] == 3
    assert Counter(s.target for s in ds) == {"vision": 20, "text": 20}
    assert Counter(s.extra["position"] for s in ds) == {"before_image": 14, "between": 13, "after_question": 13}
    assert Counter(s.extra["attribute"] for s in ds) == {"colour": 20, "shape": 20}
    assert sum(not s.conflict for s in ds) == 6  # round(0.15 * 40)
    assert sum(s.extra["noisy"] for s in ds) == 4
    reloaded = load_jsonl(out / "data.jsonl")
    assert [s.to_dict() for s in reloaded] == [s.to_dict() for s in ds]
    for s in ds:
        assert s.template == POSITION_TEMPLATES[s.extra["position"]]
        assert s.instruction.endswith(" " + FORMAT_CONSTRAINT)
        pool = VISION_INSTRUCTIONS if s.target == "vision" else TEXT_INSTRUCTIONS
        assert s.instruction == pool[s.extra["instruction_index"]].text + " " + FORMAT_CONSTRAINT
        assert not s.extra["heldout"]
        assert (s.answer_vision != s.answer_text) == s.conflict
        vocab = COLOURS if s.extra["attribute"] == "colour" else SHAPES
        assert s.answer_vision in vocab and s.answer_text in vocab
        assert s.answer_text in s.context
        img = s.load_image()
        assert img.size == (64, 64) and img.mode == "RGB"
        if s.extra["attribute"] == "colour" and not s.extra["noisy"]:
            counts = Counter(map(tuple, np.asarray(img).reshape(-1, 3).tolist()))
            counts.pop((224, 224, 224), None)
            assert counts.most_common(1)[0][0] == COLOUR_RGB[s.answer_vision]
        parts = build_prompt_parts(s, ds.template_for(s))
        names = [n for n, _ in parts]
        assert {"image", "context", "instruction", "constraint", "question"} <= set(names)
        order = {"before_image": ["instruction", "image"], "between": ["context", "instruction", "question"],
                 "after_question": ["question", "instruction"]}[s.extra["position"]]
        assert [n for n in names if n in order] == order


def test_generator_vocabulary_covers_prompts(synth: tuple[Path, ConflictDataset]) -> None:
    _, ds = synth
    tok = _tokenizer(synthetic_vocabulary())
    unk = tok.unk_token_id
    for s in ds:
        text, _ = prompt_spans(build_prompt_parts(s, ds.template_for(s)))
        assert unk not in tok.encode(text, add_special_tokens=False), text
        d = AnswerDictionary.for_sample(tok, s)
        assert d.ids_p
        if s.conflict:
            assert d.ids_c


def test_generator_paraphrase_splits(tmp_path: Path) -> None:
    held = generate_synthetic(tmp_path / "h", 24, seed=1, paraphrases="heldout", p_noisy=0.0, constraint=False)
    held_texts = {x.text for x in VISION_INSTRUCTIONS + TEXT_INSTRUCTIONS if x.heldout}
    assert all(s.instruction in held_texts and s.extra["heldout"] for s in held)
    train = generate_synthetic(tmp_path / "t", 60, seed=1, paraphrases="train", image_size=16)
    assert not any(s.instruction.removesuffix(" " + FORMAT_CONSTRAINT) in held_texts for s in train)
    allp = generate_synthetic(
        tmp_path / "a", 30, seed=2, paraphrases="all", positions=("between",), p_agreement=0.0,
        colours=("red", "blue"), shapes=("circle", "star"), attributes=("colour",),
    )
    assert all(s.conflict and {s.answer_vision, s.answer_text} == {"red", "blue"} for s in allp)
    assert {s.extra["position"] for s in allp} == {"between"}


def test_generator_labels_are_the_compliant_answers_of_the_same_samples(tmp_path: Path) -> None:
    plain = generate_synthetic(tmp_path / "plain", 30, seed=5, image_size=16)
    lab = generate_synthetic(tmp_path / "lab", 30, seed=5, image_size=16, labels=True)
    assert plain.labels is None and all(s.label is None for s in plain)
    assert lab.labels == [*COLOURS, *SHAPES]
    assert [s.label for s in lab] == [s.answer_vision if s.target == "vision" else s.answer_text for s in plain]
    assert [{**s.to_dict(), "image": None} for s in plain] == [
        {k: v for k, v in {**s.to_dict(), "image": None}.items() if k != "label"} for s in lab]
    assert _read_all(tmp_path / "plain")["images/syn-00007.png"] == _read_all(tmp_path / "lab")["images/syn-00007.png"]
    assert load_jsonl(tmp_path / "lab" / "data.jsonl").labels == lab.labels
    colour = generate_synthetic(tmp_path / "c", 6, seed=5, image_size=16, attributes=("colour",), colours=("red", "blue"),
                                labels=True)
    assert colour.labels == ["red", "blue"] and {s.label for s in colour} <= {"red", "blue"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"paraphrases": "test"},
        {"positions": ("middle",)},
        {"colours": ("red", "mauve")},
        {"colours": ("red",)},
        {"p_agreement": 1.5},
        {"image_size": 4},
    ],
)
def test_generator_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"n": 4, **kwargs}
    with pytest.raises(DataError):
        generate_synthetic(tmp_path, **args)
