"""MFR, the modality-following ratio (SPEC 7): the fraction of answers that follow the instructed modality.

From generated answers matched against the answer forms of D_p / D_c, or the cheap variant pi > 0.5."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ._common import ToDict, check_choice, check_targets, fail

MATCH_MODES = ("contains", "exact")

__all__ = ["MATCH_MODES", "normalise", "answer_follows", "MFRResult", "mfr", "mfr_from_pi"]

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower-case, drop punctuation (Unicode categories P*) and collapse / strip whitespace.

    ``"  New-York!! "`` -> ``"newyork"``; ``"The Red car."`` -> ``"the red car"``."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return _SPACE.sub(" ", text).strip()


def _forms(forms: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(forms, str):
        forms = [forms]
    out = [f for f in (normalise(x) for x in forms) if f]
    if not out:
        fail(f"{what} has no non-empty surface form after normalisation; give the answer and its aliases.")
    return out


def _matches(answer: str, forms: list[str], match: str) -> bool:
    if match == "exact":
        return answer in forms
    padded = f" {answer} "
    return any(f" {f} " in padded for f in forms)


def answer_follows(answer: str, forms_p: Sequence[str] | str, forms_c: Sequence[str] | str,
                   match: str = "contains") -> int:
    """Which modality a generated answer follows: +1 compliant, -1 competitor, 0 neither or both.

    forms_p / forms_c: the surface forms of D_p / D_c (canonical answer and aliases), plain strings; answer and
    forms are compared after :func:`normalise`. +1 = matches a D_p form and no D_c form (SPEC 7); -1 = the reverse.
    ``match`` (our reading; the SPEC only says "matches"): ``"contains"`` (default) a form occurs in the answer
    as whole words ("the answer is red" matches "red", "reddish" does not); ``"exact"`` the whole answer equals
    a form."""
    check_choice("match", match, MATCH_MODES)
    a = normalise(answer)
    p = _matches(a, _forms(forms_p, "forms_p"), match)
    c = _matches(a, _forms(forms_c, "forms_c"), match)
    return 1 if (p and not c) else (-1 if (c and not p) else 0)


@dataclass
class MFRResult(ToDict):
    """overall: MFR over all samples; vision / text: over the vision- / text-following samples (None if none);
    follows: per-sample 0/1; n, n_vision, n_text: sample counts; variant: "answer" or "pi"."""

    overall: float
    vision: float | None
    text: float | None
    n: int
    n_vision: int
    n_text: int
    follows: list[int] = field(default_factory=list)
    variant: str = "answer"

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
        targets: Sequence[str], match: str = "contains") -> MFRResult:
    """MFR from greedy generated answers (SPEC 7): a sample follows when its normalised answer matches a D_p form
    and no D_c form (see :func:`answer_follows`). forms_p / forms_c: one list of surface forms per sample;
    targets: ``"vision"`` / ``"text"`` per sample. ``overall`` is over all samples (not the mean of the splits)."""
    n = len(answers)
    if len(forms_p) != n or len(forms_c) != n:
        fail(f"{n} answers but {len(forms_p)} forms_p and {len(forms_c)} forms_c lists; give one per sample.")
    follows = [int(answer_follows(a, p, c, match) == 1) for a, p, c in zip(answers, forms_p, forms_c)]
    return _summary(follows, targets, "answer")


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
