"""Train a model organism: a tiny multimodal LLM that follows "trust the image / trust the text" instructions.

Usage::

    python -m arbiter.organisms.train --name llava_tiny --out arbiter/organisms/llava_tiny --seed 1
    python -m arbiter.organisms.train --name qwen2vl_tiny --out arbiter/organisms/qwen2vl_tiny

CPU only, one thread by default (bit-reproducible for a seed, and the fastest setting on a small machine
shared with other jobs). What it does:

1. Builds a randomly initialised model of the organism's family with its real offline processor
   (:func:`arbiter.testing.tiny.tiny`), with tied input / output embeddings.
2. Generates a pool of training images with :func:`arbiter.data.generate_synthetic` (its own seed; training
   paraphrases only) in a temporary directory.
3. Stage A, vision alignment (LLaVA's stage 1 in spirit): the vision tower and projector alone learn the
   colour and the shape of each image through two linear probes on the image tokens (log-sum-exp pooled over
   the tokens). The probes are thrown away at the end.
4. Stage B0 (``--instr-steps``), the text-only skills in turn, cheap because no image is encoded: the
   instruction alone (-> " image" / " text": which modality it trusts) and the text context alone
   ("Text context: ...\nWhat colour is the circle?" -> the context's value). Stage B (``--qa-steps``) adds the
   image alone ("<image>\nWhat colour ..." -> the image's value) to the two, in turn.
5. Stage C, arbitration: full conflict prompts built with arbiter's own prompt builder
   (:func:`arbiter.encode.build_prompt`), recomposed at every draw: a target, an instruction (a training
   paraphrase of the generator or, with probability ``--p-grammar``, a sentence of
   :mod:`arbiter.organisms.instructions`; never a held-out paraphrase) followed by the format constraint, a
   position template of the generator, and a text context that contradicts the image (or agrees with it with
   probability ``--p-agreement``). Each prompt comes with its twin instructed to follow the other modality.
   Loss of stages B and C: cross-entropy of the answer's first token (" red") at the last prompt position,
   plus ``--eos-weight`` x that of EOS after it, plus ``--aux-weight`` x the stage-A probes' loss; in stage C
   also ``--hint-weight`` x the loss of a linear probe that reads the target modality from the last prompt
   position's residual after the middle layer (deep supervision standing in for pre-training: without it and
   stage B0, stage C sat for hundreds of steps at 0.55-0.75 conflict accuracy and whether it escaped depended on
   the seed). The probes are thrown away; nothing but the model is saved.
6. Saves the model in float16 (``save_pretrained``: safetensors + config), the processor, a held-out data set
   (``data/data.jsonl`` + PNGs: ``generate_synthetic(paraphrases="all")`` with its own seed), reloads it with
   :func:`arbiter.organisms.load_dir` (float32), and measures MFR on fresh held-out splits of the generator
   (training paraphrases / held-out paraphrases) and on the shipped set, with and without
   ``lens.knockout("image", "text")`` in every layer. All of it goes to ``train_log.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
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
    BACKGROUND,
    COLOURS,
    FORMAT_CONSTRAINT,
    NOISY_CONTRAST,
    NOISY_SIGMA,
    POSITION_TEMPLATES,
    SHAPES,
    TEXT_INSTRUCTIONS,
    VISION_INSTRUCTIONS,
    ConflictSample,
    generate_synthetic,
)
from arbiter.encode import build_prompt
from arbiter.organisms import load_dir
from arbiter.organisms.common import (StepLog, cosine_lr, evaluate_splits, save_organism, training_log,
                                      write_training_log)
from arbiter.organisms.instructions import InstructionGrammar, check_no_leak
from arbiter.testing.tiny import tiny

SPECS: dict[str, dict[str, Any]] = {
    "llava_tiny": dict(
        family="llava",
        image_size=56,  # CLIP patch 14 -> 4 x 4 = 16 image tokens, no resizing by the processor
        sizes=dict(
            hidden=128,
            layers=6,
            heads=4,
            kv_heads=2,
            intermediate=256,
            image_tokens=16,
            vision_hidden=64,
            vision_layers=5,  # LLaVA reads the second-to-last CLIP layer: 4 layers are used
            vision_heads=2,
        ),
    ),
    "qwen2vl_tiny": dict(
        family="qwen2_vl",
        image_size=56,  # patch 14 -> 4 x 4 patches, 2 x 2 merge -> 4 image tokens
        sizes=dict(
            hidden=128,
            layers=6,
            heads=4,
            kv_heads=2,
            intermediate=256,
            image_tokens=4,
            vision_hidden=64,
            vision_layers=4,
            vision_heads=2,
        ),
    ),
}
"""Organism name -> model family of :func:`arbiter.testing.tiny.tiny`, image size and size knobs."""

_QA_TEMPLATES = {"text_qa": "Text context: {context}\n{question}", "image_qa": "{image}\n{question}",
                 "instr": "{instruction}"}
_WORD = re.compile(r"[A-Za-z]+")


@dataclasses.dataclass
class Item:
    """One pool image with the generator's sample it came from and the drawn object's colour and shape."""

    sample: ConflictSample
    image: Any  # PIL image
    colour: str
    shape: str
    noisy: bool


def pool_item(s: ConflictSample) -> Item:
    """The drawn object's (colour, shape): the asked attribute is answer_vision, the other one is named in
    the question ("What colour is the {shape}?", "What shape is the {colour} object?")."""
    words = _WORD.findall(s.question.lower())
    if s.extra["attribute"] == "colour":
        colour, shape = s.answer_vision, next(w for w in words if w in SHAPES)
    else:
        colour, shape = next(w for w in words if w in COLOURS), s.answer_vision
    return Item(s, s.load_image(), colour, shape, bool(s.extra["noisy"]))


def _swap_word(text: str, old: str, new: str) -> str:
    out, n = re.subn(rf"\b{re.escape(old)}\b", new, text)
    if n != 1:
        raise RuntimeError(f"cannot find {old!r} once in {text!r}")
    return out


class Composer:
    """Draws training prompts from the pool (module doc, steps 4 and 5)."""

    def __init__(self, items: list[Item], rng: np.random.Generator, p_grammar: float, p_agreement: float):
        self.items, self.rng = items, rng
        self.p_grammar, self.p_agreement = p_grammar, p_agreement
        self.grammar = InstructionGrammar()
        self.train = {
            "vision": [i.text for i in VISION_INSTRUCTIONS if not i.heldout],
            "text": [i.text for i in TEXT_INSTRUCTIONS if not i.heldout],
        }
        self.positions = list(POSITION_TEMPLATES)

    def instruction(self, target: str) -> str:
        if self.rng.random() < self.p_grammar:
            text = self.grammar.sample(target, self.rng)
        else:
            pool = self.train[target]
            text = pool[int(self.rng.integers(len(pool)))]
        return text + " " + FORMAT_CONSTRAINT

    def conflict(self, idx: int) -> tuple[ConflictSample, Any, Item]:
        """A conflict prompt (or an agreement one) on pool image ``idx``, random target and position."""
        rng, item = self.rng, self.items[idx]
        s = item.sample
        values = COLOURS if s.extra["attribute"] == "colour" else SHAPES
        agree = rng.random() < self.p_agreement
        if agree:
            text_value = s.answer_vision
        else:
            others = [v for v in values if v != s.answer_vision]
            text_value = others[int(rng.integers(len(others)))]
        target = "vision" if rng.random() < 0.5 else "text"
        position = self.positions[int(rng.integers(len(self.positions)))]
        new = dataclasses.replace(
            s,
            context=_swap_word(s.context, s.answer_text, text_value),
            answer_text=text_value,
            conflict=not agree,
            target=target,
            instruction=self.instruction(target),
            template=POSITION_TEMPLATES[position],
        )
        return new, item.image, item

    def twin(self, s: ConflictSample) -> ConflictSample:
        """The same prompt instructed to follow the other modality."""
        target = "text" if s.target == "vision" else "vision"
        return dataclasses.replace(s, target=target, instruction=self.instruction(target))

    def skill(self, idx: int, kind: str) -> tuple[ConflictSample, Any, Item]:
        """A stage-B prompt: ``text_qa`` (the context alone), ``image_qa`` (the image alone) or ``instr`` (the
        instruction alone, answered " image" / " text")."""
        s, image, item = self.conflict(idx)
        tpl = _QA_TEMPLATES[kind]
        if kind == "text_qa":
            return dataclasses.replace(s, target="text", image=None, template=tpl), None, item
        if kind == "image_qa":
            return dataclasses.replace(s, target="vision", template=tpl), image, item
        return dataclasses.replace(s, image=None, template=tpl, answer_vision="image", answer_text="text",
                                   conflict=True), None, item


def _answer_id(tok, answer: str) -> int:
    return int(tok(" " + answer, add_special_tokens=False)["input_ids"][0])


def pixel_inputs(processor, images) -> dict[str, torch.Tensor]:
    out = processor.image_processor(images, return_tensors="pt")
    return {k: v for k, v in out.items() if k in ("pixel_values", "image_grid_thw")}


class PixelCache:
    """The image processor's output for every pool image, computed once (stage A draws from it)."""

    def __init__(self, processor, images: list, chunk: int = 256):
        self.values: list[torch.Tensor] = []
        self.grid: torch.Tensor | None = None
        grids = []
        for i in range(0, len(images), chunk):
            px = pixel_inputs(processor, images[i:i + chunk])
            n = len(images[i:i + chunk])
            self.values += list(px["pixel_values"].reshape(n, -1, *px["pixel_values"].shape[1:]).to(torch.float16)
                                if "image_grid_thw" in px else px["pixel_values"])
            if "image_grid_thw" in px:
                grids.append(px["image_grid_thw"])
        if grids:
            self.grid = torch.cat(grids)

    def batch(self, idx, aug: "NoisyAug | None" = None) -> dict[str, torch.Tensor]:
        vals = [self.values[int(i)] for i in idx] if aug is None else aug(self, idx)
        if self.grid is None:
            return {"pixel_values": torch.stack(vals)}
        return {"pixel_values": torch.cat([v.float().reshape(-1, self.values[0].shape[-1]) for v in vals]),
                "image_grid_thw": self.grid[torch.as_tensor(idx)]}


