"""The ``arbiter`` command line: ``diagnose`` a model on a conflict data set, ``demo`` on a shipped organism,
``steer`` with a diagnosis, ``surrogate``.

Thin and quick to start: torch, transformers and the experiments are imported inside the commands, and the
inputs (options, data file, model folder, report) are checked before any model loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ArbiterError, DataError

# Mirrors of arbiter.experiments.diagnose's constants, kept here so that building the parser imports no torch
# (tests/test_cli.py checks that they agree).
HEAD_METHODS = ("exhaustive", "attribution", "attribution-ig", "attribution-graddrop", "dla")
"""Default head rankings of the heads step; the first is the reference."""
HEAD_METHOD_NAMES = ("exhaustive", "attribution", "attribution-ig", "attribution-ig-layer", "attribution-graddrop",
                     "dla")
SKIPPABLE_STEPS = ("shapley", "keyspace", "imbalance", "surrogate", "attractors")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
DOCS = "docs/methods.md"
"""Where the measures are defined (paths in the project; tests/test_cli.py checks that every one cited exists)."""
DATA_DOC = "docs/methods/conflict-samples.md"
ORGANISM_ROOT = Path(__file__).resolve().parent / "organisms"


# ---------------------------------------------------------------------------------------------- model loading


def load_model(path: str, device: str = "cpu", dtype: str = "float32"):
    """A model and its processor from a local folder (no remote code, no download)."""
    import transformers
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    dt = _torch_dtype(dtype)
    _check_model_dir(path, raise_=True)
    _check_device(device)
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


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _check_model_dir(path: str, raise_: bool = False) -> str | None:
    """Why ``path`` is not a model folder (None if it looks like one), without loading anything."""
    p = Path(path)
    why = None
    if not p.exists():
        why = f"--model {path}: no such folder (arbiter loads local models only: save_pretrained() a model there)."
    elif not p.is_dir() or not (p / "config.json").is_file():
        why = f"--model {path}: not a model folder (no config.json in it; use a save_pretrained() folder)."
    if why and raise_:
        raise DataError(why)
    return why


def _check_device(device: str) -> None:
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}); "
                        "use --device cpu.")


# ---------------------------------------------------------------------------------------------- input checks


def _load_data(path: str, skip=(), command: str = "diagnose"):
    """Load and check a data file before any model loads: it exists, parses, has samples, and has conflict
    samples (or, for diagnose only, a label set the attractors step can use). Raises DataError otherwise."""
    from .data import load_jsonl

    p = Path(path)
    if not p.is_file():
        raise DataError(f"--data {path}: no such data file" + (" (a folder)" if p.is_dir() else "")
                        + f"; give a JSON Lines file (format: {DATA_DOC}).")
    ds = load_jsonl(p)  # DataError with file:line on any malformed line
    if len(ds.samples) == 0:
        raise DataError(f"--data {path}: the file has no samples (empty, or a header line only); write one JSON "
                        f"object per line (format: {DATA_DOC}).")
    n_conflict = sum(s.conflict for s in ds.samples)
    if n_conflict:
        return ds
    labelled = bool(ds.labels) and any(s.label is not None for s in ds.samples)
    if command == "diagnose" and labelled and "attractors" not in skip:
        print(f"[arbiter] {path}: no conflict sample; only the attractors step (label set {ds.labels}) will run.")
        return ds
    raise DataError(f"--data {path}: none of its {len(ds.samples)} samples is a conflict sample (all have "
                    f"\"conflict\": false); {command} needs conflict samples: an image and a text context that "
                    "disagree, with different answer_vision and answer_text"
                    + ("; a file that declares a label set and labels its samples runs the attractors step alone "
                       "(unless --skip names it)." if command == "diagnose" else "."))


def _check_inputs(*checks) -> list:
    """Run every check (a callable raising DataError), collect all their errors, raise them as one."""
    results, errors = [], []
    for check in checks:
        try:
            results.append(check())
        except DataError as e:
            errors.append(str(e))
            results.append(None)
    if len(errors) == 1:
        raise DataError(errors[0])
    if errors:
        raise DataError("\n  ".join(["the inputs have problems (nothing was loaded yet):", *errors]))
    return results


def _model_dir_check(path: str):
    def check():
        why = _check_model_dir(path)
        if why:
            raise DataError(why)
    return check


# ---------------------------------------------------------------------------------------------- commands


def _diagnose(args) -> int:
    _, ds = _check_inputs(_model_dir_check(args.model), lambda: _load_data(args.data, args.skip))
    import torch

    from . import distributed
    from . import report as report_mod
    from .experiments.diagnose import diagnose

    g = distributed.init(args.device)  # under torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA; else None
    torch.manual_seed(args.seed)
    device = f"cuda:{g.local_rank}" if g is not None and args.device == "cuda" else args.device
    model, processor = load_model(args.model, device, args.dtype)
    return _run(model, processor, ds, args, report_mod, diagnose)


def _run(model, processor, ds, args, report_mod, diagnose) -> int:
    from . import distributed

    distributed.init(getattr(args, "device", "cpu"))  # torchrun: joined by _diagnose already; `demo` joins here
    methods = args.head_methods if isinstance(args.head_methods, (tuple, list)) else _csv(args.head_methods)
    rep = diagnose(model, processor, ds, args.out, limit=args.limit, window=args.window, top=args.top,
                   batch_size=args.batch_size, n_random=args.random_draws, generate=not args.no_generate,
                   head_methods=tuple(methods),
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
        print(f"[arbiter] MFR overall {fmt(m['overall'])} (vision {fmt(m['vision'])}, text {fmt(m['text'])}); "
              f"report: {paths['html']}")
    return 0


def _demo(args) -> int:
    import torch

    from . import organisms
    from . import report as report_mod
    from .experiments.diagnose import diagnose

    if args.organism not in organisms.ORGANISMS:
        raise DataError(f"--organism {args.organism}: no such organism; shipped here: "
                        f"{', '.join(organisms.available()) or 'none'}.")
    _check_device(args.device)
    torch.manual_seed(args.seed)
    # a clear DataError when the organism is known but its weights are not installed
    model, processor, ds = organisms.load(args.organism, dtype=_torch_dtype(args.dtype))
    model = model.to(args.device)
    limit = "every" if args.limit is None else f"first {args.limit}"
    print(f"[arbiter] demo: diagnosing the shipped organism {args.organism!r} ({organisms.ORGANISMS[args.organism]}) "
          f"on its held-out data ({len(ds)} samples; {limit} conflict samples, window {args.window}) on "
          f"{args.device} in {args.dtype}")
    return _run(model, processor, ds, args, report_mod, diagnose)


def _steer(args) -> int:
    from .report import Report

    def report_check():
        rep = Report.load(args.report)
        heads = rep.data.get("heads")
        if not isinstance(heads, dict) or "ranking" not in heads:
            why = heads.get("skipped") if isinstance(heads, dict) else None
            raise DataError(f"--report {rep.path}: the diagnosis has no head ranking"
                            + (f" ({why})" if why else "") + "; steer needs a diagnosis run on conflict samples.")
        return rep

    _, ds, report = _check_inputs(_model_dir_check(args.model),
                                  lambda: _load_data(args.data, command="steer"), report_check)
    import torch

    from .experiments.diagnose import _atomic_json
    from .lens import attach
    from .steer import SteeringPlan, steering_experiment

    torch.manual_seed(args.seed)
    model, processor = load_model(args.model, args.device, args.dtype)
    with attach(model, processor) as lens:
        res = steering_experiment(lens, ds, report, alphas=args.alpha, top=args.top, n_random=args.random_draws,
                                  seed=args.seed, batch_size=args.batch_size, limit=args.limit, progress=True,
                                  toward=args.toward)
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


# ---------------------------------------------------------------------------------------------- parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where its help already says it, for flags and required options."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.required or not action.option_strings
                or any(action.default is x for x in (None, False, argparse.SUPPRESS))):
            return text
        default = action.default
        if isinstance(default, (tuple, list)):
            return text + f" (default: {','.join(str(x) for x in default)})"
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _choices_csv(choices, allow_empty: bool = True):
    def parse(text: str) -> tuple[str, ...]:
        items = _csv(text)
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(bad)} not among {', '.join(choices)}")
        if not items and not allow_empty:
            raise argparse.ArgumentTypeError("give at least one")
        return items
    return parse


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers expected") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} must be >= {low}")
        return v
    parse.__name__ = "int"
    return parse


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{v} must be in (0, 1]")
    return v


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="folder of a transformers model and its processor "
                   "(save_pretrained); loaded offline, no remote code")
    p.add_argument("--data", required=True, metavar="FILE",
                   help=f"conflict data, JSON Lines (format: {DATA_DOC})")


def _device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where the model runs")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the model's weights and activations")


def _run_options(p: argparse.ArgumentParser, out_default: str | None = None, limit: int | None = None,
                 limit_help: str = "use only the first N conflict samples") -> None:
    """Options diagnose, demo and steer share."""
    p.add_argument("--out", required=out_default is None, default=out_default, metavar="DIR", help="output folder")
    p.add_argument("--limit", type=_int_at_least(1), default=limit, metavar="N",
                   help=limit_help + ("" if limit is not None else " (default: all of them)"))
    p.add_argument("--top", type=_fraction, default=0.05, metavar="FRACTION",
                   help="TopG: the share of all heads taken as the top heads")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, metavar="N", help="samples per forward pass")
    p.add_argument("--random-draws", type=_int_at_least(1), default=10, metavar="N",
                   help="random head sets of TopG's size drawn as the control")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of torch and of the random head sets")


def _diagnosis_options(p: argparse.ArgumentParser, window: int) -> None:
    """Options of the diagnosis (diagnose and demo)."""
    p.add_argument("--window", type=_int_at_least(1), default=window, metavar="K",
                   help="knockout window: how many layers around each centre layer a knockout covers "
                        "(docs/methods/knockout.md)")
    p.add_argument("--head-methods", type=_choices_csv(HEAD_METHOD_NAMES, allow_empty=False),
                   default=HEAD_METHODS, metavar="M1,M2,...",
                   help="comma-separated head rankings; the first is the reference the others are compared with "
                        "(choices: " + ", ".join(HEAD_METHOD_NAMES) + ")")
    p.add_argument("--no-generate", action="store_true",
                   help="MFR from π > 0.5 instead of greedy generation (faster; default: generate)")
    p.add_argument("--skip", type=_choices_csv(SKIPPABLE_STEPS), default=(), metavar="STEP,...",
                   help="comma-separated steps to leave out (choices: " + ", ".join(SKIPPABLE_STEPS)
                        + "; default: none)")
    g = p.add_argument_group("modality steps (shapley, keyspace, imbalance, surrogate)")
    g.add_argument("--modality-limit", type=_int_at_least(0), default=32, metavar="N",
                   help="conflict samples with an image used by the modality steps, alternating vision- and "
                        "text-instructed (0 = all)")
    g.add_argument("--shapley-removal", default="knockout", choices=["knockout", "neutral"],
                   help="how modality Shapley removes a modality: attention knockout, or a neutral input "
                        "(black image, empty text)")
    g.add_argument("--keyspace-max-n", type=_int_at_least(2), default=1000, metavar="N",
                   help="keys per modality and layer in the key-space gap")
    g.add_argument("--keyspace-permutations", type=_int_at_least(1), default=100, metavar="N",
                   help="permutations of the key-space MMD test")
    g.add_argument("--calibration", default="responsive_5x5_5seeds", metavar="NAME|FILE",
                   help="c(β) table of the surrogate fit: a shipped name or a JSON file "
                        "(python -m arbiter.surrogate.calibration builds one)")
    g.add_argument("--surrogate-simulate", action="store_true",
                   help="simulate the surrogate at the fitted β (5 seeds; minutes) instead of reading the "
                        "calibration table")
    a = p.add_argument_group("attractors step (runs when the data file declares a label set)")
    a.add_argument("--attractor-limit", type=_int_at_least(0), default=24, metavar="N",
                   help="labelled samples (conflict or not), round-robin over the labels (0 = all)")
    a.add_argument("--attractor-subsets", type=_int_at_least(0), default=20, metavar="N",
                   help="label-removal sets drawn (seed 0) from the 1-4-label subsets (0 = all: 56 with six labels)")


def _demo_organism() -> str:
    """The organism ``arbiter demo`` diagnoses by default (named in organisms/demo.txt, read without torch)."""
    return (ORGANISM_ROOT / "demo.txt").read_text().strip()


def _installed_organisms() -> list[str]:
    """Organisms whose weights ship with this installation (read from the folders: no import of torch)."""
    return sorted(p.parent.name for p in ORGANISM_ROOT.glob("*/config.json"))


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="arbiter", description="Diagnose how a multimodal LLM arbitrates between modalities. Every "
                                             f"measure is defined in {DOCS} (in the project); README.md shows the "
                                             "workflow.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)
    d = sub.add_parser("diagnose", help="full diagnosis of a local model on a conflict data set (JSON Lines)",
                       description="Full diagnosis: baseline, knockout map, head rankings, blocking, amplification, "
                                   "modality steps, attractors. Writes OUT/report.{json,md,html}, plots and traces; "
                                   "rerun the same command to resume after an interruption.")
    _model_options(d)
    _device_options(d)
    _run_options(d)
    _diagnosis_options(d, window=9)
    d.set_defaults(fn=_diagnose)
    organisms = _installed_organisms()
    m = sub.add_parser("demo", help="diagnose a shipped trained organism on its own data (no download)",
                       description="The whole diagnosis of a model organism shipped with arbiter, on its held-out "
                                   "conflict data (offline).")
    m.add_argument("--organism", default=_demo_organism(), metavar="NAME",
                   help="a shipped organism (installed: " + (", ".join(organisms) or "none") + ")")
    _device_options(m)
    # the organisms have 6 text layers: the default window (9) would cover all of them, so the demo maps with k = 3
    _run_options(m, out_default="arbiter-demo", limit=96)
    _diagnosis_options(m, window=3)
    m.set_defaults(fn=_demo)
    s = sub.add_parser("steer", help="amplify a diagnosis' TopG heads on failures; measure gain and side effects",
                       description="Amplify the TopG heads of `arbiter diagnose`'s ranking on the failed conflict "
                                   "samples; report the restored fraction next to random heads of the same number "
                                   "and the side effects. Writes OUT/steering.json, report.json, steering.png.")
    _model_options(s)
    s.add_argument("--report", required=True, metavar="PATH",
                   help="report.json (or its folder) written by arbiter diagnose")
    s.add_argument("--alpha", type=_floats, default=(1.5, 2.0, 3.0, 5.0), metavar="A1,A2,...",
                   help="comma-separated amplification factors to sweep")
    s.add_argument("--toward", default="instruction", choices=["instruction", "vision", "text"],
                   help="steer all TopG heads, or only one modality's experts and the shared hubs among them")
    _device_options(s)
    _run_options(s, limit_help="use only the first N samples of the data file")
    s.set_defaults(fn=_steer)
    sub.add_parser("surrogate", help="physics surrogate: β sweeps, fit to a trace", add_help=False)
    return ap


def _surrogate_parser() -> argparse.ArgumentParser:
    """The ``surrogate`` commands' own parser, built only when they run (it imports the surrogate package)."""
    from .surrogate.cli import add_parser as add_surrogate

    ap = _Parser(prog="arbiter")
    add_surrogate(ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = (_surrogate_parser() if argv[:1] == ["surrogate"] else parser()).parse_args(argv)
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
        if "arbiter.distributed" in sys.modules:  # the process group joined under torchrun, if any
            sys.modules["arbiter.distributed"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
