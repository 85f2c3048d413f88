"""Batched sweeps: many intervention settings in one forward (one setting per group of batch rows).

Layers below a chunk's first intervened layer are not recomputed: their outputs from one clean run are replayed
(``lens.capture`` / ``lens.replay``); so are the outputs of the encoders that run before the decoder (vision /
audio towers, projectors), and, for settings that change their first layer only from its per-head outputs on
(head blocking and scaling), that layer's attention up to its output projection."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .errors import InterventionError, SiteError
from .probes.head_interventions import HeadScale
from .probes.knockout import Knockout
from .util import head_label


def last_token_logits(logits: torch.Tensor) -> torch.Tensor:
    """Default metric: the last position's logits, [batch, vocab]."""
    return logits[:, -1]


@dataclass
class Setting:
    """One sweep setting: a name, the first layer it touches, and how to build its probes for given batch rows.
    ``first_site``: the earliest site of ``first_layer`` its probes read or change ("attn.head_out" for head
    blocking and scaling: that layer's attention may then be replayed from the clean run up to its output
    projection); "resid.pre" (the default) makes no such claim."""

    name: str
    first_layer: int
    probes: Callable[[list[int]], list[tuple]]   # batch rows -> [(probe, layers), ...]
    meta: dict = field(default_factory=dict)
    first_site: str = "resid.pre"


@dataclass
class CleanRun:
    """A sweep's clean run of one batch: its logits, every decoder layer's output and the encoders' outputs (what
    the settings replay), the peak memory the forward added and the memory these outputs hold, in bytes; ``heads``:
    the per-head outputs of the layers where head settings start (``Capture.heads``). Pass it back to
    :func:`sweep` on the same inputs (``clean=``) to skip the clean forward: the same tensors are replayed."""

    logits: torch.Tensor
    layers: dict
    encoders: dict
    peak_bytes: int
    held_bytes: int
    heads: dict = field(default_factory=dict)
    last_row_diff: float | None = None   # the last-row check's largest difference (None: not made)

    @property
    def heads_bytes(self) -> int:
        """The memory the per-head outputs hold, in bytes."""
        return sum(t.numel() * t.element_size() for t, _ in self.heads.values())

    def drop_heads(self) -> int:
        """Free the per-head outputs (a later sweep on this run then replays no attention); the bytes freed."""
        freed = self.heads_bytes
        self.heads, self.held_bytes = {}, self.held_bytes - freed
        return freed


