"""The LMDB store's exact-read path: large values read with pread instead of the map."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
from pathlib import Path

import numpy as np
import pytest

from coralfs.store import lmdb as store_mod
from coralfs.store.lmdb import Store

SIZES = [0, 1, 100, 1500, 2100, 4080, 4096, 5000, 65536, 1 << 20, (3 << 20) + 7]


@pytest.fixture
def st(tmp_path: Path):
    s = Store(tmp_path / "store", create=True)
    yield s
    s.close()


def _fill(s: Store) -> dict[bytes, bytes]:
    rng = random.Random(7)
    values = {f"k{i:03d}".encode(): rng.randbytes(n) for i, n in enumerate(SIZES)}
    s.write(lambda t: [t.put("chunks", k, v) for k, v in values.items()])
    # rewrite some, so values move and freed pages get reused
    for k in list(values)[::3]:
        values[k] = rng.randbytes(len(values[k]) + 33)
    s.write(lambda t: [t.put("chunks", k, v) for k, v in values.items()])
    return values


def _count_preads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        calls.append(n)
        return real(fd, n, off)

    monkeypatch.setattr(store_mod.os, "pread", counting)
    return calls


@pytest.mark.parametrize("resident", [False, True])
def test_reads_match_the_map_for_every_size(st: Store, monkeypatch: pytest.MonkeyPatch, resident: bool) -> None:
    """Large values come from one exact pread, or, when their pages are all in the page
    cache (mincore), as a view of the map; either way the same bytes as LMDB's own get."""
    values = _fill(st)
    monkeypatch.setattr(store_mod.Txn, "_resident", lambda self, off, n: resident)
    calls = _count_preads(monkeypatch)
    with st.read() as t:
        for k, v in values.items():
            got = t.get("chunks", k)
            assert isinstance(got, bytes) and got == v
            assert t.peek("chunks", k, 10) == (v[:10], len(v))
        assert t.get("chunks", b"missing") is None and t.peek("chunks", b"missing", 4) is None
        assert dict(t.items("chunks")) == values
        assert [(k, n, h) for k, n, h in t.scan("chunks", 3)] == [(k, len(v), v[:3]) for k, v in sorted(values.items())]
    # the large values (LMDB overflow pages) came from pread, exactly their own bytes
    big = [len(v) for v in values.values() if len(v) > 4096]
    assert calls and max(calls) >= max(big) and max(calls) <= max(big) + 16
    calls.clear()
    with st.read(buffers=True) as t:  # zero-copy reads: from the map when resident
        for k, v in values.items():
            assert bytes(t.get("chunks", k)) == v
    assert (calls == []) if resident else (max(calls) >= max(big) and max(calls) <= max(big) + 16)
    # the same through a write transaction (always the map)
    assert st.write(lambda t: {k: t.get("chunks", k) for k in values}) == values


def test_residency_is_read_from_the_kernel(st: Store) -> None:
    """Values just written are in the page cache: mincore says so for their map pages."""
    values = _fill(st)
    k = max(values, key=lambda k: len(values[k]))
    with st.read(buffers=True) as t, t.txn.cursor(db=t.dbs["chunks"]) as cur:
        assert cur.set_key(k)
        off, n = t._locate(cur)
        assert n == len(values[k]) and t._map_addr
        assert t._resident(off, n)
        assert bytes(t.get("chunks", k)) == values[k]


