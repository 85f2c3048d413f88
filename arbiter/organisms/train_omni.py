"""Train the ``omni_emotion_tiny`` organism: a tiny Qwen2.5-Omni thinker (image + audio) that names the emotion
of a synthetic face and voice, choosing among the labels the prompt offers ([PB]'s CREMA-D protocol, docs/methods/shapley.md).

Usage::

    python -m arbiter.organisms.train_omni --out arbiter/organisms/omni_emotion_tiny

CPU only, one thread by default, deterministic for a seed. What it does:

1. Builds a randomly initialised ``Qwen2_5OmniThinkerForConditionalGeneration`` with its real offline processor
   (:func:`arbiter.testing.tiny.tiny`, family ``qwen2_5_omni``: Qwen2.5-VL-style vision tower with 2 x 2 merge,
   Whisper features (128 mels, 16 kHz) into the Qwen2.5-Omni audio encoder), with tied input / output
   embeddings.
2. Generates a training pool with :func:`arbiter.organisms.emotion.generate_emotions` (its own seed; PNG +
   WAV files read back exactly as arbiter reads them: :meth:`ConflictSample.load_image`,
   :func:`arbiter.encode.load_audio`) and caches the processor's pixel values and Whisper features per item
   (the features are computed with a short zero padding instead of 30 s: the valid frames are identical, and
   the model reads only the valid frames; the script checks both against the processor at start-up).
3. Stage A, towers: the vision tower and the audio encoder alone learn, through two linear probes on their
   output tokens (flattened), the latent features of the face (mouth, brow, eyes) / of the voice (pitch,
   slope, loudness, tempo) (mean squared error) and the label posterior that modality alone gives (soft
   cross-entropy to the Bayes posterior), so that the tokens carry each modality's evidence linearly. The
   probes are thrown away at the end.
4. Stage B, the whole model on prompts built with arbiter's own prompt builder and the data set's template
   (:data:`arbiter.organisms.emotion.TEMPLATE`): the question, then " Answer with one of: <offered labels>."
   exactly as :func:`arbiter.experiments.attractors.offered_sample` writes it, with 0-4 labels removed
   (``--p-remove``: probabilities of removing 0, 1, 2, 3, 4 labels; the removed set uniform among those of
   that size). Input condition per prompt: both modalities, face only (silent audio, as
   :func:`arbiter.experiments.modality.neutral_sample` makes it) or voice only (black image), with
   probabilities ``1 - p_image_only - p_audio_only``, ``--p-image-only``, ``--p-audio-only``.
   **Target**: the true label when it is offered. When it was removed, ``--fallback``:

   * ``posterior`` (default): the offered label with the highest Bayes posterior given the modalities present
     in the prompt (:meth:`EmotionTask.fallback`, computed from the sample's latent features under the
     generator's known class densities): what an ideal observer of that input answers when the right label
     may not be said. The close pairs make it condition-dependent (an angry face without its voice falls back
     to disgust; an angry voice without its face to happy) and the central neutral prototypes attract the
     errors of the labels whose close partner is also gone.
   * ``similarity``: the offered label most similar to the true one under a fixed table: the prototypes'
     log-likelihood ratio in the modalities present (the posterior rule at the class means; it ignores the
     sample's own evidence).

   Loss: cross-entropy of the answer's first token (the label without a leading space, what follows
   "assistant\\n") at the last prompt position, plus ``--eos-weight`` x that of EOS after it, plus
   ``--aux-weight`` x the stage-A probes' loss on the modalities that are present, plus ``--hint-weight`` x a
   deep-supervision term (a linear probe on the last prompt position's residual after the middle layer
   predicts the Bayes posterior of the prompt's condition over all six labels; discarded at the end).
5. Saves the model in float16 (``save_pretrained``: safetensors + config), the processor, a held-out data set
   (``data/data.jsonl`` + PNG + WAV: ``generate_emotions`` with its own seed, ``--n-data`` samples), reloads it
   with :func:`arbiter.organisms.load_dir` (float32) and measures, on the shipped set and on a fresh held-out
   split: accuracy per condition (all six labels offered) next to the Bayes classifier's, and
   :func:`arbiter.experiments.attractors.label_perturbation` on the shipped set (every removal set of 1-4
   labels, or ``--perturb-subsets`` of them): accuracy, top error-attractor edges and hierarchy per condition,
   the condition similarity, and how often the model's fallback equals the training rule's. The same
   perturbation of the Bayes classifier is logged for reference. All of it goes to ``train_log.json``.

The evaluation scores the prompts with a scorer that reuses the cached features (the arbiter lens path runs
the Whisper feature extractor with 30 s of padding per prompt, ~20x slower here); the log records its largest
difference from the lens path on a few rows (``scorer_check_max_abs_diff``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import arbiter
from arbiter.data import ConflictSample
from arbiter.encode import build_prompt, load_audio
from arbiter.experiments.attractors import (
    label_perturbation,
    label_token_ids,
    offered_sample,
)
from arbiter.experiments.modality import neutral_sample
from arbiter.organisms import load_dir
from arbiter.organisms.common import cosine_lr, save_organism
from arbiter.organisms.emotion import (
    FACE_FEATURES,
    LABELS,
    TEMPLATE,
    VOICE_FEATURES,
    EmotionTask,
    face_features,
    generate_emotions,
    voice_features,
)
from arbiter.testing.tiny import tiny

SIZES: dict[str, int] = {
    "hidden": 96,
    "layers": 6,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 192,
    "image_tokens": 4,  # 56 px, patch 14, 2 x 2 merge -> 4 image tokens
    "vision_hidden": 48,
    "vision_layers": 2,
    "vision_heads": 2,
    "audio_hidden": 48,
    "audio_layers": 2,
    "audio_heads": 2,
}
"""Default size knobs of :func:`arbiter.testing.tiny.tiny` (override with ``--size KEY=INT``)."""

CONDITIONS: dict[str, tuple[str, ...]] = {"all": ("image", "audio"), "image_only": ("image",),
                                          "audio_only": ("audio",)}
"""Input conditions: name -> modalities present (the others are neutral: black image / silent audio). The
names are those of :func:`arbiter.experiments.attractors.label_perturbation`."""
FALLBACKS = ("posterior", "similarity")


# --------------------------------------------------------------------------------------------------------------
# features: the processor's, cached


def audio_features(processor, waves: list[np.ndarray]) -> list[torch.Tensor]:
    """Whisper log-mel features of each clip's valid frames, [128, frames] each: the processor's feature
    extractor with ``padding="max_length"`` as in ``Qwen2_5OmniProcessor``, but padded with zeros to the clip
    length + 0.1 s instead of 30 s (the valid frames do not change; checked by :func:`check_pipeline`)."""
    fe = processor.feature_extractor
    out = []
    for w in waves:
        n = len(w) + fe.sampling_rate // 10
        r = fe([w], sampling_rate=fe.sampling_rate, padding="max_length", max_length=n, return_attention_mask=True,
               return_tensors="np")
        m = int(r["attention_mask"][0].sum())
        out.append(torch.from_numpy(np.ascontiguousarray(r["input_features"][0, :, :m])))
    return out


def image_features(processor, images: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pixel_values [patches, dim], image_grid_thw [3]) per image, from the processor's image processor."""
    out = []
    for i in range(0, len(images), 64):
        r = processor.image_processor(images=images[i:i + 64], return_tensors="pt")
        sizes = r["image_grid_thw"].prod(-1).tolist()
        for pv, g in zip(torch.split(r["pixel_values"], sizes), r["image_grid_thw"]):
            out.append((pv, g))
    return out


