"""The import layers of src/peftshield: which package may import which.

Every ``import``/``from ... import`` in the source is read with :mod:`ast` (at module level and inside
functions alike, since a deferred import is still a dependency; imports under ``if TYPE_CHECKING:`` are
skipped, they never run). Each is reduced to an edge between *packages*: the first component under
``peftshield`` (``peftshield.defenses.psim`` -> ``defenses``). The modules directly in ``peftshield/``
(errors.py, io.py, files.py, components.py, fingerprint.py, ...) and ``peftshield/__init__.py`` form
one package, the root; ``testing.py`` and ``__main__.py`` are root files but are placed on their own.

Two properties are checked: (a) the package graph has no cycle (cycles between modules of one package
are allowed), and (b) no import runs from a lower layer of :data:`LAYERS` to a higher one (imports
within a layer are allowed; (a) keeps them acyclic).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "peftshield"
ROOT = "(root)"  # the modules directly in peftshield/ and its __init__.py

# The declared layers, lowest first. A package may import packages of its own layer or of lower layers,
# never of a higher one. Read top to bottom: the shared basics; data and models, which know nothing of
# fine-tuning; the ways to fine-tune and to poison; the defenses (which fine-tune their reference
# models); what measures, audits and runs experiments with them; the tools built on those (the CI gate,
# the serving guard, experiment grids, reports); the fleet screen (gate + grid); the command line; and
# the contract checks for third-party components, which may reach into everything below.
LAYERS: list[tuple[str, ...]] = [
    (ROOT,),                                   # 0  errors, io, files, components, fingerprint, registry, ...
    ("data", "models"),                        # 1  datasets and backbones
    ("finetune", "attacks"),                   # 2  fine-tuning methods, poisoners
    ("defenses",),                             # 3  detectors (PSIM, ONION, STRIP, ...)
    ("metrics", "audit", "experiments"),       # 4  scores, adapter audits, experiment stages
    ("gate", "guard", "grid", "report"),       # 5  CI gate, serving guard, grids, reports
    ("screen",),                               # 6  fleet screening
    ("cli", "__main__"),                       # 7  the command line (``python -m peftshield``)
    ("testing",),                              # 8  contract checks for plug-in components
]
LAYER_OF = {package: level for level, packages in enumerate(LAYERS) for package in packages}
ON_THEIR_OWN = {"testing", "__main__"}  # root files with their own place in LAYERS


@dataclass(frozen=True)
class Edge:
    source: str  # the importing package
    target: str  # the imported package
    where: str  # file:line of the import


def package_of(module: list[str], src: Path) -> str:
    """The package of ``peftshield.<module...>``: its first component if that is a folder, else the root
    (``testing`` and ``__main__`` stand on their own)."""
    if not module:
        return ROOT
    if (src / module[0]).is_dir():
        return module[0]
    return module[0] if module[0] in ON_THEIR_OWN else ROOT


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except the body of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _type_checking(child.test):
            for other in child.orelse:  # the ``else:`` of ``if TYPE_CHECKING:`` does run
                yield from _imports_in(other)
        else:
            yield from _imports(child)


def _imports_in(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _imports(node)


def imported_modules(statement: ast.Import | ast.ImportFrom, module: list[str], is_package: bool,
                     src: Path) -> list[list[str]]:
    """The peftshield modules a statement imports, as components under ``peftshield``."""
    if isinstance(statement, ast.Import):
        names = [alias.name.split(".") for alias in statement.names]
    else:
        if statement.level:  # relative: resolve against the importing module's package
            base = module if is_package else module[:-1]
            base = base[:len(base) - (statement.level - 1)]
            names = [["peftshield", *base, *(statement.module.split(".") if statement.module else [])]]
        else:
            names = [statement.module.split(".")]
        if names[0] == ["peftshield"]:  # ``from peftshield import x``: x may be a subpackage or module
            names = [["peftshield", alias.name] if (src / alias.name).is_dir() or (src / f"{alias.name}.py").is_file()
                     else ["peftshield"] for alias in statement.names]
    return [name[1:] for name in names if name[0] == "peftshield"]


def import_edges(src: Path = SRC) -> list[Edge]:
    """Every import between two different packages of the source tree at ``src``."""
    edges = []
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = parts[:-1] if is_package else parts
        source = package_of(module, src)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for statement in _imports(tree):
            for target_module in imported_modules(statement, module, is_package, src):
                target = package_of(target_module, src)
                if target != source:
                    edges.append(Edge(source, target, f"{path.relative_to(src.parent)}:{statement.lineno}"))
    return edges


def find_cycle(edges: list[Edge]) -> list[str] | None:
    """One cycle of the package graph (as a closed path of package names), or None."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def upward_imports(edges: list[Edge]) -> list[str]:
    """Imports from a lower layer to a higher one, as readable lines."""
    return [f"{edge.where}: {edge.source} (layer {LAYER_OF[edge.source]}) imports {edge.target} "
            f"(layer {LAYER_OF[edge.target]})"
            for edge in edges if LAYER_OF[edge.source] < LAYER_OF[edge.target]]


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges()


def test_every_package_has_a_layer(edges):
    packages = {package_of([path.name], SRC) for path in SRC.iterdir()
                if path.suffix == ".py" or (path / "__init__.py").is_file()}
    assert packages - LAYER_OF.keys() == set(), "place the new package in LAYERS"
    assert {edge.source for edge in edges} | {edge.target for edge in edges} <= LAYER_OF.keys()
    assert len(edges) > 50  # the walk found the imports (about 400 cross-package imports today)


def test_no_cycle_between_packages(edges):
    assert find_cycle(edges) is None


def test_imports_follow_the_layers(edges):
    assert upward_imports(edges) == []


def test_the_checks_catch_a_backwards_import(tmp_path):
    """The checks above are not vacuous: a copy of the source with one import added from ``data`` up to
    ``defenses`` fails both, while a deferred import under ``if TYPE_CHECKING:`` is ignored."""
    copy = tmp_path / "peftshield"
    for path in SRC.rglob("*.py"):
        target = copy / path.relative_to(SRC)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert upward_imports(import_edges(copy)) == [] and find_cycle(import_edges(copy)) is None

    loaders = copy / "data" / "loaders.py"
    original = loaders.read_text(encoding="utf-8")
    loaders.write_text(original + "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    from peftshield.defenses import DEFENSES\n", encoding="utf-8")
    assert upward_imports(import_edges(copy)) == []

    loaders.write_text(original + "\n\ndef _late():\n    from peftshield.defenses.psim import PSIM\n",
                       encoding="utf-8")
    upward = upward_imports(import_edges(copy))
    assert len(upward) == 1 and "data (layer 1) imports defenses (layer 3)" in upward[0]
    cycle = find_cycle(import_edges(copy))
    assert cycle is not None and {"data", "defenses"} <= set(cycle)
