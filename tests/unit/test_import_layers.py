"""The import graph of r1_megatron points down and has no cycles.

The layer order is written once, in docs/architecture.md ("Layer order"); this test reads it there.
Every module's imports are walked with `ast` (absolute `r1_megatron.x` imports and relative ones, at
module level and inside functions) and the test fails, listing every violation at once, on
(a) an import of a package on a higher line or of another package on the same line, and
(b) a cycle of imports between modules. A synthetic package proves both checks fire.
"""

from __future__ import annotations

import ast
import re
import shutil
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"

# Known violations, (importer module, imported module), each to be removed by the change that adds it;
# empty: the graph points down with no exception.
PENDING: set[tuple[str, str]] = set()
# Packages the doc lists that do not exist yet (none).
PENDING_PACKAGES: set[str] = set()


def layer_order(doc: str) -> list[list[str]]:
    """The packages per layer, bottom up: the first fenced block under '## Layer order'."""
    section = re.search(r"^## Layer order\n(.*?)(?=^## |\Z)", doc, re.M | re.S)
    assert section, f"{DOC}: no '## Layer order' section"
    block = re.search(r"^```\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, f"{DOC}: the 'Layer order' section has no fenced block"
    return [[name.strip() for name in line.split(",")] for line in block.group(1).splitlines() if line.strip()]


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every .py file under `root` (the directory of `package`)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, modules: dict[str, Path], package: str) -> dict[str, int]:
    """The modules of `package` that `name` imports, each with the line of its first import."""
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from x import y` imports the module x.y when there is one, else the name y of x.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != package:
                continue
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target != name:
                found.setdefault(target, node.lineno)
    return found


def top(name: str) -> str:
    return name.split(".")[1] if "." in name else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, in order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def violations(root: Path, package: str, layers: list[list[str]], pending: set = frozenset(),
               pending_packages: set = frozenset()) -> list[str]:
    """Every breach of the layer order and every import cycle under `root`, one readable line each."""
    layer_of = {pkg: i for i, line in enumerate(layers) for pkg in line}
    modules = module_files(root, package)
    problems = []
    present = {top(m) for m in modules} - {""}
    problems += [f"package '{p}' is not in the layer order" for p in sorted(present - set(layer_of))]
    problems += [f"the layer order lists '{p}', which does not exist"
                 for p in sorted(set(layer_of) - present - set(pending_packages))]
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target, line in sorted(imports(name, path, modules, package).items()):
            if (name, target) in pending:
                continue
            graph[name].add(target)
            src, dst = top(name), top(target)
            where = f"{path.relative_to(root.parent)}:{line}: {name} imports {target}"
            if src == "":
                problems.append(f"{where} ({package}/__init__.py imports nothing)")
            elif src != dst and src in layer_of and dst in layer_of:
                if layer_of[dst] > layer_of[src]:
                    problems.append(f"{where} (upward: {src} is below {dst})")
                elif layer_of[dst] == layer_of[src]:
                    problems.append(f"{where} (sideways: {src} and {dst} share a layer)")
    problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    return problems


def test_the_import_graph_points_down():
    layers = layer_order(DOC.read_text())
    found = violations(REPO / "r1_megatron", "r1_megatron", layers, PENDING, PENDING_PACKAGES)
    assert not found, "imports against docs/architecture.md's layer order:\n" + "\n".join(found)


def test_every_pending_import_is_still_a_violation():
    """An entry of PENDING that no longer breaks the order (or closes a cycle) is stale: remove it."""
    found = violations(REPO / "r1_megatron", "r1_megatron", layer_order(DOC.read_text()),
                       pending_packages=PENDING_PACKAGES)
    cyclic = {m for line in found if line.startswith("import cycle: ") for m in line[14:].split(" <-> ")}
    stale = [(a, b) for a, b in sorted(PENDING)
             if not any(f" {a} imports {b} (" in line for line in found) and not {a, b} <= cyclic]
    assert not stale, f"stale PENDING entries: {stale}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_checks_catch_upward_imports_and_cycles(tmp_path):
    root = tmp_path / "fake"
    _write(root, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "import os\n",
        "mid/__init__.py": "from . import b\n",
        "mid/b.py": "from fake.low import a\n",
        "side/__init__.py": "",
        "high/__init__.py": "",
        "high/c.py": "from ..mid.b import x\n",
    })
    layers = [["low"], ["mid", "side"], ["high"]]
    assert violations(root, "fake", layers) == []
    # an upward import inside a function, a sideways one, and a relative cycle
    _write(root, {
        "low/a.py": "def f():\n    from fake.high import c\n",
        "side/d.py": "import fake.mid.b\n",
        "high/e.py": "from . import f\n",
        "high/f.py": "from .e import g\n",
    })
    found = violations(root, "fake", layers)
    assert found == [
        "fake/low/a.py:2: fake.low.a imports fake.high.c (upward: low is below high)",
        "fake/side/d.py:1: fake.side.d imports fake.mid.b (sideways: side and mid share a layer)",
        "import cycle: fake.high.c <-> fake.low.a <-> fake.mid.b",
        "import cycle: fake.high.e <-> fake.high.f",
    ], found
    assert violations(root, "fake", [["low"], ["mid"], ["high"]])[0] == "package 'side' is not in the layer order"


def test_an_upward_import_added_to_a_copy_of_the_tree_fails(tmp_path):
    root = tmp_path / "r1_megatron"
    shutil.copytree(REPO / "r1_megatron", root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "config" / "_upward.py").write_text("def f():\n    from r1_megatron.cli import main\n")
    found = violations(root, "r1_megatron", layer_order(DOC.read_text()), PENDING, PENDING_PACKAGES)
    assert found == ["r1_megatron/config/_upward.py:2: r1_megatron.config._upward imports r1_megatron.cli "
                     "(upward: config is below cli)"], found
