"""Pieces shared by the organism training scripts: the learning-rate schedule, saving a trained organism, its
training log and the evaluation of the saved model."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable


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


def training_log(name: str, family: str, model, script: str, argv, args, sizes: dict, image_size: int,
                 parameters: int, times: dict[str, float], stages: dict[str, tuple[float, Any]],
                 probe_accuracy) -> dict[str, Any]:
    """The ``train_log.json`` record of a training run: who and how (the command as run by ``python -m
    arbiter.organisms.<script>``), sizes, ``times`` (``train_time_s``, ...), then per stage its time
    (``time_stage_<s>_s``) and log (``log_stage_<s>``), in stage order."""
    import torch

    log: dict[str, Any] = dict(
        name=name, family=family, architecture=type(model).__name__,
        command=f"python -m arbiter.organisms.{script} " + " ".join(sys.argv[1:] if argv is None else argv),
        args=vars(args), sizes=sizes, image_size=image_size, parameters=parameters, torch=torch.__version__)
    log.update({key: round(t, 1) for key, t in times.items()})
    log.update({f"time_stage_{stage}_s": round(t, 1) for stage, (t, _) in stages.items()})
    log["probe_accuracy_after_a"] = probe_accuracy
    log.update({f"log_stage_{stage}": entries for stage, (_, entries) in stages.items()})
    return log


def evaluate_splits(model, processor, splits: dict, fmt: Callable[[dict], str], width: int,
                    **kw) -> dict[str, Any]:
    """``organisms.evaluate`` of the saved model on every split, without and with the image knocked out
    (``<split>_knockout``), each printed as it comes; ``kw`` go to ``evaluate``."""
    from . import evaluate

    evals: dict[str, Any] = {}
    for split, ds in splits.items():
        for ko in (False, True):
            r = evaluate(model, processor, ds, knockout=ko, **kw)
            evals[split + ("_knockout" if ko else "")] = r
            print(f"  {split:{width}s} knockout={ko!s:5s}  {fmt(r)}", flush=True)
    return evals


def write_training_log(out: Path, log: dict) -> None:
    """``out/train_log.json``."""
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
