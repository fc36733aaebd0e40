"""Ingest: file bytes -> chunks (deduplicated, delta-encoded) -> a Manifest.

Tensor data is cut into pieces of about CHUNK_TARGET bytes (a multiple of the element
width) so a random read decodes one piece, not a whole embedding matrix. Plain bytes are
cut by content-defined chunking so dedup survives shifted bytes.

Delta chains run backwards (reverse deltas, as git packs keep them): the newest version
of a file is stored whole (a keyframe), so what people read most decodes one record per
piece, and a commit never decodes a chain. When a new version N of a piece replaces P (a
keyframe), ingest records a pending demotion (N, P) in the same transaction as N; the
repacker (coralfs.repack) later re-encodes P as a delta against N, or keeps it whole as
an anchor. Its chunk id never changes.

A file with no history of its own deltas forward against the latest piece of that tensor
name/dtype anywhere in the repository (a persistent index), under the two-level policy
below; nothing is demoted for it.

Encoding runs on a small thread pool (zstd and numpy release the GIL); at most a few
chunks are in flight and records are written in bounded batches, so memory stays
bounded for a file of any size (the file itself is memory-mapped).

A full disk (``NoSpace``) in the middle of an ingest leaves the batches written before it:
records nothing references yet. Each ingest keeps a journal of what it added (``Written``:
records that were not there before, index keys, its manifest when new). When the write
section (``Repository.writing()``) in which a write failed for lack of space ends, its
ingests' additions that nothing references are removed: under the exclusive side of the gc
lock (so no writer is between finding a record and referencing it: another process may
have deduplicated against one of ours), in one write transaction that checks every
reference a root can reach them through (refs, stage and index entries, every other object,
and delta bases of every record), see ``_remove_unreferenced``. If another process is
writing, they are left for ``coralfs gc``, and the error says so; if even the removal finds
no space, it says that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyfastcdc

from coralfs.codec import records
from coralfs.errors import ConcurrentUpdate, CoralError, NoSpace
from coralfs.formats import Region, split
from coralfs.hashing import ID_LEN, digest
from coralfs.store.keys import DEMOTIONS, NOSPACE_NOTE, demotion_chunks, demotion_key, tensor_index_key
from coralfs.store.lmdb import Txn
from coralfs.store.locks import gate_for
from coralfs.store.objects import Commit, Manifest, Piece, Segment, Tag, Tree, deserialize
from coralfs.store.objectstore import Headers, ObjectStore
from coralfs.store.refs import Refs

log = logging.getLogger(__name__)

# Tensor piece size. Measured with bench/piece_size.py (bench/RESULTS.md), 1 MiB vs 4 MiB:
# +0.06% bytes, same ingest time, the newest fp32 fine-tune version read in 0.43-0.45 s
# instead of 0.50-0.60 s (more pieces decode in parallel along their chains); bf16 unchanged.
CHUNK_TARGET = 1 << 20
INLINE_MAX = 1024
CDC_MIN, CDC_AVG, CDC_MAX = 256 << 10, 1 << 20, 4 << 20
BATCH_BYTES = 64 << 20
DEFAULT_MAX_DEPTH = 8  # hard bound on forward chain depth
KEYFRAME_EVERY = 16  # forward chains: versions per keyframe cycle
SUBCHAIN = 4  # forward chains: every SUBCHAIN-th version deltas against the cycle's keyframe

Progress = Callable[[int, int], None]


@dataclass
class IngestStats:
    logical: int = 0
    chunks: int = 0
    new_chunks: int = 0
    dedup_chunks: int = 0
    delta_chunks: int = 0
    stored: int = 0
    pending: int = 0  # previous versions queued for re-encoding against this one (coralfs.repack)
    by_codec: dict[str, int] = field(default_factory=dict)

    def add(self, other: IngestStats) -> None:
        for k in ("logical", "chunks", "new_chunks", "dedup_chunks", "delta_chunks", "stored", "pending"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k, v in other.by_codec.items():
            self.by_codec[k] = self.by_codec.get(k, 0) + v


@dataclass
class Written:
    """What one ingest added to the store: records that were not there before, index keys
    (pending demotions, tensor base entries) and its manifest when it was new."""

    chunks: list[bytes] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    objects: list[bytes] = field(default_factory=list)
    failed: bool = False

    def add(self, chunks: list[bytes], keys: list[bytes], objects: list[bytes] | None = None) -> None:
        self.chunks += chunks
        self.keys += keys
        self.objects += objects or []


@dataclass
class Removed:
    chunks: int = 0
    bytes: int = 0
    objects: int = 0
    kept: int = 0  # this ingest's records that something references after all (deduplicated by another writer)


_HEX_ID = re.compile(rb"[0-9a-f]{%d}" % (2 * ID_LEN))


def _clear_frames(exc: BaseException) -> None:
    """Drop the locals of the finished frames in the tracebacks of ``exc`` and the exceptions
    chained to it (the lines stay for a traceback print)."""
    stack: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        stack += [e.__cause__, e.__context__]


class MappedFile:
    """A read-only memory map of a file (empty files give an empty view)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._f = open(path, "rb")  # noqa: SIM115
        size = os.fstat(self._f.fileno()).st_size
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.view = memoryview(self._mm) if self._mm is not None else memoryview(b"")

    def close(self) -> None:
        """Never raises BufferError: when an error unwinds an ingest, its traceback still holds
        slices of the view (the map is then unmapped when the last of them goes), and closing
        the map under them used to replace that error with 'cannot close exported pointers exist'."""
        try:
            self.view.release()
            if self._mm is not None:
                self._mm.close()
        except BufferError:
            pass
        self._mm = None
        self._f.close()

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Ingestor:
    def __init__(self, ostore: ObjectStore, max_depth: int = DEFAULT_MAX_DEPTH, threads: int = 2) -> None:
        self.ostore = ostore
        self.max_depth = max_depth
        self.threads = threads
        self._cdc = pyfastcdc.FastCDC(avg_size=CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX)
        # the repository's gc interlock (the store lives in REPO/.coralfs/store, the lock beside it)
        self._gate = gate_for(os.path.join(os.path.dirname(os.path.abspath(ostore.store.path)), "gc.lock"))
        self._section = threading.local()  # this thread's journals of the current write section

    # -- a full disk: remove what a failed ingest left ----------------------------
    def _journal(self) -> Written:
        """A new ingest's journal, in the current write section's list (registered once per section)."""
        w = Written()
        if self._gate.in_shared():
            journal = getattr(self._section, "journal", None)
            if journal is None:
                journal = self._section.journal = []
                self.ostore.store.nospace_seen(clear=True)
                self._gate.at_exit(lambda exc: self._section_end(exc, None))
            journal.append(w)
        return w

    def _section_end(self, exc: BaseException | None, journal: list[Written] | None) -> None:
        """A write section ended (``exc``: what it ended with). If a write in it failed for lack of
        space, remove what its ingests added that nothing references, and say so in the error."""
        if journal is None:
            journal, self._section.journal = getattr(self._section, "journal", None) or [], None
        store_full = self.ostore.store.nospace_seen(clear=True)
        if not (isinstance(exc, NoSpace) or store_full or any(w.failed for w in journal)):
            return
        if not any(w.chunks or w.objects or w.keys for w in journal):
            return
        note = self._discard(journal)
        if isinstance(exc, NoSpace):
            exc.args = (f"{exc.args[0] if exc.args else exc}; {note}",)
        else:
            log.warning("a write failed for lack of space; %s", note)

    def _discard(self, journal: list[Written]) -> str:
        chunks = {c for w in journal for c in w.chunks}
        n = len(chunks)
        try:
            with self._gate.exclusive(wait=False):
                removed = self.ostore.store.write(
                    lambda t: self._remove_unreferenced(t, chunks, {o for w in journal for o in w.objects},
                                                        [k for w in journal for k in w.keys]))
        except ConcurrentUpdate:
            return (f"the {n} new chunk(s) stored before the failure are left for `coralfs gc` (another process "
                    "is writing to the repository, so they could not be removed safely now)")
        except CoralError as e:  # NoSpace again, or a repository gc would not collect either
            return (f"the {n} new chunk(s) stored before the failure could not be removed ({e}); `coralfs gc` "
                    "removes them once there is space")
        if removed is None:
            return (f"the {n} new chunk(s) stored before the failure are left for `coralfs gc` (the repository holds an "
                    "object that cannot be read, so what references them is unknown: run `coralfs fsck`)")
        # LMDB reuses pages a transaction freed only from the transaction after the next one: this
        # small write (a note, as gc leaves one) lets a rerun of the ingest reuse them at once
        with contextlib.suppress(CoralError):
            note = {"time": time.time(), "chunks_removed": removed.chunks, "bytes_removed": removed.bytes}
            self.ostore.store.write(lambda t: t.put("config", NOSPACE_NOTE, json.dumps(note).encode()))
        kept = f"; {removed.kept} kept: another writer uses them" if removed.kept else ""
        if not removed.chunks and not removed.objects:
            return f"nothing was left behind{kept}"
        what = f"the {removed.chunks} new chunk(s) ({removed.bytes / 2**20:.1f} MiB)"
        if removed.objects:
            what += f" and {removed.objects} manifest(s)"
        return f"{what} stored before the failure were removed{kept}; nothing is left behind"

    @staticmethod
    def _remove_unreferenced(t: Txn, chunks: set[bytes], objects: set[bytes], keys: list[bytes]) -> Removed | None:
        """In one write transaction, under the exclusive gc lock: delete the records in ``chunks``
        and objects in ``objects`` that nothing references, and the index ``keys`` that point at
        what was deleted. Returns None (nothing deleted) if an object cannot be read.

        A root reaches a record through refs (commit or tag ids), stage and index entries (JSON
        naming manifests: staged files, the mount's pending files), objects (tag -> commit ->
        tree -> manifest -> records) and delta bases (a record that names another as its base).
        Everything that mentions an id is taken as a reference, reachable or not: ids in ref
        values, hex ids anywhere in stage and index values, every id any other object names, and
        every base any record names. What is left is referenced by nothing, and no writer can be
        about to reference it: writers hold the shared side of the lock from their first record
        until what they wrote is referenced. So deleting it cannot touch anyone's data."""
        mentioned: set[bytes] = set()
        for v in Refs(t).all().values():
            if len(v) == ID_LEN:
                mentioned.add(v)
        for db in ("stage", "index"):
            for _, v in t.items(db):
                mentioned.update(bytes.fromhex(h.decode()) for h in _HEX_ID.findall(v))
        for oid, data in t.items("objects"):
            if oid in objects:
                continue
            try:
                obj = deserialize(data)
            except Exception:  # noqa: BLE001 - an object nobody can read: what it references is unknown
                return None
            if isinstance(obj, Manifest):
                mentioned.update(obj.chunk_ids())
            elif isinstance(obj, Tree):
                mentioned.update(e.manifest for e in obj.entries.values())
            elif isinstance(obj, Commit):
                mentioned.add(obj.tree)
                mentioned.update(obj.parents)
            elif isinstance(obj, Tag):
                mentioned.add(obj.commit)
        dead_objects = {o for o in objects if o not in mentioned and t.has("objects", o)}
        for o in objects - dead_objects:  # one of ours that is referenced: its records are too
            data = t.get("objects", o)
            if data is not None:
                try:
                    mentioned.update(deserialize(bytes(data)).chunk_ids())  # type: ignore[union-attr]
                except Exception:  # noqa: BLE001
                    return None
        dead = {c for c in chunks if c not in mentioned}
        users: dict[bytes, list[bytes]] = {}  # candidate -> records naming it as a delta base
        sizes: dict[bytes, int] = {}  # candidates present now (gc of another process may have got some)
        try:
            for cid, size, h in Headers(t).scan():
                if cid in chunks:
                    sizes[cid] = size
                assert h is not None  # (a scan without ``errors`` raises instead)
                for b in h.bases:
                    if b in chunks:
                        users.setdefault(b, []).append(cid)
        except CoralError:
            return None
        changed = True
        while changed:  # a base of anything that stays, stays
            changed = False
            for c in list(dead):
                if any(u not in dead for u in users.get(c, ())):
                    dead.discard(c)
                    changed = True
        dead &= set(sizes)
        out = Removed(kept=len(sizes) - len(dead))
        for k in keys:
            if k.startswith(DEMOTIONS):
                if demotion_chunks(k)[0] in dead:
                    t.delete("index", k)
            elif t.get("index", k) in dead:
                t.delete("index", k)
        for o in dead_objects:
            t.delete("objects", o)
            out.objects += 1
        for c in dead:
            t.delete("chunks", c)
            out.chunks += 1
            out.bytes += sizes[c]
        return out

    # -- cutting ---------------------------------------------------------------
    def _bytes_pieces(self, view: memoryview, r: Region) -> Iterator[tuple[int, int]]:
        n = r.end - r.start
        if n <= CDC_MIN:
            yield r.start, r.end
            return
        for c in self._cdc.cut_buf(view[r.start : r.end]):
            yield r.start + c.offset, r.start + c.offset + c.length

    @staticmethod
    def _tensor_pieces(r: Region) -> Iterator[tuple[int, int]]:
        step = max(r.width, CHUNK_TARGET - CHUNK_TARGET % r.width)
        for s in range(r.start, r.end, step):
            yield s, min(s + step, r.end)

    # -- base selection --------------------------------------------------------
    def _base_for(self, t: Txn, r: Region, i: int,
                  prev: dict[str, Segment]) -> tuple[bytes, bool, records.RecordHeader] | None:
        """``(chunk id, is the previous version of this piece, its record header)`` of the base
        for piece ``i``."""
        headers = Headers(t)
        seg = prev.get(r.name)
        if seg is not None and seg.dtype == r.dtype and i < len(seg.pieces):
            cid = seg.pieces[i].chunk
            h = headers.get(cid) if cid is not None else None
            if cid is not None and h is not None:
                return cid, True, h
        cid = t.get("index", tensor_index_key(r.dtype, r.name, i))
        h = headers.get(cid) if cid is not None else None
        if cid is None or h is None:
            return None
        return cid, False, h

    def _tensor_job(self, raw: memoryview, width: int, cid: bytes,
                    base: tuple[bytes, bool, records.RecordHeader] | None) -> tuple[bytes, bytes | None]:
        """A new tensor piece's record, and the previous version to demote against it, if any:
        the previous version of the file's piece when it is a keyframe. (When it is already a
        delta, from an older forward chain or because another branch's new version demoted it,
        nothing is queued.) A file with no history deltas forward against the index's piece."""
        if base is not None and not base[1]:
            return self._encode_forward(raw, width, base[0], base[2]), None
        h = base[2] if base is not None else None
        rec = records.encode_tensor(raw, width, gen=h.gen + 1 if h is not None else 0)
        if h is None or h.bases:
            return rec, None
        # the repacker encodes the previous version against this one soon (and, in a series
        # committed by one process, this one against the next): keep its bytes in the
        # decoded-chunk cache (their id is their hash) so it need not decode them. Not for a
        # file's first version: copying a 155 MB file into the cache cost 0-280 ms of
        # page faults in a short-lived CLI process.
        self.ostore.chunk_cache.put(cid, bytes(raw))
        return rec, base[0]

    def _encode_forward(self, raw: memoryview, width: int, base_cid: bytes, h: records.RecordHeader) -> bytes:
        """Encode a tensor piece of a file with no history of its own, forward against a
        same-named piece elsewhere, under the two-level chain policy.

        With B = the previous version of this piece (generation g within its keyframe cycle):
        generation g+1 == KEYFRAME_EVERY: a keyframe (no base); a multiple of SUBCHAIN: a delta
        against the cycle's keyframe (depth 1); otherwise a delta against B, predicting also
        from B's own base when B continues a sub-chain. Depth stays <= SUBCHAIN, so any
        version decodes in at most SUBCHAIN + 1 steps. Measured when the tensor codec was
        written (fp32 / bf16 fine-tunes saved every 5 steps): .554 / .184 of raw at <= 5
        decodes, against .548 / .196 for a plain chain with a keyframe every 8 (<= 9 decodes)."""
        gen = h.gen + 1 if h.bases else 1
        if gen >= KEYFRAME_EVERY or h.depth >= self.max_depth:
            return records.encode_tensor(raw, width)
        if gen % SUBCHAIN == 0:
            key = base_cid
            if h.bases:  # the cycle's keyframe ends the chain (at most SUBCHAIN header reads)
                *_, (key, _, _) = Headers(store=self.ostore.store).chain(h.bases[0], must_exist=True)
            return records.encode_tensor(raw, width, (key, self.ostore.get_chunk(key)), None, 0, gen)
        base = (base_cid, self.ostore.get_chunk(base_cid))
        base2 = None
        if h.bases and h.gen % SUBCHAIN != 0:
            b2 = h.bases[0]
            base2 = (b2, self.ostore.get_chunk(b2))
            depth = max(h.depth, self.ostore.chunk_header(b2).depth)
        else:
            depth = h.depth
        return records.encode_tensor(raw, width, base, base2, depth, gen)

    @staticmethod
    def _write(t: Txn, items: list[tuple[bytes, bytes]], pending: list[tuple[bytes, bytes]]
               ) -> tuple[list[bytes], list[bytes]]:
        """New records and the demotions they queue, in one write transaction; returns the ids of
        the records it added (not there before) and the index keys it wrote."""
        chunks, keys = [], []
        for cid, rec in items:
            if t.put("chunks", cid, rec, overwrite=False):
                chunks.append(cid)
        for new, prev in pending:
            key = demotion_key(new, prev)
            t.put("index", key, b"")
            keys.append(key)
        return chunks, keys

    # -- ingest ----------------------------------------------------------------
    def ingest(self, view: memoryview, name: str = "", prev: Manifest | None = None,
               progress: Progress | None = None) -> tuple[bytes, Manifest, IngestStats]:
        """Store ``view``'s chunks and its manifest; returns (manifest id, manifest, stats).

        A full disk is ``NoSpace``; what the ingest had written by then is removed when its write
        section ends (see ``Written``)."""
        written = self._journal()
        try:
            return self._ingest(view, name, prev, progress, written)
        except BaseException as e:
            # the finished frames of the traceback hold slices of ``view``: the caller could not
            # close a memory map under them ("BufferError: cannot close exported pointers exist"
            # replaced the real error)
            _clear_frames(e)
            if isinstance(e, NoSpace):
                written.failed = True
                if not self._gate.in_shared():  # no write section to wait for: clean up now
                    self._section_end(e, [written])
            raise

    def _ingest(self, view: memoryview, name: str, prev: Manifest | None, progress: Progress | None,
                written: Written) -> tuple[bytes, Manifest, IngestStats]:
        return _Ingest(self, view, name, prev, progress, written).run()


