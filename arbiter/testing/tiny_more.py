"""More families for the tiny zoo of :mod:`arbiter.testing.tiny` (registered into its ``FAMILIES``).

Same contract as the families of ``tiny.py``: ``tiny(family, seed, **sizes)`` builds the family's real
``transformers`` config and model classes with random weights (eval mode, seeded), together with the
family's real processor built offline from its component classes (the in-memory BPE tokenizer of
``tiny.py`` with the family's special tokens, the family's image processor at a small size).

Per-family choices:

* ``qwen3_5`` / ``qwen3_5_moe``: Qwen3.5 (``Qwen3_5ForConditionalGeneration`` /
  ``Qwen3_5MoeForConditionalGeneration``). Hybrid text stack: ``linear_attention`` layers (Gated
  DeltaNet: short causal conv + gated delta rule, ``layer.linear_attn``) alternate with
  ``full_attention`` layers (gated softmax attention, ``layer.self_attn``: ``q_proj`` emits the query
  *and* a sigmoid output gate per head, so it is ``2 * heads * head_dim`` wide), grouped-query
  (``heads`` / ``kv_heads``). Qwen3.5 has 3 linear : 1 full; here every 2nd layer is full so that a
  4-layer model has two of each. Partial rotary (half the head dim) with interleaved M-RoPE.
  Vision: patch 16 with 2 x 2 merge (one token per 32 x 32 px), learned position grid resampled per
  image. Processor: ``Qwen3VLProcessor`` (Qwen2-VL image processor, Qwen3-VL video processor), ChatML
  without system prompt. MoE: 4 experts, top-2, plus the shared expert, in every layer.
* ``lfm2_vl``: LFM2-VL (``Lfm2VlForConditionalGeneration``): SigLIP2 NaFlex vision tower, 2 x 2
  pixel-unshuffle projector, LFM2 text stack alternating ``conv`` layers (gated short convolution,
  ``layer.conv``) and ``full_attention`` layers (``layer.self_attn``, grouped-query). No image
  splitting (one tile). The chat template starts with ``<|startoftext|>`` (the processor adds no
  special tokens); the image placeholder is ``<image>``, wrapped by ``<|image_start|>`` /
  ``<|image_end|>`` by the processor.
* ``florence2``: Florence-2 (``Florence2ForConditionalGeneration``): DaViT vision tower (4 stages,
  one block each) + BART encoder-decoder. The image placeholders (``t * t`` spatial tokens + 1
  temporal token) are in the *encoder* input; ``logits`` come from the decoder, which without
  ``decoder_input_ids`` is fed the single ``decoder_start_token_id`` (``</s>``), so ``logits`` is
  ``(batch, 1, vocab)``. No chat template: ``prompt(text)`` is the text (or a task token such as
  ``<CAPTION>``); the processor puts ``<image> * n + <s> + text + </s>``. BART's learned positions do
  not follow the attention mask, so batches pad on the right (the family's padding side).
* ``idefics``: IDEFICS v1 (``IdeficsForVisionText2Text``): CLIP-like vision tower, no perceiver
  resampler, Llama decoder with a gated cross-attention block before every 2nd decoder layer
  (``cross_layer_interval=2``; ``layers=4`` -> 2 blocks; before every layer for an odd ``layers``).
  Its tanh gates (``alpha_cross_attn``, ``alpha_dense``) are zero-initialised (the text would ignore
  the image), so they are re-drawn (seeded) in ``[0.5, 1)``; ``freeze_*`` are off so that every
  parameter takes gradients. No chat template: ``prompt(text)`` gives
  ``"User: <text><end_of_utterance>\\nAssistant:"`` and the processor (called with ``text=`` and
  ``images=``) appends the image as ``<fake_token_around_image><image><fake_token_around_image>``
  after the text and prepends ``<s>``; only tokens from the ``<image>`` token on attend to the image
  (``image_attention_mask``), so the image reaches the last position. One ``<image>`` token per
  image (``image_tokens_per_image == 1``); the config also carries ``image_token_id``.
* ``git``: GIT (``GitForCausalLM``): CLIP-like vision tower whose ``(side / patch)^2 + 1`` patch
  embeddings are *prepended* to the text embeddings -- there are no placeholder tokens in
  ``input_ids``, and ``logits`` has ``image_tokens_per_image + len(input_ids)`` positions. GIT only
  implements ``eager`` attention (``GIT_SELF_ATTENTION_CLASSES`` has no ``sdpa``), so it is built
  with ``attn_implementation="eager"``. Its learned text positions ignore the attention mask, so
  batches pad on the right (BERT's padding side). No chat template: ``prompt(text)`` is the text;
  the tokenizer prepends ``[CLS]`` (GIT's BOS) and adds no ``[SEP]``, as in GIT's VQA usage.
* ``kosmos2``: Kosmos-2 (``Kosmos2ForConditionalGeneration``): CLIP-like vision tower, a latent-query
  resampler to ``latent_query_num`` image embeddings, and a Magneto-style decoder. The processor
  writes ``<s><image>`` + ``latent_query_num`` image positions + ``</image>`` before the text and
  marks the image positions with ``image_embeds_position_mask`` (their ids are 4, 5, ..., ordinary
  tokens, as with the real XLM-R vocabulary); ``image_tokens_per_image`` is that count. The processor adds
  ``<grounding>``, ``<phrase>``, ... and 1024 ``<patch_index_NNNN>`` tokens to the tokenizer, so the
  model is sized after it. No chat template: ``prompt(text)`` gives
  ``"<grounding> Question: <text> Answer:"``. Sinusoidal positions start after ``pad_token_id`` (as
  in XLM-R, where it is 1); here the pad id sits after the BPE vocabulary, so
  ``max_position_embeddings`` is raised by that much.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .tiny import FAMILY_BUILDERS as _TINY_BUILDERS
from .tiny import FAMILIES as _TINY_FAMILIES
from .tiny import QWEN_VL_TOKENS, TinyModel, chatml_template, make_tokenizer, mrope_sections, grid_side, tokenizer_vocab_size

__all__ = ["BUILDERS", "FAMILIES"]


class ModelClass:
    """Stands in for the model class that a builder returns to ``tiny()``: builds the real class
    with the family's attention implementation (``tiny()`` asks for ``sdpa``) and then applies the
    family's seeded re-initialisation. ``tiny()`` calls ``_from_config`` right after seeding torch's
    global RNG (inside ``fork_rng``), so the re-initialisation drawn from that RNG is deterministic in
    ``seed``."""

    def __init__(self, cls, attn: str | None = None, post: Callable[[Any], None] | None = None):
        self.cls = cls
        self.attn = attn
        self.post = post

    def _from_config(self, config, attn_implementation=None, **kwargs):
        model = self.cls._from_config(config, attn_implementation=self.attn or attn_implementation, **kwargs)
        if self.post is not None:
            with torch.no_grad():
                self.post(model)
        return model

    def __repr__(self) -> str:
        return f"ModelClass({self.cls.__name__}, attn={self.attn!r})"


# --------------------------------------------------------------------------------------------------
# Qwen3.5 (dense and MoE)
# --------------------------------------------------------------------------------------------------


def _build_qwen3_5_like(s, family):
    import transformers as T

    patch, merge = 16, 2
    unit = patch * merge  # one image token per 32 x 32 px
    side = grid_side(s["image_tokens"]) * unit
    tok = make_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=QWEN_VL_TOKENS,
        chat_template=chatml_template(
            image="<|vision_start|><|image_pad|><|vision_end|>",
            video="<|vision_start|><|video_pad|><|vision_end|>",
        ),
    )
    size = {"shortest_edge": min(2 * unit * unit, side * side), "longest_edge": side * side}
    grid = dict(patch_size=patch, merge_size=merge, temporal_patch_size=2)
    ip = T.Qwen2VLImageProcessor(size=size, **grid)
    vp = T.Qwen3VLVideoProcessor(size=size, **grid)
    proc = T.Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)

    n = s["layers"]
    # Qwen3.5 puts a full-attention layer after every 3 linear ones; every 2nd here (both kinds at 4 layers)
    layer_types = ["full_attention" if i % 2 else "linear_attention" for i in range(n)]
    if n > 1 and "full_attention" not in layer_types:
        layer_types[-1] = "full_attention"
    head_dim = s["hidden"] // s["heads"]
    rotary = max(2, head_dim // 2) // 2 * 2  # partial rotary: half the head dim (a quarter in Qwen3.5's 256)
    lin_heads = max(1, s["kv_heads"])
    text_kw = dict(
        vocab_size=tokenizer_vocab_size(tok, s),
        hidden_size=s["hidden"],
        num_hidden_layers=n,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": rotary / head_dim,
            "mrope_section": mrope_sections(rotary),
            "mrope_interleaved": True,
        },
        linear_conv_kernel_dim=4,
        linear_num_key_heads=lin_heads,
        linear_num_value_heads=2 * lin_heads,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        layer_types=layer_types,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision_kw = dict(
        depth=s["vision_layers"],
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_heads=s["vision_heads"],
        patch_size=patch,
        spatial_merge_size=merge,
        temporal_patch_size=2,
        out_hidden_size=s["hidden"],
        num_position_embeddings=64,  # an 8 x 8 learned grid, resampled to each image's patch grid
    )
    c = tok.convert_tokens_to_ids
    ids = dict(
        image_token_id=c("<|image_pad|>"),
        video_token_id=c("<|video_pad|>"),
        vision_start_token_id=c("<|vision_start|>"),
        vision_end_token_id=c("<|vision_end|>"),
    )
    if family == "qwen3_5":
        text = T.Qwen3_5TextConfig(intermediate_size=s["intermediate"], **text_kw)
        cfg = T.Qwen3_5Config(text_config=text, vision_config=T.Qwen3_5VisionConfig(**vision_kw), **ids)
        cls = T.Qwen3_5ForConditionalGeneration
    else:
        text = T.Qwen3_5MoeTextConfig(
            moe_intermediate_size=s["intermediate"] // 2,
            shared_expert_intermediate_size=s["intermediate"] // 2,
            num_experts=4,
            num_experts_per_tok=2,
            **text_kw,
        )
        cfg = T.Qwen3_5MoeConfig(text_config=text, vision_config=T.Qwen3_5MoeVisionConfig(**vision_kw), **ids)
        cls = T.Qwen3_5MoeForConditionalGeneration
    extra = {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": (side // unit) ** 2}
    return cls, cfg, proc, extra


def _build_qwen3_5(s):
    return _build_qwen3_5_like(s, "qwen3_5")


def _build_qwen3_5_moe(s):
    return _build_qwen3_5_like(s, "qwen3_5_moe")


# --------------------------------------------------------------------------------------------------
# LFM2-VL
# --------------------------------------------------------------------------------------------------


def _build_lfm2_vl(s):
    import transformers as T

    t = grid_side(s["image_tokens"])
    patch, factor = 8, 2
    side = t * patch * factor  # t x t tokens after the 2 x 2 pixel unshuffle
    tok = make_tokenizer(
        bos="<|startoftext|>",
        eos="<|im_end|>",
        pad="<|pad|>",
        named={"image_token": "<image>"},
        extra=["<|im_start|>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"],
        chat_template="{{- bos_token -}}" + chatml_template(image="<image>"),
    )
    ip = T.Lfm2VlImageProcessor(
        do_image_splitting=False,
        encoder_patch_size=patch,
        downsample_factor=factor,
        min_image_tokens=t * t,
        max_image_tokens=t * t,
        tile_size=side,
    )
    proc = T.Lfm2VlProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    n = s["layers"]
    layer_types = ["full_attention" if i % 2 else "conv" for i in range(n)]  # LFM2: conv-heavy, attention between
    if n > 1 and "full_attention" not in layer_types:
        layer_types[-1] = "full_attention"
    text = T.Lfm2Config(
        vocab_size=tokenizer_vocab_size(tok, s),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        block_auto_adjust_ff_dim=False,
        num_hidden_layers=n,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        conv_L_cache=3,
        layer_types=layer_types,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = T.Siglip2VisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        patch_size=patch,
        num_patches=(side // patch) ** 2,
        vision_use_head=False,
    )
    cfg = T.Lfm2VlConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.image_token_id,
        projector_hidden_size=s["intermediate"],
        downsample_factor=factor,
    )
    extra = {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": t * t}
    return T.Lfm2VlForConditionalGeneration, cfg, proc, extra


# --------------------------------------------------------------------------------------------------
# Florence-2
# --------------------------------------------------------------------------------------------------


def _build_florence2(s):
    import transformers as T

    t = grid_side(s["image_tokens"])
    side = 32 * t  # DaViT: strides 4, 2, 2, 2 -> a t x t grid at the last stage
    n_img = t * t + 1  # spatial tokens + one temporal token
    tok = make_tokenizer(
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        named={"image_token": "<image>"},
        extra=["<od>", "</od>", "<ocr>", "</ocr>", "<poly>", "</poly>", "<sep>"],
    )
    ip = T.CLIPImageProcessor(
        size={"height": side, "width": side},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    ip.image_seq_length = n_img
    proc = T.Florence2Processor(image_processor=ip, tokenizer=tok)
    v = s["vision_hidden"]
    dims = [v // 2, v, 3 * v // 2, 2 * v]
    heads = [max(1, d // 16) for d in dims]
    vision = T.Florence2VisionConfig(
        depths=[1, 1, 1, 1],
        patch_size=[7, 3, 3, 3],
        patch_stride=[4, 2, 2, 2],
        patch_padding=[3, 1, 1, 1],
        patch_prenorm=[False, True, True, True],
        embed_dim=dims,
        num_heads=heads,
        num_groups=heads,
        window_size=max(1, min(4, t)),
        drop_path_rate=0.0,
        projection_dim=s["hidden"],
        max_position_embeddings=max(8, 2 * t),
    )
    half = max(1, s["layers"] // 2)
    text = T.BartConfig(
        vocab_size=tokenizer_vocab_size(tok, s),
        d_model=s["hidden"],
        encoder_layers=half,
        decoder_layers=half,
        encoder_attention_heads=s["heads"],
        decoder_attention_heads=s["heads"],
        encoder_ffn_dim=s["intermediate"],
        decoder_ffn_dim=s["intermediate"],
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
        forced_eos_token_id=tok.eos_token_id,
    )
    cfg = T.Florence2Config(text_config=text, vision_config=vision, image_token_id=tok.image_token_id)
    extra = {
        "modalities": ("image",),
        "image_size": (side, side),
        "image_tokens_per_image": n_img,
        "_prompt": _plain_prompt,
    }
    return T.Florence2ForConditionalGeneration, cfg, proc, extra


def _plain_prompt(tm: TinyModel, text: str, modalities: tuple[str, ...]) -> str:
    # families whose processor places the image itself (Florence-2, GIT): the prompt is the text
    return text


# --------------------------------------------------------------------------------------------------
# IDEFICS (v1)
# --------------------------------------------------------------------------------------------------


def _idefics_prompt(tm: TinyModel, text: str, modalities: tuple[str, ...]) -> str:
    # idefics-9b-instruct turn format; the processor adds <s> and appends the image after the text
    return f"User: {text}<end_of_utterance>\nAssistant:"


def _idefics_gates(model) -> None:
    for name, p in sorted(model.named_parameters()):
        if name.endswith(("alpha_cross_attn", "alpha_dense")):
            p.copy_((0.5 + 0.5 * torch.rand(p.shape)).to(p.dtype))


def _build_idefics(s):
    import transformers as T

    patch = 8
    side = grid_side(s["image_tokens"]) * patch  # (side / patch)^2 + 1 vision states are cross-attended
    tok = make_tokenizer(
        bos="<s>",
        eos="</s>",
        pad="<unk>",
        unk="<unk>",
        add_bos=True,
        extra=["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
    )
    ip = T.IdeficsImageProcessor(image_size=side)
    proc = T.IdeficsProcessor(image_processor=ip, tokenizer=tok, image_size=side)
    vision = T.IdeficsVisionConfig(
        embed_dim=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=side,
        patch_size=patch,
    )
    cfg = T.IdeficsConfig(
        vocab_size=tokenizer_vocab_size(tok, s),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        max_position_embeddings=4096,
        # (IdeficsModel makes layers // interval blocks but indexes one at every multiple of interval)
        cross_layer_interval=2 if s["layers"] % 2 == 0 else 1,
        alpha_initializer="zeros",
        alpha_type="float",
        freeze_text_layers=False,
        freeze_vision_layers=False,
        use_resampler=False,
        vision_config=vision,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg.image_token_id = tok.convert_tokens_to_ids("<image>")  # not a field of IdeficsConfig; for tooling
    extra = {
        "modalities": ("image",),
        "image_size": (side, side),
        "image_tokens_per_image": 1,
        "_prompt": _idefics_prompt,
    }
    return ModelClass(T.IdeficsForVisionText2Text, post=_idefics_gates), cfg, proc, extra


# --------------------------------------------------------------------------------------------------
# GIT
# --------------------------------------------------------------------------------------------------


def _build_git(s):
    import transformers as T

    patch = 8
    side = grid_side(s["image_tokens"]) * patch
    n_img = (side // patch) ** 2 + 1  # patch embeddings + CLS, prepended to the text
    tok = make_tokenizer(bos="[CLS]", eos="[SEP]", pad="[PAD]", unk="[UNK]", add_bos=True, extra=["[MASK]"])
    ip = T.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    proc = T.GitProcessor(image_processor=ip, tokenizer=tok)
    vision = T.GitVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=side,
        patch_size=patch,
    )
    cfg = T.GitConfig(
        vision_config=vision.to_dict(),
        vocab_size=tokenizer_vocab_size(tok, s),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    extra = {
        "modalities": ("image",),
        "image_size": (side, side),
        "image_tokens_per_image": n_img,
        "_prompt": _plain_prompt,
    }
    # GIT's text attention exists only as "eager" (GIT_SELF_ATTENTION_CLASSES = {"eager": ...})
    return ModelClass(T.GitForCausalLM, attn="eager"), cfg, proc, extra


# --------------------------------------------------------------------------------------------------
# Kosmos-2
# --------------------------------------------------------------------------------------------------


def _kosmos2_prompt(tm: TinyModel, text: str, modalities: tuple[str, ...]) -> str:
    # the processor puts <s><image> ... </image> before the text
    return f"<grounding> Question: {text} Answer:"


def _build_kosmos2(s):
    import transformers as T

    patch = 8
    side = grid_side(s["image_tokens"]) * patch
    n_img = s["image_tokens"]  # latent queries of the image-to-text resampler
    tok = make_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", order=["<s>", "<pad>", "</s>", "<unk>"])
    ip = T.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    proc = T.Kosmos2Processor(image_processor=ip, tokenizer=tok)  # adds its tag and patch-index tokens
    proc.num_image_tokens = n_img
    # the ids written at the image positions (replaced by image embeddings in the model): the real
    # processor takes the ones after <unk>, i.e. 4, 5, ... -- ordinary tokens of the XLM-R vocabulary. Here
    # the ids after <unk> are the tag tokens just added (<image>, </image>, ...), so pin the real ids.
    proc.first_image_token_id = 4
    vocab = tokenizer_vocab_size(tok, s)
    text = T.Kosmos2TextConfig(
        vocab_size=vocab,
        embed_dim=s["hidden"],
        layers=s["layers"],
        ffn_dim=s["intermediate"],
        attention_heads=s["heads"],
        max_position_embeddings=tok.pad_token_id + 1 + 2048,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = T.Kosmos2VisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=side,
        patch_size=patch,
    )
    cfg = T.Kosmos2Config(text_config=text.to_dict(), vision_config=vision.to_dict(), latent_query_num=n_img)
    extra = {
        "modalities": ("image",),
        "image_size": (side, side),
        "image_tokens_per_image": n_img,
        "_prompt": _kosmos2_prompt,
    }
    return T.Kosmos2ForConditionalGeneration, cfg, proc, extra


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


BUILDERS: dict[str, Callable[[dict[str, Any]], tuple]] = {
    "qwen3_5": _build_qwen3_5,
    "qwen3_5_moe": _build_qwen3_5_moe,
    "lfm2_vl": _build_lfm2_vl,
    "florence2": _build_florence2,
    "idefics": _build_idefics,
    "git": _build_git,
    "kosmos2": _build_kosmos2,
}

FAMILIES: dict[str, str] = {
    "qwen3_5": "Qwen3_5ForConditionalGeneration (Gated DeltaNet + gated attention, M-RoPE)",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration (Gated DeltaNet + gated attention, MoE)",
    "lfm2_vl": "Lfm2VlForConditionalGeneration (SigLIP2 + short-conv / attention hybrid)",
    "florence2": "Florence2ForConditionalGeneration (DaViT + BART encoder-decoder)",
    "idefics": "IdeficsForVisionText2Text (IDEFICS v1: gated cross-attention blocks)",
    "git": "GitForCausalLM (image embeddings prepended; eager attention only)",
    "kosmos2": "Kosmos2ForConditionalGeneration (latent-query image embeds at image_embeds_position_mask)",
}

_TINY_BUILDERS.update(BUILDERS)
_TINY_FAMILIES.update(FAMILIES)
