"""Garbage collection: mark what is reachable, re-encode orphaned deltas, sweep the rest.

Keys are walked by family, from the table in :mod:`coralfs.store.keys` (nothing here lists
a family): a key that belongs to no family stops gc before anything is marked, since what it
keeps alive is unknown (``UnknownKeys``; ``coralfs fsck`` lists such keys).

Roots (what is never swept)
    every entry of a ``root`` family: refs (branches, tags -> tag object -> commit, a
    detached HEAD), stage entries, and the mount's pending data (pending files and, refused
    by a concurrent commit but kept for recovery, conflicts), whose JSON value names a
    manifest as hex ``"m"``. From a root: commit -> tree + parents, tree -> manifests,
    manifest -> chunks, tag -> commit.

Phases (``Collector``, one method each; each write is a bounded transaction; SIGKILL at any
point leaves a consistent repository and a rerun finishes the job)

1. **mark** (``mark``) in one read snapshot (no writes), and list the candidates from that
   same snapshot. A reachable object that is missing or corrupt aborts gc: what it
   references is unknown, so nothing may be swept.
2. **sweep** (``sweep``) what nothing needs, in batches: entries of ``derived`` families
   that name a dead thing (or cannot be read) first (the commit index, the tensor base index,
   pending demotions, reverse-chain counters, the stat cache: a cache entry must never outlive
   the manifest it names), then dead objects, then dead chunks that are not a base of any live chunk. Each batch transaction first checks whether
   the roots changed since the mark (a ref moved, a stage entry appeared); if so it marks
   from the new roots inside the transaction (keeping the bases of newly marked chunks)
   before it deletes anything. Only keys listed in the mark snapshot are candidates, so
   nothing created after the mark is ever swept.
3. **re-encode** (``reencode``): a live chunk's record may name a base chunk that is dead
   (the checkpoint it was a delta against was pruned). Such chunks are re-encoded, in order
   of delta depth, against their nearest *live* ancestor in the base chain (or as a keyframe
   when that would exceed the repository's max depth or no ancestor survives). The chunk id
   does not change: it is the hash of the decoded bytes. Every new record is decoded and
   checked against the id before it is written. A chunk that cannot be decoded (corruption)
   is left alone and its bases are kept instead. These writes reuse the pages freed in
   phase 2.
4. a short **grace** pause (``grace``) when anything was re-encoded, so that a concurrent
   reader that fetched an old record just before its re-encode can still fetch the old base.
5. **sweep** the old bases (``sweep_bases``).

Concurrency: gc holds ``Repository.exclusive()`` for the whole run, so no ingest is in
flight (an ingest writes chunks before anything references them). Readers (a mount, a
``cat``) keep working: LMDB readers see consistent snapshots and every deletion happens
in a write transaction. A reader that holds a file view of a commit that gc found
unreachable (a pruned checkpoint) loses it: that is what gc is for.

``compact()`` (``coralfs gc --compact``) additionally rewrites ``data.mdb`` without free
pages, see its docstring for the rules that keep it safe.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from coralfs.codec import records
from coralfs.errors import ConcurrentUpdate, CoralError, GcAborted, IntegrityError, UnknownKeys
from coralfs.hashing import digest, hasher
from coralfs.store import keys
from coralfs.store.lmdb import Txn
from coralfs.store.objects import Commit, Manifest, Tag, Tree
from coralfs.store.objectstore import Headers, ObjectStore

if TYPE_CHECKING:
    from coralfs.repository import Repository

UNKNOWN_SHOWN = 5  # unknown keys named in UnknownKeys' message

#: Test hook: ``CORALFS_GC_KILL_AT=PHASE[:N]`` sends SIGKILL to this process right after the
#: N-th (default 1st) event of PHASE: mark, sweep-index, sweep-objects, sweep-chunks, reencode,
#: grace, sweep-bases, done, compact-copied, compact-swapped.
KILL_ENV = "CORALFS_GC_KILL_AT"

BATCH_KEYS = 2000  # deletions per sweep transaction
BATCH_BYTES = 64 << 20  # bytes of re-encoded records per transaction
GRACE_SECONDS = 0.25


@dataclass
class GcStats:
    dry_run: bool = False
    commits: int = 0
    objects_live: int = 0
    chunks_live: int = 0
    objects_total: int = 0
    chunks_total: int = 0
    objects_swept: int = 0
    object_bytes_swept: int = 0
    chunks_swept: int = 0
    chunk_bytes_swept: int = 0
    index_swept: int = 0
    reencoded: int = 0
    reencode_bytes_before: int = 0
    reencode_bytes_after: int = 0
    keyframes: int = 0  # re-encoded chunks that became keyframes
    kept_bases: int = 0  # bases kept because a reachable chunk could not be re-encoded
    remarks: int = 0  # sweep batches that found the roots changed and marked again
    problems: list[str] = field(default_factory=list)
    file_bytes_before: int = 0
    file_bytes_after: int = 0
    free_pages_before: int = 0
    free_pages_after: int = 0
    compacted: bool = False
    seconds: float = 0.0

    @property
    def bytes_freed(self) -> int:
        """Bytes of records and objects removed (LMDB reuses these pages for later writes)."""
        return self.chunk_bytes_swept + self.object_bytes_swept + max(
            0, self.reencode_bytes_before - self.reencode_bytes_after)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bytes_freed"] = self.bytes_freed
        return d


# ------------------------------------------------------------------ test hook
_hook_counts: dict[str, int] = {}


def _hook(phase: str) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != phase:
        return
    _hook_counts[phase] = _hook_counts.get(phase, 0) + 1
    if _hook_counts[phase] >= int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------ mark
class Marker:
    """The live set: object ids and chunk ids reachable from the roots."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.objects: set[bytes] = set()
        self.chunks: set[bytes] = set()
        self.commits = 0
        self.fingerprint = b""
        # a private object store: a cached object of the caller never hides a problem
        self.ostore = ObjectStore(repo.store, cache_bytes=0)

    @staticmethod
    def roots(t: Txn) -> tuple[list[bytes], bytes]:
        """Root object ids (what the entries of every ``root`` family name) and a fingerprint
        of those entries."""
        ids: list[bytes] = []
        h = hasher()
        for fam in keys.families(role=keys.Role.ROOT):
            for k, v in fam.items(t):
                h.update(len(k).to_bytes(4, "little") + k + len(v).to_bytes(4, "little") + v)
                try:
                    named = fam.named(k, v)
                except keys.Unreadable as e:
                    raise GcAborted(f"gc stopped: unreadable {fam.db} entry {k!r}: {e}") from e
                ids.extend(oid for _, oid in named)
        return ids, h.digest()

    def mark_roots(self, t: Txn) -> set[bytes]:
        """Mark from the current roots (incrementally); returns the newly marked chunks."""
        ids, self.fingerprint = self.roots(t)
        return self.mark(t, ids)

    def mark(self, t: Txn, ids: Iterable[bytes]) -> set[bytes]:
        new_chunks: set[bytes] = set()
        stack = list(ids)
        while stack:
            oid = stack.pop()
            if oid in self.objects:
                continue
            try:
                obj = self.ostore.get_object(oid, t)
            except CoralError as e:
                raise GcAborted(f"gc stopped: reachable object {oid.hex()[:16]}: {e} (run `coralfs fsck`)"
                                ) from e
            self.objects.add(oid)
            if isinstance(obj, Commit):
                self.commits += 1
                stack.append(obj.tree)
                stack.extend(obj.parents)
            elif isinstance(obj, Tree):
                stack.extend(e.manifest for e in obj.entries.values())
            elif isinstance(obj, Manifest):
                for cid in obj.chunk_ids():
                    if cid not in self.chunks:
                        self.chunks.add(cid)
                        new_chunks.add(cid)
            elif isinstance(obj, Tag):
                stack.append(obj.commit)
        return new_chunks

    def keep_bases(self, t: Txn, cids: Iterable[bytes]) -> int:
        """Mark the base chains of ``cids`` (transitively); returns how many were added."""
        added = 0
        for _, h, _ in Headers(t).walk(cids, skip_bad=True):
            for b in h.bases:
                if b not in self.chunks:
                    self.chunks.add(b)
                    added += 1
        return added


