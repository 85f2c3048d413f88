"""Memory budgets: sizes parsed, and a sweep whose chunk the budget bounds (checked against the peak it measured
and against a sweep with no bound: the same values)."""

from __future__ import annotations

import pytest
import torch

import arbiter
from arbiter import memory
from arbiter.errors import ArbiterError, InterventionError
from arbiter.sweep import head_sweep
from arbiter.testing import tiny


@pytest.mark.parametrize("text,expected", [("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1.5e3", 1500),
                                           (4096, 4096), ("2 kib", 2048)])
def test_sizes_are_read_as_people_write_them(text, expected):
    assert memory.parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GB", "8 parsecs", 0])
def test_an_unreadable_or_empty_size_is_refused(bad):
    with pytest.raises(ArbiterError):
        memory.parse_bytes(bad)


def test_the_default_budget_is_half_the_free_memory_or_the_environment(monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)
    free = memory.free_bytes("cpu")
    assert free is not None and abs(memory.budget_bytes("cpu") - free // 2) <= 64 * 2**20   # free memory moves
    monkeypatch.setenv(memory.ENV, "3GiB")
    assert memory.budget_bytes("cpu") == 3 * 2**30


@pytest.mark.slow
def test_peak_added_counts_what_the_call_holds():
    """In a fresh process (a long-lived one may hand the call memory it already holds, which no peak counter sees)."""
    import subprocess
    import sys

    code = ("import torch\nfrom arbiter import memory\nsize = 200 * 2**20\n"
            "peak, kept = memory.peak_added(lambda: torch.ones(size // 4), 'cpu')\n"   # 200 MiB of float32, touched
            "print(peak / size, kept.numel() * 4 == size)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    share, whole = out.stdout.split()
    assert whole == "True" and 0.95 <= float(share) <= 1.2


def _batch(tm):
    return dict(tm.inputs([tm.prompt("What colour is the shape?")] * 2, image_seeds=[0, 1], padding=True))


@pytest.mark.parametrize("peaks", [2.5, 4.0, 9.0])
def test_a_sweep_stays_within_its_budget_and_leaves_the_values(peaks):
    """The sweep's whole peak (clean run, replayed outputs, chunks, results), read by the allocation meter around
    it, stays within the budget; the values equal the unbounded sweep's."""
    tm = tiny("llava")
    inputs = _batch(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        free = head_sweep(lens, inputs, chunk=64, memory_budget=2**40)
        budget = int(free.clean_peak_bytes * peaks)
        used, bound = memory.peak_added(lambda: head_sweep(lens, inputs, chunk=64, memory_budget=budget), "cpu")
    assert free.chunk == 64 and bound.chunk < free.chunk
    assert used <= budget
    torch.testing.assert_close(bound.values, free.values, atol=1e-5, rtol=0)


def test_the_meter_counts_new_storage_once_and_subtracts_what_is_freed():
    def call():
        a = torch.ones(1000)                  # 4,000 bytes
        b = a * 2                             # 4,000 more: 8,000 held at once
        view = b.view(10, 100)                # a view: nothing new
        b.add_(1)                             # in place: nothing new
        del a                                 # 4,000 freed
        c = torch.zeros(250, dtype=torch.float64)   # 2,000 new: 6,000 held, below the peak
        return view, c
    peak, held, (view, c) = memory.measure(call, "cpu")
    assert (peak, held) == (8000, 6000)


def test_the_meter_counts_no_memory_for_views_returned_in_a_list():
    x = torch.ones(1000)                      # made before the call: its views are not the call's memory

    def call():
        parts = torch.split(x, 100)           # ten views, returned as one list
        return torch.cat(parts)               # 4,000 new bytes

    assert memory.measure(call, "cpu")[:2] == (4000, 4000)


def test_a_budget_below_one_setting_is_a_clear_error():
    tm = tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens, pytest.raises(InterventionError, match="memory budget"):
        head_sweep(lens, _batch(tm), memory_budget=1)


def test_recording_adds_at_most_what_it_keeps():
    """Recording every residual (all rows) and the last row's attention adds, at its peak over a plain forward, no
    more than the bytes of the tensors it keeps (+5 %), read by the allocation meter."""
    tm = tiny("llava")
    inputs = _batch(tm)

    def plain():
        with torch.no_grad():
            return tm.model(**inputs).logits

    def record():
        with arbiter.attach(tm.model, tm.processor) as lens, lens.record("resid.post", rows="all") as res, \
                lens.record("attn.probs", rows="last") as att, torch.no_grad():
            tm.model(**inputs)
        return res, att

    plain()
    base, _, _ = memory.measure(plain, "cpu")
    peak, held, (res, att) = memory.measure(record, "cpu")
    kept = sum(t.numel() * t.element_size() for rec in (res, att) for _, t in rec.trace.items())
    n_layers = tm.model.config.text_config.num_hidden_layers
    assert len([k for k, _ in res.trace.items() if k.startswith("L") and k.endswith(".resid.post")]) == n_layers
    assert peak - base <= 1.05 * kept
    assert held <= 1.05 * kept


def test_sizes_in_messages_read_in_their_unit():
    assert [memory.format_bytes(n) for n in (500, 1536, int(1.2 * 2**20), 34 * 2**20, int(3.1 * 2**30))] == \
        ["500 bytes", "1.5 KiB", "1.2 MiB", "34 MiB", "3.1 GiB"]
    assert memory.parse_bytes(memory.format_bytes(34 * 2**20).replace(" ", "")) == 34 * 2**20
