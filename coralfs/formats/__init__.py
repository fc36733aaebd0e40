"""Find the tensors inside a checkpoint file without trusting it.

``split(buf)`` returns the file's format and an ordered, gap-free list of regions
covering ``[0, len(buf))``: plain ``bytes`` regions and ``tensor`` regions (one
tensor's data, with name, dtype and element width). A file that does not parse is a
single ``bytes`` region: parsing only decides how well a file compresses, never
whether it is stored exactly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Region:
    kind: str  # "bytes" | "tensor"
    start: int
    end: int
    name: str = ""
    dtype: str = ""
    width: int = 1
    shape: tuple[int, ...] | None = None


class NotThisFormat(Exception):
    """The bytes are not (a valid instance of) this format."""


def fill_gaps(size: int, tensors: list[Region]) -> list[Region]:
    """Sort tensor regions, check they do not overlap, and cover the rest with bytes regions."""
    out: list[Region] = []
    pos = 0
    for r in sorted(tensors, key=lambda r: r.start):
        if r.start < pos or r.end > size or r.start > r.end:
            raise NotThisFormat("overlapping or out-of-range tensor data")
        if r.start > pos:
            out.append(Region("bytes", pos, r.start))
        if r.end > r.start:
            out.append(r)
        pos = r.end
    if pos < size:
        out.append(Region("bytes", pos, size))
    return out


def split(buf: memoryview, name: str = "") -> tuple[str, list[Region]]:
    from coralfs.formats import safetensors_fmt, torchzip

    size = len(buf)
    if size >= 4 and bytes(buf[:4]) == b"PK\x03\x04":
        try:
            return "torch-zip", torchzip.regions(buf)
        except NotThisFormat:
            pass
    if size >= 10:
        try:
            return "safetensors", safetensors_fmt.regions(buf)
        except NotThisFormat:
            pass
    return "bytes", [Region("bytes", 0, size)] if size else []
