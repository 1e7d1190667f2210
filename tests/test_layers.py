"""Layering guard-rail (issue 19): an `ast` scan of every module of the package, with no project code imported.

It records every import, at module level and inside functions, relative and absolute, and builds the graph between
the package's *parts*: its top-level modules and subpackages (`cli`, `booster`, `models`, ...). The package facade
`hf_feature_smoothing/__init__.py` is not a part: a name imported from it (`from . import SmoothedVisionTower`)
counts as an import of the part that defines the name.

- No cycle between parts, except the ones in `ALLOWED_CYCLES` (today's, to be removed one by one). A new cycle,
  or an allowed one that grows or shrinks, fails with the cycle and the import lines (file:line) that make it.
- The pure statistics modules import neither transformers nor peft, directly or through a module of the package
  that does (the package `__init__` files Python runs first are a separate matter, see architecture.md §1.4).
"""

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import hf_feature_smoothing


PACKAGE = "hf_feature_smoothing"
ROOT = Path(hf_feature_smoothing.__file__).resolve().parent

# Cycles between parts that are tolerated: none (the last three were removed in 0.2.0). Never add one: move the
# shared code one layer down, or register the higher layer's implementation with the lower one.
ALLOWED_CYCLES: set[frozenset[str]] = set()

# Where the pure statistics live (torch and the standard library only).

FORBIDDEN_IN_STATISTICS = ("transformers", "peft")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted name of the package module imported, or of the third-party top-level package
    internal: bool  # target is a module of the scanned package
    path: Path
    line: int
    function_level: bool

    def where(self, root: Path) -> str:
        kind = "function-level" if self.function_level else "module-level"
        return f"{self.path.relative_to(root.parent)}:{self.line} ({kind} import of {self.target})"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file, for every `.py` file under `root` (a package `__init__` is named after its folder)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join([package, *parts])] = path
    return names


STATISTICS_MODULES = tuple(sorted(name for name in module_names(ROOT, PACKAGE)
                                   if name.startswith(f"{PACKAGE}.statistics.")))


class _Collector(ast.NodeVisitor):
    def __init__(self):
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self._depth = 0

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        self.found.append((node, self._depth > 0))

    visit_ImportFrom = visit_Import


def scan_imports(root: Path, package: str) -> dict[str, list[Import]]:
    """Every import of every module of the package rooted at `root`, resolved to the module it loads."""
    modules = module_names(root, package)

    result = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        collector = _Collector()
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        imports = []
        for node, function_level in collector.found:
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module
                for alias in node.names:
                    # `from pkg import submodule` loads the submodule; `from pkg import name` the package
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            for target in dict.fromkeys(targets):  # one record per statement and module
                if target == package or target.startswith(package + "."):
                    assert target in modules, f"{path}:{node.lineno}: {target} is not a module of {package}"
                    imports.append(Import(name, target, True, path, node.lineno, function_level))
                else:
                    imports.append(Import(name, target.partition(".")[0], False, path, node.lineno, function_level))
        result[name] = imports
    return result


def facade_exports(root: Path, package: str) -> dict[str, str]:
    """Name re-exported by the package facade -> the module it comes from."""
    init = root / "__init__.py"
    exports = {}
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                exports[alias.asname or alias.name] = f"{package}.{node.module}"
    return exports


def part_of(module: str, package: str) -> str | None:
    """`pkg.booster.layer` -> `booster`, `pkg.cli` -> `cli`, the facade `pkg` -> None."""
    rest = module[len(package) + 1:] if module != package else ""
    return rest.partition(".")[0] or None


def part_edges(root: Path, package: str) -> dict[tuple[str, str], list[Import]]:
    """(part, other part) -> the import statements behind that edge."""
    imports = scan_imports(root, package)
    exports = facade_exports(root, package)
    edges: dict[tuple[str, str], list[Import]] = {}
    for module, found in imports.items():
        source = part_of(module, package)
        if source is None:
            continue
        for imp in found:
            if not imp.internal:
                continue
            targets = [imp.target]
            if imp.target == package:  # through the facade: the parts that define the names imported
                node = _node_at(imp.path, imp.line)
                names = [alias.name for alias in node.names] if isinstance(node, ast.ImportFrom) else []
                targets = [exports[n] for n in names if n in exports]
            for target in targets:
                dest = part_of(target, package)
                if dest is not None and dest != source:
                    edges.setdefault((source, dest), []).append(imp)
    return edges


def _node_at(path: Path, line: int):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom) and node.lineno == line:
            return node
    raise LookupError(f"{path}:{line}")


