"""The repacker: background demotions, crash safety, concurrency with readers, the CLI."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from coralfs.cli import main as cli_main
from coralfs.fsck import fsck
from coralfs.repository import Repository
from tests.factories import ReadersRunning


def _versions(n: int) -> list[bytes]:
    g = torch.Generator().manual_seed(3)
    sd = {f"t{i}": torch.randn(300_000, generator=g) for i in range(3)}
    out = []
    for _ in range(n):
        sd = {k: t + 1e-3 * torch.randn(t.shape, generator=g) for k, t in sd.items()}
        out.append(save(sd))
    return out


def _commit_all(repo: Repository, datas: list[bytes]) -> list[bytes]:
    ids = []
    p = os.path.join(repo.root, "m.safetensors")
    for i, d in enumerate(datas):
        with open(p, "wb") as f:
            f.write(d)
        repo.add([p])
        ids.append(repo.commit(f"v{i}"))
    return ids


def _check(repo: Repository, ids: list[bytes], datas: list[bytes]) -> None:
    repo.objects.chunk_cache.clear()
    for c, d in zip(ids, datas, strict=True):
        assert hashlib.sha256(repo.open(c.hex(), "m.safetensors").read()).digest() == hashlib.sha256(d).digest()


def _delta_pieces(repo: Repository, cid: bytes) -> int:
    m = repo.get_manifest(repo.entry(cid.hex(), "m.safetensors").manifest)
    return sum(1 for c in m.chunk_ids() if repo.objects.chunk_header(c).bases)


def test_commits_queue_and_close_finishes_the_work(tmp_path: Path) -> None:
    datas = _versions(4)
    with Repository.init(tmp_path / "r") as repo:
        repo.auto_repack = False
        ids = _commit_all(repo, datas)
        assert repo.pending_demotions() > 0 and repo.stats()["pending_demotions"] == repo.pending_demotions()
        assert all(_delta_pieces(repo, c) == 0 for c in ids)  # every version still whole
        before = repo.stats()["stored_bytes"]
        repo.auto_repack = True
        repo.repack_soon()  # the background thread; close() waits for it
    with Repository(tmp_path / "r") as repo:
        assert repo.pending_demotions() == 0
        assert all(_delta_pieces(repo, c) > 0 for c in ids[:-1]) and _delta_pieces(repo, ids[-1]) == 0
        assert repo.stats()["stored_bytes"] < 0.8 * before
        _check(repo, ids, datas)
        assert fsck(repo).ok


def test_repack_killed_midway_then_rerun(tmp_path: Path) -> None:
    datas = _versions(5)
    root = str(tmp_path / "r")
    with Repository.init(root, auto_repack=False) as repo:
        ids = _commit_all(repo, datas)
        pending = repo.pending_demotions()
    code = textwrap.dedent(f"""
        import os, signal
        from coralfs import repack
        from coralfs.repository import Repository
        repack.WINDOW = 1  # one demotion per transaction
        repo = Repository({root!r}, auto_repack=False)
        real, n = repo.store.write, [0]
        def write(fn):
            n[0] += 1
            if n[0] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(fn)
        repo.store.write = write
        repo.repack()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    with Repository(root, auto_repack=False) as repo:
        left = repo.pending_demotions()
        assert 0 < left < pending  # three demotions landed, the rest is still queued
        _check(repo, ids, datas)
        assert fsck(repo).ok
        s = repo.repack()
        assert s.examined == left and repo.pending_demotions() == 0
        _check(repo, ids, datas)
        assert fsck(repo).ok


def test_readers_during_repack_always_get_exact_bytes(tmp_path: Path) -> None:
    datas = _versions(6)
    with Repository.init(tmp_path / "r", auto_repack=False) as repo:
        ids = _commit_all(repo, datas)
        reader = Repository(repo.root, cache_bytes=0, auto_repack=False)

        def check(c: bytes, d: bytes) -> None:
            assert hashlib.sha256(reader.open(c.hex(), "m.safetensors").read()).digest() == hashlib.sha256(d).digest()

        with ReadersRunning([functools.partial(check, c, d) for c, d in zip(ids, datas, strict=True)]) as r:
            s = repo.repack()
        reader.close()
        assert not r.errors, r.errors[0]
        assert s.demoted > 0 and r.reads > 0


