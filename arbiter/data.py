"""Conflict samples: the JSON Lines data format, prompt parts and spans, the Answer Entity Dictionary.

Also answer normalisation for MFR and a deterministic synthetic colour/shape conflict generator (docs/methods/conflict-samples.md)."""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, overload

import numpy as np
from PIL import Image, ImageDraw

from arbiter.errors import DataError
from arbiter.util import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ConflictSample",
    "ConflictDataset",
    "load_jsonl",
    "FORMAT_VERSION",
    "REQUIRED_FIELDS",
    "PLACEHOLDERS",
    "PART_NAMES",
    "DEFAULT_USER_TURN",
    "FORMAT_CONSTRAINT",
    "IA_VISION_INSTRUCTION",
    "IA_TEXT_INSTRUCTION",
    "build_prompt_parts",
    "prompt_spans",
    "AnswerDictionary",
    "normalise_answer",
    "Instruction",
    "COLOURS",
    "COLOUR_RGB",
    "SHAPES",
    "VISION_INSTRUCTIONS",
    "TEXT_INSTRUCTIONS",
    "POSITION_TEMPLATES",
    "synthetic_vocabulary",
    "generate_synthetic",
]

# --------------------------------------------------------------------------------------------------
# Constants of the format (docs/methods/conflict-samples.md)

FORMAT_VERSION = 1
"""Value of ``arbiter_dataset`` in a data file's optional header line."""

REQUIRED_FIELDS: tuple[str, ...] = (
    "id",
    "context",
    "instruction",
    "question",
    "target",
    "answer_vision",
    "answer_text",
)
"""Fields every sample line must carry."""

_OPTIONAL_FIELDS: tuple[str, ...] = (
    "image",
    "audio",
    "aliases_vision",
    "aliases_text",
    "conflict",
    "template",
    "label",
)
_KNOWN_FIELDS = frozenset(REQUIRED_FIELDS + _OPTIONAL_FIELDS)
_HEADER_KEYS = frozenset({"arbiter_dataset", "template", "labels"})

PLACEHOLDERS: tuple[str, ...] = ("image", "audio", "context", "instruction", "question")
"""Placeholders a template may use, written ``{name}``."""

PART_NAMES: tuple[str, ...] = (
    "image",
    "audio",
    "context",
    "instruction",
    "question",
    "constraint",
    "literal",
)
"""Names of the segments :func:`build_prompt_parts` returns."""

DEFAULT_USER_TURN = "Text context: {context}\n{instruction}\n{question}"
"""The user turn built when neither the sample nor the file gives a template (docs/methods/conflict-samples.md)."""

FORMAT_CONSTRAINT = "Answer the question using a single word or phrase."
"""The [IA] format constraint; when an instruction ends with it, it becomes its own ``constraint`` part."""

IA_VISION_INSTRUCTION = (
    "In case there is an inconsistency between the Text Context and the input image content, "
    "you must rely on the image content rather than the text context."
)
"""[IA] vision-following instruction sentence (paper data)."""

IA_TEXT_INSTRUCTION = (
    "In case there is an inconsistency between the Text Context and the input image content, "
    "you must rely on the text context rather than the input image content."
)
"""[IA] text-following instruction sentence (paper data)."""

_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

Target = Literal["vision", "text"]


# --------------------------------------------------------------------------------------------------
# Samples


