"""The key layout has one owner (coralfs/store/keys.py): gc and fsck walk its table of key
families, so a family registered there is handled by both, and a key of no family stops gc
and is reported by fsck."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

from coralfs.errors import UnknownKeys
from coralfs.fsck import fsck
from coralfs.gc import gc
from coralfs.repository import Repository
from coralfs.store import keys
from coralfs.store.objects import MODE_FILE, TreeEntry

# a derived family (an index naming a chunk) and a root family (naming a manifest), as a
# future feature would register them
FAKE_INDEX = keys.Family("test index", keys.INDEX, b"zz\x00", "`zz\\0<name>`", "a chunk id", keys.Role.DERIVED,
                         lambda _k, v: ((keys.CHUNK, v),), missing="test index entry names a missing chunk")
FAKE_ROOT = keys.Family("test root", keys.INDEX, b"zr\x00", "`zr\\0<name>`", "a manifest id", keys.Role.ROOT,
                        lambda _k, v: ((keys.MANIFEST, v),))


def _store(repo: Repository, data: bytes, path: str) -> tuple[bytes, list[bytes]]:
    """Store a file without committing it: (manifest id, its chunk ids)."""
    with repo.writing():
        mid, man, _ = repo.ingest_buffer(memoryview(data), path)
    return mid, man.chunk_ids()


@pytest.fixture
def repo(tmp_path):
    with Repository.init(tmp_path / "r", auto_repack=False) as r:
        mid, _ = _store(r, os.urandom(300_000), "a.bin")
        r.commit_changes("main", {"a.bin": TreeEntry(mid, 300_000, MODE_FILE)}, "a")
        yield r


def _register(monkeypatch: pytest.MonkeyPatch, *fams: keys.Family) -> None:
    monkeypatch.setattr(keys, "FAMILIES", [*keys.FAMILIES, *fams])


def _has(repo: Repository, db: str, key: bytes) -> bool:
    with repo.store.read() as t:
        return t.has(db, key)


def test_gc_walks_registered_families(repo, monkeypatch):
    live = repo.get_manifest(repo.entry("main", "a.bin").manifest).chunk_ids()[0]
    b_mid, b_chunks = _store(repo, os.urandom(200_000), "b.bin")  # stored, named only by the fake root
    entries = {b"zz\x00live": live, b"zz\x00gone": b"\x07" * 32, b"zz\x00b": b_chunks[0], b"zr\x00keep": b_mid}
    repo.store.write(lambda t: [t.put("index", k, v) for k, v in entries.items()])

    # not registered: gc cannot know what these keep alive, so it refuses and sweeps nothing
    with pytest.raises(UnknownKeys, match="no key family"):
        gc(repo, grace=0)
    with pytest.raises(UnknownKeys):
        gc(repo, grace=0, dry_run=True)
    assert all(_has(repo, "index", k) for k in entries) and _has(repo, "objects", b_mid)

    _register(monkeypatch, FAKE_INDEX, FAKE_ROOT)
    s = gc(repo, grace=0)
    assert s.index_swept == 1  # the derived entry naming a chunk that does not exist
    assert not _has(repo, "index", b"zz\x00gone")
    assert _has(repo, "index", b"zz\x00live") and _has(repo, "index", b"zz\x00b")
    assert repo.file_view(b_mid).pread(0, 10)  # kept alive by the root family

    repo.store.write(lambda t: t.delete("index", b"zr\x00keep"))
    s = gc(repo, grace=0)
    assert not _has(repo, "objects", b_mid) and not any(_has(repo, "chunks", c) for c in b_chunks)
    assert not _has(repo, "index", b"zz\x00b")  # dropped with the chunk it named
    assert _has(repo, "index", b"zz\x00live") and s.index_swept == 1


def test_gc_refuses_a_key_of_no_family_in_any_database(repo):
    for db, key in (("config", b"future-setting"), ("refs", b"remote:origin/main"), ("index", b"xx\x00")):
        repo.store.write(lambda t, db=db, key=key: t.put(db, key, b"1"))
        with pytest.raises(UnknownKeys, match=re.escape(f"{db} {key!r}")):
            gc(repo, grace=0)
        repo.store.write(lambda t, db=db, key=key: t.delete(db, key))
    gc(repo, grace=0)


def test_every_family_is_classified_once():
    """Prefixes of one database never make a key ambiguous: the longest prefix wins, and every
    key a family makes is classified as that family."""
    samples = {
        "commit index": keys.commit_key(b"\x01" * 32), "tensor base index": keys.tensor_index_key("F32", "w", 0),
        "pending demotion": keys.demotion_key(b"\x01" * 32, b"\x02" * 32), "reverse-chain counters":
        keys.below_key(b"\x01" * 32), "stat cache": keys.stat_key("a/b.pt"), "skip-worktree": keys.skip_key("x"),
        "pending": keys.pending_key("main", "m.pt"), "conflict": keys.conflict_prefix("main", "1") + b"m.pt",
        "stage": keys.stage_key("m.pt"), "branch": keys.branch_key("main"), "tag": keys.tag_key("v1"),
        "HEAD": keys.HEAD, "config": keys.CONFIG_KEY, "gc note": keys.GC_NOTE, "no-space note": keys.NOSPACE_NOTE,
    }
    by_name = {f.name: f for f in keys.FAMILIES}
    assert len(by_name) == len(keys.FAMILIES)
    for name, key in samples.items():
        assert keys.family_of(by_name[name].db, key) is by_name[name], name
    assert set(samples) | {"chunks", "objects"} == set(by_name)
    assert {f.db for f in keys.FAMILIES} == set(keys.DATABASES)


def test_fsck_checks_registered_families_and_reports_keys_of_none(repo, monkeypatch):
    b_mid, b_chunks = _store(repo, os.urandom(200_000), "b.bin")  # named only by the fake root
    entries = {b"zz\x00b": b_chunks[0], b"zz\x00gone": b"\x07" * 32, b"zr\x00keep": b_mid}
    repo.store.write(lambda t: [t.put("index", k, v) for k, v in entries.items()])

    r = fsck(repo)  # not registered: every one is a key of no family, and nothing is repaired
    assert sorted(p.key for p in r.problems) == sorted(repr(k) for k in entries)
    assert all(p.message.startswith("belongs to no key family") and not p.repairable for p in r.problems)
    assert r.garbage_objects == 1  # b's manifest: nothing fsck knows names it

    _register(monkeypatch, FAKE_INDEX, FAKE_ROOT)
    repo.store.write(lambda t: t.put("config", b"future-setting", b"1"))
    r = fsck(repo)
    assert sorted((p.kind, p.key, p.message, p.repairable) for p in r.problems) == [
        ("config", repr(b"future-setting"), "belongs to no key family known to this coralfs (gc will not run while "
         "it is there)", False),
        ("index", repr(b"zz\x00gone"), "test index entry names a missing chunk", True)]
    assert r.garbage_objects == 0 and r.garbage_chunks == 0  # b is reachable through the fake root
    r = fsck(repo, repair=True)
    assert [p.key for p in r.problems] == [repr(b"future-setting")] and any("zz" in x for x in r.repaired)
    assert not _has(repo, "index", b"zz\x00gone") and _has(repo, "index", b"zz\x00b")


def test_fsck_takes_a_pending_deletion_as_it_is(repo):
    """A mount's pending deletion (a tombstone: no manifest) is no problem; an unreadable
    pending entry is one."""
    tomb = json.dumps({"del": True, "base": repo.branch_head("main").hex(), "time": 1.0}).encode()
    repo.store.write(lambda t: t.put("index", keys.pending_key("main", "a.bin"), tomb))
    assert fsck(repo).ok
    repo.store.write(lambda t: t.put("index", keys.pending_key("main", "b.bin"), b"{not json"))
    r = fsck(repo)
    assert [(p.kind, p.message) for p in r.problems] == [("index", "unreadable entry")]


def test_design_doc_table_is_the_key_table():
    """docs/design.md's "LMDB databases" table is generated from the table (paste the output of
    ``python -m coralfs.store.keys`` there when a family changes)."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text()
    assert keys.markdown_table() in doc, "docs/design.md: replace the table with `python -m coralfs.store.keys`"


