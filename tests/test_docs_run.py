"""The documentation runs: every ```python block of README.md, docs/**/*.md and the organisms' README executes as
written, on the shipped organisms.

Files are found when the tests are collected, so new docs pages are covered without touching this file. Each
block runs in a fresh namespace (blocks do not build on each other: a reader can copy any one of them), in a
temporary working directory (files a block writes land there), with one torch thread (tests/conftest.py). A block
is compiled under its markdown file's name, padded to its line numbers: tracebacks point at the docs' own lines,
and nnsight, which reads a trace's body back from the source file, finds it there."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted({ROOT / "README.md", *(ROOT / "docs").glob("**/*.md"), ROOT / "arbiter" / "organisms" / "README.md"})
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block of a markdown file, dedented to its fence."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        if m.group("lang").strip().split(" ")[0].lower() not in ("python", "py", "python3"):
            continue
        indent = len(m.group("indent"))
        code = "\n".join(line[indent:] for line in m.group("body").splitlines())
        out.append((text.count("\n", 0, m.start("body")) + 1, code))
    return out


BLOCKS = [pytest.param(path, line, code, id=f"{path.relative_to(ROOT)}:{line}")
          for path in DOC_FILES if path.is_file() for line, code in python_blocks(path)]


def test_the_readme_has_python_blocks_to_run():
    """Guards the discovery: a fence regex that matched nothing would make every docs test vanish."""
    readme = [b for b in BLOCKS if b.values[0].name == "README.md" and b.values[0].parent == ROOT]
    assert len(readme) >= 4


def test_block_extraction_finds_fenced_python_only(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("text\n```python\na = 1\n```\n\n```bash\nls\n```\n- item\n  ```python\n  b = 2\n  ```\n```\nc\n```\n")
    assert python_blocks(md) == [(3, "a = 1"), (11, "b = 2")]


@pytest.mark.slow
@pytest.mark.parametrize("path, line, code", BLOCKS)
def test_docs_block_runs(path, line, code, tmp_path, monkeypatch, capsys):
    import torch

    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_block_{path.stem}_{line}"}
    t0, c0 = time.perf_counter(), time.process_time()
    # padded so that a traceback names the markdown file's own line numbers
    sentinel = "\n__docs_block_finished__ = True\n"   # set only when the block ran to its last line
    exec(compile("\n" * (line - 1) + code + sentinel, str(path), "exec"), namespace)  # noqa: S102 - the docs' code
    assert namespace.get("__docs_block_finished__") is True
    with capsys.disabled():  # the timing of each block, to keep the docs' stated timings honest
        print(f"\n[docs] {path.relative_to(ROOT)}:{line}: {time.perf_counter() - t0:.1f} s wall, "
              f"{time.process_time() - c0:.1f} s CPU", end="", file=sys.__stderr__)