@dataclass
class ConflictSample:
    """One conflict sample (docs/methods/conflict-samples.md, after [IA] and MC²).

    ``image`` is a path (made absolute, relative to the data file, by :func:`load_jsonl`), an in-memory
    ``PIL.Image.Image``, or ``None`` for text-only controls; ``audio`` likewise a path, a numpy waveform or
    ``None``. ``conflict=False`` marks an agreement sample, where ``answer_vision`` may equal
    ``answer_text``. ``template`` overrides the file's template; ``label`` is the class label of
    classification data sets (docs/methods/shapley.md). Fields the format does not know are kept in ``extra`` and
    written back by :meth:`to_dict`.
    """

    id: str
    context: str
    instruction: str
    question: str
    target: str
    answer_vision: str
    answer_text: str
    image: str | Image.Image | None = None
    audio: str | np.ndarray | None = None
    aliases_vision: list[str] = field(default_factory=list)
    aliases_text: list[str] = field(default_factory=list)
    conflict: bool = True
    template: str | None = None
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answer_compliant(self) -> str:
        """y_p: the instruction-compliant answer (``answer_vision`` if target is vision, else ``answer_text``)."""
        return self.answer_vision if self.target == "vision" else self.answer_text

    @property
    def answer_competitor(self) -> str:
        """y_c: the competitor answer, supported by the modality the instruction says not to follow."""
        return self.answer_text if self.target == "vision" else self.answer_vision

    @property
    def forms_compliant(self) -> list[str]:
        """Surface forms of y_p: the canonical answer then its aliases, duplicates dropped."""
        aliases = self.aliases_vision if self.target == "vision" else self.aliases_text
        return _unique([self.answer_compliant, *aliases])

    @property
    def forms_competitor(self) -> list[str]:
        """Surface forms of y_c: the canonical answer then its aliases, duplicates dropped."""
        aliases = self.aliases_text if self.target == "vision" else self.aliases_vision
        return _unique([self.answer_competitor, *aliases])

    def load_image(self) -> Image.Image:
        """Return the sample's image as an RGB ``PIL.Image.Image`` (a fresh copy).

        Raises :class:`DataError` naming the sample and the path if there is no image or it cannot be read.
        """
        if self.image is None:
            raise DataError(
                f"sample {self.id!r} has no image (text-only control); check sample.image before loading it"
            )
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        path = os.fspath(self.image)
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"sample {self.id!r}: cannot read image {path!r} ({exc}); "
                "check that the file exists and is an image PIL can open"
            ) from exc

    def to_dict(self, relative_to: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Return the sample as a data-file dict: required fields, then optional fields not at their default,
        then ``extra``.

        ``relative_to``: a directory; string image/audio paths are written relative to it. In-memory images
        and waveforms are returned as the objects themselves.
        """
        d: dict[str, Any] = {name: getattr(self, name) for name in REQUIRED_FIELDS}
        for name in ("image", "audio"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, os.PathLike)) and relative_to is not None:
                value = _relpath(os.fspath(value), os.fspath(relative_to))
            elif isinstance(value, os.PathLike):
                value = os.fspath(value)
            d[name] = value
        if self.aliases_vision:
            d["aliases_vision"] = list(self.aliases_vision)
        if self.aliases_text:
            d["aliases_text"] = list(self.aliases_text)
        if not self.conflict:
            d["conflict"] = False
        if self.template is not None:
            d["template"] = self.template
        if self.label is not None:
            d["label"] = self.label
        for key, value in self.extra.items():
            if key not in d and key not in _KNOWN_FIELDS:
                d[key] = value
        return d


def _unique(items: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _relpath(path: str, start: str) -> str:
    try:
        return Path(os.path.relpath(path, start)).as_posix()
    except ValueError:  # different drives on Windows
        return path


# --------------------------------------------------------------------------------------------------
# Data sets


class ConflictDataset(Sequence[ConflictSample]):
    """An ordered collection of :class:`ConflictSample` with the file-level settings of its data file.

    ``template`` is the file-level template (``None``: the default user turn), ``labels`` the declared class
    labels (docs/methods/shapley.md), ``path`` the file it was loaded from (or ``None``), ``meta`` any further header keys.
    """

    def __init__(
        self,
        samples: Iterable[ConflictSample],
        template: str | None = None,
        labels: Sequence[str] | None = None,
        path: str | os.PathLike[str] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.samples: list[ConflictSample] = list(samples)
        self.template: str | None = template
        self.labels: list[str] | None = list(labels) if labels is not None else None
        self.path: Path | None = Path(path) if path is not None else None
        self.meta: dict[str, Any] = dict(meta or {})
        seen: set[str] = set()
        for s in self.samples:
            if s.id in seen:
                raise DataError(f"duplicate sample id {s.id!r}; give every sample a unique id")
            seen.add(s.id)

    @overload
    def __getitem__(self, index: int) -> ConflictSample: ...

    @overload
    def __getitem__(self, index: slice) -> ConflictDataset: ...

    def __getitem__(self, index: int | slice) -> ConflictSample | ConflictDataset:
        if isinstance(index, slice):
            return self._derive(self.samples[index])
        return self.samples[index]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[ConflictSample]:
        return iter(self.samples)

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return f"ConflictDataset({len(self)} samples{where})"

    def _derive(self, samples: Iterable[ConflictSample]) -> ConflictDataset:
        return ConflictDataset(samples, self.template, self.labels, self.path, self.meta)

    def by_id(self, sample_id: str) -> ConflictSample:
        """Return the sample with this id (:class:`DataError` if there is none)."""
        for s in self.samples:
            if s.id == sample_id:
                return s
        raise DataError(f"no sample with id {sample_id!r} in {self!r}")

    def filter(
        self,
        target: str | None = None,
        conflict: bool | None = None,
        predicate: Callable[[ConflictSample], bool] | None = None,
    ) -> ConflictDataset:
        """Return the samples with this ``target`` and/or ``conflict`` flag (``None``: any), and for which
        ``predicate(sample)`` is true when a predicate is given. File-level settings are kept."""
        if target is not None and target not in ("vision", "text"):
            raise DataError(f"filter target must be 'vision' or 'text', got {target!r}")
        kept = [
            s
            for s in self.samples
            if (target is None or s.target == target)
            and (conflict is None or s.conflict == conflict)
            and (predicate is None or predicate(s))
        ]
        return self._derive(kept)

    def template_for(self, sample: ConflictSample) -> str | None:
        """The template that applies to ``sample``: its own, else the file's, else ``None`` (default turn)."""
        if sample.template is not None:
            return sample.template
        return self.template

    def header(self) -> dict[str, Any]:
        """The header line :meth:`save_jsonl` writes."""
        h: dict[str, Any] = {"arbiter_dataset": FORMAT_VERSION}
        if self.template is not None:
            h["template"] = self.template
        if self.labels is not None:
            h["labels"] = list(self.labels)
        for key, value in self.meta.items():
            if key not in h and key not in _HEADER_KEYS:
                h[key] = value
        return h

    def save_jsonl(self, path: str | os.PathLike[str], images_dir: str | None = None) -> Path:
        """Write the data set as a data file: the header line, then one sample per line.

        Image and audio paths are written relative to the file's directory. In-memory images are saved as
        PNG under ``images_dir`` (default ``<file stem>_images`` next to the file); in-memory audio cannot
        be written and raises :class:`DataError`. The file is written atomically. Returns its path.
        """
        out = Path(path)
        base = out.parent.resolve()
        base.mkdir(parents=True, exist_ok=True)
        img_dir = base / (images_dir if images_dir is not None else f"{out.stem}_images")
        lines = [json.dumps(self.header(), ensure_ascii=False)]
        for s in self.samples:
            d = s.to_dict(relative_to=base)
            if isinstance(s.image, Image.Image):
                img_dir.mkdir(parents=True, exist_ok=True)
                img_path = img_dir / f"{_safe_name(s.id)}.png"
                s.image.save(img_path, format="PNG")
                d["image"] = _relpath(str(img_path), str(base))
            if s.audio is not None and not isinstance(s.audio, (str, os.PathLike)):
                raise DataError(
                    f"sample {s.id!r} holds in-memory audio, which save_jsonl cannot write; "
                    "save the clip to a file and set sample.audio to its path"
                )
            lines.append(json.dumps(d, ensure_ascii=False))
        atomic_write_text(out, "\n".join(lines) + "\n")
        return out


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"


# --------------------------------------------------------------------------------------------------
# Loading


def _where(path: Path, lineno: int) -> str:
    return f"{path}:{lineno}"


def _check_template(template: Any, where: str, what: str) -> str:
    """Validate a template string: it must be a string whose ``{name}`` placeholders are all known."""
    if not isinstance(template, str):
        raise DataError(f"{where}: {what} must be a string, got {type(template).__name__}; write it as a JSON string")
    for m in _PLACEHOLDER_RE.finditer(template):
        if m.group(1) not in PLACEHOLDERS:
            raise DataError(
                f"{where}: {what} has unknown placeholder {{{m.group(1)}}}; "
                f"use only {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
            )
    return template


def _parse_header(obj: dict[str, Any], where: str) -> tuple[str | None, list[str] | None, dict[str, Any]]:
    version = obj.get("arbiter_dataset")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise DataError(
            f"{where}: bad header line: arbiter_dataset is {version!r}, this arbiter reads version "
            f"{FORMAT_VERSION}; write {{\"arbiter_dataset\": 1, ...}}"
        )
    template = obj.get("template")
    if template is not None:
        template = _check_template(template, where, "bad header line: 'template'")
    labels = obj.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or not labels:
            raise DataError(
                f"{where}: bad header line: 'labels' must be a non-empty list of strings, got {labels!r}"
            )
        if len(set(labels)) != len(labels):
            raise DataError(f"{where}: bad header line: 'labels' has duplicates: {labels!r}")
    meta = {k: v for k, v in obj.items() if k not in _HEADER_KEYS}
    return template, labels, meta


def _resolve(base: Path, value: str) -> str:
    p = Path(value)
    if not p.is_absolute():
        p = base / p
    return os.path.normpath(str(p))


def _parse_sample(
    obj: dict[str, Any],
    where: str,
    base: Path,
    file_template: str | None,
    labels: list[str] | None,
    check_images: bool,
) -> ConflictSample:
    sid_raw = obj.get("id")
    who = f" (sample {sid_raw!r})" if sid_raw is not None else ""
    for name in REQUIRED_FIELDS:
        if name not in obj:
            raise DataError(
                f"{where}: missing required field {name!r}{who}; every sample line needs "
                f"{', '.join(REQUIRED_FIELDS)}"
            )
    if isinstance(sid_raw, int) and not isinstance(sid_raw, bool):
        obj = {**obj, "id": str(sid_raw)}
    for name in REQUIRED_FIELDS:
        if not isinstance(obj[name], str):
            raise DataError(
                f"{where}: field {name!r} must be a string, got {type(obj[name]).__name__}{who}"
            )
    sid: str = obj["id"]
    who = f" (sample {sid!r})"
    if not sid:
        raise DataError(f"{where}: field 'id' is empty; give every sample a unique non-empty id")
    if obj["target"] not in ("vision", "text"):
        raise DataError(
            f"{where}: field 'target' must be \"vision\" or \"text\", got {obj['target']!r}{who}"
        )
    for name in ("answer_vision", "answer_text"):
        if not obj[name].strip():
            raise DataError(f"{where}: field {name!r} is empty{who}; give the canonical answer")
    conflict = obj.get("conflict", True)
    if not isinstance(conflict, bool):
        raise DataError(f"{where}: field 'conflict' must be true or false, got {conflict!r}{who}")
    if conflict and normalise_answer(obj["answer_vision"]) == normalise_answer(obj["answer_text"]):
        raise DataError(
            f"{where}: fields 'answer_vision' and 'answer_text' are both {obj['answer_vision']!r} on a "
            f"conflict sample{who}; give different answers, or mark an agreement sample with \"conflict\": false"
        )
    aliases: dict[str, list[str]] = {}
    for name in ("aliases_vision", "aliases_text"):
        value = obj.get(name, [])
        if value is None:
            value = []
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise DataError(f"{where}: field {name!r} must be a list of strings, got {value!r}{who}")
        aliases[name] = list(value)
    template = obj.get("template")
    if template is not None:
        template = _check_template(template, where, f"field 'template'{who}")
    label = obj.get("label")
    if label is not None and not isinstance(label, str):
        raise DataError(f"{where}: field 'label' must be a string, got {label!r}{who}")
    if labels is not None:
        if label is None:
            raise DataError(
                f"{where}: missing field 'label'{who}; the header declares labels {labels!r}, "
                "so every sample needs one"
            )
        if label not in labels:
            raise DataError(f"{where}: field 'label' is {label!r}{who}, not one of the declared labels {labels!r}")
    effective = template if template is not None else file_template
    media: dict[str, str | None] = {}
    for name in ("image", "audio"):
        value = obj.get(name)
        if value is None:
            media[name] = None
            continue
        if not isinstance(value, str) or not value:
            raise DataError(f"{where}: field {name!r} must be a path string, got {value!r}{who}")
        resolved = _resolve(base, value)
        if not os.path.isfile(resolved):
            raise DataError(
                f"{where}: field {name!r}: file {value!r} not found (looked at {resolved}){who}; "
                "paths are relative to the data file's directory"
            )
        if effective is not None and "{" + name + "}" not in effective:
            raise DataError(
                f"{where}: field {name!r} is set but the template has no {{{name}}} placeholder{who}; "
                f"add {{{name}}} where the {name} goes, or drop the field"
            )
        media[name] = resolved
    if check_images and media["image"] is not None:
        try:
            with Image.open(media["image"]) as im:
                im.verify()
        except Exception as exc:  # PIL raises many types for corrupt files
            raise DataError(
                f"{where}: field 'image': cannot read {obj['image']!r} as an image ({exc}){who}; "
                "replace the file with a valid image"
            ) from exc
    extra = {k: v for k, v in obj.items() if k not in _KNOWN_FIELDS}
    return ConflictSample(
        id=sid,
        context=obj["context"],
        instruction=obj["instruction"],
        question=obj["question"],
        target=obj["target"],
        answer_vision=obj["answer_vision"],
        answer_text=obj["answer_text"],
        image=media["image"],
        audio=media["audio"],
        aliases_vision=aliases["aliases_vision"],
        aliases_text=aliases["aliases_text"],
        conflict=conflict,
        template=template,
        label=label,
        extra=extra,
    )


def load_jsonl(path: str | os.PathLike[str], check_images: bool = True) -> ConflictDataset:
    """Load a conflict data file (docs/methods/conflict-samples.md): JSON Lines, one sample per line, optional header first line.

    The header is ``{"arbiter_dataset": 1, "template": "...", "labels": [...]}`` (``template`` and
    ``labels`` optional; further keys are kept in ``ConflictDataset.meta``). Blank lines are skipped.
    Image and audio paths are resolved relative to the file's directory and must exist; with
    ``check_images`` each image is also opened with PIL. Every problem raises :class:`DataError` with
    ``file:line``, the field and what to do.
    """
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"{p}: no such data file; check the path") from exc
    except UnicodeDecodeError as exc:
        line = bytes(exc.object[: exc.start]).count(b"\n") + 1
        raise DataError(f"{_where(p, line)}: not UTF-8 text ({exc}); save the data file as UTF-8 JSON Lines") from exc
    except OSError as exc:
        raise DataError(f"{p}: cannot read the data file ({exc})") from exc
    base = p.parent.resolve()
    template: str | None = None
    labels: list[str] | None = None
    meta: dict[str, Any] = {}
    samples: list[ConflictSample] = []
    first_line: dict[str, int] = {}
    seen_content = False
    # JSON Lines ends lines with \n (or \r\n, \r); str.splitlines() would also split inside a string at
    # U+2028, U+0085, \x1c..\x1e (legal raw in JSON), breaking valid lines and shifting line numbers
    for lineno, line in enumerate(re.split(r"\r\n|\r|\n", raw), start=1):
        if not line.strip():
            continue
        where = _where(p, lineno)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object"
            ) from exc
        except (ValueError, RecursionError) as exc:  # an integer over 4300 digits, nesting past the recursion limit
            raise DataError(
                f"{where}: invalid JSON ({type(exc).__name__}: {str(exc)[:200]}); each line must be one JSON object"
            ) from exc
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; write one object per line")
        if "arbiter_dataset" in obj:
            if seen_content:
                raise DataError(
                    f"{where}: bad header line: the header (with 'arbiter_dataset') must be the first line"
                )
            template, labels, meta = _parse_header(obj, where)
            seen_content = True
            continue
        seen_content = True
        sample = _parse_sample(obj, where, base, template, labels, check_images)
        if sample.id in first_line:
            raise DataError(
                f"{where}: duplicate id {sample.id!r} (first used on line {first_line[sample.id]}); "
                "give every sample a unique id"
            )
        first_line[sample.id] = lineno
        samples.append(sample)
    return ConflictDataset(samples, template=template, labels=labels, path=p, meta=meta)


