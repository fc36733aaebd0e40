"""Read any byte range of a stored file, decoding only the chunks it touches."""

from __future__ import annotations

import bisect
import io

from coralfs.objects import Manifest, Piece
from coralfs.objectstore import ObjectStore


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

    def pread(self, offset: int, size: int) -> bytes:
        if offset >= self.size or size <= 0:
            return b""
        end = min(self.size, offset + size)
        i = bisect.bisect_right(self._starts, offset) - 1
        parts: list[bytes | memoryview] = []
        pos = offset
        while pos < end:
            p, start = self._pieces[i], self._starts[i]
            data = self._piece_bytes(p)
            lo, hi = pos - start, min(p.length, end - start)
            parts.append(data if lo == 0 and hi == len(data) else memoryview(data)[lo:hi])
            pos = start + hi
            i += 1
        if len(parts) == 1:
            part = parts[0]
            return part if isinstance(part, bytes) else bytes(part)
        return b"".join(parts)

    def chunks(self) -> list[tuple[int, Piece]]:
        return list(zip(self._starts, self._pieces, strict=True))


class FileReader(io.RawIOBase):
    """A seekable, read-only binary file over a stored file."""

    def __init__(self, view: FileView, name: str = "") -> None:
        super().__init__()
        self._view = view
        self._pos = 0
        self.name = name

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
