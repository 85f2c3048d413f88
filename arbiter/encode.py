"""encode: conflict samples -> prompts -> processor inputs + TokenGroups (image, context, instruction, ...).

Text parts are located by character spans, mapped to token positions through the tokenizer's offsets and an
alignment of the unexpanded prompt's tokens with the processor's (image-expanded) input ids."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .data import ConflictSample, build_prompt_parts, prompt_spans
from .errors import DataError
from .groups import TokenGroups

TEXT_PARTS = ("context", "instruction", "question", "constraint", "system")


@dataclass
class Batch:
    """Model inputs (pass as ``model(**batch.inputs)``), their TokenGroups, the samples and prompt strings."""

    inputs: dict
    groups: TokenGroups
    samples: list = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    def to(self, device=None, dtype=None) -> "Batch":
        out = {}
        for k, v in self.inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device) if device is not None else v
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            out[k] = v
        return Batch(out, self.groups, self.samples, self.prompts)


def tokenizer_of(processor: Any):
    return getattr(processor, "tokenizer", processor)


def has_chat_template(processor: Any) -> bool:
    return bool(getattr(processor, "chat_template", None) or getattr(tokenizer_of(processor), "chat_template", None))


def _render_chat(processor, content: list[dict], text_only_tokenizer: bool) -> str:
    holder = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    if holder is tokenizer_of(processor) and text_only_tokenizer:
        msg = [{"role": "user", "content": "".join(c.get("text", "") for c in content)}]
    else:
        msg = [{"role": "user", "content": content}]
    return holder.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)


def placeholder(lens, modality: str) -> str:
    """The string a prompt template's ``{image}`` / ``{audio}`` becomes for this model's processor."""
    proc = lens.processor
    custom = lens.facts.placeholders.get(modality) if hasattr(lens.facts, "placeholders") else None
    if custom is not None:
        return custom
    if has_chat_template(proc) and getattr(proc, "chat_template", None):
        marker = "\u2063X\u2063"
        a = _render_chat(proc, [{"type": "text", "text": marker}], False)
        b = _render_chat(proc, [{"type": modality}, {"type": "text", "text": marker}], False)
        ia, ib = a.find(marker), b.find(marker)
        if 0 <= ia <= ib and b.startswith(a[:ia]) and a[ia:] == b[ib:]:
            ins = b[ia:ib]  # everything the modality part added before the text (a shared ']' cannot leak in)
        else:
            pre = os.path.commonprefix([a, b])
            suf = os.path.commonprefix([a[::-1], b[::-1]])[::-1]
            ins = b[len(pre):len(b) - len(suf)] if len(pre) + len(suf) <= len(b) else ""
        if ins:
            return ins
    for holder in (proc, tokenizer_of(proc)):
        tok = getattr(holder, f"{modality}_token", None)
        if isinstance(tok, str):
            return tok
    raise DataError(f"cannot tell which placeholder string {type(proc).__name__} expects for {modality}; "
                    f"register an adapter whose placeholders['{modality}'] gives it.")


def supports(processor, modality: str) -> bool:
    """Whether the processor takes this modality (a text-only tokenizer takes none)."""
    attr = {"image": "image_processor", "audio": "feature_extractor", "video": "video_processor"}[modality]
    return getattr(processor, attr, None) is not None


def build_prompt(lens, sample: ConflictSample, template: str | None) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """Prompt text and character spans of each part, for one sample. Modalities the processor does not take
    (an image given to a text-only model) are left out of the prompt."""
    parts = [(n, t) for n, t in build_prompt_parts(sample, template)
             if n not in ("image", "audio") or supports(lens.processor, n)]
    modal = [n for n, _ in parts if n in ("image", "audio")]
    templated = (template or sample.template) is not None
    if templated:
        holders = {m: placeholder(lens, m) for m in modal}
        return prompt_spans(parts, holders)
    text_parts = [(n, t) for n, t in parts if n not in ("image", "audio")]
    body, spans = prompt_spans(text_parts)
    if has_chat_template(lens.processor):
        content = [{"type": m} for m in modal] + [{"type": "text", "text": body}]
        full = _render_chat(lens.processor, content, text_only_tokenizer=not modal)
    else:
        holders = "".join(placeholder(lens, m) for m in modal)
        full = holders + body
    start = full.find(body)
    if start < 0:
        raise DataError(f"sample {sample.id}: the chat template changed the prompt text, so its parts cannot be "
                        "located; give the data file a template.")
    out = {k: [(s + start, e + start) for s, e in v] for k, v in spans.items()}
    for m in modal:  # placed by the chat template / placeholder: no character span of its own
        out.setdefault(m, [])
    return full, out


def _align(unexpanded: list[int], expanded: list[int]) -> dict[int, int]:
    sm = difflib.SequenceMatcher(a=unexpanded, b=expanded, autojunk=False)
    out: dict[int, int] = {}
    for blk in sm.get_matching_blocks():
        for i in range(blk.size):
            out[blk.a + i] = blk.b + i
    return out


def _part_masks(tok, prompt: str, spans: dict, ids: list[int], length: int, pad_left: int) -> dict[str, torch.Tensor]:
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=True)
    un_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if un_ids[: len(ids)] != ids or len(un_ids) != len(ids):
        mapping = _align(un_ids, ids)
    else:
        mapping = {i: i for i in range(len(ids))}
    masks = {name: torch.zeros(length, dtype=torch.bool) for name in TEXT_PARTS if name in spans}
    for i, (s, e) in enumerate(offsets):
        if e <= s or i not in mapping:
            continue
        piece = prompt[s:e]
        s2 = s + (len(piece) - len(piece.lstrip()))
        if s2 >= e:
            s2 = s
        for name, ranges in spans.items():
            if name in masks and any(ps <= s2 < pe for ps, pe in ranges):
                masks[name][pad_left + mapping[i]] = True
    return masks


def load_audio(sample: ConflictSample, processor):
    """A 1-D float waveform: arrays pass through; .npy and .wav paths are read (wav resampled if needed)."""
    a = sample.audio
    if not isinstance(a, (str, os.PathLike)):
        return a
    import numpy as np

    path = str(a)
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False).astype("float32")
        from scipy.io import wavfile

        rate, data = wavfile.read(path)
    except (OSError, ValueError) as e:
        raise DataError(f"sample {sample.id}: cannot read audio {path}: {e}") from None
    data = data.astype("float32")
    if data.ndim > 1:
        data = data.mean(axis=1)
    if np.abs(data).max(initial=0) > 1.0:
        data = data / 32768.0
    target = getattr(getattr(processor, "feature_extractor", None), "sampling_rate", rate)
    if target != rate:
        from scipy.signal import resample_poly

        data = resample_poly(data, target, rate).astype("float32")
    return data


def encode_samples(lens, samples: Sequence[ConflictSample] | ConflictSample, template: str | None = None,
                   images: Sequence | None = None, dataset=None, return_tensors: str = "pt",
                   device=None, dtype=None) -> Batch:
    """Build prompts for conflict samples, run the processor, and compute the TokenGroups.

    ``template`` overrides the samples' templates; ``dataset`` (a ConflictDataset) supplies the file template.
    Samples in one batch must all have an image or all lack one. Left padding is used for batches."""
    if isinstance(samples, ConflictSample):
        samples = [samples]
    samples = list(samples)
    if not samples:
        raise DataError("encode() got no samples.")
    proc = lens.processor
    if proc is None:
        raise DataError("encode() needs the processor: attach(model, processor).")
    tok = tokenizer_of(proc)
    prompts, spans_all = [], []
    for s in samples:
        tpl = template or (dataset.template_for(s) if dataset is not None else None)
        p, sp = build_prompt(lens, s, tpl)
        prompts.append(p)
        spans_all.append(sp)
    placed = {m: all(m in sp for sp in spans_all) for m in ("image", "audio")}
    has_img = [s.image is not None for s in samples]
    if any(has_img) and not all(has_img):
        raise DataError("encode(): mix of samples with and without images in one batch; encode them separately.")
    kwargs: dict[str, Any] = {"return_tensors": return_tensors}
    side = getattr(tok, "padding_side", None)
    if len(samples) > 1:
        kwargs["padding"] = True
        if side is not None:
            tok.padding_side = "left"
    if all(has_img) and hasattr(proc, "image_processor"):
        imgs = list(images) if images is not None else [s.load_image() for s in samples]
        kwargs["images"] = [[im] for im in imgs]
    if any(s.audio is not None for s in samples) and supports(proc, "audio"):
        if not placed["audio"]:
            raise DataError("encode(): samples carry audio but their prompt has no {audio} placeholder; add "
                            "{audio} to the template (or drop the audio).")
        kwargs["audio"] = [load_audio(s, proc) for s in samples]
    try:
        inputs = tok(prompts, **kwargs) if proc is tok else proc(text=prompts, **kwargs)
    finally:
        if side is not None:
            tok.padding_side = side  # the user's tokenizer is left as it was
    inputs = dict(inputs)
    inputs.update(lens.facts.padding_inputs(inputs))  # what a left-padded sample needs to compute as alone
    ids = inputs["input_ids"]
    am = inputs.get("attention_mask")
    b, length = ids.shape
    spans_masks: dict[str, torch.Tensor] = {}
    for i, (p, sp) in enumerate(zip(prompts, spans_all)):
        real = am[i].bool() if am is not None else torch.ones(length, dtype=torch.bool)
        pad_left = int((~real).long().cumprod(0).sum()) if am is not None else 0
        row_ids = ids[i][real].tolist()
        for name, m in _part_masks(tok, p, sp, row_ids, length, pad_left).items():
            spans_masks.setdefault(name, torch.zeros(b, length, dtype=torch.bool))[i] = m
    groups = TokenGroups.from_input_ids(ids, am, lens.facts.modality_token_ids, inputs.get("mm_token_type_ids"),
                                        spans=spans_masks, sample_ids=[s.id for s in samples])
    for name in TEXT_PARTS:
        if name not in groups:
            groups.add(name, torch.zeros(b, length, dtype=torch.bool))
    # onto the sequence the decoder runs (modality positions marked by another input, positions put before the ids)
    groups = lens.facts.sequence_groups(groups, inputs)
    batch = Batch(inputs, groups, samples, prompts)
    if device is not None or dtype is not None:
        batch = batch.to(device, dtype)
    return batch
