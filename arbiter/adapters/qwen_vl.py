"""Adapter for Qwen2-VL and Qwen2.5-VL (M-RoPE text model, vision start/end markers): what the generic inference cannot see in this family.

Positions are 3-D M-RoPE ids; arbiter's positions are cache indices, which stay right under left padding."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .base import Adapter, patch_view, register_adapter


@register_adapter
class QwenVLAdapter(Adapter):
    name = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    notes = ("M-RoPE position ids: arbiter positions are cache indices, not rope ids",)

    def image_grids(self, model: nn.Module, inputs: Mapping[str, Any]) -> list[dict] | None:
        """One grid of merged patches per image: ``image_grid_thw`` (t, h, w) in patches, merged
        ``spatial_merge_size``^2 to a token, gives (h / merge) x (w / merge) tokens per temporal patch, row-major
        (the image processor flattens patches as (t, h / merge, w / merge, merge, merge)); the processor resizes
        the whole image to multiples of patch x merge, without cropping."""
        thw = inputs.get("image_grid_thw")
        merge = getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", None)
        if not isinstance(thw, torch.Tensor) or not merge:
            return None
        out = []
        for t, h, w in thw.tolist():
            rows, cols = h // merge, w // merge
            views = [patch_view("image" if t == 1 else f"frame {k}", k * rows * cols, rows, cols, whole_image=True)
                     for k in range(t)]
            out.append({"tokens": t * rows * cols, "views": views})
        return out
