"""Adapter for PaliGemma (image tokens first, prefix-LM attention: the prefix is bidirectional): what the generic inference cannot see in this family.

Its prefix (image + prompt) attends bidirectionally, so a knockout may change rows other than dst."""

from __future__ import annotations

from .base import Adapter, register_adapter


@register_adapter
class PaliGemmaAdapter(Adapter):
    name = "paligemma"
    model_types = ("paligemma",)
    notes = ("prefix-LM: image and prompt attend bidirectionally; a knockout of src->dst can change other rows through later layers and, inside the prefix, through earlier positions",)

    prefix_bidirectional = True
    image_position = "before"
