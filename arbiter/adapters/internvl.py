"""Adapter for InternVL (InternViT + Qwen2/Llama text model, <img>...</img> wrapped image tokens): what the generic inference cannot see in this family.

Image context tokens sit between <img> and </img> markers; the markers belong to no modality group."""

from __future__ import annotations

from .base import Adapter, register_adapter


@register_adapter
class InternVLAdapter(Adapter):
    name = "internvl"
    model_types = ("internvl", "internvl_chat")
    notes = ("<img>/</img> markers belong to the text group, the context tokens between them to image",)

