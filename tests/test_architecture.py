"""Layers stay one-way: a module may import only its own layer or lower ones."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "coralfs"

LAYERS: list[set[str]] = [
    {"errors", "hashing", "kernels", "tensorcodec"},
    {"records"},
    {"store", "locks", "keys"},
    {"objects", "refs", "formats", "objectstore", "ingest", "reader", "repack"},
    {"repository", "worktree_fs"},
    {"diff", "merge", "export", "gc", "fsck", "prune", "torch", "mountview", "mountwrite", "mountnodes"},
    {"cli", "fuse", "fuse_ll", "fuse_ops", "__main__"},
]


def _rank(mod: str) -> int | None:
    top = mod.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    return None


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("coralfs") and node.level == 0:
            rest = node.module[len("coralfs"):].lstrip(".")
            if rest:
                out.add(rest)
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name[len("coralfs."):] for a in node.names if a.name.startswith("coralfs."))
    return out


def test_every_module_has_a_layer():
    missing = [p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")
               if p.name != "__init__.py" or p.parent != PKG
               if _rank(p.relative_to(PKG).with_suffix("").as_posix().replace("/", ".")) is None]
    assert not missing, f"modules without a layer in tests/test_architecture.py: {missing}"


def test_no_upward_imports():
    bad = []
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("").as_posix().replace("/", ".")
        if rel == "__init__":
            continue
        mine = _rank(rel)
        for imp in _imports(p):
            theirs = _rank(imp)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{rel} imports {imp}")
    assert not bad, "imports that point up a layer: " + "; ".join(sorted(bad))
