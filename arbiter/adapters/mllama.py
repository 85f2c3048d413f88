"""Adapter for Mllama / Llama 3.2 Vision (the image lives only in the keys of cross-attention layers): what the generic inference cannot see in this family.

The <|image|> token is one text position; image keys exist only in the cross-attention layers."""

from __future__ import annotations

from .base import Adapter, LayerFacts, register_adapter


@register_adapter
class MllamaAdapter(Adapter):
    name = "mllama"
    model_types = ("mllama",)
    notes = ("the image is seen only through cross-attention layers: there every key is an image key (src=\"image\")",)

    def cross_key_groups(self, layer: LayerFacts, modalities: frozenset[str]) -> frozenset[str]:
        return frozenset({"image"})
