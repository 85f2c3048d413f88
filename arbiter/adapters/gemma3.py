"""Adapter for Gemma 3 (SigLIP tower, bidirectional attention inside image blocks, sliding-window layers): what the generic inference cannot see in this family.

Image tokens attend to each other bidirectionally; every other text mask is causal with local sliding windows."""

from __future__ import annotations

from .base import Adapter, register_adapter


@register_adapter
class Gemma3Adapter(Adapter):
    name = "gemma3"
    model_types = ("gemma3",)
    notes = ("image tokens attend bidirectionally within an image block (token_type_ids); knockouts compose with that mask",)

