"""The omni emotion organism: the synthetic six-emotion generator (deterministic, balanced, informative faces and
voices), the training script end to end on toy sizes, and (when shipped) the trained organism itself."""

from __future__ import annotations

import hashlib
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arbiter.data import ConflictDataset
from arbiter.errors import DataError
from arbiter.experiments.attractors import CREMA_D_LABELS
from arbiter.organisms import ORGANISMS, available, load_dir
from arbiter.organisms.emotion import (
    AUDIO_CLOSE,
    IMAGE_CLOSE,
    LABELS,
    QUESTION,
    TEMPLATE,
    EmotionTask,
    face_features,
    generate_emotions,
    voice_features,
)

NAME = "omni_emotion_tiny"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def emo(tmp_path_factory):
    return generate_emotions(tmp_path_factory.mktemp("emo") / "d", 240, seed=5)


# ----------------------------------------------------------------------------------------------- the generator


def test_generator_is_deterministic(tmp_path):
    a = generate_emotions(tmp_path / "a", 18, seed=3)
    b = generate_emotions(tmp_path / "b", 18, seed=3)
    generate_emotions(tmp_path / "c", 18, seed=4)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db and len(da) == 1 + 18 + 18                   # data.jsonl + PNGs + WAVs, byte-identical
    assert da != dc
    assert [s.label for s in a] == [s.label for s in b]


