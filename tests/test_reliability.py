"""Reliability (issue 9, items 2 and 5): attach on an accelerate-dispatched model (device_map with disk offload),
property tests over random token groups / layer windows / head sets / batch sizes / padding sides (no NaN, no
leaked hook, exact restoration), a TraceWriter SIGKILLed mid-run, and fuzzed JSONL / trace files."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import _tiny, inputs_for, logits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arbiter
from arbiter.data import IA_VISION_INSTRUCTION, load_jsonl
from arbiter.errors import DataError, TraceError
from arbiter.groups import TokenGroups
from arbiter.trace import Trace, read_trace_dir

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ------------------------------------------------------------------------------------------------ device_map

DEVICE_MAP = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
              "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
              "model.language_model.layers.1": "disk", "model.language_model.layers.2": "cpu",
              "model.language_model.layers.3": "disk", "model.language_model.norm": "cpu",
              "model.language_model.rotary_emb": "cpu", "lm_head": "disk"}


def _runs(model, processor, inputs):
    """Logits of the model, recorded sites, knockout and head-block logits, through arbiter."""
    out = {}
    with arbiter.attach(model, processor) as lens, torch.no_grad():
        with lens.record("resid.post", "attn.probs", "attn.head_out", "attn.k", rows="last") as rec:
            out["logits"] = model(**inputs).logits
        out["trace"] = dict(rec.trace.items())
        with lens.knockout("image", "last", layers="all"):
            out["knockout"] = model(**inputs).logits
        with lens.knockout("image", "text", layers=[1, 3], heads=[0, 3]):
            out["knockout_heads"] = model(**inputs).logits
        with lens.block_heads([(1, 0), (3, 2)]):
            out["block"] = model(**inputs).logits
        with lens.amplify_heads([(3, 1)], alpha=3.0, steps="all"):
            out["generate"] = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attach_on_accelerate_dispatched_model_with_disk_offload(tmp_path, dtype):
    """Layers 1, 3 and lm_head offloaded to disk (their parameters are meta tensors between forwards): records,
    knockouts, head blocks and generate() under arbiter equal the undispatched model's, and leaving restores."""
    accelerate = pytest.importorskip("accelerate")
    tm = _tiny("llava")
    ref_model = copy.deepcopy(tm.model).to(dtype)
    inputs = inputs_for(tm, n=2)
    if dtype != torch.float32:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    ref = _runs(ref_model, tm.processor, inputs)
    model = accelerate.dispatch_model(copy.deepcopy(ref_model), device_map=DEVICE_MAP, offload_dir=str(tmp_path),
                                      main_device="cpu")
    assert model.lm_head.weight.device.type == "meta"
    assert model.model.language_model.layers[1].self_attn.o_proj.weight.device.type == "meta"
    clean, n_hooks = logits(model, inputs), _n_hooks(model)
    assert torch.equal(clean, logits(ref_model, inputs))
    got = _runs(model, tm.processor, inputs)
    tol = 1e-5 if dtype == torch.float32 else 0.0  # measured: bit-identical in both dtypes
    for key in ("logits", "knockout", "knockout_heads", "block"):
        assert (got[key].float() - ref[key].float()).abs().max().item() <= tol, key
    assert torch.equal(got["generate"], ref["generate"])
    assert set(got["trace"]) == set(ref["trace"]) and len(ref["trace"]) > 10
    for name, t in ref["trace"].items():
        assert (got["trace"][name].float() - t.float()).abs().max().item() <= tol, name
    assert not torch.equal(got["knockout"], got["logits"])
    # leaving attach restores: same hooks (accelerate's own stay), same logits bit for bit
    assert _n_hooks(model) == n_hooks and hasattr(model.lm_head, "_hf_hook")
    assert torch.equal(logits(model, inputs), clean)
    assert model.lm_head.weight.device.type == "meta"


