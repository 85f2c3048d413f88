"""Adapter for Gemma 3n (MobileNet-v5 vision tower via timm, audio tower, per-layer inputs, KV sharing): what the generic inference cannot see in this family.

Late layers reuse the KV of earlier ones (KV sharing): keys recorded there equal the shared layer's.
The residual stream is AltUp's stack of streams [n_altup, batch, seq, hidden]; stream 0 is the one the model reads
out (the others are predictions it corrects), so resid.pre / resid.post / embed carry the stack."""

from __future__ import annotations

import torch

from .base import Adapter, register_adapter


@register_adapter
class Gemma3nAdapter(Adapter):
    name = "gemma3n"
    model_types = ("gemma3n",)
    notes = ("resid.pre / resid.post carry the AltUp streams [n_altup, batch, seq, hidden] (sequence is dim 2)",
             "late layers share the KV cache of earlier ones: their recorded keys/values are the shared ones",)

    resid_stacked = True
    prefix_replay = False  # KV-sharing layers read keys that earlier layers leave in a side dict

    # [n_altup, batch, seq, hidden] for the stacked sites; attn.out / mlp.out / resid.mid are [batch, seq, hidden]
    def residual_batch_dim(self, x: torch.Tensor) -> int:
        return 1 if x.dim() == 4 else 0

    def residual_seq_dim(self, x: torch.Tensor) -> int:
        return 2 if x.dim() == 4 else 1

    def residual_main_stream(self, x: torch.Tensor) -> torch.Tensor:
        return x[0] if x.dim() == 4 else x