def test_cli_repack_and_auto_repack_off(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CORALFS_AUTO_REPACK", "0")
    datas = _versions(3)
    with Repository.init(tmp_path / "r") as repo:
        assert not repo.auto_repack
        ids = _commit_all(repo, datas)
        pending = repo.pending_demotions()
    assert pending > 0
    capsys.readouterr()
    assert cli_main(["-R", str(tmp_path / "r"), "repack", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examined"] == pending and out["demoted"] > 0 and out["bytes_after"] < out["bytes_before"]
    with Repository(tmp_path / "r") as repo:
        assert repo.pending_demotions() == 0
        _check(repo, ids, datas)


def _chains_under(tmp_path: Path, monkeypatch, constant: str, values: tuple, n: int) -> dict:
    """Per value of a repack policy constant: delta pieces of each version after a repack."""
    from coralfs import repack

    datas = _versions(n)
    out = {}
    for value in values:
        monkeypatch.setattr(repack, constant, value)
        with Repository.init(tmp_path / f"{constant}{value}", auto_repack=False) as repo:
            ids = _commit_all(repo, datas)
            s = repo.repack()
            out[value] = [_delta_pieces(repo, c) for c in ids]
            _check(repo, ids, datas)
            assert s.examined == s.demoted + s.kept + s.dropped
    return out


def test_read_cost_decides_how_long_chains_grow(tmp_path: Path, monkeypatch) -> None:
    """A demotion must save more than READ_COST times the bytes it adds to reads (its delta,
    for itself and every version whose chain runs through it)."""
    chains = _chains_under(tmp_path, monkeypatch, "READ_COST", (0.0, 1e6), 4)
    assert chains[1e6] == [0, 0, 0, 0]  # nothing is worth a slower read
    assert all(n > 0 for n in chains[0.0][:-1]) and chains[0.0][-1] == 0


def test_the_first_version_weighs_more(tmp_path: Path, monkeypatch) -> None:
    """ROOT_WEIGHT: a chain that the lineage's first version reads through is costlier."""
    first = _chains_under(tmp_path, monkeypatch, "ROOT_WEIGHT", (1, 1e6), 3)
    assert first[1][0] > 0  # weighted like any version, the first one is demoted
    assert first[1e6][0] == 0 and first[1e6][1] > 0  # weighted heavily it stays whole; the next is not


def test_fsck_reports_and_repairs_stale_repack_entries(tmp_path: Path) -> None:
    from coralfs.store.keys import below_key
    from coralfs.store.keys import demotion_key as pending_key

    datas = _versions(2)
    with Repository.init(tmp_path / "r", auto_repack=False) as repo:
        ids = _commit_all(repo, datas)
        ghost = b"\x01" * 32
        repo.store.write(lambda t: (t.put("index", pending_key(ghost, ghost), b""),
                                    t.put("index", below_key(ghost), b"\x00" * 7)))
        r = fsck(repo)
        kinds = sorted(p.message for p in r.problems)
        assert kinds == ["pending demotion names a missing chunk", "reverse-chain counters of a missing chunk"]
        assert all(p.repairable for p in r.problems)
        assert fsck(repo, repair=True).repaired and fsck(repo).ok
        assert repo.pending_demotions() > 0  # the real ones stay queued
        repo.repack()
        _check(repo, ids, datas)
        assert fsck(repo).ok


def test_a_corrupt_version_or_a_malformed_entry_does_not_stall_the_queue(tmp_path: Path) -> None:
    from coralfs.codec import records
    from coralfs.store.keys import DEMOTIONS

    datas = _versions(3)
    with Repository.init(tmp_path / "r", auto_repack=False) as repo:
        ids = _commit_all(repo, datas)
        m = repo.get_manifest(repo.entry(ids[1].hex(), "m.safetensors").manifest)
        victim = next(c for c in m.chunk_ids() if len(repo.objects.chunk_record(c)) > 1000)
        rec = bytearray(repo.objects.chunk_record(victim))
        h = records.parse_header(bytes(rec))
        rec[h.payload_offset + (len(rec) - h.payload_offset) // 2] ^= 0x40
        repo.store.write(lambda t: (t.put("chunks", victim, bytes(rec)),
                                    t.put("index", DEMOTIONS + b"junk", b"")))
        repo.objects.chunk_cache.clear()
        s = repo.repack()
        assert repo.pending_demotions() == 0 and s.dropped >= 2 and s.demoted > 0
        assert repo.objects.chunk_record(victim) == bytes(rec)  # left as it was, for fsck to report
        assert not fsck(repo).ok
        _check(repo, [ids[2]], [datas[2]])  # the newest still reads


def test_chains_are_fetched_ahead_of_their_decode(tmp_path: Path) -> None:
    """With O_DIRECT reads, a reader's read-ahead follows delta chains: every delta record
    on a chain is fetched into the page cache at once (its decoder then reads memory),
    while keyframes are left to the decoder's direct reads."""
    datas = _versions(4)
    with Repository.init(tmp_path / "r") as repo:
        ids = _commit_all(repo, datas)
        repo.wait_repack()
        oldest = repo.get_manifest(repo.entry(ids[0].hex(), "m.safetensors").manifest).chunk_ids()
        chain: dict[bytes, bool] = {}  # every record the oldest version's chunks decode from -> is a delta
        todo = list(oldest)
        while todo:
            c = todo.pop()
            if c not in chain:
                bases = repo.objects.chunk_header(c).bases
                chain[c] = bool(bases)
                todo.extend(bases)
        assert sum(chain.values()) >= 3 and not all(chain.values())
        path = os.path.join(repo.objects.store.path, "data.mdb")
    # closed (its map is gone, so nothing keeps the pages): evict the file from the page cache
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # (dirty pages are not evicted: commits may not have synced them)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    with Repository(tmp_path / "r") as repo:
        store = repo.objects.store
        if not store.direct_reads:
            pytest.skip("O_DIRECT is not available on this filesystem")

        def resident() -> dict[bytes, bool]:
            out = {}
            with store.read() as t, t.txn.cursor(db=t.dbs["chunks"]) as cur:
                for c in chain:
                    assert cur.set_key(c)
                    loc = t._locate(cur)
                    out[c] = loc is not None and t._resident(loc[0], 16 + loc[1])
            return out

        assert not any(resident().values())
        with store.read() as t:  # (what the read-ahead thread does; ``_advise`` hides errors)
            t.advise("chunks", oldest)
            repo.objects._advise_chains(t, oldest)
        deadline = time.monotonic() + 10  # (the kernel reads them in the background)
        while not all(r for c, r in resident().items() if chain[c]):  # every delta on the chains
            assert time.monotonic() < deadline, "the deltas on the chains were not fetched"
            time.sleep(0.02)
        assert not any(r for c, r in resident().items() if not chain[c])  # keyframes: not fetched
        _check(repo, ids, datas)