@dataclasses.dataclass
class Item:
    """A sample with its cached model inputs and latent features."""

    sample: ConflictSample
    label: int
    face: np.ndarray
    voice: np.ndarray
    pixels: torch.Tensor
    grid: torch.Tensor
    feats: torch.Tensor
    posterior: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # condition -> Bayes posterior


class Builder:
    """Model inputs for prompt rows from cached features (the processor's output, without re-running it)."""

    def __init__(self, model, processor, template: str = TEMPLATE):
        self.model, self.processor, self.template = model, processor, template
        self.tok = processor.tokenizer
        self.lens = arbiter.attach(model, processor)  # not entered: used for its prompt builder only
        self.ids_cache: dict[str, list[int]] = {}
        self.pad = int(self.tok.pad_token_id)

    def prompt(self, sample: ConflictSample) -> str:
        return build_prompt(self.lens, sample, self.template)[0]

    def ids(self, prompt: str, n_image: int, n_audio: int) -> list[int]:
        key = f"{n_image}|{n_audio}|{prompt}"
        if key not in self.ids_cache:
            p = self.processor
            text = prompt.replace(p.image_token, p.image_token * n_image).replace(p.audio_token,
                                                                                p.audio_token * n_audio)
            self.ids_cache[key] = self.tok(text, add_special_tokens=True)["input_ids"]
        return self.ids_cache[key]

    def inputs(self, prompts: list[str], pixels: list[torch.Tensor], grids: list[torch.Tensor],
               feats: list[torch.Tensor], append: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Left-padded inputs; ``append`` [rows] (optional) adds one token after each prompt."""
        merge = self.processor.image_processor.merge_size ** 2
        ids = [self.ids(p, int(g.prod()) // merge, _audio_tokens(f.shape[-1])) for p, g, f in zip(prompts, grids, feats)]
        if append is not None:
            ids = [x + [int(a)] for x, a in zip(ids, append.tolist())]
        n = max(len(x) for x in ids)
        input_ids = torch.tensor([[self.pad] * (n - len(x)) + x for x in ids], dtype=torch.long)
        mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)
        frames = {f.shape[-1] for f in feats}
        if len(frames) != 1:
            raise RuntimeError(f"clips of different lengths in one batch: {sorted(frames)} frames")
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": torch.cat(pixels),
                    "image_grid_thw": torch.stack(grids), "input_features": torch.stack(feats),
                    "feature_attention_mask": torch.ones(len(feats), feats[0].shape[-1], dtype=torch.long)}


def last_logits(model, inputs: dict[str, torch.Tensor], k: int = 1) -> torch.Tensor:
    """Logits of the last ``k`` positions [batch, k, vocab]. The thinker's ``forward`` has no ``logits_to_keep``
    (transformers 5.24 swallows it in ``**kwargs`` and returns every position), so the decoder is run and the
    head applied to the last rows only."""
    hidden = model.model(**inputs, use_cache=False)[0]
    return model.lm_head(hidden[:, -k:])


def _audio_tokens(frames: int) -> int:
    """Qwen2.5-Omni's audio tokens for ``frames`` feature frames (conv stride 2, then pooling 2)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


@torch.no_grad()
def check_pipeline(builder: Builder, samples: list[ConflictSample]) -> float:
    """Run a few samples (with and without neutral inputs) through the processor and through the cached path;
    raise unless the token ids / pixels agree exactly and the last-position logits to 1e-4. Returns the
    largest logit difference."""
    proc, model = builder.processor, builder.model
    rows = []
    for k, s in enumerate(samples):
        absent = [[], ["audio"], ["image"]][k % 3]
        base = dataclasses.replace(s, image=s.load_image(), audio=load_audio(s, proc))
        rows.append(offered_sample(neutral_sample(base, absent), LABELS[: 2 + k % 4]))
    prompts = [builder.prompt(r) for r in rows]
    ref = proc(text=prompts, images=[[r.image] for r in rows], audio=[r.audio for r in rows], padding=True,
               return_tensors="pt")
    imgs = image_features(proc, [r.image for r in rows])
    ours = builder.inputs(prompts, [p for p, _ in imgs], [g for _, g in imgs], audio_features(proc, [r.audio for r in rows]))
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        if not torch.equal(ref[key], ours[key]):
            raise RuntimeError(f"cached inputs differ from the processor's in {key}")
    if not torch.equal(ref["pixel_values"], ours["pixel_values"]):
        raise RuntimeError("cached pixel values differ from the processor's")
    m = ours["input_features"].shape[-1]
    valid = ref["feature_attention_mask"].sum(-1)
    if not bool((valid == m).all()) or not torch.equal(ref["input_features"][:, :, :m], ours["input_features"]):
        raise RuntimeError("cached audio features differ from the processor's valid frames")
    a = model(**ref).logits[:, -1]
    b = last_logits(model, ours)[:, -1]
    diff = float((a - b).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"cached-feature logits differ from the processor path by {diff}")
    return diff


def make_items(processor, dataset, task: EmotionTask | None = None) -> list[Item]:
    task = task or EmotionTask.from_meta(dataset.meta)
    samples = list(dataset)
    images = [s.load_image() for s in samples]
    waves = [load_audio(s, processor) for s in samples]
    imgs = image_features(processor, images)
    feats = audio_features(processor, waves)
    return [Item(s, LABELS.index(s.label), face_features(s), voice_features(s), pv, g, f,
                 {c: np.exp(task.log_posterior(s, modalities=m)) for c, m in CONDITIONS.items()})
            for s, (pv, g), f in zip(samples, imgs, feats)]


# --------------------------------------------------------------------------------------------------------------
# training pieces


class Probes(torch.nn.Module):
    """Linear read-outs from the towers' output tokens (flattened): the latent face / voice features
    (regression) and the label posterior that modality alone gives (soft cross-entropy), so that the tokens
    carry the per-modality evidence linearly."""

    def __init__(self, hidden: int, image_tokens: int, audio_tokens: int):
        super().__init__()
        self.image = torch.nn.Linear(hidden * image_tokens, len(FACE_FEATURES) + len(LABELS))
        self.audio = torch.nn.Linear(hidden * audio_tokens, len(VOICE_FEATURES) + len(LABELS))

    @staticmethod
    def _loss(head, tokens, latent, posterior):
        out = head(tokens.flatten(1))
        k = latent.shape[1]
        return F.mse_loss(out[:, :k], latent) + _soft_ce(out[:, k:], posterior)

    def loss(self, img_tokens, face, img_post, aud_tokens, voice, aud_post) -> torch.Tensor:
        out = torch.zeros(())
        if img_tokens is not None and len(img_tokens):
            out = out + self._loss(self.image, img_tokens, face, img_post)
        if aud_tokens is not None and len(aud_tokens):
            out = out + self._loss(self.audio, aud_tokens, voice, aud_post)
        return out


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits, -1)).sum(-1).mean()


