"""Train the chat organism (``llava_chat``): a LLaVA-class model (8 layers x 8 heads) trained like a real MLLM,
with a next-token loss over whole chat conversations, multi-token answers and instructions in the user turn.

Usage::

    python -m arbiter.organisms.train_chat --out arbiter/organisms/llava_chat

CPU only, one torch thread by default (bit-reproducible for a seed). Unlike :mod:`arbiter.organisms.train`
(trained to answer at the last prompt position only), every stage after the vision tower's is trained with the
ordinary causal-LM loss over the whole sequence: system prompt, user turn and assistant turn.

* **Model**: LlavaForConditionalGeneration, CLIP ViT (56 px, patch 14, 16 image tokens) + Llama, 8 layers,
  8 query / 4 KV heads, hidden 128, tied embeddings; the tiny zoo's byte-level BPE (:func:`arbiter.testing.tiny`,
  a reduced vocabulary of 1,549 ids) with ChatML special tokens ``<|im_start|>`` / ``<|im_end|>`` and a chat
  template with a system turn (:data:`CHAT_TEMPLATE`).
* **Conversations**: ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<image>\\n
  Text context: ...\\n<instruction>\\n<question><|im_end|>\\n<|im_start|>assistant\\n<answer><|im_end|>``; the
  instruction sits before the question (``between``) or after it (``after_question``), :func:`chat_template`.
  With the format constraint ("Answer the question using a single word or phrase.", as in LLaVA-1.5's data) the
  answer is one word ("Red"); without it a sentence ("The colour is red." / "It is a circle.").
* **Stage A** (vision tower, CLIP pre-training stand-in): the tower learns colour and shape through linear probes
  on its tokens, with noise augmentation (as ``train.py``'s llava recipe; probes discarded).
* **Stage T** (text corpus, no image): chats on the text context alone ("Text context: The circle is red.\\nWhat
  colour is the circle?" -> "The colour is red.", sometimes with a neutral or a text-trusting instruction) and
  chats that ask which source an instruction trusts (-> "The image." / "The text.").
* **Stage P** (projector alignment, LLaVA stage 1): captions ("Describe the image." -> "A red circle.") and
  image-only questions; only the projector learns.
* **Stage I** (visual instruction tuning, LLaVA stage 2): conflict conversations (image and text context
  disagree, the instruction says which to trust) each with its twin instructed the other way, agreement
  conversations, image-only questions and captions; the language model and the projector learn, the tower is
  frozen. Instructions: the generator's training paraphrases or a sentence of
  :mod:`arbiter.organisms.instructions`' grammar (never a held-out paraphrase), or, on samples with no conflict to
  arbitrate, a sentence of :data:`~arbiter.organisms.instructions.NEUTRAL_INSTRUCTIONS` that names no modality.

Loss of stages T, P and I: mean cross-entropy of every next text token of the prompt (padding and image tokens
excluded) plus ``--answer-weight`` x the mean over the assistant turn's tokens (its answer and ``<|im_end|>``).
Prompts are built with arbiter's own prompt builder (:func:`arbiter.encode.build_prompt`), so training sees the
exact token sequences the Lens encodes. Saved like the other organisms (float16 safetensors, processor, shipped
data set ``data/data.jsonl``, ``train_log.json`` with the reloaded model's evaluation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import arbiter
from arbiter.data import (
    COLOURS,
    FORMAT_CONSTRAINT,
    POSITION_TEMPLATES,
    SHAPES,
    TEXT_INSTRUCTIONS,
    VISION_INSTRUCTIONS,
    ConflictDataset,
    ConflictSample,
    generate_synthetic,
    load_jsonl,
    write_jsonl_lines,
)
from arbiter.encode import build_prompt
from arbiter.organisms import evaluate, load_dir
from arbiter.organisms.common import (StepLog, cosine_lr, evaluate_splits, save_organism, training_log,
                                      write_training_log)
from arbiter.organisms.instructions import NEUTRAL_INSTRUCTIONS, InstructionGrammar, check_neutral, check_no_leak
from arbiter.organisms.train import Item, Probes, probe_accuracy, train_vision_stage, vision_pools
from arbiter.testing.tiny import tiny

SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TURN_PREFIX = f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n"
"""Everything before the user turn's content."""
TURN_SUFFIX = f"{IM_END}\n{IM_START}assistant\n"
"""Everything between the user turn's content and the answer."""

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
"""ChatML with a default system turn; an image part renders as ``<image>\\n`` before the text."""

