"""Pieces shared by the organism training scripts: the learning-rate schedule, saving a trained organism, its
training log and the evaluation of the saved model."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
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


class StepLog:
    """A training stage's running log: per-step metrics averaged over every ``every`` steps (and over the last ones
    when ``steps`` is given), each such row kept (``rows``) and printed with the stage's elapsed time."""

    def __init__(self, stage: str, every: int, steps: int | None = None):
        self.stage, self.every, self.steps = stage, every, steps
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.time()
        self._acc: dict[str, list] = {}

    def add(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics of step ``step`` (from 0)."""
        import numpy as np

        for k, v in metrics.items():
            self._acc.setdefault(k, []).append(v)
        if (step + 1) % self.every == 0 or (self.steps is not None and step + 1 == self.steps):
            row: dict[str, Any] = {"step": step + 1}
            row.update({k: round(float(np.mean(v)), 4) for k, v in sorted(self._acc.items())})
            self.rows.append(row)
            print(f"  {self.stage} {step + 1:5d}  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "step")
                  + f"  ({time.time() - self.t0:.0f}s)", flush=True)
            self._acc = {}

    def elapsed(self) -> float:
        return time.time() - self.t0


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
