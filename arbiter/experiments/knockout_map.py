"""The information-flow map: I_NSSD and MFR of every knockout edge family at every centre layer (docs/methods/knockout.md … docs/methods/i-nssd.md).

All (edge, centre) settings of a batch run in batched forwards through arbiter.sweep (equal to the naive loop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..data import ConflictSample
from ..metrics import i_nssd
from ..util import jsonable
from ..progress import progress_bar
from ..sweep import knockout_settings, sweep
from .common import batch_plan, batches, clean_metric, metric_pi_and_margin, per_sample, require_conflicts

# docs/methods/knockout.md: the standard edge families (src, dst); the -> constraint / -> system ones are controls
EDGE_FAMILIES: tuple[tuple[str, str], ...] = (
    ("image", "instruction"), ("context", "instruction"), ("image|context", "instruction"),
    ("image", "constraint"), ("context", "constraint"), ("image|context", "constraint"),
    ("image", "system"), ("context", "system"), ("image|context", "system"),
    ("image", "last"), ("context", "last"), ("instruction", "last"), ("question", "last"),
)


@dataclass
class KnockoutMap:
    """``entries``: one per (src, dst, centre) with I_NSSD, MFR (π > 0.5) and π' per target."""

    entries: list[dict]
    window: int
    n_samples: int

    def to_dict(self) -> dict:
        return jsonable({"window": self.window, "n_samples": self.n_samples, "entries": self.entries})

    def plot(self, path=None, ax=None):
        """I_NSSD per (edge family, centre layer) (:func:`arbiter.experiments.plots.plot_knockout_map`)."""
        from .plots import plot_knockout_map

        return plot_knockout_map(self, path=path, ax=ax)

    def table(self, key: str = "nssd") -> tuple[list[str], torch.Tensor]:
        """(edge names, [edges, layers] tensor of ``key``) for plotting."""
        names = sorted({f"{e['src']}->{e['dst']}" for e in self.entries},
                       key=lambda n: [f"{s}->{d}" for s, d in EDGE_FAMILIES].index(n)
                       if n in [f"{s}->{d}" for s, d in EDGE_FAMILIES] else 99)
        layers = sorted({e["center"] for e in self.entries})
        t = torch.full((len(names), len(layers)), float("nan"))
        for e in self.entries:
            v = e[key]
            t[names.index(f"{e['src']}->{e['dst']}"), layers.index(e["center"])] = float("nan") if v is None else v
        return names, t


def knockout_map(lens, samples: Sequence[ConflictSample], edges: Sequence[tuple[str, str]] = EDGE_FAMILIES,
                 window: int = 9, centers: Sequence[int] | None = None, batch_size: int = 8, chunk: int = 8,
                 dataset=None, progress: bool = True) -> KnockoutMap:
    """For each edge family and centre layer: knock out in lens.window(centre, window) and measure
    I_NSSD (signed binary JSD of π, docs/methods/i-nssd.md) and the MFR under the knockout (π' > 0.5). ``progress``: a bar over
    the batches, each running every (edge, centre) setting (:func:`arbiter.progress.progress_bar`)."""
    samples = require_conflicts(samples, "knockout_map()")
    settings_meta = [s.meta for s in knockout_settings(lens, edges, window, centers)]

    def part_results(part):  # per sample: π, π' per setting, whether it has the setting's edge; targets
        pis, pis_ko, presents, targets = [], [], [], []
        it = progress_bar(batches(lens, part, batch_size, dataset),
                          f"knockout map: {len(settings_meta)} edge×centre settings per batch",
                          total=len(batch_plan(part, batch_size)), progress=progress)
        for item in it:
            settings = knockout_settings(lens, edges, window, centers)
            g = item.batch.groups
            present = torch.stack([g[m["src"]].any(1) & g[m["dst"]].any(1) for m in settings_meta])  # [settings, b]
            # settings whose edge no row of the batch has (e.g. -> system without a system prompt) are not run
            run = [j for j in range(len(settings)) if bool(present[j].any())]
            metric = metric_pi_and_margin(item.ids_p, item.ids_c)
            if run:
                res = sweep(lens, item.batch.inputs, [settings[j] for j in run], metric, chunk=chunk)
                base = res.baseline[:, 0]
            else:
                base = clean_metric(lens, item.batch.inputs, metric)[:, 0]
            ko = base[None].repeat(len(settings), 1)
            if run:
                ko[torch.tensor(run)] = res.values[:, :, 0].to(ko.dtype)
            # a sample without the edge is untouched by construction: its π' is its π exactly (I_NSSD exactly 0)
            ko = torch.where(present, ko, base[None])
            pis.append(base)
            pis_ko.append(ko.T)                                         # [b, settings]
            presents.append(present.T)
            targets.extend(item.targets)
        return torch.cat(pis), torch.cat(pis_ko), torch.cat(presents), targets

    pi, pi_ko, present, targets = per_sample(part_results, samples, batch_size)
    pi_ko = pi_ko.T.contiguous()                                        # [settings, samples]
    nonempty = present.any(0)
    entries = []
    for j, meta in enumerate(settings_meta):
        r = i_nssd(pi, pi_ko[j])
        e = dict(meta)
        e["nssd"] = r.value
        e["mfr"] = float((pi_ko[j] > 0.5).float().mean())
        e["pi"] = float(pi_ko[j].mean())
        for t in ("vision", "text"):
            sel = torch.tensor([x == t for x in targets])
            if bool(sel.any()):
                e[f"nssd_{t}"] = i_nssd(pi[sel], pi_ko[j][sel]).value
                e[f"mfr_{t}"] = float((pi_ko[j][sel] > 0.5).float().mean())
        e["edge_present"] = bool(nonempty[j])
        entries.append(e)
    return KnockoutMap(entries, window, len(targets))
