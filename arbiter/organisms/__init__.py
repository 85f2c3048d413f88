"""Model organisms: tiny multimodal LLMs trained (in this repository, on CPU) to follow an instruction telling
them which modality to trust, shipped as package data.

``load(name)`` returns ``(model, processor, dataset)``: the model in float32 and eval mode, its processor
(``AutoProcessor.from_pretrained`` on the organism's folder, offline) and the held-out conflict data set
shipped with it (:func:`arbiter.data.load_jsonl`). ``available()`` lists the organisms present.
:func:`evaluate` measures MFR as the organisms' README reports it. See ``arbiter/organisms/README.md``
and ``python -m arbiter.organisms.train --help``.

Example::

    from arbiter.organisms import load
    import arbiter

    model, processor, ds = load("llava_tiny")
    with arbiter.attach(model, processor) as lens:
        batch = lens.encode(list(ds[:8]), dataset=ds)
        with lens.knockout("image", "text"):
            logits = model(**batch.inputs).logits
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from arbiter.data import AnswerDictionary, ConflictDataset, load_jsonl
from arbiter.errors import DataError

__all__ = ["ORGANISMS", "available", "load", "load_dir", "path", "evaluate"]

ROOT = Path(__file__).resolve().parent

ORGANISMS: dict[str, str] = {
    "llava_tiny": "LlavaForConditionalGeneration: CLIP ViT (patch 14, 56 px, 16 image tokens) + Llama (6 layers)",
    "qwen2vl_tiny": "Qwen2VLForConditionalGeneration: Qwen2-VL ViT (56 px, patch 14, 2x2 merge, 4 image tokens) + "
    "Qwen2 (6 layers, M-RoPE)",
    "llava_tiny_s0": "llava_tiny's recipe with seed 0: it generalises worse to the held-out instruction paraphrases "
    "(follows the text for 7.8% of vision-instructed conflicts there): real arbitration failures for steering; "
    "its shipped data holds only held-out wordings, 20% noisy images and a label set",
    "omni_emotion_tiny": "Qwen2_5OmniThinkerForConditionalGeneration: six emotions from a face (56 px, 4 image tokens) "
    "and a voice (0.5 s, 12 audio tokens) + Qwen2 (6 layers); trained by arbiter.organisms.train_omni",
    "llava_chat": "LlavaForConditionalGeneration: CLIP ViT (56 px, 16 image tokens) + Llama (8 layers x 8 heads, 4 KV "
    "heads), trained like a real MLLM (next-token loss over whole ChatML conversations, multi-token answers); "
    "trained by arbiter.organisms.train_chat",
}
"""Organisms this package knows, with a one-line description."""


def path(name: str) -> Path:
    """The folder of organism ``name`` (it may not exist if the organism was not trained)."""
    if name not in ORGANISMS:
        raise KeyError(f"unknown organism {name!r}; known: {sorted(ORGANISMS)}")
    return ROOT / name


def train_command(name: str) -> str:
    """The command that trains organism ``name`` into its package folder."""
    if name == "omni_emotion_tiny":
        return f"python -m arbiter.organisms.train_omni --out {path(name)}"
    if name == "llava_chat":
        return f"python -m arbiter.organisms.train_chat --out {path(name)}"
    recipe, seed = {"llava_tiny": ("llava_tiny", " --seed 1"),  # the shipped seeds (see the organisms README)
                    "llava_tiny_s0": ("llava_tiny", " --seed 0")}.get(name, (name, ""))
    return f"python -m arbiter.organisms.train --name {recipe}{seed} --out {path(name)}"


def available() -> list[str]:
    """Names of the organisms whose weights are present, sorted."""
    return sorted(n for n in ORGANISMS if (ROOT / n / "config.json").is_file())


def load_dir(directory: str | os.PathLike[str], dtype: torch.dtype = torch.float32):
    """Load ``(model, processor, dataset)`` from an organism folder (see :func:`load`)."""
    import transformers

    d = Path(directory)
    config = transformers.AutoConfig.from_pretrained(d)
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(d, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    processor = transformers.AutoProcessor.from_pretrained(d)
    data = d / "data" / "data.jsonl"
    dataset = load_jsonl(data) if data.is_file() else None
    return model, processor, dataset


def load(name: str, dtype: torch.dtype = torch.float32):
    """Load organism ``name``: ``(model, processor, dataset)``, offline.

    The weights are stored in float16 and loaded as ``dtype`` (float32 by default); the model is in eval
    mode. ``dataset`` is the organism's shipped held-out data set (a :class:`arbiter.data.ConflictDataset`): fresh
    generator samples (``dataset.meta["generator"]`` says how they were drawn); the llava organisms' declare a
    label set (each sample's ``label`` is its compliant answer) for the label-perturbation step."""
    d = path(name)
    if not (d / "config.json").is_file():
        raise DataError(
            f"organism {name!r} is not installed (no {d / 'config.json'}); train it with "
            f"`{train_command(name)}` (available: {available()})"
        )
    return load_dir(d, dtype=dtype)


def _first_answer_ids(tokenizer, sample) -> tuple[int, int]:
    """First token of " answer" for the compliant and the competitor answer."""
    def first(a: str) -> int:
        return int(tokenizer(" " + a, add_special_tokens=False)["input_ids"][0])

    return first(sample.answer_compliant), first(sample.answer_competitor)


@torch.no_grad()
def evaluate(model, processor, dataset: ConflictDataset, knockout: bool = False, batch_size: int = 64,
             samples: Any = None, match: str = "first_token") -> dict[str, Any]:
    """MFR of ``model`` on ``dataset`` (or on ``samples`` of it), optionally with the image knocked out.

    Per sample, from the next-token distribution at the last prompt position: ``follows`` = the greedy token
    is the first token of " <compliant answer>" (what the organisms are trained to say); ``pi`` = P(D_p) /
    (P(D_p) + P(D_c)) with the sample's :class:`AnswerDictionary` (1 on agreement samples, whose D_c is
    empty); ``competitor`` = the greedy token is the first token of " <competitor answer>" (conflict samples).
    ``knockout=True`` runs under ``lens.knockout("image", "text")`` in every layer (no text position can
    attend to an image token). ``match="dictionary"`` (the chat organism, whose answer starts a turn: "Red")
    counts ``follows`` / ``competitor`` when the greedy token is in D_p / D_c (the first tokens of the answer's
    surface forms, :class:`AnswerDictionary`) instead of equal to the first token of " <answer>".

    Returns a dict: ``vision`` / ``text`` (MFR per target, all samples), ``vision_pi`` / ``text_pi`` (share
    with pi > 0.5), ``vision_conflict`` / ``text_conflict`` (MFR on conflict samples),
    ``vision_competitor_conflict`` / ``text_competitor_conflict`` (share answering the competitor), the
    counts, and the same broken down by ``heldout`` paraphrase and by ``noisy`` image when the samples carry
    those flags (``by_paraphrase``: {"train": {...}, "heldout": {...}}; ``by_image``: {"clean": {...},
    "noisy": {...}}), and by the instruction's ``position`` when the samples carry two or more
    (``by_position``)."""
    import arbiter

    if match not in ("first_token", "dictionary"):
        raise ValueError(f"match must be 'first_token' or 'dictionary', got {match!r}")
    samples = list(dataset if samples is None else samples)
    tok = getattr(processor, "tokenizer", processor)
    records = []
    with arbiter.attach(model, processor) as lens:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            batch = lens.encode(chunk, dataset=dataset)
            ctx = lens.knockout("image", "text") if knockout else contextlib.nullcontext()
            with ctx:
                logits = model(**batch.inputs).logits[:, -1].float()
            probs = logits.softmax(-1)
            top = logits.argmax(-1)
            for j, s in enumerate(chunk):
                d = AnswerDictionary.for_sample(tok, s)
                if match == "first_token":
                    p_ids, c_ids = ({i} for i in _first_answer_ids(tok, s))
                else:
                    p_ids, c_ids = set(d.ids_p), set(d.ids_c)
                pp = probs[j, d.ids_p].sum().item()
                pc = probs[j, d.ids_c].sum().item() if d.ids_c else 0.0
                records.append(dict(
                    target=s.target,
                    conflict=s.conflict,
                    heldout=s.extra.get("heldout"),
                    noisy=s.extra.get("noisy"),
                    position=s.extra.get("position"),
                    follows=int(top[j].item() in p_ids),
                    pi=pp / (pp + pc) if pp + pc > 0 else 0.5,
                    competitor=int(s.conflict and top[j].item() in c_ids),
                ))
    out = _summary(records)
    for key, name, labels in (("heldout", "by_paraphrase", ("train", "heldout")),
                              ("noisy", "by_image", ("clean", "noisy"))):
        if {r[key] for r in records} == {True, False}:
            out[name] = {lab: _summary([r for r in records if bool(r[key]) == flag])
                         for lab, flag in zip(labels, (False, True))}
    positions = sorted({r["position"] for r in records if r["position"] is not None})
    if len(positions) > 1:
        out["by_position"] = {p: _summary([r for r in records if r["position"] == p]) for p in positions}
    return out


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(xs):
        xs = list(xs)
        return round(sum(xs) / len(xs), 4) if xs else None

    out: dict[str, Any] = {"n": len(records)}
    for t in ("vision", "text"):
        rs = [r for r in records if r["target"] == t]
        cs = [r for r in rs if r["conflict"]]
        out[f"n_{t}"] = len(rs)
        out[f"n_{t}_conflict"] = len(cs)
        out[t] = mean(r["follows"] for r in rs)
        out[f"{t}_pi"] = mean(r["pi"] > 0.5 for r in rs)
        out[f"{t}_conflict"] = mean(r["follows"] for r in cs)
        out[f"{t}_pi_conflict"] = mean(r["pi"] > 0.5 for r in cs)
        out[f"{t}_competitor_conflict"] = mean(r["competitor"] for r in cs)
    return out
