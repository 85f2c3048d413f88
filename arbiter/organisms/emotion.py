"""A deterministic synthetic six-emotion task with a face image and a voice clip per sample, in the spirit of
[PB]'s CREMA-D experiment (docs/methods/shapley.md): the data of the ``omni_emotion_tiny`` organism.

Every sample has a label (one of :data:`LABELS`, the six CREMA-D emotions) and two independent pieces of
evidence drawn from it:

* a **face** (PNG, ``image_size`` px): a cartoon face whose mouth curvature (``mouth``: smile + / frown -),
  eyebrow tilt (``brow``: inner ends raised + / lowered -) and eye openness (``eyes``) encode the emotion;
* a **voice** (mono 16-bit WAV, ``sample_rate`` Hz, ``seconds`` long): a harmonic "utterance" whose pitch
  (``pitch``), pitch contour (``slope``: rising + / falling -), loudness (``loudness``) and syllable rate
  (``tempo``) encode the emotion.

The latent features of a sample are the label's prototype (:meth:`EmotionTask.prototypes`, normalised units)
plus Gaussian noise of standard deviation ``image_noise`` (face) / ``audio_noise`` (voice): the two modalities
have a controlled, unequal reliability (by default the face is the more reliable one). Nuisance factors that
carry no label information vary too: face position, size and skin tone, background colour, voice timbre,
syllable phase, vibrato and background hiss.

**Close labels.** Two pairs are visually close (they differ in the face by ``image_gap`` along one feature
only): angry ~ disgust (eye openness) and sad ~ fear (eye openness). Two other pairs are acoustically close
(``audio_gap`` along one feature): happy ~ angry (loudness; both high arousal) and sad ~ neutral (pitch; both
low arousal). So each modality alone leaves two pairs ambiguous and the other modality resolves them; the
neutral face and the low-arousal voices sit in the middle of their feature spaces.

Because the class-conditional densities are known, :meth:`EmotionTask.log_posterior` gives the exact Bayes
posterior of a sample's label from its stored latent features, for any subset of the modalities (a
neutralised modality carries no evidence); :meth:`EmotionTask.fallback` is the label a Bayes-optimal
classifier answers when only some labels are offered. The training script of the organism uses it as the
target when the true label is removed from the prompt (:mod:`arbiter.organisms.train_omni`).

:func:`generate_emotions` writes a docs/methods/conflict-samples.md data file: the header ``{"arbiter_dataset": 1, "template":
..., "labels": [...], "generator": {...}}``, then one classification sample per line (``label``, empty
context and instruction, the question :data:`QUESTION`, ``image`` and ``audio`` paths, and the latent features
in the extra fields ``face`` / ``voice``). The same arguments give byte-identical files (same numpy, Pillow
and zlib versions).

Example::

    from arbiter.organisms.emotion import EmotionTask, generate_emotions
    ds = generate_emotions("emo", 120, seed=3)            # emo/data.jsonl, emo/images/*.png, emo/audio/*.wav
    task = EmotionTask.from_meta(ds.meta)                 # the generator settings, from the header
    task.fallback(ds[0], offered=["neutral", "sad"], modalities=("image",))
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import wave
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from arbiter.data import (
    FORMAT_VERSION,
    ConflictDataset,
    ConflictSample,
    write_jsonl_lines,
)
from arbiter.errors import DataError

__all__ = [
    "AUDIO_CLOSE",
    "FACE_FEATURES",
    "IMAGE_CLOSE",
    "LABELS",
    "QUESTION",
    "TEMPLATE",
    "VOICE_FEATURES",
    "EmotionTask",
    "face_features",
    "generate_emotions",
    "voice_features",
]

LABELS: tuple[str, ...] = ("happy", "neutral", "sad", "angry", "disgust", "fear")
"""The six CREMA-D emotions, in docs/methods/shapley.md's order (= :data:`arbiter.experiments.attractors.CREMA_D_LABELS`)."""

QUESTION = "What is the emotion of the person?"
"""The question of every sample; the label options are appended by the prompt builder of the experiment
(:func:`arbiter.experiments.attractors.offered_sample`: " Answer with one of: happy, neutral, ...")."""

TEMPLATE = "<|im_start|>user\n{image}{audio}{question}<|im_end|>\n<|im_start|>assistant\n"
"""Default prompt template of the data file: one ChatML user turn (Qwen2.5-Omni's format, without the system
prompt), image then audio then the question, and the assistant turn's header. Literal text, so the prompt is
exactly the same for training and analysis."""

