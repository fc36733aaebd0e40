"""The LMDB-backed store: one environment per repository, named databases.

Databases: ``keys.DATABASES`` (chunks, objects, refs, stage, index, config); what their keys
and values are is :mod:`coralfs.store.keys`.

LMDB gives one writer and many readers across processes. Read transactions are
kept short so a long-lived process (the mount) never pins old pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import lmdb
import numpy as np

from coralfs.errors import CoralError, NoSpace
from coralfs.store.keys import CHUNKS, DATABASES, OBJECTS, REFS

INITIAL_MAP_SIZE = 1 << 40  # sparse on 64-bit: costs nothing until used
WARM_BUDGET = 64 << 20  # warm_index: B-tree pages a long-lived reader keeps in memory
#: For test suites only: ``CORALFS_UNSAFE_NO_FSYNC=1`` opens environments without fsync at
#: commit (LMDB's ``sync``/``metasync`` off). A killed process loses nothing (its writes are
#: in the page cache); a power loss or kernel crash can lose or corrupt the repository.
NOSYNC_ENV = "CORALFS_UNSAFE_NO_FSYNC"
LOW_SPACE = 64 << 20  # an LMDB write failing with EIO while less than this is free: the disk is full
T = TypeVar("T")
_OPEN: dict[tuple[int, str], list] = {}
_OPEN_LOCK = threading.Lock()


# LMDB 0.9's on-disk layout, for reading values with pread (see Txn._value)
_NODE = struct.Struct("<HHHH")  # MDB_node: mn_lo, mn_hi (data size), mn_flags, mn_ksize
_PAGE = struct.Struct("<QHHI")  # MDB_page header: mp_pgno, mp_pad, mp_flags, mp_pages (overflow)
_DB = struct.Struct("<IHHQQQQQ")  # MDB_db: pad, flags, depth, branch/leaf/overflow pages, entries, root
_F_BIGDATA = 0x01
_P_BRANCH = 0x01
_P_LEAF = 0x02
_P_OVERFLOW = 0x04
_PREAD_OK = lmdb.version()[:2] == (0, 9)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MADV_WILLNEED = 3


class _DirectReads:
    """Cold reads of large values with ``O_DIRECT`` into recycled buffers.

    A record that is not in the page cache goes from the disk straight into memory the
    decoder reads: no page-cache pages to allocate and fill, no copy out of them, and no
    fresh memory to fault in per record (the buffers are kept and reused). For the 69 MB
    of records of one checkpoint this took ~10 ms of CPU instead of 50-60 ms through the
    page cache (bench/RESULTS.md). Only a transaction that asks for it (``Store.read(direct=
    True)``: the chunk decoder) gets such views; they are valid inside that transaction,
    whose end hands the buffers back. Where the filesystem refuses ``O_DIRECT`` (tmpfs) or a
    read is refused, reads fall back to ``pread``."""

    SIZE = 2 << 20  # one buffer: a 1 MiB tensor piece's record with room to spare
    KEEP = 16  # buffers kept for reuse (more are allocated when more reads are in flight)
    MAX_OUT = 64  # buffers out at once (128 MiB: decoders in deep chains hold one per level)
    ALIGN = 4096

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0))
        self.enabled = hasattr(os, "O_DIRECT")
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.out = 0  # buffers handed out and not yet given back

    def _take(self) -> mmap.mmap | None:
        with self._lock:
            if self.out >= self.MAX_OUT:
                return None
            self.out += 1
            if self._free:
                return self._free.pop()
        buf = mmap.mmap(-1, self.SIZE)
        touch = np.frombuffer(buf, dtype=np.uint8)
        touch[:: mmap.PAGESIZE] = 0  # faulted in once, here, not on every read
        del touch
        return buf

    def reserve(self) -> None:
        """Fault in the buffers kept for reuse now (a long-lived reader, before it reads)."""
        bufs = [self._take() for _ in range(self.KEEP)]
        for b in bufs:
            if b is not None:
                self.give(b)

    @property
    def idle(self) -> int:
        """Buffers kept for reuse, not handed out."""
        with self._lock:
            return len(self._free)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            self.out -= 1
            if len(self._free) < self.KEEP:
                self._free.append(buf)

    def read(self, off: int, n: int) -> mmap.mmap | None:
        """A buffer holding the file's bytes ``[off, off + n)`` at its start (``off`` aligned),
        or None when this read cannot go direct."""
        total = (n + self.ALIGN - 1) // self.ALIGN * self.ALIGN
        if not self.enabled or off % self.ALIGN or total > self.SIZE:
            return None
        buf = self._take()
        if buf is None:  # many reads in flight already: this one goes through the page cache
            return None
        try:
            with memoryview(buf) as whole, whole[:total] as dst:
                got = os.preadv(self.fd, [dst], off)
        except OSError as e:
            self.give(buf)
            if e.errno == errno.EINVAL:  # alignment or a filesystem without O_DIRECT
                self.enabled = False
                return None
            raise
        if got < n:
            self.give(buf)
            return None
        return buf

    def close(self) -> None:
        os.close(self.fd)
        self._free.clear()


class Txn:
    """A transaction with the named databases at hand.

    Values LMDB keeps on their own overflow pages (anything over ~2 KB: chunk records,
    manifests) are read in read transactions with one ``pread`` of exactly their bytes,
    not through LMDB's memory map. Through the map, py-lmdb touches every page of a value
    inside ``get``, and the kernel answers each first touch of a page with read-around
    (``read_ahead_kb``: 8 MiB on the 2-core VM the benchmarks ran on), so a cold read pulled 2.3-4.9x the
    record bytes it needed from disk (bench/RESULTS.md). The map is opened MADV_RANDOM
    (B-tree pages come in 4 KiB at a time) and a value's place is read from its leaf node;
    its overflow-page header is checked before the bytes are trusted, and anything
    unexpected falls back to the map. The read transaction keeps those pages from being
    reused while it is open. A zero-copy reader (``buffers``) whose value's pages are all in
    the page cache already (``mincore``) gets a view of the map instead: minor faults, no
    copy (69 MB of records: ~6 ms instead of ~17 ms). The chunk decoder's transactions
    (``direct``) read a value that is not in the page cache with ``O_DIRECT`` instead (see
    ``_DirectReads``). Write transactions always read through the map (their own dirty
    pages are not in the file yet)."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, lmdb._Database], write: bool,
                 buffers: bool = False, fd: int = -1, psize: int = 4096, direct: _DirectReads | None = None,
                 use_direct: bool = False, main: lmdb._Database | None = None) -> None:
        self.txn = txn
        self.dbs = dbs
        self.write = write
        self._buffers = buffers  # callers get zero-copy views (valid inside the transaction)
        self._fd = fd if not write and _PREAD_OK else -1
        self._psize = psize
        self._map_addr = 0  # where LMDB's map starts, learnt from the first leaf page seen
        self._direct = direct if self._fd >= 0 and direct is not None and direct.enabled else None
        self._use_direct = use_direct and buffers and self._direct is not None
        self._held: list[mmap.mmap] = []  # direct-read buffers, handed back when the transaction ends
        self._main = main

    def _release(self) -> None:
        if self._direct is not None:
            for buf in self._held:
                self._direct.give(buf)
        self._held.clear()

    def _locate(self, cur: lmdb.Cursor) -> tuple[int, int] | None:
        """``(file offset of the first overflow page, value length)`` for the cursor's entry,
        read from its leaf node without touching the value; None for a value kept in the leaf."""
        k = cur.key()  # a view of the key inside the leaf page
        addr = np.frombuffer(k, dtype=np.uint8).ctypes.data
        lo, hi, flags, ksize = _NODE.unpack(ctypes.string_at(addr - _NODE.size, _NODE.size))
        if ksize != len(k) or not flags & _F_BIGDATA:
            return None
        self._learn_map(cur)
        pgno = int.from_bytes(ctypes.string_at(addr + ksize, 8), "little")
        return pgno * self._psize, lo | hi << 16

    def _learn_map(self, cur: lmdb.Cursor) -> bool:
        """Learn where LMDB's map starts: the header of the leaf page the cursor is on names
        the page's number."""
        if not self._map_addr:
            page = np.frombuffer(cur.key(), dtype=np.uint8).ctypes.data & ~(self._psize - 1)
            pgno, _, pflags, _ = _PAGE.unpack(ctypes.string_at(page, _PAGE.size))
            if pflags & _P_LEAF:
                self._map_addr = page - pgno * self._psize
        return bool(self._map_addr)

    def _warm_tree(self, db: str, limit: int) -> int:
        """Touch the B-tree pages of ``db`` (see ``Store.warm_index``); returns how many."""
        main = self.txn.get(db.encode(), db=self._main) if self._main is not None else None
        with self.txn.cursor(db=self.dbs[db]) as cur:
            if main is None or len(main) < _DB.size or not cur.first() or not self._learn_map(cur):
                return 0
        _, _, depth, _, _, _, _, root = _DB.unpack_from(main)
        level, touched = [root], 0
        for _ in range(depth):
            for pgno in level:  # the whole level in flight at once
                _libc.madvise(ctypes.c_void_p(self._map_addr + pgno * self._psize), self._psize, _MADV_WILLNEED)
            below: list[int] = []
            for pgno in level:
                addr = self._map_addr + pgno * self._psize
                head = ctypes.string_at(addr, _PAGE.size)  # (the fault maps the page)
                got, _, flags, lower = struct.unpack_from("<QHHH", head)
                if got != pgno or not flags & (_P_BRANCH | _P_LEAF) or not _PAGE.size <= lower <= self._psize:
                    return touched  # not a page of this tree (a writer moved on): stop, it was a hint
                touched += 1
                if flags & _P_BRANCH:
                    n = (lower - _PAGE.size) // 2
                    for off in struct.unpack_from(f"<{n}H", ctypes.string_at(addr + _PAGE.size, 2 * n)):
                        if not _PAGE.size <= off <= self._psize - _NODE.size:
                            return touched
                        lo, hi, top, _ = _NODE.unpack(ctypes.string_at(addr + off, _NODE.size))
                        below.append(lo | hi << 16 | top << 32)
            if not below or touched + len(below) > limit:
                break
            level = below
        return touched

    def _resident(self, off: int, n: int) -> bool:
        """Whether the map's pages for ``[off, off + n)`` are all in the page cache
        (``mincore``): then reading through the map costs minor faults only, no copy."""
        if not self._map_addr:
            return False
        pages = (n + self._psize - 1) // self._psize
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(self._map_addr + off), ctypes.c_size_t(n), vec) != 0:
            return False
        return bytes(vec).count(0) == 0

    def _value(self, cur: lmdb.Cursor, limit: int | None = None) -> tuple[bytes | memoryview, int]:
        """The cursor's value (at most ``limit`` bytes of it) and its full length."""
        if self._fd >= 0:
            loc = self._locate(cur)
            if loc is not None and limit is None and self._buffers and self._resident(loc[0], _PAGE.size + loc[1]):
                # in the page cache already: a view of the map (69 MB of records: 5 ms of minor
                # faults instead of 17 ms of pread copies, warm)
                return cur.value(), loc[1]
            if loc is not None and limit is None and self._use_direct:
                view = self._read_direct(*loc)
                if view is not None:
                    return view, loc[1]
            if loc is not None:
                off, n = loc
                want = n if limit is None else min(n, limit)
                data = os.pread(self._fd, _PAGE.size + want, off)
                if len(data) == _PAGE.size + want:
                    pgno, _, flags, pages = _PAGE.unpack_from(data)
                    if pgno * self._psize == off and flags & _P_OVERFLOW and pages * self._psize >= _PAGE.size + n:
                        view = memoryview(data)[_PAGE.size :]
                        return (view if self._buffers else view.tobytes()), n
        v = cur.value()
        n = len(v)
        if limit is not None:
            v = v[:limit]
        return (v if self._buffers or isinstance(v, bytes) else bytes(v)), n

    def _read_direct(self, off: int, n: int) -> memoryview | None:
        assert self._direct is not None
        buf = self._direct.read(off, _PAGE.size + n)
        if buf is None:
            return None
        self._held.append(buf)
        pgno, _, flags, pages = _PAGE.unpack_from(buf)
        if pgno * self._psize != off or not flags & _P_OVERFLOW or pages * self._psize < _PAGE.size + n:
            return None
        return memoryview(buf)[_PAGE.size : _PAGE.size + n]

    def get(self, db: str, key: bytes) -> bytes | None:
        if self._fd < 0:
            v = self.txn.get(key, db=self.dbs[db])
            return v if v is None or self._buffers or isinstance(v, bytes) else bytes(v)
        with self.txn.cursor(db=self.dbs[db]) as cur:
            return self._value(cur)[0] if cur.set_key(key) else None  # type: ignore[return-value]

    def advise(self, db: str, keys: Iterable[bytes], values: bool | None = None) -> None:
        """Look these keys up (their B-tree pages come in from disk now) and start reading
        their values in the background (``POSIX_FADV_WILLNEED`` on exactly their bytes), so
        a reader about to decode several chunks gets their I/O in flight at once. By default
        values are left alone where they are read with ``O_DIRECT`` (which bypasses what
        this fetches); ``values=True`` fetches them anyway (they will be read from the page
        cache), ``False`` never."""
        if self._fd < 0:
            return
        if values is None:
            values = self._direct is None
        with self.txn.cursor(db=self.dbs[db]) as cur:
            for key in keys:
                if cur.set_key(key) and values:
                    loc = self._locate(cur)
                    if loc is not None:
                        os.posix_fadvise(self._fd, loc[0], _PAGE.size + loc[1], os.POSIX_FADV_WILLNEED)

    def peek(self, db: str, key: bytes, n: int) -> tuple[bytes, int] | None:
        """The first ``n`` bytes of a value (a record header) and the value's full length,
        reading no more of it than that."""
        with self.txn.cursor(db=self.dbs[db]) as cur:
            if not cur.set_key(key):
                return None
            v, total = self._value(cur, n)
            return bytes(v), total

    def scan(self, db: str, n: int) -> Iterator[tuple[bytes, int, bytes]]:
        """``(key, value length, first n bytes of the value)`` for every entry."""
        with self.txn.cursor(db=self.dbs[db]) as cur:
            ok = cur.first()
            while ok:
                v, total = self._value(cur, n)
                yield bytes(cur.key()), total, bytes(v)
                ok = cur.next()

    def has(self, db: str, key: bytes) -> bool:
        with self.txn.cursor(db=self.dbs[db]) as cur:
            return cur.set_key(key)

    def put(self, db: str, key: bytes, value: bytes | memoryview, overwrite: bool = True) -> bool:
        return self.txn.put(key, value, db=self.dbs[db], overwrite=overwrite)

    def delete(self, db: str, key: bytes) -> bool:
        return self.txn.delete(key, db=self.dbs[db])

    def items(self, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        with self.txn.cursor(db=self.dbs[db]) as cur:
            if not cur.set_range(prefix):
                return
            ok = True
            while ok:
                k = bytes(cur.key())
                if not k.startswith(prefix):
                    break
                yield k, bytes(self._value(cur)[0])
                ok = cur.next()

    def keys(self, db: str, prefix: bytes = b"") -> Iterator[bytes]:
        with self.txn.cursor(db=self.dbs[db]) as cur:
            if not cur.set_range(prefix):
                return
            for k in cur.iternext(keys=True, values=False):
                k = bytes(k)
                if not k.startswith(prefix):
                    break
                yield k

    def stat(self, db: str) -> dict:
        return self.txn.stat(self.dbs[db])


class Store:
    """An LMDB environment shared safely by threads and processes."""

    def __init__(self, path: str | os.PathLike[str], create: bool = False, readonly: bool = False) -> None:
        self.path = os.fspath(path)
        if create:
            os.makedirs(self.path, exist_ok=True)
        elif not os.path.exists(os.path.join(self.path, "data.mdb")):
            raise CoralError(f"no store at {self.path}")
        self._lock = threading.Lock()
        self._local = threading.local()
        self._key = (os.getpid(), os.path.realpath(self.path))
        self._closed = False
        sync = os.environ.get(NOSYNC_ENV) != "1"
        with _OPEN_LOCK:  # LMDB allows one environment per file per process: share it
            shared = _OPEN.get(self._key)
            if shared is None:
                env = lmdb.open(
                    self.path, map_size=INITIAL_MAP_SIZE, max_dbs=len(DATABASES) + 2, readonly=readonly,
                    max_readers=512, metasync=sync, sync=sync, lock=True, readahead=False, subdir=True,
                )
                dbs = {name: env.open_db(name.encode(), create=not readonly) for name in DATABASES}
                fd = os.open(os.path.join(self.path, "data.mdb"), os.O_RDONLY | os.O_CLOEXEC)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # preads fetch what they ask for
                try:
                    direct: _DirectReads | None = _DirectReads(os.path.join(self.path, "data.mdb"))
                except OSError:
                    direct = None
                # [env, dbs, refcount, transactions in flight, condition guarding them, fd, page size,
                #  direct reads, the main database (it names the others)]
                shared = _OPEN[self._key] = [env, dbs, 0, 0, threading.Condition(), fd, env.stat()["psize"], direct,
                                             env.open_db(None)]
            shared[2] += 1
        self._shared = shared
        self.env: lmdb.Environment = shared[0]
        self.dbs: dict[str, lmdb._Database] = shared[1]

    def close(self) -> None:
        """Release this handle; the last one closes the environment once no transaction is in
        flight (a read-ahead thread may still be decoding straight from the map)."""
        with _OPEN_LOCK:
            if self._closed:
                return
            self._closed = True
            shared = _OPEN.get(self._key)
            if shared is None or shared is not self._shared:
                return
            shared[2] -= 1
            if shared[2] > 0:
                return
            del _OPEN[self._key]
        cond = shared[4]
        with cond:
            shared[2] = -1  # closed: no new transactions
            while shared[3] > 0:
                cond.wait()
        self.env.close()
        os.close(shared[5])
        if shared[7] is not None:
            shared[7].close()

    @contextlib.contextmanager
    def _txn_slot(self) -> Iterator[None]:
        shared, cond = self._shared, self._shared[4]
        with cond:
            if self._closed or shared[2] < 0:
                raise CoralError(f"the store at {self.path} is closed")
            shared[3] += 1
        try:
            yield
        finally:
            with cond:
                shared[3] -= 1
                if shared[3] == 0:
                    cond.notify_all()

    @contextlib.contextmanager
    def read(self, buffers: bool = False, direct: bool = False) -> Iterator[Txn]:
        """A short read transaction. With ``buffers``, values are zero-copy views valid only
        inside it; with ``direct`` too, large values not in the page cache are read with
        ``O_DIRECT`` (see ``_DirectReads``)."""
        with self._txn_slot(), self.env.begin(buffers=True) as txn:
            t = Txn(txn, self.dbs, False, buffers, self._shared[5], self._shared[6], self._shared[7], direct,
                    self._shared[8])
            try:
                yield t
            finally:
                t._release()

    def write(self, fn: Callable[[Txn], T]) -> T:
        """Run ``fn`` in one write transaction, committed atomically; grows the map when full.

        A full file system is ``NoSpace`` (ENOSPC), whatever LMDB made of it: ``DiskError``
        (ENOSPC, EDQUOT), or ``Error: Input/output error``, which LMDB 0.9 reports for a short
        write (the file system filled up in the middle of one) while little space is left. The
        transaction is then not committed, and the environment stays usable."""
        with self._txn_slot():
            for _ in range(8):
                try:
                    with self.env.begin(write=True) as txn:
                        return fn(Txn(txn, self.dbs, True))
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)  # adopt the size another process chose
                except lmdb.Error as e:
                    why = self._disk_full(e)
                    if why is None:
                        raise
                    self._local.nospace = True
                    raise NoSpace(f"no space left on device: writing to the repository store {self.path} "
                                  f"failed ({why})") from e
        self._local.nospace = True
        raise NoSpace(f"no space left in the repository store {self.path}: its map is full and could not grow")

    def _disk_full(self, e: lmdb.Error) -> str | None:
        """Why ``e`` means the file system is full, or None when it does not."""
        text = str(e)
        free = self.free_bytes()
        shown = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        if isinstance(e, lmdb.DiskError) or os.strerror(errno.ENOSPC) in text or os.strerror(errno.EDQUOT) in text:
            return f"{text}; {shown}"
        if os.strerror(errno.EIO) in text and free is not None and free < LOW_SPACE:
            return f"{text} with {shown} on its file system"
        return None

    def free_bytes(self) -> int | None:
        """Bytes this process may still write on the store's file system (root may use the reserve)."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return None
        return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize

    def nospace_seen(self, clear: bool = True) -> bool:
        """Whether a write of this thread failed with NoSpace (since the flag was last cleared)."""
        seen = getattr(self._local, "nospace", False)
        if clear:
            self._local.nospace = False
        return seen

    def _grow(self) -> None:
        with self._lock:
            self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def sync(self) -> None:
        self.env.sync(True)

    @property
    def direct_reads(self) -> bool:
        """Whether cold values are read with ``O_DIRECT`` (see ``_DirectReads``)."""
        d = self.direct_pool
        return d is not None and d.enabled

    @property
    def direct_pool(self) -> _DirectReads | None:
        """The environment's ``O_DIRECT`` buffer pool (None where the file cannot be opened
        with ``O_DIRECT``); its ``out`` and ``idle`` count the buffers (tests, diagnostics)."""
        return self._shared[7]

    def warm_index(self, dbs: Iterable[str] = (CHUNKS, OBJECTS, REFS), budget: int = WARM_BUDGET) -> int:
        """Bring these databases' B-tree pages (branches and leaves, not the values) into
        memory through the map, within ``budget`` bytes; returns the bytes of B-tree pages
        brought in. A long-lived reader (the mount daemon) calls this once at start: every
        later lookup then finds its pages in memory instead of waiting on a 4 KiB read (a
        cold chunk lookup costs one or two of them, ~1 ms each on the benchmarks' VM disk). The
        pages stay mapped, so the kernel keeps them while they are in use. The tree is
        walked level by level from its root (LMDB 0.9's page layout, checked page by page),
        each level's pages all asked for at once (``MADV_WILLNEED``), so the disk has them
        in flight together; a cursor walk would also touch every value's first page. The
        direct-read buffers are faulted in here too."""
        if not _PREAD_OK:
            return 0
        if self._shared[7] is not None:
            self._shared[7].reserve()
        done = 0
        with self.read() as t:
            for db in dbs:
                st = t.stat(db)
                pages = st["branch_pages"] + st["leaf_pages"]
                if not st["entries"] or pages * st["psize"] > budget:
                    continue
                n = t._warm_tree(db, pages)
                budget -= n * st["psize"]
                done += n * st["psize"]
        return done

    def info(self) -> dict:
        info = dict(self.env.info())
        info.update(self.env.stat())
        info["file_size"] = os.path.getsize(os.path.join(self.path, "data.mdb"))
        return info
