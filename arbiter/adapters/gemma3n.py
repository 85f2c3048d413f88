"""Adapter for Gemma 3n (MobileNet-v5 vision tower via timm, audio tower, per-layer inputs, KV sharing): what the generic inference cannot see in this family.

Late layers reuse the KV of earlier ones (KV sharing): keys recorded there equal the shared layer's."""

from __future__ import annotations

from .base import Adapter, register_adapter


@register_adapter
class Gemma3nAdapter(Adapter):
    name = "gemma3n"
    model_types = ("gemma3n",)
    notes = ("resid.pre / resid.post carry the AltUp streams [n_altup, batch, seq, hidden] (sequence is dim 2)",
             "late layers share the KV cache of earlier ones: their recorded keys/values are the shared ones",)

    resid_stacked = True
    prefix_replay = False  # KV-sharing layers read keys that earlier layers leave in a side dict
