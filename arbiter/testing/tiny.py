"""A zoo of tiny, randomly initialised Hugging Face models with real, offline processors.

``tiny(family)`` builds a model from the family's real ``transformers`` config and model classes
(random weights, eval mode, ``attn_implementation="sdpa"``) together with a real processor of that
family built entirely offline: a byte-level BPE tokenizer trained in memory on a small fixed corpus,
wrapped in ``PreTrainedTokenizerFast`` with the family's special tokens and chat template, plus the
family's image processor (and feature extractor for audio) configured for small inputs.

Everything is deterministic in ``seed``: the same call gives the same weights, tokenizer and
processor. Nothing is downloaded.

Example::

    tm = tiny("llava")
    inputs = tm.processor(text=tm.prompt("What colour is the circle?"),
                          images=[tm.make_image(0)], return_tensors="pt")
    logits = tm.model(**inputs).logits
    batch = tm.inputs([tm.prompt("Hi"), tm.prompt("What shape?")], padding=True)  # 1 image per prompt

Size knobs (``**sizes``) with their defaults:

* ``hidden`` (64): text hidden size.
* ``layers`` (4): text decoder layers (for ``mllama`` the cross-attention layers are among them).
* ``heads`` (4), ``kv_heads`` (2): attention heads and key/value heads (grouped-query attention).
* ``intermediate`` (2 * hidden): text MLP width.
* ``image_tokens`` (16): approximate number of image tokens per image, where the family allows choosing.
* ``vision_hidden`` (32), ``vision_layers`` (2), ``vision_heads`` (2): vision tower sizes.
* ``audio_hidden`` (32), ``audio_layers`` (2), ``audio_heads`` (2): audio tower sizes (omni, gemma3n).
* ``vocab`` (None): minimum number of rows of the model's embedding matrix; by default the
  tokenizer decides (``len(tokenizer)``). Ignored by ``gemma3n``, whose vocabulary layout (text,
  then vision, then audio token ranges) is fixed by the tokenizer.

Offsets: the tokenizer pre-tokenizes byte-level with the GPT-2 regex, so (as in the real Qwen2 and
Llama 3 tokenizers) a word's token carries its leading space ("Ġred") and its offset span covers it.

Per-family choices (all use the real config, model and processor classes):

* ``llava``: CLIP ViT/14 + Llama, ``image_tokens=576`` gives LLaVA-1.5's 336 px / 24 x 24 patches.
* ``llava_next``: anyres grid pinpoints ``[s, s], [s, 2s], [2s, s], [2s, 2s]``; the square
  ``make_image`` gives ``2 n^2 + n`` tokens (base patches, unpadded grid, newlines) ~ ``image_tokens``.
* ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen2_5_omni``: patch 14 with 2 x 2 merge (one token per 28 x 28
  px); the image processor's pixel bounds cap every image at ~``image_tokens`` tokens; M-RoPE
  sections scaled to the head dim; Qwen2.5 vision uses window attention (window 56 px) with the last
  block global. Omni: Whisper features (128 mels, 16 kHz) into the real audio encoder.
* ``gemma3``: SigLIP with 2 x 2 average pooling to ``image_tokens`` soft tokens (4 x 4 in Gemma 3),
  no pan-and-scan. Placeholder in the prompt: ``<start_of_image>``.
* ``gemma3n``: the real vision tower -- timm's MobileNetV5 encoder -- with a toy 4-stage block
  layout passed through ``vision_config.model_args`` (its output width is fixed at 2048 by timm),
  and the real USM-style audio tower. ``modalities`` is ``("image",)``; audio works too:
  ``prompt(text, modalities=("image", "audio"))`` plus ``audio=[tm.make_audio()]`` (32 audio soft
  tokens per clip, enough for ~5 s). Token ids follow Gemma 3n's layout: text, then a vision range,
  then an audio range at the end of the vocabulary.
* ``internvl``: InternViT + pixel shuffle (0.5) + Qwen2; one tile for the square ``make_image``.
* ``idefics3`` / ``smolvlm``: no image splitting (one global image), pixel-shuffle scale factor 2.
  SmolVLMProcessor needs ``num2words`` only to spell video frame counts; when it is missing a
  stand-in is installed on the processor module.
* ``paligemma``: no chat template; ``prompt`` puts ``<image>`` first and the processor adds BOS and
  the trailing newline. Its processor adds 1024 ``<locNNNN>`` + 128 ``<segNNN>`` tokens.
* ``mllama``: up to 2 tiles per image; cross-attention layers at every 4th layer from index 2
  (``layers=4`` -> layer 2). The prompt holds one ``<|image|>`` token.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["FAMILIES", "TinyModel", "tiny"]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

_WORDS = """
the a an and or but not no yes of to in on at by for with from into over under about between
is are was were be been being has have had do does did can could will would should must may might
it its this that these those there here what which who whom whose where when why how many much
i you he she we they me him her us them my your his our their mine yours
image picture photo photograph scene object objects shape shapes colour colours color colors
question answer text context content input output word words phrase single rely rather than
case inconsistency consistent inconsistent between true false correct wrong left right top bottom
middle center centre above below next near far big small large tiny little bright dark light
describe show shows see look looks contains contain depicts depict count number
red green blue yellow purple orange black white pink brown grey gray cyan magenta violet
circle square triangle star rectangle hexagon oval diamond heart cross line dot ellipse pentagon
happy neutral sad angry disgust fear surprise surprised fearful disgusted calm emotion emotions
face person man woman child dog cat bird car tree house sky sea sun moon flower ball book table
one two three four five six seven eight nine ten zero first second third last
user assistant system model please tell me given following based only
""".split()

_SENTENCES = [
    "Text context:",
    "In case there is an inconsistency between the Text Context and the input image content, "
    "you must rely on the image content rather than the text context.",
    "Answer the question using a single word or phrase.",
    "What colour is the shape in the image?",
    "What shape is shown in the image?",
    "What is the emotion of the person?",
    "How many objects are there in the picture?",
    "The red circle is above the blue square.",
    "A green triangle and a yellow star.",
    "The person looks happy, sad, angry or neutral.",
    "Is there a dog in the image? Yes. No.",
    "Describe the image in one word.",
    "You are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024",
    ". , ; : ! ? ' \" ( ) [ ] { } - _ / \\ * + = < > # @ & % $ | ~",
    "answer en What is this? caption en",
]


def _corpus() -> list[str]:
    lines = list(_SENTENCES)
    words = _WORDS
    n = len(words)
    # every word both at the start of a line and after a space, lower-case and capitalised
    for i in range(0, n, 8):
        chunk = words[i : i + 8]
        lines.append(" ".join(chunk))
        lines.append(" ".join(w.capitalize() for w in chunk))
        lines.append(" " + " ".join(chunk) + ".")
    for w in words:
        lines.append(w)
        lines.append(w.capitalize())
    for d in range(10):
        lines.append(f"{d} {d}{d} {d}.")
    return lines


@functools.lru_cache(maxsize=1)
def _base_tokenizer_json() -> str:
    """Byte-level BPE trained in memory on a fixed corpus (deterministic); no special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def make_tokenizer(
    *,
    bos: str | None,
    eos: str,
    pad: str,
    unk: str | None = None,
    add_bos: bool = False,
    named: dict[str, str] | None = None,
    extra: list[str] | None = None,
    order: list[str] | None = None,
    chat_template: str | None = None,
    padding_side: str = "right",
):
    """Wrap the base BPE in ``PreTrainedTokenizerFast`` and add the family's special tokens.

    ``named`` become model-specific named special tokens (``tokenizer.image_token``,
    ``tokenizer.image_token_id``...), saved in ``tokenizer_config.json``; ``extra`` are further
    special tokens without a name. All special tokens get ids right after the BPE vocabulary, in
    the order bos, eos, unk, pad, named, extra -- or in ``order`` when given (tokens of ``order``
    come first, the rest after them).
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    named = dict(named or {})
    extra = list(extra or [])
    default = [t for t in (bos, eos, unk, pad) if t is not None] + list(named.values()) + extra
    specials = list(order or [])
    specials += [t for t in default if t not in specials]
    specials = list(dict.fromkeys(specials))

    backend = Tokenizer.from_str(_base_tokenizer_json())
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    kwargs: dict[str, Any] = dict(named)
    kwargs.update(eos_token=eos, pad_token=pad, padding_side=padding_side)
    if bos is not None:
        kwargs["bos_token"] = bos
    if unk is not None:
        kwargs["unk_token"] = unk
    if add_bos:
        kwargs["add_bos_token"] = True
    unnamed = [t for t in specials if t not in named.values() and t not in (bos, eos, unk, pad)]
    if unnamed:
        kwargs["extra_special_tokens"] = unnamed
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, **kwargs)
    if bos is None:
        # TokenizersBackend defaults bos to "<s>" when none is given; families without BOS don't have one
        tok.bos_token = None
    return tok


# --------------------------------------------------------------------------------------------------
# Chat templates (Jinja, in each family's style)
# --------------------------------------------------------------------------------------------------


def content_template(image: str, audio: str = "", video: str = "") -> str:
    """Jinja snippet rendering ``message['content']`` (a string or a list of typed parts)."""
    return (
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- elif part['type'] == 'image' -%}" + "{{ " + repr(image) + " }}"
        "{%- elif part['type'] == 'audio' -%}" + "{{ " + repr(audio) + " }}"
        "{%- elif part['type'] == 'video' -%}" + "{{ " + repr(video) + " }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
    )


def chatml_template(image: str = "", audio: str = "", video: str = "", system: str | None = None) -> str:
    sys = ""
    if system is not None:
        sys = (
            "{%- if messages[0]['role'] != 'system' -%}"
            "{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}{%- endif -%}"
        )
    return (
        sys + "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        + content_template(image, audio, video)
        + "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def _gemma_template(image: str = "", audio: str = "") -> str:
    return (
        "{%- for message in messages -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role + '\\n' }}" + content_template(image, audio) + "{{ '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    )


def _llava_template() -> str:
    # llava-hf/llava-1.5 style: "USER: <image>\nWhat is this? ASSISTANT:"
    return (
        "{%- for message in messages -%}"
        "{{ message['role'].upper() + ': ' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}"
        "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
        "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
        "{%- endif -%}{{ ' ' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def _llava_next_template() -> str:
    # llava-v1.6-mistral style: "[INST] <image>\nWhat is this? [/INST]"
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ '[INST] ' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}"
        "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
        "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
        "{%- endif -%}{{ ' [/INST]' }}"
        "{%- else -%}{{ ' ' }}" + content_template("") + "{{ eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    )


def _llama3_template(image: str = "<|image|>") -> str:
    return (
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        + content_template(image)
        + "{{ '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    )


def _idefics3_template() -> str:
    # HuggingFaceM4/Idefics3 style: "User:<image>What is this?<end_of_utterance>\nAssistant:"
    return (
        "{%- for message in messages -%}"
        "{{ message['role'] | capitalize }}"
        "{%- if message['content'] is string -%}{{ ': ' + message['content'] }}"
        "{%- else -%}"
        "{%- if message['content'][0]['type'] == 'image' -%}{{ ':' }}{%- else -%}{{ ': ' }}{%- endif -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- elif part['type'] == 'image' -%}{{ '<image>' }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<end_of_utterance>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
    )


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------


@dataclass
class TinyModel:
    """A tiny random model with its real processor.

    ``processor`` is the family's processor class (for text-only families: the tokenizer).
    ``image_size`` is ``(width, height)`` of the images ``make_image`` produces and
    ``image_tokens_per_image`` the number of image-placeholder tokens (``config.image_token_id``)
    the processor puts in ``input_ids`` for one such image (for mllama: the single ``<|image|>``);
    ``sampling_rate`` is that of ``make_audio`` (None without audio) and ``audio_tokens_per_clip``, where
    set, the number of audio-placeholder tokens the processor puts in ``input_ids`` for one such clip.
    """

    model: Any
    processor: Any
    family: str
    modalities: tuple[str, ...] = ()
    image_size: tuple[int, int] | None = None
    image_tokens_per_image: int | None = None
    sampling_rate: int | None = None
    audio_seconds: float = 1.0
    audio_tokens_per_clip: int | None = None
    sizes: dict[str, Any] = field(default_factory=dict)
    _prompt: Callable[[TinyModel, str, tuple[str, ...]], str] | None = field(default=None, repr=False)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def config(self):
        return self.model.config

    def make_image(self, seed: int = 0):
        """A random RGB ``PIL.Image`` of the size the processor expects (uniform noise, seeded)."""
        from PIL import Image

        if self.image_size is None:
            raise ValueError(f"family {self.family!r} takes no images")
        w, h = self.image_size
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).convert("RGB")

    def make_audio(self, seed: int = 0) -> np.ndarray:
        """A random 1-D float32 waveform (about ``audio_seconds`` long) at ``sampling_rate``."""
        if self.sampling_rate is None:
            raise ValueError(f"family {self.family!r} takes no audio")
        rng = np.random.default_rng(seed)
        n = int(self.sampling_rate * self.audio_seconds)
        t = np.arange(n) / self.sampling_rate
        freq = 200.0 + 600.0 * rng.random()
        wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.1 * rng.standard_normal(n)
        return wave.astype(np.float32)

    def inputs(
        self,
        text: str | list[str] | None = None,
        *,
        image_seeds: int | list[int] | None = None,
        audio_seeds: int | list[int] | None = None,
        return_tensors: str = "pt",
        **processor_kwargs,
    ):
        """Processor outputs for ``text`` (a prompt or a batch of prompts; default: one
        ``prompt(...)``) with one ``make_image`` / ``make_audio`` item per prompt for each modality in
        ``modalities``. Seeds default to 0, 1, 2... per prompt. Images go to the processor as one
        list per prompt, the layout every family's processor accepts for batches (Gemma 3, SmolVLM
        and Mllama reject a flat list of images for a batch of prompts). Floating-point tensors are
        cast to the model's dtype."""
        if text is None:
            text = self.prompt("What colour is the shape in the image?")
        batch = [text] if isinstance(text, str) else list(text)

        def seeds(given):
            if given is None:
                return list(range(len(batch)))
            given = [given] if isinstance(given, int) else list(given)
            if len(given) != len(batch):
                raise ValueError(f"{len(given)} seeds for {len(batch)} prompts")
            return given

        if not self.modalities:
            return self.processor(text, return_tensors=return_tensors, **processor_kwargs)
        kwargs = dict(processor_kwargs)
        if "image" in self.modalities:
            kwargs["images"] = [[self.make_image(s)] for s in seeds(image_seeds)]
        if "audio" in self.modalities:
            kwargs["audio"] = [self.make_audio(s) for s in seeds(audio_seeds)]
        out = self.processor(text=text, return_tensors=return_tensors, **kwargs)
        dtype = getattr(self.model, "dtype", torch.float32)
        if return_tensors == "pt" and dtype != torch.float32:
            out = out.to(dtype)  # pixel values / audio features to the model's dtype (ids stay int)
        return out

    def prompt(self, text: str, modalities: tuple[str, ...] | None = None) -> str:
        """A user-turn prompt containing ``text`` and the placeholder(s) the processor expects for one
        item of each modality in ``modalities`` (default: ``self.modalities``; image before audio),
        ending with the generation prompt when the family has a chat template."""
        modalities = self.modalities if modalities is None else tuple(modalities)
        if self._prompt is not None:
            return self._prompt(self, text, modalities)
        return _chat_prompt(self, text, modalities)


