"""Adapter for Idefics3 and SmolVLM (SigLIP + pixel-shuffle connector, image split into tiles): what the generic inference cannot see in this family.

Tiles are wrapped in <fake_token_around_image> and row/column markers, which belong to the text group."""

from __future__ import annotations

from .base import Adapter, register_adapter


@register_adapter
class Idefics3Adapter(Adapter):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    notes = ("tile markers (<fake_token_around_image>, <row_x_col_y>) are text tokens; only <image> ids form the image group",)

