"""Distributed diagnosis (issue 9, item 3): ``torchrun --nproc_per_node 2 -m arbiter diagnose`` gives the
single-process report.json numbers; the sharding / gathering logic on simulated ranks (threads)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import _tiny

from arbiter import distributed
from arbiter.errors import DataError
from arbiter.experiments.common import batch_plan, per_sample

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ simulated ranks

class _ThreadRank:
    """A rank of a simulated group: all_gather through a shared box and a barrier (one thread per rank)."""

    def __init__(self, rank: int, world: int, box: list, barrier: threading.Barrier):
        self.rank, self.world, self.box, self.barrier = rank, world, box, barrier

    def all_gather(self, obj):
        self.box[self.rank] = obj
        self.barrier.wait()
        out = list(self.box)
        self.barrier.wait()
        return out


def _on_ranks(world: int, body):
    """body(group) on ``world`` threads; returns each rank's result or exception."""
    box, barrier = [None] * world, threading.Barrier(world, timeout=30)
    results: list = [None] * world

    def run(r):
        try:
            results[r] = ("ok", body(_ThreadRank(r, world, box, barrier)))
        except Exception as e:  # noqa: BLE001
            results[r] = ("error", e)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a simulated rank hangs"
    return results


def _samples(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [SimpleNamespace(id=f"s{i}", image=None if bool(torch.rand(1, generator=g) < 0.3) else "x.png")
            for i in range(n)]


def _fn(batch_size: int):
    """Per-sample results of a part in batch order, of every supported kind."""
    def fn(part):
        order = [i for b in batch_plan(part, batch_size) for i in b]
        ids = [part[i].id for i in order]
        num = torch.tensor([float(part[i].id[1:]) for i in order])
        return {"ids": ids, "t": (num[:, None] * torch.ones(1, 3), [[x] for x in ids]), "col": num[None].repeat(2, 1)}
    return fn


@pytest.mark.parametrize(("n", "batch_size", "world"), [(11, 2, 2), (11, 3, 3), (7, 4, 5), (1, 8, 2), (16, 4, 2)])
def test_sharded_results_equal_one_process_in_order(n, batch_size, world):
    samples = _samples(n, seed=n)
    fn = _fn(batch_size)
    want = fn(samples)
    got = _on_ranks(world, lambda g: distributed.map_batches(g, lambda p: {k: v for k, v in fn(p).items()
                                                                             if k != "col"}, samples,
                                                             batch_plan(samples, batch_size)))
    cols = _on_ranks(world, lambda g: distributed.map_batches(g, lambda p: fn(p)["col"], samples,
                                                              batch_plan(samples, batch_size), dim=1))
    for (kind, res), (kind2, col) in zip(got, cols):
        assert kind == kind2 == "ok", res
        assert res["ids"] == want["ids"]
        assert torch.equal(res["t"][0], want["t"][0]) and res["t"][1] == want["t"][1]
        assert torch.equal(col, want["col"])


def test_per_sample_outside_a_distributed_run_is_fn_of_all_samples():
    samples = _samples(5)
    seen = []
    assert per_sample(lambda p: seen.append(p) or [len(p)], samples, 2) == [5]
    assert seen == [samples] and distributed.active() is None and distributed.group() is None


def test_a_failing_rank_makes_every_rank_raise_instead_of_hanging():
    samples = _samples(8)
    plan = batch_plan(samples, 2)
    bad = samples[plan[1][0]].id          # batch 1 goes to rank 1

    def fn(part, exc):
        if any(s.id == bad for s in part):
            raise exc
        return [s.id for s in part]
    res = _on_ranks(2, lambda g: distributed.map_batches(g, lambda p: fn(p, DataError("bad sample")), samples, plan))
    assert all(kind == "error" and isinstance(e, DataError) and "bad sample" in str(e) for kind, e in res)
    res = _on_ranks(2, lambda g: distributed.map_batches(g, lambda p: fn(p, KeyError("k")), samples, plan))
    assert res[1][0] == "error" and isinstance(res[1][1], KeyError)
    assert res[0][0] == "error" and isinstance(res[0][1], distributed.DistributedError) and "rank 1" in str(res[0][1])


# ------------------------------------------------------------------------------------------------ torchrun

_COMPARED = ("n_samples", "mfr", "mfr_pi", "mam", "mam_instruction", "mam_components", "ldar", "knockout", "heads",
             "blocking", "amplification", "imbalance")


def _close(a, b, path: str, tol: float = 1e-6) -> None:
    if isinstance(a, dict):
        keys = set(a) - {"seconds"}
        assert keys == set(b) - {"seconds"}, path
        for k in keys:
            _close(a[k], b[k], f"{path}.{k}", tol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", tol)
    elif isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            assert a is b, path
        elif math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), path
        else:
            assert abs(a - b) <= tol, (path, a, b)
    else:
        assert a == b, (path, a, b)


def single_and_torchrun_reports(tmp_path, device: str = "cpu") -> tuple[dict, dict]:
    """``arbiter diagnose`` on a tiny saved LLaVA and 8 synthetic samples, once in one process and once under
    ``torchrun --nproc_per_node 2`` (gloo on a CPU, nccl on CUDA): (single report, distributed report)."""
    from arbiter import cli
    from arbiter.data import generate_synthetic

    tm = _tiny("llava")
    model_dir = tmp_path / "model"
    tm.model.save_pretrained(model_dir)
    tm.processor.save_pretrained(model_dir)
    ds = generate_synthetic(tmp_path / "data", 8, seed=0, image_size=32)
    assert len([s for s in ds.samples if s.conflict]) == 7     # batches of 2: 4 batches, the last one of 1
    args = ["diagnose", "--model", str(model_dir), "--data", str(ds.path), "--window", "3", "--batch-size", "2",
            "--skip", "shapley,keyspace,surrogate", "--random-draws", "2", "--no-generate", "--device", device]
    # imbalance is not skipped: it runs on rank 0 only and is broadcast (the path of every modality step)
    assert cli.main([*args, "--out", str(tmp_path / "single")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "arbiter", *args, "--out", str(tmp_path / "dist")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("[arbiter] MFR overall") == 1       # rank 0 reports, rank 1 is silent
    return (json.loads((tmp_path / "single" / "report.json").read_text()),
            json.loads((tmp_path / "dist" / "report.json").read_text()))


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_report(tmp_path):
    from arbiter.trace import read_trace_dir

    single, dist = single_and_torchrun_reports(tmp_path)
    for key in _COMPARED:
        _close(single[key], dist[key], key)
    assert "skipped" not in dist["imbalance"] and dist["heads"]["scores"]["exhaustive"]
    assert single["heads"]["ranking"] == dist["heads"]["ranking"]
    # every rank streamed its own baseline traces; rank 0 merged them into one readable directory
    t1, t2 = read_trace_dir(tmp_path / "single" / "traces" / "baseline"), \
        read_trace_dir(tmp_path / "dist" / "traces" / "baseline")
    assert sorted(t1.meta["sample_ids"]) == sorted(t2.meta["sample_ids"]) and len(t2.meta["sample_ids"]) == 7
    order = [t2.meta["sample_ids"].index(i) for i in t1.meta["sample_ids"]]
    for name in ("resid_last", "pi", "mam_last"):
        assert (t2[name][order] - t1[name]).abs().max().item() <= 1e-6
    assert not list((tmp_path / "dist" / "traces" / "baseline").glob("rank*"))