CHAT_POSITIONS: tuple[str, ...] = ("between", "after_question")
"""Instruction positions of the chat organism: before the question (the default user turn) and after it."""

SIZES = dict(hidden=128, layers=8, heads=8, kv_heads=4, intermediate=256, image_tokens=16, vision_hidden=64,
             vision_layers=5, vision_heads=2)
"""Size knobs of :func:`arbiter.testing.tiny.tiny` ("llava")."""
IMAGE_SIZE = 56
SENTENCE_PREFIX = {"colour": "The colour is", "shape": "It is a"}
"""The sentence answer up to the answer word (the compliant and the competing answer share it)."""
INSTR_QUESTION = "Which should you trust, the image or the text?"
CAPTION_QUESTION = "Describe the image."


def chat_template(position: str, prefill: str = "") -> str:
    """The per-sample template of a conflict conversation with the instruction at ``position`` (a key of
    :data:`arbiter.data.POSITION_TEMPLATES`), in the chat format; ``prefill`` is appended to the assistant turn
    (the sentence form's evaluation prefills :data:`SENTENCE_PREFIX`)."""
    return TURN_PREFIX + POSITION_TEMPLATES[position].replace("{image}\n", "{image}") + TURN_SUFFIX + prefill


def user_template(body: str) -> str:
    """A chat template around a user-turn ``body`` with placeholders."""
    return TURN_PREFIX + body + TURN_SUFFIX


def answer_of(attribute: str, value: str, short: bool) -> str:
    """The assistant's answer: one capitalised word with the format constraint, else a sentence."""
    if short:
        return value.capitalize()
    return f"The colour is {value}." if attribute == "colour" else f"It is a {value}."


def build_processor_and_model(seed: int):
    """The randomly initialised organism and its processor (chat tokens added, chat template set)."""
    tm = tiny("llava", seed=seed, vocab=1549, **SIZES)
    model, processor = tm.model, tm.processor
    tok = processor.tokenizer
    added = tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    if added != 2 or len(tok) != model.config.text_config.vocab_size:
        raise RuntimeError(f"chat tokens: added {added}, tokenizer {len(tok)} ids, model "
                           f"{model.config.text_config.vocab_size} rows")
    processor.chat_template = CHAT_TEMPLATE
    tok.chat_template = CHAT_TEMPLATE
    model.config.tie_word_embeddings = True
    model.config.get_text_config().tie_word_embeddings = True
    model.tie_weights()
    end = int(tok.convert_tokens_to_ids(IM_END))
    model.generation_config.eos_token_id = [end, int(tok.eos_token_id)]
    model.generation_config.pad_token_id = int(tok.pad_token_id)
    return model, processor


# --------------------------------------------------------------------------------------------------
# Evaluation data: the generator's samples in the chat format


