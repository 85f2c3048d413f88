"""Adapter for Kosmos-2 (Kosmos2ForConditionalGeneration): what the generic inference cannot see in this family.

The processor writes ``<image>``, ``latent_query_num`` image positions and ``</image>`` before the text; the image
positions carry ordinary token ids (4, 5, ... in the real XLM-R vocabulary) and are marked by the processor's
``image_embeds_position_mask``, where the model writes the resampler's image embeddings: the ``image`` group is that
mask. generate() runs the inner ``text_model`` rather than the model's forward, so the groups are read there too.
The text stack is pre-LN (Magneto): the pre-MLP norm is ``final_layer_norm``, the final norm the inner transformer's
``layer_norm``; the attention applies ``inner_attn_ln`` to the concatenated heads before ``out_proj``, so
attn.head_out (the out_proj input) is after that LayerNorm."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .base import Adapter, LayerFacts, register_adapter


@register_adapter
class Kosmos2Adapter(Adapter):
    name = "kosmos2"
    model_types = ("kosmos-2",)
    notes = ("the image group is the processor's image_embeds_position_mask (the image positions hold ordinary "
             "token ids)",
             "attn.head_out is the out_proj input, after the attention's inner LayerNorm (inner_attn_ln) over all "
             "heads: a head's slice there depends on every head",
             "generate() on a left-padded batch: the model counts a decode step's position as the cache length "
             "+ 1, pads included, so a padded sample's generated tokens differ from its unpadded run (the model's "
             "own behaviour; its prefill follows the mask)",)
    placeholders = {"image": ""}  # the processor puts <image> ... </image> before the text itself

    def layer_facts(self, index: int, layer: nn.Module, cfg) -> LayerFacts | None:
        attn = getattr(layer, "self_attn", None)
        out, norm, ffn = getattr(attn, "out_proj", None), getattr(layer, "final_layer_norm", None), \
            getattr(layer, "ffn", None)
        if not (isinstance(out, nn.Linear) and isinstance(norm, nn.LayerNorm) and isinstance(ffn, nn.Module)):
            return None
        return LayerFacts(index=index, layer=layer, attn=attn, out_proj=out, mlp=ffn, mid_norm=norm, mixer=attn)

    def final_norm(self, decoder: nn.Module) -> nn.Module | None:
        norm = getattr(getattr(decoder, "model", decoder), "layer_norm", None)
        return norm if isinstance(norm, nn.LayerNorm) else super().final_norm(decoder)

    def input_modules(self, model: nn.Module) -> list[nn.Module]:
        inner = getattr(model, "text_model", None)
        return [model] + ([inner] if isinstance(inner, nn.Module) else [])

    def modality_masks(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        mask = inputs.get("image_embeds_position_mask")
        return {"image": mask.bool()} if isinstance(mask, torch.Tensor) and mask.dim() == 2 else {}
