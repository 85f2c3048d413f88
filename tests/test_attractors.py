"""Label perturbation and error attractors (SPEC 10): removal sets, hand-computed confusion / graph / hierarchy on
a stub scorer, the forced-error rule, the display threshold, label sets from data files, tiny omni and llava."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import _tiny
from PIL import Image

import arbiter
from arbiter.data import ConflictDataset, ConflictSample, load_jsonl
from arbiter.errors import DataError
from arbiter.experiments.attractors import (
    CREMA_D_LABELS,
    AttractorResult,
    attraction,
    error_graph,
    label_perturbation,
    label_token_ids,
    offered_sample,
    removal_subsets,
)
from arbiter.experiments.modality import neutral_sample

ABC = ["a", "b", "c"]


def _sample(sid, label, image=True, audio=True, question="Which letter?"):
    img = Image.new("RGB", (8, 8), (200, 30, 30)) if image else None
    wav = np.full(160, 0.25, dtype=np.float32) if audio else None
    return ConflictSample(sid, "", "", question, "vision", label, label, image=img, audio=wav, label=label)


class Stub:
    """Fixed label scores per (sample id, condition); records the rows it is asked about."""

    def __init__(self, table, labels=ABC):
        self.table, self.labels, self.rows = table, labels, []

    def __call__(self, rows):
        self.rows.extend(rows)
        return torch.tensor([self.table[(r.sample_id, r.condition)] for r in rows], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- removal sets


def test_removal_subsets_exhaustive_and_seeded_sample():
    full = removal_subsets(CREMA_D_LABELS)
    assert len(full) == sum(math.comb(6, k) for k in (1, 2, 3, 4)) == 56
    assert len(set(full)) == 56 and [len(s) for s in full] == sorted(len(s) for s in full)
    assert full[0] == ("happy",) and full[-1] == ("sad", "angry", "disgust", "fear")
    assert len(removal_subsets(CREMA_D_LABELS, sizes=(1,))) == 6
    a = removal_subsets(CREMA_D_LABELS, max_subsets=10, seed=3)
    assert a == removal_subsets(CREMA_D_LABELS, max_subsets=10, seed=3)       # reproducible
    assert len(a) == 10 and len(set(a)) == 10
    assert sorted(a, key=full.index) == a and set(a) <= set(full)             # enumeration order, a subset
    assert a != removal_subsets(CREMA_D_LABELS, max_subsets=10, seed=4)
    assert removal_subsets(CREMA_D_LABELS, max_subsets=100) == full
    assert removal_subsets(ABC, sizes=(0, 1)) == [(), ("a",), ("b",), ("c",)]
    with pytest.raises(DataError, match="at least"):
        removal_subsets(ABC, sizes=(3,))                                       # nothing would stay offered


def test_offered_sample_fills_placeholder_or_appends_options():
    s = _sample("x", "a", question="Pick one of {labels}!")
    assert offered_sample(s, ["a", "c"]).question == "Pick one of a, c!"
    t = _sample("y", "a")
    assert offered_sample(t, ["b"]).question == "Which letter? Answer with one of: b."
    assert t.question == "Which letter?"


# ----------------------------------------------------------------------------------------------- hand-computed


TABLE = {
    ("s1", "all"): [3.0, 2.0, 1.0], ("s2", "all"): [0.0, 2.0, 1.0],
    ("s1", "image_only"): [0.0, 0.0, 5.0], ("s2", "image_only"): [5.0, 0.0, 0.0],
    ("s1", "audio_only"): [3.0, 2.0, 1.0], ("s2", "audio_only"): [0.0, 2.0, 1.0],
}


@pytest.fixture(scope="module")
def stub_result():
    stub = Stub(TABLE)
    r = label_perturbation(None, [_sample("s1", "a"), _sample("s2", "b")], ABC, sizes=(1,), scorer=stub,
                           batch_size=4)
    return r, stub


def test_hand_computed_confusion_graph_and_hierarchy(stub_result):
    r, _ = stub_result
    assert list(r.conditions) == ["all", "image_only", "audio_only"]
    assert r.subsets == [("a",), ("b",), ("c",)]
    # "all": s1 (a) -> b, a, a ; s2 (b) -> b, c, b   (removed a, b, c in turn)
    assert r.predictions("all") == [["b", "a", "a"], ["b", "c", "b"]]
    assert r.confusion("all").tolist() == [[2, 1, 0], [0, 2, 1], [0, 0, 0]]
    assert r.fallback("all").tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 0]]
    g = r.graph("all")
    assert g["weights"].tolist() == [[0, 0.5, 0], [0, 0, 0.5], [0, 0, 0]]
    assert r.edges("all") == [{"source": "a", "target": "b", "count": 1, "weight": 0.5, "shown": True},
                              {"source": "b", "target": "c", "count": 1, "weight": 0.5, "shown": True}]
    # share: a 0/1, b 1/1, c 1/2 ; count: a 0, b 1, c 1 ; net: a -0.5, b 0, c +0.5
    assert r.attraction("all").tolist() == [0.0, 1.0, 0.5]
    assert [h["label"] for h in r.hierarchy("all")] == ["b", "c", "a"]
    assert r.attraction("all", "count").tolist() == [0.0, 1.0, 1.0]
    assert [h["label"] for h in r.hierarchy("all", "count")] == ["b", "c", "a"]
    assert r.attraction("all", "net").tolist() == [-0.5, 0.0, 0.5]
    assert [h["label"] for h in r.hierarchy("all", "net")] == ["c", "b", "a"]
    assert r.accuracy("all") == pytest.approx(4 / 6) and r.accuracy("all", offered_only=True) == 1.0
    # "image_only": s1 -> c, c, a (tie a=b: the earlier label) ; s2 -> b (tie b=c), a, a
    assert r.predictions("image_only") == [["c", "c", "a"], ["b", "a", "a"]]
    assert r.confusion("image_only").tolist() == [[1, 0, 2], [2, 1, 0], [0, 0, 0]]
    assert r.attraction("image_only").tolist() == pytest.approx([1.0, 0.0, 2 / 3])
    assert [h["label"] for h in r.hierarchy("image_only")] == ["a", "c", "b"]
    assert [h["label"] for h in r.hierarchy("image_only", "count")] == ["a", "c", "b"]
    assert [h["label"] for h in r.hierarchy("image_only", "net")] == ["c", "a", "b"]
    sim = r.similarity()
    assert sim["all"]["audio_only"] == pytest.approx(1.0) and sim["all"]["image_only"] == pytest.approx(0.0)


def test_rows_carry_offered_labels_and_neutral_inputs(stub_result):
    _, stub = stub_result
    assert len(stub.rows) == 3 * 2 * 3
    by = {(x.sample_id, x.condition, x.removed): x for x in stub.rows}
    row = by[("s1", "all", ("b",))]
    assert row.offered == ("a", "c") and row.sample.question == "Which letter? Answer with one of: a, c."
    assert row.sample.audio.any() and row.sample.image.getpixel((0, 0)) != (0, 0, 0)
    io, ao = by[("s1", "image_only", ("a",))], by[("s1", "audio_only", ("a",))]
    assert not io.sample.audio.any() and io.sample.image.getpixel((0, 0)) == (200, 30, 30)   # face only
    assert ao.sample.audio.any() and ao.sample.image.getpixel((0, 0)) == (0, 0, 0)          # voice only


@pytest.mark.slow
def test_to_dict_is_json_and_complete(stub_result, tmp_path):
    r, _ = stub_result
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["labels"] == ABC and d["n_subsets"] == 3 and d["true_labels"] == ["a", "b"]
    pc = d["per_condition"]["all"]
    assert pc["n_rows"] == 6 and pc["n_errors"] == 2 and pc["n_forced"] == 2
    assert pc["hierarchy"][0] == {"label": "b", "score": 1.0, "rank": 1}
    assert pc["attraction"]["net"] == {"a": -0.5, "b": 0.0, "c": 0.5}
    assert pc["accuracy_by_size"] == {"1": pytest.approx(4 / 6)}
    assert "label_logprobs" not in d and len(r.to_dict(scores=True)["label_logprobs"]) == 3
    fig = r.plot(tmp_path / "attractors.png")
    assert (tmp_path / "attractors.png").stat().st_size > 0
    edges = [p for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith("edge:")]
    assert sorted(p.get_gid() for p in edges) == sorted(["edge:a->b", "edge:b->c", "edge:a->c", "edge:b->a",
                                                        "edge:a->b", "edge:b->c"])


# ----------------------------------------------------------------------------------------------- SPEC rules


def test_removed_true_label_is_always_an_error_and_its_fallback_is_recorded():
    labels = list(CREMA_D_LABELS)
    samples = [_sample(f"s{k}", lab) for k, lab in enumerate(labels)]

    def truth_first(rows):  # the truth scores highest; then the label order
        return torch.tensor([[10.0 if lab == x.label else -float(j) for j, lab in enumerate(labels)] for x in rows])

    r = label_perturbation(None, samples, labels, players=[], scorer=truth_first)
    assert list(r.conditions) == ["all"] and len(r.subsets) == 56
    forced = r.forced_rows
    assert forced.sum(1).tolist() == [26] * 6                 # C(5,0)+C(5,1)+C(5,2)+C(5,3) sets remove the truth
    pred, true = r.predicted[0], r.true[:, None].expand(-1, 56)
    assert bool((pred[~forced] == true[~forced]).all()) and bool((pred[forced] != true[forced]).all())
    offered = r.offered
    assert all(bool(offered[p, pred[s, p]]) for s in range(6) for p in range(56))   # predictions are offered
    assert int(r.fallback().sum()) == 6 * 26 == int(r.confusion().sum() - r.confusion().trace())
    # fallback = the best offered label: the first label not removed, skipping the truth
    assert r.fallback()[0].tolist() == [0, 15, 7, 3, 1, 0]
    assert r.accuracy() == pytest.approx(30 / 56) and r.accuracy(offered_only=True) == 1.0
    ex = label_perturbation(None, samples, labels, players=[], scorer=truth_first, forced="exclude")
    assert bool((ex.predicted[0][forced] == -1).all()) and ex.accuracy() == 1.0
    assert ex.edges() == [] and all(math.isnan(h["score"]) for h in ex.hierarchy())
    assert ex.to_dict()["per_condition"]["all"]["predictions"][0][0] is None   # ("happy",) removed for s0


def test_display_threshold_hides_small_edges_but_keeps_them():
    conf = torch.tensor([[5, 97, 0], [0, 5, 1], [2, 0, 5]])
    g = error_graph(conf, 0.02)
    assert g["weights"][0, 1] == pytest.approx(0.97) and g["weights"][1, 2] == pytest.approx(0.01)
    assert g["shown"].tolist() == [[False, True, False], [False, False, False], [True, False, False]]  # 2% shown
    assert float(g["counts"].diagonal().abs().sum()) == 0.0                                            # no loops
    assert error_graph(conf, 0.0)["shown"].sum() == 3
    # the same counts through a result: 1% edge kept in the data, absent from the plot
    true = torch.tensor([0] * 102 + [1] * 6 + [2] * 7)
    pred = torch.tensor([0] * 5 + [1] * 97 + [1] * 5 + [2] + [0] * 2 + [2] * 5)
    r = AttractorResult(ABC, {"all": []}, [], [()], [str(i) for i in range(len(true))], true, pred[None, :, None],
                        torch.zeros(1, len(true), 1, 3, dtype=torch.float64))
    assert r.confusion().tolist() == conf.tolist()
    assert {(e["source"], e["target"], e["shown"]) for e in r.edges()} == {("a", "b", True), ("b", "c", False),
                                                                           ("c", "a", True)}
    fig = r.plot()
    gids = sorted(p.get_gid() for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith("edge:"))
    assert gids == ["edge:a->b", "edge:c->a"]


def test_attraction_share_counts_only_chances_where_the_label_was_offered():
    # one sample, truth a; two removal sets: {b} (offered a, c) -> predicted c (error), {} -> c (error)
    offered = torch.tensor([[True, False, True], [True, True, True]])
    s = attraction(torch.tensor([0]), torch.tensor([[2, 2]]), offered, 3, "share")
    assert s[2] == 1.0 and s[1] == 0.0 and math.isnan(float(s[0]))   # b had 1 chance (set {}), a none (truth)


# ----------------------------------------------------------------------------------------------- label sets


def test_label_set_is_required_and_checked(tmp_path):
    samples = [_sample("s1", "a"), _sample("s2", "b")]
    stub = Stub(TABLE)
    with pytest.raises(DataError, match="labels="):
        label_perturbation(None, samples, scorer=stub)
    with pytest.raises(DataError, match="not in the label set"):
        label_perturbation(None, samples, ["a", "c"], scorer=stub)
    with pytest.raises(DataError, match="no 'label'"):
        label_perturbation(None, [_sample("s1", "a"), ConflictSample("s3", "", "", "q", "vision", "a", "a")], ABC,
                           scorer=stub)
    # declared by the data set (SPEC 1 header "labels"), in memory and through a data file
    r = label_perturbation(None, ConflictDataset(samples, labels=ABC), sizes=(1,), players=["image"], scorer=stub,
                           conditions={"all": ["image"]})
    assert r.labels == ABC and r.predictions("all") == [["b", "a", "a"], ["b", "c", "b"]]
    Image.new("RGB", (8, 8)).save(tmp_path / "f.png")
    lines = [{"arbiter_dataset": 1, "labels": ABC, "template": "{image} {question}"}]
    lines += [{"id": sid, "context": "", "instruction": "", "question": "Which? {labels}", "target": "vision",
               "answer_vision": lab, "answer_text": lab, "conflict": False, "image": "f.png", "label": lab}
              for sid, lab in (("s1", "a"), ("s2", "b"))]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = load_jsonl(tmp_path / "d.jsonl")
    stub2 = Stub(TABLE)
    r2 = label_perturbation(None, ds, sizes=(1,), scorer=stub2)
    assert r2.labels == ABC and list(r2.conditions) == ["all"] and r2.players == ["image"]
    assert r2.predictions("all") == [["b", "a", "a"], ["b", "c", "b"]]
    assert stub2.rows[0].sample.question == "Which? b, c"


def test_label_token_ids_rules():
    tm = _tiny("llava")
    tok = tm.processor.tokenizer
    ids = label_token_ids(tm.processor, CREMA_D_LABELS)
    flat = [i for x in ids for i in x]
    assert all(ids) and len(flat) == len(set(flat))                       # each label has ids of its own
    space = label_token_ids(tm.processor, CREMA_D_LABELS, "space")
    assert space == [[tok.encode(" " + lab, add_special_tokens=False)[0]] for lab in CREMA_D_LABELS]
    assert all(s[0] in x for s, x in zip(space, ids))
    with pytest.raises(DataError, match="first token"):
        label_token_ids(tm.processor, ["red", "red circle"], "space")
    with pytest.raises(DataError, match="no first-token id of their own"):
        label_token_ids(tm.processor, ["red", "red circle"])


# ----------------------------------------------------------------------------------------------- tiny models


def test_tiny_omni_image_and_audio_conditions():
    tm = _tiny("qwen2_5_omni")
    labels = list(CREMA_D_LABELS)
    samples = [ConflictSample(f"s{i}", "", "", "What is the emotion of the person?", "vision", labels[i],
                              labels[i], image=tm.make_image(i), audio=tm.make_audio(i), label=labels[i])
               for i in range(2)]
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = label_perturbation(lens, samples, labels, max_subsets=2, seed=1, batch_size=12)
        # one row again, unbatched and by hand: same label log-probabilities
        c, s, p = 2, 1, 1                                                   # audio_only, s1, second removal set
        offered = [lab for lab in labels if lab not in r.subsets[p]]
        row = offered_sample(neutral_sample(samples[s], ["image"]), offered)
        batch = lens.encode([row])
        with torch.no_grad():
            z = torch.log_softmax(lens.model(**batch.inputs).logits[0, -1].double(), -1)
    ids = label_token_ids(tm.processor, labels)
    direct = torch.stack([torch.logsumexp(z[x], 0) for x in ids])
    assert torch.allclose(r.label_logprobs[c, s, p], direct, atol=1e-5)
    assert list(r.conditions) == ["all", "image_only", "audio_only"] and r.players == ["image", "audio"]
    assert torch.isfinite(r.label_logprobs).all() and bool((r.predicted >= 0).all())
    assert (r.label_logprobs[0] - r.label_logprobs[1]).abs().max() > 1e-6   # silencing the audio changes the answer
    assert (r.label_logprobs[0] - r.label_logprobs[2]).abs().max() > 1e-6   # blanking the image too
    d = r.to_dict(scores=True)
    json.dumps(d, allow_nan=False)
    for cond in r.conditions:
        pc = d["per_condition"][cond]
        assert pc["n_rows"] == 4 and sum(map(sum, pc["confusion"])) == 4
        assert {"edges", "hierarchy", "attraction", "fallback", "accuracy", "predictions"} <= set(pc)
        assert len(pc["hierarchy"]) == 6
    assert d["settings"]["exhaustive"] is False and d["n_subsets"] == 2
    for k in range(3):   # the prediction is the best offered label
        best = r.label_logprobs[k].masked_fill(~r.offered[None], -math.inf).argmax(-1)
        assert torch.equal(best, r.predicted[k])


def test_tiny_llava_image_and_context():
    tm = _tiny("llava")
    labels = ["red", "green", "blue", "yellow"]
    samples = [ConflictSample("s0", "The shape is red.", "", "What colour is the shape? {labels}", "vision", "red",
                              "red", image=tm.make_image(0), label="red")]
    with arbiter.attach(tm.model, tm.processor) as lens:
        r = label_perturbation(lens, samples, labels, sizes=(1, 2), max_subsets=2)
    assert list(r.conditions) == ["all", "image_only", "context_only"]
    assert r.predicted.shape == (3, 1, 2) and bool((r.predicted >= 0).all())
    assert all(bool(r.offered[p, r.predicted[c, 0, p]]) for c in range(3) for p in range(2))
    assert torch.isfinite(r.label_logprobs).all()


# ----------------------------------------------------------------------------------------------- in diagnose

DIAG_FAST = {"limit": 4, "window": 3, "n_random": 2, "alphas": (2.0,), "batch_size": 8, "generate": False,
             "progress": False, "head_methods": ("exhaustive",), "keyspace_max_n": 200, "keyspace_permutations": 10,
             "modality_limit": 2}


def _labelled_file(tmp_path, tm, labels, n=6, n_conflict=2, header=True):
    """A classification data file (labels header): n samples, the first n_conflict of them conflict samples."""
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = [{"arbiter_dataset": 1, "labels": labels}] if header else []
    for i in range(n):
        lab, other = labels[i % len(labels)], labels[(i + 1) % len(labels)]
        tm.make_image(i).save(tmp_path / "img" / f"{i}.png")
        conflict = i < n_conflict
        lines.append({"id": f"c{i}", "context": f"The shape is {other if conflict else lab}.",
                      "instruction": "Look at the image." if conflict else "", "question": "What colour is the shape?",
                      "target": "vision", "answer_vision": lab, "answer_text": other if conflict else lab,
                      "conflict": conflict, "image": f"img/{i}.png", "label": lab})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return load_jsonl(path)


@pytest.mark.slow
def test_diagnose_runs_the_attractors_step_when_the_data_declares_labels(tmp_path):
    from arbiter.experiments.diagnose import attractor_samples, diagnose
    from arbiter.report import markdown, write

    tm = _tiny("llava")
    labels = ["red", "green", "blue", "yellow"]
    ds = _labelled_file(tmp_path, tm, labels)
    logs = []
    rep = diagnose(tm.model, tm.processor, ds, tmp_path / "out", log=logs.append, attractor_limit=5,
                   attractor_subsets=3, **DIAG_FAST)
    assert rep["n_samples"] == 2 and "skipped" not in rep["mfr"]          # the conflict steps ran as before
    at = rep["attractors"]
    json.dumps(rep, allow_nan=False)
    assert "label_logprobs" not in at and at["labels"] == labels
    # round-robin over the labels, conflict samples included; 4 labels: removal sets of 1-3 labels
    assert at["sample_ids"] == ["c0", "c1", "c2", "c3", "c4"] == [s.id for s in attractor_samples(ds, labels, 5)]
    assert at["n_subsets"] == 3 and all(1 <= len(s) <= 3 for s in at["subsets"])
    assert at["settings"]["sizes"] == [1, 2, 3] and rep["settings"]["n_attractor_samples"] == 5
    assert list(at["conditions"]) == list(at["summary"]) == ["all", "image_only", "context_only"]
    for c, sm in at["summary"].items():
        pc = at["per_condition"][c]
        conf = torch.tensor(pc["confusion"])
        assert int(conf.sum()) == 5 * 3 == sm["n_rows"] == pc["n_rows"]                 # samples x subsets
        assert sm["n_errors"] == int(conf.sum() - conf.trace())
        assert sm["accuracy"] == pytest.approx(float(conf.trace()) / 15)
        assert sorted(sm["hierarchy"]) == sorted(labels) and sm["hierarchy"] == [h["label"] for h in pc["hierarchy"]]
        shown = [e for e in pc["edges"] if e["shown"]]
        assert len(sm["top_edges"]) == min(5, len(shown))
        assert [e["weight"] for e in sm["top_edges"]] == sorted((e["weight"] for e in shown), reverse=True)[:5]
        assert all(e["weight"] >= at["threshold"] for e in sm["top_edges"])
        assert sum(e["count"] for e in pc["edges"]) == sm["n_errors"]
    paths = write(rep, tmp_path / "out")
    assert paths["attractors"].stat().st_size > 0 and paths["mam_ldar"].exists()
    md = markdown(rep)
    assert "## Label attractors" in md and "- context_only (context kept): accuracy" in md
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Label attractors" in html and 'alt="label attractors"' in html
    logs.clear()  # resumed; a new cap reruns only this step; skip= names it
    again = diagnose(tm.model, tm.processor, ds, tmp_path / "out", log=logs.append, attractor_limit=5,
                     attractor_subsets=3, **DIAG_FAST)
    assert any("attractors: done earlier" in x for x in logs) and again["attractors"] == at
    logs.clear()
    other = diagnose(tm.model, tm.processor, ds, tmp_path / "out", log=logs.append, attractor_limit=4,
                     attractor_subsets=1, skip="keyspace", **DIAG_FAST)
    assert any(x.startswith("[arbiter] attractors:") and "done earlier" not in x for x in logs)
    assert all("done earlier" in x for x in logs if x.startswith("[arbiter] baseline"))
    assert other["attractors"]["summary"]["all"]["n_rows"] == 4 * 1
    off = diagnose(tm.model, tm.processor, ds, tmp_path / "out", log=logs.append, skip="attractors", **DIAG_FAST)
    assert "skip" in off["attractors"]["skipped"] and "Label perturbation: skipped (skipped on request" in markdown(off)


@pytest.mark.slow
def test_diagnose_on_a_data_set_without_conflict_samples_runs_only_the_attractors(tmp_path, capsys):
    """The shipped omni emotion organism's data: classification only (every sample "conflict": false), six labels,
    face + voice. Through the CLI's runner (flags -> diagnose -> report); each clip's features computed once."""
    from arbiter import cli, organisms
    from arbiter import report as report_mod
    from arbiter.encode import load_audio
    from arbiter.experiments.diagnose import (
        CONFLICT_STEPS,
        MODALITY_STEPS,
        attractor_samples,
        diagnose,
    )

    if "omni_emotion_tiny" not in organisms.available():
        pytest.skip("the omni_emotion_tiny organism is not installed")
    model, proc, ds = organisms.load("omni_emotion_tiny")
    assert ds.labels == list(CREMA_D_LABELS) and not any(s.conflict for s in ds.samples)

    class Counting:  # the feature extractor, counting the clips it featurises
        def __init__(self, fe):
            self.fe, self.clips = fe, 0

        def __call__(self, audio, **kw):
            self.clips += len(audio)
            return self.fe(audio, **kw)

        def __getattr__(self, name):
            return getattr(self.__dict__["fe"], name)

    fe = proc.feature_extractor
    proc.feature_extractor = counting = Counting(fe)
    out = tmp_path / "out"
    args = cli.parser().parse_args(["demo", "--out", str(out), "--no-generate", "--attractor-limit", "6",
                                    "--attractor-subsets", "2", "--batch-size", "16"])
    try:
        assert cli._run(model, proc, ds, args, report_mod, diagnose) == 0
    finally:
        proc.feature_extractor = fe
    assert "conflict steps skipped (no conflict sample)" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_samples"] == 0 and rep["knockout"] == [] and rep["ldar"] == []
    for k in ("mfr", "heads", "blocking", "amplification", *MODALITY_STEPS):
        assert rep[k]["skipped"] == "no conflict sample", k
    assert all((out / "steps" / f"{k}.json").exists() for k in CONFLICT_STEPS)
    at = rep["attractors"]
    assert list(at["summary"]) == ["all", "image_only", "audio_only"] and at["n_subsets"] == 2
    assert sorted(at["true_labels"]) == sorted(CREMA_D_LABELS)                  # round-robin: one per label
    assert all(sm["n_rows"] == 6 * 2 for sm in at["summary"].values())
    # one featurisation per distinct clip: the voices (all + audio_only) and silence (image_only)
    clips = [load_audio(s, proc) for s in attractor_samples(ds, ds.labels, 6)]
    distinct = len({a.tobytes() for a in clips}) + len({len(a) for a in clips})
    assert counting.clips == distinct < 6 * 3 * 2
    md = (out / "report.md").read_text()
    assert "conflict steps (baseline, knockout map, head rankings, blocking, amplification) were skipped" in md
    assert "## Label attractors" in md and (out / "attractors.png").stat().st_size > 0
    assert not (out / "mam_ldar.png").exists()
    assert report_mod.Report.load(out)["attractors"]["labels"] == list(CREMA_D_LABELS)
