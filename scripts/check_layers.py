#!/usr/bin/env python3
"""Check the import layering of the ``densessl`` package; exit 1 on any upward import or cycle.

Usage (from anywhere): ``python scripts/check_layers.py [ROOT]``, where ROOT is the folder that
holds the ``densessl`` package (default: this repository). Every ``import`` and
``from ... import`` is read with :mod:`ast`, including lazy imports inside functions and imports
under ``if TYPE_CHECKING:``, and resolved to the most specific ``densessl`` module it names.

The rule. Each module sits in one layer, named by its first component under ``densessl``
(``densessl/data/labeled/coco.py`` is in ``data``); an import may point to its own layer or
to a lower one, never to a higher one. From the bottom up:

 0. ``foundation`` - the top-level helpers every layer may use: ``errors.py``, ``io.py``,
    ``contract.py`` (PairSample / SourceBatch / PairBatch), ``cells.py``, ``boxes.py``,
    ``seeding.py``, ``distributed.py``, ``recipe.py``, ``options.py``, ``version.py``
 1. ``data``       - ``densessl/data/``
 2. ``pairs``      - ``densessl/pairs/``
 3. ``augment``    - ``densessl/augment/``
 4. ``models``     - ``densessl/models/``
 5. ``losses``     - ``densessl/losses/``
 6. ``build``      - ``build.py`` (a recipe → objects; imported by methods, eval, workflows)
 7. ``methods``    - ``densessl/methods/``
 8. ``eval``       - ``densessl/eval/``
 9. ``workflows``  - ``densessl/workflows/``
10. ``sweep``, ``bench`` - ``densessl/sweep/``, ``densessl/bench/`` (one layer: they run
    workflows; neither imports the other)
11. ``api``        - the package root ``densessl/__init__.py``, which re-exports the Python
    entry points (``densessl.pretrain``, ``run``, ``run_sweep``) and so imports workflows and
    sweep: nothing in the package may import it
12. ``cli``        - ``cli.py`` and ``__main__.py``: nothing else may import the CLI

This matches ``../shared/tools/layers.py``: there the top-level helper modules are exempt from
the layer test and only checked for cycles, ``data``, ``pairs``, ``augment``, ``models`` and
``losses`` form the low group that may not import ``eval``, ``methods``, the workflows, ``sweep``,
``bench`` or the CLI, and only the package root and ``__main__`` may import the CLI. This script
is stricter: it also orders the low group (``pairs`` may import ``data``, not the reverse) and
places the helpers at the bottom and the package root above the workflows, so
``import densessl`` inside ``workflows/export.py`` (for ``__version__``) is an upward import here
(``densessl/version.py`` holds the version for that reason).

Cycles. Any cycle between modules fails, lazy imports included, so a function-level import
does not hide one. As in the shared script, a package's ``__init__.py`` is left out of the
cycle search (importing a package for what it re-exports, and a package importing its own
submodules, is not a cycle here); the layer test still covers it.

A module whose first component is in no layer (a new top-level module or subpackage) also
fails: add it to ``LAYERS`` below, and to this docstring.

Output: one line per offending import, ``file:line: message`` (for a cycle, one line per
import inside it), then a count; or one summary line and exit 0.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "densessl"

# Bottom first. Keys are the first name component under densessl ("" = the package root).
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"errors", "io", "contract", "cells", "boxes", "seeding", "distributed",
                    "recipe", "options", "version"}),
    ("data", {"data"}),
    ("pairs", {"pairs"}),
    ("augment", {"augment"}),
    ("models", {"models"}),
    ("losses", {"losses"}),
    ("build", {"build"}),
    ("methods", {"methods"}),
    ("eval", {"eval"}),
    ("workflows", {"workflows"}),
    ("sweep/bench", {"sweep", "bench"}),
    ("api", {""}),
    ("cli", {"cli", "__main__"}),
]
RANK = {part: (rank, name) for rank, (name, parts) in enumerate(LAYERS) for part in parts}


def find_modules(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every .py file of the package under ``root``."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def is_package(modules: dict[str, Path], name: str) -> bool:
    return modules[name].name == "__init__.py"


def deepest_module(modules: dict[str, Path], dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the package."""
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imports_of(modules: dict[str, Path], name: str) -> list[tuple[str, int]]:
    """(target module, line) for every import of a package module in module ``name``."""
    path = modules[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                package = name.split(".") if is_package(modules, name) else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from pkg import sub` names the submodule when there is one, else pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != PACKAGE:
                continue
            module = deepest_module(modules, target)
            if module and module != name and (module, node.lineno) not in found:
                found.append((module, node.lineno))
    return found


def layer_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycles(edges: dict[str, list[tuple[str, int]]], skip: set[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph = {m: sorted({t for t, _ in ts if t not in skip}) for m, ts in edges.items()
             if m not in skip}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def check(root: Path) -> tuple[list[str], int]:
    """The problems found (``file:line: message``) and the number of modules read."""
    modules = find_modules(root)
    if not modules:
        return [f"{root / PACKAGE}: no Python modules found"], 0

    def where(module: str, line: int | None = None) -> str:
        path = modules[module].relative_to(root).as_posix()
        return f"{path}:{line}" if line else path

    problems = []
    for module in sorted(modules):
        if layer_key(module) not in RANK:
            problems.append(f"{where(module)}:1: {module} is in no layer: add "
                            f"{layer_key(module)!r} to LAYERS in scripts/check_layers.py")
    edges = {module: imports_of(modules, module) for module in modules}
    for module in sorted(edges):
        if layer_key(module) not in RANK:
            continue
        rank, layer = RANK[layer_key(module)]
        for target, line in edges[module]:
            if layer_key(target) not in RANK:
                continue
            target_rank, target_layer = RANK[layer_key(target)]
            if target_rank > rank:
                problems.append(f"{where(module, line)}: upward import: {module} ({layer}) "
                                f"imports {target} ({target_layer}, above it)")
    packages = {m for m in modules if is_package(modules, m)}
    for component in find_cycles(edges, packages):
        members, cycle = set(component), " <-> ".join(component)
        problems += [f"{where(m, line)}: import cycle ({cycle}): {m} imports {t}"
                     for m in component for t, line in edges[m] if t in members]
    return problems, len(modules)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(__doc__.split("\n\n")[1])
        return 2
    root = Path(args[0]) if args else Path(__file__).resolve().parents[1]
    problems, count = check(root)
    if problems:
        print("\n".join(problems))
        print(f"{len(problems)} layering problem(s) in {count} modules")
        return 1
    order = " → ".join(name for name, _ in LAYERS)
    print(f"layers: {count} modules, no cycles, no upward imports ({order})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