# ------------------------------------------------------------------ LMDB info
def lmdb_info(repo: Repository) -> dict[str, Any]:
    """File size, page use and free pages of the repository's LMDB environment.

    ``free_pages`` = pages below the high-water mark that no database uses (the freelist
    and pages retired but still pinned by a reader count as free). LMDB reuses them for
    later writes before it grows the file."""
    env = repo.store.env
    env.reader_check()
    info = env.info()
    st = env.stat()
    psize = st["psize"]
    used = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
    dbs: dict[str, dict[str, int]] = {}
    with env.begin() as txn:
        for name, db in repo.store.dbs.items():
            s = txn.stat(db)
            pages = s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
            used += pages
            dbs[name] = {"entries": s["entries"], "pages": pages, "bytes": pages * psize}
    total = info["last_pgno"] + 1
    path = os.path.join(repo.store.path, "data.mdb")
    st_file = os.stat(path)
    readers = [line.split() for line in env.readers().splitlines()[1:] if line.strip()]
    return {
        "file_bytes": st_file.st_size, "disk_bytes": st_file.st_blocks * 512, "page_size": psize,
        "pages_high_water": total, "pages_used": used + 2, "free_pages": max(0, total - used - 2),
        "free_bytes": max(0, total - used - 2) * psize, "map_size": info["map_size"],
        "last_txnid": info["last_txnid"], "reader_slots": len(readers),
        "reader_pids": sorted({int(r[0]) for r in readers if r and r[0].isdigit()}),
        "databases": dbs,
    }


