"""Adapter for LLaVA-1.5 and LLaVA-NeXT (CLIP vision tower + Llama/Mistral/Vicuna text model): what the generic inference cannot see in this family.

LLaVA-NeXT's image-token count depends on the image size (anyres tiling): groups are read from input ids."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .base import Adapter, patch_view, register_adapter


@register_adapter
class LlavaAdapter(Adapter):
    name = "llava"
    model_types = ("llava", "llava_next", "llava_next_video", "llava_onevision", "vipllava")
    notes = ("image tokens are spliced into the text sequence in place of <image>; their number is read from the input ids",)

    def image_grids(self, model: nn.Module, inputs: Mapping[str, Any]) -> list[dict] | None:
        """LLaVA / VipLLaVA: one (H / patch) x (W / patch) grid per image of ``pixel_values`` (CLIP's CLS token
        first where ``vision_feature_select_strategy`` is ``"full"``, else dropped). LLaVA-NeXT (``"default"``
        strategy): the base tile's grid (image_size / patch square, the whole image resized to it), then the
        anyres tiles as one unpadded grid (the whole image) with an image-newline token ending each row, computed
        with transformers' own ``get_anyres_image_grid_shape`` / ``unpad_image``. LLaVA's grid covers what the
        processor kept of the image (CLIP's processor center-crops a non-square image), so it is not marked
        ``whole_image``. Other members of the family (OneVision, NeXT-Video): None (unknown)."""
        cfg, pv = model.config, inputs.get("pixel_values")
        vc = getattr(cfg, "vision_config", None)
        patch = getattr(vc, "patch_size", None)
        if not isinstance(pv, torch.Tensor) or not patch:
            return None
        strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        if cfg.model_type in ("llava", "vipllava") and pv.dim() == 4:
            rows, cols = pv.shape[-2] // patch, pv.shape[-1] // patch
            cls = 1 if cfg.model_type == "llava" and strategy == "full" else 0
            return [{"tokens": cls + rows * cols, "views": [patch_view("image", cls, rows, cols)]}] * pv.shape[0]
        sizes = inputs.get("image_sizes")
        if cfg.model_type != "llava_next" or strategy != "default" or sizes is None or pv.dim() != 5:
            return None
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        side = vc.image_size // patch
        out = []
        for size in torch.as_tensor(sizes).tolist():
            tiles_h, tiles_w = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, vc.image_size)
            rows, cols = unpad_image(torch.empty(1, tiles_h * side, tiles_w * side, device="meta"), size).shape[1:]
            base = patch_view("base", 0, side, side, whole_image=True)
            tiles = patch_view("tiles", side * side, rows, cols, row_stride=cols + 1, whole_image=True)
            out.append({"tokens": side * side + rows * (cols + 1), "views": [base, tiles]})
        return out