# --------------------------------------------------------------------------------------------------
# Prompt parts and spans


def _split_constraint(name: str, text: str) -> list[tuple[str, str]]:
    """Split a trailing :data:`FORMAT_CONSTRAINT` off ``text`` into its own part; separators are literal."""
    body = text.rstrip()
    if not body.endswith(FORMAT_CONSTRAINT):
        return [(name, text)] if text else []
    trailing = text[len(body):]
    head = body[: len(body) - len(FORMAT_CONSTRAINT)]
    head_body = head.rstrip()
    sep = head[len(head_body):]
    parts: list[tuple[str, str]] = []
    if head_body:
        parts.append((name, head_body))
    if sep:
        parts.append(("literal", sep))
    parts.append(("constraint", FORMAT_CONSTRAINT))
    if trailing:
        parts.append(("literal", trailing))
    return parts


def _value_parts(sample: ConflictSample, name: str) -> list[tuple[str, str]]:
    if name in ("image", "audio"):
        return [(name, "")] if getattr(sample, name) is not None else []
    text: str = getattr(sample, name)
    if name in ("instruction", "question"):
        return _split_constraint(name, text)
    return [(name, text)] if text else []


def build_prompt_parts(sample: ConflictSample, template: str | None = None) -> list[tuple[str, str]]:
    """Return the user-turn text of ``sample`` as ordered ``(part_name, text)`` segments.

    ``template``: the template to fill (placeholders ``{image}``, ``{audio}``, ``{context}``,
    ``{instruction}``, ``{question}``; everything else is a ``"literal"`` part, used as is). ``None`` falls
    back to ``sample.template``; when that is ``None`` too, the default user turn
    :data:`DEFAULT_USER_TURN` ("Text context: {context}\\n{instruction}\\n{question}") is built, with the
    ``image`` (and ``audio``) segment first: in that case the image belongs where the model's chat
    template puts it, and the caller / model adapter places it (the segment is a marker, not a position).

    ``image`` and ``audio`` segments have text ``""`` (the model adapter substitutes the processor's
    placeholder) and are left out when the sample has no image / audio. A trailing
    :data:`FORMAT_CONSTRAINT` sentence in the instruction (or the question) becomes a separate
    ``"constraint"`` part; the whitespace before it is ``"literal"``. Empty text parts are dropped.
    Joining the segments' texts gives the prompt text; see :func:`prompt_spans`.
    """
    if template is None:
        template = sample.template
    parts: list[tuple[str, str]] = []
    if template is None:
        parts.extend(_value_parts(sample, "image"))
        parts.extend(_value_parts(sample, "audio"))
        template = DEFAULT_USER_TURN
    pos = 0
    for m in _PLACEHOLDER_RE.finditer(template):
        name = m.group(1)
        if name not in PLACEHOLDERS:
            continue  # not a placeholder: stays in the literal text
        if m.start() > pos:
            parts.append(("literal", template[pos : m.start()]))
        parts.extend(_value_parts(sample, name))
        pos = m.end()
    if pos < len(template):
        parts.append(("literal", template[pos:]))
    # merge adjacent literals so that spans are maximal
    merged: list[tuple[str, str]] = []
    for name, text in parts:
        if name == "literal" and merged and merged[-1][0] == "literal":
            merged[-1] = ("literal", merged[-1][1] + text)
        else:
            merged.append((name, text))
    return merged


