"""The ``arbiter`` command line: ``diagnose`` a model on a conflict data set, ``demo`` on a shipped organism,
``steer`` with a diagnosis, ``surrogate``.

Thin and quick to start: torch, transformers and the experiments are imported inside the commands, and the
inputs (options, data file, model folder, report) are checked before any model loads."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path

from .threads import ENV as THREADS_ENV
from .threads import choose_threads
from .errors import ArbiterError, DataError

# diagnose's settings, their defaults and choices: one home (imports no torch, so building the parser stays light)
from .diagnose_config import HEAD_METHOD_NAMES, HEAD_METHODS, SKIPPABLE_STEPS, DiagnoseConfig

_DEFAULTS = DiagnoseConfig()
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's named device maps (transformers' from_pretrained(device_map=...))."""
DOCS = "docs/methods.md"
"""Where the measures are defined (paths in the project; tests/test_cli.py checks that every one cited exists)."""
DATA_DOC = "docs/methods/conflict-samples.md"
ORGANISM_ROOT = Path(__file__).resolve().parent / "organisms"


# ---------------------------------------------------------------------------------------------- model loading


def load_model(model: str, device: str = "cpu", dtype: str = "float32", *, device_map=None, max_memory=None,
               offload_folder: str | None = None, attn_implementation: str = "sdpa"):
    """A model and its processor from a local folder or a hub id already in the local Hugging Face cache (no
    download, no remote code): on one ``device``, or spread over devices by ``device_map`` (accelerate: ``"auto"``,
    ``"balanced"``, ``"sequential"`` or a module -> device dict) within ``max_memory`` per device, the rest
    offloaded to ``offload_folder`` on disk. ``dtype``: a torch dtype name, or ``"auto"`` (the checkpoint's own)."""
    path, _ = _resolve_model(model)
    import transformers
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    if device_map is None:
        _check_device(device)
    else:
        _check_placement_devices(device_map, max_memory)
    _check_attn_implementation(attn_implementation)
    cfg = AutoConfig.from_pretrained(path)
    cls = _auto_class(transformers, cfg)
    if cls is None:
        raise DataError(f"--model {model}: transformers has no auto class for model_type {cfg.model_type!r} "
                        "(image-text-to-text, vision-to-sequence or causal LM).")
    kwargs = {"dtype": _torch_dtype(dtype), "attn_implementation": attn_implementation}
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    try:
        loaded = cls.from_pretrained(path, **kwargs)
    except (ValueError, ImportError, OSError) as e:
        options = _describe_placement(device, dtype, device_map, max_memory, offload_folder, attn_implementation)
        raise DataError(f"--model {model}: transformers could not load it with {options}: {e}") from e
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        processor = AutoTokenizer.from_pretrained(path)
    if device_map is None:
        loaded = loaded.to(device)
    else:
        _check_offload_index(loaded, model)
    return loaded.eval(), processor


def _check_offload_index(model, spec: str) -> None:
    """Every weight accelerate will read back from disk has a disk copy. transformers writes none for a weight tied
    to one that the device map keeps in memory (lm_head on disk, the embeddings on cpu): the first forward would
    fail with a KeyError. Reads the offload index only (no weight is loaded)."""
    from accelerate.utils import named_module_tensors

    missing = []
    for prefix, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        wm = getattr(hook, "weights_map", None)
        keys = getattr(getattr(wm, "dataset", None), "all_keys", None)
        if not getattr(hook, "offload", False) or keys is None:
            continue
        keys = set(keys)
        for name, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                            recurse=hook.place_submodules, remove_non_persistent=True):
            if f"{wm.prefix}{name}" not in keys:
                missing.append(f"{prefix}.{name}" if prefix else name)
    if missing:
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        ties = [f"{m} is tied to {tied[m]}" for m in missing if m in tied]
        raise DataError(f"--model {spec}: the device map offloads {', '.join(missing)} to disk, but transformers "
                        f"wrote no disk copy of {'it' if len(missing) == 1 else 'them'}"
                        + (f" ({'; '.join(ties)}, which the map places elsewhere)" if ties else "")
                        + ": the first forward would fail. Place tied modules on the same device, or use "
                          "--device-map auto (it keeps them together).")


