"""Adapter for the Qwen2.5-Omni thinker (image + audio + video in one sequence): what the generic inference cannot see in this family.

Audio tokens form the audio group; the talker is not attached."""

from __future__ import annotations

from .base import Adapter, register_adapter


@register_adapter
class QwenOmniAdapter(Adapter):
    name = "qwen_omni"
    model_types = ("qwen2_5_omni_thinker", "qwen2_5_omni", "qwen3_omni_moe_thinker")
    notes = ("only the thinker (text generation) is attached; the talker is out of scope",)

    def decoder(self, model):
        thinker = getattr(model, "thinker", None)
        return (thinker or model).get_decoder()