def prompt_spans(
    parts: Sequence[tuple[str, str]],
    placeholders: Mapping[str, str] | None = None,
) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """Join ``parts`` into the prompt text and return it with each part name's character spans.

    Returns ``(text, {part_name: [(start, end), ...]})`` with half-open spans in order of appearance
    (``text[start:end]`` is the segment's text). ``placeholders`` optionally maps ``"image"`` / ``"audio"``
    to the string that replaces those segments' text (e.g. the processor's image token), so the spans fit
    the string actually tokenised.
    """
    pieces: list[str] = []
    spans: dict[str, list[tuple[int, int]]] = {}
    pos = 0
    for name, text in parts:
        if placeholders is not None and name in placeholders and name in ("image", "audio"):
            text = placeholders[name]
        pieces.append(text)
        spans.setdefault(name, []).append((pos, pos + len(text)))
        pos += len(text)
    return "".join(pieces), spans


# --------------------------------------------------------------------------------------------------
# Answer normalisation (MFR from generation)


def normalise_answer(text: str) -> str:
    """The one answer normaliser (docs/methods/mfr.md), used wherever answers are compared: Unicode NFKC, lower-case,
    delete punctuation (Unicode categories P*), collapse runs of whitespace to one space and strip the ends.
    ``"  The Red-Circle!"`` → ``"the redcircle"``. How a normalised answer is then read (its first answer entity,
    as whole words) is :func:`arbiter.metrics.read_answer`."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    kept = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


# --------------------------------------------------------------------------------------------------
# Answer Entity Dictionary


def encode_ids(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer.encode(text, add_special_tokens=False)
    ids = getattr(out, "ids", out)  # tokenizers.Tokenizer returns an Encoding
    return [int(i) for i in ids]


def unwrap_tokenizer(tokenizer: Any) -> Any:
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and callable(getattr(inner, "encode", None)):
        return inner  # a processor: use its tokenizer
    return tokenizer


def _variants(form: str) -> list[str]:
    """The surface variants whose first token enters the dictionary: the form as given, lower-case and
    capitalised, each with and without a leading space."""
    f = form.strip()
    if not f:
        return []
    bases = _unique([f, f.lower(), f[:1].upper() + f[1:], f[:1].upper() + f[1:].lower()])
    return _unique(v for b in bases for v in (" " + b, b))


@dataclass(frozen=True)
class AnswerDictionary:
    """The Answer Entity Dictionary D_p / D_c of a sample (docs/methods/conflict-samples.md; paper concept, formalisation proposed).

    D_m = {canonical answer} ∪ aliases; each surface form contributes the FIRST token id of " form",
    "form", "Form" and " Form" (as given, lower-case and capitalised, with and without a leading space);
    the tokenizer's unknown and special token ids are skipped; ids present in both sets are removed
    (kept in ``shared``). ``ids_p`` / ``ids_c`` are sorted lists of ints.
    """

    ids_p: list[int]
    ids_c: list[int]
    forms_p: list[str]
    forms_c: list[str]
    shared: list[int] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        tokenizer: Any,
        forms_p: Sequence[str],
        forms_c: Sequence[str],
        *,
        sample_id: str | None = None,
        allow_empty_c: bool = False,
    ) -> AnswerDictionary:
        """Build D_p and D_c from surface forms with ``tokenizer`` (a transformers tokenizer, a processor
        holding one, or a ``tokenizers.Tokenizer``).

        Raises :class:`DataError` naming the sample and the forms when D_p, or D_c unless
        ``allow_empty_c``, ends up empty (e.g. both answers share their first token).
        """
        tok = unwrap_tokenizer(tokenizer)
        skip: set[int] = set()
        unk = getattr(tok, "unk_token_id", None)
        if unk is not None:
            skip.add(int(unk))
        skip.update(int(i) for i in (getattr(tok, "all_special_ids", None) or []))

        def first_ids(forms: Sequence[str]) -> set[int]:
            ids: set[int] = set()
            for form in forms:
                for variant in _variants(form):
                    enc = encode_ids(tok, variant)
                    if enc and enc[0] not in skip:
                        ids.add(enc[0])
            return ids

        p, c = first_ids(forms_p), first_ids(forms_c)
        shared = p & c
        ids_p, ids_c = sorted(p - shared), sorted(c - shared)
        who = f"sample {sample_id!r}: " if sample_id is not None else ""
        if not ids_p or (not ids_c and not allow_empty_c):
            which = "D_p (compliant)" if not ids_p else "D_c (competitor)"
            raise DataError(
                f"{who}answer dictionary {which} is empty: compliant forms {list(forms_p)!r}, competitor forms "
                f"{list(forms_c)!r}, shared first-token ids {sorted(shared)!r} were removed and unknown/special "
                "tokens skipped; give answers (or aliases) whose first tokens differ"
            )
        return cls(ids_p=ids_p, ids_c=ids_c, forms_p=list(forms_p), forms_c=list(forms_c), shared=sorted(shared))

    @classmethod
    def for_sample(cls, tokenizer: Any, sample: ConflictSample) -> AnswerDictionary:
        """D_p / D_c of ``sample``: canonical answer ∪ aliases of the instructed and the other modality.

        On agreement samples (``conflict=False``) the competitor forms equal (after
        :func:`normalise_answer`) to a compliant form are dropped first, so equal answers give D_p = the
        answer's ids and an empty D_c."""
        forms_p = sample.forms_compliant
        forms_c = sample.forms_competitor
        if not sample.conflict:
            norm_p = {normalise_answer(f) for f in forms_p}
            forms_c = [f for f in forms_c if normalise_answer(f) not in norm_p]
        return cls.build(
            tokenizer,
            forms_p,
            forms_c,
            sample_id=sample.id,
            allow_empty_c=not sample.conflict,
        )

    def tensor_p(self, device: Any = None) -> torch.Tensor:
        """``ids_p`` as a 1-D LongTensor."""
        import torch

        return torch.tensor(self.ids_p, dtype=torch.long, device=device)

    def tensor_c(self, device: Any = None) -> torch.Tensor:
        """``ids_c`` as a 1-D LongTensor."""
        import torch

        return torch.tensor(self.ids_c, dtype=torch.long, device=device)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for trace metadata)."""
        return {
            "ids_p": list(self.ids_p),
            "ids_c": list(self.ids_c),
            "forms_p": list(self.forms_p),
            "forms_c": list(self.forms_c),
            "shared": list(self.shared),
        }


# --------------------------------------------------------------------------------------------------
# Synthetic conflict generator


class Instruction(NamedTuple):
    """An instruction sentence; ``heldout`` ones are kept out of ``paraphrases="train"``."""

    text: str
    heldout: bool = False


COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown")
"""Colour names the generator draws and asks about."""

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 0),
    "purple": (130, 40, 170),
    "orange": (255, 130, 0),
    "pink": (255, 105, 180),
    "brown": (130, 70, 20),
}
"""RGB of each colour in :data:`COLOURS`."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
"""Shape names the generator draws and asks about."""

