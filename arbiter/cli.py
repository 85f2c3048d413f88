"""The ``arbiter`` command line: ``diagnose`` a model on a conflict data set, ``demo`` on the shipped organism.

Thin: it parses arguments, loads the model and data, and calls arbiter.experiments and arbiter.report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .errors import ArbiterError, DataError


def load_model(path: str, device: str = "cpu", dtype: str = "float32"):
    """A model and its processor from a local folder (no remote code, no download)."""
    import transformers
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if not Path(path).exists():
        raise DataError(f"--model {path}: no such folder (arbiter loads local models only).")
    cfg = AutoConfig.from_pretrained(path)
    model = None
    for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        cls = getattr(transformers, auto, None)
        if cls is None:
            continue
        try:
            model = cls.from_pretrained(path, dtype=dt, attn_implementation="sdpa")
            break
        except (ValueError, KeyError):
            continue
    if model is None:
        raise DataError(f"--model {path}: transformers has no auto class for model_type {cfg.model_type!r}.")
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        processor = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), processor


def _diagnose(args) -> int:
    from . import report as report_mod
    from .data import load_jsonl
    from .experiments.diagnose import diagnose

    torch.manual_seed(args.seed)
    model, processor = load_model(args.model, args.device, args.dtype)
    ds = load_jsonl(args.data)
    return _run(model, processor, ds, args, report_mod, diagnose)


def _run(model, processor, ds, args, report_mod, diagnose) -> int:
    rep = diagnose(model, processor, ds, args.out, limit=args.limit, window=args.window, top=args.top,
                   batch_size=args.batch_size, n_random=args.random_draws, generate=not args.no_generate)
    paths = report_mod.write(rep, args.out)
    m = rep["mfr"]
    print(f"[arbiter] MFR overall {m['overall']:.3f} (vision {m['vision']}, text {m['text']}); "
          f"report: {paths['html']}")
    return 0


def _demo(args) -> int:
    from . import organisms
    from . import report as report_mod
    from .experiments.diagnose import diagnose

    torch.manual_seed(args.seed)
    model, processor, ds = organisms.load(args.organism)
    return _run(model, processor, ds, args, report_mod, diagnose)


def _common(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--out", required=out_default is None, default=out_default, help="output folder")
    p.add_argument("--limit", type=int, default=None, help="use the first N conflict samples")
    p.add_argument("--window", type=int, default=9, help="knockout window size k (SPEC 4)")
    p.add_argument("--top", type=float, default=0.05, help="TopG fraction of heads")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--random-draws", type=int, default=10, help="random head sets for the controls")
    p.add_argument("--no-generate", action="store_true", help="MFR from π > 0.5 instead of greedy generation")
    p.add_argument("--seed", type=int, default=0)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="arbiter", description="Diagnose how a multimodal LLM arbitrates between "
                                                             "modalities (see SPEC.md for every measure).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("diagnose", help="full diagnosis of a local model on a conflict data set (JSONL)")
    d.add_argument("--model", required=True, help="folder with a transformers model + processor")
    d.add_argument("--data", required=True, help="conflict data, JSON Lines (SPEC section 1)")
    d.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _common(d)
    d.set_defaults(fn=_diagnose)
    m = sub.add_parser("demo", help="diagnose the shipped trained organism on its data (no download)")
    m.add_argument("--organism", default="llava_tiny")
    _common(m, out_default="arbiter-demo")
    m.set_defaults(fn=_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("\n[arbiter] interrupted: finished steps are saved under OUT/steps; run the same command to resume.",
              file=sys.stderr)
        return 130
    except ArbiterError as e:
        print(f"arbiter: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
