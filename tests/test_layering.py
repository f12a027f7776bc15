"""The package's imports run one way: no circle, and no import against the layers
ops <- format <- families <- runtime <- sampling <- learn / parallel <- digits plug-in <- CLI <- the package facade.

Every ``import`` in ``l2c_kernels`` is read from the source (function-local ones included), so a lazy import that
works around a circle counts as the circle it is."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "l2c_kernels"

#: each module's layer, by the longest matching prefix. Sampling: the one loop, the schedulers and the pipeline
#: builders (the package l2c_kernels.sampling); the digits plug-in is l2c_kernels.models.
LAYERS = {
    "ops": ["l2c_kernels.ops", "l2c_kernels._build", "l2c_kernels._machine", "l2c_kernels.metrics",
            "l2c_kernels.timing"],
    "format": ["l2c_kernels.schedule"],
    "families": ["l2c_kernels.adapters", "l2c_kernels.schedules"],
    "runtime": ["l2c_kernels.runtime"],
    "sampling": ["l2c_kernels.sampling"],
    "learn": ["l2c_kernels.learn"],
    "parallel": ["l2c_kernels.parallel"],
    "plugin": ["l2c_kernels.models"],
    "cli": ["l2c_kernels.cli", "l2c_kernels.plots"],
    "facade": ["l2c_kernels"],
}
#: a layer imports its own and lower ranks; learn and parallel are siblings and import neither way
RANK = dict(ops=0, format=1, families=2, runtime=3, sampling=4, learn=5, parallel=5, plugin=6, cli=7, facade=8)


def modules(root: Path = ROOT) -> dict:
    out = {}
    for p in sorted((root / PKG).rglob("*.py")):
        mod = ".".join(p.relative_to(root).with_suffix("").parts)
        out[mod[: -len(".__init__")] if mod.endswith(".__init__") else mod] = p
    return out


def imports(files: dict) -> dict:
    """``{module: {imported package module, ...}}``: every import statement, resolved to the module it names."""
    graph = defaultdict(set)
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def layer(mod: str) -> str:
    best = max(((name, p) for name, ps in LAYERS.items() for p in ps if mod == p or mod.startswith(p + ".")),
               key=lambda x: len(x[1]), default=None)
    if best is None:
        raise KeyError(f"{mod} has no layer in LAYERS")
    return best[0]


def against_direction(graph: dict) -> list:
    bad = []
    for mod, targets in graph.items():
        for t in targets:
            a, b = layer(mod), layer(t)
            if RANK[b] > RANK[a] or (a != b and RANK[a] == RANK[b]):
                bad.append(f"{mod} ({a}) imports {t} ({b})")
    return sorted(bad)


def circles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan), a package's __init__ left out as a target
    (importing a package runs its __init__, which imports downward by the layer rule)."""
    edges = {m: {t for t in ts if not t == PKG} for m, ts in graph.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for mod in modules():
        layer(mod)


def test_no_import_circle():
    assert circles(imports(modules())) == []


def test_imports_run_one_way():
    assert against_direction(imports(modules())) == []


def test_nothing_below_the_plugin_imports_the_digits_models():
    graph = imports(modules())
    leaks = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
             if layer(t) == "plugin" and RANK[layer(m)] < RANK["plugin"]]
    assert leaks == []


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """A package of three files: the format importing the runtime (against the direction), the runtime importing
    the format back (a circle, through a function-local import)."""
    pkg = tmp_path / PKG
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "schedule.py").write_text("from .runtime import caches\n")
    (pkg / "runtime" / "caches.py").write_text("def f():\n    from ..schedule import Schedule\n")
    graph = imports(modules(tmp_path))
    assert circles(graph) == [["l2c_kernels.runtime.caches", "l2c_kernels.schedule"]]
    assert against_direction(graph) == ["l2c_kernels.schedule (format) imports l2c_kernels.runtime.caches (runtime)"]
    with pytest.raises(KeyError, match="has no layer"):
        layer("elsewhere.module")
