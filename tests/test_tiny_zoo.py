"""The tiny model zoo: every family builds offline, runs, and its processor agrees with its model."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from arbiter.testing import FAMILIES, TinyModel, tiny
from helpers import _tiny as _zoo, forward_logits as _forward, image_token_id as _image_token_id

MULTIMODAL = [f for f in FAMILIES if f not in ("llama", "qwen2", "gemma")]
TEXT_ONLY = [f for f in FAMILIES if f not in MULTIMODAL]
# families without an image placeholder token (their image positions: test_tiny_zoo_more.py::test_image_token_count)
NO_IMAGE_TOKEN = {
    "git": "GIT has no image token: the model prepends its image embeddings to the text embeddings",
    "kosmos2": "Kosmos-2's image positions hold ordinary token ids, marked by the processor's "
               "image_embeds_position_mask",
}
# GIT (tiny_more.py): eager attention only, image positions prepended to the text (the logits cover them too)
GIT_FORWARD = ("GIT implements eager attention only and its logits cover the image positions it prepends to the "
               "text (checked in test_tiny_zoo_more.py::test_forward_finite)")


def _inputs(tm: TinyModel, text: str | list[str], image_seeds=(0,), audio_seeds=(0,), **kw):
    """Processor inputs for one prompt (or a batch) with one image / audio clip per prompt."""
    return tm.inputs(text, image_seeds=list(image_seeds), audio_seeds=list(audio_seeds), **kw)


def test_families_listed():
    assert set(FAMILIES) >= {
        "llama", "qwen2", "gemma", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen2_5_omni",
        "gemma3", "gemma3n", "internvl", "idefics3", "smolvlm", "paligemma", "mllama",
    }  # fmt: skip
    with pytest.raises(KeyError):
        tiny("no_such_family")
    with pytest.raises(TypeError):
        tiny("llama", hiden=3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_finite(family):
    if family == "git":
        pytest.skip(GIT_FORWARD)
    if family == "florence2":
        pytest.skip("Florence-2 is an encoder-decoder: its logits are the decoder's, one row per decoder input, not "
                    "per input id (test_tiny_zoo_more.py checks its decoder logits)")
    tm = _zoo(family)
    assert not tm.model.training
    assert tm.model.config._attn_implementation == "sdpa"
    inputs = _inputs(tm, tm.prompt("What colour is the circle?"))
    logits = _forward(tm, inputs)
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert logits.shape[-1] == tm.model.config.get_text_config().vocab_size
    assert logits.shape[-1] >= len(tm.tokenizer)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", MULTIMODAL)
def test_modalities_change_logits(family):
    tm = _zoo(family)
    prompt = tm.prompt("What colour is the shape in the image?")
    base = _forward(tm, _inputs(tm, prompt))[0, -1]
    if "image" in tm.modalities:
        other_image = _forward(tm, _inputs(tm, prompt, image_seeds=(1,)))[0, -1]
        assert (base - other_image).abs().max() > 1e-4, "the image does not reach the logits"
    if "audio" in tm.modalities:
        other_audio = _forward(tm, _inputs(tm, prompt, audio_seeds=(1,)))[0, -1]
        assert (base - other_audio).abs().max() > 1e-4, "the audio does not reach the logits"


@pytest.mark.parametrize("family", MULTIMODAL)
def test_image_token_count(family):
    tm = _zoo(family)
    if "image" not in tm.modalities:
        pytest.skip(f"{family} takes no image (its audio count: test_tiny_zoo_extra.py)")
    inputs = _inputs(tm, tm.prompt("Describe the image."))
    if family == "git":
        pytest.skip(NO_IMAGE_TOKEN[family] + " (counted in test_tiny_zoo_more.py::test_image_token_count)")
    marked = inputs.get("image_embeds_position_mask")  # Kosmos-2: the processor marks the image positions
    n = int(marked.sum()) if marked is not None else int((inputs["input_ids"] == _image_token_id(tm)).sum())
    assert n == tm.image_tokens_per_image
    # and it is what the model consumes: the forward checks placeholders against features
    _forward(tm, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_left_padded_batch(family):
    if family == "git":
        pytest.skip("GIT's learned text positions ignore the attention mask (counted from the first column, pads "
                    "included), so left padding changes the shorter prompt's logits in the model itself; its "
                    "tokenizer pads on the right (test_tiny_zoo_more.py::test_padded_batch)")
    if family == "florence2":
        pytest.skip("Florence-2's BART positions ignore the attention mask and its tokenizer pads on the right "
                    "(test_tiny_zoo_more.py::test_padded_batch)")
    tm = _zoo(family)
    tok = tm.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        prompts = [tm.prompt("What colour?"), tm.prompt("What colour is the big shape in the picture?")]
        batch = _inputs(tm, prompts, image_seeds=(0, 1), audio_seeds=(0, 1), padding=True)
        ids = batch["input_ids"]
        assert ids.shape[0] == 2
        assert (ids[0, 0] == tok.pad_token_id) and (ids[1, -1] != tok.pad_token_id)
        logits = _forward(tm, batch)
        assert torch.isfinite(logits).all()
        # the shorter, left-padded prompt gives the same next-token logits as on its own
        alone = _forward(tm, _inputs(tm, prompts[0], image_seeds=(0,), audio_seeds=(0,)))
        torch.testing.assert_close(logits[0, -1], alone[0, -1], atol=2e-4, rtol=1e-3)
    finally:
        tok.padding_side = old


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_omni", "gemma3", "idefics3", "mllama"])
def test_processor_round_trip(family, tmp_path):
    from transformers import AutoProcessor

    tm = _zoo(family)
    tm.processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded) is type(tm.processor)
    prompt = tm.prompt("What colour is the circle?")
    a, b = _inputs(tm, prompt), _inputs(TinyModel(**{**tm.__dict__, "processor": loaded}), prompt)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    assert loaded.chat_template == tm.processor.chat_template is not None
    assert loaded.tokenizer.chat_template == tm.tokenizer.chat_template


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_model_round_trip(family, tmp_path):
    tm = _zoo(family)
    tm.model.save_pretrained(tmp_path)
    loaded = type(tm.model).from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    inputs = _inputs(tm, tm.prompt("What colour is the circle?"))
    torch.testing.assert_close(_forward(tm, inputs), _forward(TinyModel(loaded, tm.processor, family), inputs))


def test_deterministic_in_seed():
    a, b, c = tiny("llava", seed=3), tiny("llava", seed=3), tiny("llava", seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.tokenizer.get_vocab() == c.tokenizer.get_vocab()
    assert np.array_equal(np.asarray(a.make_image(5)), np.asarray(c.make_image(5)))
    assert not np.array_equal(np.asarray(a.make_image(5)), np.asarray(a.make_image(6)))


def test_zero_init_traps_reinitialised():
    gemma3 = _zoo("gemma3").model
    assert gemma3.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0
    mllama = _zoo("mllama").model
    gates = [p for n, p in mllama.named_parameters() if n.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate"))]
    assert gates and all(g.abs().min() > 0 for g in gates)


def test_mllama_has_cross_attention_layers():
    cfg = _zoo("mllama").model.config.text_config
    assert cfg.cross_attention_layers and len(cfg.cross_attention_layers) < cfg.num_hidden_layers


def test_offsets_and_special_tokens():
    tok = _zoo("llava").tokenizer
    text = "Text context: the red circle. Answer the question using a single word or phrase."
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert tok.decode(enc["input_ids"]) == text
    for (start, end), tid in zip(enc["offset_mapping"], enc["input_ids"], strict=True):
        assert text[start:end].strip() == tok.decode([tid]).strip()
    # common words are single tokens
    for word in (" red", " circle", " happy", " square", " disgust"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    # special tokens are never split, and ids agree with the model config
    for family in MULTIMODAL:
        if family in NO_IMAGE_TOKEN:
            continue
        tm = _zoo(family)
        if "image" not in tm.modalities:
            continue
        image_id = _image_token_id(tm)
        token = tm.tokenizer.convert_ids_to_tokens(image_id)
        assert tm.tokenizer(token, add_special_tokens=False)["input_ids"] == [image_id], family


def test_text_only_chat_templates():
    assert "<|im_start|>assistant" in _zoo("qwen2").prompt("Hi")
    assert _zoo("gemma").prompt("Hi").endswith("<start_of_turn>model\n")
    assert _zoo("llama").prompt("Hi") == "Hi"


def test_optional_audio_for_gemma3n():
    tm = _zoo("gemma3n")
    assert tm.modalities == ("image",) and tm.sampling_rate
    prompt = tm.prompt("What is said?", modalities=("image", "audio"))
    inputs = tm.processor(text=prompt, images=[tm.make_image(0)], audio=[tm.make_audio(0)], return_tensors="pt")
    assert torch.isfinite(_forward(tm, inputs)).all()


@pytest.mark.slow
def test_benchmark_size_llava():
    tm = tiny("llava", hidden=512, layers=8, heads=8, kv_heads=8, image_tokens=576)
    cfg = tm.model.config.text_config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        512, 8, 8, 8,
    )  # fmt: skip
    inputs = _inputs(tm, tm.prompt("What colour?"))
    assert int((inputs["input_ids"] == _image_token_id(tm)).sum()) == 576
    assert torch.isfinite(_forward(tm, inputs)).all()