PKG = Path(__file__).resolve().parent.parent / "coralfs"
_TXN_CALLS = {"get", "put", "delete", "items", "keys", "has", "peek", "scan", "advise"}


def _sources(exclude: tuple[str, ...]) -> list[tuple[str, ast.AST]]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).as_posix()
        if not rel.startswith(exclude):
            out.append((rel, ast.parse(p.read_text())))
    return out


def test_no_module_spells_a_key_prefix():
    """Every key prefix is spelled in coralfs/store/keys.py only: elsewhere keys are made by its
    encoders (a bytes literal that starts like a family's key is a re-typed prefix)."""
    prefixes = [f.prefix for f in keys.FAMILIES if f.prefix] + [keys.SYMREF]
    texts = [p.decode() for p in prefixes if keys.SEP in p]  # "pend\0", ...: not as str either
    bad = []
    for rel, tree in _sources(("store/keys.py",)):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Constant):
                continue
            v = node.value
            if isinstance(v, bytes) and any(v.startswith(p) for p in prefixes) \
                    or isinstance(v, str) and any(v.startswith(t) for t in texts) and "\n" not in v:
                bad.append(f"{rel}:{node.lineno}: {v!r}")
    assert not bad, "key prefixes spelled outside coralfs/store/keys.py: " + "; ".join(bad)


def test_only_refs_py_touches_the_refs_database():
    """Refs are read and changed through coralfs.store.refs.Refs only (keys.py's table walks
    every database; lmdb.py warms the refs database's pages for the mount)."""
    bad = []
    for rel, tree in _sources(("store/refs.py", "store/keys.py", "store/lmdb.py")):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _TXN_CALLS \
                    and node.args:
                a = node.args[0]
                if isinstance(a, ast.Constant) and a.value == keys.REFS \
                        or isinstance(a, ast.Attribute) and a.attr == "REFS" or isinstance(a, ast.Name) and a.id == "REFS":
                    bad.append(f"{rel}:{node.lineno}")
    assert not bad, "raw access to the refs database (use coralfs.store.refs.Refs): " + ", ".join(bad)