def _auto_class(transformers, cfg):
    """The first auto class (image-text-to-text, vision-to-sequence, causal LM) whose mapping has the config's
    type; None if none has."""
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        cls = getattr(transformers, name, None)
        if cls is not None and type(cfg) in cls._model_mapping:
            return cls
    return None


def _torch_dtype(name: str):
    import torch

    if name == "auto":  # the checkpoint's own dtype (config.json's dtype)
        return "auto"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


HUB_CACHE_HINT = "arbiter downloads nothing: fetch it first (`hf download {id}`, on a machine with network; " \
                 "HF_HOME / HF_HUB_CACHE say where the cache is), or give a save_pretrained() folder"


def _resolve_model(model: str) -> tuple[str, str | None]:
    """``--model`` as a local folder: ``(folder, None)`` for a folder, ``(snapshot folder, hub id)`` for a hub id
    found in the local Hugging Face cache. DataError otherwise, before anything heavy is imported."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise DataError(f"--model {model}: not a model folder (no config.json in it; use a save_pretrained() "
                            "folder or a hub id).")
        return str(p), None
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except hub_errors.HFValidationError:
        raise DataError(f"--model {model}: no such folder, and not a hub id (org/name) either; give a "
                        "save_pretrained() folder or a hub id in the local Hugging Face cache.") from None
    try:
        snapshot = snapshot_download(model, local_files_only=True)
    except getattr(hub_errors, "IncompleteSnapshotError", ()) as e:
        raise DataError(f"--model {model}: the local Hugging Face cache holds a partial download ({e}); "
                        f"{HUB_CACHE_HINT.format(id=model)}.") from None
    except hub_errors.LocalEntryNotFoundError:
        raise DataError(f"--model {model}: no such folder, and the hub id {model} is not in the local Hugging Face "
                        f"cache; {HUB_CACHE_HINT.format(id=model)}.") from None
    if not (Path(snapshot) / "config.json").is_file():
        raise DataError(f"--model {model}: the local Hugging Face cache holds {snapshot} without its config.json "
                        f"(a partial download); {HUB_CACHE_HINT.format(id=model)}.")
    return snapshot, model


def _check_device(device: str) -> None:
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}); "
                        "use --device cpu.")


def _check_placement_devices(device_map, max_memory) -> None:
    """The accelerators named by --device-map / --max-memory exist here."""
    import torch

    named = list(device_map.values()) if isinstance(device_map, dict) else []
    named += list(max_memory or {})
    gpus = sorted({i for i in map(_gpu_index, named) if i is not None})
    if gpus and (not torch.cuda.is_available() or max(gpus) >= torch.cuda.device_count()):
        raise DataError(f"--device-map / --max-memory name GPU {', '.join(map(str, gpus))}, but torch sees "
                        f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s) here; "
                        "use cpu and disk.")


def _gpu_index(device) -> int | None:
    """The CUDA index a device-map / max-memory device names (0, "0", "cuda", "cuda:1"); None for cpu, disk, mps."""
    if isinstance(device, int):
        return device
    m = re.fullmatch(r"(?:cuda:)?(\d+)|cuda", str(device))
    return None if m is None else int(m.group(1) or 0)


def _check_attn_implementation(name: str) -> None:
    """A name transformers' attention registry knows (eager, sdpa, flash_attention_2, flex_attention, any
    registered one) or a hub kernel (org/repo); DataError otherwise."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name in known or "/" in name:
        return
    raise DataError(f"--attn-implementation {name}: transformers knows no such attention implementation; known here: "
                    f"{', '.join(known)} (or a hub kernel org/repo; a custom one must be registered with "
                    "transformers.AttentionInterface.register first).")