def test_experiments_read_offloaded_weights(tmp_path):
    """evaluate() (lm_head for MAM) and DLA (o_proj) read accelerate-offloaded weights, not the meta tensors."""
    accelerate = pytest.importorskip("accelerate")
    from arbiter.data import generate_synthetic
    from arbiter.experiments.baseline import evaluate
    from arbiter.experiments.heads import dla_ranking

    tm = _tiny("llava")
    ds = generate_synthetic(tmp_path / "data", 4, seed=0, image_size=32, p_agreement=0.0)
    model = accelerate.dispatch_model(copy.deepcopy(tm.model), device_map=DEVICE_MAP,
                                      offload_dir=str(tmp_path / "off"), main_device="cpu")
    res = {}
    for name, m in (("ref", tm.model), ("dispatched", model)):
        with arbiter.attach(m, tm.processor) as lens:
            res[name] = (evaluate(lens, ds.samples, 4, ds, generate=False), dla_ranking(lens, ds.samples, 4, ds))
    (e0, d0), (e1, d1) = res["ref"], res["dispatched"]
    assert torch.isfinite(e1.mam_last).all()
    assert (e1.mam_last - e0.mam_last).abs().max().item() <= 1e-5
    assert (e1.pi - e0.pi).abs().max().item() <= 1e-6
    assert (d1.scores - d0.scores).nan_to_num(0).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------ properties

@st.composite
def scenarios(draw):
    n_layers, n_heads = 4, 4  # tiny("llava")
    b = draw(st.integers(1, 3))
    size = draw(st.integers(1, n_layers + 2))
    return {
        "batch": b,
        "side": draw(st.sampled_from(["left", "right"])),
        "seed": draw(st.integers(0, 2**16)),
        "src_p": draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])),   # density of the random source group
        "dst_p": draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])),
        "center": draw(st.integers(0, n_layers - 1)),
        "size": size,
        "ko_heads": draw(st.none() | st.lists(st.integers(0, n_heads - 1), min_size=1, max_size=n_heads)),
        "block": draw(st.lists(st.tuples(st.integers(0, n_layers - 1), st.integers(0, n_heads - 1)), max_size=5)),
        "alpha": draw(st.sampled_from([0.0, 0.5, 2.0, 10.0])),
        "generate": draw(st.booleans()),
    }


def _inputs(tm, b: int, side: str):
    tok = tm.processor.tokenizer
    old = tok.padding_side
    tok.padding_side = side
    try:
        prompts = [tm.prompt("What colour is the circle in the image?" + " ok" * (3 * i)) for i in range(b)]
        return dict(tm.processor(text=prompts, images=[[tm.make_image(i)] for i in range(b)], padding=True,
                                 return_tensors="pt"))
    finally:
        tok.padding_side = old


@FAST
@given(sc=scenarios())
def test_random_interventions_never_nan_never_leak_and_restore_exactly(sc):
    tm = _tiny("llava")
    model = tm.model
    inputs = _inputs(tm, sc["batch"], sc["side"])
    real = inputs["attention_mask"].bool()
    clean = logits(model, inputs)
    n_hooks, impl = _n_hooks(model), model.config.get_text_config()._attn_implementation
    gen = torch.Generator().manual_seed(sc["seed"])
    shape = inputs["input_ids"].shape
    with arbiter.attach(model, tm.processor) as lens:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, clean)           # attached, nothing active: bit-identical
        groups = TokenGroups.from_input_ids(inputs["input_ids"], inputs["attention_mask"],
                                            lens.facts.modality_token_ids)
        groups.add("rsrc", torch.rand(shape, generator=gen) < sc["src_p"])
        groups.add("rdst", torch.rand(shape, generator=gen) < sc["dst_p"])
        lens.use(groups)
        layers = lens.window(sc["center"], sc["size"])
        with lens.knockout("rsrc", "rdst", layers=layers, heads=sc["ko_heads"], allow_empty=True), \
                lens.knockout("image", "last", layers=layers), \
                lens.amplify_heads(sc["block"], alpha=sc["alpha"]), torch.no_grad():
            out = model(**inputs).logits
            assert n_hooks < _n_hooks(model)
            if sc["generate"]:
                ids = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
                assert all(torch.isfinite(x).all() for x in ids.logits)
        assert torch.isfinite(out[real]).all()
        if sc["src_p"] == 0.0 or sc["dst_p"] == 0.0:   # an empty group: that knockout is an exact no-op
            lens.use(groups)
            with lens.knockout("rsrc", "rdst", layers=layers, allow_empty=True), torch.no_grad():
                assert torch.equal(model(**inputs).logits, clean)
    assert _n_hooks(model) == n_hooks
    assert model.config.get_text_config()._attn_implementation == impl
    assert torch.equal(logits(model, inputs), clean)


@FAST
@given(b=st.integers(1, 3), side=st.sampled_from(["left", "right"]), center=st.integers(0, 3),
       size=st.integers(1, 9), data=st.data())