def strongly_connected(nodes, edges) -> list[frozenset]:
    """Tarjan's strongly connected components with more than one node (the cycles between parts)."""
    successors = {n: sorted({b for (a, b) in edges if a == n}) for n in nodes}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in successors[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(frozenset(component))

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return components


def part_cycles(root: Path, package: str) -> tuple[list[frozenset], dict[tuple[str, str], list[Import]]]:
    edges = part_edges(root, package)
    nodes = {a for a, _ in edges} | {b for _, b in edges}
    return strongly_connected(nodes, edges), edges


def describe_cycle(cycle: frozenset, edges, root: Path) -> str:
    lines = [f"cycle between parts {{{', '.join(sorted(cycle))}}}; the imports inside it:"]
    for (a, b), found in sorted(edges.items()):
        if a in cycle and b in cycle:
            lines.append(f"  {a} -> {b}:")
            lines.extend(f"    {imp.where(root)}" for imp in found)
    return "\n".join(lines)


def external_closure(module: str, imports: dict[str, list[Import]]) -> dict[str, list[Import]]:
    """Third-party package -> the import chains' last statements reaching it from `module`, following the package's
    own modules (module- and function-level imports; the package `__init__` files run implicitly are not followed)."""
    seen, todo, reached = {module}, [module], {}
    while todo:
        for imp in imports[todo.pop()]:
            if imp.internal:
                if imp.target not in seen:
                    seen.add(imp.target)
                    todo.append(imp.target)
            else:
                reached.setdefault(imp.target, []).append(imp)
    return reached


# -- the checks on the package -------------------------------------------------------------------------------------


def test_no_new_cycle_between_parts():
    cycles, edges = part_cycles(ROOT, PACKAGE)
    new = [describe_cycle(c, edges, ROOT) for c in cycles if c not in ALLOWED_CYCLES]
    assert not new, "import cycle(s) not in ALLOWED_CYCLES (move the shared code one layer down):\n" + "\n".join(new)


def test_allowed_cycles_still_exist():
    """An allow-list entry whose cycle is gone (or changed shape) must be deleted (or is now a new cycle)."""
    cycles, _ = part_cycles(ROOT, PACKAGE)
    stale = [sorted(c) for c in ALLOWED_CYCLES if c not in cycles]
    assert not stale, f"delete these entries from ALLOWED_CYCLES, their cycle is gone: {stale}"


COMMAND_SHIMS = {"cli", "cli_build"}  # the entry point and the old home of the build commands


def test_commands_are_the_top_layer():
    """Nothing in the package imports the `hf-fs` commands except their shims (`cli.py`, `cli_build.py`)."""
    users = {imp.where(ROOT) for (source, dest), imps in part_edges(ROOT, PACKAGE).items()
             if dest == "commands" and source not in COMMAND_SHIMS for imp in imps}
    assert not users, "the commands are the top layer; these import them: " + "; ".join(sorted(users))


def test_statistics_import_neither_transformers_nor_peft():
    imports = scan_imports(ROOT, PACKAGE)
    problems = []
    for module in STATISTICS_MODULES:
        assert module in imports, f"{module} moved: update STATISTICS_MODULES"
        reached = external_closure(module, imports)
        for forbidden in FORBIDDEN_IN_STATISTICS:
            problems += [f"{module} reaches {forbidden} via {imp.where(ROOT)}" for imp in reached.get(forbidden, [])]
    assert not problems, "\n".join(problems)


# -- the scanner on synthetic packages -----------------------------------------------------------------------------


def _package(tmp_path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_scanner_finds_a_cycle_hidden_in_a_function(tmp_path):
    root = _package(tmp_path, {
        "a.py": "from .sub.b import g\n",
        "sub/__init__.py": "",
        "sub/b.py": """\
            import os


            def g():
                from pkg import a  # the deferred back edge
                return a, os
            """,
        "c.py": "import pkg.a\n",  # c -> a only: not in the cycle
    })
    cycles, edges = part_cycles(root, "pkg")
    assert cycles == [frozenset({"a", "sub"})]
    message = describe_cycle(cycles[0], edges, root)
    assert "cycle between parts {a, sub}" in message
    assert "pkg/a.py:1 (module-level import of pkg.sub.b)" in message
    assert "pkg/sub/b.py:5 (function-level import of pkg.a)" in message
    assert ("c", "a") in edges


def test_scanner_resolves_relative_levels_and_facade_names(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "from .core.model import Model\n",
        "core/__init__.py": "",
        "core/model.py": "from ..io import save\n",  # core -> io
        "io.py": "def save():\n    from . import Model\n    return Model\n",  # io -> core through the facade
        "stats.py": "import math\n",
    })
    cycles, edges = part_cycles(root, "pkg")
    assert cycles == [frozenset({"core", "io"})]
    assert [imp.line for imp in edges[("io", "core")]] == [2]


def test_scanner_follows_package_modules_to_forbidden_imports(tmp_path):
    root = _package(tmp_path, {
        "stats/__init__.py": "",
        "stats/bounds.py": "import torch\nfrom . import helpers\n",
        "stats/helpers.py": "def f():\n    from ..util import g\n",
        "util.py": "from transformers.utils import logging\n",
    })
    reached = external_closure("pkg.stats.bounds", scan_imports(root, "pkg"))
    assert set(reached) == {"torch", "transformers"}
    assert [imp.where(root) for imp in reached["transformers"]] == [
        "pkg/util.py:1 (module-level import of transformers)"]


@pytest.mark.parametrize("source", ["from .missing import x\n", "import pkg.missing\n"])
def test_scanner_refuses_an_unresolvable_package_import(tmp_path, source):
    root = _package(tmp_path, {"a.py": source})
    with pytest.raises(AssertionError, match="not a module of pkg"):
        scan_imports(root, "pkg")