# ------------------------------------------------------------------ gc
def gc(repo: Repository, dry_run: bool = False, compact: bool = False, grace: float | None = None,
       batch_keys: int = BATCH_KEYS, batch_bytes: int = BATCH_BYTES, wait: bool = True,
       log: Callable[[str], None] | None = None) -> GcStats:
    """Collect garbage; see the module docstring. Holds ``repo.exclusive()`` throughout.

    ``grace``: seconds to pause between re-encoding and sweeping the old bases (default
    ``GRACE_SECONDS``); ``wait=False`` fails at once when an ingest is running."""
    t0 = time.monotonic()
    grace = GRACE_SECONDS if grace is None else grace
    with repo.exclusive(wait=wait):
        stats = Collector(repo, dry_run, grace, batch_keys, batch_bytes, log).run()
        if compact and not dry_run:
            try:
                _compact_locked(repo)
            except ConcurrentUpdate as e:
                raise ConcurrentUpdate(f"gc done ({stats.chunks_swept} chunks, {stats.objects_swept} objects, "
                                       f"{stats.bytes_freed} bytes freed), but {e}") from e
            stats.compacted = True
            info = lmdb_info(repo)
            stats.file_bytes_after, stats.free_pages_after = info["file_bytes"], info["free_pages"]
    stats.seconds = time.monotonic() - t0
    return stats


