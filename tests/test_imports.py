"""One-way dependencies: the project's import graph has no cycle.

Every import counts, including those inside functions (a lazy import only hides a
cycle, it does not remove it); only `if TYPE_CHECKING:` blocks are skipped. The
graph is built from the source folders with the same mapping setuptools uses
(pyproject's package-dir), so it is the graph of the installed package.
"""

from __future__ import annotations

import ast
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> folder, as in pyproject.toml's package-dir
PACKAGES = {"bagpipe": "bagpipe", "bagpipe.models": "bagpipe/models", "bagpipe.netlink": "bagpipe/netlink",
            "bagpipe.oracle": "oracle", "bagpipe.trainers": "trainers", "bagpipe.datasets": "datasets",
            "bagpipe.serving": "serving"}


def modules(root: str) -> dict[str, str]:
    """Module name -> file for every module of every package."""
    out = {}
    for package, folder in PACKAGES.items():
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.endswith(".py"):
                stem = name[:-3]
                out[package if stem == "__init__" else f"{package}.{stem}"] = os.path.join(root, folder, name)
    return out


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph(root: str) -> dict[str, set[str]]:
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if _type_checking_only(node, parents):
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from pkg import name` imports pkg.name when that is a module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:  # `import a.b.c` of a non-module: its nearest module
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


# The layers of docs/architecture.md, bottom up: a module imports from its own layer or below.
LAYERS = [
    ["bagpipe", "bagpipe.errors", "bagpipe.exits", "bagpipe.files", "bagpipe.hashing", "bagpipe.config",
     "bagpipe.placement", "bagpipe.metrics", "bagpipe.faults", "bagpipe.rundir", "bagpipe.wire"],
    ["bagpipe.rows", "bagpipe.digest", "bagpipe.optim", "bagpipe.embedding", "bagpipe.models.*", "bagpipe.datasets.*",
     "bagpipe.plan", "bagpipe.transport", "bagpipe.rundata", "bagpipe.export", "bagpipe.checkpoint"],
    ["bagpipe.cache", "bagpipe.protocol", "bagpipe.lifecycle", "bagpipe.oracle", "bagpipe.oracle.window", "bagpipe.oracle.lrpp",
     "bagpipe.oracle.nocache", "bagpipe.oracle.verify", "bagpipe.oracle.simulate", "bagpipe.trainers",
     "bagpipe.trainers.step", "bagpipe.trainers.reduction", "bagpipe.trainers.common"],
    ["bagpipe.server", "bagpipe.trainers.local", "bagpipe.trainers.runtime", "bagpipe.trainers.nocache",
     "bagpipe.trainers.cached", "bagpipe.oracle.process"],
    ["bagpipe.train", "bagpipe.evaluate", "bagpipe.launch", "bagpipe.bench", "bagpipe.compare", "bagpipe.report", "bagpipe.oracle.cli",
     "bagpipe.datasets.cli", "bagpipe.netlink.*", "bagpipe.serving.*", "bagpipe.cli"],
]


def layer_of(module: str) -> int | None:
    """The layer naming the module exactly, else the one whose `pkg.*` covers it."""
    for i, names in enumerate(LAYERS):
        if module in names:
            return i
    for i, names in enumerate(LAYERS):
        if any(n.endswith(".*") and (module == n[:-2] or module.startswith(n[:-1])) for n in names):
            return i
    return None


def test_dependencies_point_down_the_layers():
    graph = import_graph(ROOT)
    unplaced = [m for m in graph if layer_of(m) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS and docs/architecture.md): {unplaced}"
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m)]
    assert not upward, "imports that point up a layer: " + "; ".join(upward)


def test_every_source_module_is_in_the_graph():
    graph = import_graph(ROOT)
    assert "bagpipe.oracle.lrpp" in graph and "bagpipe.trainers.cached" in graph
    assert "bagpipe.plan" in graph["bagpipe.oracle.lrpp"]
    assert "bagpipe.server" in graph["bagpipe.train"]  # a lazy import counts


def test_no_import_cycles():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module,line", [
    ("bagpipe/config.py", "from bagpipe.cli import main\n"),  # cli -> ... -> train -> config -> cli
    ("bagpipe/plan.py", "def _late():\n    import bagpipe.oracle.lrpp\n"),  # a lazy one
])
def test_a_deliberate_cycle_is_found(tmp_path, module, line):
    copy = tmp_path / "tree"
    for folder in {f.split('/')[0] for f in PACKAGES.values()}:
        shutil.copytree(os.path.join(ROOT, folder), copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / module, "a") as f:
        f.write("\n" + line)
    cycle = find_cycle(import_graph(str(copy)))
    assert cycle is not None and cycle[0] == cycle[-1]
