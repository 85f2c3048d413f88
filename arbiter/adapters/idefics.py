"""Adapter for IDEFICS v1 (gated cross-attention blocks between the decoder layers): what the generic inference cannot see in this family.

The image reaches the text only through ``gated_cross_attn_layers[j]``, which runs before decoder layer
``j * cross_layer_interval``; its keys are image states, so every key belongs to the image group."""

from __future__ import annotations

from torch import nn

from .base import Adapter, LayerFacts, register_adapter


@register_adapter
class IdeficsAdapter(Adapter):
    name = "idefics"
    model_types = ("idefics",)
    notes = ("the image enters through gated cross-attention blocks served as each fed layer's xattn.* sites; "
             "the <image> token in the text is a placeholder position",)

    placeholders = {"image": ""}  # the processor adds <fake_token_around_image><image>... to the text itself

    def cross_attentions(self, decoder: nn.Module, layers: list[LayerFacts], cfg) -> dict[int, nn.Module]:
        interval = int(getattr(cfg, "cross_layer_interval", 1) or 1)
        blocks = getattr(decoder, "gated_cross_attn_layers", None) or []
        return {j * interval: block.cross_attn for j, block in enumerate(blocks) if j * interval < len(layers)}

    def cross_sources(self, model: nn.Module, decoder: nn.Module, layers: list[LayerFacts]) -> list[str]:
        return []  # the blocks read the vision tower's image states: one modality, no text mixed in

    def cross_unit_key_groups(self, layer: LayerFacts, modalities: frozenset[str]) -> frozenset[str]:
        return frozenset({"image"})