FACE_FEATURES: tuple[str, ...] = ("mouth", "brow", "eyes")
VOICE_FEATURES: tuple[str, ...] = ("pitch", "slope", "loudness", "tempo")
IMAGE_CLOSE: tuple[tuple[str, str], ...] = (("angry", "disgust"), ("sad", "fear"))
"""Label pairs whose faces differ by ``image_gap`` only."""
AUDIO_CLOSE: tuple[tuple[str, str], ...] = (("happy", "angry"), ("sad", "neutral"))
"""Label pairs whose voices differ by ``audio_gap`` only."""

_SKIN = ((241, 200, 165), (224, 172, 130), (198, 134, 96), (141, 85, 54), (250, 214, 190))


@dataclasses.dataclass(frozen=True)
class EmotionTask:
    """Settings of the synthetic emotion task (all of them go into the data file's header).

    image_noise / audio_noise: standard deviation of the latent features around the label's prototype (the
    larger, the less reliable the modality). image_gap / audio_gap: distance between the prototypes of the
    visually / acoustically close pairs. pixel_noise: standard deviation of Gaussian pixel noise (grey levels,
    0 = none). image_size: side of the square face image (pixels). sample_rate / seconds: the voice clip.
    """

    image_noise: float = 0.25
    audio_noise: float = 0.35
    image_gap: float = 0.4
    audio_gap: float = 0.45
    pixel_noise: float = 0.0
    image_size: int = 56
    sample_rate: int = 8000
    seconds: float = 0.5

    def __post_init__(self) -> None:
        for name in ("image_noise", "audio_noise"):
            if not getattr(self, name) > 0:
                raise DataError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("image_gap", "audio_gap", "pixel_noise"):
            if getattr(self, name) < 0:
                raise DataError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_size < 28:
            raise DataError(f"image_size must be at least 28 pixels, got {self.image_size}")
        if self.sample_rate < 4000 or self.seconds < 0.1:
            raise DataError(f"the voice needs sample_rate >= 4000 and seconds >= 0.1, got {self.sample_rate}, "
                            f"{self.seconds}")

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> EmotionTask:
        """The task a data file was generated with (its header's ``generator`` entry, or that entry itself)."""
        g = meta.get("generator", meta)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in g.items() if k in names})

    # ------------------------------------------------------------------ the label model

    def prototypes(self) -> tuple[np.ndarray, np.ndarray]:
        """Class means ``(face [6, 3], voice [6, 4])`` in :data:`LABELS` order (normalised units)."""
        gi, ga = self.image_gap / 2, self.audio_gap / 2
        face = {  # mouth, brow, eyes
            "happy": (1.0, 0.0, 0.0),
            "neutral": (0.0, 0.0, 0.0),
            "sad": (-0.9, 0.9, -gi),
            "fear": (-0.9, 0.9, +gi),
            "angry": (-0.6, -0.9, +gi),
            "disgust": (-0.6, -0.9, -gi),
        }
        high, low = np.array([0.7, 0.5, 0.7, 0.7]), np.array([-0.3, -0.2, -0.3, -0.4])
        voice = {  # pitch, slope, loudness, tempo
            "happy": high - [0, 0, ga, 0],
            "angry": high + [0, 0, ga, 0],
            "neutral": low + [ga, 0, 0, 0],
            "sad": low - [ga, 0, 0, 0],
            "disgust": (-0.8, -0.7, 0.1, -0.9),
            "fear": (0.9, -0.6, -0.7, 0.9),
        }
        return (np.array([face[k] for k in LABELS], dtype=np.float64),
                np.array([voice[k] for k in LABELS], dtype=np.float64))

    def draw(self, rng: np.random.Generator, label: str) -> tuple[np.ndarray, np.ndarray]:
        """Latent features of one sample of ``label``: prototype + noise, rounded to 4 decimals."""
        face, voice = self.prototypes()
        j = LABELS.index(label)
        f = face[j] + self.image_noise * rng.standard_normal(len(FACE_FEATURES))
        v = voice[j] + self.audio_noise * rng.standard_normal(len(VOICE_FEATURES))
        return np.round(f, 4), np.round(v, 4)

    def log_likelihood(self, face: Any, voice: Any, modalities: Sequence[str] = ("image", "audio")) -> np.ndarray:
        """log p(evidence | label) per label [6] (up to a constant), from the modalities listed; a modality not
        listed (neutralised) contributes nothing. ``face`` / ``voice``: feature vectors or dicts."""
        pf, pv = self.prototypes()
        out = np.zeros(len(LABELS))
        if "image" in modalities:
            f = _vec(face, FACE_FEATURES)
            out -= ((f[None] - pf) ** 2).sum(1) / (2 * self.image_noise ** 2)
        if "audio" in modalities:
            v = _vec(voice, VOICE_FEATURES)
            out -= ((v[None] - pv) ** 2).sum(1) / (2 * self.audio_noise ** 2)
        return out

    def log_posterior(self, sample_or_face: Any, voice: Any = None,
                      modalities: Sequence[str] = ("image", "audio")) -> np.ndarray:
        """Bayes posterior log p(label | evidence) [6] under a uniform prior: from a sample (its ``face`` /
        ``voice`` extras) or from feature vectors."""
        face, voice = _features(sample_or_face, voice)
        ll = self.log_likelihood(face, voice, modalities)
        return ll - np.logaddexp.reduce(ll)

    def fallback(self, sample_or_face: Any, offered: Sequence[str], modalities: Sequence[str] = ("image", "audio"),
                 voice: Any = None) -> str:
        """The offered label with the highest posterior given the listed modalities (ties: the earlier label):
        what a Bayes-optimal classifier answers when only ``offered`` may be said."""
        lp = self.log_posterior(sample_or_face, voice, modalities)
        idx = [LABELS.index(x) for x in offered]
        if not idx:
            raise DataError("no label offered")
        return LABELS[max(idx, key=lambda j: (lp[j], -j))]

    def bayes_accuracy(self, n: int = 20000, seed: int = 0) -> dict[str, float]:
        """Accuracy of the Bayes classifier (all six labels offered), per condition, by Monte Carlo."""
        rng = np.random.default_rng(seed)
        pf, pv = self.prototypes()
        y = np.arange(n) % len(LABELS)
        f = pf[y] + self.image_noise * rng.standard_normal((n, pf.shape[1]))
        v = pv[y] + self.audio_noise * rng.standard_normal((n, pv.shape[1]))
        lf = -((f[:, None] - pf[None]) ** 2).sum(-1) / (2 * self.image_noise ** 2)
        lv = -((v[:, None] - pv[None]) ** 2).sum(-1) / (2 * self.audio_noise ** 2)
        return {c: float(((ll).argmax(1) == y).mean()) for c, ll in
                (("all", lf + lv), ("image_only", lf), ("audio_only", lv))}

    # ------------------------------------------------------------------ rendering

    def render_face(self, face: Any, rng: np.random.Generator) -> Image.Image:
        """The face image of latent features ``face`` (nuisance factors drawn from ``rng``): drawn at 4x and
        box-filtered down, so that sub-pixel differences of the features survive as grey levels."""
        mouth, brow, eyes = (float(np.clip(x, -1.8, 1.8)) for x in _vec(face, FACE_FEATURES))
        size, k = self.image_size, 4
        s = size / 56.0 * k  # drawing scale: units are pixels of a 56-px image
        bg = tuple(int(x) for x in rng.integers(150, 236, size=3))
        skin = np.array(_SKIN[int(rng.integers(len(_SKIN)))]) + rng.integers(-12, 13, size=3)
        skin = tuple(int(x) for x in np.clip(skin, 0, 255))
        cx = (size / 2 + rng.uniform(-2.0, 2.0)) * k
        cy = (size / 2 + rng.uniform(-1.5, 1.5)) * k
        rx, ry = rng.uniform(18.0, 21.0) * s, rng.uniform(21.0, 24.0) * s
        im = Image.new("RGB", (size * k, size * k), bg)
        d = ImageDraw.Draw(im)
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin)
        dark = (35, 25, 25)
        ye = cy - 0.22 * ry
        for side in (-1, 1):
            ex = cx + side * 0.4 * rx
            hw, hh = 3.4 * s, max(0.35, 1.7 + 1.4 * eyes) * s
            d.ellipse([ex - hw, ye - hh, ex + hw, ye + hh], fill=dark)
            yb = ye - 5.5 * s
            inner = (cx + side * 2.5 * s, yb - 2.6 * brow * s)
            outer = (cx + side * 11.0 * s, yb + 1.2 * brow * s)
            d.line([inner, outer], fill=dark, width=round(2.0 * s))
        ym, hwm = cy + 0.45 * ry, 8.0 * s
        pts = [(cx + hwm * x, ym + 3.6 * mouth * s * (0.5 - x * x)) for x in np.linspace(-1, 1, 13)]
        d.line(pts, fill=(120, 20, 30), width=round(2.0 * s), joint="curve")
        im = im.resize((size, size), Image.Resampling.BOX)
        if self.pixel_noise > 0:
            arr = np.asarray(im, dtype=np.float64) + rng.normal(0.0, self.pixel_noise, size=(size, size, 3))
            im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        return im

    def render_voice(self, voice: Any, rng: np.random.Generator) -> np.ndarray:
        """The voice clip of latent features ``voice`` (nuisance factors from ``rng``), int16 samples."""
        pitch, slope, loud, tempo = (float(np.clip(x, -2.0, 2.0)) for x in _vec(voice, VOICE_FEATURES))
        sr = self.sample_rate
        n = round(sr * self.seconds)
        t = np.arange(n) / sr
        u = t / self.seconds - 0.5
        vib_rate, vib_depth = rng.uniform(4.0, 7.0), rng.uniform(0.0, 0.02)
        logf = math.log2(200.0) + 0.7 * pitch + 0.6 * slope * u + vib_depth * np.sin(2 * np.pi * vib_rate * t)
        f0 = 2.0 ** logf
        phase = 2 * np.pi * np.cumsum(f0) / sr
        tilt = rng.uniform(0.8, 1.6)
        wav = np.zeros(n)
        for h in range(1, 6):
            ok = f0 * h < 0.45 * sr  # below Nyquist
            wav += ok * h ** (-tilt) * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
        wav /= sum(h ** (-tilt) for h in range(1, 6))
        rate = 4.0 * 2.0 ** (0.8 * tempo)  # syllables per second
        env = np.sin(np.pi * rate * t + rng.uniform(0, np.pi)) ** 2
        fade = np.minimum(1.0, np.minimum(t, self.seconds - t) / 0.01)
        amp = 0.25 * 2.0 ** (0.9 * loud)
        wav = amp * env * fade * wav + rng.uniform(0.002, 0.01) * rng.standard_normal(n)
        return np.round(np.clip(wav, -0.99, 0.99) * 32767).astype(np.int16)

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _vec(x: Any, names: Sequence[str]) -> np.ndarray:
    if isinstance(x, Mapping):
        return np.array([float(x[k]) for k in names], dtype=np.float64)
    return np.asarray(x, dtype=np.float64).reshape(len(names))


