"""Further families for the tiny zoo of :mod:`arbiter.testing.tiny` (registered into its ``FAMILIES``).

Same contract as ``tiny.py`` and ``tiny_more.py``: ``tiny(family, seed, **sizes)`` builds the family's
real ``transformers`` config and model classes with random weights (eval mode, seeded, ``sdpa``),
together with the family's real processor built offline from its component classes (the in-memory BPE
tokenizer of ``tiny.py`` with the family's special tokens, the family's image processor / feature
extractor at a small size).

Per-family choices:

* ``qwen3_vl``: Qwen3-VL (``Qwen3VLForConditionalGeneration``). Vision: patch 16 with 2 x 2 merge
  (one token per 32 x 32 px), learned 8 x 8 position grid resampled per image, DeepStack: the
  features of vision blocks ``deepstack_visual_indexes`` (both blocks here) go through their own
  mergers and are added to the hidden states of the first text layers at the image positions. Text:
  Qwen3 (q/k RMS norms), grouped-query, interleaved M-RoPE. Processor: ``Qwen3VLProcessor`` (Qwen2-VL
  image processor, Qwen3-VL video processor), ChatML without system prompt.
* ``mistral3``: Mistral 3.1 (``Mistral3ForConditionalGeneration``): Pixtral vision tower (patch 14,
  2-D RoPE, images of any size), 2 x 2 patch merger (one ``[IMG]`` per 28 x 28 px), Mistral text stack
  (no sliding window). ``PixtralProcessor`` writes each image row as ``[IMG] * w + [IMG_BREAK]``, the
  last ``[IMG_BREAK]`` replaced by ``[IMG_END]``: ``image_tokens_per_image`` counts the ``[IMG]`` tokens
  only (``t * t``; the model consumes those). Chat template ``<s>[INST]...[/INST]`` (the BOS comes from
  the template; the tokenizer adds none).
* ``llava_onevision``: LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower
  (patch 14, no head, ``full`` feature strategy), anyres pinpoints ``[s, s], [s, 2s], [2s, s], [2s, 2s]``
  as in ``llava_next``: the square ``make_image`` gives ``2 n^2 + n`` tokens (base patch, unpadded grid,
  newlines) ~ ``image_tokens``; Qwen2 text, ChatML with ``<image>\\n`` before the text.
* ``glm4v``: GLM-4.1V (``Glm4vForConditionalGeneration``): patch 14 with 2 x 2 merge (one
  ``<|image|>`` per 28 x 28 px; GLM's ``smart_resize`` bounds frames x pixels and an image counts as two
  frames, so the processor's pixel bounds are doubled), learned 8 x 8 position grid resampled
  (bicubic) per image; GLM-4 text stack with M-RoPE on half the head dim (``partial_rotary_factor``
  0.5). Chat template ``[gMASK]<sop><|user|>\\n<|begin_of_image|><|image|><|end_of_image|>...<|assistant|>\\n``.
* ``qwen2_audio``: Qwen2-Audio (``Qwen2AudioForConditionalGeneration``), audio only (``modalities ==
  ("audio",)``, no ``image_size``): Whisper features (128 mels, 16 kHz, hop 160) into the real audio
  encoder (stride-2 convolution, then 2 x average pooling: one token per 40 ms) and a Qwen2 text stack.
  The feature extractor pads every clip to a 2 s window (30 s in Qwen2-Audio; the encoder requires
  ``input_features`` of exactly ``2 * max_source_positions`` frames, so ``max_source_positions`` is 100);
  only the clip's own frames become tokens: ``audio_tokens_per_clip`` is 25 for the 1 s ``make_audio``.
  ChatML with the default system prompt and ``Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\n``.
* ``gemma4``: Gemma 4 (``Gemma4ForConditionalGeneration``), image only (no audio tower, as in the
  larger Gemma 4 checkpoints). Vision: ViT with patch 8, 2-D RoPE and a 2-D position table, 3 x 3
  average pooling of the patch grid into soft tokens. The processors accept soft-token budgets of 70,
  140, 280, ... only: the smallest budget that holds ``image_tokens`` is used and a square image gets
  the largest grid of 3 x 3-patch cells within it (8 x 8 = 64 soft tokens, a 192 px image, for the
  default budget 70); patches are padded to the budget. The position table is initialised to ones
  (every patch alike), so it is re-drawn (seeded, std 0.02). Text: alternating sliding (window 16) /
  global layers, the last global; global layers have twice the head dim and proportional RoPE on a
  quarter of it; per-layer embeddings (``hidden_size_per_layer_input`` = hidden / 4); final logit
  softcapping 30; image tokens attend bidirectionally within an image (``use_bidirectional_attention
  == "vision"``, from ``mm_token_type_ids``). Chat template
  ``<bos><|turn>user\\n<|image|>...<turn|>\\n<|turn>model\\n``; the processor expands ``<|image|>`` to
  ``<|image>`` + soft tokens + ``<image|>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .tiny import FAMILY_BUILDERS as _TINY_BUILDERS
from .tiny import FAMILIES as _TINY_FAMILIES
from .tiny import (
    QWEN_VL_TOKENS,
    chatml_template,
    content_template,
    make_tokenizer,
    mrope_sections,
    qwen2_text,
    grid_side,
    siglip_vision,
    tokenizer_vocab_size,
)
from .tiny_more import ModelClass

__all__ = ["BUILDERS", "FAMILIES"]


# --------------------------------------------------------------------------------------------------
# Qwen3-VL
# --------------------------------------------------------------------------------------------------


def _build_qwen3_vl(s):
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
    head_dim = s["hidden"] // s["heads"]
    text = T.Qwen3VLTextConfig(
        vocab_size=tokenizer_vocab_size(tok, s),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": mrope_sections(head_dim),
            "mrope_interleaved": True,
        },
        pad_token_id=tok.pad_token_id,
    )
    text.eos_token_id = tok.eos_token_id
    depth = s["vision_layers"]
    vision = T.Qwen3VLVisionConfig(
        depth=depth,
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_heads=s["vision_heads"],
        patch_size=patch,
        spatial_merge_size=merge,
        temporal_patch_size=2,
        out_hidden_size=s["hidden"],
        num_position_embeddings=64,  # an 8 x 8 learned grid, resampled to each image's patch grid
        deepstack_visual_indexes=list(range(min(depth, max(1, s["layers"] - 1)))),
    )
    c = tok.convert_tokens_to_ids
    cfg = T.Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=c("<|image_pad|>"),
        video_token_id=c("<|video_pad|>"),
        vision_start_token_id=c("<|vision_start|>"),
        vision_end_token_id=c("<|vision_end|>"),
    )
    extra = {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": (side // unit) ** 2}
    return T.Qwen3VLForConditionalGeneration, cfg, proc, extra


# --------------------------------------------------------------------------------------------------
# Mistral 3 (Pixtral vision)
# --------------------------------------------------------------------------------------------------


def _mistral_template(image: str = "[IMG]") -> str:
    # Mistral-Small-3.1 style: "<s>[INST][IMG]What is this?[/INST]"
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ '[INST]' }}" + content_template(image) + "{{ '[/INST]' }}"
        "{%- elif message['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]' }}"
        + content_template(image)
        + "{{ '[/SYSTEM_PROMPT]' }}"
        "{%- else -%}" + content_template(image) + "{{ eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    )


def _build_mistral3(s):
    import transformers as T

    patch, merge = 14, 2
    unit = patch * merge  # one [IMG] token per 28 x 28 px after the 2 x 2 patch merger
    t = grid_side(s["image_tokens"])
    side = t * unit
    tok = make_tokenizer(
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        named={"image_token": "[IMG]"},
        extra=["[INST]", "[/INST]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
        chat_template=_mistral_template(),
    )
    ip = T.PixtralImageProcessor(size={"longest_edge": side}, patch_size={"height": patch, "width": patch})
    proc = T.PixtralProcessor(
        image_processor=ip, tokenizer=tok, patch_size=patch, spatial_merge_size=merge, chat_template=tok.chat_template
    )
    text = T.MistralConfig(
        vocab_size=tokenizer_vocab_size(tok, s),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["hidden"] // s["heads"],
        max_position_embeddings=4096,
        sliding_window=None,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = T.PixtralVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=max(side, 4 * unit),
        patch_size=patch,
    )
    cfg = T.Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.image_token_id,
        spatial_merge_size=merge,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    extra = {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": t * t}
    return T.Mistral3ForConditionalGeneration, cfg, proc, extra


# --------------------------------------------------------------------------------------------------
# LLaVA-OneVision
# --------------------------------------------------------------------------------------------------


def _build_llava_onevision(s):
    import transformers as T

    # square image of the base resolution -> best grid [side, side] -> features: n*n base + n*n + n
    patch = 14
    n = max(1, int(round((-1 + math.sqrt(1 + 8 * s["image_tokens"])) / 4)))
    side = n * patch
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    tok = make_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"image_token": "<image>", "video_token": "<video>"},
        extra=["<|im_start|>"],
        chat_template=chatml_template(image="<image>\n", video="<video>\n"),
    )
    size = {"height": side, "width": side}
    ip = T.LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints)
    vp = T.LlavaOnevisionVideoProcessor(size=size)
    proc = T.LlavaOnevisionProcessor(
        image_processor=ip,
        tokenizer=tok,
        video_processor=vp,
        num_image_tokens=n * n,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=tok.chat_template,
    )
    cfg = T.LlavaOnevisionConfig(
        vision_config=siglip_vision(s, side, patch, vision_use_head=False),
        text_config=qwen2_text(s, tokenizer_vocab_size(tok, s), tok),
        image_token_index=tok.image_token_id,
        video_token_index=tok.video_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
    extra = {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": 2 * n * n + n}
    return T.LlavaOnevisionForConditionalGeneration, cfg, proc, extra


# --------------------------------------------------------------------------------------------------
# GLM-4.1V
# --------------------------------------------------------------------------------------------------


def _glm4v_template() -> str:
    # GLM-4.1V style: "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>What?<|assistant|>\n"
    return (
        "{{- '[gMASK]<sop>' -}}"
        "{%- for message in messages -%}"
        "{{ '<|' + message['role'] + '|>\\n' }}"
        + content_template(
            image="<|begin_of_image|><|image|><|end_of_image|>", video="<|begin_of_video|><|video|><|end_of_video|>"
        )
        + "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
    )


def _build_glm4v(s):
    import transformers as T

    patch, merge = 14, 2
    unit = patch * merge  # one <|image|> token per 28 x 28 px
    side = grid_side(s["image_tokens"]) * unit
    tok = make_tokenizer(
        bos=None,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        named={"image_token": "<|image|>", "video_token": "<|video|>"},
        extra=[
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|begin_of_image|>",
            "<|end_of_image|>",
            "<|begin_of_video|>",
            "<|end_of_video|>",
        ],
        chat_template=_glm4v_template(),
    )
    # GLM's smart_resize bounds frames x height x width, and an image counts as 2 frames (temporal patch)
    size = {"shortest_edge": 2 * min(2 * unit * unit, side * side), "longest_edge": 2 * side * side}
    grid = dict(patch_size=patch, merge_size=merge, temporal_patch_size=2)
    ip = T.Glm4vImageProcessor(size=size, **grid)
    vp = T.Glm4vVideoProcessor(size=size, **grid)
    proc = T.Glm4vProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
    head_dim = s["hidden"] // s["heads"]
    rotary = max(2, head_dim // 2) // 2 * 2  # GLM-4: rotary on half the head dim
    text = T.Glm4vTextConfig(
        vocab_size=tokenizer_vocab_size(tok, s),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000.0,
            "partial_rotary_factor": rotary / head_dim,
            "mrope_section": mrope_sections(rotary),
        },
        pad_token_id=tok.pad_token_id,
    )
    text.eos_token_id = tok.eos_token_id
    vision = T.Glm4vVisionConfig(
        depth=s["vision_layers"],
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_heads=s["vision_heads"],
        image_size=4 * patch * 2,  # an 8 x 8 learned grid, resampled (bicubic) to each image's patch grid
        patch_size=patch,
        spatial_merge_size=merge,
        temporal_patch_size=2,
        out_hidden_size=s["hidden"],
    )
    c = tok.convert_tokens_to_ids
    cfg = T.Glm4vConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.image_token_id,
        video_token_id=tok.video_token_id,
        image_start_token_id=c("<|begin_of_image|>"),
        image_end_token_id=c("<|end_of_image|>"),
        video_start_token_id=c("<|begin_of_video|>"),
        video_end_token_id=c("<|end_of_video|>"),
    )
    extra = {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": (side // unit) ** 2}
    return T.Glm4vForConditionalGeneration, cfg, proc, extra


# --------------------------------------------------------------------------------------------------
# Qwen2-Audio
# --------------------------------------------------------------------------------------------------


_QWEN2_AUDIO_WINDOW_S = 2  # seconds of audio the feature extractor pads every clip to (30 in Qwen2-Audio)


def _build_qwen2_audio(s):
    import transformers as T

    sr, hop = 16000, 160
    tok = make_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"},
        extra=["<|im_start|>"],
        chat_template=chatml_template(
            audio="Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n", system="You are a helpful assistant."
        ),
    )
    fe = T.WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=sr,
        hop_length=hop,
        chunk_length=_QWEN2_AUDIO_WINDOW_S,
        n_fft=400,
        return_attention_mask=True,
    )
    proc = T.Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=tok.chat_template)
    frames = _QWEN2_AUDIO_WINDOW_S * sr // hop  # mel frames of the padded window
    audio = T.Qwen2AudioEncoderConfig(
        num_mel_bins=128,
        encoder_layers=s["audio_layers"],
        encoder_attention_heads=s["audio_heads"],
        encoder_ffn_dim=2 * s["audio_hidden"],
        d_model=s["audio_hidden"],
        max_source_positions=frames // 2,  # the encoder checks input_features' length against 2 x this
    )
    cfg = T.Qwen2AudioConfig(
        audio_config=audio,
        text_config=qwen2_text(s, tokenizer_vocab_size(tok, s), tok),
        audio_token_index=tok.audio_token_id,
    )
    seconds = 1.0
    mel = int(seconds * sr) // hop  # WhisperFeatureExtractor's attention mask: one frame per hop
    conv = (mel - 1) // 2 + 1  # the encoder's stride-2 convolution
    n_audio = (conv - 2) // 2 + 1  # the 2 x average pooling after the encoder
    extra = {
        "modalities": ("audio",),
        "sampling_rate": sr,
        "audio_seconds": seconds,
        "audio_tokens_per_clip": n_audio,
    }
    return T.Qwen2AudioForConditionalGeneration, cfg, proc, extra


# --------------------------------------------------------------------------------------------------
# Gemma 4
# --------------------------------------------------------------------------------------------------


def _gemma4_template(image: str = "<|image|>", audio: str = "<|audio|>") -> str:
    # Gemma 4 style: "<bos><|turn>user\n<|image|>What is this?<turn|>\n<|turn>model\n"
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<|turn>' + role + '\\n' }}" + content_template(image, audio) + "{{ '<turn|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}"
    )


def _gemma4_positions(model) -> None:
    # the vision patch embedder's 2-D position table is initialised to ones (every patch would get the
    # same position embedding); real checkpoints learn it: re-draw it (seeded)
    table = model.model.vision_tower.patch_embedder.position_embedding_table
    table.copy_((0.02 * torch.randn(table.shape)).to(table.dtype))


def _build_gemma4(s):
    import transformers as T

    from transformers.models.gemma4.image_processing_gemma4 import (
        _SUPPORTED_SOFT_TOKENS,
        get_aspect_ratio_preserving_size,
    )

    patch, pool = 8, 3
    # the processors take soft-token budgets of 70, 140, 280, ... only: the smallest that holds image_tokens;
    # a square image then gets the largest grid of 3 x 3-patch cells within the budget (8 x 8 for 70)
    budget = min([b for b in _SUPPORTED_SOFT_TOKENS if b >= s["image_tokens"]] or [max(_SUPPORTED_SOFT_TOKENS)])
    side, _ = get_aspect_ratio_preserving_size(
        height=1024, width=1024, patch_size=patch, max_patches=budget * pool * pool, pooling_kernel_size=pool
    )
    t = side // (pool * patch)
    named = {
        "image_token": "<|image|>",
        "boi_token": "<|image>",
        "eoi_token": "<image|>",
        "audio_token": "<|audio|>",
        "boa_token": "<|audio>",
        "eoa_token": "<audio|>",
    }
    tok = make_tokenizer(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        named=named,
        extra=["<|turn>", "<turn|>", "<|video|>"],
        order=["<pad>", "<eos>", "<bos>", "<unk>"],
        chat_template=_gemma4_template(),
    )
    grid = dict(patch_size=patch, pooling_kernel_size=pool, max_soft_tokens=budget)
    ip = T.Gemma4ImageProcessor(**grid)
    vp = T.Gemma4VideoProcessor(**grid)
    fe = T.Gemma4AudioFeatureExtractor()
    proc = T.Gemma4Processor(
        feature_extractor=fe,
        image_processor=ip,
        tokenizer=tok,
        video_processor=vp,
        chat_template=tok.chat_template,
        image_seq_length=t * t,
    )
    n = s["layers"]
    head_dim = s["hidden"] // s["heads"]
    layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(n)]
    layer_types[-1] = "full_attention"  # Gemma 4 requires a global last layer
    vocab = tokenizer_vocab_size(tok, s)
    text = T.Gemma4TextConfig(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=n,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=head_dim,
        global_head_dim=2 * head_dim,  # global layers: twice the head dim (512 vs 256 in Gemma 4)
        max_position_embeddings=4096,
        sliding_window=16,
        layer_types=layer_types,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        vocab_size_per_layer_input=vocab,
        hidden_size_per_layer_input=max(2, s["hidden"] // 4),  # per-layer embeddings (256 in Gemma 4 E2B)
        final_logit_softcapping=30.0,
        use_bidirectional_attention="vision",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    vision = T.Gemma4VisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        num_key_value_heads=s["vision_heads"],
        head_dim=s["vision_hidden"] // s["vision_heads"],
        patch_size=patch,
        pooling_kernel_size=pool,
        position_embedding_size=64,
    )
    c = tok.convert_tokens_to_ids
    cfg = T.Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        boi_token_id=tok.boi_token_id,
        eoi_token_id=tok.eoi_token_id,
        image_token_id=tok.image_token_id,
        video_token_id=c("<|video|>"),
        boa_token_id=tok.boa_token_id,
        eoa_token_index=tok.eoa_token_id,
        audio_token_id=tok.audio_token_id,
    )
    extra = {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": t * t}
    return ModelClass(T.Gemma4ForConditionalGeneration, post=_gemma4_positions), cfg, proc, extra


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


BUILDERS: dict[str, Callable[[dict[str, Any]], tuple]] = {
    "qwen3_vl": _build_qwen3_vl,
    "mistral3": _build_mistral3,
    "llava_onevision": _build_llava_onevision,
    "glm4v": _build_glm4v,
    "qwen2_audio": _build_qwen2_audio,
    "gemma4": _build_gemma4,
}

FAMILIES: dict[str, str] = {
    "qwen3_vl": "Qwen3VLForConditionalGeneration (DeepStack vision features, interleaved M-RoPE)",
    "mistral3": "Mistral3ForConditionalGeneration (Pixtral vision, 2 x 2 patch merger, Mistral text)",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration (SigLIP, anyres grid + newlines, Qwen2 text)",
    "glm4v": "Glm4vForConditionalGeneration (GLM-4.1V: 2 x 2 merge, M-RoPE on half the head dim)",
    "qwen2_audio": "Qwen2AudioForConditionalGeneration (Whisper-style audio encoder + Qwen2, audio only)",
    "gemma4": "Gemma4ForConditionalGeneration (pooled ViT, per-layer embeddings, sliding / global layers)",
}

_TINY_BUILDERS.update(BUILDERS)
_TINY_FAMILIES.update(FAMILIES)
