"""The families of arbiter/testing/tiny_extra.py: each builds offline and deterministically, runs, and its
real processor agrees with its model (placeholders, left padding, the image / audio reaching the logits)."""

from __future__ import annotations

import importlib

import pytest
import torch

from arbiter.testing import FAMILIES, TinyModel
from helpers import check_deterministic_in_seed
from helpers import _tiny as _zoo
from helpers import forward_logits as _forward
from arbiter.testing.tiny_extra import FAMILIES as EXTRA

tiny_module = importlib.import_module("arbiter.testing.tiny")  # (``arbiter.testing.tiny`` is the function)
NEW = list(EXTRA)
PROMPT = "What colour is the shape in the image?"


def _modality(tm: TinyModel) -> str:
    return "image" if "image" in tm.modalities else "audio"


def _token_id(tm: TinyModel, modality: str) -> int:
    cfg = tm.model.config
    for name in (f"{modality}_token_id", f"{modality}_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise AssertionError(f"{tm.family}: config has no {modality} token id")


def _expected_count(tm: TinyModel, modality: str) -> int:
    return tm.image_tokens_per_image if modality == "image" else tm.audio_tokens_per_clip


def _seeds(tm: TinyModel, seeds) -> dict:
    return {f"{_modality(tm)}_seeds": seeds}


def test_registered():
    assert set(NEW) == {"qwen3_vl", "mistral3", "llava_onevision", "glm4v", "qwen2_audio", "gemma4"}
    for family in NEW:
        assert family in FAMILIES and FAMILIES[family] == EXTRA[family]
        assert family in tiny_module.FAMILY_BUILDERS
    # the families of tiny.py and tiny_more.py are still there
    assert {"llava", "qwen2_vl", "mllama", "gemma3n", "qwen3_5", "kosmos2"} <= set(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW)
def test_deterministic_in_seed(family):
    assert check_deterministic_in_seed(family, PROMPT) > 0


@pytest.mark.parametrize("family", NEW)
def test_forward_finite(family):
    tm = _zoo(family)
    assert not tm.model.training
    assert type(tm.model).__name__ == EXTRA[family].split()[0]
    assert tm.model.config._attn_implementation == "sdpa"
    inputs = tm.inputs(tm.prompt(PROMPT))
    logits = _forward(tm, inputs)
    vocab = tm.model.config.get_text_config().vocab_size
    assert logits.shape == (1, inputs["input_ids"].shape[1], vocab)  # one row per input id
    assert vocab >= len(tm.tokenizer)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0
    text = tm.model.config.get_text_config()
    assert text.hidden_size == 64 and text.num_hidden_layers == 4 and text.num_attention_heads == 4


@pytest.mark.parametrize("family", NEW)
def test_input_changes_last_logits(family):
    tm = _zoo(family)
    prompt = tm.prompt(PROMPT)
    base = _forward(tm, tm.inputs(prompt, **_seeds(tm, 0)))[0, -1]
    other = _forward(tm, tm.inputs(prompt, **_seeds(tm, 1)))[0, -1]
    assert (base - other).abs().max() > 1e-4, f"the {_modality(tm)} does not reach the logits"
    again = _forward(tm, tm.inputs(prompt, **_seeds(tm, 0)))[0, -1]
    torch.testing.assert_close(base, again, atol=0, rtol=0)


@pytest.mark.parametrize("family", NEW)
def test_placeholder_token_count(family):
    tm = _zoo(family)
    modality = _modality(tm)
    inputs = tm.inputs(tm.prompt("Describe the image."))
    ids = inputs["input_ids"]
    token_id = _token_id(tm, modality)
    expected = _expected_count(tm, modality)
    assert expected and expected > 0
    assert int((ids == token_id).sum()) == expected
    token = tm.tokenizer.convert_ids_to_tokens(token_id)
    assert tm.tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
    # the model consumes exactly that many placeholders: one fewer is refused
    logits = _forward(tm, inputs)
    assert logits.shape[1] == ids.shape[1]
    pos = (ids[0] == token_id).nonzero()[:, 0]
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[pos[-1]] = False
    cut = {k: (v[:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids") else v)
           for k, v in inputs.items()}
    with pytest.raises(Exception):
        _forward(tm, cut)


@pytest.mark.parametrize("family", NEW)
def test_padded_batch(family):
    tm = _zoo(family)
    tok = tm.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        prompts = [tm.prompt("What colour?"), tm.prompt("What colour is the big shape in the picture?")]
        batch = tm.inputs(prompts, padding=True, **_seeds(tm, (0, 1)))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape[0] == 2
        n_short = int(mask[0].sum())
        assert n_short < ids.shape[1] and int(mask[1].sum()) == ids.shape[1]
        assert ids[0, 0] == tok.pad_token_id and mask[0, 0] == 0 and ids[1, -1] != tok.pad_token_id
        logits = _forward(tm, batch)
        assert torch.isfinite(logits).all()
        alone_inputs = tm.inputs(prompts[0], **_seeds(tm, 0))
        alone = _forward(tm, alone_inputs)
        assert int(alone_inputs["input_ids"].shape[1]) == n_short
        torch.testing.assert_close(logits[0, -1], alone[0, -1], atol=2e-4, rtol=1e-3)
        longer = _forward(tm, tm.inputs(prompts[1], **_seeds(tm, 1)))
        torch.testing.assert_close(logits[1, -1], longer[0, -1], atol=2e-4, rtol=1e-3)
    finally:
        tok.padding_side = old


def _tokens(tm: TinyModel, inputs) -> list[str]:
    return tm.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())


def test_family_layouts():
    # Qwen3-VL: one DeepStack merger per listed vision block
    tm = _zoo("qwen3_vl")
    visual = tm.model.model.visual
    assert len(visual.deepstack_merger_list) == len(tm.config.vision_config.deepstack_visual_indexes) >= 1
    assert tm.config.text_config.num_key_value_heads == 2
    # Mistral 3: t rows of [IMG] * t, separated by [IMG_BREAK], closed by [IMG_END]
    tm = _zoo("mistral3")
    toks = _tokens(tm, tm.inputs(tm.prompt("Hi")))
    t = int(round(tm.image_tokens_per_image**0.5))
    assert toks[:2] == ["<s>", "[INST]"] and toks.count("<s>") == 1
    assert toks.count("[IMG_BREAK]") == t - 1 and toks.count("[IMG_END]") == 1
    assert toks[toks.index("[IMG_END]") - 1] == "[IMG]"
    # GLM-4.1V: the placeholders between <|begin_of_image|> and <|end_of_image|>
    tm = _zoo("glm4v")
    toks = _tokens(tm, tm.inputs(tm.prompt("Hi")))
    a, b = toks.index("<|begin_of_image|>"), toks.index("<|end_of_image|>")
    assert toks[:2] == ["[gMASK]", "<sop>"] and b - a - 1 == tm.image_tokens_per_image
    assert tm.config.text_config.rope_parameters["partial_rotary_factor"] == 0.5
    # Qwen2-Audio: audio only, the placeholders between <|audio_bos|> and <|audio_eos|>
    tm = _zoo("qwen2_audio")
    assert tm.modalities == ("audio",) and tm.image_size is None and tm.sampling_rate == 16000
    toks = _tokens(tm, tm.inputs(tm.prompt("Hi")))
    a, b = toks.index("<|audio_bos|>"), toks.index("<|audio_eos|>")
    assert b - a - 1 == tm.audio_tokens_per_clip == 25
    # Gemma 4: soft tokens between <|image> and <image|>; sliding and global layers, the last global
    tm = _zoo("gemma4")
    toks = _tokens(tm, tm.inputs(tm.prompt("Hi")))
    a, b = toks.index("<|image>"), toks.index("<image|>")
    assert toks[0] == "<bos>" and toks.count("<bos>") == 1 and b - a - 1 == tm.image_tokens_per_image
    text = tm.config.text_config
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    assert text.layer_types[-1] == "full_attention"
    table = tm.model.model.vision_tower.patch_embedder.position_embedding_table
    assert table.std() > 0  # re-drawn: initialised to ones