def _describe_placement(device, dtype, device_map, max_memory, offload_folder, attn_implementation) -> str:
    if device_map is None:
        where = f"--device {device}"
    else:
        where = "--device-map " + (device_map if isinstance(device_map, str) else "<JSON>")
        if max_memory:
            where += " --max-memory " + ",".join(f"{k}={v}" for k, v in max_memory.items())
        if offload_folder:
            where += f" --offload-folder {offload_folder}"
    return f"{where} --dtype {dtype} --attn-implementation {attn_implementation}"


def _placement(args) -> dict:
    """load_model's keyword arguments from the command's options."""
    return {"device_map": args.device_map, "max_memory": args.max_memory, "offload_folder": args.offload_folder,
            "attn_implementation": args.attn_implementation}


def _device_map_summary(model) -> str:
    """Where an accelerate-dispatched model's modules went, e.g. ``cpu: 5 modules, disk: 3 modules``."""
    dm = getattr(model, "hf_device_map", None) or {}
    counts: dict[str, int] = {}
    for d in dm.values():
        counts[str(d)] = counts.get(str(d), 0) + 1
    return ", ".join(f"{d}: {n} module{'s' * (n != 1)}" for d, n in counts.items()) or "one device"


@contextlib.contextmanager
def _torch_threads(requested: int | None):
    """Set torch's intra-op threads for a command (--threads, ARBITER_THREADS, else the idle cores capped by
    torch's own count) and restore them after it; yields the ThreadChoice."""
    import torch

    prev = torch.get_num_threads()
    choice = choose_threads(requested, cap=prev)
    torch.set_num_threads(choice.count)
    try:
        yield choice
    finally:
        torch.set_num_threads(prev)


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
        _resolve_model(path)  # DataError: neither a model folder nor a cached hub id
    return check


# ---------------------------------------------------------------------------------------------- commands


def _diagnose(args) -> int:
    _, ds = _check_inputs(_model_dir_check(args.model), lambda: _load_data(args.data, args.skip))
    if args.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DataError("--device-map under torchrun: each rank would load the whole model spread over the same "
                        "devices; run one process with --device-map, or torchrun with --device (one copy per rank).")
    import torch

    from . import distributed
    from . import report as report_mod
    from .experiments.diagnose import diagnose

    g = distributed.init(args.device)  # under torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA; else None
    torch.manual_seed(args.seed)
    device = f"cuda:{g.local_rank}" if g is not None and args.device == "cuda" else args.device
    with _torch_threads(args.threads) as threads:
        model, processor = _load_logged(args.model, args, device, threads)
        return _run(model, processor, ds, args, report_mod, diagnose)


def _load_logged(model: str, args, device: str, threads) -> tuple:
    """load_model with the command's options, with a log line before (what, where, threads) and after (where the
    device map put the modules)."""
    where = (f"device map {args.device_map if isinstance(args.device_map, str) else '(JSON)'}"
             if args.device_map is not None else device)
    print(f"[arbiter] loading {model} on {where} in {args.dtype}, attention {args.attn_implementation}; "
          f"{threads.describe()}")
    model, processor = load_model(model, device, args.dtype, **_placement(args))
    if args.device_map is not None:
        print(f"[arbiter] device map: {_device_map_summary(model)}")
    return model, processor


def diagnose_config(args) -> DiagnoseConfig:
    """The :class:`DiagnoseConfig` the options of ``diagnose`` / ``demo`` ask for (0 = all where an option says so)."""
    methods = args.head_methods if isinstance(args.head_methods, (tuple, list)) else _csv(args.head_methods)
    return DiagnoseConfig(limit=args.limit, window=args.window, top=args.top, batch_size=args.batch_size,
                          n_random=args.random_draws, generate=not args.no_generate, head_methods=tuple(methods),
                          skip=args.skip, modality_limit=args.modality_limit or None,
                          shapley_removal=args.shapley_removal, keyspace_max_n=args.keyspace_max_n,
                          keyspace_permutations=args.keyspace_permutations, calibration=args.calibration,
                          surrogate_predict="simulate" if args.surrogate_simulate else "table",
                          attractor_limit=args.attractor_limit or None,
                          attractor_subsets=args.attractor_subsets or None)


