"""Benchmarks: arbiter against plain forwards and nnsight 0.8 on a tiny random LLaVA (fp32, CPU).

    python benchmarks/run.py --json OUT.json           # every section (~8-10 minutes on 2 busy cores)
    python -m benchmarks.run --quick --json OUT.json   # smoke test: small model, batch 2, 3 repeats
    python benchmarks/run.py --only surrogate          # one section (or a comma list): SECTIONS below

Every time is a median over ``repeats`` round-robin rounds (each round runs every compared path once, so load
changes on a shared machine hit them alike), after warm-up calls, under ``torch.no_grad()``, in one process.
Ratios are ``time / plain SDPA forward time`` of the same batch. What each figure measures: benchmarks/RESULTS.md.
Attribution patching (all heads) is timed against a plain forward of the same encoded synthetic batch and ranked
against the exhaustive single-head ranking (Spearman); the streamed-memory ratio is the peak RSS of the baseline
evaluation with ``trace_dir`` over 1,000 vs 10 samples, each in a fresh process (small model, one thread).
The surrogate section times the default β sweep of the physics surrogate and batched-grid vs per-point-loop
integration (``bench_surrogate``); the organism section runs benchmarks/organism.py on the shipped llava_tiny
(``organism_*`` keys); the head_search section compares the head search with the exhaustive sweep on the largest
shipped organism (``head_search_*`` keys).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

import arbiter
from arbiter import memory
from arbiter.sweep import head_sweep
from arbiter.testing.ops import ops_added
from arbiter.testing.tiny import tiny
from arbiter.trace import Trace

try:
    import resource   # Unix only: the forwards section's user / system time split and page-fault counts
except ImportError:   # pragma: no cover - Windows
    resource = None

FULL = dict(model=dict(hidden=512, layers=8, heads=8, kv_heads=8, image_tokens=576), batch=4, repeats=5,
            sweep_samples=1, sweep_heads_per_layer=None, sweep_repeats=3, trace_mb=100, attribution_samples=2,
            stream_samples=(10, 1000),
            surrogate=dict(grid=5, seeds=10, horizon=2.0, loop_cells=5, repeats=3), organism_samples=96,
            head_search_samples=32)
QUICK = dict(model=dict(hidden=128, layers=4, heads=4, kv_heads=4, image_tokens=64), batch=2, repeats=3,
             sweep_samples=2, sweep_heads_per_layer=1, sweep_repeats=3, trace_mb=10, attribution_samples=2,
             stream_samples=(10, 1000),
             surrogate=dict(grid=2, seeds=2, horizon=0.5, loop_cells=2, repeats=1), organism_samples=8,
             head_search_samples=8)
SECTIONS = ("forwards", "fixed", "scale", "sweep", "trace_io", "attribution", "stream_memory", "surrogate",
            "organism", "head_search")
# real widths, few layers (the ratios are per layer): LLaVA-1.5-7B, Qwen2-VL-7B (28 query / 4 KV heads, M-RoPE),
# LLaVA-NeXT tiling (~2,900 image tokens); batch 1, random weights
SCALE_SHAPES = {
    "llava7b": ("llava", dict(hidden=4096, heads=32, kv_heads=32, intermediate=11008, image_tokens=576)),
    "qwen2vl7b": ("qwen2_vl", dict(hidden=3584, heads=28, kv_heads=4, intermediate=18944, image_tokens=576)),
    "llavanext_tiles": ("llava_next", dict(hidden=4096, heads=32, kv_heads=32, intermediate=11008,
                                           image_tokens=2880)),
}
SCALE_QUICK = dict(hidden=256, heads=4, kv_heads=4, intermediate=512, image_tokens=64)
# the fixed cost per layer: a model so narrow that compute is small, the sequence and batch of the forwards section
FIXED_MODEL = dict(hidden=64, layers=8, heads=4, kv_heads=4, image_tokens=576)
# the streamed evaluation runs a small model in fresh processes (1 thread): memory, not speed, is measured
STREAM_MODEL = dict(hidden=64, layers=4, heads=4, kv_heads=2, image_tokens=16)
QUESTION = "In case there is an inconsistency between the text context and the image content, which colour " \
           "is the shape in the image?"


# ------------------------------------------------------------------------------------------------ helpers

def _round_robin(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Round-robin timing: each round calls every fn once, so load changes on a shared machine hit them alike; the
    order rotates by one each round, so no fn always runs first (measured at hidden 512, 10 rounds: in a fixed
    order the plain forward, run first, took 2-8 % longer than recording forwards run after it).
    ({name: seconds of each of ``repeats`` rounds after ``warmup`` untimed rounds}, {name: the last call's result}).
    ``clock``: wall time by default; ``time.process_time`` counts this process's CPU time only (steadier on a
    shared machine for single-threaded CPU work)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    names = list(fns)
    for i in range(warmup + repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            start = clock()
            last[name] = fn()
            if i >= warmup:
                times[name].append(clock() - start)
    return times, last


def _median_times(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, tuple[float, Any]]:
    """{name: (median seconds over the rounds of :func:`_round_robin`, the last call's result)}."""
    times, last = _round_robin(fns, repeats, warmup, clock)
    return {name: (statistics.median(times[name]), last[name]) for name in fns}


def _with_usage(fn: Callable[[], Any], sink: list[tuple[float, float, int]]) -> Callable[[], Any]:
    """``fn``, appending to ``sink`` the (user CPU seconds, system CPU seconds, minor page faults) of each call
    (this process; on a CPU the system time is mostly the kernel zeroing the fresh pages a call touches)."""
    if resource is None:
        return fn

    def run():
        before = resource.getrusage(resource.RUSAGE_SELF)
        try:
            return fn()
        finally:
            after = resource.getrusage(resource.RUSAGE_SELF)
            sink.append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                         after.ru_minflt - before.ru_minflt))
    return run