class NoisyAug:
    """Stage-A augmentation (``--vision-noise-aug P``): each drawn clean pool image is replaced, with probability
    P, by a fresh noisy rendering of itself: the generator's noisy transform (``arbiter.data._render``: the shape's
    colour moved to ``NOISY_CONTRAST`` of its contrast against the background, Gaussian noise of ``NOISY_SIGMA``
    grey levels, clipped and rounded) applied in pixel space to the processor's output, with new noise at every
    draw. Without it the tower sees the same few hundred noisy pool images again and again and learns their noise
    (stage-A probe: shape on noisy held-out images 0.575). The processor output is exactly invertible here
    (rescale + normalise, no resizing at the organisms' image size): CLIP-style [3, H, W], or Qwen2-VL-style
    flattened patches [patches, 3 · T · P · P] whose T temporal copies get the same noise. Its own RNGs
    (``seed``), so that P = 0 leaves the recipe bit for bit as it was."""

    def __init__(self, p: float, items: list[Item], processor, seed: int):
        ip = processor.image_processor
        self.p, self.items = float(p), items
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32)
        self.temporal = int(getattr(ip, "temporal_patch_size", 1) or 1)
        self.bg = torch.tensor(BACKGROUND, dtype=torch.float32)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def noisy(self, v: torch.Tensor) -> torch.Tensor:
        """A fresh noisy version of one clean image's processor output ``v`` (same layout, float32)."""
        flat = v.dim() == 2  # [patches, 3 * T * P * P]
        x = v.float().view(v.shape[0], 3, self.temporal, -1) if flat else v.float().view(3, -1)
        shape = [1] * x.dim()
        shape[1 if flat else 0] = 3
        mean, std, bg = (t.view(shape) for t in (self.mean, self.std, self.bg))
        pix = torch.round((x * std + mean) * 255.0)
        pix = bg + NOISY_CONTRAST * (pix - bg)
        noise_shape = (x.shape[0], 3, 1, x.shape[3]) if flat else tuple(x.shape)
        pix = pix + NOISY_SIGMA * torch.randn(noise_shape, generator=self.gen)
        pix = torch.round(pix.clamp(0.0, 255.0))
        return ((pix / 255.0 - mean) / std).view(v.shape)

    def __call__(self, cache: PixelCache, idx) -> list[torch.Tensor]:
        out = []
        for i in idx:
            v = cache.values[int(i)]
            if not self.items[int(i)].noisy and self.rng.random() < self.p:
                v = self.noisy(v)
            out.append(v)
        return out