def _run(model, processor, ds, args, report_mod, diagnose) -> int:
    from . import distributed

    distributed.init(getattr(args, "device", "cpu"))  # torchrun: joined by _diagnose already; `demo` joins here
    rep = diagnose(model, processor, ds, args.out, diagnose_config(args))
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
    from . import organisms

    if args.organism not in organisms.ORGANISMS:
        raise DataError(f"--organism {args.organism}: no such organism; shipped here: "
                        f"{', '.join(organisms.available()) or 'none'}.")
    folder = organisms.path(args.organism)
    if args.organism not in organisms.available():
        raise DataError(f"organism {args.organism!r} is not installed (no {folder / 'config.json'}); train it with "
                        f"`{organisms.train_command(args.organism)}` (available: {organisms.available()})")
    import torch

    from . import report as report_mod
    from .data import load_jsonl
    from .experiments.diagnose import diagnose

    if args.device_map is None:
        _check_device(args.device)
    torch.manual_seed(args.seed)
    ds = load_jsonl(folder / "data" / "data.jsonl")  # the organism's held-out data, shipped with its weights
    limit = "every" if args.limit is None else f"first {args.limit}"
    print(f"[arbiter] demo: diagnosing the shipped organism {args.organism!r} ({organisms.ORGANISMS[args.organism]}) "
          f"on its held-out data ({len(ds)} samples; {limit} conflict samples, window {args.window})")
    with _torch_threads(args.threads) as threads:
        model, processor = _load_logged(str(folder), args, args.device, threads)
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

    from .util import atomic_write_json
    from .lens import attach
    from .steer import SteeringPlan, steering_experiment

    torch.manual_seed(args.seed)
    with _torch_threads(args.threads) as threads:
        model, processor = _load_logged(args.model, args, args.device, threads)
        with attach(model, processor) as lens:
            res = steering_experiment(lens, ds, report, alphas=args.alpha, top=args.top, n_random=args.random_draws,
                                      seed=args.seed, batch_size=args.batch_size, limit=args.limit, progress=True,
                                      toward=args.toward)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if res["best"] is not None:
        SteeringPlan(**res["best"]).save(out / "steering.json")
    atomic_write_json(out / "steering_report.json", res)
    # the diagnosis with its steering section added (the input report is left as it was)
    atomic_write_json(out / "report.json", {**report.data, "steering": {**res, "data": str(args.data),
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
    """An ArgumentParser that runs its ``checks`` (args -> why the options do not go together, or None) after
    parsing, and exits with status 2 and the reason when one fails."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.checks: list = []

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        for check in self.checks:
            why = check(namespace)
            if why:
                self.error(why)
        return namespace, rest


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
    p.add_argument("--model", required=True, metavar="DIR|HUB_ID",
                   help="a transformers model and its processor: a save_pretrained() folder, or a hub id (org/name, "
                        "e.g. ORG/MODEL-NAME) already in the local Hugging Face cache; loaded offline (no "
                        "download), no remote code")
    p.add_argument("--data", required=True, metavar="FILE",
                   help=f"conflict data, JSON Lines (format: {DATA_DOC})")


def _loading_options(p: "_Parser") -> None:
    """How diagnose, demo and steer load the model: one device, or spread over devices (accelerate), its dtype,
    attention implementation and torch threads."""
    g = p.add_argument_group("model loading")
    g.add_argument("--device", default="cpu", choices=DEVICES, action=_StoreGiven,
                   help="the one device the whole model runs on (not with --device-map)")
    g.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="the model's weights and activations; auto: the checkpoint's own dtype")
    g.add_argument("--device-map", type=_device_map, default=None, metavar="MAP",
                   help="spread the model over devices with accelerate: " + ", ".join(DEVICE_MAPS) + ", or a "
                        "module -> device JSON object (inline or a .json file; devices: GPU index, cpu, disk); "
                        "default: none, the whole model on --device")
    g.add_argument("--max-memory", type=_max_memory, default=None, metavar="DEV=SIZE,...",
                   help="memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB (GPU index or cuda:N, "
                        "cpu, mps; units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB); what does not fit goes to disk; "
                        "default: what accelerate finds free on each device")
    g.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="folder for the disk-offloaded weights that transformers must re-save (a checkpoint not in "
                        "safetensors, converted weights as in most MoE models); safetensors weights are read in place "
                        "(default: none)")
    g.add_argument("--attn-implementation", default="sdpa", metavar="NAME",
                   help="transformers attention implementation of the layers arbiter does not touch: sdpa, eager, "
                        "flash_attention_2, flex_attention, or any name registered with transformers")
    g.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                   help=f"torch intra-op threads (default: ${THREADS_ENV} if set, else the cores the 1-minute load "
                        "average leaves idle, at least 1)")
    p.checks.append(_check_loading_options)


class _StoreGiven(argparse.Action):
    """Stores the value and notes that the option was given on the command line (``args.given``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _check_loading_options(args) -> str | None:
    """Why the loading options do not go together (None if they do)."""
    given = getattr(args, "given", set())
    if args.device_map is None:
        needs = [o for o, v in (("--max-memory", args.max_memory), ("--offload-folder", args.offload_folder)) if v]
        if needs:
            return (f"{' and '.join(needs)} {'need' if len(needs) > 1 else 'needs'} --device-map (e.g. --device-map "
                    "auto): --max-memory bounds what a device map places on each device, --offload-folder holds what "
                    "it puts on disk; --device puts the whole model on one device.")
        return None
    if "device" in given:
        return ("--device and --device-map both given: --device puts the whole model on one device, --device-map "
                "spreads it over devices; give one of them.")
    if args.offload_folder and Path(args.offload_folder).exists() and not Path(args.offload_folder).is_dir():
        return f"--offload-folder {args.offload_folder}: exists and is not a folder."
    return None


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?i?b)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _max_memory(text: str) -> dict:
    """``0=20GiB,cpu=60GiB`` -> ``{0: 21474836480, "cpu": 64424509440}`` (bytes; the keys accelerate takes)."""
    out: dict = {}
    for item in _csv(text):
        key, sep, size = item.partition("=")
        key, size = key.strip().lower(), size.strip()
        if not sep or not key or not size:
            raise argparse.ArgumentTypeError(f"{item!r}: DEVICE=SIZE expected (e.g. 0=20GiB,cpu=60GiB)")
        if key == "disk":
            raise argparse.ArgumentTypeError("disk takes no limit: what does not fit the other devices goes there "
                                             "(re-saved weights into --offload-folder)")
        index = _gpu_index(key)
        if index is None and key not in ("cpu", "mps"):
            raise argparse.ArgumentTypeError(f"{key!r}: device expected as a GPU index (0, cuda:1), cpu or mps")
        m = _SIZE.fullmatch(size)
        unit = (m.group(2) or "b").lower() if m else None
        if m is None or unit not in _UNITS:
            raise argparse.ArgumentTypeError(f"{size!r}: size expected as a number with a unit (B, KB, MB, GB, TB, "
                                             "KiB, MiB, GiB, TiB), e.g. 20GiB")
        nbytes = int(float(m.group(1)) * _UNITS[unit])
        dev = key if index is None else index
        if nbytes <= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: the size must be positive")
        if dev in out:
            raise argparse.ArgumentTypeError(f"{key!r} given twice")
        out[dev] = nbytes
    if not out:
        raise argparse.ArgumentTypeError("give at least one DEVICE=SIZE")
    return out


def _device_map(text: str):
    """``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential``, or a module -> device dict from inline JSON or
    a JSON file (devices: a GPU index, "cuda:N", "cpu", "mps" or "disk")."""
    t = text.strip()
    if t in DEVICE_MAPS:
        return t
    if t.startswith("{"):
        raw, what = t, "inline JSON"
    elif Path(t).is_file():
        raw, what = Path(t).read_text(), t
    else:
        raise argparse.ArgumentTypeError(f"{text!r}: not one of {', '.join(DEVICE_MAPS)}, nor a JSON file or an "
                                         'inline JSON object of module -> device (e.g. \'{"model": 0, "lm_head": '
                                         '"cpu"}\')')
    try:
        mapping = json.loads(raw)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{what}: invalid JSON ({e})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise argparse.ArgumentTypeError(f"{what}: a non-empty JSON object of module name -> device expected")
    for module, dev in mapping.items():
        ok = (isinstance(dev, int) and not isinstance(dev, bool) and dev >= 0) or (
            isinstance(dev, str) and (dev in ("cpu", "mps", "disk") or _gpu_index(dev) is not None))
        if not ok:
            raise argparse.ArgumentTypeError(f"{what}: {module!r} -> {dev!r}: a device is a GPU index, \"cuda:N\", "
                                             "\"cpu\", \"mps\" or \"disk\"")
    return mapping


def _run_options(p: argparse.ArgumentParser, out_default: str | None = None, limit: int | None = None,
                 limit_help: str = "use only the first N conflict samples") -> None:
    """Options diagnose, demo and steer share."""
    p.add_argument("--out", required=out_default is None, default=out_default, metavar="DIR", help="output folder")
    p.add_argument("--limit", type=_int_at_least(1), default=limit, metavar="N",
                   help=limit_help + ("" if limit is not None else " (default: all of them)"))
    p.add_argument("--top", type=_fraction, default=_DEFAULTS.top, metavar="FRACTION",
                   help="TopG: the share of all heads taken as the top heads")
    p.add_argument("--batch-size",
                   type=_int_at_least(1), default=_DEFAULTS.batch_size, metavar="N", help="samples per forward pass")
    p.add_argument("--random-draws", type=_int_at_least(1), default=_DEFAULTS.n_random, metavar="N",
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
    g.add_argument("--modality-limit", type=_int_at_least(0), default=_DEFAULTS.modality_limit, metavar="N",
                   help="conflict samples with an image used by the modality steps, alternating vision- and "
                        "text-instructed (0 = all)")
    g.add_argument("--shapley-removal", default=_DEFAULTS.shapley_removal, choices=["knockout", "neutral"],
                   help="how modality Shapley removes a modality: attention knockout, or a neutral input "
                        "(black image, empty text)")
    g.add_argument("--keyspace-max-n", type=_int_at_least(2), default=_DEFAULTS.keyspace_max_n, metavar="N",
                   help="keys per modality and layer in the key-space gap")
    g.add_argument("--keyspace-permutations",
                   type=_int_at_least(1), default=_DEFAULTS.keyspace_permutations, metavar="N",
                   help="permutations of the key-space MMD test")
    g.add_argument("--calibration", default=_DEFAULTS.calibration, metavar="NAME|FILE",
                   help="c(β) table of the surrogate fit: a shipped name or a JSON file "
                        "(python -m arbiter.surrogate.calibration builds one)")
    g.add_argument("--surrogate-simulate", action="store_true",
                   help="simulate the surrogate at the fitted β (5 seeds; minutes) instead of reading the "
                        "calibration table")
    a = p.add_argument_group("attractors step (runs when the data file declares a label set)")
    a.add_argument("--attractor-limit", type=_int_at_least(0), default=_DEFAULTS.attractor_limit, metavar="N",
                   help="labelled samples (conflict or not), round-robin over the labels (0 = all)")
    a.add_argument("--attractor-subsets", type=_int_at_least(0), default=_DEFAULTS.attractor_subsets, metavar="N",
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
    _loading_options(d)
    _run_options(d)
    _diagnosis_options(d, window=_DEFAULTS.window)
    d.set_defaults(fn=_diagnose)
    organisms = _installed_organisms()
    m = sub.add_parser("demo", help="diagnose a shipped trained organism on its own data (no download)",
                       description="The whole diagnosis of a model organism shipped with arbiter, on its held-out "
                                   "conflict data (offline).")
    m.add_argument("--organism", default=_demo_organism(), metavar="NAME",
                   help="a shipped organism (installed: " + (", ".join(organisms) or "none") + ")")
    _loading_options(m)
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
    _loading_options(s)
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
