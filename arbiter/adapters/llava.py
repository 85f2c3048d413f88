"""Adapter for LLaVA-1.5 and LLaVA-NeXT (CLIP vision tower + Llama/Mistral/Vicuna text model): what the generic inference cannot see in this family.

LLaVA-NeXT's image-token count depends on the image size (anyres tiling): groups are read from input ids."""

from __future__ import annotations

from .base import Adapter, register_adapter


@register_adapter
class LlavaAdapter(Adapter):
    name = "llava"
    model_types = ("llava", "llava_next", "llava_next_video", "llava_onevision", "vipllava")
    notes = ("image tokens are spliced into the text sequence in place of <image>; their number is read from the input ids",)

