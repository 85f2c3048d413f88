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


def test_a_budget_bounds_the_settings_per_forward_and_leaves_the_values():
    tm = tiny("llava")
    inputs = _batch(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        free = head_sweep(lens, inputs, chunk=16, memory_budget=2**40)
        peak = free.clean_peak_bytes
        assert peak and peak > 0
        bound = head_sweep(lens, inputs, chunk=16, memory_budget=int(peak * 3.5))
    assert free.chunk == 16 and bound.chunk == 3                 # floor(3.5 peaks / 1 peak per setting)
    n = len(bound.settings)
    assert bound.forwards == -(-n // 3) and free.forwards == -(-n // 16)
    torch.testing.assert_close(bound.values, free.values, atol=1e-5, rtol=0)


def test_a_budget_below_one_setting_is_a_clear_error():
    tm = tiny("llava")
    with arbiter.attach(tm.model, tm.processor) as lens, pytest.raises(InterventionError, match="memory budget"):
        head_sweep(lens, _batch(tm), memory_budget=1)
