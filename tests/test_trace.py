"""Tests for arbiter.trace: Trace save/load round trips and errors, TraceWriter shards and resume."""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arbiter.errors import ArbiterError, TraceError
from arbiter.trace import FORMAT_VERSION, Trace, TraceWriter, iter_trace_dir, read_trace_dir

_INT_VIEW = {
    torch.bool: torch.uint8,
    torch.uint8: torch.uint8,
    torch.int8: torch.int8,
    torch.int16: torch.int16,
    torch.int32: torch.int32,
    torch.int64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bits of ``dtype`` (floats include NaN/inf/subnormal patterns)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    view = _INT_VIEW[dtype]
    info = torch.iinfo(view)
    bits = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(view)
    return bits.view(dtype)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical comparison (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = _INT_VIEW[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def save_and_load(trace: Trace, path: Path) -> Trace:
    trace.save(path)
    return Trace.load(path)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A valid trace file with one tensor."""
    path = tmp_path / "ok.safetensors"
    Trace({"x": torch.arange(1000, dtype=torch.float32)}, meta={"model": "m"}).save(path)
    return path


# --------------------------------------------------------------------------- Trace in memory


def test_add_and_mapping_access() -> None:
    trace = Trace({"logits": torch.ones(2, 3)})
    trace.add("L0.resid.post", torch.zeros(2, 4))
    assert len(trace) == 2
    assert "logits" in trace and "nope" not in trace
    assert list(trace.keys()) == ["logits", "L0.resid.post"]
    assert torch.equal(trace["L0.resid.post"], torch.zeros(2, 4))


def test_add_duplicate_name_raises_unless_overwrite() -> None:
    trace = Trace({"x": torch.ones(1)})
    with pytest.raises(TraceError, match="already has a tensor 'x'"):
        trace.add("x", torch.zeros(1))
    trace.add("x", torch.zeros(1), overwrite=True)
    assert torch.equal(trace["x"], torch.zeros(1))


def test_add_stores_detached_contiguous_copy() -> None:
    source = torch.arange(6.0, requires_grad=True).reshape(2, 3)
    trace = Trace()
    trace.add("t", source.t())
    stored = trace["t"]
    assert not stored.requires_grad
    assert stored.is_contiguous()
    assert stored.device.type == "cpu"
    assert torch.equal(stored, source.detach().t())
    with torch.no_grad():
        source.add_(100)
    assert stored[0, 0].item() == 0.0  # a copy: later edits to the source do not leak in


def test_missing_name_is_trace_error() -> None:
    with pytest.raises(TraceError, match="no tensor 'b'"):
        Trace({"a": torch.ones(1)})["b"]


def test_reserved_name_rejected() -> None:
    with pytest.raises(TraceError, match="reserved"):
        Trace().add("__metadata__", torch.ones(1))


def test_layers_sorted_for_site() -> None:
    trace = Trace({f"L{l}.attn.probs": torch.ones(1) for l in (10, 2, 0)})
    trace.add("L1.resid.post", torch.ones(1))
    trace.add("logits", torch.ones(1))
    assert trace.layers("attn.probs") == [0, 2, 10]
    assert trace.layers("resid.post") == [1]
    assert trace.layers("mlp.out") == []


def test_stack_over_layers() -> None:
    trace = Trace({f"L{l}.resid.post": torch.full((2, 3), float(l)) for l in (2, 0, 1)})
    stacked = trace.stack("resid.post")
    assert stacked.shape == (3, 2, 3)
    assert stacked[:, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert trace.stack("resid.post", layers=[2, 0])[:, 0, 0].tolist() == [2.0, 0.0]


def test_stack_shape_mismatch_raises() -> None:
    trace = Trace({"L0.x": torch.ones(2), "L1.x": torch.ones(3)})
    with pytest.raises(TraceError, match="cannot stack site 'x'"):
        trace.stack("x")


def test_stack_missing_layer_raises() -> None:
    with pytest.raises(TraceError, match="no tensor 'L5.x'"):
        Trace({"L0.x": torch.ones(2)}).stack("x", layers=[0, 5])


def test_concat_tensors_and_sample_ids() -> None:
    a = Trace({"x": torch.zeros(2, 3)}, meta={"sample_ids": ["a", "b"], "model": "m", "layers": [0, 1]})
    b = Trace({"x": torch.ones(1, 3)}, meta={"sample_ids": ["c"], "model": "other", "layers": [0, 1]})
    joined = Trace.concat([a, b])
    assert torch.equal(joined["x"], torch.cat([torch.zeros(2, 3), torch.ones(1, 3)]))
    assert joined.meta == {"sample_ids": ["a", "b", "c"], "model": "m", "layers": [0, 1]}


def test_concat_name_mismatch_raises() -> None:
    with pytest.raises(TraceError, match="different tensor names"):
        Trace.concat([Trace({"x": torch.ones(1)}), Trace({"y": torch.ones(1)})])


def test_concat_empty_raises() -> None:
    with pytest.raises(TraceError, match="at least one"):
        Trace.concat([])


def test_trace_error_is_arbiter_error() -> None:
    assert issubclass(TraceError, ArbiterError)


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bfloat16, torch.float16, torch.float32, torch.float64,
        torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool,
    ],
)
def test_round_trip_bit_identical(tmp_path: Path, dtype: torch.dtype) -> None:
    tensor = random_tensor((3, 5, 7), dtype, seed=0)
    loaded = save_and_load(Trace({"L0.attn.probs": tensor}), tmp_path / "t.safetensors")
    assert loaded["L0.attn.probs"].dtype == dtype
    assert bit_equal(loaded["L0.attn.probs"], tensor)


def test_round_trip_special_floats_bfloat16(tmp_path: Path) -> None:
    tensor = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40], dtype=torch.bfloat16)
    loaded = save_and_load(Trace({"x": tensor}), tmp_path / "t.safetensors")
    assert bit_equal(loaded["x"], tensor)


def test_meta_round_trip(tmp_path: Path) -> None:
    meta = {"model": "qwen", "layers": [0, 3], "cfg": {"alpha": 0.5, "ok": True, "none": None}, "n": 7}
    loaded = save_and_load(Trace({"x": torch.ones(1)}, meta=meta), tmp_path / "t.safetensors")
    assert loaded.meta == meta


def test_empty_trace_round_trip(tmp_path: Path) -> None:
    loaded = save_and_load(Trace(meta={"a": 1}), tmp_path / "t.safetensors")
    assert len(loaded) == 0
    assert loaded.meta == {"a": 1}


def test_header_metadata_layout(saved: Path) -> None:
    with safetensors.safe_open(str(saved), framework="pt") as f:
        header = f.metadata()
    assert header["arbiter_trace"] == str(FORMAT_VERSION) == "1"
    assert json.loads(header["meta"]) == {"model": "m"}


def test_save_non_json_meta_names_key(tmp_path: Path) -> None:
    trace = Trace({"x": torch.ones(1)}, meta={"ok": 1, "cfg": {"fn": print}})
    with pytest.raises(TraceError, match=r"meta\['cfg'\]\['fn'\]"):
        trace.save(tmp_path / "t.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_leaves_no_temp_files(tmp_path: Path) -> None:
    Trace({"x": torch.ones(3)}).save(tmp_path / "t.safetensors")
    Trace({"x": torch.zeros(3)}).save(tmp_path / "t.safetensors")  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
    assert torch.equal(Trace.load(tmp_path / "t.safetensors")["x"], torch.zeros(3))


def _data_start(path: Path) -> int:
    """Offset of the first tensor byte in a safetensors file (8-byte header length, then the JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_load_corrupted_tensor_bytes_raises(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    start = _data_start(saved)
    data[start + 2000] ^= 0xFF  # one byte inside x[500]: the header stays valid, safetensors reads the file
    saved.write_bytes(bytes(data))
    assert safetensors.torch.load_file(str(saved))["x"][500] != 500.0  # the damage is real and silent there
    with pytest.raises(TraceError, match=r"ok\.safetensors is corrupt.*sha256"):
        Trace.load(saved)


def test_checksum_is_sha256_of_tensor_bytes_in_name_order(tmp_path: Path) -> None:
    import hashlib

    a, b = torch.arange(6, dtype=torch.int16).reshape(2, 3), torch.tensor([1.5], dtype=torch.float32)
    path = tmp_path / "t.safetensors"
    Trace({"b": b, "a": a}).save(path)
    digest = hashlib.sha256()
    for name, t in (("a", a), ("b", b)):
        digest.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        digest.update(t.numpy().tobytes())
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata()["tensors_sha256"] == digest.hexdigest()


def test_old_trace_without_checksum_still_loads(tmp_path: Path) -> None:
    # the layout Trace.save wrote before traces carried a checksum: format 1, meta, no "tensors_sha256"
    path = tmp_path / "old.safetensors"
    safetensors.torch.save_file({"x": torch.arange(4.0)}, str(path),
                                metadata={"arbiter_trace": "1", "meta": '{"a": 1}'})
    loaded = Trace.load(path)
    assert torch.equal(loaded["x"], torch.arange(4.0))
    assert loaded.meta == {"a": 1}


def test_corrupt_checksum_field_is_trace_error(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file({"x": torch.ones(2)}, str(path),
                                metadata={"arbiter_trace": "1", "meta": "{}", "tensors_sha256": "xyz"})
    with pytest.raises(TraceError, match="tensors_sha256 'xyz' is not a sha256"):
        Trace.load(path)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_saved_files_mode_honours_umask(tmp_path: Path, umask: int, mode: int) -> None:
    before = os.umask(umask)
    try:
        Trace({"x": torch.ones(2)}).save(tmp_path / "single.safetensors")
        with TraceWriter(tmp_path / "run", META, samples_per_shard=2) as writer:
            writer.add(*batch(0, 2))
    finally:
        os.umask(before)
    files = [tmp_path / "single.safetensors", tmp_path / "run" / "shard-00000.safetensors",
             tmp_path / "run" / "manifest.json"]
    assert [oct(f.stat().st_mode & 0o777) for f in files] == [oct(mode)] * 3


def test_load_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no trace file at .*nope.safetensors"):
        Trace.load(tmp_path / "nope.safetensors")


def test_load_empty_file_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(TraceError, match="truncated"):
        Trace.load(path)


def test_load_truncated_copy(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="truncated") as info:
        Trace.load(cut)
    assert str(cut) in str(info.value)


def test_load_header_longer_than_file_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes((1000).to_bytes(8, "little") + b'{"x": {')
    with pytest.raises(TraceError, match="truncated: its header says 1000 bytes"):
        Trace.load(path)


def test_load_random_bytes_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(TraceError, match="not a safetensors trace.*never unpickles"):
        Trace.load(path)


def test_load_pickle_not_safetensors_and_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "trace.pkl"
    path.write_bytes(pickle.dumps({"x": [1, 2, 3]}))
    with pytest.raises(TraceError, match="not a safetensors trace.*pickle.*never unpickles"):
        Trace.load(path)


def test_load_torch_save_file_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "trace.pt"
    torch.save({"x": torch.ones(2)}, path)
    with pytest.raises(TraceError, match="not a safetensors trace.*never unpickles"):
        Trace.load(path)


def test_load_plain_safetensors_is_not_arbiter_trace(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"x": torch.ones(2)}, str(path))
    with pytest.raises(TraceError, match="not an arbiter trace"):
        Trace.load(path)


def test_load_newer_format_version(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    newer = str(FORMAT_VERSION + 1)
    safetensors.torch.save_file({"x": torch.ones(2)}, str(path), metadata={"arbiter_trace": newer, "meta": "{}"})
    with pytest.raises(TraceError, match=f"format version {newer}, newer than this arbiter supports"):
        Trace.load(path)


def test_load_corrupt_json_meta(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"x": torch.ones(2)}, str(path), metadata={"arbiter_trace": "1", "meta": "{not json"})
    with pytest.raises(TraceError, match="corrupt JSON metadata"):
        Trace.load(path)


def test_load_safetensors_error_rewrapped_with_path(tmp_path: Path) -> None:
    # Header is well-formed JSON, but the data offsets do not fit the shape: safetensors itself refuses.
    header = {
        "__metadata__": {"arbiter_trace": "1", "meta": "{}"},
        "x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "lying.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\x00" * 4)
    with pytest.raises(TraceError, match="safetensors could not read it") as info:
        Trace.load(path)
    assert str(path) in str(info.value)


def test_header_length_starting_with_pickle_byte_still_loads(tmp_path: Path) -> None:
    # A header of 0x280 bytes begins with b"\x80\x02", like a pickle; it must not be mistaken for one.
    path = tmp_path / "t.safetensors"
    for pad in range(800):
        Trace({"x": torch.ones(1)}, meta={"pad": "p" * pad}).save(path)
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("no padding gave a header length of 0x280")
    assert Trace.load(path).meta["pad"] == "p" * pad


def test_load_directory_points_to_read_trace_dir(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="read_trace_dir"):
        Trace.load(tmp_path)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from(sorted(_INT_VIEW, key=str)),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    meta=st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5), st.booleans()), max_size=3),
)
def test_round_trip_property(shape: tuple[int, ...], dtype: torch.dtype, seed: int, meta: dict) -> None:
    tensor = random_tensor(shape, dtype, seed)
    with tempfile.TemporaryDirectory() as folder:
        trace = Trace({"L1.t": tensor, "logits": tensor.flatten()}, meta=meta)
        loaded = save_and_load(trace, Path(folder) / "t.safetensors")
    assert bit_equal(loaded["L1.t"], tensor)
    assert bit_equal(loaded["logits"], tensor.flatten())
    assert loaded.meta == meta


# --------------------------------------------------------------------------- TraceWriter


def batch(start: int, count: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Samples ``start..start+count`` with values derived from their index."""
    ids = [f"s{i}" for i in range(start, start + count)]
    return ids, expected(ids)


def expected(ids: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``batch`` makes for ``ids``."""
    idx = torch.tensor([int(i[1:]) for i in ids])
    return {
        "L0.resid.post": idx[:, None].float().expand(len(ids), 4).to(torch.bfloat16),
        "logits": idx[:, None].expand(len(ids), 3) * 10,
    }


def shard_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("shard-*.safetensors"))


META = {"model": "tiny", "layers": [0, 1]}


def test_writer_shards_and_reads_back(tmp_path: Path) -> None:
    with TraceWriter(tmp_path, META, samples_per_shard=4) as writer:
        for start, count in [(0, 3), (3, 3), (6, 4)]:
            writer.add(*batch(start, count))
    assert shard_files(tmp_path) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    trace = read_trace_dir(tmp_path)
    ids = [f"s{i}" for i in range(10)]
    assert trace.meta == {**META, "sample_ids": ids}
    for name, tensor in expected(ids).items():
        assert bit_equal(trace[name], tensor)


def test_writer_leaves_no_temp_files(tmp_path: Path) -> None:
    with TraceWriter(tmp_path, META, samples_per_shard=2) as writer:
        writer.add(*batch(0, 5))
    shards = [f"shard-0000{i}.safetensors" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", *shards]


def test_iter_trace_dir_yields_each_shard(tmp_path: Path) -> None:
    with TraceWriter(tmp_path, META, samples_per_shard=4) as writer:
        writer.add(*batch(0, 10))
    shards = list(iter_trace_dir(tmp_path))
    ranges = (range(0, 4), range(4, 8), range(8, 10))
    assert [s.meta["sample_ids"] for s in shards] == [[f"s{i}" for i in r] for r in ranges]
    assert bit_equal(shards[2]["logits"], expected(["s8", "s9"])["logits"])


def test_done_ids_only_counts_samples_on_disk(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, META, samples_per_shard=4)
    writer.add(*batch(0, 3))
    assert writer.done_ids == frozenset()
    writer.add(*batch(3, 2))
    assert writer.done_ids == {f"s{i}" for i in range(4)}
    writer.close()
    assert writer.done_ids == {f"s{i}" for i in range(5)}


def test_add_id_already_done_raises(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, META, samples_per_shard=2)
    writer.add(*batch(0, 2))
    with pytest.raises(TraceError, match="already on disk"):
        writer.add(*batch(1, 1))


def test_add_id_already_buffered_raises(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, META, samples_per_shard=10)
    writer.add(*batch(0, 2))
    with pytest.raises(TraceError, match="already added"):
        writer.add(*batch(1, 1))


def test_add_wrong_batch_size_raises(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, META)
    with pytest.raises(TraceError, match="dim 0 must be the batch of 2"):
        writer.add(["a", "b"], {"x": torch.ones(3, 1)})


def test_add_changed_schema_raises(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, META)
    writer.add(["a"], {"x": torch.ones(1, 4)})
    with pytest.raises(TraceError, match="differ from earlier batches"):
        writer.add(["b"], {"x": torch.ones(1, 5)})


def test_resume_after_crash_no_loss_no_duplicates(tmp_path: Path) -> None:
    all_ids = [f"s{i}" for i in range(10)]
    writer = TraceWriter(tmp_path, META, samples_per_shard=4)
    writer.add(*batch(0, 6))  # shard 0 on disk, s4 and s5 only buffered
    del writer  # crash: never closed
    # Debris of a crash mid-write: a stray temp file and a shard the manifest never listed.
    (tmp_path / ".shard-00001.safetensors.abc123.tmp").write_bytes(b"half a shard")
    Trace({"junk": torch.ones(1)}).save(tmp_path / "shard-00001.safetensors")

    writer = TraceWriter(tmp_path, META, samples_per_shard=4)
    assert writer.done_ids == {"s0", "s1", "s2", "s3"}
    assert shard_files(tmp_path) == ["shard-00000.safetensors"]
    assert not list(tmp_path.glob(".*.tmp"))
    todo = [i for i in all_ids if i not in writer.done_ids]
    for sample in todo:
        writer.add(*batch(int(sample[1:]), 1))
    writer.close()

    trace = read_trace_dir(tmp_path)
    assert sorted(trace.meta["sample_ids"]) == all_ids
    assert len(trace.meta["sample_ids"]) == len(set(trace.meta["sample_ids"])) == 10
    for name, tensor in expected(trace.meta["sample_ids"]).items():
        assert bit_equal(trace[name], tensor)


def test_resume_with_different_meta_raises(tmp_path: Path) -> None:
    with TraceWriter(tmp_path, META, samples_per_shard=2) as writer:
        writer.add(*batch(0, 2))
    with pytest.raises(TraceError, match="different meta.*resume=False"):
        TraceWriter(tmp_path, {**META, "model": "other"})


def test_resume_false_starts_over(tmp_path: Path) -> None:
    with TraceWriter(tmp_path, META, samples_per_shard=2) as writer:
        writer.add(*batch(0, 4))
    (tmp_path / "notes.txt").write_text("keep me")
    writer = TraceWriter(tmp_path, {"model": "other"}, samples_per_shard=2, resume=False)
    assert writer.done_ids == frozenset()
    assert shard_files(tmp_path) == []
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    writer.add(*batch(7, 1))
    writer.close()
    trace = read_trace_dir(tmp_path)
    assert trace.meta == {"model": "other", "sample_ids": ["s7"]}


def test_exit_on_exception_flushes_buffer(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with TraceWriter(tmp_path, META, samples_per_shard=4) as writer:
            writer.add(*batch(0, 5))
            raise RuntimeError("boom")
    assert read_trace_dir(tmp_path).meta["sample_ids"] == [f"s{i}" for i in range(5)]


def test_add_after_close_raises(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, META)
    writer.close()
    with pytest.raises(TraceError, match="closed"):
        writer.add(*batch(0, 1))


def test_sha_mismatch_names_shard(tmp_path: Path) -> None:
    with TraceWriter(tmp_path, META, samples_per_shard=2) as writer:
        writer.add(*batch(0, 4))
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor byte
    shard.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="shard-00001.safetensors.*sha256"):
        read_trace_dir(tmp_path)
    shards = iter_trace_dir(tmp_path)
    assert next(shards).meta["sample_ids"] == ["s0", "s1"]
    with pytest.raises(TraceError, match="shard-00001"):
        next(shards)


def test_read_trace_dir_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no manifest.json"):
        read_trace_dir(tmp_path)


def test_read_empty_run(tmp_path: Path) -> None:
    TraceWriter(tmp_path, META).close()
    trace = read_trace_dir(tmp_path)
    assert len(trace) == 0
    assert trace.meta == {**META, "sample_ids": []}


def test_writer_meta_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"\['bad'\]"):
        TraceWriter(tmp_path, {"bad": object()})
    assert not os.path.exists(tmp_path / "manifest.json")
