"""Command line of the surrogate: ``arbiter surrogate sweep`` (β map, JSON + PNGs) and ``arbiter surrogate fit TRACE``.

Hooked into arbiter's parser with ``add_parser(subparsers)``; each command's function returns an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_parser", "run_fit", "run_sweep"]


def _log(msg: str) -> None:
    print(f"[arbiter surrogate] {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    tmp.replace(path)


def run_sweep(args) -> int:
    from .plots import arrow_map, attractor_plot  # matplotlib is imported inside, when plotting
    from .sweep import sweep

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _log(f"sweep: preset {args.preset}, {args.grid} x {args.grid} grid{' (extended)' if args.extended else ''}, "
         f"{args.seeds} seeds")
    r = sweep(args.preset, args.grid, args.seeds, extended=args.extended, angle=args.angle, printed=args.printed,
              shap_mode=args.shap, dtype=args.dtype, workers=args.workers, log=_log)
    d = r.to_dict()
    _write_json(out / "sweep.json", d)
    try:
        arrow_map(r, out / "arrow_map.png")
        attractor_plot(r, out / "attractor.png")
    except ImportError:
        _log("matplotlib is not installed: no PNGs (pip install 'arbiter-mllm[plots]')")
    s, ident = d["params"]["summary"], d["identifiability"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
    print(f"[arbiter surrogate] NMSE {fmt(s['nmse_range'][0])}..{fmt(s['nmse_range'][1])}; identifiability ratios: "
          f"angle {fmt(ident['angle']['ratio'])}, log NMSE {fmt(ident['log_nmse']['ratio'])}, c_self "
          f"{fmt(ident['c_self']['ratio'])}, c_cross {fmt(ident['c_cross']['ratio'])}; "
          f"{d['params']['timings']['total_s']:.0f} s; wrote {out / 'sweep.json'}")
    return 0


def run_fit(args) -> int:
    from ..trace import Trace, read_trace_dir
    from .fit import fit

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(args.trace)
    if not src.exists():
        from ..errors import DataError

        raise DataError(f"no trace at {src}.")
    trace = read_trace_dir(src) if src.is_dir() else Trace.load(src)
    r = fit(trace, x=args.x, y=args.y, sweep_result=args.sweep, preset=args.preset, grid=args.grid, seeds=args.seeds,
            curve=args.curve, angle_measured=args.angle_measured, count=args.count,
            cache_dir=args.cache_dir, log=_log)
    d = r.to_dict()
    _write_json(out / "fit.json", d)
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
    print(f"[arbiter surrogate] β_self {fmt(d['beta_self'])}, β_cross {fmt(d['beta_cross'])}; surrogate angle "
          f"{fmt(d['angle_pred'])} (identifiability ratio {fmt((d['identifiability'].get('angle') or {}).get('ratio'))})"
          f", measured {fmt(d['angle_measured'])}; {len(d['flags'])} flags; wrote {out / 'fit.json'}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``surrogate {sweep, fit}`` to an argparse subparsers object; sets ``fn`` on each command."""
    sp = subparsers.add_parser("surrogate", help="physics surrogate (oscillators with softmax couplings; "
                               "docs/methods/surrogate.md): β sweeps and a fit to a trace")
    sub = sp.add_subparsers(dest="surrogate_cmd", required=True)
    s = sub.add_parser("sweep", help="β_self x β_cross map: NMSE, dynamical SHAP angle, concentration, identifiability")
    s.add_argument("--out", required=True, help="output folder (sweep.json, arrow_map.png, attractor.png)")
    s.add_argument("--grid", type=int, default=5, help="points per β axis (e.g. 5 or 9)")
    s.add_argument("--seeds", type=int, default=10, help="paired seeds per cell (>= 10 recommended)")
    s.add_argument("--preset", default="paper", choices=["paper", "responsive"],
                   help="surrogate constants: the paper's printed ones, or arbiter's responsive set")
    s.add_argument("--extended", action="store_true", help="extend the β range up to 1e2")
    s.add_argument("--angle", default="ratio", choices=["ratio", "atan2"],
                   help="how the preference angle is computed from the two Shapley values")
    s.add_argument("--printed", action="store_true", help="the paper's printed SHAP formula (cancels: φ(X) = φ(Y))")
    s.add_argument("--shap", default="readout", choices=["readout", "knockout"],
                   help="readout: restrict the readout; knockout: zero one population's drive")
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="vector field dtype; phases and RK4 sums stay float64 (float32: about twice as fast, NMSE "
                        "within 3e-5 and angles within 0.004 deg of float64 on the default sweep)")
    s.add_argument("--workers", type=int, default=None,
                   help="threads integrating shares of the batch (default: torch's thread count, capped by the "
                        "cores the load average leaves idle)")
    s.set_defaults(fn=run_sweep)
    f = sub.add_parser("fit", help="fit β_self, β_cross to a recorded trace's attention concentration, then simulate")
    f.add_argument("trace", help="trace file (.safetensors) or a TraceWriter folder, with attn.probs and groups")
    f.add_argument("--out", required=True, help="output folder (fit.json)")
    f.add_argument("--x", default="image", help="token group of modality X (default image)")
    f.add_argument("--y", default="text", help="token group of modality Y (default text)")
    f.add_argument("--sweep", default=None, help="sweep.json (or its folder) of `surrogate sweep --preset responsive` "
                   "to take the c(β) curves and seeds from (default: none, fit runs that sweep first: long on a CPU)")
    f.add_argument("--preset", default="responsive", choices=["paper", "responsive"],
                   help="surrogate constants of the sweep run when --sweep is not given")
    f.add_argument("--grid", type=int, default=5, help="points per β axis of that sweep")
    f.add_argument("--seeds", type=int, default=10, help="paired seeds per cell of that sweep")
    f.add_argument("--curve", default="marginal", choices=["marginal", "diagonal"],
                   help="c(β) curve inverted: averaged over the other β, or the β_self = β_cross cells")
    f.add_argument("--count", default="visible", choices=["visible", "all"],
                   help="keys a concentration is normalised by: those the row can see, or all of the group")
    f.add_argument("--angle-measured", type=float, default=None,
                   help="the MLLM's measured modality Shapley angle, reported next to the surrogate's (default: none)")
    f.add_argument("--cache-dir", default=None, help="keep the tabulating sweep here as JSON (default: not kept)")
    f.set_defaults(fn=run_fit)
    return sp
