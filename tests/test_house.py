"""House rules read off the package's source: the trace schema is spelled in trace.py alone, no private name is
imported across modules, and no two modules import each other when the package loads."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "arbiter"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(name: str, f: Path, modules: dict[str, Path]):
    """(imported module or name, imported at load time, line) of every ``from arbiter... import`` in ``f``."""
    tree = ast.parse(f.read_text())
    package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if not target.startswith("arbiter"):
            continue
        for alias in node.names:
            full = f"{target}.{alias.name}"
            yield (full if full in modules else target), alias.name, id(node) in top_level, node.lineno


def test_no_private_name_is_imported_across_modules():
    modules = _modules()
    crossing = []
    for name, f in modules.items():
        for module, imported, _, line in _imports(name, f, modules):
            path = module.split(".") + ([] if module.endswith(imported) else [imported])
            if module != name and any(p.startswith("_") and not p.startswith("__") for p in path):
                crossing.append(f"{name}:{line} imports {module}.{imported}" if not module.endswith(imported)
                                else f"{name}:{line} imports {module}")
    assert crossing == []


def test_no_import_cycle_when_the_package_loads():
    modules = _modules()
    graph = {name: {m for m, _, top, _ in _imports(name, f, modules) if top and m in modules and m != name}
             for name, f in modules.items()}
    # a module importing its own package's __init__ (or a parent package) is how Python loads it, not a cycle
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_trace_keys_are_spelled_in_trace_py_alone():
    spelled = [f"{f.relative_to(PACKAGE.parent)}:{i}" for f in PACKAGE.rglob("*.py") if f.name != "trace.py"
               for i, line in enumerate(f.read_text().splitlines(), 1)
               if re.search(r'f"L\{[^}]+\}\.', line) or re.search(r'"(rows|rowmask)\.', line)]
    assert spelled == []
