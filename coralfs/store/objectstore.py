"""Chunks and objects over the LMDB store, with verified reads and a decoded-chunk cache.

Every chunk read is checked against its id (BLAKE3 of the decoded bytes); a mismatch
raises IntegrityError, never returns wrong bytes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from coralfs.codec import records
from coralfs.codec.records import RecordHeader
from coralfs.errors import CoralError, FormatError, IntegrityError, MissingObject
from coralfs.hashing import digest
from coralfs.lru import LRU
from coralfs.store.lmdb import Store, Txn
from coralfs.store.objects import Object, deserialize

MAX_CHAIN = 64  # a sanity bound for decoding; ingest keeps chains far shorter
OBJECT_CACHE = 4096  # decoded objects kept (manifests, trees, commits)
ADVISED_MEMORY = 4096  # chunks ``advise`` remembers having asked for (it does not ask twice)
ADVISE_CHAIN_LIMIT = 4096  # headers one ``advise`` reads down delta chains at the most


def _all_bases(h: RecordHeader) -> Iterable[bytes]:
    return h.bases


class Headers:
    """Chunk record headers, read from the first ``records.PEEK_LEN`` bytes of each record
    (never the whole record), and walks down delta chains: the one place that reads a header,
    parses it and follows its bases.

    Reads go through the transaction ``t`` or, without one, each through a short read
    transaction of its own on ``store`` (a long walk pins no old pages). ``known``: headers
    the caller knows better than the store (records re-encoded in a batch not written yet),
    with their records' lengths."""

    def __init__(self, t: Txn | None = None, *, store: Store | None = None) -> None:
        assert (t is None) != (store is None)
        self.t = t
        self.store = store
        self.known: dict[bytes, tuple[RecordHeader, int]] = {}

    def info(self, cid: bytes) -> tuple[RecordHeader, int] | None:
        """A chunk's record header and the record's stored length; None when there is no such
        chunk. A header that cannot be parsed raises ``FormatError``."""
        got = self.known.get(cid)
        if got is not None:
            return got
        if self.t is not None:
            v = self.t.peek("chunks", cid, records.PEEK_LEN)
        else:
            assert self.store is not None
            with self.store.read() as t:
                v = t.peek("chunks", cid, records.PEEK_LEN)
        return None if v is None else (records.parse_header(v[0]), v[1])

    def get(self, cid: bytes) -> RecordHeader | None:
        """A chunk's record header (None: no such chunk)."""
        got = self.info(cid)
        return None if got is None else got[0]

    def walk(self, starts: Iterable[bytes], follow: Callable[[RecordHeader], Iterable[bytes]] = _all_bases, *,
             limit: int | None = None, must_exist: bool = False, skip_bad: bool = False,
             ) -> Iterator[tuple[bytes, RecordHeader, int]]:
        """Each chunk of ``starts`` and, depth first, the bases ``follow(header)`` names of every
        chunk visited (all of them by default), each chunk once: ``(id, header, stored length)``.
        A missing chunk is passed over (``must_exist``: ``MissingObject``); a header that cannot
        be read raises (``skip_bad``: passed over, its bases unknown). ``limit``: look at no
        more chunks than this."""
        todo = list(starts)
        seen: set[bytes] = set()
        while todo and (limit is None or len(seen) < limit):
            cid = todo.pop()
            if cid in seen:
                continue
            seen.add(cid)
            try:
                got = self.info(cid)
            except CoralError:
                if skip_bad:
                    continue
                raise
            if got is None:
                if must_exist:
                    raise MissingObject(f"chunk {cid.hex()} is missing")
                continue
            yield cid, got[0], got[1]
            todo.extend(follow(got[0]))

    def chain(self, cid: bytes, *, limit: int | None = MAX_CHAIN, must_exist: bool = False
              ) -> Iterator[tuple[bytes, RecordHeader, int]]:
        """``cid`` and the chunks down its chain of first bases, in order (the last one, when
        the walk ends there, is a keyframe)."""
        return self.walk([cid], lambda h: h.bases[:1], limit=limit, must_exist=must_exist)

    def scan(self, errors: dict[bytes, CoralError] | None = None) -> Iterator[tuple[bytes, int, RecordHeader | None]]:
        """Every chunk in the store (through ``t``): ``(id, stored length, header)``. A header
        that cannot be parsed raises, or with ``errors`` is recorded there and comes as None."""
        assert self.t is not None
        for cid, size, head in self.t.scan("chunks", records.PEEK_LEN):
            try:
                h: RecordHeader | None = records.parse_header(head)
            except CoralError as e:
                if errors is None:
                    raise
                errors[cid] = e
                h = None
            yield cid, size, h


