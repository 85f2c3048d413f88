"""Baseline arbitration profile of a model on conflict data: MFR, MAM per layer (+ attention / MLP split), LDAR.

One recorded forward per batch (residuals at the last and instruction rows), plus an optional greedy generation
whose answer is read at its first answer entity (:func:`arbiter.metrics.read_answer`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data import ConflictSample
from ..encode import tokenizer_of
from ..metrics import ldar, mam_from_hidden, mention_counts, read_answer
from ..util import jsonable
from ..progress import progress_bar
from .common import batch_plan, batches, by_target, module_weight, per_sample, pi_from_logits, require_conflicts


@dataclass
class BaselineResult:
    """Per-sample and per-layer results of the clean run (see docs/methods/mam.md, 5, 6, 7)."""

    sample_ids: list[str]
    targets: list[str]
    pi: torch.Tensor                    # [samples] π at last
    follows: list[int]                  # +1 compliant / -1 competitor / 0 neither (first answer entity, or π)
    answers: list[str]                  # generated answers, cut at the end token ("" without generation)
    mam_last: torch.Tensor              # [samples, layers] MAM at last, per layer (logit lens on resid.post)
    mam_attn: torch.Tensor              # [samples, layers] ΔMAM_attn at last
    mam_mlp: torch.Tensor               # [samples, layers] ΔMAM_mlp at last
    mam_instr: list[torch.Tensor]       # per sample [layers, n_instruction]
    ldar_rate: list[float]
    mfr_source: str = "generation"
    extra: dict = field(default_factory=dict)
    mentions: list[str] = field(default_factory=list)  # per generated answer: compliant / competitor / both / neither

    @property
    def correct(self) -> list[bool]:
        return [f == 1 for f in self.follows]

    def mfr(self) -> dict:
        return by_target(torch.tensor([float(f == 1) for f in self.follows]), self.targets)

    def answer_counts(self) -> dict | None:
        """How many generated answers mention both D_p and D_c, or neither: ``{"both", "neither", "n"}`` over all
        samples and the same per target under ``"by_target"``; None without generation."""
        if not self.mentions:
            return None
        out = mention_counts(self.mentions)
        out["by_target"] = {t: mention_counts([m for m, x in zip(self.mentions, self.targets) if x == t])
                            for t in ("vision", "text") if t in self.targets}
        return out

    def mfr_pi(self) -> dict:
        return by_target((self.pi > 0.5).float(), self.targets)

    def mam_profile(self) -> dict:
        out = {}
        for t in ("vision", "text"):
            sel = [i for i, x in enumerate(self.targets) if x == t]
            out[t] = self.mam_last[sel].mean(0).tolist() if sel else []
        return out

    def mam_instruction_profile(self) -> dict:
        """MAM per layer at the instruction anchors (docs/methods/mam.md): the mean over a sample's instruction positions, then
        over the samples of each target; samples without instruction tokens are left out."""
        out = {}
        for t in ("vision", "text"):
            rows = [mi.float().mean(-1) for mi, x in zip(self.mam_instr, self.targets) if x == t and mi.shape[-1] > 0]
            out[t] = torch.stack(rows).mean(0).tolist() if rows else []
        return out

    def to_dict(self) -> dict:
        comp = {}
        for name, v in (("attn", self.mam_attn), ("mlp", self.mam_mlp)):
            comp[name] = {t: v[[i for i, x in enumerate(self.targets) if x == t]].mean(0).tolist()
                          for t in ("vision", "text") if t in self.targets}
        return jsonable({"n_samples": len(self.sample_ids), "mfr": {**self.mfr(), "answers": self.answer_counts()},
                         "mfr_pi": self.mfr_pi(),
                         "mfr_source": self.mfr_source, "mam": self.mam_profile(),
                         "mam_instruction": self.mam_instruction_profile(), "mam_components": comp,
                         "ldar": self.ldar_rate, "pi_mean": by_target(self.pi, self.targets)})

    def plot(self, path=None, axes=None):
        """MAM per layer by target and LDAR per layer (:func:`arbiter.experiments.plots.plot_mam_ldar`)."""
        from .plots import plot_mam_ldar

        return plot_mam_ldar(self, path=path, axes=axes)


def evaluate(lens, samples: Sequence[ConflictSample], batch_size: int = 8, dataset=None, generate: bool = True,
             max_new_tokens: int = 4, k: int = 2, progress: bool = True, trace_dir=None) -> BaselineResult:
    """Run the clean model on the conflict samples and compute MFR, π, MAM per layer (+ split) and LDAR.

    ``generate``: MFR from greedy generation of ``max_new_tokens`` tokens, cut at the end token, scored on the
    first line at its first answer entity (:func:`arbiter.metrics.read_answer`: a model that babbles on after its
    answer is scored on that answer), with the counts of answers that mention both D_p and D_c or neither
    (:meth:`BaselineResult.answer_counts`); else ``follows`` = ±1 by π > 0.5.
    ``progress``: a bar over the batches (:func:`arbiter.progress.progress_bar`).
    ``trace_dir``: also stream the last-token residuals of every layer, π and MAM to sharded trace files there."""
    from .. import distributed

    writer = None
    if trace_dir is not None:
        from ..trace import TraceWriter

        # in a distributed diagnosis each rank streams its own samples to trace_dir/rank{r}
        writer = TraceWriter(distributed.rank_dir(trace_dir),
                             {"what": "baseline: resid.post at last per layer, pi, mam_last",
                              "model": lens.facts.summary()}, resume=False)
    samples = require_conflicts(samples, "evaluate()")
    facts = lens.facts
    W_U = module_weight(facts.lm_head)
    norm = facts.final_norm if facts.final_norm is not None else (lambda x: x)
    tok = tokenizer_of(lens.processor)
    end_ids = _end_ids(lens.model, tok)

    def run(part):  # per-sample results of ``part``, in batch order
        ids, targets, pis, follows, answers, mentions = [], [], [], [], [], []
        mam_last, mam_attn, mam_mlp, mam_instr = [], [], [], []
        it = progress_bar(batches(lens, part, batch_size, dataset), "baseline: batches",
                          total=len(batch_plan(part, batch_size)), progress=progress)
        for item in it:
            b = item.batch
            with torch.no_grad(), lens.record("resid.pre", "resid.mid", "resid.post", rows="last|instruction") as rec:
                logits = lens.model(**b.inputs).logits[:, -1]
            pi = pi_from_logits(logits, item.ids_p, item.ids_c)
            tr = rec.trace
            pos, rmask = tr.rows("resid.post")
            last_pos = b.groups["last"]
            instr = b.groups["instruction"]
            L = facts.n_layers

            def stack(site):  # [b, L, R, d]: the main stream of each layer's residual (adapter's layout)
                return torch.stack([facts.residual.main_stream(tr.site(site, layer)) for layer in range(L)], 1)
            h_in, h_mid, h_out = stack("resid.pre"), stack("resid.mid") if tr.has_site("resid.mid", 0) else None, \
                stack("resid.post")
            for i, s in enumerate(b.samples):
                r_last = int((pos == int(last_pos[i].nonzero()[-1])).nonzero()[0])
                p, c = item.ids_p[i], item.ids_c[i]
                m = lambda h: mam_from_hidden(h, norm, W_U, p, c)  # noqa: E731
                with torch.no_grad():
                    ml_out = m(h_out[i, :, r_last])
                    ml_in = m(h_in[i, :, r_last])
                    ml_mid = m(h_mid[i, :, r_last]) if h_mid is not None else ml_out
                    ipos = [int((pos == q).nonzero()[0]) for q in instr[i].nonzero().flatten().tolist()]
                    mi = m(h_out[i][:, ipos]) if ipos else torch.zeros(L, 0)
                mam_last.append(ml_out)
                mam_attn.append(ml_mid - ml_in)
                mam_mlp.append(ml_out - ml_mid)
                mam_instr.append(mi)
            if generate:
                with torch.no_grad():
                    gen = lens.model.generate(**b.inputs, max_new_tokens=max_new_tokens, do_sample=False)
                new = gen[:, b.inputs["input_ids"].shape[1]:]
                for s, row in zip(b.samples, new.tolist()):
                    t = tok.decode(_until_end(row, end_ids), skip_special_tokens=True)
                    r = read_answer(t, s.forms_compliant, s.forms_competitor)
                    answers.append(t)
                    follows.append(r.follows)
                    mentions.append(r.mentions)
            else:
                follows.extend([1 if float(x) > 0.5 else -1 for x in pi])
                answers.extend([""] * len(b.samples))
            ids.extend(s.id for s in b.samples)
            targets.extend(item.targets)
            pis.append(pi)
            if writer is not None:
                last_rows = torch.tensor([int((pos == int(last_pos[i].nonzero()[-1])).nonzero()[0])
                                          for i in range(len(b.samples))])
                resid = h_out[torch.arange(len(b.samples)), :, last_rows]           # [b, L, d]
                writer.add([s.id for s in b.samples], {"resid_last": resid.float(), "pi": pi.float(),
                                                       "mam_last": torch.stack(mam_last[-len(b.samples):])})
        if writer is not None:
            writer.close()  # before the gather of a distributed run: rank 0 then merges the rank folders
        return {"ids": ids, "targets": targets, "pi": torch.cat(pis), "follows": follows, "answers": answers,
                "mentions": mentions,
                "mam_last": torch.stack(mam_last), "mam_attn": torch.stack(mam_attn),
                "mam_mlp": torch.stack(mam_mlp), "mam_instr": mam_instr}

    r = per_sample(run, samples, batch_size)
    if writer is not None:
        writer.close()
        distributed.merge_rank_traces(trace_dir)
    ids, targets, follows, answers, mam_instr = r["ids"], r["targets"], r["follows"], r["answers"], r["mam_instr"]
    mam_last_t = r["mam_last"]
    final = mam_last_t[:, -1]
    usable = [i for i, mi in enumerate(mam_instr) if mi.shape[-1] > 0]
    rate = (ldar([mam_instr[i] for i in usable], final[usable], k=k).rate.tolist() if usable
            else [float("nan")] * facts.n_layers)
    return BaselineResult(ids, targets, r["pi"], follows, answers, mam_last_t, r["mam_attn"], r["mam_mlp"],
                          mam_instr, rate, "generation" if generate else "pi", mentions=r["mentions"])


def _end_ids(model, tokenizer) -> set[int]:
    """The ids that end a generation: the model's generation config's ``eos_token_id`` (an id or a list), else
    the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(x) for x in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _until_end(ids: list[int], end_ids: set[int]) -> list[int]:
    """The generated ids before the first end token (what follows it is padding)."""
    for i, x in enumerate(ids):
        if x in end_ids:
            return ids[:i]
    return ids