class Collector:
    """One gc run under ``repo.exclusive()``: one method per phase of the module docstring,
    called in order by ``run``. Every write is a bounded transaction of its own."""

    def __init__(self, repo: Repository, dry_run: bool, grace: float, batch_keys: int, batch_bytes: int,
                 log: Callable[[str], None] | None) -> None:
        self.repo = repo
        self.grace_seconds = grace
        self.batch_keys = batch_keys
        self.batch_bytes = batch_bytes
        self.say = log or (lambda _m: None)
        self.stats = GcStats(dry_run=dry_run)
        self.marker = Marker(repo)
        # the candidates, listed from the mark's snapshot (nothing created after it is swept)
        self.dead_chunks: list[tuple[bytes, int]] = []
        self.dead_objects: list[tuple[bytes, int]] = []
        self.dead_index: list[tuple[str, bytes]] = []  # (database, key)
        self.orphans: list[bytes] = []  # live chunks naming a dead base, by delta depth
        self.needed: set[bytes] = set()  # dead chunks in the base chains of the orphans

    def run(self) -> GcStats:
        stats = self.stats
        info = lmdb_info(self.repo)
        stats.file_bytes_before, stats.free_pages_before = info["file_bytes"], info["free_pages"]
        self.mark()
        if stats.dry_run:
            self.count()
        else:
            self.sweep()
            if self.orphans:
                self.reencode()
                self.grace()
            self.sweep_bases()
        stats.objects_live = len(self.marker.objects)
        stats.chunks_live = len(self.marker.chunks)
        info = lmdb_info(self.repo)
        stats.file_bytes_after, stats.free_pages_after = info["file_bytes"], info["free_pages"]
        _hook("done")
        return stats

    # 1. ---------------------------------------------------------------- mark
    def mark(self) -> None:
        """Mark, and list the candidates, from one snapshot."""
        stats, marker = self.stats, self.marker
        orphans: list[tuple[int, bytes]] = []
        bad: dict[bytes, CoralError] = {}
        with self.repo.store.read() as t:
            unknown = keys.unknown_keys(t, UNKNOWN_SHOWN)
            if unknown:
                raise UnknownKeys("gc stopped: keys that belong to no key family known to this coralfs ("
                                  + ", ".join(f"{db} {k[:60]!r}" for db, k in unknown)
                                  + "): what they keep alive is unknown, so nothing is swept (run `coralfs fsck`)")
            marker.mark_roots(t)
            for oid, size, _ in t.scan("objects", 0):
                stats.objects_total += 1
                if oid not in marker.objects:
                    self.dead_objects.append((oid, size))
            for cid, size, h in Headers(t).scan(bad):  # record headers only
                stats.chunks_total += 1
                if cid not in marker.chunks:
                    self.dead_chunks.append((cid, size))
                    continue
                if h is None:
                    stats.problems.append(f"reachable chunk {cid.hex()[:16]} has a bad header: {bad[cid]}")
                    continue
                if any(b not in marker.chunks for b in h.bases):
                    orphans.append((h.depth, cid))
            for fam in keys.families(role=keys.Role.DERIVED):  # (only a derived entry can be dead)
                for key, v in fam.items(t):
                    if not _entry_live(fam.db, key, v, marker):
                        self.dead_index.append((fam.db, key))
        stats.commits = marker.commits
        self.say(f"marked {marker.commits} commits, {len(marker.objects)} objects, {len(marker.chunks)} chunks")
        _hook("mark")
        self.orphans = [cid for _, cid in sorted(orphans)]

    def count(self) -> None:
        """A dry run: what the phases below would do."""
        stats = self.stats
        stats.reencoded = len(self.orphans)
        stats.index_swept = len(self.dead_index)
        stats.objects_swept = len(self.dead_objects)
        stats.object_bytes_swept = sum(n for _, n in self.dead_objects)
        stats.chunks_swept = len(self.dead_chunks)
        stats.chunk_bytes_swept = sum(n for _, n in self.dead_chunks)

    # 2. ---------------------------------------------------------------- sweep
    def sweep(self) -> None:
        """Sweep what nothing needs: dead index entries (first: a cache entry must never outlive
        what it names), objects, and dead chunks that are no base of a live one."""
        self.needed = self._dead_bases(self.orphans)
        for db in sorted({db for db, _ in self.dead_index}):
            self._sweep(db, [(k, 0) for d, k in self.dead_index if d == db], "sweep-index")
        self._sweep("objects", self.dead_objects, "sweep-objects")
        self._sweep("chunks", [c for c in self.dead_chunks if c[0] not in self.needed], "sweep-chunks")
        # LMDB reuses the pages a transaction freed only from the transaction after the next
        # one: this small write (the gc record in config) makes the pages just freed usable
        self._note({"state": "reencode", "time": time.time()})

    def _dead_bases(self, live: list[bytes]) -> set[bytes]:
        """Dead chunks in the (transitive) base chains of ``live`` chunks."""
        marker = self.marker

        def dead(h: records.RecordHeader) -> list[bytes]:  # a live base is itself live or re-encoded: stop there
            return [b for b in h.bases if b not in marker.chunks]

        return {b for _, h, _ in Headers(store=self.repo.store).walk(live, dead, skip_bad=True) for b in dead(h)}

    def _sweep(self, db: str, todo: list[tuple[bytes, int]], phase: str) -> None:
        marker, stats = self.marker, self.stats
        for i in range(0, len(todo), self.batch_keys):
            part = todo[i : i + self.batch_keys]

            def fn(t: Txn, part: list[tuple[bytes, int]] = part) -> tuple[int, int, int]:
                remarked = 0
                ids, fp = Marker.roots(t)
                if fp != marker.fingerprint:  # a ref moved or a stage entry appeared since the mark
                    new = marker.mark(t, ids)
                    marker.fingerprint = fp
                    marker.keep_bases(t, new)
                    remarked = 1
                n = nbytes = 0
                for key, size in part:
                    if db not in keys.DATA_DATABASES:
                        v = t.get(db, key)
                        if v is None or _entry_live(db, key, v, marker):
                            continue
                    elif key in (marker.objects if db == "objects" else marker.chunks):
                        continue
                    if t.delete(db, key):
                        n += 1
                        nbytes += size
                return n, nbytes, remarked

            n, nbytes, remarked = self.repo.store.write(fn)
            stats.remarks += remarked
            if db not in keys.DATA_DATABASES:
                stats.index_swept += n
            elif db == "objects":
                stats.objects_swept += n
                stats.object_bytes_swept += nbytes
            else:
                stats.chunks_swept += n
                stats.chunk_bytes_swept += nbytes
            _hook(phase)

    def _note(self, state: dict[str, Any]) -> None:
        """Record gc progress in ``config`` under ``b"gc"`` (informational)."""
        self.repo.store.write(lambda t: t.put("config", keys.GC_NOTE, json.dumps(state).encode()))

    # 3. ---------------------------------------------------------------- re-encode
    def reencode(self) -> None:
        """Re-encode the orphans (in order of depth) so that no reachable chunk names a dead
        base (reuses the pages just freed)."""
        stats = self.stats
        enc = _Reencoder(self.repo, self.marker)
        batch: list[tuple[bytes, bytes]] = []
        size = 0
        failed: list[bytes] = []
        for cid in self.orphans:
            try:
                old, rec, h = enc.encode(cid)
            except CoralError as e:
                stats.problems.append(f"chunk {cid.hex()[:16]} could not be re-encoded ({e}); its bases are kept")
                failed.append(cid)
                continue
            stats.reencoded += 1
            stats.keyframes += 0 if h.bases else 1
            stats.reencode_bytes_before += len(old)
            stats.reencode_bytes_after += len(rec)
            batch.append((cid, rec))
            size += len(rec)
            if size >= self.batch_bytes:
                self._write_records(batch)
                batch, size = [], 0
        self._write_records(batch)
        if failed:
            with self.repo.store.read() as t:
                stats.kept_bases += self.marker.keep_bases(t, failed)
        self.say(f"re-encoded {stats.reencoded} chunks ({stats.keyframes} as keyframes)")

    def _write_records(self, items: list[tuple[bytes, bytes]]) -> None:
        if not items:
            return

        def fn(t: Txn) -> None:
            for cid, rec in items:
                t.put("chunks", cid, rec)

        self.repo.store.write(fn)
        _hook("reencode")

    # 4. ---------------------------------------------------------------- grace
    def grace(self) -> None:
        """A reader that fetched an old record just before its re-encode still finds its base."""
        if self.stats.reencoded and self.grace_seconds > 0:
            time.sleep(self.grace_seconds)
        _hook("grace")

    # 5. ---------------------------------------------------------------- sweep the old bases
    def sweep_bases(self) -> None:
        self._sweep("chunks", [c for c in self.dead_chunks if c[0] in self.needed], "sweep-bases")
        stats = self.stats
        self._note({"state": "done", "time": time.time(), "chunks_swept": stats.chunks_swept,
                    "objects_swept": stats.objects_swept, "bytes_freed": stats.bytes_freed})