def _synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by a CUDA synchronise when ``device`` is CUDA (its time then includes the device's work)."""
    def run():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def _paired_median(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of (``name``'s time - ``base``'s time in the same round): what ``name`` adds, with the
    drift between rounds (load, frequency) cancelled round by round."""
    return statistics.median(t - b for t, b in zip(times[name], times[base]))


def _median_ci95(values: Sequence[float]) -> tuple[float, float]:
    """A distribution-free 95 % confidence interval of the median: the order statistics n/2 ± 0.98·sqrt(n) (normal
    approximation to the binomial; the whole range up to 7 values)."""
    v = sorted(values)
    k = max(0, int(len(v) / 2 - 0.98 * math.sqrt(len(v))))
    return v[k], v[len(v) - 1 - k]


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """(median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls, the last call's result)."""
    return _median_times({"fn": fn}, repeats, warmup)["fn"]


_T0 = time.perf_counter()


def _section(name: str) -> None:
    gc.collect()
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {name} ...", file=sys.stderr, flush=True)


def _batch_inputs(tm, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor inputs for n prompts of different lengths (one image each; left padding)."""
    tm.tokenizer.padding_side = "left"
    prompts = [tm.prompt(QUESTION + " ok" * i) for i in range(n)]
    return dict(tm.inputs(prompts, image_seeds=[seed + i for i in range(n)], padding=True))


def _forward(model, inputs):
    return model(**inputs, use_cache=False).logits


def _machine() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} CPUs (nproc), torch threads {torch.get_num_threads()}"


def _load() -> float | None:
    """1-minute load average (the machine is shared: read the timings against it)."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def _nnsight_version() -> str | None:
    try:
        import nnsight
    except ImportError:
        return None
    return nnsight.__version__


# ------------------------------------------------------------------------------------------------ probes

class ImageGaze(arbiter.Probe):
    """InstructionGaze-like: the last token's attention mass on the image keys, per layer -> [batch, heads]."""

    reads: ClassVar = {"attn.probs": "last"}

    def attn_probs(self, ctx, probs):  # [batch, heads, 1, keys]
        image = ctx.group("image", over="keys").to(probs.dtype)[:, None, None, :]
        self.emit(ctx.layer, (probs * image).sum(-1)[..., 0])


# ------------------------------------------------------------------------------------------------ nnsight

def _nn_layers(nm):
    return nm.model.language_model.layers


def _nnsight_record(nm, inputs):
    """Every decoder layer's output (all positions) and the last row of each layer's attention weights."""
    import nnsight

    with nm.trace(**inputs, use_cache=False):
        resid, probs = nnsight.save([]), nnsight.save([])
        for layer in _nn_layers(nm):
            probs.append(layer.self_attn.output[1][:, :, -1])   # eager weights [batch, heads, q, keys] -> last row
            resid.append(layer.output)
    return resid, probs


def _nnsight_gaze(nm, inputs, image_keys):
    """Per layer (probs[:, :, -1] * image_keys).sum(-1) -> [batch, heads], as ImageGaze."""
    import nnsight

    with nm.trace(**inputs, use_cache=False):
        gaze = nnsight.save([])
        for layer in _nn_layers(nm):
            gaze.append((layer.self_attn.output[1][:, :, -1] * image_keys).sum(-1))
    return gaze


def _nnsight_block(nm, inputs, layer: int, head: int, head_dim: int):
    """Zero one head's slice of the o_proj input; last-token logits."""
    with nm.trace(**inputs, use_cache=False):
        x = _nn_layers(nm)[layer].self_attn.o_proj.input
        x[..., head * head_dim:(head + 1) * head_dim] = 0
        logits = nm.output.logits[:, -1].save()
    return logits


def _model_copy(tm, impl: str):
    """A copy of the model (nnsight instruments every module it wraps: keep the arbiter model clean)."""
    model = copy.deepcopy(tm.model)
    model.set_attn_implementation(impl)
    return model


def _wrap(model):
    from nnsight import NNsight

    return NNsight(model)


# ------------------------------------------------------------------------------------------------ fixed cost

class _FlattenLastRow(arbiter.Probe):
    """An edit of the last row's attention probabilities in head 0 (each one's square root, renormalised): the
    fixed section's score-level edit, which no mask can express."""

    edits = {"attn.probs": "last"}

    def attn_probs(self, ctx, p):
        f = p[:, :1].sqrt()
        return torch.cat([f / f.sum(-1, keepdim=True), p[:, 1:]], dim=1)


class _LastRowReader(arbiter.Probe):
    """A reader of the last row's attention probabilities that keeps its latest copy: the fixed section's per-call
    measure (:func:`_call_beyond_floor`), free of a recorder's bookkeeping."""

    reads = {"attn.probs": "last"}

    def attn_probs(self, ctx, p):
        self.kept = p.clone()


def _call_beyond_floor(model, proc, inputs, floor_read, rounds: int) -> dict[str, float]:
    """One routed attention call of a middle layer under a reader of the last row, timed alone: a forward builds what
    the forward shares (rows, masks, the probes' dispatch), then that layer's call is repeated on its own tensors
    with its kernel standing in (it returns the kernel's result), round-robin with the floor's read of the same row
    (``floor_read``, from :func:`_floor_functions`) on the same tensors. Microseconds per call, median of the paired
    differences and its 95 % interval: the Python a read adds per layer beyond the least a reader does, steadier
    than whole forwards (no compute, no per-forward set-up in it)."""
    from arbiter import lens as lens_mod

    layers = model.config.text_config.num_hidden_layers
    layer, seen = layers // 2, {}
    original = lens_mod._Runtime.attention

    def spy(rt, at, *args, **kw):
        if at == layer:
            seen["call"] = (rt, args, kw)
        return original(rt, at, *args, **kw)

    with arbiter.attach(model, proc) as lens, lens.probe(_LastRowReader()):
        lens_mod._Runtime.attention = spy
        try:
            _forward(model, inputs)
        finally:
            lens_mod._Runtime.attention = original
        rt, (module, base, kind, query, key, value, mask, kwargs, *unit), _ = seen["call"]
        result = base(module, query, key, value, mask, **kwargs)

        def kernel(*a, **k):
            return result

        def floor():
            floor_read(module, query, key, value, mask, **kwargs)
            return kernel(module, query, key, value, mask, **kwargs)
        fns = {"arbiter": lambda: original(rt, layer, module, kernel, kind, query, key, value, mask, kwargs, *unit),
               "floor": floor}
        with torch.no_grad():   # (autograd's recording would add alike to both)
            times, _ = _round_robin(fns, rounds, warmup=20)
    diff = [a - f for a, f in zip(times["arbiter"], times["floor"])]
    low, high = _median_ci95(diff)
    return {"fixed_call_us_read_last": statistics.median(times["arbiter"]) * 1e6,
            "fixed_call_us_floor_read_last": statistics.median(times["floor"]) * 1e6,
            "fixed_call_us_read_last_beyond_floor": statistics.median(diff) * 1e6,
            "fixed_call_us_read_last_beyond_floor_ci95_low": low * 1e6,
            "fixed_call_us_read_last_beyond_floor_ci95_high": high * 1e6}


def _fixed_paths(model, proc, inputs, n_layers: int) -> dict[str, Callable[[], Any]]:
    """The paths whose added time per layer the fixed section reports; each attaches, runs one forward with its
    probe and detaches (``attach_detach``: the attach and detach alone, subtracted from the others)."""
    def attached(*probes):
        def run():
            with arbiter.attach(model, proc) as lens, contextlib.ExitStack() as stack:
                for make in probes:
                    stack.enter_context(make(lens))
                return _forward(model, inputs)
        return run

    def attach_detach():
        with arbiter.attach(model, proc):
            return None

    return {"attach_detach": attach_detach, "idle": attached(),
            "record_probs_last": attached(lambda lens: lens.record("attn.probs", rows="last")),
            "record_resid_all_probs_last": attached(lambda lens: lens.record("resid.post", rows="all"),
                                                    lambda lens: lens.record("attn.probs", rows="last")),
            "knockout_image_last": attached(lambda lens: lens.knockout("image", "last", layers="all")),
            "knockout_record_probs_last": attached(lambda lens: lens.knockout("image", "last", layers="all"),
                                                   lambda lens: lens.record("attn.probs", rows="last")),
            "edit_probs_last": attached(lambda lens: lens.probe(_FlattenLastRow(), layers="all")),
            "block_head": attached(lambda lens: lens.block_heads([(i, 0) for i in range(n_layers)]))}


@contextlib.contextmanager
def _inside_clock(acc: dict[str, float]):
    """Accumulate, in ``acc``, the CPU time spent in arbiter's code during a forward (``total``): its routed attention
    calls, its hooks (on the layers, o_proj, the model's and decoder's inputs), and inside the model's own kernel
    that those attention calls make (``kernel``: the first kernel call of each; under eager attention a row-sliced
    knockout calls the kernel function again for the edited rows, and that is arbiter's work). ``total - kernel`` is arbiter's own work (mask edits, row
    recomputes, row reads, head scaling, recording, grouping), free of the model's compute and of the load."""
    from arbiter import attention as attn_fn
    from arbiter import lens as lens_mod

    def timed(fn, key="total"):
        def run(*a, **k):
            start = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.process_time() - start
        return run

    saved = {"attention": lens_mod._Runtime.attention, "base_function": attn_fn.base_function}
    factories = ("_pre_hook", "_post_hook", "_head_hook", "_k_pre_hook", "_mixer_hook")
    direct = ("_on_model", "_on_embed", "_on_encoder", "_on_decoder")
    saved.update({name: getattr(lens_mod.Lens, name) for name in factories + direct})

    def attention(self, *a, **k):
        acc["calls"] += 1
        acc["first"] = True
        return timed(saved["attention"])(self, *a, **k)

    def kernel(base, module):
        fn = saved["base_function"](base, module)

        def run(*a, **k):   # the call's first kernel is the model's own; later ones (edited rows redone) are arbiter's
            if not acc.pop("first", False):
                return fn(*a, **k)
            return timed(fn, "kernel")(*a, **k)
        return run

    def factory(name):
        def make(self, *a, **k):
            return timed(saved[name](self, *a, **k))
        return make

    lens_mod._Runtime.attention = attention
    attn_fn.base_function = kernel
    for name in factories:
        setattr(lens_mod.Lens, name, factory(name))
    for name in direct:
        setattr(lens_mod.Lens, name, timed(saved[name]))
    try:
        yield acc
    finally:
        lens_mod._Runtime.attention, attn_fn.base_function = saved["attention"], saved["base_function"]
        for name in factories + direct:
            setattr(lens_mod.Lens, name, saved[name])


def _inside_ms_per_layer(fn: Callable[[], Any], rounds: int) -> float:
    """Median over ``rounds`` forwards of arbiter's own time per layer (per attention call), ms (see _inside_clock)."""
    return _inside_median(fn, rounds, per_call=True) * 1e3


def _inside_median(fn: Callable[[], Any], rounds: int, per_call: bool = False) -> float:
    """Median over ``rounds`` forwards (after one untimed) of arbiter's own CPU time in seconds (see _inside_clock):
    per forward, or per attention call (``per_call``)."""
    per = []
    for i in range(rounds + 1):
        acc = {"total": 0.0, "kernel": 0.0, "calls": 0}
        with _inside_clock(acc):
            fn()
        if i and acc["calls"]:
            per.append((acc["total"] - acc["kernel"]) / (acc["calls"] if per_call else 1))
    return statistics.median(per) if per else float("nan")


def _floor_model(tm, acc: dict[str, float]):
    """A copy of the model whose text attention reads the last row's probabilities the least a tool can: the
    module's own eager function on that row (keys made contiguous, empty value dimension), its mask row built once
    per forward, one copy kept, then SDPA for every row. No arbiter code runs: the floor any reader of one row pays
    on this machine.
    ``acc`` collects the time spent there beside the kernel, as :func:`_inside_clock` does for arbiter.
    Returns (model, forward(inputs) -> (logits, the kept rows per layer))."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    rows: dict[int, torch.Tensor] = {}
    kept: list[torch.Tensor] = []
    AttentionInterface.register("bench_floor", _floor_functions(rows, kept, acc)[0])   # (this floor model's)
    AttentionMaskInterface.register("bench_floor", sdpa_mask)
    model = copy.deepcopy(tm.model)
    model.set_attn_implementation({"text_config": "bench_floor"})

    def run(inputs):
        rows.clear()
        kept.clear()
        return _forward(model, inputs), list(kept)
    return model, run


def _counterparts(model, copy_of_it, modules) -> list[torch.nn.Module]:
    """The modules of ``copy_of_it`` (a deep copy of ``model``) at the places ``modules`` hold in ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    return [copy_of_it.get_submodule(names[id(m)]) for m in modules]


def _floor_functions(rows: dict, kept: list, acc: dict[str, float]) -> tuple[Callable, Callable]:
    """(the floor's attention function: its read, then SDPA, the time beside SDPA added to ``acc``; its read of the
    last row alone: ``read(module, query, key, value, attention_mask, **kwargs)``, which appends that row's
    probabilities to ``kept``). ``rows``: the forward's mask rows, by mask object."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def read(module, query, key, value, attention_mask, **kwargs):
        if id(attention_mask) not in rows:   # the forward's mask: its last row, additive, built once per forward
            allowed = (torch.ones(query.shape[0], 1, 1, key.shape[2], dtype=torch.bool) if attention_mask is None
                       else attention_mask[:, :, -1:, -key.shape[2]:])
            rows[id(attention_mask)] = torch.where(allowed, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
        eager = sys.modules[type(module).__module__].eager_attention_forward
        # keys copied contiguous first (as arbiter does), so the scores' matmul need not gather them transposed
        _, probs = eager(module, query[:, :, -1:], key.contiguous(), value[..., :0], rows[id(attention_mask)],
                         **{**kwargs, "dropout": 0.0})
        kept.append(probs.clone())

    def floor_attention(module, query, key, value, attention_mask, **kwargs):
        start = time.process_time()
        read(module, query, key, value, attention_mask, **kwargs)
        k0 = time.process_time()
        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        acc["kernel"] += time.process_time() - k0
        acc["total"] += time.process_time() - start
        acc["calls"] += 1
        return out

    return floor_attention, read


def _fixed_variants() -> list[tuple[str, str, torch.dtype, str]]:
    """(device, text attention implementation, dtype, key suffix) the fixed section runs: the CPU with SDPA in fp32;
    on CUDA, SDPA in fp32 and, where flash-attention 2 is installed, flash in bf16 (its kernels take half
    precision; a row-sliced knockout keeps it for every row, a row read gets its 2D padding mask)."""
    out = [("cpu", "sdpa", torch.float32, "")]
    if torch.cuda.is_available():
        from transformers.utils import is_flash_attn_2_available

        out.append(("cuda", "sdpa", torch.float32, "_cuda"))
        if is_flash_attn_2_available():
            out.append(("cuda", "flash_attention_2", torch.bfloat16, "_cuda_flash"))
    return out


def _fixed_variant(cfg, shape: dict, device: str, impl: str, dtype: torch.dtype, suffix: str) -> dict[str, Any]:
    """The fixed section on one device, attention implementation and dtype; keys end in ``suffix``. On the CPU in
    fp32 also the floor and arbiter's own time (inside clock)."""
    out: dict[str, Any] = {}
    tm = tiny("llava", **shape)
    model = tm.model.to(device=device, dtype=dtype)
    if impl != "sdpa":
        model.set_attn_implementation({"text_config": impl})
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
              for k, v in _batch_inputs(tm, cfg["batch"]).items()}
    timed = functools.partial(_synced, device=device)
    cpu = device == "cpu" and dtype == torch.float32
    floor_acc = {"total": 0.0, "kernel": 0.0, "calls": 0}
    floor_model, floor = _floor_model(tm, floor_acc) if cpu else (None, None)
    fns = {"plain": timed(lambda: _forward(model, inputs)),
           **{k: timed(v) for k, v in _fixed_paths(model, tm.processor, inputs, shape["layers"]).items()},
           **({"floor_probs_last": timed(lambda: floor(inputs))} if floor is not None else {})}
    _section(f"fixed cost on {device} ({impl}, {str(dtype).replace('torch.', '')}): {len(fns)} paths round-robin, "
             f"{cfg['repeats'] * 6} rounds")
    # CPU: this process's CPU time with one torch thread (steady on a shared machine); CUDA: wall time
    single = device == "cpu" and torch.get_num_threads() == 1
    times, _ = _round_robin(fns, cfg["repeats"] * 6, warmup=1,
                            clock=time.process_time if single else time.perf_counter)
    out[f"fixed_clock{suffix}"] = "process CPU time" if single else "wall time"
    out[f"fixed_attn_implementation{suffix}"] = impl
    out[f"fixed_dtype{suffix}"] = str(dtype).replace("torch.", "")
    plain, attach = statistics.median(times["plain"]), statistics.median(times["attach_detach"])
    out[f"fixed_plain_forward_ms{suffix}"] = plain * 1e3
    out[f"fixed_attach_detach_ms{suffix}"] = attach * 1e3
    for name in times:
        if name not in ("plain", "attach_detach"):
            # paired with the plain forward of the same round; the floor attaches nothing
            sub = attach if name != "floor_probs_last" else 0.0
            added = _paired_median(times, name, "plain") - sub
            out[f"fixed_ms_per_layer_{name}{suffix}"] = added * 1e3 / shape["layers"]
            # how far the period's spread leaves that median: the paired differences' 95 % interval of the median
            low, high = _median_ci95([t - p for t, p in zip(times[name], times["plain"])])
            out[f"fixed_ms_per_layer_{name}_ci95_low{suffix}"] = (low - sub) * 1e3 / shape["layers"]
            out[f"fixed_ms_per_layer_{name}_ci95_high{suffix}"] = (high - sub) * 1e3 / shape["layers"]
            out[f"fixed_ratio_{name}{suffix}"] = (plain + added) / plain
    if "floor_probs_last" in times:   # the last-row read beyond what any reader of that row pays, paired per round
        beyond = [r - f for r, f in zip(times["record_probs_last"], times["floor_probs_last"])]
        low, high = _median_ci95(beyond)
        base = "fixed_ms_per_layer_record_probs_last_beyond_floor"
        for tail, v in (("", statistics.median(beyond)), ("_ci95_low", low), ("_ci95_high", high)):
            out[f"{base}{tail}{suffix}"] = (v - attach) * 1e3 / shape["layers"]
    if cpu:   # arbiter's own work (attention calls and hooks), read directly (load-independent)
        for name, fn in _fixed_paths(model, tm.processor, inputs, shape["layers"]).items():
            if name != "attach_detach":
                out[f"fixed_inside_ms_per_layer_{name}"] = _inside_ms_per_layer(fn, cfg["repeats"] * 2)
        per = []   # the floor's time beside its kernel, per call, as the inside clock reads arbiter's
        for i in range(cfg["repeats"] * 2 + 1):
            floor_acc.update(total=0.0, kernel=0.0, calls=0)
            _, floor_rows = floor(inputs)
            if i:
                per.append((floor_acc["total"] - floor_acc["kernel"]) / floor_acc["calls"] * 1e3)
        out["fixed_inside_ms_per_layer_floor_probs_last"] = statistics.median(per)
        out["fixed_inside_ms_per_layer_record_probs_last_beyond_floor"] = \
            out["fixed_inside_ms_per_layer_record_probs_last"] - out["fixed_inside_ms_per_layer_floor_probs_last"]
        with arbiter.attach(model, tm.processor) as lens, lens.record("attn.probs", rows="last") as rec:
            _forward(model, inputs)   # the floor reads what arbiter records
        out["fixed_floor_max_abs_diff"] = max(
            float((rec.trace.site("attn.probs", layer)[:, :, -1:] - floor_rows[layer]).abs().max())
            for layer in range(shape["layers"]))
        rows: dict[int, torch.Tensor] = {}
        kept: list[torch.Tensor] = []
        _, read = _floor_functions(rows, kept, {})
        out.update(_call_beyond_floor(model, tm.processor, inputs,
                                      lambda *a, **k: (kept.clear(), read(*a, **k)), cfg["repeats"] * 100))
    # the ATen operations each path adds per layer and per forward (counted: free of the load; on an accelerator
    # each is a kernel launch or a copy)
    with arbiter.attach(model, tm.processor) as lens:
        layers = [lf.layer for lf in lens.facts.layers]
    plain = fns["plain"]
    for name, fn in _fixed_paths(model, tm.processor, inputs, shape["layers"]).items():
        if name != "attach_detach":
            out[f"fixed_ops_per_layer_{name}{suffix}"], out[f"fixed_ops_per_forward_{name}{suffix}"] = \
                ops_added(fn, plain, layers)
    if floor is not None:
        floor_layers = _counterparts(model, floor_model, layers)
        out["fixed_ops_per_layer_floor_probs_last"], out["fixed_ops_per_forward_floor_probs_last"] = \
            ops_added(lambda: floor(inputs), plain, floor_layers, layers)
    out.update(_fixed_decode(model, tm.processor, inputs, layers, cfg, timed, device, suffix))
    out[f"fixed_seq_len{suffix}"] = int(inputs["input_ids"].shape[1])
    return out


DECODE_STEPS = 16   # tokens generated by the fixed section's decode paths


def _fixed_decode(model, proc, inputs, layers: list, cfg, timed, device: str, suffix: str) -> dict[str, Any]:
    """What a decode step of ``generate()`` costs per layer (``layers``: the decoder layers): plain, and what a
    knockout of every generated row (``last|generated``), alone and with a reader of that row, adds to it. Time per
    step and layer: (a generation of DECODE_STEPS tokens - one of a single token) / (DECODE_STEPS - 1) / layers,
    medians round-robin; operations added per step in a middle layer, counted the same way."""
    from arbiter.testing.ops import count_ops

    def generate(n, *make):
        def run():
            with contextlib.ExitStack() as stack:
                if make:
                    lens = stack.enter_context(arbiter.attach(model, proc))
                    for m in make:
                        stack.enter_context(m(lens))
                with torch.no_grad():
                    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return run
    every_step = lambda lens: lens.knockout("image", "last|generated", layers="all")   # noqa: E731
    reader = lambda lens: lens.record("attn.probs", rows="last|generated", steps="all")   # noqa: E731
    paths = {"plain": (), "knockout": (every_step,), "knockout_record": (every_step, reader)}
    fns = {f"{name}_{n}": timed(generate(n, *make)) for name, make in paths.items() for n in (1, DECODE_STEPS)}
    _section(f"decode steps on {device}: {len(paths)} paths, generations of 1 and {DECODE_STEPS} tokens round-robin, "
             f"{cfg['repeats'] * 2} rounds")
    single = device == "cpu" and torch.get_num_threads() == 1
    times, _ = _round_robin(fns, cfg["repeats"] * 2, warmup=1, clock=time.process_time if single else time.perf_counter)
    per = {name: _paired_median(times, f"{name}_{DECODE_STEPS}", f"{name}_1") / (DECODE_STEPS - 1) / len(layers) * 1e3
           for name in paths}
    out = {f"fixed_decode_ms_per_step_layer_plain{suffix}": per["plain"]}
    middle = len(layers) // 2
    ops = {key: count_ops(fn, layers).counts.get(middle, 0) for key, fn in fns.items()}
    for name in paths:
        if name != "plain":
            out[f"fixed_decode_ms_per_layer_{name}{suffix}"] = per[name] - per["plain"]
            out[f"fixed_decode_ops_per_layer_{name}{suffix}"] = \
                ((ops[f"{name}_{DECODE_STEPS}"] - ops[f"{name}_1"]) - (ops[f"plain_{DECODE_STEPS}"] - ops["plain_1"])) \
                / (DECODE_STEPS - 1)
    return out


def bench_fixed(cfg) -> dict[str, Any]:
    """Time arbiter adds per layer and forward on a model so narrow (hidden 64) that compute is small: (path -
    attach and detach - plain forward) / layers, in ms, per path; and each path's ratio to the plain forward. One
    model: each path attaches, runs its forward and detaches, the attach and detach alone timed and subtracted.
    On CUDA too when present (synchronised timing): SDPA, and flash-attention 2 where installed
    (:func:`_fixed_variants`)."""
    shape = {**FIXED_MODEL, **({"image_tokens": cfg["model"]["image_tokens"]} if cfg is QUICK else {})}
    out: dict[str, Any] = {"fixed_hidden": shape["hidden"], "fixed_layers": shape["layers"]}
    for variant in _fixed_variants():
        out.update(_fixed_variant(cfg, shape, *variant))
    return out


# ------------------------------------------------------------------------------------------------ real widths

def bench_scale(cfg) -> dict[str, Any]:
    """Real-width models with few layers: plain forward, arbiter record (every residual + last-row attention),
    knockout image -> last and a probe, timed round-robin in fp32 and bf16; the peak memory each adds over the
    plain forward (arbiter.memory.measure: CUDA's max_memory_allocated, or on a CPU the tensor storage the operations
    hold) against the size of what it keeps."""
    out: dict[str, Any] = {}
    quick = cfg is QUICK or cfg.get("quick")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, (family, shape) in SCALE_SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            dn = "fp32" if dtype == torch.float32 else "bf16"
            key = f"scale_{name}_{dn}"
            # a CPU without bf16 matmul units runs bf16 ~9x slower than fp32 (47 s vs 5.4 s for LLaVA-7B widths,
            # 2 layers, 618 tokens, here): there bf16 gets one layer and one timed round, and the ~2,900-token
            # shape none
            slow_bf16 = device == "cpu" and dtype == torch.bfloat16 and not quick
            if slow_bf16 and shape["image_tokens"] > 1000:
                out[f"{key}_skipped"] = "bf16 on this CPU: one forward of ~2,900 tokens takes minutes"
                continue
            layers = 1 if (slow_bf16 or shape["image_tokens"] > 1000) and not quick else 2
            repeats = 1 if slow_bf16 else (2 if quick else cfg.get("scale_repeats", 3))
            shape = {**shape, **(SCALE_QUICK if quick else {}), "layers": layers}
            _section(f"scale {name} {dn}: hidden {shape['hidden']}, {layers} layers, {repeats} rounds")
            tm = tiny(family, dtype=dtype, **shape)
            tm.model.to(device)
            inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                      for k, v in _batch_inputs(tm, 1).items()}
            n_tokens = int(inputs["input_ids"].shape[1])
            paths = {"plain": lambda: _forward(tm.model, inputs), **_arbiter_paths(tm, inputs)}
            res = _median_times(paths, repeats, warmup=0 if slow_bf16 else 1)
            plain = res["plain"][0]
            out[f"{key}_tokens"], out[f"{key}_layers"], out[f"{key}_rounds"] = n_tokens, layers, repeats
            out[f"{key}_plain_s"] = plain
            for p, (t_path, _) in res.items():
                if p != "plain":
                    out[f"{key}_{p.removesuffix('_s')}_ratio"] = t_path / plain
            # memory: the recorder keeps every residual [1, T, hidden] and last-row probs [1, heads, 1, T] per layer
            kept = layers * n_tokens * (shape["hidden"] + shape["heads"]) * torch.finfo(dtype).bits // 8
            # peak added above the weights: CUDA's allocator statistics, or the tensor storage the operations hold
            plain_peak, _, _ = memory.measure(paths["plain"], device)
            rec_peak, _, traces = memory.measure(paths["record_s"], device)
            out[f"{key}_record_kept_mb"] = kept / 2**20
            out[f"{key}_record_added_peak_mb"] = (rec_peak - plain_peak) / 2**20
            out[f"{key}_record_added_over_kept"] = (rec_peak - plain_peak) / kept
            del traces, tm, inputs, paths
            gc.collect()
    out["scale_device"] = device
    return out


# ------------------------------------------------------------------------------------------------ forwards

def _arbiter_paths(tm, inputs) -> dict[str, Callable[[], Any]]:
    """Arbiter record / knockout / probe forwards; each attaches and detaches (its cost is included)."""
    model, proc = tm.model, tm.processor

    def record():
        with arbiter.attach(model, proc) as lens, lens.record("resid.post", rows="all") as res, \
                lens.record("attn.probs", rows="last") as att:
            _forward(model, inputs)
        return res.trace, att.trace

    def knockout():
        with arbiter.attach(model, proc) as lens, lens.knockout("image", "last", layers="all"):
            return _forward(model, inputs)

    def probe():
        with arbiter.attach(model, proc) as lens, lens.probe(ImageGaze(), layers="all") as gaze:
            _forward(model, inputs)
        return gaze.result()

    return {"record_s": record, "knockout_s": knockout, "probe_s": probe}


def _nnsight_paths(nm, tm, inputs) -> dict[str, Callable[[], Any]]:
    image_keys = (inputs["input_ids"] == tm.config.image_token_id).to(torch.float32)[:, None, :]
    return {"nnsight_record_s": lambda: _nnsight_record(nm, inputs),
            "nnsight_probe_s": lambda: _nnsight_gaze(nm, inputs, image_keys)}


def _one_sample(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v[:1] for k, v in inputs.items()}


def _floor_record(tm, inputs) -> Callable[[], Any]:
    """The record path's floor: a copy of the model that keeps what arbiter's record path keeps, the least a tool
    can: every decoder layer's output (all rows) copied by a forward hook, and the last row's attention
    probabilities read as :func:`_floor_model` reads them. No arbiter code runs; its copies fault in fresh pages
    as arbiter's do. Returns ``run() -> (the outputs kept, the rows kept)``."""
    model, forward = _floor_model(tm, {"total": 0.0, "kernel": 0.0, "calls": 0})
    with arbiter.attach(tm.model) as lens:
        layers = _counterparts(tm.model, model, [lf.layer for lf in lens.facts.layers])
    kept: list[torch.Tensor] = []

    def keep(module, args, output):
        kept.append((output[0] if isinstance(output, tuple) else output).detach().clone())
    for layer in layers:
        layer.register_forward_hook(keep)

    def run():
        kept.clear()
        _, rows = forward(inputs)
        return list(kept), rows
    return run


def bench_forwards(tm, inputs, cfg) -> dict[str, Any]:
    """Plain SDPA and eager forwards, arbiter record / knockout / probe, the record path's floor (what it keeps,
    copied by plain hooks), nnsight record / probe (eager: nnsight sees no probabilities under SDPA), all timed
    round-robin."""
    eager = _model_copy(tm, "eager")
    nm = _wrap(_model_copy(tm, "eager"))
    fns = {"plain_forward_s": lambda: _forward(tm.model, inputs), **_arbiter_paths(tm, inputs),
           "floor_record_s": _floor_record(tm, inputs),
           "plain_forward_eager_s": lambda: _forward(eager, inputs), **_nnsight_paths(nm, tm, inputs)}
    _section("warm-up: every path once on one sample, one plain forward on the batch")
    small = _one_sample(inputs)
    for fn in {**_arbiter_paths(tm, small), **_nnsight_paths(nm, tm, small)}.values():
        fn()
    _forward(eager, small)
    _forward(tm.model, inputs)
    _section(f"{len(fns)} paths round-robin, {cfg['repeats']} rounds")
    # one torch thread: this process's CPU time (steadier on a shared machine than wall time)
    single = torch.get_num_threads() == 1 and not torch.cuda.is_available()
    usage: dict[str, list[tuple[float, float, int]]] = {name: [] for name in fns}
    times, last = _round_robin({name: _with_usage(fn, usage[name]) for name, fn in fns.items()}, cfg["repeats"],
                               warmup=0, clock=time.process_time if single else time.perf_counter)
    out = {name: statistics.median(t) for name, t in times.items()}
    out["forwards_clock"] = "process CPU time" if single else "wall time"
    for key, name in (("plain", "plain_forward_s"), ("record", "record_s"), ("knockout", "knockout_s"),
                      ("probe", "probe_s"), ("floor_record", "floor_record_s")):
        # the process CPU time split: user (the computation) and system (chiefly the kernel handing out fresh pages:
        # minor page faults), and the faults themselves, medians per forward
        for i, part in enumerate(("user_s", "sys_s", "minor_faults") if usage[name] else ()):
            out[f"forwards_{part}_{key}"] = statistics.median(u[i] for u in usage[name])
        if key == "plain":
            continue
        # each round's time over the plain forward of the same round: drift between rounds cancels
        ratios = [t / p for t, p in zip(times[name], times["plain_forward_s"])]
        out[f"{key}_overhead_paired"] = statistics.median(ratios)
        out[f"{key}_overhead_paired_ci95_low"], out[f"{key}_overhead_paired_ci95_high"] = _median_ci95(ratios)
        # the same on user time alone: what the path computes, without the system's page handling
        if usage[name]:
            out[f"{key}_overhead_user_paired"] = statistics.median(
                u[0] / p[0] for u, p in zip(usage[name], usage["plain_forward_s"]))
        if single and key != "floor_record":   # arbiter's own CPU time in the forward (its attention calls beside
            # the kernel, its hooks), read directly: free of the load's drift, which moves the whole-forward ratios by
            # a few per cent here
            out[f"{key}_overhead_inside"] = 1 + _inside_median(fns[name], max(3, cfg["repeats"] // 3)) / \
                out["plain_forward_s"]
    # the record path over its floor, paired per round (both copy the same 40 MB and fault the same fresh pages)
    over = [t / f for t, f in zip(times["record_s"], times["floor_record_s"])]
    out["record_over_floor_paired"] = statistics.median(over)
    out["record_over_floor_paired_ci95_low"], out["record_over_floor_paired_ci95_high"] = _median_ci95(over)
    out.update(_agreement(tm, inputs, last))
    return out


def _agreement(tm, inputs, last: dict[str, Any]) -> dict[str, Any]:
    """Arbiter and nnsight saw the same values (padded rows excluded: they differ between eager and SDPA)."""
    res, att = last["record_s"]
    nn_resid, nn_probs = last["nnsight_record_s"]
    real = inputs["attention_mask"].bool()
    resid_diff = (torch.stack(nn_resid) - res.stack("resid.post"))[:, real].abs().max()
    probs_diff = (torch.stack(nn_probs) - att.stack("attn.probs")[:, :, :, 0]).abs().max()
    floor_resid, floor_rows = last["floor_record_s"]
    floor_diff = max(float((torch.stack(floor_resid) - res.stack("resid.post")).abs().max()),
                     float((torch.stack(floor_rows) - att.stack("attn.probs")).abs().max()))
    return {"nnsight_record_max_abs_diff": max(float(resid_diff), float(probs_diff)),
            "floor_record_max_abs_diff": floor_diff,
            "nnsight_probe_max_abs_diff": float((torch.stack(last["nnsight_probe_s"]) - last["probe_s"]).abs().max()),
            "knockout_changes_logits": bool((last["knockout_s"] - last["plain_forward_s"]).abs().max() > 0)}


# ------------------------------------------------------------------------------------------------ sweep

def _sweep_heads(tm, per_layer: int | None) -> list[tuple[int, int]]:
    """``per_layer`` heads of each layer, spread evenly (None: every head)."""
    n_layers, n_heads = tm.config.text_config.num_hidden_layers, tm.config.text_config.num_attention_heads
    per_layer = n_heads if per_layer is None else min(per_layer, n_heads)
    step = n_heads // per_layer
    return [(layer, h) for layer in range(n_layers) for h in range(0, n_heads, step)[:per_layer]]


def _attention_share(model, inputs, repeats: int) -> float:
    """Median over ``repeats`` clean forwards of the share of the decoder layers' time spent in their attention
    before its output projection (what a sweep skips at a chunk's first layer when it replays that attention)."""
    with arbiter.attach(model) as lens:
        facts = lens.facts
    marks: dict[str, float] = {}
    spent = {"attn": 0.0, "layers": 0.0}
    # on CUDA each mark waits for the kernels queued before it (the share of device time, not of launches)
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)

    def mark(key):
        def hook(*_):
            sync()
            marks[key] = time.perf_counter()
        return hook

    def add(start, stop, key):
        def hook(*_):
            sync()
            marks[stop] = time.perf_counter()
            spent[key] += marks[stop] - marks[start]
        return hook
    handles = []
    for lf in facts.layers:
        if lf.attn is None or lf.out_proj is None:
            continue
        handles += [lf.layer.register_forward_pre_hook(mark("layer")),
                    lf.layer.register_forward_hook(add("layer", "layer_end", "layers")),
                    lf.attn.register_forward_pre_hook(mark("attn")),
                    lf.out_proj.register_forward_pre_hook(add("attn", "proj", "attn"))]
    shares = []
    try:
        with torch.no_grad():
            _forward(model, inputs)   # warm
            for _ in range(max(repeats, 1)):
                spent.update(attn=0.0, layers=0.0)
                _forward(model, inputs)
                shares.append(spent["attn"] / spent["layers"])
    finally:
        for h in handles:
            h.remove()
    return statistics.median(shares)


def _last_row_share(model, inputs, repeats: int) -> float:
    """Median over ``repeats`` paired rounds of the last decoder layer's time on its last row only (o_proj and MLP on
    one row, ``lens.last_row_only``) over its time whole, the layers below it replayed, last-row logits."""
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    kw = {"use_cache": False, "logits_to_keep": 1}
    ratios = []
    with arbiter.attach(model) as lens, torch.no_grad():
        with lens.capture() as cap:
            model(**inputs, **kw)
        last = lens.facts.n_layers - 1

        def timed(cut: bool) -> float:
            with lens.replay(cap.layers, last, 1, cap.encoders), \
                    (lens.last_row_only() if cut else contextlib.nullcontext()):
                sync()
                t = time.perf_counter()
                model(**inputs, **kw)
                sync()
                return time.perf_counter() - t
        timed(True), timed(False)   # warm
        for r in range(max(repeats, 1) * 3):
            first = bool(r % 2)
            a = timed(first)
            b = timed(not first)
            ratios.append(a / b if first else b / a)
    return statistics.median(ratios)


def bench_sweep(tm, cfg) -> dict[str, Any]:
    """Single-head blocking: head_sweep (one chunk per layer) vs a naive loop of forwards vs an nnsight loop, over
    every head (``sweep_heads_per_layer`` None), or over a subset (that many per layer; times scaled to all heads,
    which overstates the sweep's time: its clean forward is shared by fewer settings)."""
    tc = tm.config.text_config
    total = tc.num_hidden_layers * tc.num_attention_heads
    heads = _sweep_heads(tm, cfg["sweep_heads_per_layer"])
    scale = total / len(heads)
    chunk = len(heads) // tc.num_hidden_layers  # settings are sorted by layer: one chunk = one layer's heads
    # on a GPU when there is one: batching settings is what a GPU gains from (a CPU, little)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    synced = functools.partial(_synced, device=device)
    inputs = {k: v.to(device) for k, v in _batch_inputs(tm, cfg["sweep_samples"], seed=100).items()}
    head_dim = tc.hidden_size // tc.num_attention_heads
    model = tm.model if device == "cpu" else copy.deepcopy(tm.model).to(device)
    nm = _wrap(_model_copy(tm, "sdpa").to(device))
    with arbiter.attach(model, tm.processor) as lens:
        def sweep():
            return head_sweep(lens, inputs, heads=heads, chunk=chunk)

        def naive():
            vals = []
            for layer, head in heads:
                with lens.block_heads([(layer, head)]):
                    vals.append(_forward(model, inputs)[:, -1])
            return torch.stack(vals)

        def nnsight_loop():
            return torch.stack([_nnsight_block(nm, inputs, layer, head, head_dim) for layer, head in heads])

        _section(f"warm-up: nnsight block once; sweep, naive loop, nnsight loop over {len(heads)} heads "
                 f"round-robin on {device}, {cfg['sweep_repeats']} rounds")
        _nnsight_block(nm, _one_sample(inputs), *heads[0], head_dim)
        timed = _median_times({"sweep": synced(sweep), "naive": synced(naive), "nnsight": synced(nnsight_loop)},
                              cfg["sweep_repeats"], 1 if device == "cuda" else 0)
    (sweep_s, res), (naive_s, naive_vals), (nn_s, nn_vals) = timed["sweep"], timed["naive"], timed["nnsight"]
    # what batching settings can give on this device: one forward of 8 copies of the batch vs 8 forwards of it
    # (on a CPU the forward is compute-bound, so tiling settings saves little; the sweep's gain is the replay)
    b = inputs["input_ids"].shape[0]
    tiled = {k: v.repeat(8, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b
             else v for k, v in inputs.items()}
    _section("batching gain: one forward of 8 tiled copies vs 8 forwards")
    tiles = _median_times({"one": synced(lambda: _forward(model, inputs)),
                           "tiled": synced(lambda: _forward(model, tiled))}, cfg["sweep_repeats"], 1)
    n_layers = tc.num_hidden_layers
    # layer-forwards the sweep computes, per copy of the batch: each chunk's settings from the chunk's first layer
    # on, plus the clean run (the loop: every layer for every setting)
    firsts = sorted(s.first_layer for s in res.settings)
    chunks = [firsts[i:i + res.chunk] for i in range(0, len(firsts), res.chunk)]
    sweep_layer_forwards = n_layers + sum(len(c) * (n_layers - c[0]) for c in chunks)
    # a chunk whose first layer's attention is replayed skips that layer's share before o_proj as well: measured
    share = _attention_share(model, inputs, cfg["sweep_repeats"])
    replayed = (len(heads) if res.attention_replayed == res.forwards else 0 if res.attention_replayed == 0
                else float("nan"))
    # a chunk that leaves the last layer alone runs it on the last row: that layer costs the measured share
    kept = _last_row_share(model, inputs, cfg["sweep_repeats"]) if res.last_row else 1.0
    cut = [c for c in chunks if c[-1] < n_layers - 1]
    cut_settings = sum(len(c) for c in cut) if len(cut) == res.last_row else float("nan")
    ceiling = len(heads) * n_layers / (sweep_layer_forwards - share * replayed - (1 - kept) * cut_settings)
    return {"sweep_device": device, "sweep_samples": cfg["sweep_samples"], "sweep_heads_total": total,
            "sweep_heads_timed": len(heads),
            "sweep_chunk": chunk, "sweep_repeats": cfg["sweep_repeats"], "sweep_forwards": res.forwards,
            "sweep_layers_skipped": res.layers_skipped,
            "sweep_layer_forward_ratio": len(heads) * n_layers / sweep_layer_forwards,
            "sweep_attention_replayed": res.attention_replayed, "sweep_attention_share": share,
            "sweep_last_row": res.last_row, "sweep_last_row_share": kept, "sweep_replay_ceiling": ceiling,
            "sweep_s": sweep_s * scale, "naive_loop_s": naive_s * scale, "nnsight_loop_s": nn_s * scale,
            "sweep_speedup": naive_s / sweep_s, "nnsight_sweep_speedup": nn_s / sweep_s,
            # the speedup over what the replay allows (layer-forwards of the loop / of the sweep, a replayed
            # attention counted as the measured share of a layer)
            "sweep_efficiency": (naive_s / sweep_s) / ceiling,
            "sweep_batching_gain_8": 8 * tiles["one"][0] / tiles["tiled"][0],
            "nnsight_sweep_heads_timed": len(heads),
            "sweep_max_abs_diff": float((res.values - naive_vals).abs().max().cpu()),
            "nnsight_sweep_max_abs_diff": float((nn_vals - naive_vals).abs().max().cpu())}


# ------------------------------------------------------------------------------------------------ trace I/O

def _fake_trace(inputs_shape: tuple[int, int], hidden: int, mb: float) -> Trace:
    b, s = inputs_shape
    one = b * s * hidden * 4
    n = max(1, round(mb * 1e6 / one))
    gen = torch.Generator().manual_seed(0)
    return Trace({f"L{i}.resid.post": torch.randn(b, s, hidden, generator=gen) for i in range(n)},
                 {"arbiter": "trace", "note": "benchmark"})


def _torch_save_synced(tensors, path) -> None:
    with open(path, "wb") as f:
        torch.save(tensors, f)
        f.flush()
        os.fsync(f.fileno())


def _touch(tensors: dict[str, torch.Tensor]) -> float:
    """Read every element once (safetensors maps the file lazily; a load is only done once the data is read)."""
    return sum(float(t.sum()) for t in tensors.values())


def bench_trace_io(inputs, hidden: int, cfg) -> dict[str, Any]:
    _section("trace I/O")
    trace = _fake_trace(tuple(inputs["input_ids"].shape), hidden, cfg["trace_mb"])
    tensors = dict(trace.items())
    mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    reps = cfg["repeats"]
    with tempfile.TemporaryDirectory(prefix="arbiter-bench-") as tmp:
        st, pt = Path(tmp) / "trace.safetensors", Path(tmp) / "trace.pt"
        write_s, _ = _median_time(lambda: trace.save(st), reps, 1)
        read_s, _ = _median_time(lambda: _touch(dict(Trace.load(st).items())), reps, 1)
        tsave_s, _ = _median_time(lambda: _torch_save_synced(tensors, pt), reps, 1)
        tload_s, _ = _median_time(lambda: _touch(torch.load(pt, weights_only=True)), reps, 1)
    return {"trace_mb": round(mb, 1), "trace_write_mb_s": mb / write_s, "trace_read_mb_s": mb / read_s,
            "torch_save_mb_s": mb / tsave_s, "torch_load_mb_s": mb / tload_s}


# ------------------------------------------------------------------------------------------------ attribution

def _conflict_samples(folder: Path, n: int, seed: int = 0):
    """(data set, its first n conflict samples): the synthetic colour / shape data of arbiter.data."""
    from arbiter.data import generate_synthetic

    ds = generate_synthetic(folder, n + n // 3 + 2, seed=seed, image_size=32, p_noisy=0.0)
    samples = [x for x in ds.samples if x.conflict][:n]
    assert len(samples) == n, f"{len(samples)} conflict samples, wanted {n}"
    return ds, samples


def bench_attribution(tm, cfg) -> dict[str, Any]:
    """Attribution patching (all heads ranked by one forward + one backward) against a plain SDPA forward of the
    same encoded batch, round-robin; then its Spearman against the exhaustive single-head ranking (the
    reference, n_heads + 1 forward-equivalents) on ``attribution_samples`` samples of the same data."""
    from arbiter.experiments.heads import attribution_ranking, compare_rankings, exhaustive_ranking

    model, proc = tm.model, tm.processor
    with tempfile.TemporaryDirectory(prefix="arbiter-bench-") as tmp:
        ds, samples = _conflict_samples(Path(tmp) / "data", max(cfg["batch"], cfg["attribution_samples"]))
        batch_samples = samples[:cfg["batch"]]
        with arbiter.attach(model, proc) as lens:
            inputs = dict(lens.encode(batch_samples, dataset=ds).inputs)

        def plain():
            with torch.no_grad():
                return _forward(model, inputs)

        def attribution():  # attach + encode + answer ids + forward + backward, as a user calls it
            with arbiter.attach(model, proc) as lens:
                return attribution_ranking(lens, batch_samples, batch_size=len(batch_samples), dataset=ds)

        _section(f"attribution patching vs plain forward, batch {len(batch_samples)}, round-robin, "
                 f"{cfg['repeats']} rounds")
        timed = _median_times({"plain": plain, "attribution": attribution}, cfg["repeats"], warmup=1)
        k = cfg["attribution_samples"]
        _section(f"exhaustive single-head ranking vs attribution on {k} samples (Spearman)")
        with arbiter.attach(model, proc) as lens:
            ref = exhaustive_ranking(lens, samples[:k], batch_size=k, dataset=ds)
            att = attribution_ranking(lens, samples[:k], batch_size=k, dataset=ds)
        agree = compare_rankings(ref, att, 0.05)
    plain_s, attr_s = timed["plain"][0], timed["attribution"][0]
    return {"attribution_batch": len(batch_samples), "attribution_seq_len": int(inputs["input_ids"].shape[1]),
            "attribution_plain_forward_s": plain_s, "attribution_s": attr_s,
            "attribution_forward_equivalents": attr_s / plain_s,
            "attribution_spearman": agree["spearman"], "attribution_topg_overlap": agree["topg_overlap"],
            "attribution_top3_overlap": agree["top3_overlap"], "attribution_spearman_samples": k}


# ------------------------------------------------------------------------------------------------ streaming memory

def _status_kib(field: str) -> int | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process from /proc/self/status, KiB."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _stream_child(n: int, data: str, out: str) -> int:
    """In a fresh process: the streamed baseline evaluation of the first n conflict samples with trace_dir;
    prints one JSON line with peak RSS figures in KiB. ``process_maxrss_kib`` is ``ru_maxrss`` of the whole
    process; imports, the model build and data loading peak higher than the evaluation itself, so
    ``maxrss_kib`` is the peak during the evaluation: the kernel's high-water mark ``VmHWM`` reset just before it
    (Linux ``/proc/self/clear_refs``; ``ru_maxrss`` cannot be reset once a thread has exited). Where the reset
    is not possible, ``rss_reset`` is false and ``maxrss_kib`` is ``ru_maxrss``."""
    import resource

    from arbiter.data import load_jsonl
    from arbiter.experiments.baseline import evaluate
    from arbiter.trace import read_trace_dir

    torch.set_num_threads(1)
    torch.manual_seed(0)
    started = time.perf_counter()
    tm = tiny("llava", **STREAM_MODEL)
    ds = load_jsonl(data)
    samples = [x for x in ds.samples if x.conflict][:n]
    gc.collect()
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = False
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM, the peak-RSS high-water mark
        reset = _status_kib("VmHWM") is not None and _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024
    start_rss = _status_kib("VmRSS")
    with arbiter.attach(tm.model, tm.processor) as lens:
        evaluate(lens, samples, batch_size=8, dataset=ds, generate=False, trace_dir=out)
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = _status_kib("VmHWM") if reset else process_peak
    written = len(read_trace_dir(out).meta["sample_ids"])
    print(json.dumps({"n": len(samples), "written": written, "maxrss_kib": peak, "process_maxrss_kib": process_peak,
                      "setup_maxrss_kib": setup_peak, "start_rss_kib": start_rss, "rss_reset": reset,
                      "seconds": time.perf_counter() - started}))
    return 0


def bench_stream_memory(cfg) -> dict[str, Any]:
    """Peak RSS of the streamed baseline evaluation (arbiter.experiments.baseline.evaluate with trace_dir) over
    many vs few conflict samples, each in a fresh subprocess: it must not grow with the sample count.
    ``stream_memory_ratio`` = peak RSS during the evaluation (the model and libraries resident included) with
    1,000 samples / with 10; ``stream_growth_mb_*``: that peak minus the RSS when the evaluation started;
    ``stream_process_maxrss_ratio``: the same ratio of the whole processes' ``ru_maxrss`` (set by the start-up)."""
    import subprocess

    small, large = cfg["stream_samples"]
    out: dict[str, Any] = {"stream_samples": large, "stream_small_samples": small,
                           "stream_model": ", ".join(f"{k}={v}" for k, v in STREAM_MODEL.items())}
    with tempfile.TemporaryDirectory(prefix="arbiter-bench-") as tmp:
        _section(f"streaming memory: synthetic data ({large} conflict samples)")
        ds, _ = _conflict_samples(Path(tmp) / "data", large)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        for n in (small, large):
            _section(f"streaming memory: baseline evaluation of {n} samples in a fresh process")
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--stream-child", str(n),
                                   str(ds.path), str(Path(tmp) / f"traces{n}")], env=env, capture_output=True,
                                  text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"stream child ({n} samples) failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            assert res["n"] == res["written"] == n, res
            tag = "large" if n == large else "small"
            out[f"stream_peak_rss_mb_{tag}"] = res["maxrss_kib"] / 1024
            out[f"stream_process_maxrss_mb_{tag}"] = res["process_maxrss_kib"] / 1024
            if res["start_rss_kib"] is not None:
                out[f"stream_growth_mb_{tag}"] = (res["maxrss_kib"] - res["start_rss_kib"]) / 1024
            out[f"stream_{tag}_s"] = res["seconds"]
            out["stream_rss_reset"] = bool(res["rss_reset"]) and out.get("stream_rss_reset", True)
    out["stream_memory_ratio"] = out["stream_peak_rss_mb_large"] / out["stream_peak_rss_mb_small"]
    out["stream_process_maxrss_ratio"] = out["stream_process_maxrss_mb_large"] / out["stream_process_maxrss_mb_small"]
    return out


# ------------------------------------------------------------------------------------------------ surrogate

def bench_surrogate(cfg) -> dict[str, Any]:
    """The physics surrogate (SPEC 11, issue #7): wall time of the default β sweep (`arbiter surrogate sweep
    --grid 5 --seeds 10`: 25 cells x 10 seeds, RK4 over t in [-10, 80], ridge readouts), and the speed-up of
    integrating the whole grid as one batch over a per-point loop (one cell at a time, same seeds, same code and
    threads), both over the first ``horizon`` time units; the loop is timed on ``loop_cells`` cells spread over the
    grid and scaled to the whole grid."""
    from arbiter.surrogate import PAPER, simulate, sweep
    from arbiter.surrogate.oscillators import make_signal, resolve_workers
    from arbiter.surrogate.sweep import beta_grid

    sc = cfg["surrogate"]
    r: dict[str, Any] = {"surrogate_grid": sc["grid"], "surrogate_seeds": sc["seeds"],
                         "surrogate_workers": resolve_workers(None), "surrogate_load_avg_start": _load()}
    _section(f"surrogate sweep ({sc['grid']} x {sc['grid']} x {sc['seeds']} seeds)")
    start = time.perf_counter()
    res = sweep("paper", sc["grid"], sc["seeds"])
    r["surrogate_sweep_s"] = time.perf_counter() - start
    r["surrogate_integration_s"] = res.params["timings"]["integration_s"]
    r["surrogate_readout_s"] = res.params["timings"]["readout_s"]
    r["surrogate_dtype"] = res.params["numerics"]["integrator"]
    _section("surrogate: batched grid vs per-point loop")
    axis = beta_grid(sc["grid"])
    cells = np.array([(a, b) for a in axis for b in axis])
    pick = np.linspace(0, len(cells) - 1, min(sc["loop_cells"], len(cells))).round().astype(int)
    t_end = PAPER.t_start + sc["horizon"]
    sig = make_signal(PAPER, t_end)
    seeds = range(sc["seeds"])
    kw = {"signal": sig, "t_end": t_end, "record_from": t_end}
    times = _median_times({
        "batch": lambda: simulate(PAPER, cells[:, 0], cells[:, 1], seeds, **kw),
        "loop": lambda: simulate(PAPER, cells[pick, 0], cells[pick, 1], seeds, batch_cells=1, **kw)},
        sc["repeats"], warmup=0)
    r["surrogate_batch_s"] = times["batch"][0]
    r["surrogate_loop_s"] = times["loop"][0] * len(cells) / len(pick)
    r["surrogate_batch_speedup"] = r["surrogate_loop_s"] / r["surrogate_batch_s"]
    r.update(surrogate_horizon=sc["horizon"], surrogate_loop_cells_timed=len(pick), surrogate_load_avg_end=_load())
    return r


# ------------------------------------------------------------------------------------------------ head search

HEAD_SEARCH_ORGANISMS = ("llava_chat", "llava_tiny", "qwen2vl_tiny", "llava_tiny_s0")
"""Organisms the head-search section measures, those present (the first present gives the top-level keys)."""


def _head_search_one(name: str, n: int) -> dict[str, Any]:
    """Exhaustive sweep, then the head search, on the first ``n`` conflict samples of organism ``name``."""
    from arbiter.experiments.head_search import oracle_packing, search_ranking
    from arbiter.experiments.heads import attribution_ranking, exhaustive_ranking
    from arbiter.organisms import load

    model, proc, ds = load(name)
    samples = [x for x in ds.samples if x.conflict][:n]
    _section(f"head search vs exhaustive sweep on {name}, {len(samples)} conflict samples")
    with arbiter.attach(model, proc) as lens:
        start = time.perf_counter()
        ex = exhaustive_ranking(lens, samples, batch_size=8, dataset=ds, progress=False)
        ex_s = time.perf_counter() - start
        start = time.perf_counter()
        se = search_ranking(lens, samples, batch_size=8, dataset=ds, progress=False)
        se_s = time.perf_counter() - start
        floor = oracle_packing(lens, samples, ex, batch_size=8, dataset=ds, progress=False)
        # the search with a cheap prior (first-order attribution, 3 forward-equivalents): its top heads zeroed first
        atp = attribution_ranking(lens, samples, batch_size=8, dataset=ds, method="atp", progress=False)
        with_prior = search_ranking(lens, samples, batch_size=8, dataset=ds, prior=atp, progress=False)
        graddrop = attribution_ranking(lens, samples, batch_size=8, dataset=ds, method="graddrop", progress=False)
    ranked = ex.ranking()
    theta = min(se.threshold * ranked[0]["score"], ranked[len(ex.top()) - 1]["score"])
    above_ex = [(x["layer"], x["head"]) for x in ranked if x["score"] >= theta]
    done = torch.isfinite(se.scores)
    return {"organism": name, "heads": se.n_heads, "samples": len(samples), "threshold": se.threshold,
            "forward_equivalents": se.cost_forward_equivalents,
            "exhaustive_forward_equivalents": ex.cost_forward_equivalents,
            "cost_ratio": se.cost_forward_equivalents / ex.cost_forward_equivalents,
            "oracle_forward_equivalents": floor["forward_equivalents"], "oracle_cost_ratio": floor["ratio"],
            "search_over_oracle": se.cost_forward_equivalents / floor["forward_equivalents"],
            "layer_share_cost": se.layer_share_cost, "exhaustive_layer_share_cost": se.exhaustive_layer_share_cost,
            "s": se_s, "exhaustive_s": ex_s, "speedup": ex_s / se_s, "measured_heads": se.measured,
            "rounds": len(se.rounds), "above": [list(h) for h in above_ex],
            "above_equal": [h for h, _ in se.above] == above_ex, "topg_equal": se.top() == ex.top(),
            "max_abs_score_diff": float((se.scores[done] - ex.scores[done]).abs().max()),
            "untested_bound": se.untested_bound, "cutoff": se.cutoff,
            "dominance_failures": len(se.guard["failures"]), "fallback_splits": len(se.guard["fallback_splits"]),
            "prior_forward_equivalents": with_prior.cost_forward_equivalents,
            "prior_cost_ratio": with_prior.cost_forward_equivalents / ex.cost_forward_equivalents,
            "prior_above_equal": [h for h, _ in with_prior.above] == above_ex,
            # where each cheap estimator places the heads above θ in its order (1 = first), and its cost
            "prior_positions_atp": _positions(atp, above_ex), "prior_positions_graddrop": _positions(graddrop, above_ex),
            "prior_graddrop_forward_equivalents": graddrop.cost_forward_equivalents}


def _positions(ranking, heads: list[tuple[int, int]]) -> list[int]:
    """Where ``ranking`` (a HeadRanking) places each of ``heads`` in its order, 1 = first."""
    order = [(x["layer"], x["head"]) for x in ranking.ranking()]
    return [order.index(h) + 1 for h in heads]


def bench_head_search(cfg) -> dict[str, Any]:
    """The head search (docs/methods/head-search.md) against the exhaustive single-head sweep on each shipped
    organism of HEAD_SEARCH_ORGANISMS that is present, same samples, same process: forward-equivalents per batch
    (blocked sets + the clean forwards run, against L·H + 1), the wall-time speed-up, and whether the heads
    above the cutoff, their order and TopG agree. Top-level ``head_search_*`` keys: the first organism present."""
    from arbiter.organisms import available

    names = [n for n in HEAD_SEARCH_ORGANISMS if n in available()]
    runs = [_head_search_one(n, cfg["head_search_samples"]) for n in names]
    if not runs:
        return {"head_search_organism": None}
    r = {f"head_search_{k if k != 's' else 'search_s'}": v for k, v in runs[0].items()}
    r["head_search_by_organism"] = runs
    return r


# ------------------------------------------------------------------------------------------------ report

def _ratios(r: dict[str, Any]) -> None:
    plain = r["plain_forward_s"]
    for key, src in (("record_overhead", "record_s"), ("knockout_overhead", "knockout_s"),
                     ("probe_overhead", "probe_s"), ("floor_record_overhead", "floor_record_s"),
                     ("eager_forward_overhead", "plain_forward_eager_s"),
                     ("nnsight_record_overhead", "nnsight_record_s"), ("nnsight_probe_overhead", "nnsight_probe_s")):
        r[key] = r[src] / plain if r.get(src) is not None else None


ROWS = [("plain SDPA forward", "plain_forward_s", None),
        ("arbiter record (resid all rows + probs last row)", "record_s", "record_overhead"),
        ("arbiter knockout image->last, all layers", "knockout_s", "knockout_overhead"),
        ("arbiter probe (image gaze of last row)", "probe_s", "probe_overhead"),
        ("floor of record: the same copies by plain hooks", "floor_record_s", "floor_record_overhead"),
        ("plain eager forward", "plain_forward_eager_s", "eager_forward_overhead"),
        ("nnsight record (eager)", "nnsight_record_s", "nnsight_record_overhead"),
        ("nnsight probe (eager)", "nnsight_probe_s", "nnsight_probe_overhead"),
        ("naive loop, one forward per head", "naive_loop_s", None),
        ("arbiter head_sweep", "sweep_s", "sweep_speedup"),
        ("nnsight loop, one trace per head", "nnsight_loop_s", "nnsight_sweep_speedup")]


def format_table(r: dict[str, Any]) -> str:
    lines = [f"{'measurement':<50} {'seconds':>9} {'ratio':>8}", "-" * 69]
    for label, key, ratio in ROWS:
        if r.get(key) is None:
            continue
        rt = f"{r[ratio]:8.2f}" if ratio and r.get(ratio) is not None else f"{'':>8}"
        lines.append(f"{label:<50} {r[key]:9.3f} {rt}")
    if r.get("plain_forward_s") is not None:
        lines.append("(ratios: time / plain SDPA forward; sweep rows: speedup = naive loop time / head_sweep time)")
    paths = ("plain", "record", "knockout", "probe")
    if r.get("record_overhead_user_paired") is not None:
        lines.append("user-time ratios (paired), record / knockout / probe: " + " / ".join(
            f"{r[f'{k}_overhead_user_paired']:.3f}" for k in paths[1:]))
    if r.get("record_overhead_inside") is not None:
        lines.append("1 + arbiter's own time in the forward / plain forward (inside clock): " + " / ".join(
            f"{r[f'{k}_overhead_inside']:.4f}" for k in paths[1:]))
    if r.get("forwards_sys_s_plain") is not None:
        faulted = (*paths, "floor_record") if r.get("forwards_sys_s_floor_record") is not None else paths
        lines.append("system s and minor page faults per forward, " + " / ".join(faulted) + ": " + "; ".join(
            f"{r[f'forwards_sys_s_{k}']:.3f} s, {r[f'forwards_minor_faults_{k}']:.0f}" for k in faulted))
    if r.get("record_over_floor_paired") is not None:
        lines.append(f"record / its floor, paired: {r['record_over_floor_paired']:.3f} (95 % interval "
                     f"{r['record_over_floor_paired_ci95_low']:.3f}-{r['record_over_floor_paired_ci95_high']:.3f}); "
                     f"floor / plain, paired: {r['floor_record_overhead_paired']:.3f}")
    for key in ("trace_write_mb_s", "trace_read_mb_s", "torch_save_mb_s", "torch_load_mb_s"):
        if r.get(key) is not None:
            lines.append(f"{key:<50} {r[key]:9.1f} MB/s")
    if r.get("attribution_s") is not None:
        label = f"attribution patching, all heads, batch {r['attribution_batch']}"
        lines.append(f"{label:<50} {r['attribution_s']:9.3f} {r['attribution_forward_equivalents']:8.2f}"
                     "  (attribution_forward_equivalents)")
        label = f"attribution vs exhaustive, Spearman ({r['attribution_spearman_samples']} samples)"
        lines.append(f"{label:<50} {r['attribution_spearman']:9.3f}           (random weights: weakly meaningful)")
    if r.get("stream_memory_ratio") is not None:
        label = f"streamed baseline peak RSS, {r['stream_samples']} vs {r['stream_small_samples']} samples"
        lines.append(f"{label:<50} {r['stream_peak_rss_mb_large']:7.0f}MB {r['stream_memory_ratio']:8.3f}"
                     f"  (stream_memory_ratio; {r['stream_peak_rss_mb_small']:.0f} MB for {r['stream_small_samples']})")
    if r.get("surrogate_sweep_s") is not None:
        g, n = r["surrogate_grid"], r["surrogate_seeds"]
        label = f"surrogate sweep {g}x{g}x{n} seeds (surrogate_sweep_s)"
        lines.append(f"{label:<50} {r['surrogate_sweep_s']:9.1f}"
                     f"  (integration {r['surrogate_integration_s']:.1f} s, readout {r['surrogate_readout_s']:.1f} s,"
                     f" {r['surrogate_workers']} workers, load {r['surrogate_load_avg_start']} -> "
                     f"{r['surrogate_load_avg_end']})")
        label = f"surrogate per-point loop, t < {-10 + r['surrogate_horizon']:g}, scaled"
        lines.append(f"{label:<50} {r['surrogate_loop_s']:9.2f}")
        lines.append(f"{'surrogate batched grid, same span':<50} {r['surrogate_batch_s']:9.2f} "
                     f"{r['surrogate_batch_speedup']:8.2f}  (surrogate_batch_speedup)")
    if r.get("organism_knockout_map_s") is not None:
        n = r["organism_samples"]
        for label, key, ratio in (
                (f"organism knockout map, {r['organism_knockout_settings']} settings", "organism_knockout_map_s",
                 "organism_knockout_speedup"),
                (f"organism head sweep, {r['organism_heads']} heads", "organism_head_sweep_s",
                 "organism_head_sweep_speedup")):
            lines.append(f"{label:<50} {r[key]:9.3f} {r[ratio]:8.2f}  ({ratio}, {n} samples, vs the loop)")
        for label, key in (("first-order", "organism_attribution"), ("4-step IG", "organism_attribution_ig4"),
                           ("GradDrop", "organism_attribution_graddrop")):
            lines.append(f"{'organism attribution, ' + label:<50} {r[key + '_s']:9.3f} "
                         f"{r[key + '_forward_equivalents_measured']:8.2f}  ({key}_forward_equivalents_measured)")
    for o in r.get("head_search_by_organism") or []:
        label = f"head search, {o['organism']} ({o['heads']} heads, {o['samples']} samples)"
        lines.append(f"{label:<50} {o['s']:9.3f} {o['speedup']:8.2f}  (speedup; {o['forward_equivalents']:.0f} vs "
                     f"{o['exhaustive_forward_equivalents']:.0f} forward-equivalents, oracle packing "
                     f"{o['oracle_forward_equivalents']:.0f}; above / TopG equal: "
                     f"{o['above_equal']} / {o['topg_equal']})")
    return "\n".join(lines)


def run(quick: bool = False, only: Any = None, **overrides: Any) -> dict[str, Any]:
    """Every section of SECTIONS, or those named in ``only``."""
    cfg = {**(QUICK if quick else FULL), **{k: v for k, v in overrides.items() if v is not None}}
    todo = set(SECTIONS if not only else only)
    unknown = todo - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    torch.manual_seed(0)
    started = time.perf_counter()
    r: dict[str, Any] = {"quick": quick, "sections": [s for s in SECTIONS if s in todo], "load_avg_start": _load()}
    if todo - {"stream_memory", "surrogate", "organism", "fixed", "scale", "head_search"}:
        tm = tiny("llava", **cfg["model"])
        inputs = _batch_inputs(tm, cfg["batch"])
        r.update({"batch": cfg["batch"], "seq_len": int(inputs["input_ids"].shape[1]), "repeats": cfg["repeats"]})
        r.update({f"model_{k}": v for k, v in cfg["model"].items()})
    with torch.no_grad():
        if "forwards" in todo:
            r.update(bench_forwards(tm, inputs, cfg))
        if "fixed" in todo:
            r.update(bench_fixed(cfg))
        if "scale" in todo:
            r.update(bench_scale({**cfg, "quick": quick}))
        if "sweep" in todo:
            r.update(bench_sweep(tm, cfg))
    if "trace_io" in todo:
        r.update(bench_trace_io(inputs, cfg["model"]["hidden"], cfg))
    if "attribution" in todo:
        r.update(bench_attribution(tm, cfg))
    if "stream_memory" in todo:
        r.update(bench_stream_memory(cfg))
    if "surrogate" in todo:
        r.update(bench_surrogate(cfg))
    if "organism" in todo:  # the trained llava_tiny: knockout map and head sweep vs loops, attribution costs
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under python -m benchmarks.run
        from organism import bench_organism

        r.update(bench_organism(samples=cfg["organism_samples"]))
    if "head_search" in todo:
        r.update(bench_head_search(cfg))
    if "forwards" in todo:
        _ratios(r)
    r.update({"machine": _machine(), "torch": torch.__version__, "transformers": _transformers_version(),
              "nnsight": _nnsight_version(), "python": platform.python_version(),
              "date": datetime.date.today().isoformat(), "load_avg_end": _load(),
              "total_s": time.perf_counter() - started})
    return r


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the flat JSON result here")
    ap.add_argument("--quick", action="store_true", help="smoke test: small model, batch 2, 3 repeats")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--sweep-samples", type=int, help="samples in the sweep batch (default 1; quick: 2)")
    ap.add_argument("--sweep-heads-per-layer", type=int,
                    help="heads per layer timed in the sweep section (default: all, the full sweep; quick: 1, "
                         "times scaled to all heads)")
    ap.add_argument("--repeats", type=int, help="rounds of the forwards section (default 5; fixed: 6x this)")
    ap.add_argument("--only", help=f"comma-separated sections to run (default all): {', '.join(SECTIONS)}")
    ap.add_argument("--stream-child", nargs=3, metavar=("N", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stream_child:
        n, data, out = args.stream_child
        return _stream_child(int(n), data, out)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    r = run(quick=args.quick, only=only, sweep_samples=args.sweep_samples,
            sweep_heads_per_layer=args.sweep_heads_per_layer, repeats=args.repeats)
    print(format_table(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