def start_threads(executor: ThreadPoolExecutor, n: int) -> None:
    """Have ``executor`` (of ``n`` workers) start its threads now: it starts them lazily, one
    per submit, and a reader's first request would pay for that (a few ms in all)."""
    barrier = threading.Barrier(n)

    def meet() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=5)

    for f in [executor.submit(meet) for _ in range(n)]:
        f.result()


class _Flight:
    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ObjectStore:
    def __init__(self, store: Store, cache_bytes: int = 256 << 20) -> None:
        self.store = store
        # verified decoded chunks; a chunk over a quarter of the cache is not kept
        self.chunk_cache: LRU[bytes, bytes] = LRU(max_bytes=cache_bytes, max_value_bytes=cache_bytes // 4)
        self._flock = threading.Lock()
        self._inflight: dict[bytes, _Flight] = {}
        self._queued: set[bytes] = set()
        self._objects: LRU[bytes, Object] = LRU(OBJECT_CACHE)
        self._advised: LRU[bytes, bool] = LRU(ADVISED_MEMORY)  # chunks advise() asked for lately
        self._io: ThreadPoolExecutor | None = None

    # -- chunks ---------------------------------------------------------------
    def chunk_record(self, cid: bytes) -> bytes:
        with self.store.read() as t:
            v = t.get("chunks", cid)
        if v is None:
            raise MissingObject(f"chunk {cid.hex()} is missing")
        return v

    def chunk_header(self, cid: bytes) -> records.RecordHeader:
        return self.chunk_info(cid)[0]

    def chunk_info(self, cid: bytes) -> tuple[records.RecordHeader, int]:
        """A chunk's record header and the record's stored length (only the header is read)."""
        got = Headers(store=self.store).info(cid)
        if got is None:
            raise MissingObject(f"chunk {cid.hex()} is missing")
        return got

    def chain_records(self, cids: Iterable[bytes]) -> dict[bytes, int]:
        """Every chunk decoding ``cids`` touches (they and their delta bases, transitively),
        with the stored size of its record: what a cold read of them has to fetch."""
        with self.store.read() as t:
            return {cid: size for cid, _, size in Headers(t).walk(cids, must_exist=True)}

    def get_chunk(self, cid: bytes, _depth: int = 0) -> bytes:
        """A chunk's decoded, verified bytes. Concurrent callers asking for one chunk share
        one decode (readers often ask for several ranges of one chunk at once)."""
        data = self.chunk_cache.get(cid)
        if data is not None:
            return data
        with self._flock:
            flight = self._inflight.get(cid)
            leader = flight is None
            if leader:
                flight = self._inflight[cid] = _Flight()
        assert flight is not None
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            return flight.data
        try:
            flight.data = self._decode_chunk(cid, _depth)
            return flight.data
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._flock:
                del self._inflight[cid]
            flight.done.set()

    def prefetch(self, executor: Executor, cids: Iterable[bytes]) -> None:
        """Decode these chunks into the cache in the background (skipping cached or queued
        ones); their records' disk reads all start at once."""
        todo = []
        for cid in cids:
            with self._flock:
                if cid in self._inflight or cid in self._queued or self.chunk_cache.get(cid) is not None:
                    continue
                self._queued.add(cid)
            todo.append(cid)
        if not todo:
            return
        self.advise(todo)
        for cid in todo:
            executor.submit(self._prefetch_one, cid)

    def advise(self, cids: Iterable[bytes]) -> None:
        """Look these chunks' records up ahead of their decode, on a background thread: the
        B-tree pages that locate them come in from disk here, not in the decoder. Where
        the store cannot read records with ``O_DIRECT``, also have the disk start reading
        the records themselves (``Txn.advise``): with its reads all in flight the disk
        delivers 69 MB of records in 52-67 ms instead of 98-105 ms one ``pread`` after
        another (cold, bench/RESULTS.md)."""
        todo = []
        with self._flock:
            for cid in cids:
                if cid not in self._advised and self.chunk_cache.get(cid) is None:
                    self._advised.put(cid, True)
                    todo.append(cid)
            if not todo:
                return
            if self._io is None:
                self._io = ThreadPoolExecutor(1, thread_name_prefix="coralfs-io")
            io = self._io
        io.submit(self._advise, todo)

    def start_io(self) -> None:
        """Start the thread ``advise`` works on now (a long-lived reader, before its first read)."""
        with self._flock:
            if self._io is None:
                self._io = ThreadPoolExecutor(1, thread_name_prefix="coralfs-io")
            io = self._io
        start_threads(io, 1)

    def _advise(self, cids: list[bytes]) -> None:
        try:
            with self.store.read() as t:
                t.advise("chunks", cids)
                if self.store.direct_reads:
                    self._advise_chains(t, cids)
        except Exception:  # only a hint: the reads themselves report problems
            pass

    @staticmethod
    def _advise_chains(t: Txn, cids: list[bytes]) -> None:
        """Delta chains: a delta's base is known only once the delta's record is read, so
        a decoder would wait on one disk read after another down a chain. Here (ahead of
        the decoder) each record's header is read and the records of every chain are
        fetched into the page cache at once; the decoder then finds them in memory."""
        for cid, h, _ in Headers(t).walk(cids, limit=ADVISE_CHAIN_LIMIT):
            if h.bases:
                t.advise("chunks", [cid], values=True)

    def _prefetch_one(self, cid: bytes) -> None:
        try:
            self.get_chunk(cid)
        except Exception:  # the reader that needs it gets (and reports) the error
            pass
        finally:
            with self._flock:
                self._queued.discard(cid)

    def _decode_chunk(self, cid: bytes, _depth: int) -> bytes:
        if _depth > MAX_CHAIN:
            raise FormatError("delta chain too deep (a cycle?)")
        for attempt in (0, 1):
            try:
                # the record is read with one exact read, O_DIRECT when it is not in the
                # page cache (lmdb.Txn); bases are fetched in their own short transactions
                memo: dict[bytes, Any] = {}
                with self.store.read(buffers=True, direct=True) as t:
                    record = t.get("chunks", cid)
                    if record is None:
                        raise MissingObject(f"chunk {cid.hex()} is missing")
                    data = records.decode(record, lambda b, m=memo: self._base(b, _depth + 1, m))
                break
            except MissingObject:
                # gc may have re-encoded this chunk against another base and swept the old
                # one between our two reads: the fresh record names a base that exists.
                if attempt:
                    raise
            except FormatError as e:
                raise IntegrityError(f"chunk {cid.hex()[:16]} is corrupt: {e}") from e
        if digest(data) != cid:
            raise IntegrityError(f"chunk {cid.hex()[:16]} does not match its id")
        self.chunk_cache.put(cid, data)
        return data

    def _base(self, cid: bytes, depth: int, memo: dict[bytes, Any]) -> Any:
        """A delta base while decoding a chain: the verified cached chunk when there is one,
        else decoded here as a plain array, neither hashed nor cached. Intermediate versions
        of a chain are rarely wanted for themselves; skipping their copy, hash and cache
        entry cut a warm read of the newest scratch_pt version (up to 5 decodes per piece)
        from 0.37 to 0.29 s (bench/RESULTS.md, second session). Nothing unverified is ever
        served: the chunk decoded on top is verified against its id, so a bad base can only
        end in IntegrityError. ``memo`` shares a base between the two a record may name."""
        data = self.chunk_cache.get(cid)
        if data is not None:
            return data
        data = memo.get(cid)
        if data is not None:
            return data
        if depth > MAX_CHAIN:
            raise FormatError("delta chain too deep (a cycle?)")
        with self.store.read(buffers=True, direct=True) as t:
            record = t.get("chunks", cid)
            if record is None:
                raise MissingObject(f"chunk {cid.hex()} is missing")
            data = memo[cid] = records.decode(record, lambda b: self._base(b, depth + 1, memo), as_array=True)
        return data

    # -- objects --------------------------------------------------------------
    def get_object(self, oid: bytes, txn: Txn | None = None) -> Object:
        obj = self._objects.get(oid)
        if obj is not None:
            return obj
        if txn is not None:
            data = txn.get("objects", oid)
        else:
            with self.store.read() as t:
                data = t.get("objects", oid)
        if data is None:
            raise MissingObject(f"object {oid.hex()} is missing")
        if digest(data) != oid:
            raise IntegrityError(f"object {oid.hex()[:16]} does not match its id")
        obj = deserialize(data)
        self._objects.put(oid, obj)
        return obj

    @staticmethod
    def put_object(txn: Txn, obj: Object) -> bytes:
        data = obj.serialize()
        oid = digest(data)
        txn.put("objects", oid, data, overwrite=False)
        return oid
