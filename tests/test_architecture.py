"""The layout docs/architecture.md describes, checked on the source: no import cycle between
modules, and no stage importing a stage above it or its peer (every import counts, also the
lazy ones inside functions: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Stages of the user's path, lowest first. Each may import the shared modules (config, io, errors,
# models, registry, presets, ...) and the stages below it; train and evaluate are peers on data/.
STAGE_RANK = {"data": 1, "train": 2, "evaluate": 2, "export": 3, "cycle": 4, "review": 5}
TOP = {"edentune.cli", "edentune.__main__", "edentune.quickstart"}  # the entry points above every stage


def modules() -> dict[str, Path]:
    found = {}
    for f in (SRC / "edentune").rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the edentune modules it imports (a name imported from a package counts as the
    submodule when there is one; a submodule importing its own package's __init__ does not count)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                        if node.level else node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target.startswith("edentune") and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGE_RANK) else None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            component.append(v)
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def forbidden(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in edges.items():
        s = stage(src)
        for dst in targets:
            d = stage(dst)
            if src in TOP:
                continue
            if s is None and d is not None:
                bad.append(f"{src} (shared) -> {dst} (stage {d})")
            elif s and d and s != d and STAGE_RANK.get(d, 0) >= STAGE_RANK.get(s, 0):
                bad.append(f"{src} ({s}) -> {dst} ({d})")
    return sorted(bad)


def test_no_import_cycles():
    assert cycles(imports(modules())) == []


def test_stages_import_only_downwards():
    assert forbidden(imports(modules())) == []


def test_the_checks_catch_what_they_look_for():
    # The same functions on a made-up graph: a cycle and both kinds of bad edge are reported.
    edges = {"edentune.train.a": {"edentune.evaluate.b"}, "edentune.evaluate.b": {"edentune.train.a"},
             "edentune.data.c": {"edentune.cycle.d"}, "edentune.cycle.d": {"edentune.data.c"},
             "edentune.io": {"edentune.export.e"}, "edentune.export.e": set()}
    assert sorted(map(tuple, cycles(edges))) == [("edentune.cycle.d", "edentune.data.c"), ("edentune.evaluate.b", "edentune.train.a")]
    assert forbidden(edges) == ["edentune.data.c (data) -> edentune.cycle.d (cycle)",
                                "edentune.evaluate.b (evaluate) -> edentune.train.a (train)",
                                "edentune.io (shared) -> edentune.export.e (stage export)",
                                "edentune.train.a (train) -> edentune.evaluate.b (evaluate)"]
