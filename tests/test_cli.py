"""The ``arbiter`` command line: quick to start (no torch for --help), every option explained with its default,
inputs checked before any model loads, each command taking only the options it uses."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from arbiter import cli

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "numpy", "PIL")


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                out[name] = p
                out.update({f"{name} {k}": v for k, v in _subparsers(p).items()})
    return out


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    ps = _subparsers(cli.parser())
    ps.update(_subparsers(cli._surrogate_parser()))  # the surrogate commands, built when they run
    return ps


def _option_block(help_text: str, option: str) -> str:
    """The lines of ``help_text`` that describe ``option`` (its line up to the next option or section)."""
    lines = help_text.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"\s+{re.escape(option)}\b", ln))
    block = [lines[start]]
    for ln in lines[start + 1:]:
        if re.match(r"\s{0,4}-", ln) or not ln.strip() or not ln.startswith(" "):
            break
        block.append(ln)
    return " ".join(block)


# ---------------------------------------------------------------------------------------------- start-up


def test_import_arbiter_and_building_the_help_import_no_heavy_module(tmp_path):
    r = _python("import sys, arbiter, arbiter.cli as c\n"
                "c.parser().format_help()\n"
                f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_help_of_each_command_imports_no_torch(tmp_path):
    code = ("import sys\nfrom arbiter import cli\n"
            "for cmd in ([], ['diagnose'], ['demo'], ['steer'], ['surrogate'], ['surrogate', 'fit'], ['surrogate', 'sweep']):\n"
            "    try:\n        cli.main([*cmd, '--help'])\n    except SystemExit as e:\n        assert e.code == 0, e\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)")
    r = _python(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "False False"
    assert "diagnose" in r.stdout and "--organism" in r.stdout and "--report" in r.stdout


def test_python_dash_m_arbiter_help_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "arbiter", "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ("diagnose", "demo", "steer", "surrogate"):
        assert cmd in r.stdout


def test_every_public_name_resolves_to_its_defining_module():
    import arbiter
    import arbiter.adapters
    import arbiter.groups
    import arbiter.lens
    import arbiter.probes
    import arbiter.trace

    homes = {"adapters": arbiter.adapters, "groups": arbiter.groups, "lens": arbiter.lens, "probes": arbiter.probes,
             "trace": arbiter.trace, "errors": arbiter.errors}
    for name in arbiter.__all__:
        owner = next(m for m in homes.values() if name in vars(m))
        assert getattr(arbiter, name) is vars(owner)[name], name
    assert {"attach", "Trace", "TraceWriter", "Probe", "SITES", "DataError"} <= set(arbiter.__all__)
    assert "attach" in dir(arbiter)
    assert arbiter.report.__name__ == "arbiter.report"      # submodules reachable as attributes
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        arbiter.no_such_name


# ---------------------------------------------------------------------------------------------- help text


def test_every_option_has_help_and_shows_its_default():
    for name, p in _all_parsers().items():
        text = p.format_help()
        for action in p._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction,)):
                continue
            opt = action.option_strings[-1]
            assert action.help and action.help.strip(), (name, opt)
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if action.required or flag:
                continue
            block = _option_block(text, opt)
            assert "default" in block.lower(), (name, opt, block)
            if isinstance(action.default, (tuple, list)) and action.default:
                assert ",".join(map(str, action.default)) in block.replace(" ", ""), (name, opt, block)
            elif action.default is not None and action.default != ():
                assert str(action.default) in block, (name, opt, block)


def test_help_cites_no_unpublished_document():
    for name, p in {"arbiter": cli.parser(), **_all_parsers()}.items():
        text = p.format_help()
        for word in ("SPEC", "§", "section ", "[PB]", "[IA]", "[MI]", "[KS]"):
            assert word not in text, (name, word)


def test_every_docs_page_the_help_cites_exists():
    texts = [p.format_help() for p in {"arbiter": cli.parser(), **_all_parsers()}.values()]
    texts.append(Path(cli.__file__).read_text())  # error messages too
    cited = {m for t in texts for m in re.findall(r"docs/[\w/.-]+\.md", t.replace("\n", " "))}
    assert {"docs/methods.md", "docs/methods/conflict-samples.md", "docs/methods/knockout.md"} <= cited
    for page in cited:
        assert (ROOT / page).is_file(), page


def test_diagnose_options_left_at_their_defaults_give_the_default_config(tmp_path):
    """The command line and the Python API share one DiagnoseConfig: no option given, no setting changed."""
    from arbiter.diagnose_config import DiagnoseConfig

    data = _write(tmp_path / "d.jsonl", [_sample(0)])
    args = cli.parser().parse_args(["diagnose", "--model", str(tmp_path), "--data", str(data), "--out", "o"])
    assert cli.diagnose_config(args) == DiagnoseConfig()
    changed = cli.parser().parse_args(["diagnose", "--model", str(tmp_path), "--data", str(data), "--out", "o",
                                            "--window", "3", "--skip", "keyspace", "--modality-limit", "0"])
    assert cli.diagnose_config(changed) == DiagnoseConfig(window=3, skip=("keyspace",), modality_limit=None)


def test_demo_lists_the_installed_organisms():
    from arbiter import organisms

    text = _subparsers(cli.parser())["demo"].format_help()
    for name in organisms.available():
        assert name in text


# ---------------------------------------------------------------------------------------------- options per command


@pytest.mark.parametrize("option", [["--window", "3"], ["--head-methods", "dla"], ["--no-generate"],
                                    ["--skip", "shapley"], ["--modality-limit", "4"]])
def test_steer_rejects_options_of_the_diagnosis(option, capsys):
    base = ["steer", "--model", "m", "--data", "d.jsonl", "--report", "r", "--out", "o"]
    assert cli.parser().parse_args(base).fn is cli._steer
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args([*base, *option])
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_demo_takes_device_and_dtype():
    a = cli.parser().parse_args(["demo", "--device", "cuda", "--dtype", "bfloat16"])
    assert (a.device, a.dtype, a.out, a.window, a.limit) == ("cuda", "bfloat16", "arbiter-demo", 3, 96)
    d = cli.parser().parse_args(["diagnose", "--model", "m", "--data", "d", "--out", "o"])
    assert (d.device, d.dtype, d.window, d.limit) == ("cpu", "float32", 9, None)


def test_demo_loads_the_organism_in_the_asked_dtype(monkeypatch, tmp_path):
    from arbiter import organisms

    seen = {}

    class Loaded(Exception):
        pass

    def fake_load(model, device, dtype, **placement):
        seen.update(model=model, device=device, dtype=dtype)
        raise Loaded

    monkeypatch.setattr(cli, "load_model", fake_load)
    with pytest.raises(Loaded):
        cli.main(["demo", "--out", str(tmp_path), "--dtype", "bfloat16", "--organism", "qwen2vl_tiny"])
    assert seen == {"model": str(organisms.path("qwen2vl_tiny")), "device": "cpu", "dtype": "bfloat16"}


def test_demo_with_an_unknown_organism_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--organism", "no_such_organism"]) == 2
    err = capsys.readouterr().err
    assert "--organism no_such_organism: no such organism; shipped here: " in err and "llava_tiny" in err


def test_demo_on_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cli.main(["demo", "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "must be >= 1"),
    (["--top", "1.5"], "must be in (0, 1]"),
    (["--skip", "shapley,nope"], "nope not among"),
    (["--head-methods", "exhaustive,fancy"], "fancy not among"),
    (["--batch-size", "x"], "'x' is not an integer"),
])
def test_bad_option_values_are_refused_by_the_parser(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(["diagnose", "--model", "m", "--data", "d", "--out", "o", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_option_lists_are_parsed():
    a = cli.parser().parse_args(["diagnose", "--model", "m", "--data", "d", "--out", "o",
                                 "--skip", " keyspace, surrogate", "--head-methods", "dla,exhaustive"])
    assert a.skip == ("keyspace", "surrogate") and a.head_methods == ("dla", "exhaustive")
    s = cli.parser().parse_args(["steer", "--model", "m", "--data", "d", "--report", "r", "--out", "o",
                                 "--alpha", "0.5, 3"])
    assert s.alpha == (0.5, 3.0)


# ---------------------------------------------------------------------------------------------- inputs checked first


def _sample(i: int, conflict: bool = True, label: str | None = None) -> dict:
    d = {"id": f"s{i}", "context": "The circle is red.", "instruction": "Trust the image.",
         "question": "What colour is the circle?", "target": "vision", "answer_vision": "blue",
         "answer_text": "red" if conflict else "blue"}
    if not conflict:
        d["conflict"] = False
    if label is not None:
        d["label"] = label
    return d


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Model loading fails the test if it is reached; the model folder looks valid."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(cli, "load_model", refuse)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _diagnose(model, data, out, *extra):
    return cli.main(["diagnose", "--model", str(model), "--data", str(data), "--out", str(out), *extra])


@pytest.mark.parametrize("content", ["", "\n\n", json.dumps({"arbiter_dataset": 1}) + "\n"])
def test_empty_data_file_is_an_error_before_the_model_loads(content, tmp_path, model_dir, no_model, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    assert _diagnose(model_dir, data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"--data {data}: the file has no samples" in err
    assert not (tmp_path / "out").exists()


def test_empty_data_file_is_reported_with_a_missing_model_folder_too(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert _diagnose(tmp_path / "nope", data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "the file has no samples" in err


def test_data_without_conflict_samples_is_an_error_before_the_model_loads(tmp_path, model_dir, no_model, capsys):
    data = _write(tmp_path / "agree.jsonl", [_sample(0, conflict=False), _sample(1, conflict=False)])
    assert _diagnose(model_dir, data, tmp_path / "out") == 2
    assert "none of its 2 samples is a conflict sample" in capsys.readouterr().err


def test_malformed_and_missing_data_files_are_errors_before_the_model_loads(tmp_path, model_dir, no_model, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_sample(0)) + "\n{not json\n")
    assert _diagnose(model_dir, bad, tmp_path / "out") == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    assert _diagnose(model_dir, tmp_path / "missing.jsonl", tmp_path / "out") == 2
    assert "no such data file" in capsys.readouterr().err


def test_labelled_data_without_conflicts_passes_for_the_attractors_step(tmp_path, model_dir, monkeypatch, capsys):
    """A classification data set (label set, no conflict) runs the attractors step alone; skipping that step
    leaves nothing to run, which is an error."""
    header = {"arbiter_dataset": 1, "labels": ["red", "blue"]}
    data = _write(tmp_path / "labels.jsonl", [header, _sample(0, conflict=False, label="blue"),
                                              _sample(1, conflict=False, label="red")])

    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached
    monkeypatch.setattr(cli, "load_model", reached)
    with pytest.raises(Reached):
        _diagnose(model_dir, data, tmp_path / "out")
    assert "only the attractors step" in capsys.readouterr().out
    assert _diagnose(model_dir, data, tmp_path / "out", "--skip", "attractors") == 2
    assert "none of its 2 samples is a conflict sample" in capsys.readouterr().err


def test_valid_inputs_reach_the_model_loader(tmp_path, model_dir, monkeypatch):
    data = _write(tmp_path / "ok.jsonl", [_sample(0), _sample(1, conflict=False)])
    calls = []

    class Reached(Exception):
        pass

    def reached(path, device, dtype, **placement):
        calls.append((path, device, dtype))
        raise Reached
    monkeypatch.setattr(cli, "load_model", reached)
    with pytest.raises(Reached):
        _diagnose(model_dir, data, tmp_path / "out", "--dtype", "bfloat16")
    assert calls == [(str(model_dir), "cpu", "bfloat16")]


def test_steer_checks_data_and_report_before_the_model_loads(tmp_path, model_dir, no_model, capsys):
    data = _write(tmp_path / "agree.jsonl", [_sample(0, conflict=False)])
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"model": {}, "mfr": {"skipped": "no conflict sample"},
                                  "heads": {"skipped": "no conflict sample"}}))
    rc = cli.main(["steer", "--model", str(model_dir), "--data", str(data), "--report", str(report),
                   "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "none of its 1 samples is a conflict sample" in err
    assert "the diagnosis has no head ranking (no conflict sample)" in err
    rc = cli.main(["steer", "--model", str(model_dir), "--data", str(data), "--report", str(tmp_path / "none"),
                   "--out", str(tmp_path / "s")])
    assert rc == 2 and "no report at" in capsys.readouterr().err


def test_console_script_reports_an_empty_data_file(tmp_path):
    """The acceptance line, end to end: `arbiter diagnose --data EMPTY` exits non-zero with the reason."""
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "arbiter", "diagnose", "--model", str(tmp_path / "no_model"),
                        "--data", str(data), "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "the file has no samples" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_bad_data_is_reported_before_torch_is_even_imported(tmp_path, model_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    r = _python("import sys\nfrom arbiter import cli\n"
                f"rc = cli.main(['diagnose', '--model', {str(model_dir)!r}, '--data', {str(data)!r}, '--out', 'o'])\n"
                "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)", tmp_path)
    assert r.stdout.split() == ["2", "False", "False"], r.stderr
    assert "the file has no samples" in r.stderr