class _Reencoder:
    """Re-encodes one live chunk at a time against its nearest live ancestor (or as a keyframe),
    verified against its id; remembers the headers it made (``headers.known``)."""

    def __init__(self, repo: Repository, marker: Marker) -> None:
        self.marker = marker
        self.max_depth = int(getattr(repo.ingestor, "max_depth", 8))
        self.vstore = ObjectStore(repo.store, cache_bytes=128 << 20)
        self.headers = Headers(store=repo.store)  # and the records re-encoded so far (``known``)

    def live_ancestor(self, start: bytes) -> tuple[bytes, records.RecordHeader] | None:
        """The nearest live chunk down ``start``'s chain of first bases (``start`` included)."""
        for cid, h, _ in self.headers.chain(start, limit=64):
            if cid in self.marker.chunks:
                return cid, h
        return None

    def encode(self, cid: bytes) -> tuple[bytes, bytes, records.RecordHeader]:
        """``(old record, new record, its header)`` of ``cid``; the new one names only live bases
        and decodes to the chunk (``IntegrityError`` otherwise)."""
        vstore, marker = self.vstore, self.marker
        old = vstore.chunk_record(cid)
        h = records.parse_header(old)
        raw = vstore.get_chunk(cid)  # verified against the id, through the old chain
        base: tuple[bytes, bytes] | None = None
        base2: tuple[bytes, bytes] | None = None
        base_depth = 0
        found = self.live_ancestor(h.bases[0]) if h.bases else None
        if found is not None:
            anc, ha = found
            if ha.depth + 1 <= self.max_depth:
                base = (anc, vstore.get_chunk(anc))
                base_depth = ha.depth
                if ha.bases and ha.depth >= 1 and ha.bases[0] in marker.chunks:
                    base2 = (ha.bases[0], vstore.get_chunk(ha.bases[0]))
        rec = records.encode_tensor(raw, h.width, base, base2, base_depth) if base else \
            records.encode_tensor(raw, h.width)
        nh = records.parse_header(rec)
        known = {b[0]: b[1] for b in (base, base2) if b is not None}
        if any(b not in marker.chunks or b not in known for b in nh.bases):
            raise IntegrityError("re-encoded record names an unexpected base")
        if digest(records.decode(rec, known.__getitem__)) != cid:
            raise IntegrityError("re-encoded record does not decode to the chunk")
        self.headers.known[cid] = (nh, len(rec))
        return old, rec, nh


