"""Pieces shared by the organism training scripts: the learning-rate schedule and saving a trained organism."""

from __future__ import annotations

import math
import shutil
from pathlib import Path


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def save_organism(model, processor, out: str | Path) -> Path:
    """Replace folder ``out`` with the model in float16 (safetensors + config) and its processor."""
    import torch

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    return out
