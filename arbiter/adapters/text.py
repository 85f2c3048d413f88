"""Adapter for plain decoder-only language models (Llama, Qwen2, Gemma, Mistral, ...): no modality groups.

Anything else that follows transformers' conventions attaches through the generic path in base.py."""

from __future__ import annotations

from .base import Adapter, register_adapter


@register_adapter
class TextAdapter(Adapter):
    name = "text"
    model_types = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mistral", "phi3", "olmo2")
    notes = ("text-only model: only text groups (context, instruction, question, last, ...) exist",)