def test_knockout_of_every_key_keeps_rows_finite(b, side, center, size, data):
    """Every query may attend to nothing in the window (src = dst = all): the documented fallback (a row keeps
    its own position) keeps every real row finite; the raise inside the block still restores the model."""
    tm = _tiny("llava")
    model = tm.model
    inputs = _inputs(tm, b, side)
    clean, n_hooks = logits(model, inputs), _n_hooks(model)
    heads = data.draw(st.none() | st.lists(st.integers(0, 3), min_size=1, max_size=4))
    with pytest.raises(RuntimeError, match="stop"):
        with arbiter.attach(model, tm.processor) as lens:
            with lens.knockout("all", "all", layers=lens.window(center, size), heads=heads), torch.no_grad():
                out = model(**inputs).logits
            assert torch.isfinite(out[inputs["attention_mask"].bool()]).all()
            raise RuntimeError("stop")
    assert _n_hooks(model) == n_hooks
    assert torch.equal(logits(model, inputs), clean)


# ------------------------------------------------------------------------------------------------ SIGKILL

_WRITER = r"""
import sys, types
# arbiter.trace alone (torch + safetensors), without the package's __init__ (transformers): a fast start
pkg = types.ModuleType("arbiter")
pkg.__path__ = [sys.argv[3]]
sys.modules["arbiter"] = pkg
import torch
from arbiter.trace import TraceWriter
directory, n = sys.argv[1], int(sys.argv[2])
w = TraceWriter(directory, {"what": "sigkill test"}, samples_per_shard=2, resume=True)
for i in range(n):
    sid = f"s{i:03d}"
    if sid in w.done_ids:
        continue
    w.add([sid], {"x": torch.full((1, 64, 1024), float(i)), "i": torch.tensor([i])})
    print(i, flush=True)
w.close()
print("done", flush=True)
"""


def _start_writer(directory: Path, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(directory), str(n), str(ROOT / "arbiter")],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _check_on_disk(directory: Path) -> set[str]:
    """Every complete shard file (name shard-*.safetensors) loads; the manifest's shards read back in full."""
    for f in directory.glob("shard-*.safetensors"):
        Trace.load(f)
    tr = read_trace_dir(directory)
    ids = tr.meta["sample_ids"]
    assert len(ids) == len(set(ids))
    if ids:
        assert [int(s[1:]) for s in ids] == tr["i"].tolist()
        assert torch.equal(tr["x"][:, 0, 0], tr["i"].float())
    return set(ids)


@pytest.mark.slow
def test_trace_writer_killed_mid_run_leaves_readable_shards_and_resumes_without_duplicates(tmp_path):
    n = 30
    done: set[str] = set()
    for kill_after in (3, 9):   # two crashes at different points, then a run to the end
        proc = _start_writer(tmp_path, n)
        printed = 0
        while printed < kill_after:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            printed += 1
        os.kill(proc.pid, signal.SIGKILL)   # mid-run: shards and the manifest are being written continuously
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        now = _check_on_disk(tmp_path)
        assert done <= now     # nothing on disk was lost
        done = now
    proc = _start_writer(tmp_path, n)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip().endswith("done")
    assert len(out.split()) - 1 == n - len(done)       # the rerun wrote only what was missing
    assert _check_on_disk(tmp_path) == {f"s{i:03d}" for i in range(n)}
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------ fuzzing

def _valid(i: int, **over) -> dict:
    d = {"id": f"valid-{i}", "context": "The ball is blue.", "instruction": IA_VISION_INSTRUCTION,
         "question": "What colour is the ball?", "target": "vision", "answer_vision": "red", "answer_text": "blue"}
    d.update(over)
    return d


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
                  st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_FIELDS = ["id", "context", "instruction", "question", "target", "answer_vision", "answer_text", "image", "audio",
           "conflict", "aliases_vision", "aliases_text", "template", "label"]