def image_tokens(model, family: str, pixel: dict[str, torch.Tensor]) -> torch.Tensor:
    """Image tokens after the projector / merger: [n_images, tokens, hidden]."""
    if family == "llava":
        out = model.model.get_image_features(pixel_values=pixel["pixel_values"])
    else:
        out = model.model.get_image_features(pixel["pixel_values"], pixel["image_grid_thw"])
    return torch.stack(list(out.pooler_output))


class Probes(torch.nn.Module):
    """Linear colour / shape probes on the image tokens, log-sum-exp pooled over the tokens."""

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = torch.nn.Linear(hidden, len(COLOURS))
        self.shape = torch.nn.Linear(hidden, len(SHAPES))

    def forward(self, tokens: torch.Tensor, attr: str) -> torch.Tensor:
        return torch.logsumexp(getattr(self, attr)(tokens), dim=1)

    def loss(self, tokens: torch.Tensor, items: list[Item]) -> torch.Tensor:
        yc = torch.tensor([COLOURS.index(it.colour) for it in items])
        ys = torch.tensor([SHAPES.index(it.shape) for it in items])
        return F.cross_entropy(self(tokens, "colour"), yc) + F.cross_entropy(self(tokens, "shape"), ys)


def vision_pools(tmp: Path, args, image_size: int) -> tuple[list, list]:
    """(training pool, stage-A evaluation pool) of a training run, as :func:`pool_item` items: ``args.n_pool``
    training images (``args.pool_noisy`` noisy) and 400 held-out ones (``args.p_noisy`` noisy)."""
    pool = generate_synthetic(tmp / "pool", args.n_pool, seed=args.seed + 1000, image_size=image_size,
                              paraphrases="train", p_agreement=0.0, p_noisy=args.pool_noisy)
    vis_eval = generate_synthetic(tmp / "vis_eval", 400, seed=args.seed + 1500, image_size=image_size,
                                  paraphrases="train", p_agreement=0.0, p_noisy=args.p_noisy)
    return [pool_item(s) for s in pool], [pool_item(s) for s in vis_eval]


