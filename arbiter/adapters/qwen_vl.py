"""Adapter for Qwen2-VL and Qwen2.5-VL (M-RoPE text model, vision start/end markers): what the generic inference cannot see in this family.

Positions are 3-D M-RoPE ids; arbiter's positions are cache indices, which stay right under left padding."""

from __future__ import annotations

from .base import Adapter, register_adapter


@register_adapter
class QwenVLAdapter(Adapter):
    name = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    notes = ("M-RoPE position ids: arbiter positions are cache indices, not rope ids",)