@st.composite
def bad_lines(draw, i: int):
    """(line text, certainly_invalid) for line i."""
    kind = draw(st.sampled_from(["drop", "junk", "truncate", "missing_image", "huge", "not_object", "deep",
                                 "bigint", "garbage", "header", "ok_extra"]))
    row = _valid(i)
    if kind == "drop":
        del row[draw(st.sampled_from(_FIELDS[:7]))]
        return json.dumps(row), True
    if kind == "junk":
        row[draw(st.sampled_from(_FIELDS))] = draw(_JUNK)
        return json.dumps(row), False
    if kind == "truncate":
        text = json.dumps(row)
        return text[:draw(st.integers(1, len(text) - 1))], True
    if kind == "missing_image":
        row["image"] = draw(st.sampled_from(["nope.png", "dir/none.jpg", "", "\u0000x.png", "a" * 5000, "."]))
        return json.dumps(row), True
    if kind == "huge":
        row[draw(st.sampled_from(["context", "question", "id", "answer_vision", "template", "label"]))] = \
            draw(st.sampled_from(["x", "{", "é\u2028", "\ud800"])) * draw(st.sampled_from([10_000, 1_000_000]))
        return json.dumps(row), False
    if kind == "not_object":
        return draw(st.sampled_from(["[1, 2]", "3", '"s"', "null", "true"])), True
    if kind == "deep":
        return "[" * draw(st.integers(2_000, 200_000)), True
    if kind == "bigint":
        return json.dumps(row)[:-1] + ', "conflict": ' + "9" * 5000 + "}", True
    if kind == "garbage":   # may hold U+2028, \x1c, \x85...: not line ends in JSON Lines
        text = draw(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=1,
                            max_size=50) | st.sampled_from(["\u2028", "{\x1c}", "\x85[", "\x0b"]))
        return text, False
    if kind == "header":
        return json.dumps({"arbiter_dataset": draw(_JUNK), "labels": draw(_JUNK)}), False
    return json.dumps({**row, "extra_field": draw(_JUNK)}), False


@FAST
@given(data=st.data(), n=st.integers(1, 6))
def test_jsonl_loader_fuzz_raises_only_data_error_naming_the_line(tmp_path_factory, data, n):
    folder = tmp_path_factory.mktemp("fuzz")
    lines, bad = [], {}
    for i in range(n):
        if data.draw(st.booleans()):
            text, certain = data.draw(bad_lines(i))
            bad[i + 1] = certain
        else:
            text = json.dumps(_valid(i))
        lines.append(text)
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        ds = load_jsonl(path)
    except DataError as e:
        msg = str(e)
        assert msg.startswith(f"{path}:"), msg[:200]
        line = int(msg[len(str(path)) + 1:].split(":", 1)[0])
        assert line in bad, (line, sorted(bad), msg[:200])   # never a valid line
        assert all(not certain for ln, certain in bad.items() if ln < line)
        return
    except Exception as e:  # noqa: BLE001 - the property: nothing but DataError
        pytest.fail(f"load_jsonl raised {type(e).__name__}: {str(e)[:300]}")
    assert not any(bad.values())          # a certainly invalid line was accepted
    assert {f"valid-{i}" for i in range(n) if i + 1 not in bad} <= {x.id for x in ds}


def test_jsonl_lines_end_only_at_newlines(tmp_path):
    """A raw U+2028 / U+0085 / \x1c inside a JSON string is legal: the line loads, later lines keep their numbers."""
    rows = [json.dumps(_valid(0, context="Blue\u2028ball\x85x\x1cy."), ensure_ascii=False),
            json.dumps(_valid(1)), json.dumps(_valid(2, target="sky"))]
    path = tmp_path / "d.jsonl"
    path.write_text("\r\n".join(rows) + "\r\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'target'"):
        load_jsonl(path)
    path.write_text("\n".join(rows[:2]) + "\n", encoding="utf-8")
    assert load_jsonl(path)[0].context == "Blue\u2028ball\x85x\x1cy."


def test_jsonl_loader_names_the_line_of_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(_valid(0)).encode() + b"\n" + json.dumps(_valid(1)).encode() + b"\n"
                     + b'{"id": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: not UTF-8"):
        load_jsonl(path)


@FAST
@given(data=st.data())
def test_trace_load_fuzz_raises_only_trace_error(tmp_path_factory, data):
    """Truncated, bit-flipped or prefixed trace files load (data bytes hit) or raise TraceError, nothing else."""
    folder = tmp_path_factory.mktemp("tfuzz")
    good = folder / "good.safetensors"
    Trace({"L0.resid.post": torch.arange(24.0).reshape(2, 3, 4), "rows": torch.tensor([1, 2])},
          {"arbiter": "trace", "note": "fuzz"}).save(good)
    raw = bytearray(good.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "prefix", "header_len"]))
    if how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "prefix":
        raw = bytearray(data.draw(st.binary(min_size=1, max_size=16))) + raw
    else:
        raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    bad = folder / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    try:
        tr = Trace.load(bad)
    except TraceError:
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"Trace.load raised {type(e).__name__}: {str(e)[:300]}")
    for t in tr.values():
        t.sum()