def train_vision_stage(model, family: str, processor, probes: Probes, items: list[Item], rng: np.random.Generator,
                       args) -> list[dict]:
    """Stage A of every organism recipe: the vision tower and projector learn each image's colour and shape through
    ``probes`` on the image tokens (``args.vision_steps`` AdamW steps of ``args.vision_batch`` images drawn by
    ``rng``, cosine learning rate, ``--vision-noise-aug`` fresh noisy renderings). Returns the loss log."""
    t0 = time.time()
    cache = PixelCache(processor, [it.image for it in items])
    vis_params = [p for n, p in model.named_parameters()
                  if n.startswith(("model.vision_tower", "model.visual", "model.multi_modal_projector"))]
    opt_a = torch.optim.AdamW(vis_params + list(probes.parameters()), lr=args.vision_lr, weight_decay=0.0)
    log_a = []
    aug = NoisyAug(args.vision_noise_aug, items, processor, args.seed + 4000) if args.vision_noise_aug > 0 else None
    for step in range(args.vision_steps):
        for g in opt_a.param_groups:
            g["lr"] = cosine_lr(step, args.vision_steps, args.vision_lr, 20)
        idx = rng.integers(len(items), size=args.vision_batch)
        loss = probes.loss(image_tokens(model, family, cache.batch(idx, aug)), [items[i] for i in idx])
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vis_params, 1.0)
        opt_a.step()
        if (step + 1) % args.log_every == 0:
            log_a.append(dict(step=step + 1, loss=round(loss.item(), 4)))
            print(f"  A {step + 1:5d}  probe loss {loss.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
    return log_a


@torch.no_grad()
def probe_accuracy(model, family, processor, probes: Probes, items: list[Item]) -> dict[str, float]:
    was = model.training
    model.eval()
    res: dict[str, list[float]] = {}
    for i in range(0, len(items), 100):
        chunk = items[i:i + 100]
        tokens = image_tokens(model, family, pixel_inputs(processor, [it.image for it in chunk]))
        for attr, names in (("colour", COLOURS), ("shape", SHAPES)):
            for it, k in zip(chunk, probes(tokens, attr).argmax(-1).tolist()):
                tag = f"{attr}_{'noisy' if it.noisy else 'clean'}"
                res.setdefault(tag, []).append(float(names[k] == getattr(it, attr)))
    model.train(was)
    return {k: round(float(np.mean(v)), 3) for k, v in sorted(res.items())}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m arbiter.organisms.train",
                                 description="Train a model organism (see the module docstring).")
    ap.add_argument("--name", required=True, choices=sorted(SPECS))
    ap.add_argument("--out", required=True, help="output directory (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: bit-reproducible)")
    ap.add_argument("--n-pool", type=int, default=6000, help="training images")
    ap.add_argument("--vision-steps", type=int, default=2400, help="stage A steps")
    ap.add_argument("--vision-batch", type=int, default=64)
    ap.add_argument("--vision-lr", type=float, default=4e-3)
    ap.add_argument("--vision-noise-aug", type=float, default=0.0, metavar="P",
                    help="stage A: replace a drawn clean image by a fresh noisy rendering with probability P")
    ap.add_argument("--instr-steps", type=int, default=250,
                    help="stage B0 steps: text-only skills (instruction alone; text context alone) in turn, before "
                    "stage B (cheap: no image)")
    ap.add_argument("--qa-steps", type=int, default=450, help="stage B steps")
    ap.add_argument("--steps", type=int, default=800, help="stage C steps")
    ap.add_argument("--batch", type=int, default=32, help="stages B and C")
    ap.add_argument("--lr", type=float, default=2e-3, help="stages B and C (each: warm-up then cosine)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--p-grammar", type=float, default=0.6)
    ap.add_argument("--p-agreement", type=float, default=0.15)
    ap.add_argument("--p-noisy", type=float, default=0.1, help="noisy images in the evaluation and shipped sets")
    ap.add_argument("--pool-noisy", type=float, default=0.1, help="noisy images in the training pool")
    ap.add_argument("--eos-weight", type=float, default=0.2)
    ap.add_argument("--aux-weight", type=float, default=0.2)
    ap.add_argument("--hint-weight", type=float, default=0.5,
                    help="stage C: weight of a linear probe's loss predicting the target modality from the last "
                    "prompt position's residual after layer --hint-layer (deep supervision; probe discarded)")
    ap.add_argument("--hint-layer", type=int, default=-1, help="default: the middle layer (layers // 2 - 1)")
    ap.add_argument("--no-pairs", action="store_true", help="stage C without the twin prompts")
    ap.add_argument("--n-data", type=int, default=200, help="samples in the shipped data set")
    ap.add_argument("--n-eval", type=int, default=400, help="samples per evaluation split")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--size", action="append", default=[], metavar="KEY=INT",
                    help="override a size knob of the organism's spec (experiments), e.g. --size hidden=96")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    spec = SPECS[args.name]
    family, size = spec["family"], spec["image_size"]
    sizes = dict(spec["sizes"])
    for kv in args.size:
        k, v = kv.split("=")
        sizes[k] = int(v)
    check_no_leak()

    tm = tiny(family, seed=args.seed, **sizes)
    model, processor = tm.model, tm.processor
    tok = processor.tokenizer
    # tied input / output embeddings (as in Qwen2-0.5B or Llama-3.2-1B)
    model.config.tie_word_embeddings = True
    with contextlib.suppress(AttributeError):
        model.config.get_text_config().tie_word_embeddings = True
    model.tie_weights()
    lens = arbiter.attach(model, processor)  # not entered: used for its prompt builder only
    n_params = sum(p.numel() for p in model.parameters())
    hidden = model.config.get_text_config().hidden_size
    print(f"[{args.name}] {type(model).__name__}: {n_params / 1e6:.2f} M parameters", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="arbiter_organism_"))
    try:
        items, vis_items = vision_pools(tmp, args, size)
        probes = Probes(hidden)
        model.train()

        # ---------------- stage A: vision tower + projector ----------------
        t0 = time.time()
        log_a = train_vision_stage(model, family, processor, probes, items, rng, args)
        time_a = time.time() - t0
        probe_acc = probe_accuracy(model, family, processor, probes, vis_items)
        print(f"  A held-out probe accuracy {probe_acc}", flush=True)

        # ---------------- stages B (skills) and C (arbitration): the whole model ----------------
        comp = Composer(items, rng, args.p_grammar, args.p_agreement)
        tok.padding_side = "left"
        eos = int(tok.eos_token_id)
        answer_ids = {w: _answer_id(tok, w) for w in COLOURS + SHAPES + ("image", "text")}
        if len(set(answer_ids.values())) != len(answer_ids):
            raise RuntimeError(f"answers must have distinct first tokens: {answer_ids}")
        groups: dict[bool, list] = {}
        for n, p in model.named_parameters():  # tied weights appear once
            groups.setdefault(p.dim() >= 2 and "embed" not in n, []).append(p)
        opt = torch.optim.AdamW(
            [{"params": ps, "weight_decay": args.weight_decay if decay else 0.0} for decay, ps in
             sorted(groups.items())] + [{"params": list(probes.parameters()), "weight_decay": 0.0}],
            lr=args.lr, betas=(0.9, 0.98),
        )
        captured: dict[str, torch.Tensor] = {}
        hook_mod = model.model.multi_modal_projector if family == "llava" else model.model.visual

        def hook(_m, _a, out):
            captured["f"] = out if isinstance(out, torch.Tensor) else out.pooler_output

        handle = hook_mod.register_forward_hook(hook)
        n_layers = model.config.get_text_config().num_hidden_layers
        hint_layer = args.hint_layer if args.hint_layer >= 0 else n_layers // 2 - 1
        hint_probe = torch.nn.Linear(hidden, 2)
        if args.hint_weight > 0:
            opt.add_param_group({"params": list(hint_probe.parameters()), "weight_decay": 0.0})
            layers = model.model.language_model.layers

            def hint_hook(_m, _a, out):
                captured["hint"] = out[0] if isinstance(out, tuple) else out

            handles_hint = [layers[hint_layer].register_forward_hook(hint_hook)]
        else:
            handles_hint = []

        def train_step(drawn: list[tuple[ConflictSample, Any, Item]]) -> dict[str, float]:
            """One step on prompts answered by the compliant answer's first token, then EOS."""
            prompts = [build_prompt(lens, s, None)[0] for s, _, _ in drawn]
            with_images = drawn[0][1] is not None
            kw = {"images": [[im] for _, im, _ in drawn]} if with_images else {}
            enc = processor(text=prompts, padding=True, return_tensors="pt", **kw)
            ans = torch.tensor([answer_ids[s.answer_compliant] for s, _, _ in drawn])
            b = len(drawn)
            inputs = dict(enc)
            inputs["input_ids"] = torch.cat([enc["input_ids"], ans[:, None]], 1)
            inputs["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones(b, 1, dtype=torch.long)], 1)
            if "mm_token_type_ids" in inputs:
                inputs["mm_token_type_ids"] = torch.cat(
                    [enc["mm_token_type_ids"], torch.zeros(b, 1, dtype=enc["mm_token_type_ids"].dtype)], 1)
            logits = model(**inputs, logits_to_keep=2).logits
            l_ans = F.cross_entropy(logits[:, 0], ans)
            l_eos = F.cross_entropy(logits[:, 1], torch.full((b,), eos))
            loss = l_ans + args.eos_weight * l_eos
            if with_images and args.aux_weight > 0:
                tokens = captured["f"].reshape(b, -1, hidden)
                loss = loss + args.aux_weight * probes.loss(tokens, [it for _, _, it in drawn])
            if args.hint_weight > 0 and drawn[0][0].template in POSITION_TEMPLATES.values():
                y = torch.tensor([0 if s.target == "vision" else 1 for s, _, _ in drawn])
                loss = loss + args.hint_weight * F.cross_entropy(hint_probe(captured["hint"][:, -2]), y)
            captured.clear()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return dict(loss=l_ans.item(), acc=(logits[:, 0].argmax(-1) == ans).float().mean().item())

        def run(stage: str, steps: int, batches) -> tuple[list[dict[str, Any]], float]:
            slog = StepLog(stage, args.log_every)
            for step in range(steps):
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(step, steps, args.lr, args.warmup)
                kind, drawn = next(batches)
                slog.add(step, {f"{kind}_{k}": v for k, v in train_step(drawn).items()})
            return slog.rows, slog.elapsed()

        def indices():
            while True:
                yield from (int(i) for i in rng.permutation(len(items)))

        def skill_batches():
            kinds, it, step = ("text_qa", "image_qa", "instr"), indices(), 0
            while True:
                kind = kinds[step % len(kinds)]
                yield kind, [comp.skill(next(it), kind) for _ in range(args.batch)]
                step += 1

        def conflict_batches(bucket: int = 4):
            """Conflict prompts, each with its twin; ``bucket`` batches are drawn at a time and cut by prompt
            length (less padding), then served in random order."""
            it = indices()
            while True:
                units = []
                while len(units) * (1 if args.no_pairs else 2) < bucket * args.batch:
                    s, im, item = comp.conflict(next(it))
                    units.append([(s, im, item)] + ([] if args.no_pairs else [(comp.twin(s), im, item)]))
                units.sort(key=lambda u: max(len(build_prompt(lens, x[0], None)[0]) for x in u))
                per = len(units) // bucket
                chunks = [sum(units[k * per:(k + 1) * per], []) for k in range(bucket)]
                for k in rng.permutation(bucket):
                    yield "conflict", chunks[int(k)]

        def instr_batches():
            """Stage B0: the two text-only skills (read the instruction; answer from the text context) in turn."""
            it, step = indices(), 0
            while True:
                kind = ("instr", "text_qa")[step % 2]
                yield kind, [comp.skill(next(it), kind) for _ in range(2 * args.batch)]
                step += 1

        log_b0, time_b0 = run("B0", args.instr_steps, instr_batches())
        log_b, time_b = run("B", args.qa_steps, skill_batches())
        log_c, time_c = run("C", args.steps, conflict_batches())
        handle.remove()
        for h in handles_hint:
            h.remove()
        train_time = time.time() - t_start
        model.eval()

        # ---------------- save ----------------
        out = save_organism(model, processor, args.out)
        generate_synthetic(out / "data", args.n_data, seed=args.seed + 3000, image_size=size, paraphrases="all",
                           p_agreement=args.p_agreement, p_noisy=args.p_noisy)
        log = training_log(args.name, family, model, "train", argv, args, sizes, size, n_params,
                           {"train_time_s": train_time},
                           {"a": (time_a, log_a), "b0": (time_b0, log_b0), "b": (time_b, log_b), "c": (time_c, log_c)},
                           probe_acc)

        # ---------------- evaluate the saved model (float16 weights, loaded as float32) ----------------
        if not args.no_eval:
            t0 = time.time()
            m2, p2, shipped = load_dir(out)
            splits = {
                "train_paraphrases": generate_synthetic(tmp / "eval_id", args.n_eval, seed=args.seed + 2000,
                                                        image_size=size, paraphrases="train",
                                                        p_agreement=args.p_agreement, p_noisy=args.p_noisy),
                "heldout_paraphrases": generate_synthetic(tmp / "eval_ho", args.n_eval, seed=args.seed + 2001,
                                                          image_size=size, paraphrases="heldout",
                                                          p_agreement=args.p_agreement, p_noisy=args.p_noisy),
                "shipped": shipped,
            }
            log["eval"] = evaluate_splits(m2, p2, splits, _fmt, 20)
            log["eval_time_s"] = round(time.time() - t0, 1)
        write_training_log(out, log)
        print(f"[{args.name}] trained in {train_time:.0f}s (A {time_a:.0f}s, B {time_b:.0f}s, C {time_c:.0f}s); "
              f"saved to {out}", flush=True)
        return log
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fmt(r: dict[str, Any]) -> str:
    keys = ("vision", "text", "vision_conflict", "text_conflict", "vision_competitor_conflict")
    return "  ".join(f"{k} {r[k]:.3f}" for k in keys if r.get(k) is not None)


if __name__ == "__main__":
    main()