BACKGROUND: tuple[int, int, int] = (224, 224, 224)
"""Background RGB of the generator's images."""
NOISY_CONTRAST = 0.35
"""A noisy image's shape colour lies this fraction of the way from the background to the clean colour."""
NOISY_SIGMA = 45.0
"""Standard deviation (grey levels) of the Gaussian noise added to every channel of a noisy image."""

VISION_INSTRUCTIONS: tuple[Instruction, ...] = (
    Instruction(IA_VISION_INSTRUCTION),
    Instruction("If the text and the image disagree, trust the image."),
    Instruction("Answer based on what you see in the image, not on the text context."),
    Instruction("Ignore the text context and look at the image."),
    Instruction("The image is correct; the text context may be wrong."),
    Instruction("Use the image to answer the question.", heldout=True),
    Instruction("Rely on the picture rather than the description.", heldout=True),
)
"""Vision-following instructions: the [IA] sentence and paraphrases; two are held out."""

TEXT_INSTRUCTIONS: tuple[Instruction, ...] = (
    Instruction(IA_TEXT_INSTRUCTION),
    Instruction("If the text and the image disagree, trust the text."),
    Instruction("Answer based on what the text context says, not on the image."),
    Instruction("Ignore the image and read the text context."),
    Instruction("The text context is correct; the image may be wrong."),
    Instruction("Use the text context to answer the question.", heldout=True),
    Instruction("Rely on the description rather than the picture.", heldout=True),
)
"""Text-following instructions: the [IA] sentence and paraphrases; two are held out."""