def chat_dataset(out_dir: str | Path, n: int, seed: int, paraphrases: str = "heldout", form: str = "word",
                 p_agreement: float = 0.15, p_noisy: float = 0.1, labels: bool = False,
                 prefill: bool = True) -> ConflictDataset:
    """Fresh generator samples (:func:`arbiter.data.generate_synthetic`, positions :data:`CHAT_POSITIONS`) in the
    chat format. ``form="word"``: with the format constraint (the answer's first token is the answer word);
    ``form="sentence"``: without it, the assistant turn prefilled with :data:`SENTENCE_PREFIX` (the next token is
    the first one where the compliant and the competing sentence differ; ``prefill=False``: not prefilled, for
    generation). The header keeps the generator's record and adds ``chat``: {"form", "positions", "prefill"}."""
    if form not in ("word", "sentence"):
        raise ValueError(f"form must be 'word' or 'sentence', got {form!r}")
    out = Path(out_dir)
    ds = generate_synthetic(out, n, seed=seed, image_size=IMAGE_SIZE, paraphrases=paraphrases,
                            positions=CHAT_POSITIONS, p_agreement=p_agreement, p_noisy=p_noisy,
                            constraint=form == "word", labels=labels)
    lines = (out / "data.jsonl").read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    header["chat"] = {"form": form, "positions": list(CHAT_POSITIONS), "prefill": prefill and form == "sentence"}
    rows = [json.dumps(header)]
    for line, s in zip(lines[1:], ds):
        d = json.loads(line)
        prefix = SENTENCE_PREFIX[s.extra["attribute"]] if form == "sentence" and prefill else ""
        d["template"] = chat_template(s.extra["position"], prefix)
        rows.append(json.dumps(d, ensure_ascii=False))
    return write_jsonl_lines(out, rows)


def neutral_conflicts(ds: ConflictDataset, seed: int = 0) -> list[ConflictSample]:
    """The conflict samples of ``ds`` with their instruction replaced by a neutral one (names no modality; the
    format constraint kept): what the organism does when nothing tells it which modality to trust."""
    rng = np.random.default_rng(seed)
    out = []
    for s in ds:
        if not s.conflict:
            continue
        constraint = " " + FORMAT_CONSTRAINT if s.instruction.endswith(FORMAT_CONSTRAINT) else ""
        text = NEUTRAL_INSTRUCTIONS[int(rng.integers(len(NEUTRAL_INSTRUCTIONS)))]
        out.append(dataclasses.replace(s, instruction=text + constraint))
    return out


@torch.no_grad()
def generated_answers(model, processor, samples: list[ConflictSample], dataset=None, batch_size: int = 32,
                      max_new_tokens: int = 10) -> dict[str, Any]:
    """Greedy generation of the whole assistant turn (up to ``<|im_end|>``) per target: the share that is exactly
    the compliant answer (:func:`answer_of`, in the form the prompt asks for), exactly the competing one, or
    anything else; conflict samples only."""
    tok = processor.tokenizer
    end = int(tok.convert_tokens_to_ids(IM_END))
    counts: dict[str, dict[str, int]] = {}
    examples: list[dict[str, str]] = []
    samples = [s for s in samples if s.conflict]
    with arbiter.attach(model, processor) as lens:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            batch = lens.encode(chunk, dataset=dataset)
            n_in = batch.inputs["input_ids"].shape[1]
            gen = model.generate(**batch.inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=end, pad_token_id=int(tok.pad_token_id))
            for s, row in zip(chunk, gen[:, n_in:].tolist()):
                text = tok.decode(row[:row.index(end)] if end in row else row, skip_special_tokens=False)
                short = s.instruction.endswith(FORMAT_CONSTRAINT)
                attribute = s.extra["attribute"]
                c = counts.setdefault(s.target, {"n": 0, "compliant": 0, "competitor": 0, "other": 0})
                c["n"] += 1
                if text == answer_of(attribute, s.answer_compliant, short):
                    c["compliant"] += 1
                elif text == answer_of(attribute, s.answer_competitor, short):
                    c["competitor"] += 1
                else:
                    c["other"] += 1
                    if len(examples) < 5:
                        examples.append({"id": s.id, "target": s.target, "generated": text})
    from arbiter.organisms.heldout import wilson

    out: dict[str, Any] = {"examples_other": examples}
    for t, c in counts.items():
        out[t] = dict(c, compliant_rate=round(c["compliant"] / c["n"], 4),
                      compliant_ci95=wilson(c["compliant"], c["n"]))
    return out


