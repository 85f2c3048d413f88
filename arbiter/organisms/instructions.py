"""Instruction augmentation for training the model organisms: a small grammar of instruction sentences.

The generator's training paraphrases (:data:`arbiter.data.VISION_INSTRUCTIONS` / :data:`TEXT_INSTRUCTIONS`
without the held-out ones) are only five sentences per target; a model trained on them alone memorises ten
strings and cannot read a new wording, and it never sees some words of the held-out paraphrases at all
("picture", "description", "Use"). A real MLLM knows those words from pre-training. This grammar stands in for
that knowledge: it writes instructions from modality nouns (with synonyms), trust / distrust verbs and
sentence frames, so that the organism learns to *read* which modality an instruction trusts.

No generated sentence is a held-out paraphrase: :func:`canonical` maps every modality noun to ``<V>`` /
``<T>`` and strips case and punctuation, and a sentence whose canonical form equals that of a held-out
paraphrase (of either target) is rejected; so is any sentence ending in the held-out frame "... to answer
the question". :func:`check_no_leak` asserts it over the grammar's whole output.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import numpy as np

from arbiter.data import TEXT_INSTRUCTIONS, VISION_INSTRUCTIONS

__all__ = [
    "VISION_NOUNS",
    "TEXT_NOUNS",
    "canonical",
    "heldout_canonical",
    "all_sentences",
    "InstructionGrammar",
    "check_no_leak",
    "NEUTRAL_INSTRUCTIONS",
    "check_neutral",
]

VISION_NOUNS: tuple[str, ...] = ("image", "picture", "photo", "image content", "input image")
"""Noun phrases naming the image (after "the")."""

TEXT_NOUNS: tuple[str, ...] = ("text", "text context", "description", "caption", "context", "written text")
"""Noun phrases naming the text context (after "the")."""

# trust verbs (take "the <noun>") and distrust verbs, sentence-initial forms; lower-cased inside a sentence
_TRUST = ("Trust", "Use", "Rely on", "Follow", "Believe", "Go by", "Look at", "Go with", "Stick to", "Refer to",
          "Answer from", "Prefer")
_DISTRUST = ("Ignore", "Disregard", "Do not trust", "Do not use", "Do not rely on", "Never trust", "Distrust",
             "Set aside", "Forget")
_GOOD = ("correct", "right", "reliable", "accurate", "trustworthy", "true")
_BAD = ("is wrong", "may be wrong", "is unreliable", "may be incorrect", "is false", "can be wrong", "is misleading")

_FRAMES: tuple[str, ...] = (
    "{P} the {X}.",
    "{N} the {Y}.",
    "{P} the {X}, not the {Y}.",
    "{P} the {X} rather than the {Y}.",
    "{P} the {X} and {n} the {Y}.",
    "{N} the {Y} and {p} the {X}.",
    "{N} the {Y}; {p} the {X}.",
    "The {X} is {good}.",
    "The {Y} {bad}.",
    "The {X} is {good}; the {Y} {bad}.",
    "The {Y} {bad}; the {X} is {good}.",
    "Only the {X} is {good}.",
    "If the {A} and the {B} disagree, {p} the {X}.",
    "When the {A} and the {B} conflict, {p} the {X}.",
    "Answer based on the {X}.",
    "{P} the {X} when you answer.",
    "{P} the {X} for your answer.",
    "To answer, {p} the {X}.",
    "When you answer, {p} the {X} and {n} the {Y}.",
    "{P} the {X} to find the answer.",
    "Do not answer from the {Y}.",
    "Answer based on the {X}, not on the {Y}.",
    "In case there is an inconsistency between the {A} and the {B}, you must rely on the {X} rather than the {Y}.",
)

_V_RE = re.compile(r"\b(input image content|image content|input image|image|picture|photo)\b")
_T_RE = re.compile(r"\b(text context|written text|description|caption|context|text)\b")


def canonical(sentence: str) -> str:
    """Lower-case, modality nouns -> ``<v>`` / ``<t>``, punctuation dropped, whitespace collapsed."""
    s = sentence.lower()
    s = _T_RE.sub(" <t> ", s)
    s = _V_RE.sub(" <v> ", s)
    s = re.sub(r"[^\w<> ]+", " ", s)
    return " ".join(s.split())


def heldout_canonical() -> set[str]:
    """Canonical forms of the held-out paraphrases of both targets."""
    return {canonical(i.text) for i in VISION_INSTRUCTIONS + TEXT_INSTRUCTIONS if i.heldout}


def _fill(frame: str, target: str, x: str, y: str, p: str, n: str, good: str, bad: str, swap: bool) -> str:
    a, b = (y, x) if swap else (x, y)
    return frame.format(X=x, Y=y, A=a, B=b, P=p, p=p.lower(), N=n, n=n.lower(), good=good, bad=bad)


def _allowed(sentence: str, banned: set[str]) -> bool:
    c = canonical(sentence)
    return c not in banned and not c.endswith("to answer the question")


def all_sentences(target: str) -> list[str]:
    """Every sentence the grammar can write for ``target`` ("vision" or "text"), held-out forms removed, sorted."""
    if target not in ("vision", "text"):
        raise ValueError(f"target must be 'vision' or 'text', got {target!r}")
    xs, ys = (VISION_NOUNS, TEXT_NOUNS) if target == "vision" else (TEXT_NOUNS, VISION_NOUNS)
    banned = heldout_canonical()
    out: set[str] = set()
    for frame in _FRAMES:
        slots = set(re.findall(r"\{(\w+)\}", frame))
        ps = _TRUST if slots & {"P", "p"} else ("",)
        ns = _DISTRUST if slots & {"N", "n"} else ("",)
        goods = _GOOD if "good" in slots else ("",)
        bads = _BAD if "bad" in slots else ("",)
        swaps = (False, True) if "A" in slots else (False,)
        for x, y, p, n, g, b, sw in itertools.product(xs, ys, ps, ns, goods, bads, swaps):
            s = _fill(frame, target, x, y, p, n, g, b, sw)
            if _allowed(s, banned):
                out.add(s)
    return sorted(out)


class InstructionGrammar:
    """Samples grammar sentences: first a frame uniformly, then its slots uniformly (so that short frames
    are not swamped by the many fillings of long ones)."""

    def __init__(self) -> None:
        self.banned = heldout_canonical()

    def sample(self, target: str, rng: np.random.Generator) -> str:
        xs, ys = (VISION_NOUNS, TEXT_NOUNS) if target == "vision" else (TEXT_NOUNS, VISION_NOUNS)
        for _ in range(100):
            frame = _FRAMES[int(rng.integers(len(_FRAMES)))]
            s = _fill(
                frame,
                target,
                xs[int(rng.integers(len(xs)))],
                ys[int(rng.integers(len(ys)))],
                _TRUST[int(rng.integers(len(_TRUST)))],
                _DISTRUST[int(rng.integers(len(_DISTRUST)))],
                _GOOD[int(rng.integers(len(_GOOD)))],
                _BAD[int(rng.integers(len(_BAD)))],
                bool(rng.integers(2)),
            )
            if _allowed(s, self.banned):
                return s
        raise RuntimeError("could not draw an allowed instruction")  # pragma: no cover


def check_no_leak() -> None:
    """Raise if any grammar sentence is a held-out paraphrase (up to modality synonyms, case, punctuation),
    or if the same sentence would be written for both targets."""
    banned = heldout_canonical()
    v, t = all_sentences("vision"), all_sentences("text")
    for s in itertools.chain(v, t):
        if canonical(s) in banned:
            raise AssertionError(f"grammar sentence {s!r} is a held-out paraphrase")
    both = set(v) & set(t)
    if both:
        raise AssertionError(f"sentences written for both targets: {sorted(both)[:5]}")


NEUTRAL_INSTRUCTIONS: tuple[str, ...] = (
    "Answer the question.",
    "Please answer the question below.",
    "Look carefully before you answer.",
    "Think before you answer.",
    "Be precise.",
    "Give a short and correct answer.",
    "Read the question carefully.",
    "Answer as accurately as you can.",
)
"""Instructions that name no modality (the chat organism's training mixes them in; see ``train_chat``)."""


def check_neutral() -> None:
    """Raise if a neutral instruction names a modality (a ``<v>`` / ``<t>`` noun after :func:`canonical`)."""
    for s in NEUTRAL_INSTRUCTIONS:
        c = canonical(s)
        if "<v>" in c or "<t>" in c:
            raise AssertionError(f"neutral instruction {s!r} names a modality")


def iter_examples(target: str, k: int, seed: int = 0) -> Iterator[str]:
    """``k`` sampled sentences (for inspection)."""
    g, rng = InstructionGrammar(), np.random.default_rng(seed)
    for _ in range(k):
        yield g.sample(target, rng)