def _entry_live(db: str, key: bytes, value: bytes, marker: Marker) -> bool:
    """Whether an entry may stay: one of a ``derived`` family only while everything it names
    is live (and it can be read); any other entry always."""
    fam = keys.family_of(db, key)
    if fam is None or fam.role is not keys.Role.DERIVED:
        return True
    try:
        named = fam.named(key, value)
    except keys.Unreadable:
        return False  # an entry nobody can use
    return all(i in (marker.chunks if kind == keys.CHUNK else marker.objects) for kind, i in named)


# ------------------------------------------------------------------ compact
def _other_lock_holders(lock_path: str) -> set[int]:
    """Pids (other than ours) holding POSIX locks on ``lock_path`` per /proc/locks (LMDB holds
    a shared lock on byte 0 of lock.mdb while it has the environment open)."""
    try:
        ino = os.stat(lock_path).st_ino
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    pids = set()
    for line in lines:
        parts = line.split()
        try:
            i = parts.index("->") if "->" in parts else -1
            fields = parts[i + 1:] if i >= 0 else parts[1:]
            pid, dev_ino = int(fields[3]), fields[4]
        except (ValueError, IndexError):
            continue
        if int(dev_ino.rsplit(":", 1)[-1]) == ino and pid != os.getpid():
            pids.add(pid)
    return pids


