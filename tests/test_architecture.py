"""The layering of the packages, read from the code: every import statement (module level or inside a
function) of every module in ``core/ models/ data/ engine/ tools/ launchers/``, parsed, not imported.

The order is core < models < data < engine < tools: a package imports only from those below it (a library
never imports from the commands built on it, the model needs no engine, the data no engine); launchers sit
beside tools and use engine and core. No cycle between packages. Importing the model package changes no
environment variable (a library sets the process up only when asked).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: package -> layer; a package may import from a lower layer (and its own) only
LAYERS = {"core": 0, "models": 1, "data": 2, "engine": 3, "tools": 4}
#: what the launchers may import (besides themselves)
LAUNCHERS_MAY_IMPORT = {"core", "engine"}
PACKAGES = (*LAYERS, "launchers")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["biomedgpt", *parts])


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute module names an import node names (relative imports resolved against ``module``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if not node.level:
            return [node.module or ""]
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
        return [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                 or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
        return [node.args[0].value]  # importlib.import_module("biomedgpt.x"): an import all the same
    return []


def import_edges(root: Path = REPO_ROOT) -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the ``file:line imports module`` sites, for every import of one
    of our packages from another (``biomedgpt.X`` or a relative import reaching X)."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = _module_name(path, root)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                for name in _imported(node, module, path.name == "__init__.py"):
                    parts = name.split(".")
                    if len(parts) < 2 or parts[0] != "biomedgpt" or parts[1] not in PACKAGES:
                        continue
                    if parts[1] != package:
                        edges[(package, parts[1])].append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    return dict(edges)


def layering_violations(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """Imports against the order core < models < data < engine < tools (launchers: core and engine)."""
    bad = []
    for (source, target), sites in sorted(edges.items()):
        if source == "launchers":
            allowed = target in LAUNCHERS_MAY_IMPORT
        else:
            allowed = target in LAYERS and LAYERS[target] < LAYERS[source]
        if not allowed:
            bad.extend(sites)
    return bad


def package_cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one package (Tarjan), each a cycle of imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in edges:
        graph[source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in PACKAGES:
        if node not in index:
            visit(node)
    return groups


@pytest.fixture(scope="module")
def edges():
    return import_edges()


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The reader itself: a lazy import inside a function, a relative import and import_module all count."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lazy.py").write_text("def f():\n    from biomedgpt.engine.eval import decoding\n")
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "sub" / "__init__.py").write_text("from ...tools import cli\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "dyn.py").write_text("import importlib\nimportlib.import_module('biomedgpt.data.mds')\n")
    found = import_edges(tmp_path)
    assert found == {("data", "engine"): ["data/lazy.py:2 imports biomedgpt.engine.eval"],
                     ("data", "tools"): ["data/sub/__init__.py:1 imports biomedgpt.tools"],
                     ("models", "data"): ["models/dyn.py:2 imports biomedgpt.data.mds"]}
    assert package_cycles({("data", "engine"): [], ("engine", "tools"): [], ("tools", "data"): []}) == [
        ["data", "engine", "tools"]]


def test_models_data_and_core_import_nothing_from_engine_or_tools(edges):
    bad = [site for (source, target), sites in sorted(edges.items())
           if source in ("core", "models", "data") and target in ("engine", "tools") for site in sites]
    assert not bad, "libraries below the engine import from it or from the commands:\n" + "\n".join(bad)


def test_the_engine_imports_nothing_from_the_commands(edges):
    bad = edges.get(("engine", "tools"), [])
    assert not bad, "engine/ imports from tools/ (move what both need into the library):\n" + "\n".join(bad)


def test_every_import_goes_down_the_layers(edges):
    bad = layering_violations(edges)
    assert not bad, ("imports against core < models < data < engine < tools (launchers: core, engine):\n"
                     + "\n".join(bad))


def test_no_cycle_between_packages(edges):
    cycles = package_cycles(edges)
    rank = {**LAYERS, "launchers": len(LAYERS)}
    detail = []
    for group in cycles:  # the imports that close each cycle: those going up the order
        inside = {pair: sites for pair, sites in sorted(edges.items()) if pair[0] in group and pair[1] in group}
        upward = {(s, t): sites for (s, t), sites in inside.items() if rank[t] > rank[s]} or inside
        detail.append(" <-> ".join(group) + ":\n  " + "\n  ".join(site for sites in upward.values()
                                                                  for site in sites[:3]))
    assert not cycles, "packages import each other:\n" + "\n".join(detail)


def test_importing_the_model_package_sets_no_environment_variable():
    """``biomedgpt.models`` and every module in it, imported in a fresh interpreter (torch imported first:
    its own import is not ours to judge), leave ``os.environ`` as they found it."""
    probe = (
        "import json, os, pkgutil, importlib, torch\n"
        "before = dict(os.environ)\n"
        "import biomedgpt.models as models\n"
        "names = [m.name for m in pkgutil.walk_packages(models.__path__, 'biomedgpt.models.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "after = dict(os.environ)\n"
        "print(json.dumps({'modules': names, 'changed': sorted(k for k in before.keys() | after.keys()\n"
        "                                                  if before.get(k) != after.get(k))}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "biomedgpt.models.ofa" in result["modules"]  # the probe did import the package's modules
    assert result["changed"] == [], f"importing biomedgpt.models changed {result['changed']}"
