"""Retention, gc and fsck: space comes back, nothing reachable is lost, corruption is found."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from coralfs.cli import main as cli_main
from coralfs.codec import records
from coralfs.errors import ConcurrentUpdate, GcAborted, IntegrityError, UnknownRevision
from coralfs.fsck import fsck
from coralfs.gc import Marker, gc, lmdb_info
from coralfs.prune import plan_prune, prune_branch
from coralfs.repository import Repository
from coralfs.store import keys
from tests.factories import ReadersRunning

N_TENSOR = 48 * 1024  # float32 elements per tensor


@functools.lru_cache(maxsize=64)
def _state(i: int) -> dict[str, torch.Tensor]:
    """Version ``i`` of a checkpoint that drifts a little from version to version."""
    g = torch.Generator().manual_seed(1234)
    out = {}
    for name in ("a", "b", "c"):
        base = torch.randn(N_TENSOR, generator=g)
        drift = torch.zeros(N_TENSOR)
        for j in range(i):  # like training: every weight moves a little
            drift += torch.randn(N_TENSOR, generator=torch.Generator().manual_seed(j * 7 + ord(name))) * 1e-3
        out[name] = base + drift
    return out


def _commit_series(repo: Repository, branch: str, start: int, n: int) -> list[bytes]:
    ids = []
    for i in range(start, start + n):
        head = repo.branch_head(branch)
        prev = repo.tree(head).entries.get("model.pt") if head else None
        with repo.writing():
            e = repo.save(_state(i), "model.pt", stage=False, prev=prev)
            ids.append(repo.commit_changes(branch, {"model.pt": e}, f"v{i}", metrics={"acc": float((i * 37) % 11)},
                                           meta={"step": str(i)}))
    repo.wait_repack()
    return ids


def _sha(repo: Repository, rev: str | bytes, path: str = "model.pt") -> str:
    h = hashlib.sha256()
    with repo.open(rev, path) as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def _all_files(repo: Repository) -> dict[tuple[bytes, str], str]:
    out = {}
    for c in repo.reachable_commits():
        for p in repo.tree(c).entries:
            out[(c, p)] = _sha(repo, c, p)
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    """A repository with a 12-commit branch, pruned to its last 2 and its best (v8: acc 10;
    gc not yet run). Older versions are deltas against newer ones, so v8 names v9, a pruned
    version, as its base: gc has to re-encode it."""
    root = str(tmp_path_factory.mktemp("tpl") / "repo")
    with Repository.init(root) as repo:
        _commit_series(repo, "main", 0, 12)
        prune_branch(repo, "main", keep_last=2, keep_best=1, metric="acc")
    return root


@pytest.fixture
def pruned(template, tmp_path) -> Repository:
    root = str(tmp_path / "repo")
    shutil.copytree(template, root)
    repo = Repository(root)
    yield repo
    repo.close()


# ------------------------------------------------------------------ prune
def test_prune_plan_keeps_last_best_and_head(tmp_path):
    with Repository.init(tmp_path / "r") as repo:
        ids = _commit_series(repo, "main", 0, 8)  # acc = (i*37) % 11: 0 4 8 1 5 9 2 6
        plan = plan_prune(repo, "main", keep_last=2, keep_best=2, metric="acc")
        assert plan.keep == [ids[2], ids[5], ids[6], ids[7]]  # best (9, 8) + last 2
        assert plan_prune(repo, "main", keep_best=1, metric="acc").keep == [ids[5], ids[7]]  # head kept
        before = {i: _sha(repo, ids[i]) for i in (2, 5, 6, 7)}
        repo.tag("t3", ids[3].hex())
        plan = prune_branch(repo, "main", keep_last=2, keep_best=2, metric="acc")
        log = repo.log("main")
        assert [c.message for _, c in log] == ["v7", "v6", "v5", "v2"]
        old = {ids[i]: repo.get_commit(ids[i]) for i in (2, 5, 6, 7)}
        for (cid, c), i in zip(log, (7, 6, 5, 2), strict=True):
            o = old[ids[i]]
            assert (c.tree, c.time, c.message, c.metrics, c.meta, c.author) == \
                (o.tree, o.time, o.message, o.metrics, o.meta, o.author)
            assert _sha(repo, cid) == before[i]
        assert log[-1][1].parents == ()  # v0, v1 dropped: v2 is the new root
        assert plan.rewritten == 4
        # dropping only the newest-but-one keeps the ids of the commits below it
        plan = prune_branch(repo, "main", keep_last=1, keep_best=2, metric="acc")
        assert plan.drop == [log[1][0]] and plan.rewritten == 1
        assert [c for c, _ in repo.log("main")][1:] == [log[2][0], log[3][0]]
        assert repo.resolve("t3") == ids[3]  # the tag still reaches its commit


def test_prune_stops_at_fork_point_and_cas(tmp_path):
    with Repository.init(tmp_path / "r") as repo:
        base = _commit_series(repo, "main", 0, 3)
        repo.create_branch("exp", "main")
        _commit_series(repo, "exp", 3, 4)
        plan = prune_branch(repo, "exp", keep_last=1)
        assert len(plan.drop) == 3
        assert repo.get_commit(repo.branch_head("exp")).parents == (base[-1],)
        assert len(repo.log("main")) == 3
        stale = plan_prune(repo, "exp", keep_last=0)
        _commit_series(repo, "exp", 7, 1)
        stale.drop = [stale.keep[0]]  # anything: the ref moved, the CAS must refuse
        from coralfs.prune import apply_prune
        with pytest.raises(ConcurrentUpdate):
            apply_prune(repo, stale)


# ------------------------------------------------------------------ gc
def test_prune_gc_frees_space_and_size_stops_growing(pruned):
    repo = pruned
    kept = _all_files(repo)
    size0, free0 = lmdb_info(repo)["file_bytes"], lmdb_info(repo)["free_pages"]
    stats0 = repo.stats()
    dry = gc(repo, dry_run=True)
    assert dry.chunks_swept > 0 and lmdb_info(repo)["free_pages"] == free0  # a dry run frees nothing
    s = gc(repo, grace=0)
    assert s.chunks_swept == dry.chunks_swept and s.objects_swept == dry.objects_swept
    # 9 of 12 versions freed: all but the newest are deltas, so about 9 of 11 deltas' bytes
    deltas0 = stats0["stored_bytes"] - stats0["by_codec"]["planes"]["stored"]
    assert s.chunk_bytes_swept > 0.6 * deltas0, (s.to_json(), stats0)
    assert s.reencoded > 0  # the kept oldest version was a delta against a pruned one
    info = lmdb_info(repo)
    assert info["free_bytes"] - free0 * info["page_size"] > 0.6 * deltas0
    assert _all_files(repo) == kept
    assert fsck(repo).ok
    assert gc(repo, grace=0).chunks_swept == 0  # idempotent
    # later commits reuse the freed pages: the file does not grow
    size1 = info["file_bytes"]
    _commit_series(repo, "main", 12, 4)
    prune_branch(repo, "main", keep_last=2)
    gc(repo, grace=0)
    _commit_series(repo, "main", 16, 4)
    assert lmdb_info(repo)["file_bytes"] <= size1 * 1.05, (size0, size1, lmdb_info(repo))
    kept = _all_files(repo)
    # and --compact gives the space back to the file system
    c = gc(repo, grace=0, compact=True)
    assert c.compacted and c.file_bytes_after < 0.7 * c.file_bytes_before
    assert _all_files(repo) == kept and fsck(repo).ok
    _commit_series(repo, "main", 20, 1)  # the reopened store works
    assert fsck(repo).ok


def test_gc_reencodes_against_the_nearest_live_ancestor(tmp_path):
    with Repository.init(tmp_path / "r") as repo:
        ids = _commit_series(repo, "main", 0, 4)  # acc 0 4 8 1: with mode=min v0 is the best
        v0 = repo.get_manifest(repo.tree(ids[0]).entries["model.pt"].manifest).chunk_ids()
        v3 = repo.get_manifest(repo.tree(ids[3]).entries["model.pt"].manifest).chunk_ids()
        assert any(repo.objects.chunk_header(c).bases for c in v0)  # v0 -> v1 -> v2 -> v3
        prune_branch(repo, "main", keep_best=1, metric="acc", mode="min")
        assert [c.message for _, c in repo.log("main")] == ["v3", "v0"]
        before = _all_files(repo)
        s = gc(repo, grace=0)
        assert s.reencoded > 0 and s.keyframes < s.reencoded, s.to_json()
        assert _all_files(repo) == before and fsck(repo).ok
        live = set(v0) | set(v3)
        for c in v0:  # every delta now names a live base: a chunk of v3
            assert set(repo.objects.chunk_header(c).bases) <= live


def test_gc_keeps_tags_branches_stage_and_pending(tmp_path):
    with Repository.init(tmp_path / "r") as repo:
        ids = _commit_series(repo, "main", 0, 6)
        repo.tag("keep-me", ids[1].hex())
        repo.create_branch("other", ids[3].hex())
        staged = repo.save(_state(40), "staged.pt")  # staged, not committed
        pend = repo.save(_state(41), "pending.pt", stage=False)  # as a mount would record it
        repo.store.write(lambda t: t.put(keys.INDEX, keys.pending_key("main", "pending.pt"),
                                         json.dumps({"m": pend.manifest.hex()}).encode()))
        prune_branch(repo, "main", keep_last=1)
        before = _all_files(repo)
        s = gc(repo, grace=0)
        assert s.commits == 6 - 1  # v0..v3 (other), v1 via tag, v5; v4 is gone
        assert _all_files(repo) == before
        assert repo.file_view(staged.manifest).pread(0, 1 << 30) and repo.file_view(pend.manifest).size
        assert fsck(repo).ok
        # the commit index follows: the dropped commit no longer resolves
        with pytest.raises(UnknownRevision):
            repo.resolve(ids[4].hex())


def test_gc_concurrent_with_reads(pruned):
    reader = Repository(pruned.root, cache_bytes=0)  # every read goes to LMDB
    expect = {k[1] + "@" + k[0].hex(): v for k, v in _all_files(pruned).items()}
    heads = list(pruned.reachable_commits())

    def check(c: bytes) -> None:
        assert _sha(reader, c) == expect["model.pt@" + c.hex()]

    with ReadersRunning([functools.partial(check, c) for c in heads]) as r:
        time.sleep(0.05)
        s = gc(pruned, grace=0.2, batch_keys=4)  # many small transactions
    reader.close()
    assert not r.errors, r.errors[0]
    assert s.chunks_swept > 0 and r.reads > 0


PHASES = ["mark", "sweep-index", "sweep-objects", "sweep-chunks:2", "reencode", "grace", "sweep-bases",
          "compact-copied", "compact-swapped"]


@pytest.mark.parametrize("phase", PHASES)
def test_gc_killed_midway_then_rerun(pruned, phase):
    root = pruned.root
    kept = _all_files(pruned)
    pruned.close()
    code = textwrap.dedent(f"""
        from coralfs.repository import Repository
        from coralfs.gc import gc
        gc(Repository({root!r}), grace=0, batch_keys=3, batch_bytes=1, compact=True)
    """)
    env = dict(os.environ, CORALFS_GC_KILL_AT=phase)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    with Repository(root) as repo:
        assert _all_files(repo) == kept  # consistent right after the kill
        s = gc(repo, grace=0)
        assert fsck(repo).ok
        assert _all_files(repo) == kept
        assert Marker(repo) is not None and s.problems == []
        with repo.store.read() as t:
            assert sum(1 for _ in t.keys("chunks")) == s.chunks_live


def test_compact_refused_while_another_process_has_it_open(pruned):
    code = f"from coralfs.repository import Repository; r = Repository({pruned.root!r}); r.head(); " \
           "import sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()"
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        with pytest.raises(ConcurrentUpdate):
            gc(pruned, grace=0, compact=True)
        assert fsck(pruned).ok  # the gc part ran, the file was left alone
    finally:
        p.stdin.close()
        p.wait(10)
    assert gc(pruned, grace=0, compact=True).compacted


# ------------------------------------------------------------------ fsck
def _some_chunk(repo: Repository, delta: bool | None = None) -> bytes:
    man = repo.get_manifest(repo.tree("HEAD").entries["model.pt"].manifest)
    for cid in man.chunk_ids():
        h = repo.objects.chunk_header(cid)
        if delta is None or bool(h.bases) == delta:
            return cid
    raise AssertionError("no such chunk")


def test_fsck_detects_corrupt_record_raw_write(pruned):
    gc(pruned, grace=0)
    cid = _some_chunk(pruned)
    with pruned.store.read() as t:
        rec = bytearray(t.get("chunks", cid))
    rec[records.HEADER_LEN + len(records.parse_header(bytes(rec)).bases) * 32 + 20] ^= 0xFF
    pruned.store.write(lambda t: t.put("chunks", cid, bytes(rec)))
    r = fsck(pruned)
    assert not r.ok
    assert any(p.kind == "manifest" for p in r.problems) and any(cid.hex() in p.key for p in r.problems)
    assert cli_main(["-R", pruned.root, "-q", "fsck"]) == IntegrityError.exit_code
    assert not fsck(pruned, repair=True).ok  # not repairable: a reachable chunk is damaged


def test_fsck_detects_bytes_flipped_in_data_file(pruned):
    gc(pruned, grace=0, compact=True)
    cid = _some_chunk(pruned)
    with pruned.store.read() as t:
        rec = t.get("chunks", cid)
    tail = rec[-48:]
    path = os.path.join(pruned.store.path, "data.mdb")
    with open(path, "r+b") as f:
        data = f.read()
        pos = data.find(tail)
        assert pos > 0 and data.find(tail, pos + 1) < 0
        f.seek(pos + 10)
        f.write(bytes([data[pos + 10] ^ 0x55]))
    pruned.objects.chunk_cache.clear()
    r = fsck(pruned)
    assert not r.ok and any(cid.hex() in p.key or "manifest" == p.kind for p in r.problems)


def test_fsck_detects_missing_object_and_gc_refuses(pruned):
    head = pruned.branch_head("main")
    tree = pruned.get_commit(head).tree
    pruned.store.write(lambda t: t.delete("objects", tree))
    with Repository(pruned.root) as fresh:  # (``pruned`` has the tree in its object cache)
        r = fsck(fresh)
        assert not r.ok and any(p.key == tree.hex() and "missing" in p.message for p in r.problems)
        with pytest.raises(GcAborted):
            gc(fresh, grace=0)
    assert cli_main(["-R", pruned.root, "-q", "gc"]) == IntegrityError.exit_code


def test_fsck_repairs_stale_index_and_garbage(pruned):
    gc(pruned, grace=0)
    bogus = b"\x01" * 32
    pruned.store.write(lambda t: (t.put(keys.INDEX, keys.tensor_index_key("float32", "gone", 0), bogus),
                                  t.put(keys.INDEX, keys.stat_key("gone.pt"), json.dumps({"sig": [], "m": bogus.hex()}).encode()),
                                  t.put("chunks", b"\x02" * 32, b"garbage that is no record")))
    r = fsck(pruned)
    assert not r.ok and all(p.repairable for p in r.problems) and len(r.problems) == 3
    r = fsck(pruned, repair=True)
    assert r.ok and r.repaired
    assert fsck(pruned).ok


def test_cli_prune_gc_fsck_storage(pruned, capsys):
    root = pruned.root
    _commit_series(pruned, "main", 12, 3)
    assert cli_main(["-R", root, "prune", "main", "--keep-last", "1", "--keep-best", "1", "--metric", "acc",
                     "--dry-run"]) == 0
    assert len(pruned.log("main")) == 6
    assert cli_main(["-R", root, "prune", "main", "--keep-last", "1", "--keep-best", "1", "--metric", "acc"]) == 0
    assert len(pruned.log("main")) == 2
    capsys.readouterr()
    assert cli_main(["-R", root, "gc", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chunks_swept"] > 0 and out["bytes_freed"] > 0
    assert cli_main(["-R", root, "fsck"]) == 0
    capsys.readouterr()
    assert cli_main(["-R", root, "storage", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["free_pages"] > 0 and info["databases"]["chunks"]["entries"] > 0
