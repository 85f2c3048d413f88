"""The families of arbiter/testing/tiny_more.py: each builds offline and deterministically, runs, and its
real processor agrees with its model (image placeholders, padding, the image reaching the logits)."""

from __future__ import annotations

import importlib

import pytest
import torch

from arbiter.testing import FAMILIES, TinyModel
from helpers import check_deterministic_in_seed
from helpers import _tiny as _zoo, forward_logits as _forward, image_token_id as _image_token_id
from arbiter.testing.tiny_more import FAMILIES as MORE

tiny_module = importlib.import_module("arbiter.testing.tiny")  # (``arbiter.testing.tiny`` is the function)
NEW = list(MORE)
HYBRID = ["qwen3_5", "qwen3_5_moe", "lfm2_vl"]
# families whose learned positions ignore the attention mask: padding goes on the right (their tokenizers' side)
RIGHT_PADDED = {
    "florence2": "encoder-decoder: BART's learned encoder positions ignore the mask; the decoder has no padding",
    "git": "GIT's learned text positions ignore the attention mask (BERT tokenizer pads on the right)",
}
PROMPT = "What colour is the shape in the image?"


def _logit_positions(tm: TinyModel, inputs) -> int:
    """Number of logits positions the forward gives for ``inputs``."""
    if tm.family == "florence2":
        return 1  # the decoder, fed decoder_start_token_id only
    n = inputs["input_ids"].shape[1]
    return n + tm.image_tokens_per_image if tm.family == "git" else n


def test_registered():
    assert set(NEW) == {"qwen3_5", "qwen3_5_moe", "lfm2_vl", "florence2", "idefics", "git", "kosmos2"}
    for family in NEW:
        assert family in FAMILIES and FAMILIES[family] == MORE[family]
        assert family in tiny_module.FAMILY_BUILDERS
    # the families of tiny.py are still there
    assert {"llava", "qwen2_vl", "mllama", "gemma3n"} <= set(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW)
def test_deterministic_in_seed(family):
    assert check_deterministic_in_seed(family, PROMPT) > 0


@pytest.mark.parametrize("family", NEW)
def test_forward_finite(family):
    tm = _zoo(family)
    assert not tm.model.training
    assert type(tm.model).__name__ == MORE[family].split()[0]
    expected_attn = "eager" if family == "git" else "sdpa"  # GIT implements eager attention only
    assert tm.model.config._attn_implementation == expected_attn
    inputs = tm.inputs(tm.prompt(PROMPT))
    logits = _forward(tm, inputs)
    vocab = tm.model.config.get_text_config().vocab_size
    assert logits.shape == (1, _logit_positions(tm, inputs), vocab)
    assert vocab >= len(tm.tokenizer)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0
    assert all(p.requires_grad for p in tm.model.parameters())  # idefics: freeze_* turned off


@pytest.mark.parametrize("family", NEW)
def test_image_changes_last_logits(family):
    tm = _zoo(family)
    prompt = tm.prompt(PROMPT)
    base = _forward(tm, tm.inputs(prompt, image_seeds=0))[0, -1]
    other = _forward(tm, tm.inputs(prompt, image_seeds=1))[0, -1]
    assert (base - other).abs().max() > 1e-4, "the image does not reach the logits"
    again = _forward(tm, tm.inputs(prompt, image_seeds=0))[0, -1]
    torch.testing.assert_close(base, again, atol=0, rtol=0)


