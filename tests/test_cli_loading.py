"""How the command line loads a model: folder or cached hub id, device maps with memory limits and disk offload
(accelerate), dtype, attention implementation, torch threads from the idle cores; options checked before loading."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arbiter import cli, threads
from arbiter.errors import ArbiterError, DataError

ROOT = Path(__file__).resolve().parent.parent
ORGANISM = "llava_tiny"
LOADING = ("--device", "--dtype", "--device-map", "--max-memory", "--offload-folder", "--attn-implementation",
           "--threads")


def _parse(*extra: str, cmd: str = "diagnose"):
    base = {"diagnose": ["diagnose", "--model", "m", "--data", "d", "--out", "o"],
            "steer": ["steer", "--model", "m", "--data", "d", "--report", "r", "--out", "o"],
            "demo": ["demo"]}[cmd]
    return cli.parser().parse_args([*base, *extra])


def _refused(capsys, *extra: str, cmd: str = "diagnose") -> str:
    with pytest.raises(SystemExit) as e:
        _parse(*extra, cmd=cmd)
    assert e.value.code == 2
    return capsys.readouterr().err


def _subparser(name: str):
    action = next(a for a in cli.parser()._actions if a.dest == "cmd")
    return action.choices[name]


# ---------------------------------------------------------------------------------------------- options


def test_diagnose_steer_and_demo_share_one_loading_option_group():
    groups = {}
    for name in ("diagnose", "steer", "demo"):
        g = next(g for g in _subparser(name)._action_groups if g.title == "model loading")
        groups[name] = [(a.option_strings[0], a.default, a.help) for a in g._group_actions]
    assert [o for o, _, _ in groups["diagnose"]] == list(LOADING)
    assert groups["diagnose"] == groups["steer"] == groups["demo"]


def test_loading_defaults_keep_the_single_device_path():
    a = _parse()
    assert (a.device, a.dtype, a.device_map, a.max_memory, a.offload_folder, a.attn_implementation, a.threads) == (
        "cpu", "float32", None, None, None, "sdpa", None)


def test_model_help_names_the_hub_id_form():
    text = _subparser("diagnose").format_help()
    assert "DIR|HUB_ID" in text and "hub id (org/name" in " ".join(text.split())


def test_max_memory_is_parsed_into_bytes_per_device():
    a = _parse("--device-map", "auto", "--max-memory", "0=20GiB, cuda:1=1.5GB,cpu=512MiB,mps=100")
    assert a.max_memory == {0: 20 * 1024**3, 1: 1_500_000_000, "cpu": 512 * 1024**2, "mps": 100}


@pytest.mark.parametrize("value, message", [
    ("cpu", "DEVICE=SIZE expected"),
    ("cpu=", "DEVICE=SIZE expected"),
    ("cpu=3XB", "size expected as a number with a unit"),
    ("cpu=-1GB", "size expected as a number with a unit"),
    ("cpu=0GB", "the size must be positive"),
    ("gpu7=1GB", "device expected as a GPU index"),
    ("disk=1GB", "disk takes no limit"),
    ("cpu=1GB,cpu=2GB", "'cpu' given twice"),
    ("0=1GB,cuda:0=1GB", "given twice"),
])
def test_bad_max_memory_is_refused_before_loading(value, message, capsys):
    err = _refused(capsys, "--device-map", "auto", "--max-memory", value)
    assert "argument --max-memory" in err and message in err


def test_device_map_takes_a_name_inline_json_or_a_json_file(tmp_path):
    for name in ("auto", "balanced", "balanced_low_0", "sequential"):
        assert _parse("--device-map", name).device_map == name
    mapping = {"model.vision_tower": 0, "model.language_model": "cuda:1", "lm_head": "disk"}
    assert _parse("--device-map", json.dumps(mapping)).device_map == mapping
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"model": "cpu", "lm_head": "disk"}))
    assert _parse("--device-map", str(f), cmd="steer").device_map == {"model": "cpu", "lm_head": "disk"}


@pytest.mark.parametrize("value, message", [
    ("everywhere", "not one of auto, balanced, balanced_low_0, sequential, nor a JSON file"),
    ("no_such_map.json", "nor a JSON file"),
    ("{model: 0}", "invalid JSON"),
    ("{}", "a non-empty JSON object"),
    ('{"lm_head": "tpu"}', "'lm_head' -> 'tpu': a device is"),
    ('{"lm_head": -1}', "'lm_head' -> -1"),
    ('{"lm_head": true}', "'lm_head' -> True"),
])
def test_bad_device_map_is_refused_before_loading(value, message, capsys):
    err = _refused(capsys, "--device-map", value)
    assert "argument --device-map" in err and message in err


@pytest.mark.parametrize("cmd", ["diagnose", "steer", "demo"])
def test_device_and_device_map_together_are_refused(cmd, capsys):
    err = _refused(capsys, "--device", "cpu", "--device-map", "auto", cmd=cmd)
    assert "--device and --device-map both given" in err


@pytest.mark.parametrize("extra, message", [
    (["--max-memory", "cpu=1GB"], "--max-memory needs --device-map"),
    (["--offload-folder", "off"], "--offload-folder needs --device-map"),
    (["--max-memory", "cpu=1GB", "--offload-folder", "off"], "--max-memory and --offload-folder need --device-map"),
])
def test_memory_options_without_a_device_map_are_refused(extra, message, capsys):
    assert message in _refused(capsys, *extra)


def test_offload_folder_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("")
    err = _refused(capsys, "--device-map", "auto", "--offload-folder", str(f))
    assert f"--offload-folder {f}: exists and is not a folder" in err


def test_dtype_auto_is_accepted_and_an_unknown_dtype_refused(capsys):
    assert _parse("--dtype", "auto", cmd="demo").dtype == "auto"
    assert "invalid choice: 'float64'" in _refused(capsys, "--dtype", "float64")


def test_threads_below_one_are_refused(capsys):
    assert "argument --threads: 0 must be >= 1" in _refused(capsys, "--threads", "0")


# ---------------------------------------------------------------------------------------------- hub ids


def _python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
             **env)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=e, capture_output=True, text=True, timeout=120)


def test_hub_id_missing_from_the_cache_is_refused_before_torch_loads(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"context": "c", "question": "q", "target": "vision", "answer_vision": "a",
                                "answer_text": "b"}) + "\n")
    r = _python("import sys\nfrom arbiter import cli\n"
                "rc = cli.main(['diagnose', '--model', 'some-org/some-model', "
                f"'--data', {str(data)!r}, '--out', 'o'])\n"
                "print(rc, 'torch' in sys.modules)", tmp_path, HF_HUB_CACHE=str(tmp_path / "empty_cache"),
                HF_HUB_OFFLINE="1")
    assert r.stdout.split() == ["2", "False"], r.stderr
    assert ("--model some-org/some-model: no such folder, and the hub id some-org/some-model is not in the local "
            "Hugging Face cache; arbiter downloads nothing") in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_path_that_is_neither_a_folder_nor_a_hub_id_is_refused(tmp_path):
    with pytest.raises(DataError, match="no such folder, and not a hub id"):
        cli._resolve_model(str(tmp_path / "no" / "such" / "model"))


def _fake_hub_cache(cache: Path, repo: str, files: Path, complete: bool = True) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    shutil.copytree(files, snap)
    if not complete:
        (snap / "config.json").unlink()
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_cached_hub_id_resolves_to_its_snapshot(hub_cache, tmp_path):
    src = tmp_path / "files"
    src.mkdir()
    (src / "config.json").write_text("{}")
    snap = _fake_hub_cache(hub_cache, "acme/tiny-vlm", src)
    assert cli._resolve_model("acme/tiny-vlm") == (str(snap), "acme/tiny-vlm")


def test_cached_hub_id_without_config_is_a_partial_download(hub_cache, tmp_path):
    src = tmp_path / "files"
    src.mkdir()
    (src / "config.json").write_text("{}")
    _fake_hub_cache(hub_cache, "acme/partial", src, complete=False)
    with pytest.raises(DataError, match="without its config.json .a partial download"):
        cli._resolve_model("acme/partial")


# ---------------------------------------------------------------------------------------------- threads


@pytest.fixture
def machine(monkeypatch):
    """Fakes the machine: ``machine(cores, load)`` (load None: the OS gives no load average)."""
    monkeypatch.delenv(threads.ENV, raising=False)

    def set_(cores: int, load: float | None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        if load is None:
            def no_load():
                raise OSError("no load average")
            monkeypatch.setattr(os, "getloadavg", no_load)
        else:
            monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    return set_


@pytest.mark.parametrize("cores, load, expected", [
    (2, 0.2, 2),    # quiet: every core
    (2, 3.9, 1),    # two busy loops and more beside: at least one
    (8, 2.8, 5),    # round(5.2)
    (8, 2.2, 6),    # round(5.8)
    (4, None, 4),   # no load average: every core
])
def test_default_threads_are_the_idle_cores(machine, cores, load, expected):
    machine(cores, load)
    choice = threads.choose_threads()
    assert (choice.count, choice.source, choice.cores) == (expected, "idle cores", cores)
    assert threads.idle_cores() == expected


def test_idle_cores_are_capped(machine):
    machine(16, 0.0)
    assert threads.choose_threads(cap=4).count == 4
    assert threads.idle_cores(cap=4) == 4
    machine(16, 15.7)
    assert threads.choose_threads(cap=4).count == 1


def test_env_and_argument_override_the_idle_cores(machine, monkeypatch):
    machine(2, 3.9)
    monkeypatch.setenv(threads.ENV, "3")
    assert (threads.choose_threads().count, threads.choose_threads().source) == (3, "ARBITER_THREADS")
    assert threads.choose_threads(cap=1).count == 3   # an explicit count is not capped
    assert (threads.choose_threads(5).count, threads.choose_threads(5).source) == (5, "--threads")


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_threads_variable_is_a_clear_error(machine, monkeypatch, value):
    machine(2, 0.0)
    monkeypatch.setenv(threads.ENV, value)
    with pytest.raises(ArbiterError, match=f"ARBITER_THREADS='{value}': must be a positive integer"):
        threads.choose_threads()


def test_thread_count_below_one_is_a_clear_error(machine):
    machine(2, 0.0)
    with pytest.raises(ArbiterError, match="--threads 0: must be >= 1"):
        threads.choose_threads(0)


def test_thread_choice_describes_itself(machine):
    machine(2, 3.94)
    assert threads.choose_threads().describe() == "1 torch thread (idle cores: load 3.9 on 2 cores)"
    assert threads.choose_threads(4).describe() == "4 torch threads (--threads)"


def test_surrogate_workers_read_the_same_idle_cores(machine):
    import torch

    from arbiter.surrogate.oscillators import resolve_workers

    machine(8, 5.0)
    assert resolve_workers(None) == min(torch.get_num_threads(), 3)
    machine(8, 9.0)
    assert resolve_workers(None) == 1


def _sample() -> dict:
    return {"id": "s0", "context": "The circle is red.", "instruction": "Trust the image.",
            "question": "What colour is the circle?", "target": "vision", "answer_vision": "blue",
            "answer_text": "red"}


@pytest.mark.parametrize("extra, env, expected", [
    (["--threads", "2"], None, "2 torch threads (--threads)"),
    ([], "3", "3 torch threads (ARBITER_THREADS)"),
    (["--threads", "1"], "3", "1 torch thread (--threads)"),
])
def test_command_sets_prints_and_restores_its_thread_count(tmp_path, monkeypatch, capsys, extra, env, expected):
    import torch

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(_sample()) + "\n")
    if env is None:
        monkeypatch.delenv(threads.ENV, raising=False)
    else:
        monkeypatch.setenv(threads.ENV, env)
    seen = []

    class Reached(Exception):
        pass

    def loader(path, device, dtype, **placement):
        seen.append(torch.get_num_threads())
        raise Reached
    monkeypatch.setattr(cli, "load_model", loader)
    before = torch.get_num_threads()
    with pytest.raises(Reached):
        cli.main(["diagnose", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o"), *extra])
    assert seen == [int(expected.split()[0])]
    assert f"[arbiter] loading {model} on cpu in float32, attention sdpa; {expected}" in capsys.readouterr().out
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def organism_dir():
    from arbiter import organisms

    d = organisms.path(ORGANISM)
    if not (d / "config.json").is_file():
        pytest.skip(f"organism {ORGANISM} not installed")
    return d


def _logits(model, processor):
    import torch
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": "What colour?"}]}],
                                           add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def test_dtype_auto_keeps_the_checkpoint_dtype(organism_dir):
    import torch
    from safetensors import safe_open

    with safe_open(str(organism_dir / "model.safetensors"), framework="pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored == {"F16"}  # the organisms ship float16 weights
    assert cli.load_model(str(organism_dir), dtype="auto")[0].dtype == torch.float16
    assert cli.load_model(str(organism_dir), dtype="bfloat16")[0].dtype == torch.bfloat16


def test_attention_implementation_reaches_the_model(organism_dir):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert cli.load_model(str(organism_dir), attn_implementation="eager")[0].config._attn_implementation == "eager"
    AttentionInterface.register("arbiter_test_kernel", sdpa_attention_forward)
    model, _ = cli.load_model(str(organism_dir), attn_implementation="arbiter_test_kernel")
    assert model.config._attn_implementation == "arbiter_test_kernel"


def test_unknown_attention_implementation_is_a_clear_error(organism_dir):
    with pytest.raises(DataError, match="--attn-implementation fancy: transformers knows no such attention "
                                        "implementation; known here: eager, .*sdpa"):
        cli.load_model(str(organism_dir), attn_implementation="fancy")


def test_gpu_in_a_device_map_without_cuda_is_a_clear_error(organism_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(DataError, match="name GPU 0, but torch sees no CUDA device"):
        cli.load_model(str(organism_dir), device_map={"": 0})
    with pytest.raises(DataError, match="name GPU 1, but torch sees no CUDA device"):
        cli.load_model(str(organism_dir), device_map="auto", max_memory={1: 10**9, "cpu": 10**9})


DEVICE_MAP = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
              "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
              "model.language_model.layers.1": "disk", "model.language_model.layers.2": "cpu",
              "model.language_model.layers.3": "disk", "model.language_model.layers.4": "cpu",
              "model.language_model.layers.5": "cpu", "model.language_model.norm": "cpu",
              "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_json_device_map_with_disk_offload_gives_the_single_device_logits(organism_dir, tmp_path):
    """Layers 1 and 3 on disk, read from the float16 checkpoint and cast to float32 like the rest."""
    import torch

    ref, processor = cli.load_model(str(organism_dir))
    model, _ = cli.load_model(str(organism_dir), device_map=DEVICE_MAP, offload_folder=str(tmp_path / "off"))
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert model.model.language_model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    torch.testing.assert_close(_logits(model, processor), _logits(ref, processor), rtol=0, atol=1e-6)


def test_device_map_splitting_tied_weights_is_a_clear_error(organism_dir, tmp_path):
    """lm_head (tied to the embeddings) on disk, the embeddings on cpu: transformers writes no disk copy of
    lm_head.weight, so the first forward would raise a KeyError inside accelerate; the loader says so first."""
    with pytest.raises(DataError, match=r"offloads lm_head.weight to disk, but transformers wrote no disk copy of it "
                                        r"\(lm_head.weight is tied to model.language_model.embed_tokens.weight"):
        cli.load_model(str(organism_dir), device_map={**DEVICE_MAP, "lm_head": "disk"},
                       offload_folder=str(tmp_path / "off"))


def test_cached_hub_id_loads_the_cached_weights(hub_cache, organism_dir):
    import torch
    import transformers

    _fake_hub_cache(hub_cache, "acme/llava-tiny", organism_dir)
    model, _ = cli.load_model("acme/llava-tiny", dtype="auto")
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(organism_dir, dtype=torch.float16)
    state, expected = model.state_dict(), ref.state_dict()
    assert state.keys() == expected.keys() and len(state) > 100
    for k, v in expected.items():
        assert state[k].equal(v), k


# ---------------------------------------------------------------------------------------------- acceptance


def _floats(x, path=""):
    """Every float of a JSON document by its path (timings left out: wall times differ between runs)."""
    if isinstance(x, dict):
        for k, v in x.items():
            if k not in ("timing_s", "seconds"):
                yield from _floats(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _floats(v, f"{path}[{i}]")
    elif isinstance(x, float):
        yield path, x


@pytest.mark.slow
def test_diagnose_with_device_map_max_memory_and_disk_offload_gives_the_single_device_report(tmp_path, capsys):
    """`arbiter diagnose --device-map auto --max-memory cpu=3MB --offload-folder DIR` (a 5.3 MB float32 model: part
    on the CPU, the rest offloaded to disk) writes the report of the single-device run: every float within 1e-5."""
    from arbiter import organisms

    model, processor, _ = organisms.load(ORGANISM)
    saved = tmp_path / "model"
    model.save_pretrained(saved)  # float32 safetensors
    processor.save_pretrained(saved)
    data = str(organisms.path(ORGANISM) / "data" / "data.jsonl")
    common = ["diagnose", "--model", str(saved), "--data", data, "--limit", "4", "--window", "3",
              "--random-draws", "2", "--batch-size", "4", "--skip", "shapley,keyspace,imbalance,surrogate,attractors"]
    assert cli.main([*common, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert cli.main([*common, "--out", str(tmp_path / "spread"), "--device-map", "auto", "--max-memory", "cpu=3MB",
                     "--offload-folder", str(tmp_path / "offload")]) == 0
    log = capsys.readouterr().out
    placed = next(ln for ln in log.splitlines() if ln.startswith("[arbiter] device map: "))
    assert "cpu: " in placed and "disk: " in placed, placed  # both kinds of placement happened
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    spread = json.loads((tmp_path / "spread" / "report.json").read_text())
    a, b = dict(_floats(one)), dict(_floats(spread))
    assert a.keys() == b.keys() and len(a) > 500
    far = {p: (a[p], b[p]) for p in a if not (math.isnan(a[p]) and math.isnan(b[p])) and abs(a[p] - b[p]) > 1e-5}
    assert not far, list(far.items())[:5]
    assert one["mfr"] == spread["mfr"] and one["heads"]["ranking"] == spread["heads"]["ranking"]