def _chat_prompt(tm: TinyModel, text: str, modalities: tuple[str, ...]) -> str:
    holder = tm.processor
    if getattr(holder, "chat_template", None) is None:
        if modalities:
            raise ValueError(f"family {tm.family!r} has no chat template")
        return text
    if holder is tm.tokenizer:  # text-only family: plain string content
        messages = [{"role": "user", "content": text}]
    else:
        parts: list[dict[str, str]] = [{"type": m} for m in modalities]
        parts.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": parts}]
    return holder.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


_DEFAULTS = dict(
    hidden=64,
    layers=4,
    heads=4,
    kv_heads=2,
    intermediate=None,
    image_tokens=16,
    vision_hidden=32,
    vision_layers=2,
    vision_heads=2,
    audio_hidden=32,
    audio_layers=2,
    audio_heads=2,
    vocab=None,
)


def _resolve_sizes(sizes: dict[str, Any]) -> dict[str, Any]:
    unknown = set(sizes) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown size knob(s) {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
    s = {**_DEFAULTS, **{k: v for k, v in sizes.items() if v is not None}}
    if s["intermediate"] is None:
        s["intermediate"] = 2 * s["hidden"]
    if s["hidden"] % s["heads"]:
        raise ValueError(f"hidden={s['hidden']} must be a multiple of heads={s['heads']}")
    if s["heads"] % s["kv_heads"]:
        raise ValueError(f"heads={s['heads']} must be a multiple of kv_heads={s['kv_heads']}")
    if (s["hidden"] // s["heads"]) % 2:
        raise ValueError("hidden // heads (the head dim) must be even for rotary embeddings")
    return s


def tokenizer_vocab_size(tok, s) -> int:
    n = len(tok)
    if s["vocab"] is not None:
        n = max(n, int(s["vocab"]))
    return n


def grid_side(tokens: int) -> int:
    return max(1, int(round(math.sqrt(tokens))))


def _llama_text(s, vocab, tok, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def qwen2_text(s, vocab, tok, cls=None, **extra):
    from transformers import Qwen2Config

    cls = cls or Qwen2Config
    return cls(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def _gemma_text(s, vocab, tok, **extra):
    from transformers import GemmaConfig

    return GemmaConfig(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["hidden"] // s["heads"],
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def mrope_sections(head_dim: int) -> list[int]:
    half = head_dim // 2
    hw = (half * 3) // 8
    return [half - 2 * hw, hw, hw]


def _clip_vision(s, image_size, patch):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=image_size,
        patch_size=patch,
        projection_dim=s["vision_hidden"],
    )


def siglip_vision(s, image_size, patch, **extra):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=image_size,
        patch_size=patch,
        **extra,
    )


# --------------------------------------------------------------------------------------------------
# Families. Each builder returns (model_class, config, processor, TinyModel kwargs).
# --------------------------------------------------------------------------------------------------


def _build_llama(s):
    from transformers import LlamaForCausalLM

    tok = make_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True)
    cfg = _llama_text(s, tokenizer_vocab_size(tok, s), tok)
    return LlamaForCausalLM, cfg, tok, {}


def _build_qwen2(s):
    from transformers import Qwen2ForCausalLM

    tok = make_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=["<|im_start|>"],
        chat_template=chatml_template(system="You are a helpful assistant."),
    )
    cfg = qwen2_text(s, tokenizer_vocab_size(tok, s), tok)
    return Qwen2ForCausalLM, cfg, tok, {}


def _build_gemma(s):
    from transformers import GemmaForCausalLM

    tok = make_tokenizer(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        extra=["<start_of_turn>", "<end_of_turn>"],
        chat_template=_gemma_template(),
    )
    cfg = _gemma_text(s, tokenizer_vocab_size(tok, s), tok)
    return GemmaForCausalLM, cfg, tok, {}


def _build_llava(s):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    patch = 14  # CLIP ViT-L/14; image_tokens=576 gives LLaVA-1.5's 336 px, 24 x 24 patches
    side = grid_side(s["image_tokens"]) * patch
    tok = make_tokenizer(
        bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True, named={"image_token": "<image>"}
    )
    ip = CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
    )
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_llava_template(),
    )
    cfg = LlavaConfig(
        vision_config=_clip_vision(s, side, patch),
        text_config=_llama_text(s, tokenizer_vocab_size(tok, s), tok),
        image_token_index=tok.image_token_id,
        image_seq_length=(side // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return (
        LlavaForConditionalGeneration,
        cfg,
        proc,
        {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": (side // patch) ** 2},
    )


def _build_llava_next(s):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    # square image of the base resolution -> best grid [side, side] -> features: n*n base + n*n + n
    patch = 14
    n = max(1, int(round((-1 + math.sqrt(1 + 8 * s["image_tokens"])) / 4)))
    side = n * patch
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    tok = make_tokenizer(
        bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True, named={"image_token": "<image>"}
    )
    ip = LlavaNextImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_llava_next_template(),
    )
    cfg = LlavaNextConfig(
        vision_config=_clip_vision(s, side, patch),
        text_config=_llama_text(s, tokenizer_vocab_size(tok, s), tok),
        image_token_index=tok.image_token_id,
        image_grid_pinpoints=pinpoints,
        image_seq_length=n * n,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return (
        LlavaNextForConditionalGeneration,
        cfg,
        proc,
        {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": 2 * n * n + n},
    )


def _qwen_vl_image_side(s) -> int:
    return grid_side(s["image_tokens"]) * 28  # patch 14, 2x2 merge -> one token per 28x28 pixels


def _qwen_vl_processors(side: int, video: bool = True):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min(56 * 56, side * side), "longest_edge": side * side}
    ip = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    vp = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2) if video else None
    return ip, vp


QWEN_VL_TOKENS = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _build_qwen2_vl_like(s, family):
    import transformers as T

    side = _qwen_vl_image_side(s)
    tok = make_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=QWEN_VL_TOKENS,
        chat_template=chatml_template(
            image="<|vision_start|><|image_pad|><|vision_end|>",
            video="<|vision_start|><|video_pad|><|vision_end|>",
            system="You are a helpful assistant.",
        ),
    )
    ip, vp = _qwen_vl_processors(side)
    vocab = tokenizer_vocab_size(tok, s)
    head_dim = s["hidden"] // s["heads"]
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_sections(head_dim)}
    text_kw = dict(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        rope_parameters=rope,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    ids = dict(
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    if family == "qwen2_vl":
        proc = T.Qwen2VLProcessor(
            image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template
        )
        vision = T.Qwen2VLVisionConfig(
            depth=s["vision_layers"],
            embed_dim=s["vision_hidden"],
            hidden_size=s["hidden"],
            mlp_ratio=2,
            num_heads=s["vision_heads"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        cfg = T.Qwen2VLConfig(text_config=T.Qwen2VLTextConfig(**text_kw), vision_config=vision, **ids)
        cls = T.Qwen2VLForConditionalGeneration
    else:
        proc = T.Qwen2_5_VLProcessor(
            image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template
        )
        vision = T.Qwen2_5_VLVisionConfig(
            depth=s["vision_layers"],
            hidden_size=s["vision_hidden"],
            intermediate_size=2 * s["vision_hidden"],
            num_heads=s["vision_heads"],
            out_hidden_size=s["hidden"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[s["vision_layers"] - 1],
        )
        cfg = T.Qwen2_5_VLConfig(text_config=T.Qwen2_5_VLTextConfig(**text_kw), vision_config=vision, **ids)
        cls = T.Qwen2_5_VLForConditionalGeneration
    return (
        cls,
        cfg,
        proc,
        {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": (side // 28) ** 2},
    )


def _build_qwen2_vl(s):
    return _build_qwen2_vl_like(s, "qwen2_vl")


def _build_qwen2_5_vl(s):
    return _build_qwen2_vl_like(s, "qwen2_5_vl")


_OMNI_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)


def _build_qwen2_5_omni(s):
    import transformers as T

    side = _qwen_vl_image_side(s)
    named = {
        "image_token": "<|IMAGE|>",
        "audio_token": "<|AUDIO|>",
        "video_token": "<|VIDEO|>",
        "vision_bos_token": "<|vision_bos|>",
        "vision_eos_token": "<|vision_eos|>",
        "audio_bos_token": "<|audio_bos|>",
        "audio_eos_token": "<|audio_eos|>",
    }
    tok = make_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named=named,
        extra=["<|im_start|>"],
        padding_side="left",
        chat_template=chatml_template(
            image="<|vision_bos|><|IMAGE|><|vision_eos|>",
            audio="<|audio_bos|><|AUDIO|><|audio_eos|>",
            video="<|vision_bos|><|VIDEO|><|vision_eos|>",
            system=_OMNI_SYSTEM,
        ),
    )
    ip, vp = _qwen_vl_processors(side)
    fe = T.WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400, return_attention_mask=True
    )
    proc = T.Qwen2_5OmniProcessor(
        image_processor=ip, video_processor=vp, feature_extractor=fe, tokenizer=tok, chat_template=tok.chat_template
    )
    vocab = tokenizer_vocab_size(tok, s)
    head_dim = s["hidden"] // s["heads"]
    text = T.Qwen2_5OmniTextConfig(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_sections(head_dim)},
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    vision = T.Qwen2_5OmniVisionEncoderConfig(
        depth=s["vision_layers"],
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_heads=s["vision_heads"],
        out_hidden_size=s["hidden"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[s["vision_layers"] - 1],
    )
    audio = T.Qwen2_5OmniAudioEncoderConfig(
        num_mel_bins=128,
        encoder_layers=s["audio_layers"],
        encoder_attention_heads=s["audio_heads"],
        encoder_ffn_dim=2 * s["audio_hidden"],
        d_model=s["audio_hidden"],
        output_dim=s["hidden"],
        max_source_positions=1500,
        n_window=100,
    )
    c = tok.convert_tokens_to_ids
    cfg = T.Qwen2_5OmniThinkerConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        audio_token_index=tok.audio_token_id,
        image_token_index=tok.image_token_id,
        video_token_index=tok.video_token_id,
        audio_start_token_id=tok.audio_bos_token_id,
        audio_end_token_id=tok.audio_eos_token_id,
        vision_start_token_id=tok.vision_bos_token_id,
        vision_end_token_id=tok.vision_eos_token_id,
        user_token_id=c("user"),
    )
    extra = {
        "modalities": ("image", "audio"),
        "image_size": (side, side),
        "image_tokens_per_image": (side // 28) ** 2,
        "sampling_rate": 16000,
    }
    return T.Qwen2_5OmniThinkerForConditionalGeneration, cfg, proc, extra


def _build_gemma3(s):
    import transformers as T

    t = grid_side(s["image_tokens"])  # tokens per side after pooling
    patch = 8
    side = 2 * t * patch  # 2x2 average pooling of the SigLIP patch grid, as in Gemma 3 (4x4 there)
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = make_tokenizer(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        named=named,
        extra=["<start_of_turn>", "<end_of_turn>"],
        chat_template=_gemma_template(image="<start_of_image>"),
    )
    ip = T.Gemma3ImageProcessor(size={"height": side, "width": side}, do_pan_and_scan=False)
    proc = T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=t * t, chat_template=tok.chat_template)
    head_dim = s["hidden"] // s["heads"]
    layer_types = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(s["layers"])]
    layer_types[-1] = "full_attention"
    text = T.Gemma3TextConfig(
        vocab_size=tokenizer_vocab_size(tok, s),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=4096,
        sliding_window=512,
        layer_types=layer_types,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = siglip_vision(s, side, patch, vision_use_head=False)
    cfg = T.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=t * t,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    return (
        T.Gemma3ForConditionalGeneration,
        cfg,
        proc,
        {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": t * t},
    )


def _build_paligemma(s):
    import transformers as T

    patch = 8
    side = grid_side(s["image_tokens"]) * patch
    n_img = (side // patch) ** 2
    tok = make_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True)
    ip = T.SiglipImageProcessor(size={"height": side, "width": side})
    ip.image_seq_length = n_img
    # the processor adds <image> and 1024 <locNNNN> + 128 <segNNN> tokens, so size the model after it
    proc = T.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    vocab = tokenizer_vocab_size(tok, s)
    text = _gemma_text(s, vocab, tok)
    vision = siglip_vision(s, side, patch, vision_use_head=False)
    cfg = T.PaliGemmaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vocab_size=vocab,
        projection_dim=s["hidden"],
        hidden_size=s["hidden"],
    )
    extra = {
        "modalities": ("image",),
        "image_size": (side, side),
        "image_tokens_per_image": n_img,
        "_prompt": _paligemma_prompt,
    }
    return T.PaliGemmaForConditionalGeneration, cfg, proc, extra


def _paligemma_prompt(tm: TinyModel, text: str, modalities: tuple[str, ...]) -> str:
    # PaliGemma has no chat template: image tokens first, then the prefix; the processor inserts BOS
    # after the image tokens and a trailing "\n" (the separator before the suffix).
    return "<image>" * modalities.count("image") + text


def _build_internvl(s):
    import transformers as T

    patch = 8
    side = 2 * grid_side(s["image_tokens"]) * patch  # pixel shuffle with downsample_ratio 0.5
    n_img = (side // patch) ** 2 // 4
    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tok = make_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named=named,
        extra=["<|im_start|>"],
        padding_side="left",
        chat_template=chatml_template(image="<IMG_CONTEXT>\n", video="<video>\n"),
    )
    ip = T.GotOcr2ImageProcessor(
        size={"height": side, "width": side}, crop_to_patches=False, min_patches=1, max_patches=4
    )
    vp = T.InternVLVideoProcessor(size={"height": side, "width": side})
    proc = T.InternVLProcessor(
        image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_length=n_img, chat_template=tok.chat_template
    )
    text = qwen2_text(s, tokenizer_vocab_size(tok, s), tok, tie_word_embeddings=False)
    vision = T.InternVLVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=[side, side],
        patch_size=[patch, patch],
        use_mean_pooling=False,
    )
    cfg = T.InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.context_image_token_id,
        image_seq_length=n_img,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return (
        T.InternVLForConditionalGeneration,
        cfg,
        proc,
        {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": n_img},
    )


def _idefics_like(s, family):
    import transformers as T

    patch = 8
    scale = 2
    side = scale * grid_side(s["image_tokens"]) * patch
    seq = (side // patch) ** 2 // (scale * scale)
    if family == "idefics3":
        # Idefics3-8B: Llama 3 tokenizer
        tok = make_tokenizer(
            bos="<|begin_of_text|>",
            eos="<end_of_utterance>",
            pad="<|finetune_right_pad_id|>",
            add_bos=True,
            extra=["<fake_token_around_image>", "<image>", "<global-img>"],
            chat_template=_idefics3_template(),
        )
    else:
        # SmolVLM: SmolLM2 tokenizer (ChatML-ish special tokens) with named image tokens
        named = {
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
            "video_token": "<video>",
        }
        tok = make_tokenizer(
            bos="<|im_start|>",
            eos="<end_of_utterance>",
            pad="<|im_end|>",
            named=named,
            chat_template=None,
        )
    ip_cls = T.Idefics3ImageProcessor if family == "idefics3" else T.SmolVLMImageProcessor
    ip = ip_cls(
        size={"longest_edge": side},
        max_image_size={"longest_edge": side},
        do_image_splitting=False,
    )
    if family == "idefics3":
        proc = T.Idefics3Processor(
            image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=tok.chat_template
        )
    else:
        _ensure_num2words()
        from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

        vp = T.SmolVLMVideoProcessor(size={"longest_edge": side}, max_image_size={"longest_edge": side})
        proc = T.SmolVLMProcessor(
            image_processor=ip,
            tokenizer=tok,
            video_processor=vp,
            image_seq_len=seq,
            chat_template=DEFAULT_CHAT_TEMPLATE,
        )
    text = _llama_text(s, tokenizer_vocab_size(tok, s), tok, rms_norm_eps=1e-5)
    vcls = T.Idefics3VisionConfig if family == "idefics3" else T.SmolVLMVisionConfig
    vision = vcls(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=side,
        patch_size=patch,
    )
    ccls = T.Idefics3Config if family == "idefics3" else T.SmolVLMConfig
    cfg = ccls(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        pad_token_id=tok.pad_token_id,
    )
    mcls = T.Idefics3ForConditionalGeneration if family == "idefics3" else T.SmolVLMForConditionalGeneration
    return mcls, cfg, proc, {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": seq}


def _ensure_num2words() -> None:
    """SmolVLMProcessor refuses to build without ``num2words`` (used only to spell video frame
    counts). When it is not installed, give the processor module a minimal stand-in."""
    from transformers.models.smolvlm import processing_smolvlm as m

    if getattr(m, "num2words", None) is None:
        m.num2words = lambda n, *a, **k: str(n)


def _build_idefics3(s):
    return _idefics_like(s, "idefics3")


def _build_smolvlm(s):
    return _idefics_like(s, "smolvlm")


def _build_mllama(s):
    import transformers as T

    patch = 8
    side = grid_side(s["image_tokens"]) * patch  # tile size; (side/patch)^2 + 1 vision tokens per tile
    max_tiles = 2
    tok = make_tokenizer(
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        named={"image_token": "<|image|>"},
        extra=["<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"],
        chat_template=_llama3_template(),
    )
    ip = T.MllamaImageProcessor(size={"height": side, "width": side}, max_image_tiles=max_tiles)
    proc = T.MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    n = s["layers"]
    # cross-attention layers among the self-attention ones (Llama 3.2 Vision: every 5th, from 3;
    # here every 4th, from 2, so that self-attention layers follow the first one)
    cross = [i for i in range(n) if i % 4 == 2] or [n - 1]
    text = T.MllamaTextConfig(
        vocab_size=tokenizer_vocab_size(tok, s),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=n,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        cross_attention_layers=cross,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vl = max(2, s["vision_layers"])
    vision = T.MllamaVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=vl,
        num_global_layers=1,
        attention_heads=s["vision_heads"],
        image_size=side,
        patch_size=patch,
        max_num_tiles=max_tiles,
        supported_aspect_ratios=[
            [w, h] for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if w * h <= max_tiles
        ],
        intermediate_layers_indices=[0, vl - 1],
        vision_output_dim=s["vision_hidden"] * 3,
    )
    cfg = T.MllamaConfig(text_config=text, vision_config=vision, image_token_index=tok.image_token_id)
    return (
        T.MllamaForConditionalGeneration,
        cfg,
        proc,
        {"modalities": ("image",), "image_size": (side, side), "image_tokens_per_image": 1},
    )


def _gemma3n_vision_block_args(width: int) -> list:
    """A 4-stage MobileNetV5 (the real Gemma 3n vision tower design) at toy width: ER stem stage,
    then universal inverted residuals with multi-query attention blocks in the last two stages."""
    from timm.models._efficientnet_builder import decode_arch_def

    c = [width // 2, width, 3 * width // 2, 2 * width]
    arch = [
        [f"er_r1_k3_s2_e4_c{c[0]}"],
        [f"uir_r1_a3_k5_s2_e4_c{c[1]}"],
        [f"uir_r1_a5_k5_s2_e4_c{c[2]}", f"mqa_r1_k3_h2_v2_s1_d16_c{c[2]}", f"uir_r1_a0_k0_s1_e2_c{c[2]}"],
        [f"uir_r1_a5_k5_s2_e4_c{c[3]}", f"mqa_r1_k3_h2_s1_d16_c{c[3]}", f"uir_r1_a0_k0_s1_e2_c{c[3]}"],
    ]
    # round-trip through plain python types so that the config stays JSON serialisable
    import json

    return json.loads(json.dumps(decode_arch_def(arch)))


def _build_gemma3n(s):
    import transformers as T

    t = grid_side(s["image_tokens"])  # MobileNetV5's multi-scale fusion adapter pools to t x t soft tokens
    side = 16 * t  # stride-16 features are t x t
    audio_tokens = 32  # soft tokens per audio clip (188 in Gemma 3n, for 30 s); ~5 s of audio fit
    n_mm = 4  # rows of the vision / audio hard-token embedders (128 each in Gemma 3n)
    text_specials = ["<bos>", "<eos>", "<unk>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
    text_specials += ["<start_of_image>", "<start_of_audio>"]
    vision_specials = ["<end_of_image>", "<image_soft_token>"] + [f"<unused_vision_{i}>" for i in range(n_mm - 2)]
    audio_specials = ["<end_of_audio>", "<audio_soft_token>"] + [f"<unused_audio_{i}>" for i in range(n_mm - 2)]
    named = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
        "boa_token": "<start_of_audio>",
        "eoa_token": "<end_of_audio>",
        "audio_token": "<audio_soft_token>",
    }
    tok = make_tokenizer(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        named=named,
        order=text_specials + vision_specials + audio_specials,
        chat_template=_gemma_template(image="<image_soft_token>", audio="<audio_soft_token>"),
    )
    vision_offset = tok.convert_tokens_to_ids(vision_specials[0])
    audio_offset = tok.convert_tokens_to_ids(audio_specials[0])
    vocab = audio_offset + n_mm
    assert len(tok) == vocab and audio_offset == vision_offset + n_mm

    ip = T.SiglipImageProcessor(
        size={"height": side, "width": side}, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0]
    )
    fe = T.Gemma3nAudioFeatureExtractor()
    proc = T.Gemma3nProcessor(
        feature_extractor=fe,
        image_processor=ip,
        tokenizer=tok,
        chat_template=tok.chat_template,
        audio_seq_length=audio_tokens,
        image_seq_length=t * t,
    )
    n = s["layers"]
    head_dim = s["hidden"] // s["heads"]
    layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(n)]
    text = T.Gemma3nTextConfig(
        vocab_size=vocab,
        vocab_size_per_layer_input=vision_offset,
        hidden_size=s["hidden"],
        hidden_size_per_layer_input=16,
        intermediate_size=s["intermediate"],
        num_hidden_layers=n,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=head_dim,
        max_position_embeddings=4096,
        sliding_window=512,
        layer_types=layer_types,
        num_kv_shared_layers=n // 2 if n >= 4 else 0,
        laurel_rank=8,
        activation_sparsity_pattern=[0.95 if i == 0 and n > 1 else 0.0 for i in range(n)],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = T.Gemma3nVisionConfig(
        architecture="mobilenetv5_300m_enc",
        model_args={
            "block_args": _gemma3n_vision_block_args(s["vision_hidden"]),
            "stem_size": max(8, s["vision_hidden"] // 2),
            "msfa_output_resolution": t,
        },
        hidden_size=2048,  # fixed by timm's MobileNetV5Encoder (msfa output channels)
        vocab_size=n_mm,
        vocab_offset=vision_offset,
    )
    audio = T.Gemma3nAudioConfig(
        vocab_size=n_mm,
        vocab_offset=audio_offset,
        input_feat_size=fe.feature_size,
        hidden_size=s["audio_hidden"],
        conf_num_attention_heads=s["audio_heads"],
        conf_num_hidden_layers=s["audio_layers"],
        sscp_conv_channel_size=[16, 8],
    )
    cfg = T.Gemma3nConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        audio_soft_tokens_per_image=audio_tokens,
        vision_soft_tokens_per_image=t * t,
        boi_token_id=tok.boi_token_id,
        eoi_token_id=tok.eoi_token_id,
        image_token_id=tok.image_token_id,
        boa_token_id=tok.boa_token_id,
        eoa_token_id=tok.eoa_token_id,
        audio_token_id=tok.audio_token_id,
    )
    extra = {
        "modalities": ("image",),
        "image_size": (side, side),
        "image_tokens_per_image": t * t,
        "sampling_rate": fe.sampling_rate,
    }
    return T.Gemma3nForConditionalGeneration, cfg, proc, extra


FAMILY_BUILDERS: dict[str, Callable[[dict[str, Any]], tuple]] = {
    "llama": _build_llama,
    "qwen2": _build_qwen2,
    "gemma": _build_gemma,
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen2_5_omni": _build_qwen2_5_omni,
    "gemma3": _build_gemma3,
    "gemma3n": _build_gemma3n,
    "internvl": _build_internvl,
    "idefics3": _build_idefics3,
    "smolvlm": _build_smolvlm,
    "paligemma": _build_paligemma,
    "mllama": _build_mllama,
}

FAMILIES: dict[str, str] = {
    "llama": "LlamaForCausalLM (text only)",
    "qwen2": "Qwen2ForCausalLM (text only)",
    "gemma": "GemmaForCausalLM (text only)",
    "llava": "LlavaForConditionalGeneration (LLaVA-1.5: CLIP vision + Llama)",
    "llava_next": "LlavaNextForConditionalGeneration (anyres grid + image newline)",
    "qwen2_vl": "Qwen2VLForConditionalGeneration (M-RoPE, dynamic resolution)",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration (windowed vision attention)",
    "qwen2_5_omni": "Qwen2_5OmniThinkerForConditionalGeneration (image + audio)",
    "gemma3": "Gemma3ForConditionalGeneration (SigLIP + pooled soft tokens)",
    "gemma3n": "Gemma3nForConditionalGeneration (MobileNetV5 via timm, USM audio tower)",
    "internvl": "InternVLForConditionalGeneration (InternViT + pixel shuffle + Qwen2)",
    "idefics3": "Idefics3ForConditionalGeneration (SigLIP-like + pixel shuffle + Llama)",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration (prefix-LM, image tokens first)",
    "mllama": "MllamaForConditionalGeneration (cross-attention to image tiles)",
}


def _post_init(model, family: str, seed: int) -> None:
    """Re-initialise (seeded) parameters that random init leaves at zero but real checkpoints learn,
    where the zeros would cut a modality out of the computation:

    * Gemma 3 zero-initialises ``multi_modal_projector.mm_input_projection_weight``: every image
      soft token would be the zero vector and the image could not change the logits.
    * Mllama zero-initialises the tanh gates of its cross-attention layers (the text would ignore
      the image entirely) and of the vision tower's gated position / tile embeddings.
    * InternVL zero-initialises the vision tower's position embeddings and CLS token.
    * Qwen2.5-Omni's audio encoder initialises its two input convolutions with std 0.02, so its
      output is dominated by the sinusoidal position embeddings and the audio content barely moves
      the logits (~1e-3); they get std 1/sqrt(fan_in) instead.
    """
    gen = torch.Generator().manual_seed(int(seed) + 1_000_003)

    def normal_(p: torch.nn.Parameter, std: float) -> None:
        with torch.no_grad():
            p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))

    def uniform_(p: torch.nn.Parameter, lo: float, hi: float) -> None:
        with torch.no_grad():
            p.copy_((lo + (hi - lo) * torch.rand(p.shape, generator=gen)).to(p.dtype))

    if family == "gemma3":
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        normal_(proj, model.config.vision_config.hidden_size**-0.5)
    elif family == "mllama":
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                uniform_(p, 0.5, 1.0)
            elif name.endswith(".gate") and "vision_model" in name:
                uniform_(p, 0.3, 0.7)
    elif family == "qwen2_5_omni":
        tower = model.model.audio_tower if hasattr(model, "model") else model.audio_tower
        for conv in (tower.conv1, tower.conv2):
            normal_(conv.weight, (conv.in_channels * conv.kernel_size[0]) ** -0.5)
    elif family == "internvl":
        emb = model.model.vision_tower.embeddings
        for name in ("position_embeddings", "cls_token"):
            p = getattr(emb, name, None)
            if isinstance(p, torch.nn.Parameter):
                normal_(p, 0.02)


def tiny(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> TinyModel:
    """Build a tiny random model of ``family`` with its real, offline processor (see module doc)."""
    if family not in FAMILY_BUILDERS:
        raise KeyError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    s = _resolve_sizes(sizes)
    model_cls, cfg, proc, extra = FAMILY_BUILDERS[family](s)
    timm_args = getattr(getattr(cfg, "vision_config", None), "model_args", None)
    timm_args = copy.deepcopy(timm_args) if timm_args else None
    # seed right before init (so the weights do not depend on what the builder consumed), without
    # disturbing the caller's global RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    if timm_args is not None:
        # timm's EfficientNetBuilder edits the block_args dicts in place (adding layer classes and
        # functools.partial objects), which would make the config unserialisable: restore them
        model.config.vision_config.model_args = timm_args
    _post_init(model, family, seed)
    model.eval()
    tok = getattr(proc, "tokenizer", None)
    if tok is not None and tok.chat_template is None and getattr(proc, "chat_template", None) is not None:
        tok.chat_template = proc.chat_template  # as on the Hub: both carry it
    return TinyModel(model=model, processor=proc, family=family, sizes=s, **extra)
