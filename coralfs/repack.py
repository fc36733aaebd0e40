"""The repacker: turns replaced versions into reverse deltas against their successors.

Ingest stores every new version of a tensor piece whole (a keyframe) and queues a
pending demotion (N, P) when the version P it replaces is a keyframe (coralfs.ingest).
Repacking re-encodes P as a delta against N, in place (a chunk id is the hash of the
decoded bytes, so nothing that points at P changes), or keeps P whole as an *anchor*
that bounds the chains hanging below it. P stays whole when

* what the delta saves (P's record minus the delta) is less than ``READ_COST`` times what
  it adds to reads: the delta's bytes, once for P and once for every version whose chain
  runs through P, the first version of the lineage counting ``ROOT_WEIGHT`` times (the
  oldest version is, with the newest, the one people go back to). Chains of fine-tune
  deltas (a third of a keyframe or less) grow long; chains of deltas that save less stay
  short. Measured on the 12-version series (bench/RESULTS.md, third session): with the
  first version weighted 5x, the oldest scratch_pt version decodes 88 MB of records
  instead of 98 (the newest: 69), fp32 fine-tune storage unchanged (350.0 MB); 7x: 81 MB
  but fp32 354.5 MB; 10x: 70 MB but 362.1 MB (fp32 fine-tunes would no longer be stored
  in 1.3x fewer bytes than the best lossless peer, the target in bench/HISTORY.md);
* the chain below it would pass ``REVERSE_MAX_BELOW`` deltas, or its deltas would hold
  more than ``LOAD_BUDGET`` times the piece's bytes (hard bounds on any read);
* the delta is not smaller than ``KEEP_RATIO`` of P's record (not worth a slower read);
* P is the first version of its lineage and the delta is not smaller than
  ``ROOT_KEEP_RATIO`` of it: both ends of a history stay one record per piece where that
  costs little storage (training from scratch, where a delta saves ~12%), while
  fine-tunes, whose deltas save 60-90%, keep their storage.

What a keyframe knows about the chains ending at it lives in the index (``keys.below_key``:
``rv\0`` + chunk id -> deltas on the longest chain, their bytes in 1/256ths of the piece).

Each demotion is applied in a write transaction that first checks P and N are both still
keyframes, so every delta points at a chunk that was a keyframe when the delta was
written: chains cannot form a cycle. A repack killed at any point leaves every record
decodable and its remaining work queued; running it again finishes it.

Commits return before their repack: ``Repository`` runs it on a background thread at a
low CPU priority and waits for it when closed (see ``Repository.repack_soon``).
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

from coralfs.codec import records
from coralfs.errors import CoralError
from coralfs.hashing import ID_LEN
from coralfs.store.keys import DEMOTIONS, below_key, demotion_chunks
from coralfs.store.lmdb import Txn
from coralfs.store.objectstore import Headers, ObjectStore

REVERSE_MAX_BELOW = 15  # at most this many deltas on a chain above a keyframe
LOAD_BUDGET = 8.0  # ... holding at most this many times the piece's bytes
READ_COST = 0.05  # a byte a delta saves must be worth 20 bytes it adds to reads below it
ROOT_WEIGHT = 5  # ... where a lineage's first version counts as five readers
KEEP_RATIO = 0.9  # a delta must be smaller than this fraction of the record it replaces
ROOT_KEEP_RATIO = 0.75  # ... and than this one for the first version of a lineage
LOAD_UNIT = 256
_BELOW = struct.Struct("<HIB")  # deltas on the longest chain, their bytes, whether a lineage's first version is among them
WINDOW = 16  # pending demotions encoded at once
BATCH_BYTES = 32 << 20  # records written per transaction


@dataclass
class RepackStats:
    examined: int = 0
    demoted: int = 0
    kept: int = 0  # left whole: anchors, deltas that do not pay
    dropped: int = 0  # stale entries: a chunk gone, or no longer a keyframe
    bytes_before: int = 0  # records of the demoted chunks, before
    bytes_after: int = 0  # ... and after
    seconds: float = 0.0

    def add(self, other: RepackStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class _Job:
    key: bytes
    new: bytes
    prev: bytes
    record: bytes | None = None  # prev encoded against new; None: keep prev whole (or stale)
    prev_len: int = 0
    raw_len: int = 0
    gen: int = 0
    stale: bool = False


def read_below(t: Txn, cid: bytes) -> tuple[int, int, int]:
    v = t.get("index", below_key(cid))
    return _BELOW.unpack(v) if v is not None and len(v) == _BELOW.size else (0, 0, 0)


def pending_count(ostore: ObjectStore) -> int:
    with ostore.store.read() as t:
        return sum(1 for _ in t.keys("index", DEMOTIONS))


def _entries(ostore: ObjectStore, limit: int) -> list[_Job]:
    out = []
    with ostore.store.read() as t:
        for k in t.keys("index", DEMOTIONS):
            new, prev = demotion_chunks(k)
            if len(new) != ID_LEN or len(prev) != ID_LEN:  # not ours to understand: dropped
                out.append(_Job(k, b"", b"", stale=True))
            else:
                out.append(_Job(k, new, prev))
            if len(out) >= limit:
                break
    return out


def _encode(ostore: ObjectStore, job: _Job) -> _Job:
    """Read both versions (verified) and encode the older against the newer. A version that
    is gone, no longer a keyframe, or does not decode (fsck reports that) is left alone."""
    if job.stale:
        return job
    try:
        hp, job.prev_len = ostore.chunk_info(job.prev)
        hn, _ = ostore.chunk_info(job.new)
        if hp.bases or hn.bases:
            job.stale = True
            return job
        job.raw_len, job.gen = hp.raw_len, hp.gen
        with ostore.store.read() as t:
            n, load, _ = read_below(t, job.prev)
        if n + 1 > REVERSE_MAX_BELOW or load >= LOAD_BUDGET * LOAD_UNIT:
            return job  # an anchor: no need to encode
        new = ostore.get_chunk(job.new)
        job.record = records.encode_tensor(ostore.get_chunk(job.prev), hp.width, (job.new, new), None, 0, hp.gen)
    except CoralError:
        job.stale, job.record = True, None
    return job


def _decide(job: _Job, below: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The new keyframe's below counters if ``job`` demotes, else None (keep prev whole)."""
    if job.record is None:
        return None
    n, load, root = below
    root = int(root or job.gen == 0)
    d = len(job.record)
    new_load = load + -(-d * LOAD_UNIT // max(1, job.raw_len))
    ratio = KEEP_RATIO if job.gen else ROOT_KEEP_RATIO
    readers = n + 1 + (ROOT_WEIGHT - 1) * root
    if (n + 1 > REVERSE_MAX_BELOW or new_load > LOAD_BUDGET * LOAD_UNIT or d >= ratio * job.prev_len
            or job.prev_len - d < READ_COST * d * readers or not records.parse_header(job.record).bases):
        return None
    return n + 1, new_load, root


def _apply(t: Txn, jobs: list[_Job], stats: RepackStats) -> None:
    headers = Headers(t)
    for job in jobs:
        t.delete("index", job.key)
        stats.examined += 1
        if job.stale:
            stats.dropped += 1
            continue
        old = headers.info(job.prev)
        new = headers.info(job.new)
        if old is None or new is None or old[0].bases or new[0].bases:
            stats.dropped += 1
            continue
        below = _decide(job, read_below(t, job.prev))
        if below is None:
            stats.kept += 1
            continue
        assert job.record is not None
        t.put("chunks", job.prev, job.record)
        t.put("index", below_key(job.new), _BELOW.pack(*below))
        t.delete("index", below_key(job.prev))
        stats.demoted += 1
        stats.bytes_before += old[1]
        stats.bytes_after += len(job.record)


def repack(ostore: ObjectStore, lock: Callable[[], AbstractContextManager[object]] | None = None,
           stop: threading.Event | None = None, threads: int = 2) -> RepackStats:
    """Apply every pending demotion (until ``stop`` is set); see the module docstring.
    ``lock``: held around each write (the repository's ``writing``, so gc never runs
    between a check and a write)."""
    t0 = time.monotonic()
    stats = RepackStats()
    hold = lock or contextlib.nullcontext
    # ``ostore``'s own cache: it holds what ingest just stored (and a reader may soon want)
    with ThreadPoolExecutor(threads, thread_name_prefix="coralfs-repack") as pool:
        while stop is None or not stop.is_set():
            jobs = _entries(ostore, WINDOW)
            if not jobs:
                break
            done = list(pool.map(lambda j: _encode(ostore, j), jobs))
            for part in _batches(done):
                with hold():
                    ostore.store.write(lambda t, part=part: _apply(t, part, stats))
    stats.seconds = time.monotonic() - t0
    return stats


def _batches(jobs: list[_Job]) -> Iterator[list[_Job]]:
    part: list[_Job] = []
    size = 0
    for j in jobs:
        part.append(j)
        size += len(j.record or b"")
        if size >= BATCH_BYTES:
            yield part
            part, size = [], 0
    if part:
        yield part
