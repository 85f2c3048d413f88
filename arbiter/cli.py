"""The ``arbiter`` command line: ``diagnose`` a model on a conflict data set, ``demo`` on the shipped organism.

Thin: it parses arguments, loads the model and data, and calls arbiter.experiments and arbiter.report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import distributed
from .errors import ArbiterError, DataError
from .experiments.diagnose import HEAD_METHOD_NAMES, HEAD_METHODS


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

    g = distributed.init(args.device)  # under torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA; else None
    torch.manual_seed(args.seed)
    device = f"cuda:{g.local_rank}" if g is not None and args.device == "cuda" else args.device
    model, processor = load_model(args.model, device, args.dtype)
    ds = load_jsonl(args.data)
    return _run(model, processor, ds, args, report_mod, diagnose)


def _run(model, processor, ds, args, report_mod, diagnose) -> int:
    distributed.init(getattr(args, "device", "cpu"))  # torchrun: joined by _diagnose already; `demo` joins here
    rep = diagnose(model, processor, ds, args.out, limit=args.limit, window=args.window, top=args.top,
                   batch_size=args.batch_size, n_random=args.random_draws, generate=not args.no_generate,
                   head_methods=tuple(m.strip() for m in args.head_methods.split(",") if m.strip()),
                   skip=args.skip, modality_limit=args.modality_limit or None, shapley_removal=args.shapley_removal,
                   keyspace_max_n=args.keyspace_max_n, keyspace_permutations=args.keyspace_permutations,
                   calibration=args.calibration,
                   surrogate_predict="simulate" if args.surrogate_simulate else "table",
                   attractor_limit=args.attractor_limit or None, attractor_subsets=args.attractor_subsets or None)
    if not distributed.is_main():  # torchrun: rank 0 writes the report
        return 0
    paths = report_mod.write(rep, args.out)
    m = rep["mfr"]
    sh, su = rep.get("shapley") or {}, rep.get("surrogate") or {}
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
    if "skipped" not in sh and "skipped" not in su and sh and su:
        print(f"[arbiter] modality Shapley angle {fmt(sh.get('angle'))}°; surrogate β_self {fmt(su.get('beta_self'))}, "
              f"β_cross {fmt(su.get('beta_cross'))}, predicted angle {fmt(su.get('angle_pred'))}°")
    if "skipped" in m:  # a data set without conflict samples
        print(f"[arbiter] conflict steps skipped ({m['skipped']}); report: {paths['html']}")
    else:
        print(f"[arbiter] MFR overall {m['overall']:.3f} (vision {m['vision']}, text {m['text']}); "
              f"report: {paths['html']}")
    return 0


def _demo(args) -> int:
    from . import organisms
    from . import report as report_mod
    from .experiments.diagnose import diagnose

    torch.manual_seed(args.seed)
    model, processor, ds = organisms.load(args.organism)  # a clear DataError when the organism is not installed
    print(f"[arbiter] demo: diagnosing the shipped organism {args.organism!r} ({organisms.ORGANISMS[args.organism]}) "
          f"on its held-out data ({len(ds)} samples; first {args.limit} conflict samples, window {args.window})")
    return _run(model, processor, ds, args, report_mod, diagnose)


def _steer(args) -> int:
    from .experiments.diagnose import _atomic_json
    from .data import load_jsonl
    from .lens import attach
    from .report import Report
    from .steer import SteeringPlan, steering_experiment

    torch.manual_seed(args.seed)
    model, processor = load_model(args.model, args.device, args.dtype)
    ds = load_jsonl(args.data)
    report = Report.load(args.report)
    alphas = [float(a) for a in args.alpha.split(",")]
    with attach(model, processor) as lens:
        res = steering_experiment(lens, ds, report, alphas=alphas, top=args.top, n_random=args.random_draws,
                                  batch_size=args.batch_size, limit=args.limit, progress=True, toward=args.toward)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if res["best"] is not None:
        SteeringPlan(**res["best"]).save(out / "steering.json")
    _atomic_json(out / "steering_report.json", res)
    # the diagnosis with its steering section added (the input report is left as it was)
    _atomic_json(out / "report.json", {**report.data, "steering": {**res, "data": str(args.data),
                                                                   "diagnosis": str(report.path)}})
    _plot_steering(res, out / "steering.png")
    for r in res["sweep"]:
        print(f"[arbiter] alpha {r['alpha']}: restored {r['restored']:.3f} (random {r['restored_random_mean']:.3f} "
              f"± {r['restored_random_sd']:.3f}); correct MFR {r['correct_mfr']:.3f}; agreement accuracy "
              f"{r['agreement_accuracy']:.3f}")
    return 0


def _plot_steering(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    a = [r["alpha"] for r in res["sweep"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(a, [r["restored"] for r in res["sweep"]], "-o", label="restored (TopG)")
    ax.errorbar(a, [r["restored_random_mean"] for r in res["sweep"]],
                yerr=[r["restored_random_sd"] for r in res["sweep"]], fmt="-s", label="restored (random heads)")
    ax.plot(a, [r["correct_mfr"] for r in res["sweep"]], "--", label="MFR on already-correct")
    ax.plot(a, [r["agreement_accuracy"] for r in res["sweep"]], ":", label="agreement accuracy")
    ax.set(xlabel="alpha", ylim=(0, 1.05), title=f"Steering ({res['n_failed']} failures)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _common(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--out", required=out_default is None, default=out_default, help="output folder")
    p.add_argument("--limit", type=int, default=None, help="use the first N conflict samples")
    p.add_argument("--window", type=int, default=9, help="knockout window size k (SPEC 4)")
    p.add_argument("--top", type=float, default=0.05, help="TopG fraction of heads")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--random-draws", type=int, default=10, help="random head sets for the controls")
    p.add_argument("--head-methods", default=",".join(HEAD_METHODS),
                   help="comma-separated head rankings; the first is the reference (choices: "
                   + ", ".join(HEAD_METHOD_NAMES) + ")")
    p.add_argument("--no-generate", action="store_true", help="MFR from π > 0.5 instead of greedy generation")
    p.add_argument("--seed", type=int, default=0)


def _modality_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the modality steps of diagnose / demo (shapley, keyspace, imbalance, surrogate) and of the
    attractors step."""
    g = p.add_argument_group("modality steps (SPEC 8-11)")
    g.add_argument("--skip", default="",
                   help="comma-separated steps to leave out: shapley,keyspace,imbalance,surrogate,attractors")
    g.add_argument("--modality-limit", type=int, default=32,
                   help="conflict samples with an image used by the modality steps, alternating vision- and "
                        "text-instructed (default 32; 0 = all)")
    g.add_argument("--shapley-removal", default="knockout", choices=["knockout", "neutral"],
                   help="remove a modality by attention knockout (default) or a neutral input (black image, empty text)")
    g.add_argument("--keyspace-max-n", type=int, default=1000, help="keys per modality and layer (SPEC 9: 5000)")
    g.add_argument("--keyspace-permutations", type=int, default=100, help="MMD permutation test (SPEC 9: 200)")
    g.add_argument("--calibration", default="responsive_5x5_5seeds",
                   help="c(β) table of the surrogate fit: a shipped name or a JSON file "
                        "(python -m arbiter.surrogate.calibration builds one)")
    g.add_argument("--surrogate-simulate", action="store_true",
                   help="simulate the surrogate at the fitted β (5 seeds; minutes) instead of reading the calibration")
    a = p.add_argument_group("attractors step (SPEC 10; runs when the data file declares a label set)")
    a.add_argument("--attractor-limit", type=int, default=24,
                   help="labelled samples (conflict or not), round-robin over the labels (default 24; 0 = all)")
    a.add_argument("--attractor-subsets", type=int, default=20,
                   help="removal sets drawn (seed 0) from the 1-4-label subsets (default 20; 0 = all: 56 with six "
                        "labels)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="arbiter", description="Diagnose how a multimodal LLM arbitrates between "
                                                             "modalities (docs/methods.md defines every measure).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("diagnose", help="full diagnosis of a local model on a conflict data set (JSONL)")
    d.add_argument("--model", required=True, help="folder with a transformers model + processor")
    d.add_argument("--data", required=True, help="conflict data, JSON Lines (SPEC section 1)")
    d.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _common(d)
    _modality_flags(d)
    d.set_defaults(fn=_diagnose)
    m = sub.add_parser("demo", help="diagnose the shipped trained organism on its data (no download)")
    m.add_argument("--organism", default="llava_tiny")
    _common(m, out_default="arbiter-demo")
    _modality_flags(m)
    # the organisms have 6 text layers: SPEC's default window (9) would cover all of them, so the demo maps with
    # k = 3; 96 conflict samples keep the whole diagnosis within a few minutes on 2 CPU cores
    m.set_defaults(fn=_demo, window=3, limit=96)
    s = sub.add_parser("steer", help="amplify the diagnosis' TopG heads on failures; measure gain and side effects")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--report", required=True, help="report.json (or its folder) from arbiter diagnose")
    s.add_argument("--alpha", default="1.5,2,3,5", help="comma-separated alphas")
    s.add_argument("--toward", default="instruction", choices=["instruction", "vision", "text"],
                   help="steer all TopG heads, or only one modality's experts and the shared hubs among them")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _common(s)
    s.set_defaults(fn=_steer)
    from .surrogate.cli import add_parser as add_surrogate

    add_surrogate(sub)
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
    finally:
        distributed.shutdown()  # the process group joined under torchrun, if any


if __name__ == "__main__":
    sys.exit(main())
