"""MFR, the modality-following ratio (docs/methods/mfr.md): the fraction of answers that follow the instructed modality.

From generated answers read at their first answer entity (:func:`read_answer`), or the cheap variant pi > 0.5."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data import normalise_answer
from ..util import ToDict, check_choice, check_targets, fail

MATCH_MODES = ("first", "contains", "exact")
MENTIONS = ("compliant", "competitor", "both", "neither")

__all__ = ["MATCH_MODES", "MENTIONS", "normalise", "first_line", "AnswerReading", "read_answer", "answer_follows",
           "mention_counts", "MFRResult", "mfr", "mfr_from_follows", "mfr_from_pi"]

normalise = normalise_answer
"""The one answer normaliser, :func:`arbiter.data.normalise_answer` (NFKC, lower-case, no punctuation, single spaces)."""


def first_line(text: str) -> str:
    """The generation up to its first newline, leading whitespace (blank lines included) skipped: where a
    generated answer stops (the end token is cut before decoding, see :func:`arbiter.experiments.baseline`)."""
    return str(text).lstrip().split("\n", 1)[0]


def _forms(forms: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(forms, str):
        forms = [forms]
    out = [f for f in (normalise(x) for x in forms) if f]
    if not out:
        fail(f"{what} has no non-empty surface form after normalisation; give the answer and its aliases.")
    return out


def _first_mention(padded: str, forms: list[str]) -> tuple[int, int] | None:
    """(position, -length) of the earliest whole-word occurrence of any form in `` answer ``, longest first at
    equal positions; None when no form occurs."""
    hits = [(padded.find(f" {f} "), -len(f)) for f in forms]
    hits = [h for h in hits if h[0] >= 0]
    return min(hits) if hits else None


@dataclass(frozen=True)
class AnswerReading:
    """How one generated answer reads against D_p / D_c.

    ``follows``: +1 the first answer entity mentioned is a D_p form, -1 a D_c form, 0 none (or a form of both);
    ``mentions``: which dictionaries the scored text mentions anywhere: ``"compliant"``, ``"competitor"``,
    ``"both"`` or ``"neither"``; ``text``: the normalised text that was scored (the first line)."""

    follows: int
    mentions: str
    text: str


def read_answer(answer: str, forms_p: Sequence[str] | str, forms_c: Sequence[str] | str) -> AnswerReading:
    """Read a generated answer at its first answer entity (docs/methods/mfr.md): the answer stops at the first newline
    (:func:`first_line`; the caller cuts it at the end token), is normalised (:func:`normalise`), and follows
    the modality of the first D_p ∪ D_c form it mentions as whole words ("cyan blue white" with D_p = {cyan},
    D_c = {white} follows: +1). At one position the longer form wins ("dark red" over "dark"); a form in both
    dictionaries at the first position gives 0. ``mentions`` counts over the whole first line, so that a model
    that babbles on ("cyan blue white white") is reported as mentioning both."""
    a = normalise(first_line(answer))
    padded = f" {a} "
    fp, fc = _forms(forms_p, "forms_p"), _forms(forms_c, "forms_c")
    hp, hc = _first_mention(padded, fp), _first_mention(padded, fc)
    mentions = {(True, True): "both", (True, False): "compliant", (False, True): "competitor",
                (False, False): "neither"}[(hp is not None, hc is not None)]
    if hp is None and hc is None or hp == hc:
        follows = 0
    elif hc is None or (hp is not None and hp < hc):
        follows = 1
    else:
        follows = -1
    return AnswerReading(follows, mentions, a)


def _matches(answer: str, forms: list[str], match: str) -> bool:
    if match == "exact":
        return answer in forms
    padded = f" {answer} "
    return any(f" {f} " in padded for f in forms)


def answer_follows(answer: str, forms_p: Sequence[str] | str, forms_c: Sequence[str] | str,
                   match: str = "first") -> int:
    """Which modality a generated answer follows: +1 compliant, -1 competitor, 0 neither (or undecided).

    forms_p / forms_c: the surface forms of D_p / D_c (canonical answer and aliases), plain strings; answer and
    forms are compared after :func:`normalise`. ``match``: ``"first"`` (default, docs/methods/mfr.md) the first answer entity
    of the first line decides (:func:`read_answer`); ``"contains"`` the whole answer must mention a D_p form and
    no D_c form, as whole words ("the answer is red" matches "red", "reddish" does not; "red blue" is 0);
    ``"exact"`` the whole answer equals a form."""
    check_choice("match", match, MATCH_MODES)
    if match == "first":
        return read_answer(answer, forms_p, forms_c).follows
    a = normalise(answer)
    p = _matches(a, _forms(forms_p, "forms_p"), match)
    c = _matches(a, _forms(forms_c, "forms_c"), match)
    return 1 if (p and not c) else (-1 if (c and not p) else 0)


def mention_counts(mentions: Sequence[str]) -> dict[str, int]:
    """``{"both": n, "neither": n, "n": total}``: how many answers mention both D_p and D_c, or neither."""
    bad = [m for m in mentions if m not in MENTIONS]
    if bad:
        fail(f"mentions must be among {MENTIONS}, got {bad[:3]}.")
    return {"both": sum(m == "both" for m in mentions), "neither": sum(m == "neither" for m in mentions),
            "n": len(mentions)}


@dataclass
class MFRResult(ToDict):
    """overall: MFR over all samples; vision / text: over the vision- / text-following samples (None if none);
    follows: per-sample 0/1; n, n_vision, n_text: sample counts; variant: "answer" or "pi"; answers (generated
    answers read by :func:`mfr`, else None): ``{"both": n, "neither": n, "n": total}``, how many mention both D_p
    and D_c or neither (:func:`mention_counts`)."""

    overall: float
    vision: float | None
    text: float | None
    n: int
    n_vision: int
    n_text: int
    follows: list[int] = field(default_factory=list)
    variant: str = "answer"
    answers: dict | None = None

    def plot(self, path=None, ax=None):
        """Overall, vision and text MFR with counts (:func:`arbiter.metrics.plots.plot_mfr`)."""
        from .plots import plot_mfr

        return plot_mfr(self, path=path, ax=ax)


def _summary(follows: list[int], targets: Sequence[str], variant: str) -> MFRResult:
    n = len(follows)
    if n == 0:
        fail("no samples given.")
    tg = check_targets(targets, n)
    split = {}
    for t in ("vision", "text"):
        sel = [f for f, x in zip(follows, tg) if x == t]
        split[t] = (sum(sel) / len(sel) if sel else None, len(sel))
    return MFRResult(sum(follows) / n, split["vision"][0], split["text"][0], n, split["vision"][1],
                     split["text"][1], follows, variant)


def mfr(answers: Sequence[str], forms_p: Sequence[Sequence[str]], forms_c: Sequence[Sequence[str]],
        targets: Sequence[str], match: str = "first") -> MFRResult:
    """MFR from greedy generated answers (docs/methods/mfr.md): a sample follows when the first answer entity its answer
    mentions is a D_p form (``match="first"``, default; see :func:`answer_follows` for the other modes).
    forms_p / forms_c: one list of surface forms per sample; targets: ``"vision"`` / ``"text"`` per sample.
    ``overall`` is over all samples (not the mean of the splits); ``answers`` counts the answers that mention
    both dictionaries or neither."""
    n = len(answers)
    if len(forms_p) != n or len(forms_c) != n:
        fail(f"{n} answers but {len(forms_p)} forms_p and {len(forms_c)} forms_c lists; give one per sample.")
    follows = [int(answer_follows(a, p, c, match) == 1) for a, p, c in zip(answers, forms_p, forms_c)]
    r = _summary(follows, targets, "answer")
    r.answers = mention_counts([read_answer(a, p, c).mentions for a, p, c in zip(answers, forms_p, forms_c)])
    return r


def mfr_from_follows(follows: Sequence[int], targets: Sequence[str], variant: str = "answer") -> MFRResult:
    """MFR from per-sample 0/1 decisions already made (e.g. a baseline's generated answers judged elsewhere)."""
    f = [int(x) for x in follows]
    if any(x not in (0, 1) for x in f):
        fail("follows must hold 0 or 1 per sample (1: the answer follows the instructed modality).")
    return _summary(f, targets, variant)


def mfr_from_pi(pi: torch.Tensor | Sequence[float], targets: Sequence[str]) -> MFRResult:
    """The cheap MFR variant: a sample follows when pi = P(D_p) / (P(D_p) + P(D_c)) > 0.5 (strictly)."""
    p = torch.as_tensor(pi, dtype=torch.float64).reshape(-1)
    if not bool(torch.isfinite(p).all()):
        fail("pi holds nan or inf.")
    return _summary([int(x > 0.5) for x in p.tolist()], targets, "pi")
