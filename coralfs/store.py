"""The LMDB-backed store: one environment per repository, named databases.

Databases:
    chunks   chunk id (32 bytes)            -> chunk record (coralfs.records)
    objects  object id (32 bytes)           -> serialized object (coralfs.objects)
    refs     b"branch:NAME" / b"tag:NAME"   -> 32-byte id;  b"HEAD" -> b"ref:branch:NAME" or id
    stage    path (utf-8)                   -> JSON staging entry
    index    arbitrary index keys           -> values (tensor base index, stat cache, ...)
    config   key                            -> value

LMDB gives one writer and many readers across processes. Read transactions are
kept short so a long-lived process (the mount) never pins old pages.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import lmdb

from coralfs.errors import ConcurrentUpdate, CoralError

DB_NAMES = ("chunks", "objects", "refs", "stage", "index", "config")
INITIAL_MAP_SIZE = 1 << 40  # sparse on 64-bit: costs nothing until used
T = TypeVar("T")
_OPEN: dict[tuple[int, str], list] = {}
_OPEN_LOCK = threading.Lock()


class Txn:
    """A transaction with the named databases at hand."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, lmdb._Database], write: bool) -> None:
        self.txn = txn
        self.dbs = dbs
        self.write = write

    def get(self, db: str, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self.dbs[db])

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
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                yield bytes(k), bytes(v)

    def keys(self, db: str, prefix: bytes = b"") -> Iterator[bytes]:
        with self.txn.cursor(db=self.dbs[db]) as cur:
            if not cur.set_range(prefix):
                return
            for k in cur.iternext(keys=True, values=False):
                if not k.startswith(prefix):
                    break
                yield bytes(k)

    def cas(self, db: str, key: bytes, expected: bytes | None, new: bytes | None) -> None:
        """Compare-and-swap inside this write transaction."""
        current = self.get(db, key)
        if current != expected:
            raise ConcurrentUpdate(f"{key.decode(errors='replace')} moved (expected "
                                   f"{expected.hex()[:12] if expected else 'none'}, found "
                                   f"{current.hex()[:12] if current else 'none'})")
        if new is None:
            self.delete(db, key)
        else:
            self.put(db, key, new)

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
        self._key = (os.getpid(), os.path.realpath(self.path))
        self._closed = False
        with _OPEN_LOCK:  # LMDB allows one environment per file per process: share it
            shared = _OPEN.get(self._key)
            if shared is None:
                env = lmdb.open(
                    self.path, map_size=INITIAL_MAP_SIZE, max_dbs=len(DB_NAMES) + 2, readonly=readonly,
                    max_readers=512, metasync=True, sync=True, lock=True, readahead=True, subdir=True,
                )
                dbs = {name: env.open_db(name.encode(), create=not readonly) for name in DB_NAMES}
                # [env, dbs, refcount, transactions in flight, condition guarding them]
                shared = _OPEN[self._key] = [env, dbs, 0, 0, threading.Condition()]
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
    def read(self, buffers: bool = False) -> Iterator[Txn]:
        """A short read transaction. With ``buffers``, values are zero-copy views valid only inside it."""
        with self._txn_slot(), self.env.begin(buffers=buffers) as txn:
            yield Txn(txn, self.dbs, False)

    def write(self, fn: Callable[[Txn], T]) -> T:
        """Run ``fn`` in one write transaction, committed atomically; grows the map when full."""
        with self._txn_slot():
            for _ in range(8):
                try:
                    with self.env.begin(write=True) as txn:
                        return fn(Txn(txn, self.dbs, True))
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)  # adopt the size another process chose
        raise CoralError("the store could not grow its map")

    def _grow(self) -> None:
        with self._lock:
            self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def sync(self) -> None:
        self.env.sync(True)

    def info(self) -> dict:
        info = dict(self.env.info())
        info.update(self.env.stat())
        info["file_size"] = os.path.getsize(os.path.join(self.path, "data.mdb"))
        return info