@pytest.mark.parametrize("family", NEW)
def test_image_token_count(family):
    tm = _zoo(family)
    inputs = tm.inputs(tm.prompt("Describe the image."))
    ids = inputs["input_ids"]
    if family == "kosmos2":
        mask = inputs["image_embeds_position_mask"]
        assert mask.shape == ids.shape
        assert int(mask.sum()) == tm.image_tokens_per_image == tm.model.config.latent_query_num
        # <s> <image> [image positions] </image> text...
        first = int(mask[0].nonzero()[0])
        assert first == 2 and bool(mask[0, first : first + tm.image_tokens_per_image].all())
        assert tm.tokenizer.convert_ids_to_tokens(int(ids[0, 1])) == "<image>"
        assert tm.tokenizer.convert_ids_to_tokens(int(ids[0, first + tm.image_tokens_per_image])) == "</image>"
        # the image positions hold ordinary ids (4, 5, ... as in the real XLM-R vocabulary), no tag tokens
        n = tm.image_tokens_per_image
        assert ids[0, first : first + n].tolist() == list(range(4, 4 + n))
        assert int((ids == tm.tokenizer.convert_tokens_to_ids("</image>")).sum()) == 1
    elif family == "git":
        logits = _forward(tm, inputs)
        assert logits.shape[1] - ids.shape[1] == tm.image_tokens_per_image
        cfg = tm.model.config.vision_config
        assert tm.image_tokens_per_image == (cfg.image_size // cfg.patch_size) ** 2 + 1
    else:
        n = int((ids == _image_token_id(tm)).sum())
        assert n == tm.image_tokens_per_image
        token = tm.tokenizer.convert_ids_to_tokens(_image_token_id(tm))
        assert tm.tokenizer(token, add_special_tokens=False)["input_ids"] == [_image_token_id(tm)]
    if family == "idefics":
        assert tm.image_tokens_per_image == 1
        # the image mask opens at the <image> token (the processor appends the image after the text)
        image_mask = inputs["image_attention_mask"][0, :, 0]
        pos = int((ids[0] == _image_token_id(tm)).nonzero()[0])
        assert not image_mask[:pos].any() and image_mask[pos:].all()
    _forward(tm, inputs)  # the forward checks placeholders against image features


@pytest.mark.parametrize("family", NEW)
def test_padded_batch(family):
    tm = _zoo(family)
    tok = tm.tokenizer
    side = "right" if family in RIGHT_PADDED else "left"
    old = tok.padding_side
    tok.padding_side = side
    try:
        prompts = [tm.prompt("What colour?"), tm.prompt("What colour is the big shape in the picture?")]
        batch = tm.inputs(prompts, image_seeds=(0, 1), padding=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape[0] == 2
        n_short = int(mask[0].sum())
        assert n_short < ids.shape[1] and int(mask[1].sum()) == ids.shape[1]
        if side == "left":
            assert ids[0, 0] == tok.pad_token_id and mask[0, 0] == 0 and ids[1, -1] != tok.pad_token_id
        else:
            assert ids[0, -1] == tok.pad_token_id and mask[0, -1] == 0
        logits = _forward(tm, batch)
        assert torch.isfinite(logits).all()
        alone_inputs = tm.inputs(prompts[0], image_seeds=0)
        alone = _forward(tm, alone_inputs)
        assert int(alone_inputs["input_ids"].shape[1]) == n_short
        if family == "git":  # the shorter prompt's last real token, after the prepended image positions
            last = tm.image_tokens_per_image + n_short - 1
            torch.testing.assert_close(logits[0, last], alone[0, -1], atol=2e-4, rtol=1e-3)
        else:  # left padding: the last position; florence2: the decoder's (only) position
            torch.testing.assert_close(logits[0, -1], alone[0, -1], atol=2e-4, rtol=1e-3)
        # and the longer prompt is unaffected by being batched
        longer = _forward(tm, tm.inputs(prompts[1], image_seeds=1))
        torch.testing.assert_close(logits[1, -1], longer[0, -1], atol=2e-4, rtol=1e-3)
    finally:
        tok.padding_side = old


@pytest.mark.parametrize("family", sorted(RIGHT_PADDED))
def test_left_padding_shifts_positions(family):
    """Why these families are tested right-padded: left padding moves the text to other (learned,
    mask-blind) positions, so the shorter prompt's logits change."""
    tm = _zoo(family)
    tok = tm.tokenizer
    assert tok.padding_side == "right"
    tok.padding_side = "left"
    try:
        prompts = [tm.prompt("What colour?"), tm.prompt("What colour is the big shape in the picture?")]
        batch = tm.inputs(prompts, image_seeds=(0, 1), padding=True)
        assert batch["attention_mask"][0, 0] == 0
        logits = _forward(tm, batch)
    finally:
        tok.padding_side = "right"
    alone = _forward(tm, tm.inputs(prompts[0], image_seeds=0))
    assert (logits[0, -1] - alone[0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", HYBRID)
def test_hybrid_token_mixers(family):
    tm = _zoo(family)
    cfg = tm.model.config.get_text_config()
    layers = tm.model.model.language_model.layers
    kinds = list(cfg.layer_types)
    assert len(kinds) == len(layers) == cfg.num_hidden_layers == 4
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if family == "lfm2_vl":
        assert set(kinds) == {"conv", "full_attention"}
        for kind, layer in zip(kinds, layers, strict=True):
            if kind == "conv":
                assert type(layer.conv).__name__ == "Lfm2ShortConv" and not hasattr(layer, "self_attn")
            else:
                assert type(layer.self_attn).__name__ == "Lfm2Attention" and not hasattr(layer, "conv")
                assert layer.self_attn.k_proj.out_features == cfg.num_key_value_heads * head_dim
    else:
        assert set(kinds) == {"linear_attention", "full_attention"}
        for kind, layer in zip(kinds, layers, strict=True):
            if kind == "linear_attention":
                assert type(layer.linear_attn).__name__.endswith("GatedDeltaNet")
                assert not hasattr(layer, "self_attn")
            else:
                attn = layer.self_attn
                assert not hasattr(layer, "linear_attn")
                # gated attention: q_proj emits the query and the output gate
                assert attn.q_proj.out_features == 2 * cfg.num_attention_heads * head_dim
                assert attn.k_proj.out_features == cfg.num_key_value_heads * head_dim
        if family == "qwen3_5_moe":
            mlp = layers[0].mlp
            assert type(mlp).__name__ == "Qwen3_5MoeSparseMoeBlock"
            assert cfg.num_experts > cfg.num_experts_per_tok > 1


def test_idefics_gated_cross_attention():
    tm = _zoo("idefics")
    model = tm.model
    blocks = model.model.gated_cross_attn_layers
    assert 1 <= len(blocks) < model.config.num_hidden_layers
    gates = [p for n, p in model.named_parameters() if n.endswith(("alpha_cross_attn", "alpha_dense"))]
    assert len(gates) == 2 * len(blocks) and all(g.abs().min() >= 0.5 for g in gates)
    # with the gates at their (zero) init the image would not reach the logits at all
    prompt = tm.prompt(PROMPT)
    saved = [g.detach().clone() for g in gates]
    try:
        with torch.no_grad():
            for g in gates:
                g.zero_()
        a = _forward(tm, tm.inputs(prompt, image_seeds=0))[0, -1]
        b = _forward(tm, tm.inputs(prompt, image_seeds=1))[0, -1]
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    finally:
        with torch.no_grad():
            for g, v in zip(gates, saved, strict=True):
                g.copy_(v)


def test_florence2_decoder_logits():
    tm = _zoo("florence2")
    inputs = tm.inputs(tm.prompt(PROMPT))
    tok = tm.tokenizer
    # <image> * n, <s>, text, </s>
    ids = inputs["input_ids"][0]
    n = tm.image_tokens_per_image
    assert int(ids[n]) == tok.bos_token_id and int(ids[-1]) == tok.eos_token_id
    start = tm.model.config.text_config.decoder_start_token_id
    dec = torch.tensor([[start, tok.bos_token_id, *tok(" red", add_special_tokens=False)["input_ids"]]])
    logits = _forward(tm, {**inputs, "decoder_input_ids": dec})
    assert logits.shape == (1, 3, tm.model.config.text_config.vocab_size)
    # the default forward feeds decoder_start_token_id only: the first decoder position
    torch.testing.assert_close(logits[0, 0], _forward(tm, inputs)[0, 0], atol=1e-5, rtol=1e-4)
    # task tokens expand to the processor's task prompts
    caption = tm.inputs(tm.prompt("<CAPTION>"))
    text = tok.decode(caption["input_ids"][0, n:], skip_special_tokens=True)
    assert text == "What does the image describe?"


def test_prompts():
    assert _zoo("qwen3_5").prompt("Hi").endswith("<|im_start|>assistant\n")
    assert _zoo("lfm2_vl").prompt("Hi").startswith("<|startoftext|><|im_start|>user\n<image>")
    assert _zoo("idefics").prompt("Hi") == "User: Hi<end_of_utterance>\nAssistant:"
    assert _zoo("git").prompt("Hi") == "Hi" == _zoo("florence2").prompt("Hi")
    assert _zoo("kosmos2").prompt("Hi") == "<grounding> Question: Hi Answer:"
    git = _zoo("git")
    ids = git.inputs("Hi")["input_ids"][0]
    assert int(ids[0]) == git.tokenizer.bos_token_id and git.tokenizer.eos_token_id not in ids.tolist()