def test_peek_reads_only_the_prefix(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    values = _fill(st)
    calls = _count_preads(monkeypatch)
    k = next(k for k, v in values.items() if len(v) > 1 << 20)
    with st.read() as t:
        assert t.peek("chunks", k, 64) == (values[k][:64], len(values[k]))
    assert calls == [16 + 64]  # the overflow page header and the prefix, nothing more


def test_a_wrong_location_falls_back_to_the_map(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The overflow-page header is checked before pread bytes are trusted: a page size
    that does not match the file (so every computed offset is wrong) still gives right bytes."""
    values = _fill(st)
    with st.read() as t:
        t._psize = 8192
        for k, v in values.items():
            assert t.get("chunks", k) == v
            assert t.peek("chunks", k, 5) == (v[:5], len(v))
    monkeypatch.setattr(store_mod, "_PREAD_OK", False)  # an LMDB of another format: map only
    with st.read() as t:
        assert dict(t.items("chunks")) == values


def _drop_file_cache(s: Store) -> None:
    """Evict the store file's pages from the page cache (they are clean once synced)."""
    s.sync()
    fd = os.open(os.path.join(s.path, "data.mdb"), os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _count_direct(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.preadv

    def counting(fd: int, bufs: list, off: int) -> int:
        calls.append(sum(len(b) for b in bufs))
        return real(fd, bufs, off)

    monkeypatch.setattr(store_mod.os, "preadv", counting)
    return calls


def test_direct_reads_of_cold_values(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunk decoder's transactions (``direct``) read large values that are not in the
    page cache with O_DIRECT into recycled buffers; the bytes are LMDB's, and the buffers go
    back to the pool when the transaction ends. Values too large for a buffer use pread."""
    values = _fill(st)
    _drop_file_cache(st)
    direct = st.direct_pool
    calls = _count_direct(monkeypatch)
    preads = _count_preads(monkeypatch)
    with st.read(buffers=True, direct=True) as t:
        for k, v in values.items():
            assert bytes(t.get("chunks", k)) == v
        held = list(t._held)
    if direct is None or not direct.enabled:  # a filesystem without O_DIRECT (tmpfs): pread
        assert calls == [] and preads
        return
    direct_sizes = [n for n in map(len, values.values()) if 4096 < n <= direct.SIZE - 16]
    assert len(calls) == len(direct_sizes) and all(c % 4096 == 0 for c in calls)
    assert held and all(any(b is f for f in direct._free) for b in held)  # handed back
    assert max(preads) >= max(map(len, values.values()))  # the 3 MiB value: pread
    # a second transaction reuses the buffers instead of faulting in new memory
    _drop_file_cache(st)
    with st.read(buffers=True, direct=True) as t:
        for k, v in values.items():
            assert bytes(t.get("chunks", k)) == v
        assert all(any(b is f for f in held) for b in t._held)


def test_direct_reads_only_where_asked(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain and zero-copy transactions never use O_DIRECT views (their values may outlive
    the transaction as bytes); values in the page cache are read through the map."""
    values = _fill(st)
    _drop_file_cache(st)
    calls = _count_direct(monkeypatch)
    with st.read() as t:
        assert {k: t.get("chunks", k) for k in values} == values
    with st.read(buffers=True) as t:
        assert {k: bytes(t.get("chunks", k)) for k in values} == values
    assert calls == []
    monkeypatch.setattr(store_mod.Txn, "_resident", lambda self, off, n: True)
    with st.read(buffers=True, direct=True) as t:
        assert {k: bytes(t.get("chunks", k)) for k in values} == values
    assert calls == []


def test_direct_reads_fall_back(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that refuses O_DIRECT (EINVAL) turns direct reads off, and a wrong
    computed location is caught by the overflow-page header: right bytes either way."""
    values = _fill(st)
    direct = st.direct_pool
    if direct is None:
        pytest.skip("O_DIRECT cannot be opened on this filesystem")
    monkeypatch.setattr(store_mod.Txn, "_resident", lambda self, off, n: False)
    with st.read(buffers=True, direct=True) as t:
        t._psize = 8192  # every computed offset is wrong
        assert {k: bytes(t.get("chunks", k)) for k in values} == values

    def refuse(fd: int, bufs: list, off: int) -> int:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(store_mod.os, "preadv", refuse)
    with st.read(buffers=True, direct=True) as t:
        assert {k: bytes(t.get("chunks", k)) for k in values} == values
    assert direct.enabled is False


def test_direct_reads_are_bounded(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most MAX_OUT buffers are out at once (nested transactions of a deep chain each
    hold theirs); past that, reads go through pread, and every buffer comes back."""
    values = _fill(st)
    direct = st.direct_pool
    if direct is None or not direct.enabled:
        pytest.skip("O_DIRECT is not available on this filesystem")
    monkeypatch.setattr(store_mod.Txn, "_resident", lambda self, off, n: False)
    monkeypatch.setattr(store_mod._DirectReads, "MAX_OUT", 3)
    big = [k for k, v in values.items() if 4096 < len(v) <= direct.SIZE - 16]
    assert len(big) >= 4
    with contextlib.ExitStack() as stack:
        txns = [stack.enter_context(st.read(buffers=True, direct=True)) for _ in big]
        for t, k in zip(txns, big, strict=True):
            assert bytes(t.get("chunks", k)) == values[k]
        assert direct.out == 3 and sum(len(t._held) for t in txns) == 3
    assert direct.out == 0


def test_warm_index_brings_btree_pages_in(tmp_path: Path) -> None:
    """warm_index walks the B-tree pages (not the values) into memory, within a budget."""
    st = Store(tmp_path / "store", create=True)
    rng = random.Random(3)
    st.write(lambda t: [t.put("chunks", rng.randbytes(32), rng.randbytes(rng.choice([100, 3000, 9000])))
                        for _ in range(3000)])
    with st.read() as t:
        s = t.stat("chunks")
    pages = s["branch_pages"] + s["leaf_pages"]
    assert s["depth"] >= 2 and pages > 10
    assert st.warm_index(budget=pages * s["psize"] - 1) == 0  # over budget: skipped
    _drop_file_cache(st)
    st.close()  # (unmapped: the writes read the tree through the map, so it stayed cached)
    st = Store(tmp_path / "store")
    _drop_file_cache(st)

    def resident_pages() -> int:  # of the whole file, through the map (mincore)
        with st.read() as t, t.txn.cursor(db=t.dbs["chunks"]) as cur:
            assert cur.first()
            page = np.frombuffer(cur.key(), dtype=np.uint8).ctypes.data & ~(s["psize"] - 1)  # a leaf
            pgno = store_mod._PAGE.unpack(ctypes.string_at(page, store_mod._PAGE.size))[0]
            n = os.path.getsize(os.path.join(st.path, "data.mdb")) // s["psize"]
            vec = (ctypes.c_ubyte * n)()
            assert store_mod._libc.mincore(ctypes.c_void_p(page - pgno * s["psize"]), n * s["psize"], vec) == 0
            return sum(b & 1 for b in vec)

    before = resident_pages()
    assert before < pages // 2  # the drop worked: most of the tree is on disk only
    assert st.warm_index(("chunks",)) == pages * s["psize"]
    assert resident_pages() - before >= pages - 4  # the tree is in memory now (not the values)
    assert resident_pages() < before + pages + 8  # ... and not the values
    direct = st.direct_pool
    assert direct is None or (direct.idle == direct.KEEP and direct.out == 0)  # buffers ready
    st.close()


def test_commits_are_fsynced_unless_a_test_suite_turns_it_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repository syncs every commit (LMDB sync and metasync); only CORALFS_UNSAFE_NO_FSYNC=1,
    which tests/conftest.py sets for the suite, turns that off."""
    monkeypatch.delenv(store_mod.NOSYNC_ENV, raising=False)
    s = Store(tmp_path / "synced", create=True)
    flags = s.env.flags()
    s.close()
    assert flags["sync"] and flags["metasync"]
    monkeypatch.setenv(store_mod.NOSYNC_ENV, "1")
    s = Store(tmp_path / "unsynced", create=True)
    flags = s.env.flags()
    s.close()
    assert not flags["sync"] and not flags["metasync"]