POSITION_TEMPLATES: dict[str, str] = {
    "before_image": "{instruction}\n{image}\nText context: {context}\n{question}",
    "between": "{image}\nText context: {context}\n{instruction}\n{question}",
    "after_question": "{image}\nText context: {context}\n{question}\n{instruction}",
}
"""Per-sample templates that place the instruction before the image, between context and question,
or after the question."""

_QUESTIONS = {"colour": "What colour is the {shape}?", "shape": "What shape is the {colour} object?"}
_CONTEXTS = {"colour": "The {shape} is {colour}.", "shape": "The {colour} object is a {shape}."}
_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")


def synthetic_vocabulary() -> list[str]:
    """Every word and punctuation token the generator can write into a prompt or answer, split like the
    ``tokenizers`` Whitespace pre-tokenizer (``\\w+|[^\\w\\s]+``), sorted. Enough for a word-level tokenizer."""
    templates = [DEFAULT_USER_TURN, *POSITION_TEMPLATES.values()]
    texts: list[str] = [_PLACEHOLDER_RE.sub(" ", t) for t in templates] + [FORMAT_CONSTRAINT]
    texts += [i.text for i in VISION_INSTRUCTIONS + TEXT_INSTRUCTIONS]
    for c in COLOURS:
        for s in SHAPES:
            texts += [q.format(shape=s, colour=c) for q in _QUESTIONS.values()]
            texts += [t.format(shape=s, colour=c) for t in _CONTEXTS.values()]
    words = {w for t in texts for w in _TOKEN_RE.findall(t)}
    words |= set(COLOURS) | set(SHAPES) | {w.capitalize() for w in COLOURS + SHAPES}
    return sorted(words)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.33
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # pragma: no cover - guarded by generate_synthetic
        raise DataError(f"unknown shape {shape!r}; use one of {SHAPES}")