def compact(repo: Repository, wait: bool = True) -> dict[str, int]:
    """Rewrite ``data.mdb`` without free pages (under ``repo.exclusive()``); see ``_compact_locked``."""
    with repo.exclusive(wait=wait):
        return _compact_locked(repo)


def _compact_locked(repo: Repository) -> dict[str, int]:
    """Rewrite the LMDB file compacted and swap it in.

    Safe only when no other process has the repository open (a mount, a training job, a
    second CLI): their open environment would keep using the old file. So compact

    * refuses (ConcurrentUpdate) when /proc/locks shows another process holding LMDB's
      lock on ``lock.mdb``, or another Repository in this process shares the environment;
    * copies with ``env.copy(compact=True)`` into ``.coralfs/store.compact/``, fsyncs the
      copy and its directory;
    * closes its own environment and takes a POSIX write lock on byte 0 of ``lock.mdb``:
      that fails if any process opened the repository meanwhile (then compact gives up,
      nothing changed), and makes a process that opens it from now on wait;
    * renames the copy over ``data.mdb`` (atomic), fsyncs the directory, and reopens the
      environment while still holding the lock, so LMDB re-initialises ``lock.mdb`` from the
      new file before anyone else can read it. The lock file descriptor stays open for the
      life of this process (closing it would drop LMDB's own lock on that file).

    A crash before the rename leaves the old file (and a stale copy that the next compact
    removes); after it, the new one. Returns sizes before and after."""
    from coralfs.store import lmdb as store_mod

    st = repo.store
    path = st.path
    data = os.path.join(path, "data.mdb")
    lock_path = os.path.join(path, "lock.mdb")
    shared = store_mod._OPEN.get(getattr(st, "_key", None))
    if shared is not None and shared[2] > 1:
        raise ConcurrentUpdate("compact: another Repository in this process has the repository open")
    others = _other_lock_holders(lock_path)
    if others:
        raise ConcurrentUpdate("compact: other processes have the repository open (pids "
                               + ", ".join(map(str, sorted(others))) + "); stop them first")
    before = os.path.getsize(data)
    tmp = path + ".compact"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        st.env.copy(tmp, compact=True)
        new = os.path.join(tmp, "data.mdb")
        _fsync_path(new)
        _fsync_path(tmp)
        _hook("compact-copied")
        st.close()
        fd = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
        except OSError as e:
            os.close(fd)  # we hold no other lock on this file now, so closing is harmless
            _reopen(repo)
            raise ConcurrentUpdate("compact: another process opened the repository; not compacted") from e
        os.replace(new, data)
        _fsync_path(path)
        _hook("compact-swapped")
        _reopen(repo)  # LMDB: exclusive open (same process) -> re-initialises lock.mdb, then shares
        _LOCK_FDS.append(fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"bytes_before": before, "bytes_after": os.path.getsize(data)}


_LOCK_FDS: list[int] = []


def _fsync_path(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reopen(repo: Repository) -> None:
    from coralfs.store.lmdb import Store

    st = Store(repo.store.path)
    repo.store = st
    repo.objects.store = st