def tower_outputs(model, pixels, grids, feats) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens [n, tokens, hidden] and audio tokens [n, tokens, hidden] from the towers alone."""
    m = model.model
    img = torch.cat(m.get_image_features(pixels, grids).pooler_output)
    mask = torch.ones(feats.shape[0], feats.shape[-1], dtype=torch.long)
    aud = m.get_audio_features(feats, mask).last_hidden_state
    return img.reshape(len(grids), -1, img.shape[-1]), aud.reshape(feats.shape[0], -1, aud.shape[-1])


def similarity_fallback(task: EmotionTask, true: int, offered: list[str], modalities: tuple[str, ...]) -> str:
    """``--fallback similarity``: the offered label whose prototype is the most likely under the true label's
    prototype, in the modalities present (ties: the earlier label)."""
    pf, pv = task.prototypes()
    ll = task.log_likelihood(pf[true], pv[true], modalities)
    idx = [LABELS.index(x) for x in offered]
    return LABELS[max(idx, key=lambda j: (ll[j], -j))]


class Composer:
    """Draws training rows: (item, condition, offered labels, target label)."""

    def __init__(self, items: list[Item], task: EmotionTask, rng: np.random.Generator, args):
        self.items, self.task, self.rng = items, task, rng
        self.p_cond = np.array([1 - args.p_image_only - args.p_audio_only, args.p_image_only, args.p_audio_only])
        self.p_remove = np.array(args.p_remove, dtype=float)
        self.p_remove = self.p_remove / self.p_remove.sum()
        self.fallback = args.fallback
        self.order: list[int] = []

    def next_item(self) -> int:
        if not self.order:
            self.order = [int(i) for i in self.rng.permutation(len(self.items))]
        return self.order.pop()

    def row(self) -> tuple[int, str, list[str], str]:
        i = self.next_item()
        item = self.items[i]
        cond = list(CONDITIONS)[int(self.rng.choice(3, p=self.p_cond))]
        k = int(self.rng.choice(len(self.p_remove), p=self.p_remove))
        removed = {int(j) for j in self.rng.choice(len(LABELS), size=k, replace=False)}
        offered = [lab for j, lab in enumerate(LABELS) if j not in removed]
        truth = LABELS[item.label]
        if truth in offered:
            target = truth
        elif self.fallback == "posterior":
            target = self.task.fallback(item.face, offered, CONDITIONS[cond], voice=item.voice)
        else:
            target = similarity_fallback(self.task, item.label, offered, CONDITIONS[cond])
        return i, cond, offered, target


# --------------------------------------------------------------------------------------------------------------
# evaluation


class CachedScorer:
    """A ``scorer`` for :func:`label_perturbation`: label log-probabilities from the cached features of each
    (sample, condition), the same numbers as the lens path (checked in the log)."""

    def __init__(self, model, processor, dataset, batch_size: int = 128):
        self.model, self.processor = model, processor
        self.builder = Builder(model, processor, dataset.template or TEMPLATE)
        ids = label_token_ids(processor, LABELS)
        m = max(len(x) for x in ids)
        self.index = torch.tensor([x + [x[0]] * (m - len(x)) for x in ids], dtype=torch.long)
        self.valid = torch.tensor([[k < len(x) for k in range(m)] for x in ids], dtype=torch.bool)
        self.cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def features(self, row) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (row.sample_id, row.condition)
        if key not in self.cache:
            (pv, g), = image_features(self.processor, [row.sample.load_image()])
            f, = audio_features(self.processor, [load_audio(row.sample, self.processor)])
            self.cache[key] = (pv, g, f)
        return self.cache[key]

    @torch.no_grad()
    def __call__(self, rows) -> torch.Tensor:
        feats = [self.features(r) for r in rows]
        prompts = [self.builder.prompt(r.sample) for r in rows]
        inputs = self.builder.inputs(prompts, [f[0] for f in feats], [f[1] for f in feats], [f[2] for f in feats])
        z = last_logits(self.model, inputs)[:, -1]
        logp = torch.log_softmax(z.to(torch.float64), -1)
        g = logp[:, self.index].masked_fill(~self.valid, -math.inf)
        return torch.logsumexp(g, -1)


class BayesScorer:
    """A ``scorer`` that answers like the Bayes classifier of the generator (from the latent features)."""

    def __init__(self, task: EmotionTask, dataset):
        self.task = task
        self.by_id = {s.id: s for s in dataset}

    def __call__(self, rows) -> torch.Tensor:
        return torch.tensor(np.stack([self.task.log_posterior(self.by_id[r.sample_id], None,
                                                              CONDITIONS[r.condition]) for r in rows]))


def preload(samples, processor) -> list[ConflictSample]:
    """The samples with their image and audio read as arbiter's lens reads them (audio resampled to the
    processor's rate): :func:`label_perturbation` with a ``scorer`` and no lens would keep the file's rate."""
    return [dataclasses.replace(s, image=s.load_image(), audio=load_audio(s, processor)) for s in samples]


def summarise(result, task: EmotionTask | None = None, dataset=None, top: int = 8) -> dict[str, Any]:
    """Per condition: accuracy, errors, top edges, hierarchy; similarity; fallback agreement with the rule."""
    out: dict[str, Any] = {"n_samples": len(result.sample_ids), "n_subsets": len(result.subsets), "conditions": {}}
    by_id = {s.id: s for s in dataset} if dataset is not None else {}
    forced = result.forced_rows
    for c in result.conditions:
        pred = result.predicted[list(result.conditions).index(c)]
        edges = sorted(result.edges(c), key=lambda e: -e["weight"])
        row: dict[str, Any] = {
            "accuracy": round(result.accuracy(c), 4),
            "accuracy_offered": round(result.accuracy(c, offered_only=True), 4),
            "n_errors": int(((pred >= 0) & (pred != result.true[:, None])).sum()),
            "n_shown_edges": sum(e["shown"] for e in edges),
            "top_edges": [f"{e['source']}->{e['target']} {e['weight']:.3f}" for e in edges[:top]],
            "hierarchy": [f"{h['label']} {h['score']:.3f}" for h in result.hierarchy(c)],
        }
        if task is not None and by_id:
            agree, n = 0, 0
            for si, sid in enumerate(result.sample_ids):
                for pi, removed in enumerate(result.subsets):
                    if not bool(forced[si, pi]) or int(pred[si, pi]) < 0:
                        continue
                    offered = [lab for lab in result.labels if lab not in removed]
                    rule = task.fallback(by_id[sid], offered, CONDITIONS[c])
                    agree += int(result.labels[int(pred[si, pi])] == rule)
                    n += 1
            row["fallback_agrees_with_rule"] = round(agree / n, 4) if n else None
        out["conditions"][c] = row
    sim = result.similarity()
    out["similarity"] = {f"all~{c}": round(sim["all"][c], 4) for c in result.conditions if c != "all"}
    return out


def evaluate_dir(out: Path, task: EmotionTask, extra_sets: dict[str, Any], perturb_subsets: int | None,
                 seed: int) -> dict[str, Any]:
    """Reload the saved organism and measure it (module doc, step 5)."""
    model, processor, shipped = load_dir(out)
    res: dict[str, Any] = {"accuracy": {}, "bayes_accuracy": {}}
    sets = {"shipped": shipped, **extra_sets}
    for name, ds in sets.items():
        sc = CachedScorer(model, processor, ds)
        r = label_perturbation(None, preload(ds, processor), sizes=(0,), scorer=sc, batch_size=128, dataset=ds)
        res["accuracy"][name] = {c: round(r.accuracy(c), 4) for c in r.conditions}
        b = label_perturbation(None, ds, sizes=(0,), scorer=BayesScorer(task, ds), batch_size=512)
        res["bayes_accuracy"][name] = {c: round(b.accuracy(c), 4) for c in b.conditions}
        print(f"  accuracy {name:10s} model {res['accuracy'][name]}  bayes {res['bayes_accuracy'][name]}", flush=True)
    # the cached scorer against the lens path, a few rows
    few = shipped[:3]
    with arbiter.attach(model, processor) as lens:
        ref = label_perturbation(lens, few, max_subsets=2, seed=seed, batch_size=6)
    ours = label_perturbation(None, preload(few, processor), max_subsets=2, seed=seed, batch_size=6,
                              scorer=CachedScorer(model, processor, shipped), dataset=shipped)
    res["scorer_check_max_abs_diff"] = float((ref.label_logprobs - ours.label_logprobs).abs().max())
    t0 = time.time()
    r = label_perturbation(None, preload(shipped, processor), max_subsets=perturb_subsets, seed=seed,
                           batch_size=128, scorer=CachedScorer(model, processor, shipped), dataset=shipped)
    res["perturbation"] = summarise(r, task, shipped)
    res["perturbation_time_s"] = round(time.time() - t0, 1)
    b = label_perturbation(None, shipped, max_subsets=perturb_subsets, seed=seed, batch_size=512,
                           scorer=BayesScorer(task, shipped))
    res["perturbation_bayes"] = summarise(b, task, shipped)
    for key in ("perturbation", "perturbation_bayes"):
        print(f"  {key}:", flush=True)
        for c, row in res[key]["conditions"].items():
            print(f"    {c:10s} acc {row['accuracy']:.3f}  top {row['top_edges'][:4]}  hierarchy "
                  f"{row['hierarchy'][:3]}  rule {row.get('fallback_agrees_with_rule')}", flush=True)
        print(f"    similarity {res[key]['similarity']}", flush=True)
    return res


# --------------------------------------------------------------------------------------------------------------
# main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m arbiter.organisms.train_omni", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", action="append", default=[], metavar="KEY=INT",
                    help=f"override a size knob (defaults {SIZES}), e.g. --size hidden=64")
    g = ap.add_argument_group("task (arbiter.organisms.emotion.EmotionTask)")
    for f in dataclasses.fields(EmotionTask):
        g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    ap.add_argument("--n-pool", type=int, default=1500, help="training pool size")
    ap.add_argument("--tower-steps", type=int, default=300, help="stage A steps")
    ap.add_argument("--tower-batch", type=int, default=64)
    ap.add_argument("--tower-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=1200, help="stage B steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--p-image-only", type=float, default=0.25)
    ap.add_argument("--p-audio-only", type=float, default=0.25)
    ap.add_argument("--p-remove", type=float, nargs=5, default=[0.3, 0.175, 0.175, 0.175, 0.175],
                    metavar="P", help="probabilities of removing 0, 1, 2, 3, 4 labels from the prompt")
    ap.add_argument("--fallback", choices=FALLBACKS, default="posterior",
                    help="target when the true label is removed (module doc)")
    ap.add_argument("--eos-weight", type=float, default=0.2)
    ap.add_argument("--aux-weight", type=float, default=0.2)
    ap.add_argument("--hint-weight", type=float, default=0.5,
                    help="stage B: weight of a linear probe's soft cross-entropy predicting the Bayes posterior of the "
                    "prompt's condition (all six labels) from the last prompt position's residual after layer "
                    "--hint-layer (deep supervision; the probe is discarded)")
    ap.add_argument("--hint-layer", type=int, default=-1, help="default: layers // 2 - 1")
    ap.add_argument("--n-data", type=int, default=120, help="samples in the shipped data set")
    ap.add_argument("--n-eval", type=int, default=300, help="samples of the fresh held-out split")
    ap.add_argument("--perturb-subsets", type=int, default=0,
                    help="removal sets in the evaluation's label perturbation (0: all 56)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--no-eval", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.p_image_only + args.p_audio_only > 1:
        raise SystemExit("--p-image-only + --p-audio-only must be <= 1")
    sizes = dict(SIZES)
    for kv in args.size:
        k, v = kv.split("=")
        sizes[k] = int(v)
    task = EmotionTask(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EmotionTask)})

    tm = tiny("qwen2_5_omni", seed=args.seed, **sizes)
    model, processor = tm.model, tm.processor
    tok = processor.tokenizer
    model.config.tie_word_embeddings = True  # tied input / output embeddings (as in Qwen2.5-Omni-3B)
    with contextlib.suppress(AttributeError):
        model.config.get_text_config().tie_word_embeddings = True
    model.tie_weights()
    n_params = sum(p.numel() for p in model.parameters())
    hidden = model.config.get_text_config().hidden_size
    print(f"[omni_emotion_tiny] {type(model).__name__}: {n_params / 1e6:.2f} M parameters; task {task}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="arbiter_omni_"))
    try:
        t0 = time.time()
        pool = generate_emotions(tmp / "pool", args.n_pool, seed=args.seed + 1000, task=task)
        builder = Builder(model, processor, pool.template)
        check_diff = check_pipeline(builder, list(pool[:6]))
        items = make_items(processor, pool, task)
        probe_set = generate_emotions(tmp / "probe", 300, seed=args.seed + 1500, task=task)
        probe_items = make_items(processor, probe_set, task)
        black_pix, black_grid = image_features(processor, [neutral_sample(pool[0], ["image"]).image])[0]
        silent = audio_features(processor, [np.zeros_like(load_audio(pool[0], processor))])[0]
        n_img = int(items[0].grid.prod()) // processor.image_processor.merge_size ** 2
        n_aud = _audio_tokens(items[0].feats.shape[-1])
        time_data = time.time() - t0
        print(f"  data: pool {len(items)} items, {n_img} image tokens, {n_aud} audio tokens, pipeline check "
              f"{check_diff:.1e} ({time_data:.0f}s)", flush=True)

        probes = Probes(hidden, n_img, n_aud)
        model.train()

        def face_t(idx):
            return torch.tensor(np.stack([items[i].face for i in idx]), dtype=torch.float32)

        def voice_t(idx):
            return torch.tensor(np.stack([items[i].voice for i in idx]), dtype=torch.float32)

        def post_t(idx, cond):
            return torch.tensor(np.stack([items[i].posterior[cond] for i in idx]), dtype=torch.float32)

        # ---------------- stage A: the towers ----------------
        t0 = time.time()
        tower_params = [p for n, p in model.named_parameters() if n.startswith(("model.visual", "model.audio_tower"))]
        opt_a = torch.optim.AdamW(tower_params + list(probes.parameters()), lr=args.tower_lr, weight_decay=0.0)
        log_a = []
        for step in range(args.tower_steps):
            for g in opt_a.param_groups:
                g["lr"] = cosine_lr(step, args.tower_steps, args.tower_lr, 20, floor=0.1)
            idx = [int(i) for i in rng.integers(len(items), size=args.tower_batch)]
            img, aud = tower_outputs(model, torch.cat([items[i].pixels for i in idx]),
                                     torch.stack([items[i].grid for i in idx]),
                                     torch.stack([items[i].feats for i in idx]))
            loss = probes.loss(img, face_t(idx), post_t(idx, "image_only"), aud, voice_t(idx),
                               post_t(idx, "audio_only"))
            opt_a.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tower_params, 1.0)
            opt_a.step()
            if (step + 1) % args.log_every == 0:
                log_a.append({"step": step + 1, "loss": round(loss.item(), 4)})
                print(f"  A {step + 1:5d}  probe loss {loss.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
        time_a = time.time() - t0
        r2_a = _probe_r2(model, probes, probe_items)
        print(f"  A held-out probes {r2_a}", flush=True)

        # ---------------- stage B: the whole model on prompts ----------------
        answer_ids = {lab: tok(lab, add_special_tokens=False)["input_ids"][0] for lab in LABELS}
        if len(set(answer_ids.values())) != len(LABELS):
            raise RuntimeError(f"labels must have distinct first tokens: {answer_ids}")
        eos = int(tok.eos_token_id)
        groups: dict[bool, list] = {}
        for n, p in model.named_parameters():  # tied weights appear once
            groups.setdefault(p.dim() >= 2 and "embed" not in n, []).append(p)
        opt = torch.optim.AdamW(
            [{"params": ps, "weight_decay": args.weight_decay if decay else 0.0} for decay, ps in
             sorted(groups.items())] + [{"params": list(probes.parameters()), "weight_decay": 0.0}],
            lr=args.lr, betas=(0.9, 0.98),
        )
        captured: dict[str, torch.Tensor] = {}

        def grab(name):
            def hook(_m, _a, out):
                captured[name] = out.pooler_output if name == "image" else out.last_hidden_state
            return hook

        handles = [model.model.visual.register_forward_hook(grab("image")),
                   model.model.audio_tower.register_forward_hook(grab("audio"))]
        n_layers = model.config.get_text_config().num_hidden_layers
        hint_layer = args.hint_layer if args.hint_layer >= 0 else n_layers // 2 - 1
        hint_probe = torch.nn.Linear(hidden, len(LABELS))
        if args.hint_weight > 0:
            opt.add_param_group({"params": list(hint_probe.parameters()), "weight_decay": 0.0})

            def hint_hook(_m, _a, out):
                captured["hint"] = out[0] if isinstance(out, tuple) else out

            handles.append(model.model.language_model.layers[hint_layer].register_forward_hook(hint_hook))
        comp = Composer(items, task, rng, args)
        prompt_cache: dict[tuple[str, ...], str] = {}

        def prompt_for(item: Item, offered: list[str]) -> str:
            key = tuple(offered)
            if key not in prompt_cache:  # the prompt depends only on the offered labels
                prompt_cache[key] = builder.prompt(offered_sample(item.sample, offered))
            return prompt_cache[key]

        t0 = time.time()
        log_b, acc = [], {}
        for step in range(args.steps):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, args.steps, args.lr, args.warmup, floor=0.1)
            rows = [comp.row() for _ in range(args.batch)]
            pix, grids, feats = [], [], []
            for i, cond, _, _ in rows:
                it = items[i]
                img_on, aud_on = "image" in CONDITIONS[cond], "audio" in CONDITIONS[cond]
                pix.append(it.pixels if img_on else black_pix)
                grids.append(it.grid if img_on else black_grid)
                feats.append(it.feats if aud_on else silent)
            ans = torch.tensor([answer_ids[t] for *_, t in rows])
            inputs = builder.inputs([prompt_for(items[i], off) for i, _, off, _ in rows], pix, grids, feats, append=ans)
            logits = last_logits(model, inputs, 2)
            l_ans = F.cross_entropy(logits[:, 0], ans)
            l_eos = F.cross_entropy(logits[:, 1], torch.full((len(rows),), eos))
            loss = l_ans + args.eos_weight * l_eos
            if args.aux_weight > 0:
                img = captured["image"].reshape(len(rows), n_img, -1)
                aud = captured["audio"].reshape(len(rows), n_aud, -1)
                on_i = [k for k, (_, c, _, _) in enumerate(rows) if "image" in CONDITIONS[c]]
                on_a = [k for k, (_, c, _, _) in enumerate(rows) if "audio" in CONDITIONS[c]]
                ids_i, ids_a = [rows[k][0] for k in on_i], [rows[k][0] for k in on_a]
                loss = loss + args.aux_weight * probes.loss(
                    img[on_i], face_t(ids_i), post_t(ids_i, "image_only"),
                    aud[on_a], voice_t(ids_a), post_t(ids_a, "audio_only"))
            if args.hint_weight > 0:
                post = torch.tensor(np.stack([items[i].posterior[c] for i, c, _, _ in rows]), dtype=torch.float32)
                loss = loss + args.hint_weight * _soft_ce(hint_probe(captured["hint"][:, -2]), post)
            captured.clear()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            hit = (logits[:, 0].argmax(-1) == ans).float()
            acc.setdefault("loss", []).append(l_ans.item())
            for k, (i, cond, off, target) in enumerate(rows):
                kind = cond if LABELS[items[i].label] in off else "forced"
                acc.setdefault(f"acc_{kind}", []).append(hit[k].item())
            if (step + 1) % args.log_every == 0:
                row: dict[str, Any] = {"step": step + 1}
                row.update({k: round(float(np.mean(v)), 4) for k, v in sorted(acc.items())})
                log_b.append(row)
                print(f"  B {step + 1:5d}  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "step")
                      + f"  ({time.time() - t0:.0f}s)", flush=True)
                acc = {}
        for h in handles:
            h.remove()
        time_b = time.time() - t0
        train_time = time.time() - t_start
        model.eval()

        # ---------------- save ----------------
        out = save_organism(model, processor, args.out)
        generate_emotions(out / "data", args.n_data, seed=args.seed + 3000, task=task)
        log: dict[str, Any] = {
            "name": "omni_emotion_tiny",
            "family": "qwen2_5_omni",
            "architecture": type(model).__name__,
            "command": "python -m arbiter.organisms.train_omni " + " ".join(sys.argv[1:] if argv is None else argv),
            "args": vars(args),
            "sizes": sizes,
            "task": task.settings(),
            "bayes_accuracy_task": task.bayes_accuracy(),
            "parameters": n_params,
            "image_tokens": n_img,
            "audio_tokens": n_aud,
            "torch": torch.__version__,
            "pipeline_check_max_abs_diff": check_diff,
            "train_time_s": round(train_time, 1),
            "time_data_s": round(time_data, 1),
            "time_stage_a_s": round(time_a, 1),
            "time_stage_b_s": round(time_b, 1),
            "probe_r2_after_a": r2_a,
            "probe_r2_after_b": _probe_r2(model.float(), probes, probe_items),
            "log_stage_a": log_a,
            "log_stage_b": log_b,
        }
        if not args.no_eval:
            t0 = time.time()
            heldout = generate_emotions(tmp / "eval", args.n_eval, seed=args.seed + 2000, task=task)
            log["eval"] = evaluate_dir(out, task, {"heldout": heldout}, args.perturb_subsets or None, args.seed)
            log["eval_time_s"] = round(time.time() - t0, 1)
        (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
        print(f"[omni_emotion_tiny] trained in {train_time:.0f}s (data {time_data:.0f}s, A {time_a:.0f}s, "
              f"B {time_b:.0f}s); total {time.time() - t_start:.0f}s; saved to {out}", flush=True)
        return log
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def _probe_r2(model, probes: Probes, items: list[Item]) -> dict[str, float]:
    """Per modality, on held-out items: R^2 of the latent-feature probe (averaged over features) and how often
    the label probe's argmax equals that modality's Bayes classifier."""
    was = model.training
    model.eval()
    img, aud = tower_outputs(model, torch.cat([it.pixels for it in items]), torch.stack([it.grid for it in items]),
                             torch.stack([it.feats for it in items]))
    model.train(was)
    out = {}
    for name, head, y, cond in (("face", probes.image, np.stack([it.face for it in items]), "image_only"),
                                ("voice", probes.audio, np.stack([it.voice for it in items]), "audio_only")):
        pred = head((img if name == "face" else aud).flatten(1))
        y = torch.tensor(y, dtype=torch.float32)
        k = y.shape[1]
        r2 = 1 - ((pred[:, :k] - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
        out[name + "_r2"] = round(float(r2.mean()), 4)
        best = np.stack([it.posterior[cond] for it in items]).argmax(1)
        out[name + "_agrees_with_bayes"] = round(float((pred[:, k:].argmax(1).numpy() == best).mean()), 4)
    return out


if __name__ == "__main__":
    main()
