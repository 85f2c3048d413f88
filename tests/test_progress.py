"""Progress bars of the Python API: labelled, on a terminal only by default, switched by progress= and
ARBITER_PROGRESS."""

from __future__ import annotations

import io

import pytest
from helpers import _tiny

import arbiter
from arbiter.data import generate_synthetic
from arbiter.errors import DataError
from arbiter.experiments.baseline import evaluate
from arbiter.experiments.heads import amplification_experiment, exhaustive_ranking
from arbiter.experiments.knockout_map import knockout_map
from arbiter.progress import ENV, bars_disabled, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn"), 8, seed=0, image_size=64)


def test_off_gives_the_iterable_itself(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    items = [1, 2, 3]
    assert progress_bar(items, "x", progress=False) is items
    monkeypatch.setenv(ENV, "0")
    assert progress_bar(items, "x", progress=True) is items
    bar = progress_bar(None, "x", total=3)          # a bar updated by hand: a no-op stand-in
    bar.update(1)
    bar.close()


def test_a_terminal_gets_a_labelled_bar_and_a_pipe_none(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert bars_disabled(True) is None and bars_disabled(False) is True
    tty, pipe = _Terminal(), io.StringIO()
    assert list(progress_bar(range(3), "head sweep: layer×head", file=tty)) == [0, 1, 2]
    assert "head sweep: layer×head" in tty.getvalue() and "3/3" in tty.getvalue()
    assert list(progress_bar(range(3), "head sweep: layer×head", file=pipe)) == [0, 1, 2]
    assert pipe.getvalue() == ""


def test_the_environment_forces_bars_on_or_off(monkeypatch):
    pipe = io.StringIO()
    monkeypatch.setenv(ENV, "1")
    list(progress_bar(range(2), "batches", file=pipe))
    assert "batches" in pipe.getvalue() and "2/2" in pipe.getvalue()
    assert bars_disabled(False) is True              # an explicit progress=False still wins
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(DataError, match="ARBITER_PROGRESS"):
        bars_disabled(True)


def test_experiments_show_what_they_sweep(synth, monkeypatch, capsys):
    tm = _tiny("llava")
    monkeypatch.setenv(ENV, "1")                     # stderr is captured, not a terminal: force the bars
    with arbiter.attach(tm.model, tm.processor) as lens:
        capsys.readouterr()
        evaluate(lens, synth.samples, 4, synth, generate=False)
        knockout_map(lens, synth.samples, edges=[("image", "last")], window=1, batch_size=4, dataset=synth)
        exhaustive_ranking(lens, synth.samples, 4, dataset=synth)
        amplification_experiment(lens, synth.samples, [False] * len(synth.samples), [(0, 0)], alphas=(2.0,),
                                 n_random=1, batch_size=4, dataset=synth)
        err = capsys.readouterr().err
        for label in ("baseline: batches", "knockout map:", "head sweep: layer×head", "amplification α=2"):
            assert label in err, label
        knockout_map(lens, synth.samples, edges=[("image", "last")], window=1, batch_size=4, dataset=synth,
                     progress=False)
        assert capsys.readouterr().err == ""
