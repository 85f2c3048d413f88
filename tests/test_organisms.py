"""The shipped model organisms: they load offline, follow the instruction and look at the image."""

from __future__ import annotations

import json

import pytest
import torch

from arbiter.data import ConflictDataset
from arbiter.organisms import ORGANISMS, available, evaluate, load

EXPECTED = {
    "llava_tiny": ("LlavaForConditionalGeneration", "LlavaProcessor"),
    "qwen2vl_tiny": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "llava_tiny_s0": ("LlavaForConditionalGeneration", "LlavaProcessor"),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_every_organism_is_shipped():
    assert set(EXPECTED) <= set(ORGANISMS)
    assert set(EXPECTED) <= set(available())


def test_unknown_organism():
    with pytest.raises(KeyError, match="unknown organism"):
        load("no_such_organism")


def test_training_grammar_keeps_heldout_paraphrases_out():
    from arbiter.organisms.instructions import all_sentences, canonical, heldout_canonical

    vision, text = all_sentences("vision"), all_sentences("text")
    banned = heldout_canonical()
    assert banned and vision and text
    assert not [s for s in vision + text if canonical(s) in banned]
    assert not set(vision) & set(text)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_organism_follows_instructions_and_looks_at_the_image(name):
    model, processor, ds = load(name)
    model_cls, proc_cls = EXPECTED[name]
    assert type(model).__name__ == model_cls
    assert type(processor).__name__ == proc_cls
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(ds, ConflictDataset) and len(ds) >= 64
    samples = list(ds)[:64]
    assert {s.target for s in samples} == {"vision", "text"}

    clean = evaluate(model, processor, ds, samples=samples)
    assert clean["vision"] >= 0.9, clean
    assert clean["text"] >= 0.9, clean
    assert clean["vision_pi"] >= 0.9 and clean["text_pi"] >= 0.9, clean

    knocked = evaluate(model, processor, ds, samples=samples, knockout=True)
    assert knocked["vision"] < 0.5, knocked
    # the text route does not need the image
    assert knocked["text"] >= 0.8, knocked


@pytest.mark.slow
def test_demo_diagnoses_the_shipped_organism(tmp_path):
    from arbiter.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--limit", "8", "--random-draws", "2", "--no-generate",
               "--skip", "keyspace,surrogate", "--modality-limit", "4"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["class"] == "LlavaForConditionalGeneration"
    assert rep["n_samples"] == 8
    assert rep["knockout_window"] == 3
    assert 0.0 <= rep["mfr"]["overall"] <= 1.0
    assert len(rep["ldar"]) == rep["model"]["n_layers"] == 6
    assert len(rep["heads"]["ranking"]) == 6 * rep["model"]["n_heads"]
    assert {e["center"] for e in rep["knockout"]} == set(range(6))
    assert abs(sum(rep["shapley"]["mean"].values()) - (rep["shapley"]["v_full_mean"] - rep["shapley"]["v_empty_mean"])) < 1e-4
    for name in ("report.md", "report.html"):
        assert (out / name).stat().st_size > 0


def test_wilson_interval_hand_values():
    from arbiter.organisms.heldout import wilson

    # (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.96
    assert wilson(50, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert wilson(0, 0) is None


@pytest.mark.slow
def test_heldout_eval_splits_by_paraphrase_and_image():
    from arbiter.organisms.heldout import heldout_eval

    model, processor, _ = load("llava_tiny")
    res = heldout_eval(model, processor, image_size=56, n=40, seed=5, p_noisy=0.25)
    for split in ("train_paraphrases", "heldout_paraphrases"):
        r = res[split]
        assert r["n"] == 40 and set(r["by_image"]) == {"clean", "noisy"}
        n = r["n_vision_conflict"]
        assert r["by_image"]["clean"]["n_vision_conflict"] + r["by_image"]["noisy"]["n_vision_conflict"] == n
        lo, hi = r["vision_conflict_ci95"]
        assert lo <= r["vision_conflict"] <= hi
        assert res[split + "_knockout"]["vision_conflict"] < r["vision_conflict"]