def heldout_chat_eval(model, processor, n: int = 2000, seed: int = 9000, p_agreement: float = 0.15,
                      p_noisy: float = 0.1, n_generate: int = 200) -> dict[str, Any]:
    """The chat organism's held-out evaluation: fresh splits (training / held-out paraphrases) in the word form
    (format constraint, first answer token) and the sentence form (prefilled up to the answer word), MFR with 95%
    Wilson intervals, with and without the image knocked out in every layer; greedy generation of whole
    answers on ``n_generate`` samples of the held-out splits; and the share of conflicts answered from the image
    when the instruction names no modality."""
    from arbiter.organisms.heldout import with_intervals

    tmp = Path(tempfile.mkdtemp(prefix="arbiter_chat_heldout_"))
    out: dict[str, Any] = {"n": n, "seed": seed, "p_agreement": p_agreement, "p_noisy": p_noisy,
                           "match": "dictionary"}
    try:
        k = 0
        for para in ("train", "heldout"):
            for form in ("word", "sentence"):
                ds = chat_dataset(tmp / f"{para}_{form}", n, seed=seed + k, paraphrases=para, form=form,
                                  p_agreement=p_agreement, p_noisy=p_noisy)
                k += 1
                for ko in (False, True):
                    r = evaluate(model, processor, ds, knockout=ko, match="dictionary")
                    out[f"{para}_paraphrases_{form}" + ("_knockout" if ko else "")] = with_intervals(r)
                if para == "heldout" and form == "word":
                    neutral = neutral_conflicts(ds, seed)
                    r = evaluate(model, processor, ds, samples=neutral, match="dictionary")
                    # with a neutral instruction the samples keep their target: "follows" = the target's answer
                    out["neutral_instruction_word"] = r
        for form in ("word", "sentence"):
            ds = chat_dataset(tmp / f"gen_{form}", n_generate, seed=seed + 10 + (form == "sentence"),
                              paraphrases="heldout", form=form, p_agreement=p_agreement, p_noisy=p_noisy,
                              prefill=False)
            out[f"generated_heldout_{form}"] = generated_answers(model, processor, list(ds), dataset=ds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def print_chat_eval(res: dict[str, Any]) -> None:
    for para in ("train", "heldout"):
        for form in ("word", "sentence"):
            key = f"{para}_paraphrases_{form}"
            r, ko = res[key], res[key + "_knockout"]
            print(f"{key:30s} vision {r['vision_conflict']:.3f} {r['vision_conflict_ci95']} "
                  f"(n={r['n_vision_conflict']}; competitor {r['vision_competitor_conflict']:.3f})  "
                  f"text {r['text_conflict']:.3f} {r['text_conflict_ci95']} (n={r['n_text_conflict']})  "
                  f"image knocked out: vision {ko['vision_conflict']:.3f} text {ko['text_conflict']:.3f}")
            for pos, v in r.get("by_position", {}).items():
                print(f"  instruction {pos:15s} vision {v['vision_conflict']} text {v['text_conflict']} "
                      f"(n={v['n_vision_conflict']} / {v['n_text_conflict']})")
    nr = res.get("neutral_instruction_word")
    if nr:
        print("neutral instruction (conflicts): answers the image's value on "
              f"{nr['vision_conflict']} (vision-target rows) / the text's on {nr['text_conflict']} (text-target rows)")
    for form in ("word", "sentence"):
        g = res.get(f"generated_heldout_{form}")
        if g:
            print(f"generated ({form}): " + "  ".join(f"{t} {g[t]['compliant_rate']} {g[t]['compliant_ci95']} "
                                                      f"(competitor {g[t]['competitor']}, other {g[t]['other']})"
                                                      for t in ("vision", "text") if t in g))


# --------------------------------------------------------------------------------------------------
# Training conversations


@dataclasses.dataclass
class Unit:
    """One training conversation: the sample it was built from (prompt = ``build_prompt``), the assistant's
    answer, the image (or None) and what kind of conversation it is; ``decisive`` is the index of the answer
    token that carries the value."""

    sample: ConflictSample
    answer: str
    image: Any
    kind: str
    decisive: int = 0


class ChatComposer:
    """Draws training conversations from the pool of generator images (module doc)."""

    def __init__(self, items: list[Item], rng: np.random.Generator, args):
        self.items, self.rng, self.args = items, rng, args
        self.grammar = InstructionGrammar()
        self.train = {"vision": [i.text for i in VISION_INSTRUCTIONS if not i.heldout],
                      "text": [i.text for i in TEXT_INSTRUCTIONS if not i.heldout]}

    def pick(self, xs):
        return xs[int(self.rng.integers(len(xs)))]

    def instruction(self, target: str) -> str:
        if self.rng.random() < self.args.p_grammar:
            return self.grammar.sample(target, self.rng)
        return self.pick(self.train[target])

    def neutral(self) -> str:
        return self.pick(NEUTRAL_INSTRUCTIONS)

    @staticmethod
    def _with_constraint(text: str, short: bool) -> str:
        return (text + " " + FORMAT_CONSTRAINT) if short else text

    def _unit(self, s: ConflictSample, attribute: str, short: bool, image, kind: str) -> Unit:
        value = s.answer_compliant
        return Unit(s, answer_of(attribute, value, short), image, kind, 0 if short else 3)

    def conflict_pair(self, idx: int) -> list[Unit]:
        """A conflict (or, with probability ``--p-agreement``, an agreement) conversation on pool image ``idx`` and
        its twin instructed the other way. Agreement samples get a neutral instruction with probability
        ``--p-neutral-agreement`` (then no twin: there is nothing to arbitrate)."""
        rng, item = self.rng, self.items[idx]
        s = item.sample
        attribute = s.extra["attribute"]
        values = COLOURS if attribute == "colour" else SHAPES
        agree = rng.random() < self.args.p_agreement
        text_value = s.answer_vision if agree else self.pick([v for v in values if v != s.answer_vision])
        target = "vision" if rng.random() < 0.5 else "text"
        position = self.pick(CHAT_POSITIONS)
        short = rng.random() < self.args.p_short
        neutral = agree and rng.random() < self.args.p_neutral_agreement
        instr = self.neutral() if neutral else self.instruction(target)
        old = s.answer_text
        context = s.context.replace(f" {old}.", f" {text_value}.")
        if context == s.context and old != text_value:
            raise RuntimeError(f"cannot swap {old!r} in {s.context!r}")
        base = dataclasses.replace(s, context=context, answer_text=text_value, conflict=not agree, target=target,
                                   instruction=self._with_constraint(instr, short),
                                   template=chat_template(position))
        units = [self._unit(base, attribute, short, item.image, "agree_neutral" if neutral else
                            ("conflict" if not agree else "agree"))]
        if not neutral:
            other = "text" if target == "vision" else "vision"
            twin = dataclasses.replace(base, target=other,
                                       instruction=self._with_constraint(self.instruction(other), short))
            units.append(self._unit(twin, attribute, short, item.image, units[0].kind))
        return units

    def image_qa(self, idx: int) -> Unit:
        """The image alone, the question (a neutral instruction before or after it with probability
        ``--p-neutral``), answered from the image."""
        item = self.items[idx]
        s = item.sample
        short = self.rng.random() < self.args.p_short
        if self.rng.random() < self.args.p_neutral:
            body = "{image}{instruction}\n{question}" if self.rng.random() < 0.5 else "{image}{question}\n{instruction}"
            instr = self.neutral()
        else:
            body, instr = "{image}{question}", ""
            if short:
                body = "{image}{question}\n{instruction}"
        new = dataclasses.replace(s, context="", instruction=self._with_constraint(instr, short).strip(),
                                  target="vision", template=user_template(body), conflict=False,
                                  answer_text=s.answer_vision)
        return self._unit(new, s.extra["attribute"], short, item.image, "image_qa")

    def caption(self, idx: int) -> Unit:
        item = self.items[idx]
        s = dataclasses.replace(item.sample, context="", instruction="", question=CAPTION_QUESTION,
                                target="vision", template=user_template("{image}{question}"), conflict=False)
        return Unit(s, f"A {item.colour} {item.shape}.", item.image, "caption", 2)

    def text_qa(self, idx: int) -> Unit:
        """The text context alone (no image); a neutral or a text-trusting instruction with probability
        ``--p-neutral`` each, before or after the question; answered from the context."""
        s = self.items[idx].sample
        attribute = s.extra["attribute"]
        values = COLOURS if attribute == "colour" else SHAPES
        value = self.pick(values)
        context = s.context.replace(f" {s.answer_text}.", f" {value}.")
        short = self.rng.random() < self.args.p_short
        u = self.rng.random()
        instr = self.neutral() if u < self.args.p_neutral else (
            self.instruction("text") if u < 2 * self.args.p_neutral else "")
        if instr or short:
            body = "Text context: {context}\n" + ("{instruction}\n{question}" if self.rng.random() < 0.5
                                                  else "{question}\n{instruction}")
        else:
            body = "Text context: {context}\n{question}"
        new = dataclasses.replace(s, image=None, context=context, answer_text=value, target="text", conflict=False,
                                  instruction=self._with_constraint(instr, short).strip(),
                                  template=user_template(body))
        return self._unit(new, attribute, short, None, "text_qa")

    def instr_read(self, idx: int) -> Unit:
        """An instruction alone and the question which source it trusts (-> "The image." / "The text.")."""
        s = self.items[idx].sample
        target = "vision" if self.rng.random() < 0.5 else "text"
        new = dataclasses.replace(s, image=None, context="", instruction=self.instruction(target),
                                  question=INSTR_QUESTION, target=target, conflict=False,
                                  template=user_template("{instruction}\n{question}"))
        return Unit(new, "The image." if target == "vision" else "The text.", None, "instr_read", 1)


# --------------------------------------------------------------------------------------------------
# Training


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m arbiter.organisms.train_chat",
                                 description="Train the chat organism (see the module docstring).")
    ap.add_argument("--out", required=True, help="output directory (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: bit-reproducible)")
    ap.add_argument("--n-pool", type=int, default=6000, help="training images")
    ap.add_argument("--vision-steps", type=int, default=3200, help="stage A steps")
    ap.add_argument("--vision-batch", type=int, default=64)
    ap.add_argument("--vision-lr", type=float, default=4e-3)
    ap.add_argument("--vision-noise-aug", type=float, default=0.3, metavar="P",
                    help="stage A: replace a drawn clean image by a fresh noisy rendering with probability P")
    ap.add_argument("--text-steps", type=int, default=400, help="stage T steps (text corpus)")
    ap.add_argument("--align-steps", type=int, default=150, help="stage P steps (projector alignment)")
    ap.add_argument("--steps", type=int, default=2000, help="stage I steps (visual instruction tuning)")
    ap.add_argument("--batch", type=int, default=32, help="conversations per step (stages T, P, I)")
    ap.add_argument("--lr", type=float, default=2e-3, help="stages T, P and I (each: warm-up then cosine)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--answer-weight", type=float, default=3.0,
                    help="weight of the assistant turn's mean token loss next to the prompt's")
    ap.add_argument("--p-grammar", type=float, default=0.6, help="instructions drawn from the grammar")
    ap.add_argument("--p-agreement", type=float, default=0.15)
    ap.add_argument("--p-neutral-agreement", type=float, default=0.5,
                    help="agreement conversations whose instruction names no modality")
    ap.add_argument("--p-neutral", type=float, default=0.3,
                    help="image-only / text-only conversations with a neutral instruction")
    ap.add_argument("--p-short", type=float, default=0.5,
                    help="conversations with the format constraint (one-word answer)")
    ap.add_argument("--p-noisy", type=float, default=0.1, help="noisy images in the evaluation and shipped sets")
    ap.add_argument("--pool-noisy", type=float, default=0.1, help="noisy images in the training pool")
    ap.add_argument("--n-data", type=int, default=200, help="samples in the shipped data set")
    ap.add_argument("--n-eval", type=int, default=400, help="samples per evaluation split")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--no-eval", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    t_start, c_start = time.time(), time.process_time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    check_no_leak()
    check_neutral()

    model, processor = build_processor_and_model(args.seed)
    tok = processor.tokenizer
    lens = arbiter.attach(model, processor)  # not entered: used for its prompt builder only
    n_params = sum(p.numel() for p in model.parameters())
    hidden = model.config.get_text_config().hidden_size
    im_start, im_end = (int(tok.convert_tokens_to_ids(t)) for t in (IM_START, IM_END))
    image_id = int(model.config.image_token_index)
    print(f"[llava_chat] {type(model).__name__}: {n_params / 1e6:.2f} M parameters", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="arbiter_chat_organism_"))
    try:
        items, vis_items = vision_pools(tmp, args, IMAGE_SIZE)
        model.train()

        # ---------------- stage A: vision tower + projector through linear probes ----------------
        t0 = time.time()
        probes = Probes(hidden)
        log_a = train_vision_stage(model, "llava", processor, probes, items, rng, args)
        time_a = time.time() - t0
        probe_acc = probe_accuracy(model, "llava", processor, probes, vis_items)
        print(f"  A held-out probe accuracy {probe_acc}", flush=True)

        # ---------------- stages T, P, I: causal-LM loss over whole conversations ----------------
        comp = ChatComposer(items, rng, args)
        tok.padding_side = "right"
        checked: set[str] = set()

        def lm_step(units: list[Unit], opt, params) -> dict[str, float]:
            prompts = [build_prompt(lens, u.sample, None)[0] for u in units]
            texts = [p + u.answer + IM_END for p, u in zip(prompts, units)]
            with_images = units[0].image is not None
            kw = {"images": [[u.image] for u in units]} if with_images else {}
            enc = processor(text=texts, padding=True, return_tensors="pt", **kw)
            ids, am = enc["input_ids"], enc["attention_mask"]
            b, length = ids.shape
            pos = torch.arange(length)
            # the assistant turn starts after the last "<|im_start|>assistant\n" (3 tokens)
            last_start = torch.where(ids == im_start, pos, torch.full_like(ids, -1)).max(1).values
            ans_start = last_start + 3
            kind = units[0].kind
            if kind not in checked:  # the prompt tokenises alone as it does inside the conversation
                alone = processor(text=prompts[:1], return_tensors="pt", **({"images": [[units[0].image]]}
                                                                            if with_images else {}))["input_ids"][0]
                if not torch.equal(alone, ids[0, :int(ans_start[0])]):
                    raise RuntimeError(f"{kind}: the prompt's tokens differ inside the conversation")
                checked.add(kind)
            logits = model(**enc).logits[:, :-1].float()
            labels = ids[:, 1:]
            valid = am[:, 1:].bool() & (labels != image_id)
            is_answer = pos[None, 1:] >= ans_start[:, None]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none").view(b, -1)
            l_prompt = ce[valid & ~is_answer].mean()
            l_answer = ce[valid & is_answer].mean()
            loss = l_prompt + args.answer_weight * l_answer
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            dec = (ans_start + torch.tensor([u.decisive for u in units]) - 1)  # logits index predicting it
            hit = logits[torch.arange(b), dec].argmax(-1) == ids[torch.arange(b), dec + 1]
            out = {"loss_prompt": l_prompt.item(), "loss_answer": l_answer.item()}
            for k in {u.kind for u in units}:
                rows = [i for i, u in enumerate(units) if u.kind == k]
                out[f"{k}_acc"] = hit[rows].float().mean().item()
            return out

        def make_opt(params_by_decay):
            return torch.optim.AdamW(
                [{"params": ps, "weight_decay": args.weight_decay if decay else 0.0}
                 for decay, ps in sorted(params_by_decay.items())], lr=args.lr, betas=(0.9, 0.98))

        def groups(names_ok) -> tuple[dict[bool, list], list]:
            out: dict[bool, list] = {}
            flat = []
            for n, p in model.named_parameters():  # tied weights appear once
                trainable = names_ok(n)
                p.requires_grad_(trainable)
                if trainable:
                    out.setdefault(p.dim() >= 2 and "embed" not in n, []).append(p)
                    flat.append(p)
            return out, flat

        def run(stage: str, steps: int, batches, names_ok) -> tuple[list[dict[str, Any]], float]:
            slog = StepLog(stage, args.log_every, steps)
            by_decay, params = groups(names_ok)
            opt = make_opt(by_decay)
            for step in range(steps):
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(step, steps, args.lr, args.warmup)
                slog.add(step, lm_step(next(batches), opt, params))
            return slog.rows, slog.elapsed()

        def indices():
            while True:
                yield from (int(i) for i in rng.permutation(len(items)))

        def alternating(kinds):
            """Batches of one conversation kind each, the kinds taking turns."""
            it, step = indices(), 0
            while True:
                yield [getattr(comp, kinds[step % len(kinds)])(next(it)) for _ in range(args.batch)]
                step += 1

        def instruct_batches():
            """Three of four batches: conflict / agreement conversations with their twins; the fourth: image-only
            questions and captions, half and half."""
            it, step = indices(), 0
            while True:
                if step % 4 == 3:
                    units = [comp.image_qa(next(it)) for _ in range(args.batch // 2)]
                    units += [comp.caption(next(it)) for _ in range(args.batch - len(units))]
                else:
                    units = []
                    while len(units) < args.batch:
                        units += comp.conflict_pair(next(it))
                    units = units[:args.batch]
                yield units
                step += 1

        def is_language(n: str) -> bool:
            return n.startswith(("model.language_model", "lm_head"))

        log_t, time_t = run("T", args.text_steps, alternating(("text_qa", "instr_read")), is_language)
        log_p, time_p = run("P", args.align_steps, alternating(("caption", "image_qa")),
                            lambda n: n.startswith("model.multi_modal_projector"))
        log_i, time_i = run("I", args.steps, instruct_batches(),
                            lambda n: is_language(n) or n.startswith("model.multi_modal_projector"))
        for p in model.parameters():
            p.requires_grad_(True)
        train_time, train_cpu = time.time() - t_start, time.process_time() - c_start
        model.eval()

        # ---------------- save ----------------
        out = save_organism(model, processor, args.out)
        chat_dataset(out / "data", args.n_data, seed=args.seed + 3000, paraphrases="all", form="word",
                     p_agreement=args.p_agreement, p_noisy=args.p_noisy, labels=True)
        log = training_log("llava_chat", "llava", model, "train_chat", argv, args, SIZES, IMAGE_SIZE, n_params,
                           {"train_time_s": train_time, "train_cpu_s": train_cpu},
                           {"a": (time_a, log_a), "t": (time_t, log_t), "p": (time_p, log_p), "i": (time_i, log_i)},
                           probe_acc)
        if not args.no_eval:
            t0 = time.time()
            m2, p2, shipped = load_dir(out)
            splits = {}
            for k, (para, form) in enumerate((("train", "word"), ("heldout", "word"), ("heldout", "sentence"))):
                splits[f"{para}_paraphrases_{form}"] = chat_dataset(
                    tmp / f"eval_{para}_{form}", args.n_eval, seed=args.seed + 2000 + k, paraphrases=para,
                    form=form, p_agreement=args.p_agreement, p_noisy=args.p_noisy)
            splits["shipped"] = shipped
            log["eval"] = evaluate_splits(m2, p2, splits, _fmt, 28, match="dictionary")
            log["eval_time_s"] = round(time.time() - t0, 1)
        write_training_log(out, log)
        print(f"[llava_chat] trained in {train_time:.0f}s wall, {train_cpu:.0f}s CPU (A {time_a:.0f}s, "
              f"T {time_t:.0f}s, P {time_p:.0f}s, I {time_i:.0f}s); saved to {out}", flush=True)
        return log
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fmt(r: dict[str, Any]) -> str:
    keys = ("vision_conflict", "text_conflict", "vision_competitor_conflict", "text_competitor_conflict")
    return "  ".join(f"{k} {r[k]:.3f}" for k in keys if r.get(k) is not None)


def load_chat_jsonl(path: str | Path) -> ConflictDataset:
    """A chat data set written by :func:`chat_dataset` (checks the header says so)."""
    ds = load_jsonl(path)
    if "chat" not in ds.meta:
        raise ValueError(f"{path}: not a chat-organism data set (no 'chat' in its header)")
    return ds


if __name__ == "__main__":
    main()
