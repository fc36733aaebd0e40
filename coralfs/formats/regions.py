"""What a parser returns: regions of a file, and the checks every parser shares."""

from __future__ import annotations

from dataclasses import dataclass

MAX_NAME = 16384  # characters of a tensor name; a longer one is replaced (names only steer deltas)


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


def usable_name(name: object) -> bool:
    """Whether ``name`` can name a tensor in a manifest (a str that encodes as UTF-8, not absurdly long)."""
    if not isinstance(name, str) or len(name) > MAX_NAME:
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (a JSON "\\ud800" or a pickled str)
        return False
    return True


def valid_shape(shape: object) -> tuple[int, ...] | None:
    """``shape`` as a tuple of ints in [0, 2**63), or None when it is not one (at most 64 dims)."""
    if not isinstance(shape, (tuple, list)) or len(shape) > 64:
        return None
    if not all(type(x) is int and 0 <= x < 1 << 63 for x in shape):
        return None
    return tuple(shape)


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