def _render(
    rng: np.random.Generator, shape: str, colour: str, size: int, noisy: bool
) -> Image.Image:
    """Draw one image: a coloured shape on a plain background; ``noisy`` lowers the contrast and adds
    strong Gaussian noise."""
    fill = COLOUR_RGB[colour]
    if noisy:
        fill = tuple(int(round(b + NOISY_CONTRAST * (c - b))) for c, b in zip(fill, BACKGROUND))  # type: ignore[assignment]
    r = float(rng.uniform(0.22, 0.36)) * size
    margin = r + 1
    cx = float(rng.uniform(margin, size - margin))
    cy = float(rng.uniform(margin, size - margin))
    im = Image.new("RGB", (size, size), BACKGROUND)
    _draw_shape(ImageDraw.Draw(im), shape, cx, cy, r, fill)
    if noisy:
        arr = np.asarray(im, dtype=np.float64) + rng.normal(0.0, NOISY_SIGMA, size=(size, size, 3))
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return im


def write_jsonl_lines(out: Path, lines: Sequence[str]) -> ConflictDataset:
    """Write ``out/data.jsonl`` atomically (a temporary file, then a rename) and load it back."""
    path = out / "data.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return load_jsonl(path)


def _balanced(rng: np.random.Generator, values: Sequence[Any], n: int) -> list[Any]:
    """``n`` items cycling through ``values`` (counts differ by at most one), shuffled."""
    items = [values[i % len(values)] for i in range(n)]
    order = rng.permutation(n)
    return [items[int(i)] for i in order]