@dataclass
class SweepResult:
    """``values[i]`` is the metric under setting i ([samples, ...]); ``baseline`` the metric without any."""

    settings: list[Setting]
    values: torch.Tensor
    baseline: torch.Tensor
    forwards: int = 0
    layers_skipped: int = 0
    chunk: int | None = None                 # settings per forward, as used (the memory budget may lower it)
    memory_budget: int | None = None         # bytes the chunks were sized for (None: not sized)
    clean_peak_bytes: int | None = None      # peak memory one clean forward of the batch added
    clean_held_bytes: int | None = None      # memory held while the chunks run (clean outputs, results)
    clean: CleanRun | None = field(default=None, repr=False)   # the clean run (keep_clean=True), for reuse
    clean_reused: bool = False               # the clean run was passed in (no clean forward ran)
    attention_replayed: int = 0              # forwards whose first layer's attention was replayed up to o_proj
    last_row: int = 0                        # forwards whose last layer ran on the last row only
    last_row_diff: float | None = None       # that check: largest |logit| difference on the clean run (None: none)

    def effects(self, reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Per setting effect: ``reduce(values[i], baseline)`` (default: mean over samples of the metric change)."""
        if reduce is None:
            return torch.stack([(v - self.baseline).float().flatten(1).mean(1).mean() for v in self.values])
        return torch.stack([reduce(v, self.baseline) for v in self.values])

    def to_dict(self) -> dict:
        return {"settings": [dict(name=s.name, **s.meta) for s in self.settings],
                "forwards": self.forwards, "layers_skipped": self.layers_skipped, "chunk": self.chunk,
                "memory_budget": self.memory_budget, "clean_peak_bytes": self.clean_peak_bytes,
                "clean_held_bytes": self.clean_held_bytes, "attention_replayed": self.attention_replayed,
                "last_row": self.last_row, "last_row_diff": self.last_row_diff}


def tile_batch(x, n: int):
    if isinstance(x, torch.Tensor):
        return torch.cat([x] * n, dim=0) if x.dim() > 0 else x
    return x


@contextlib.contextmanager
def tiled_groups(lens, b: int, n: int) -> Iterator[None]:
    """While inputs of ``b`` rows run as ``n`` stacked copies, the lens's token groups are tiled to match
    (restored on exit); groups of another batch size are left alone."""
    saved = lens.groups
    if n > 1 and saved is not None and saved.batch_size == b:
        lens.use(saved.tile(n))
        try:
            yield
        finally:
            lens.use(saved)
    else:
        yield


def forward_kwargs(lens, last_only: bool) -> dict:
    """``logits_to_keep=1`` where the model takes it (transformers convention): the metric reads the last row only."""
    import inspect

    if last_only and "logits_to_keep" in inspect.signature(lens.model.forward).parameters:
        return {"use_cache": False, "logits_to_keep": 1}
    return {"use_cache": False}


def _clean_outputs(lens, inputs: dict, last_only: bool = True, heads: Sequence[int] = ()):
    """The clean run: last-row logits and its Capture (every decoder layer's output, the outputs of the encoders
    that ran exactly once before the decoder started, the per-head outputs of the layers in ``heads``)."""
    with lens.capture(heads=heads) as cap, torch.no_grad():
        logits = lens.model(**inputs, **forward_kwargs(lens, last_only)).logits
    return logits, cap


def _last_row_check(lens, inputs: dict, run: CleanRun, fkw: dict) -> float:
    """Largest |difference| between the clean run's last-row logits and those of the same inputs with the last layer
    on its last row only (the layers below it replayed where no active probe is on them): a check that the cut serves
    this model."""
    last = lens.facts.n_layers - 1
    # the layers below replayed, unless a probe the caller left active is on them (then the whole forward runs)
    upto = last if lens.replay_refusal(last) is None else 0
    try:
        with lens.replay(run.layers, upto, 1, run.encoders), lens.last_row_only(), torch.no_grad():
            logits = lens.model(**inputs, **fkw).logits
    except RuntimeError:   # the cut rows do not fit the layer's own code (a shape it checks): no cut on this model
        return float("inf")
    return float((logits[:, -1].float() - run.logits[:, -1].float()).abs().max())


def _rounding(logits: torch.Tensor) -> float:
    """What float rounding may move a logit by when a layer runs on fewer rows (different matmul shapes): 16 units
    of the dtype's precision at the logits' scale, at least 1e-5 of it."""
    scale = max(1.0, float(logits.float().abs().max()))
    return max(16 * torch.finfo(logits.dtype).eps, 1e-5) * scale


def sweep(lens, inputs: dict, settings: Sequence[Setting], metric: Callable = last_token_logits,
          chunk: int = 16, reuse_prefix: bool = True, progress: bool = False, last_only: bool = True,
          memory_budget: int | str | None = None, clean: CleanRun | None = None,
          keep_clean: bool = False, reuse_attention: bool = True, last_row: bool = True,
          attention_layers: Sequence[int] | None = None) -> SweepResult:
    """Evaluate ``settings`` on ``inputs`` (a batch of b samples): up to ``chunk`` settings per forward, each
    setting on its own copy of the b rows. Equals a loop of separate forwards to float rounding.

    The chunk is also bounded by memory: a forward of n settings holds n copies of the batch, each costing about
    the peak one clean forward of the batch adds, beside the clean outputs held for replay (both measured,
    :func:`arbiter.memory.measure`), so that the sweep stays within ``memory_budget`` (bytes or a size such as
    "8GiB"; default: ``$ARBITER_MEMORY_BUDGET``, else half the memory free on the model's device).
    ``last_only`` (default): the metric sees logits of the last position only ([rows, 1, vocab]), so the
    unembedding runs on one row; pass False for a metric that reads other positions. ``clean``: the
    :class:`CleanRun` of an earlier sweep on these same inputs (same ``last_only``), replayed instead of running the
    clean forward again; ``keep_clean``: return this sweep's clean run in ``result.clean`` (it holds every layer's
    output as long as the result lives). ``reuse_attention`` (with ``reuse_prefix``): a chunk whose settings at its
    first layer all start there at ``attn.head_out`` (head blocking, scaling) replays that layer's attention up to
    its output projection as well; the clean run then also holds the per-head outputs of those layers (one
    [batch, tokens, heads·head_dim] tensor each, counted in the memory it holds); ``attention_layers``: the layers
    a fresh clean run records them for (default: the first layers of the head settings; a clean run kept for
    sweeps of other settings may record more).

    ``last_row`` (with ``last_only`` and ``reuse_prefix``, where the model takes ``logits_to_keep``, so that no
    metric can read another row): a chunk whose settings leave the last layer alone runs that layer's output
    projection and MLP on the last position only (``lens.last_row_only``), once a check on the clean run found its
    last-row logits equal to the full forward's to float rounding (``result.last_row_diff``); else the layer runs
    whole."""
    from . import memory

    if not settings:
        raise InterventionError("sweep() got no settings.")
    fkw = forward_kwargs(lens, last_only)
    inputs = {k: v for k, v in inputs.items() if k != "labels"}  # no loss: logits only
    device = next(lens.model.parameters()).device
    budget = memory.budget_bytes(device, memory_budget)
    replay = reuse_prefix and lens.facts.prefix_replay
    head_layers = sorted((set(attention_layers) if attention_layers is not None else
                          {s.first_layer for s in settings if s.first_site == "attn.head_out"})
                         if replay and reuse_attention else ())
    if clean is None:
        peak, held, (logits, cap) = memory.measure(lambda: _clean_outputs(lens, inputs, last_only, head_layers),
                                                   device)
        run = CleanRun(logits, cap.layers, cap.encoders, peak, held, cap.heads)
    else:
        run = clean
        logits, peak, held = clean.logits, clean.peak_bytes, clean.held_bytes
    outs, enc = run.layers, run.encoders
    heads_at = run.heads if replay and reuse_attention else {}
    cut = False   # the last layer may run on its last row (checked on the clean run)
    # only where the model keeps the last row's logits alone: a metric can then read no other row
    if last_row and "logits_to_keep" in fkw and replay and lens.last_row_refusal() is None:
        if run.last_row_diff is None:
            run.last_row_diff = _last_row_check(lens, inputs, run, fkw)
        cut = run.last_row_diff <= _rounding(run.logits)
    baseline = metric(logits)
    # held while the chunks run: the clean outputs (replayed) and the metric values gathered so far
    held += baseline.numel() * baseline.element_size() * len(settings)
    # each setting in a chunk: its copy of the inputs and the peak one clean forward of them adds
    per_setting = peak + sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))
    if budget is not None and peak:
        fit = int((budget - held) // per_setting)
        heads_bytes = run.heads_bytes if heads_at else 0
        if fit < 1 and clean is None and heads_bytes and (budget - held + heads_bytes) // per_setting >= 1:
            # this sweep's own per-head outputs are what leaves no room: freed, the settings run without the
            # attention replay
            heads_at, held = {}, held - run.drop_heads()
            fit = int((budget - held) // per_setting)
        if fit < 1:
            raise InterventionError(
                f"one setting needs about {memory.format_bytes(per_setting)} (its inputs and the peak of one clean "
                f"forward of this batch) beside the {memory.format_bytes(held)} held for replay and for the results, "
                f"more than the memory budget of {memory.format_bytes(budget)}; use a smaller batch or a larger "
                "budget.")
        chunk = min(chunk, fit)
    order = sorted(range(len(settings)), key=lambda i: settings[i].first_layer)
    values: list[torch.Tensor | None] = [None] * len(settings)
    b = baseline.shape[0]
    forwards = skipped = attention_replayed = cut_forwards = 0
    chunks = [order[i:i + chunk] for i in range(0, len(order), chunk)]
    from .progress import progress_bar

    # nested in an experiment's bar over batches: it disappears when done
    it = progress_bar(chunks, f"sweep: {len(settings)} settings", unit="forward", progress=progress, leave=False)
    for idx in it:
        n = len(idx)
        big = {k: tile_batch(v, n) for k, v in inputs.items()}
        first = min(settings[i].first_layer for i in idx) if replay else 0
        # the first layer's attention replayed too where every setting starting there changes only its heads' output
        attention = replay and first in heads_at and all(
            settings[i].first_site == "attn.head_out" for i in idx if settings[i].first_layer == first)
        with contextlib.ExitStack() as stack:
            stack.enter_context(tiled_groups(lens, b, n))
            for j, i in enumerate(idx):
                rows = list(range(j * b, (j + 1) * b))
                for probe, layers in settings[i].probes(rows):
                    stack.enter_context(lens.probe(probe, layers=layers))
            stack.enter_context(lens.replay(outs, first, n, enc if reuse_prefix else None,
                                            heads_at if attention else None))
            # the settings' probes (and any the caller left active) leave the last layer alone: it may be cut
            cut_here = cut and lens.last_row_refusal() is None
            if cut_here:
                stack.enter_context(lens.last_row_only())
            with torch.no_grad():
                out = metric(lens.model(**big, **fkw).logits)
        forwards += 1
        skipped += first
        attention_replayed += int(attention)
        cut_forwards += int(cut_here)
        for j, i in enumerate(idx):
            values[i] = out[j * b:(j + 1) * b].clone()   # not a view holding the chunk's whole output
        del big, out   # released before the next chunk's copies are made
    return SweepResult(list(settings), torch.stack(values), baseline, forwards, skipped, chunk, budget, peak, held,
                       run if keep_clean else None, clean is not None, attention_replayed, cut_forwards,
                       run.last_row_diff)


def head_settings(lens, heads: Sequence[tuple[int, int]] | None = None, alpha: float = 0.0) -> list[Setting]:
    """One setting per head: scale (layer, head) by ``alpha`` (0 = block) on that setting's rows only."""
    facts = lens.facts
    if heads is None:
        heads = [(layer, h) for layer in facts.attention_layers for h in range(facts.heads(layer)[0])]
    out = []
    for layer, head in heads:
        nh = facts.heads(layer)[0] if 0 <= layer < facts.n_layers else 0
        if not 0 <= head < max(nh, 1) or nh == 0:
            raise SiteError(f"head ({layer}, {head}) is out of range for this model.")

        def make(rows, _l=layer, _h=head, _nh=nh):
            return [(_RowScale(_l, _h, _nh, alpha, rows), [_l])]
        out.append(Setting(head_label(layer, head), layer, make, {"layer": layer, "head": head, "alpha": alpha},
                           first_site="attn.head_out"))
    return out


class _RowScale(HeadScale):
    """HeadScale on some batch rows only (rows outside the forward's batch are ignored)."""

    def __init__(self, layer, head, n_heads, alpha, rows):
        super().__init__([(layer, head)], alpha=alpha, batch_rows=rows)


def head_sweep(lens, inputs: dict, heads=None, alpha: float = 0.0, metric: Callable = last_token_logits,
               chunk: int = 16, reuse_prefix: bool = True, progress: bool = False,
               memory_budget: int | str | None = None) -> SweepResult:
    """Every single-head block (or scale by ``alpha``) in batched forwards (chunks bounded as in :func:`sweep`)."""
    return sweep(lens, inputs, head_settings(lens, heads, alpha), metric, chunk, reuse_prefix, progress,
                 memory_budget=memory_budget)


def knockout_settings(lens, edges: Sequence[tuple[str, str]], window: int = 9,
                      centers: Sequence[int] | None = None) -> list[Setting]:
    """One setting per (src, dst, centre layer): knockout in lens.window(centre, window)."""
    centers = list(range(lens.facts.n_layers)) if centers is None else list(centers)
    out = []
    for src, dst in edges:
        for c in centers:
            layers = lens.window(c, window)

            def make(rows, _s=src, _d=dst, _layers=layers):
                return [(Knockout(_s, _d, batch_rows=rows, allow_empty=True), _layers)]
            out.append(Setting(f"{src}->{dst}@{c}", layers[0], make,
                               {"src": src, "dst": dst, "center": c, "layers": layers}))
    return out


def knockout_sweep(lens, inputs: dict, edges: Sequence[tuple[str, str]], window: int = 9, centers=None,
                   metric: Callable = last_token_logits, chunk: int = 8, reuse_prefix: bool = True,
                   progress: bool = False, memory_budget: int | str | None = None) -> SweepResult:
    """The knockout map: every (edge family, centre layer) in batched forwards (chunks bounded as in :func:`sweep`)."""
    return sweep(lens, inputs, knockout_settings(lens, edges, window, centers), metric, chunk, reuse_prefix,
                 progress, memory_budget=memory_budget)