@pytest.mark.slow
def test_generator_format_header_and_balance(emo):
    assert isinstance(emo, ConflictDataset) and len(emo) == 240
    assert emo.labels == list(LABELS) == list(CREMA_D_LABELS)
    assert emo.template == TEMPLATE and "{audio}" in emo.template and "{image}" in emo.template
    header = json.loads(Path(emo.path).read_text().splitlines()[0])
    assert header["arbiter_dataset"] == 1 and header["labels"] == list(LABELS)
    assert EmotionTask.from_meta(emo.meta) == EmotionTask()
    counts = {lab: sum(s.label == lab for s in emo) for lab in LABELS}
    assert set(counts.values()) == {40}
    s = emo[0]
    assert s.question == QUESTION and s.context == "" and s.instruction == "" and not s.conflict
    assert s.answer_vision == s.answer_text == s.label
    assert Path(s.image).suffix == ".png" and Path(s.audio).suffix == ".wav"
    assert Image.open(s.image).size == (56, 56)
    with wave.open(str(s.audio)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (8000, 1, 2, 4000)
    assert set(s.extra) >= {"face", "voice"}


def test_task_settings_and_bayes_reference():
    t = EmotionTask()
    acc = t.bayes_accuracy(n=6000)
    # unequal reliability: the face is the more reliable modality, each alone leaves its close pairs ambiguous
    assert acc["all"] > 0.97 and 0.7 < acc["image_only"] < 0.95 and 0.6 < acc["audio_only"] < acc["image_only"]
    noisy = EmotionTask(audio_noise=1.0).bayes_accuracy(n=6000)
    assert noisy["audio_only"] < acc["audio_only"] - 0.2
    pf, pv = t.prototypes()
    d = lambda P, a, b: float(np.linalg.norm(P[LABELS.index(a)] - P[LABELS.index(b)]))
    for a, b in IMAGE_CLOSE:
        assert d(pf, a, b) == pytest.approx(t.image_gap) and d(pv, a, b) > 1.5
    for a, b in AUDIO_CLOSE:
        assert d(pv, a, b) == pytest.approx(t.audio_gap) and d(pf, a, b) > 1.0
    with pytest.raises(DataError):
        EmotionTask(image_noise=0)


def test_fallback_is_the_best_offered_label(emo):
    t = EmotionTask.from_meta(emo.meta)
    s = next(x for x in emo if x.label == "angry")
    lp = t.log_posterior(s)
    assert lp.shape == (6,) and np.isclose(np.exp(lp).sum(), 1.0)
    offered = ["happy", "neutral", "disgust"]
    for mods in (("image", "audio"), ("image",), ("audio",)):
        got = t.fallback(s, offered, mods)
        post = t.log_posterior(s, modalities=mods)
        assert got == max(offered, key=lambda x: post[LABELS.index(x)])
    # the close pairs drive the fallbacks: without "angry", an angry face falls back to disgust mostly,
    # an angry voice to happy mostly
    angry = [x for x in emo if x.label == "angry"]
    rest = [x for x in LABELS if x != "angry"]
    img = [t.fallback(x, rest, ("image",)) for x in angry]
    aud = [t.fallback(x, rest, ("audio",)) for x in angry]
    assert img.count("disgust") > len(angry) / 2 and aud.count("happy") > len(angry) / 2
    # the training script's other rule: a fixed prototype similarity per condition
    from arbiter.organisms.train_omni import similarity_fallback

    a = LABELS.index("angry")
    assert similarity_fallback(t, a, rest, ("image",)) == "disgust"
    assert similarity_fallback(t, a, rest, ("audio",)) == "happy"
    assert similarity_fallback(t, a, ["neutral", "sad", "fear"], ("image",)) == "neutral"


def _ridge_accuracy(X: np.ndarray, y: np.ndarray, n_train: int, lam: float = 1.0) -> float:
    Xc = np.c_[X, np.ones(len(X))]
    Y = np.eye(6)[y]
    W = np.linalg.solve(Xc[:n_train].T @ Xc[:n_train] + lam * np.eye(Xc.shape[1]), Xc[:n_train].T @ Y[:n_train])
    return float(((Xc[n_train:] @ W).argmax(1) == y[n_train:]).mean())


def test_rendered_face_and_voice_carry_the_label(emo):
    from scipy.io import wavfile

    y = np.array([LABELS.index(s.label) for s in emo])
    # faces: a linear read-out of the (2x downsampled) grey pixels separates the six labels well above chance
    pix = np.stack([np.asarray(Image.open(s.image).convert("L"), dtype=np.float64)[::2, ::2].ravel() / 255
                    for s in emo])
    assert _ridge_accuracy(pix, y, 160) > 0.35                   # chance: 1/6
    # voices: loudness (log RMS) and pitch (spectral peak) follow the latent features, and separate the labels

    def voice(s):
        sr, w = wavfile.read(s.audio)
        w = w / 32768.0
        spec = np.abs(np.fft.rfft(w * np.hanning(len(w))))
        f = np.fft.rfftfreq(len(w), 1 / sr)
        band = (f > 80) & (f < 700)
        return [np.log(np.sqrt((w ** 2).mean())), np.log(f[band][spec[band].argmax()])]

    acoustic = np.array([voice(s) for s in emo])
    latent = np.stack([voice_features(s) for s in emo])
    assert np.corrcoef(acoustic[:, 0], latent[:, 2])[0, 1] > 0.9     # loudness
    assert np.corrcoef(acoustic[:, 1], latent[:, 0])[0, 1] > 0.9     # pitch
    assert _ridge_accuracy(acoustic, y, 160) > 0.35
    # the latent features are the label's prototype plus noise of the modality's level
    t = EmotionTask.from_meta(emo.meta)
    pf, pv = t.prototypes()
    face = np.stack([face_features(s) for s in emo])
    assert abs(float((face - pf[y]).std()) - t.image_noise) < 0.05
    assert abs(float((latent - pv[y]).std()) - t.audio_noise) < 0.05


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_script_end_to_end(tmp_path):
    from arbiter.organisms.train_omni import main

    out = tmp_path / "org"
    with torch.random.fork_rng(devices=[]):          # main() seeds torch's global generator
        log = main(["--out", str(out), "--n-pool", "24", "--tower-steps", "2", "--steps", "3", "--batch", "4",
                    "--n-data", "6", "--n-eval", "6", "--perturb-subsets", "2", "--log-every", "1",
                    "--size", "hidden=32", "--size", "intermediate=64", "--size", "vision_hidden=16",
                    "--size", "audio_hidden=16"])
    assert log["pipeline_check_max_abs_diff"] < 1e-4
    assert log["eval"]["scorer_check_max_abs_diff"] < 1e-6
    assert set(log["eval"]["accuracy"]["shipped"]) == {"all", "image_only", "audio_only"}
    assert len(log["log_stage_b"]) == 3
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["architecture"] == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert saved["sizes"]["layers"] >= 6
    model, processor, ds = load_dir(out)
    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5OmniProcessor"
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training
    assert isinstance(ds, ConflictDataset) and len(ds) == 6 and ds.labels == list(LABELS)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert list((out / "data" / "audio").glob("*.wav")) and list(out.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------- the shipped one


def check_trained(model, processor, ds) -> None:
    """What a trained emotion organism must show (used on the shipped one)."""
    import arbiter
    from arbiter.experiments.attractors import label_perturbation
    from arbiter.organisms.train_omni import CachedScorer, preload

    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert len(ds) >= 100 and ds.labels == list(LABELS)
    with arbiter.attach(model, processor) as lens:                # the public path, both modalities present
        clean = label_perturbation(lens, ds, sizes=(0,), conditions=["all"], batch_size=64)
    assert clean.accuracy("all") >= 0.8
    # label perturbation with the training script's cached-feature scorer (equal to the lens path, see
    # test_training_script_end_to_end, and ~20x faster: no 30 s Whisper padding per prompt)
    few = ds[:60]
    r = label_perturbation(None, preload(few, processor), max_subsets=6, seed=0, batch_size=128, dataset=few,
                           scorer=CachedScorer(model, processor, few))
    for c in r.conditions:
        assert any(e["shown"] and e["weight"] >= 0.02 for e in r.edges(c)), c

    def close_mass(cond, pairs):
        w = r.graph(cond)["weights"]
        return sum(float(w[LABELS.index(a), LABELS.index(b)] + w[LABELS.index(b), LABELS.index(a)]) for a, b in pairs)

    # the attractors follow the modality present: visually close labels swap more when only the face is seen,
    # acoustically close ones when only the voice is heard
    assert close_mass("image_only", IMAGE_CLOSE) > close_mass("audio_only", IMAGE_CLOSE) + 0.1
    assert close_mass("audio_only", AUDIO_CLOSE) > close_mass("image_only", AUDIO_CLOSE) + 0.1


@pytest.mark.skipif(NAME not in available(), reason=f"{NAME} is not shipped (train it with "
                    "python -m arbiter.organisms.train_omni)")
@pytest.mark.slow
def test_shipped_organism_accuracy_and_attractors():
    from arbiter.organisms import load

    assert NAME in ORGANISMS
    check_trained(*load(NAME))