def generate_synthetic(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    image_size: int = 64,
    paraphrases: Literal["train", "heldout", "all"] = "train",
    positions: Sequence[str] = ("before_image", "between", "after_question"),
    p_agreement: float = 0.15,
    p_noisy: float = 0.1,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
    attributes: Sequence[str] = ("colour", "shape"),
    constraint: bool = True,
    labels: bool = False,
) -> ConflictDataset:
    """Write a synthetic colour/shape conflict data set to ``out_dir`` and return it loaded.

    Each sample shows one coloured shape (PNG under ``out_dir/images``); the question asks its colour or
    its shape (``attributes``); the text context asserts a different value (conflict) or, for a share
    ``p_agreement`` of samples, the same one (``"conflict": false``). A share ``p_noisy`` of images is
    drawn with low contrast and strong noise. Targets, attributes and positions are balanced (counts differ
    by at most one); the agreement and noisy samples are ``round(p·n)`` drawn without replacement. The
    instruction is drawn from :data:`VISION_INSTRUCTIONS` / :data:`TEXT_INSTRUCTIONS` — ``paraphrases``
    ``"train"`` uses the non-held-out ones, ``"heldout"`` only the held-out ones, ``"all"`` every one —
    followed by :data:`FORMAT_CONSTRAINT` when ``constraint``; its position is set by a per-sample
    ``template`` from :data:`POSITION_TEMPLATES`. Per-sample extras: ``attribute``, ``position``,
    ``noisy``, ``instruction_index``, ``heldout``. ``labels``: also declare a label set in the header (the
    ``colours`` then the ``shapes``, of the attributes asked about) and give each sample its ``label``, the
    instruction-compliant answer, for the label-perturbation (attractors) step; the samples themselves are the
    same as without it. The same arguments give byte-identical files (with the same numpy, Pillow and zlib
    versions). Writes ``out_dir/data.jsonl``.
    """
    if n < 1:
        raise DataError(f"n must be at least 1, got {n}")
    if image_size < 8:
        raise DataError(f"image_size must be at least 8 pixels, got {image_size}")
    if paraphrases not in ("train", "heldout", "all"):
        raise DataError(f"paraphrases must be 'train', 'heldout' or 'all', got {paraphrases!r}")
    for name, p in (("p_agreement", p_agreement), ("p_noisy", p_noisy)):
        if not 0.0 <= p <= 1.0:
            raise DataError(f"{name} must be in [0, 1], got {p}")
    for name, given, known in (
        ("positions", positions, tuple(POSITION_TEMPLATES)),
        ("shapes", shapes, SHAPES),
        ("colours", colours, COLOURS),
        ("attributes", attributes, ("colour", "shape")),
    ):
        bad = [x for x in given if x not in known]
        if bad or not given or len(set(given)) != len(given):
            raise DataError(f"{name} must be distinct values from {known}, got {tuple(given)!r}")
    if len(shapes) < 2 and "shape" in attributes or len(colours) < 2 and "colour" in attributes:
        raise DataError("a conflict needs at least two shapes and two colours for the attributes asked about")

    def pool(instr: Sequence[Instruction]) -> list[tuple[int, Instruction]]:
        return [
            (i, x)
            for i, x in enumerate(instr)
            if paraphrases == "all" or x.heldout == (paraphrases == "heldout")
        ]

    pools = {"vision": pool(VISION_INSTRUCTIONS), "text": pool(TEXT_INSTRUCTIONS)}
    rng = np.random.default_rng(seed)
    targets = _balanced(rng, ["vision", "text"], n)
    attrs = _balanced(rng, list(attributes), n)
    poss = _balanced(rng, list(positions), n)
    agreement = set(int(i) for i in rng.choice(n, size=int(round(p_agreement * n)), replace=False))
    noisy_set = set(int(i) for i in rng.choice(n, size=int(round(p_noisy * n)), replace=False))

    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    label_set = ([*colours] if "colour" in attributes else []) + ([*shapes] if "shape" in attributes else [])
    header: dict[str, Any] = {
        "arbiter_dataset": FORMAT_VERSION,
        "generator": {
            "name": "arbiter.data.generate_synthetic",
            "n": n,
            "seed": seed,
            "image_size": image_size,
            "paraphrases": paraphrases,
            "positions": list(positions),
            "p_agreement": p_agreement,
            "p_noisy": p_noisy,
            "shapes": list(shapes),
            "colours": list(colours),
            "attributes": list(attributes),
            "constraint": constraint,
            **({"labels": True} if labels else {}),
        },
    }
    if labels:
        header["labels"] = label_set
    lines = [json.dumps(header)]
    for i in range(n):
        sid = f"syn-{i:0{width}d}"
        target, attribute, position = targets[i], attrs[i], poss[i]
        conflict = i not in agreement
        noisy = i in noisy_set
        shape = shapes[int(rng.integers(len(shapes)))]
        colour = colours[int(rng.integers(len(colours)))]
        if attribute == "colour":
            true_value = colour
            others = [c for c in colours if c != colour]
            text_value = others[int(rng.integers(len(others)))] if conflict else colour
            context = _CONTEXTS["colour"].format(shape=shape, colour=text_value)
            question = _QUESTIONS["colour"].format(shape=shape)
        else:
            true_value = shape
            others = [s for s in shapes if s != shape]
            text_value = others[int(rng.integers(len(others)))] if conflict else shape
            context = _CONTEXTS["shape"].format(colour=colour, shape=text_value)
            question = _QUESTIONS["shape"].format(colour=colour)
        k, instr = pools[target][int(rng.integers(len(pools[target])))]
        instruction = instr.text + (" " + FORMAT_CONSTRAINT if constraint else "")
        image = _render(rng, shape, colour, image_size, noisy)
        image.save(img_dir / f"{sid}.png", format="PNG")
        sample = ConflictSample(
            id=sid,
            context=context,
            instruction=instruction,
            question=question,
            target=target,
            answer_vision=true_value,
            answer_text=text_value,
            image=f"images/{sid}.png",
            conflict=conflict,
            template=POSITION_TEMPLATES[position],
            label=(true_value if target == "vision" else text_value) if labels else None,
            extra={
                "attribute": attribute,
                "position": position,
                "noisy": noisy,
                "instruction_index": k,
                "heldout": instr.heldout,
            },
        )
        lines.append(json.dumps(sample.to_dict(), ensure_ascii=False))
    return write_jsonl_lines(out, lines)
