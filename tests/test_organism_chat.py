"""The chat organism (llava_chat): loads offline, its chat format, its training data keeps held-out wordings out,
its answers are scored as the model would say them, and its training recipe is bit-reproducible."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from arbiter.data import FORMAT_CONSTRAINT, TEXT_INSTRUCTIONS, VISION_INSTRUCTIONS, AnswerDictionary, generate_synthetic
from arbiter.organisms import evaluate, load

NAME = "llava_chat"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def organism():
    return load(NAME)


def test_loads_offline_with_its_shapes_and_heads(organism):
    model, processor, ds = organism
    text = model.config.text_config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (8, 8, 4)
    assert text.hidden_size == 128 and text.vocab_size == len(processor.tokenizer) == 1549
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert ds.meta["chat"]["form"] == "word" and len(ds) == 200
    # one forward: 16 image tokens, a logit row per vocabulary id
    batch = processor(text=[ds[0].template.replace("{image}", "<image>\n").format(
        context=ds[0].context, instruction=ds[0].instruction, question=ds[0].question)],
        images=[[ds[0].load_image()]], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_index).sum()) == 16
    with torch.no_grad():
        assert model(**batch).logits.shape[-1] == 1549


def test_chat_template_has_system_user_and_assistant_turns(organism):
    _, processor, _ = organism
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    out = processor.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
    assert out == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = processor.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert all(i in processor.tokenizer.all_special_ids for i in ids)


def test_shipped_prompt_equals_the_chat_template_rendering(organism):
    """A shipped sample (instruction before the question) encodes to the same ids as the same sample without a
    template, which arbiter renders through the processor's chat template."""
    import arbiter

    model, processor, ds = organism
    s = next(x for x in ds if x.extra["position"] == "between")
    with arbiter.attach(model, processor) as lens:
        a = lens.encode([s]).inputs["input_ids"]
        b = lens.encode([dataclasses.replace(s, template=None)]).inputs["input_ids"]
    assert torch.equal(a, b)
    after = next(x for x in ds if x.extra["position"] == "after_question")
    assert after.template.index("{question}") < after.template.index("{instruction}")


def test_answers_word_and_sentence_forms_share_prefix_until_the_value():
    from arbiter.organisms.train_chat import SENTENCE_PREFIX, answer_of

    assert answer_of("colour", "red", short=True) == "Red"
    assert answer_of("colour", "red", short=False) == "The colour is red."
    assert answer_of("shape", "star", short=False) == "It is a star."
    for attr, a, b in (("colour", "red", "blue"), ("shape", "circle", "cross")):
        assert answer_of(attr, a, False).startswith(SENTENCE_PREFIX[attr] + " ")
        assert answer_of(attr, b, False).startswith(SENTENCE_PREFIX[attr] + " ")


def _composer(tmp_path, seed=0):
    from arbiter.organisms.train import pool_item
    from arbiter.organisms.train_chat import ChatComposer, _parser

    pool = generate_synthetic(tmp_path / "pool", 24, seed=1, image_size=56, paraphrases="train",
                              p_agreement=0.0, p_noisy=0.1)
    args = _parser().parse_args(["--out", str(tmp_path / "x")])
    return ChatComposer([pool_item(s) for s in pool], np.random.default_rng(seed), args)


def test_training_conversations_never_hold_a_heldout_wording(tmp_path):
    from arbiter.organisms.instructions import NEUTRAL_INSTRUCTIONS, canonical

    comp = _composer(tmp_path)
    heldout = {canonical(i.text) for i in VISION_INSTRUCTIONS + TEXT_INSTRUCTIONS if i.heldout}
    seen, kinds = set(), set()
    for k in range(600):
        units = comp.conflict_pair(k % 24) + [comp.text_qa(k % 24), comp.instr_read(k % 24), comp.image_qa(k % 24)]
        for u in units:
            kinds.add(u.kind)
            instr = u.sample.instruction.replace(FORMAT_CONSTRAINT, "").strip()
            if instr:
                seen.add(instr)
                assert canonical(instr) not in heldout, instr
    assert {"conflict", "agree", "agree_neutral", "text_qa", "instr_read", "image_qa"} <= kinds
    assert set(NEUTRAL_INSTRUCTIONS) & seen  # neutral wordings are in the mixture
    assert len(seen) > 200  # the grammar, not a handful of strings


def test_conflict_pairs_are_twins_instructed_the_other_way(tmp_path):
    comp = _composer(tmp_path, seed=3)
    pairs = [comp.conflict_pair(i) for i in range(24)]
    twins = [p for p in pairs if len(p) == 2]
    assert twins
    for a, b in twins:
        assert {a.sample.target, b.sample.target} == {"vision", "text"}
        assert (a.sample.context, a.sample.question, a.sample.template) == (b.sample.context, b.sample.question,
                                                                            b.sample.template)
        if a.sample.conflict:
            assert a.answer != b.answer


def test_dictionary_match_counts_the_greedy_token_by_hand(organism):
    """evaluate(match="dictionary"): follows = the plain forward's argmax is a first token of a compliant form."""
    import arbiter

    model, processor, ds = organism
    samples = [s for s in ds if s.conflict][:12]
    res = evaluate(model, processor, ds, samples=samples, match="dictionary")
    tok = processor.tokenizer
    hits = {"vision": [], "text": []}
    with arbiter.attach(model, processor) as lens:
        prompts = [lens.encode([s], dataset=ds).prompts[0] for s in samples]
    for s, p in zip(samples, prompts):
        inp = processor(text=[p], images=[[s.load_image()]], return_tensors="pt")
        with torch.no_grad():
            top = int(model(**inp).logits[0, -1].argmax())
        hits[s.target].append(top in AnswerDictionary.for_sample(tok, s).ids_p)
    for t in ("vision", "text"):
        assert res[f"{t}_conflict"] == pytest.approx(sum(hits[t]) / len(hits[t]), abs=1e-4)


@pytest.mark.slow
def test_shipped_organism_follows_instructions_and_looks_at_the_image(organism):
    model, processor, ds = organism
    clean = evaluate(model, processor, ds, match="dictionary")
    assert clean["vision_conflict"] >= 0.9 and clean["text_conflict"] >= 0.9, clean
    knocked = evaluate(model, processor, ds, knockout=True, match="dictionary")
    assert knocked["vision_conflict"] < 0.4, knocked
    assert knocked["text_conflict"] >= 0.8, knocked


@pytest.mark.slow
def test_short_training_run_is_bit_reproducible(tmp_path):
    from arbiter.organisms.train_chat import main

    args = ["--n-pool", "48", "--vision-steps", "3", "--vision-batch", "8", "--text-steps", "3", "--align-steps",
            "2", "--steps", "4", "--batch", "8", "--n-data", "8", "--no-eval", "--log-every", "2"]
    digests = []
    for run in ("a", "b"):
        main(["--out", str(tmp_path / run)] + args)
        digests.append(hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert (tmp_path / "a" / "data" / "data.jsonl").read_bytes() == (tmp_path / "b" / "data" / "data.jsonl").read_bytes()
