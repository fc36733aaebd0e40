"""The layers of coralfs, stated once (here): imports only point down this list.

Each layer is a set of packages (or top-level modules) of ``coralfs``:

====  ==============  ==============================================================
 0    base            ``errors``, ``hashing``, ``lru``
 1    codec           ``codec/`` (chunk records, tensor codecs, compiled loops), ``formats/``
 2    store           ``store/`` (LMDB, key layout, gc interlock, objects, refs, object store)
 3    pipeline        ``ingest``, ``repack``, ``reader``
 4    repository      ``repository``, ``worktree``, ``worktree_fs``
 5    operations      ``gc``, ``fsck``, ``prune``, ``diff``, ``merge``, ``export``, ``training``
 6    mount           ``mount/`` (view, inodes, writes, libfuse adapter, daemon)
 7    front ends      ``cli/``, ``__main__``
====  ==============  ==============================================================

A module may import its own layer or lower ones; modules never import each other in a
cycle (imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and do not
count). docs/design.md and the README point here instead of restating the table.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "coralfs"

LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"errors", "hashing", "lru"}),
    ("codec", {"codec", "formats"}),
    ("store", {"store"}),
    ("pipeline", {"ingest", "repack", "reader"}),
    ("repository", {"repository", "worktree", "worktree_fs"}),
    ("operations", {"gc", "fsck", "prune", "diff", "merge", "export", "training"}),
    ("mount", {"mount"}),
    ("front ends", {"cli", "__main__"}),
]


def _rank(mod: str) -> int | None:
    top = mod.split(".")[0]
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    return None


def _modules() -> dict[str, Path]:
    """Dotted module names (relative to coralfs) -> files; packages by their __init__."""
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("").as_posix().replace("/", ".")
        if rel == "__init__":
            continue
        out[rel.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """The coralfs modules a file imports (``from coralfs.x import y`` counts module x.y when it
    is one, else x)."""
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for n in ast.walk(node)}  # annotations only: not a dependency at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("coralfs") and node.level == 0:
            base = node.module[len("coralfs"):].lstrip(".")
            for a in node.names:
                full = f"{base}.{a.name}" if base else a.name
                out.add(full if full in mods else base)
        elif isinstance(node, ast.Import):
            out.update(a.name[len("coralfs."):] for a in node.names if a.name.startswith("coralfs."))
    out.discard("")
    return out


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if _rank(m) is None]
    assert not missing, f"modules without a layer in tests/test_architecture.py: {missing}"


def test_no_upward_imports():
    mods = _modules()
    bad = []
    for m, p in mods.items():
        mine = _rank(m)
        for imp in _imports(p, mods):
            theirs = _rank(imp)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{m} ({LAYERS[mine][0]}) imports {imp} ({LAYERS[theirs][0]})")
    assert not bad, "imports that point up a layer: " + "; ".join(sorted(bad))


def test_no_import_cycles():
    mods = _modules()
    graph = {m: {i for i in _imports(p, mods) if i in mods and i != m} for m, p in mods.items()}
    # packages' __init__ modules are just namespaces: an import of pkg.mod is not one of pkg
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(cycles)
