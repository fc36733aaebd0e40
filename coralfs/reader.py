"""Read any byte range of a stored file, decoding only the chunks it touches; the read-ahead
policy of every sequential reader (``ReadAhead``: ``FileReader`` and the mount's open files)."""

from __future__ import annotations

import bisect
import io
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor

from coralfs.store.objects import Manifest, Piece
from coralfs.store.objectstore import ObjectStore

READAHEAD_BYTES = 8 << 20  # sequential readers: decode this far ahead (eight 1 MiB pieces)
ADVISE_BYTES = 64 << 20  # ... and have the disk read the records this far ahead (ObjectStore.advise)
SEQUENTIAL_READS = 2  # reads in a row, each where the last one ended, that make a reader sequential
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
PREFETCH_POOL_THREADS = 2


def prefetch_pool() -> ThreadPoolExecutor:
    """A small process-wide pool that decodes chunks ahead of sequential readers
    (decoding releases the GIL in zstd and numpy, so two threads use both cores)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(PREFETCH_POOL_THREADS, thread_name_prefix="coralfs-readahead")
        return _pool


class FileView:
    """Random access to a manifest's bytes: ``pread(offset, size)``. Thread-safe."""

    def __init__(self, ostore: ObjectStore, manifest: Manifest) -> None:
        self.ostore = ostore
        self.manifest = manifest
        self.size = manifest.size
        self._pieces: list[Piece] = [p for s in manifest.segments for p in s.pieces]
        self._starts: list[int] = []
        pos = 0
        for p in self._pieces:
            self._starts.append(pos)
            pos += p.length

    def _piece_bytes(self, p: Piece) -> bytes:
        if p.inline is not None:
            return p.inline
        assert p.chunk is not None
        return self.ostore.get_chunk(p.chunk)

    def _parts(self, offset: int, size: int) -> Iterator[tuple[bytes, int, int]]:
        """``(piece bytes, lo, hi)`` for each piece ``[offset, offset + size)`` touches, in
        order: the request is ``data[lo:hi]`` of each, concatenated."""
        if offset >= self.size or size <= 0:
            return
        end = min(self.size, offset + size)
        i = bisect.bisect_right(self._starts, offset) - 1
        pos = offset
        multi = end > self._starts[i] + self._pieces[i].length
        while pos < end:
            p, start = self._pieces[i], self._starts[i]
            if multi:  # a read spanning chunks: decode the next few in parallel with this one
                nxt = [self._pieces[j].chunk for j in range(i + 1, min(i + 3, len(self._pieces)))
                       if self._starts[j] < end and self._pieces[j].chunk is not None]
                self.ostore.prefetch(prefetch_pool(), nxt)  # type: ignore[arg-type]
            lo, hi = pos - start, min(p.length, end - start)
            yield self._piece_bytes(p), lo, hi
            pos = start + hi
            i += 1

    def parts(self, offset: int, size: int) -> list[tuple[bytes, int, int]]:
        """``[offset, offset + size)`` as ``(decoded piece, lo, hi)`` slices, in order: a caller that
        can gather (the FUSE reply's iovec) sends them without building one buffer."""
        return list(self._parts(offset, size))

    def pread(self, offset: int, size: int) -> bytes:
        parts = [data if lo == 0 and hi == len(data) else memoryview(data)[lo:hi]
                 for data, lo, hi in self._parts(offset, size)]
        if len(parts) == 1:
            part = parts[0]
            return part if isinstance(part, bytes) else bytes(part)
        return b"".join(parts)

    def pread_into(self, offset: int, dst: memoryview) -> int:
        """``pread`` straight into ``dst`` (e.g. the FUSE reply buffer): one copy of each
        byte, from the decoded-chunk cache, and no ``bytes`` built for the request."""
        n = 0
        for data, lo, hi in self._parts(offset, len(dst)):
            dst[n : n + hi - lo] = memoryview(data)[lo:hi]
            n += hi - lo
        return n

    def chunks(self) -> list[tuple[int, Piece]]:
        return list(zip(self._starts, self._pieces, strict=True))

    def chunks_in(self, offset: int, size: int) -> list[bytes]:
        """Ids of the chunks holding bytes ``[offset, offset + size)``, in order."""
        out: list[bytes] = []
        end = min(self.size, offset + size)
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while i < len(self._pieces) and self._starts[i] < end:
            c = self._pieces[i].chunk
            if c is not None and (not out or out[-1] != c):
                out.append(c)
            i += 1
        return out


class ReadAhead:
    """One reader's read-ahead: the policy every sequential reader follows. Once a reader has
    read ``SEQUENTIAL_READS`` times in a row, each read starting where the last one ended, the
    chunks of the next ``decode_bytes`` are decoded in the background (on ``executor``, by
    default the process-wide pool) and the disk is asked for the records of the next
    ``ADVISE_BYTES`` (in steps of half that window). A read elsewhere starts over."""

    __slots__ = ("decode_bytes", "executor", "next_offset", "sequential", "advised_to")

    def __init__(self, decode_bytes: int = READAHEAD_BYTES, executor: Executor | None = None) -> None:
        self.decode_bytes = decode_bytes
        self.executor = executor
        self.next_offset = 0  # where a sequential reader reads next
        self.sequential = 0  # reads in a row where the last one ended
        self.advised_to = 0  # the disk has been asked to read the records up to here

    def on_read(self, view: FileView, offset: int, size: int) -> None:
        """``view`` is about to be read at ``[offset, offset + size)``: decode and fetch ahead."""
        self.sequential = self.sequential + 1 if offset == self.next_offset else 0
        self.next_offset = end = offset + size
        if not self.sequential:
            self.advised_to = 0
        if self.sequential < SEQUENTIAL_READS or end >= view.size:
            return
        # a sequential reader (cat, cp, torch.load): decode the next chunks while this one is
        # being copied out and the reader works on it
        view.ostore.prefetch(self.executor or prefetch_pool(), view.chunks_in(end, self.decode_bytes))
        if self.advised_to < end + ADVISE_BYTES // 2:
            start = max(end, self.advised_to)
            view.ostore.advise(view.chunks_in(start, end + ADVISE_BYTES - start))
            self.advised_to = end + ADVISE_BYTES


class FileReader(io.RawIOBase):
    """A seekable, read-only binary file over a stored file."""

    def __init__(self, view: FileView, name: str = "", readahead: bool = True) -> None:
        super().__init__()
        self._view = view
        self._pos = 0
        self.name = name
        self._readahead = ReadAhead() if readahead else None

    @property
    def size(self) -> int:
        return self._view.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._view.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._view.size - self._pos)
        if self._readahead is not None:
            self._readahead.on_read(self._view, self._pos, size)
        data = self._view.pread(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        mv = memoryview(b).cast("B")
        data = self.read(len(mv))
        mv[: len(data)] = data
        return len(data)