def _features(sample_or_face: Any, voice: Any) -> tuple[Any, Any]:
    if isinstance(sample_or_face, ConflictSample):
        ex = sample_or_face.extra
        if "face" not in ex or "voice" not in ex:
            raise DataError(f"sample {sample_or_face.id!r} has no 'face' / 'voice' features (not a sample of "
                            "arbiter.organisms.emotion.generate_emotions)")
        return ex["face"], ex["voice"]
    return sample_or_face, voice


def face_features(sample: ConflictSample) -> np.ndarray:
    """The stored latent face features of a generated sample, [3] in :data:`FACE_FEATURES` order."""
    return _vec(_features(sample, None)[0], FACE_FEATURES)


def voice_features(sample: ConflictSample) -> np.ndarray:
    """The stored latent voice features of a generated sample, [4] in :data:`VOICE_FEATURES` order."""
    return _vec(_features(sample, None)[1], VOICE_FEATURES)


def _wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


def generate_emotions(out_dir: str | os.PathLike[str], n: int, seed: int = 0, task: EmotionTask | None = None,
                      template: str | None = TEMPLATE, question: str = QUESTION) -> ConflictDataset:
    """Write ``n`` samples of the synthetic emotion task to ``out_dir`` and return the data set, loaded.

    Labels are balanced (counts differ by at most one) and shuffled; per sample the latent features are drawn
    (:meth:`EmotionTask.draw`), then the face (``images/<id>.png``) and the voice (``audio/<id>.wav``) are
    rendered. Writes ``out_dir/data.jsonl`` with the header ``{"arbiter_dataset": 1, "template": template,
    "labels": LABELS, "generator": {...}}`` (``template=None``: no template, the default user turn).
    Byte-identical for the same arguments."""
    if n < 1:
        raise DataError(f"n must be at least 1, got {n}")
    task = task or EmotionTask()
    rng = np.random.default_rng(seed)
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    labels = [labels[int(i)] for i in rng.permutation(n)]
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {"arbiter_dataset": FORMAT_VERSION}
    if template is not None:
        header["template"] = template
    header["labels"] = list(LABELS)
    header["generator"] = {"name": "arbiter.organisms.emotion.generate_emotions", "n": n, "seed": seed,
                           **task.settings()}
    lines = [json.dumps(header)]
    width = max(5, len(str(n - 1)))
    for i, label in enumerate(labels):
        sid = f"emo-{i:0{width}d}"
        face, voice = task.draw(rng, label)
        task.render_face(face, rng).save(out / "images" / f"{sid}.png", format="PNG")
        (out / "audio" / f"{sid}.wav").write_bytes(_wav_bytes(task.render_voice(voice, rng), task.sample_rate))
        sample = ConflictSample(
            id=sid, context="", instruction="", question=question, target="vision",
            answer_vision=label, answer_text=label, image=f"images/{sid}.png", audio=f"audio/{sid}.wav",
            conflict=False, label=label,
            extra={"face": {k: float(x) for k, x in zip(FACE_FEATURES, face)},
                   "voice": {k: float(x) for k, x in zip(VOICE_FEATURES, voice)}},
        )
        lines.append(json.dumps(sample.to_dict(), ensure_ascii=False))
    return write_jsonl_lines(out, lines)