def _bytes_job(raw: memoryview) -> tuple[bytes, bytes | None]:
    return records.encode_bytes(raw), None


class _Ingest:
    """One file's ingest, in named steps: ``run`` splits the file and builds each region's
    ``segment``; a new ``piece`` is ``submit``-ted for encoding on the pool (at most a few in
    flight: ``drain``), its record joins a batch written when it reaches ``BATCH_BYTES``
    (``flush``); ``finish`` writes the last batch, the tensor base index and the manifest in
    one transaction. ``written`` is the ingest's journal (see ``Written``)."""

    def __init__(self, ing: Ingestor, view: memoryview, name: str, prev: Manifest | None,
                 progress: Progress | None, written: Written) -> None:
        self.ing = ing
        self.view = view
        self.name = name
        self.size = len(view)
        self.prev_tensors = prev.tensors() if prev is not None else {}
        self.progress = progress
        self.written = written
        self.stats = IngestStats(logical=self.size)
        self.seen: set[bytes] = set()  # chunks of this file met so far
        self.batch: list[tuple[bytes, bytes]] = []  # (chunk id, record) not written yet
        self.demotions: list[tuple[bytes, bytes]] = []  # (new, previous) queued with the batch
        self.batch_bytes = 0
        self.pending: deque[tuple[bytes, Future[tuple[bytes, bytes | None]]]] = deque()
        self.index_updates: dict[bytes, bytes] = {}  # tensor base index: latest chunk of each piece
        self.pool: ThreadPoolExecutor | None = None

    def run(self) -> tuple[bytes, Manifest, IngestStats]:
        fmt, regions = split(self.view, self.name)
        with ThreadPoolExecutor(self.ing.threads) as self.pool:
            segments = [self.segment(r) for r in regions]
            self.drain(0)
        if self.progress is not None:
            self.progress(self.size, self.size)
        manifest = Manifest(self.size, digest(self.view), fmt, tuple(segments))
        if sum(s.length for s in segments) != self.size:
            raise CoralError("internal error: segments do not cover the file")
        return self.finish(manifest)

    def segment(self, r: Region) -> Segment:
        """A region's segment: one inline piece (small bytes), or its cuts as chunks."""
        view = self.view
        pieces: list[Piece] = []
        if r.kind == "bytes" and r.end - r.start <= INLINE_MAX:
            pieces.append(Piece(r.end - r.start, None, bytes(view[r.start : r.end])))
        else:
            cuts = self.ing._tensor_pieces(r) if r.kind == "tensor" else self.ing._bytes_pieces(view, r)
            for i, (s, e) in enumerate(cuts):
                pieces.append(self.piece(r, i, s, e))
        return Segment(r.kind, tuple(pieces), r.name, r.dtype, r.width, r.shape)

    def piece(self, r: Region, i: int, s: int, e: int) -> Piece:
        """Piece ``i`` of region ``r``, bytes ``[s, e)`` of the file: deduplicated, or submitted."""
        raw = self.view[s:e]
        cid = digest(raw)
        if self.progress is not None:
            self.progress(s, self.size)
        self.stats.chunks += 1
        if r.kind == "tensor":
            self.index_updates[tensor_index_key(r.dtype, r.name, i)] = cid
        if cid in self.seen:
            self.stats.dedup_chunks += 1
        else:
            self.seen.add(cid)
            self.submit(r, i, raw, cid)
        return Piece(e - s, cid)

    def submit(self, r: Region, i: int, raw: memoryview, cid: bytes) -> None:
        """Encode a piece on the pool unless the store has it (its base is chosen now)."""
        with self.ing.ostore.store.read() as t:
            if t.has("chunks", cid):
                self.stats.dedup_chunks += 1
                return
            base = self.ing._base_for(t, r, i, self.prev_tensors) if r.kind == "tensor" else None
        self.stats.new_chunks += 1
        assert self.pool is not None
        if r.kind == "tensor":
            fut = self.pool.submit(self.ing._tensor_job, raw, r.width, cid, base)
        else:
            fut = self.pool.submit(_bytes_job, raw)
        self.pending.append((cid, fut))
        self.drain(self.ing.threads * 2)

    def drain(self, limit: int) -> None:
        """Take finished records (oldest first) until at most ``limit`` are in flight."""
        stats = self.stats
        while len(self.pending) > limit:
            cid, fut = self.pending.popleft()
            rec, prev = fut.result()
            h = records.parse_header(rec)
            stats.by_codec[h.codec_name] = stats.by_codec.get(h.codec_name, 0) + len(rec)
            stats.delta_chunks += 1 if h.bases else 0
            stats.stored += len(rec)
            self.batch.append((cid, rec))
            self.batch_bytes += len(rec)
            if prev is not None:
                self.demotions.append((cid, prev))
                stats.pending += 1
            if self.batch_bytes >= BATCH_BYTES:
                self.flush()

    def flush(self) -> None:
        """Write the batch (and the demotions it queues) in one transaction."""
        if self.batch:
            batch, demotions = self.batch, self.demotions
            self.written.add(*self.ing.ostore.store.write(lambda t: Ingestor._write(t, batch, demotions)))
            self.batch, self.demotions, self.batch_bytes = [], [], 0

    def finish(self, manifest: Manifest) -> tuple[bytes, Manifest, IngestStats]:
        """The last chunks, the tensor base index and the manifest: one transaction (one fsync)."""
        tail, tail_demotions, index_updates = self.batch, self.demotions, self.index_updates

        def fn(t: Txn) -> tuple[bytes, bool, list[bytes], list[bytes]]:
            chunks, keys = Ingestor._write(t, tail, tail_demotions)
            for k, v in index_updates.items():
                t.put("index", k, v)
            data = manifest.serialize()
            mid = digest(data)
            new = t.put("objects", mid, data, overwrite=False)  # ObjectStore.put_object, telling if it is new
            return mid, new, chunks, keys + list(index_updates)

        mid, new_manifest, chunks, keys = self.ing.ostore.store.write(fn)
        self.written.add(chunks, keys, [mid] if new_manifest else [])
        return mid, manifest, self.stats
