"""Find the tensors inside a checkpoint file without trusting it.

``split(buf)`` returns the file's format and an ordered, gap-free list of regions
covering ``[0, len(buf))``: plain ``bytes`` regions and ``tensor`` regions (one
tensor's data, with name, dtype and element width). A file that does not parse is a
single ``bytes`` region: parsing only decides how well a file compresses, never
whether it is stored exactly.

The parsers raise ``NotThisFormat`` for what they recognise as not theirs. Anything else
a parser raises (a bug, a case nobody thought of) is logged at debug level and the file is
plain bytes too, so no parser can make a file unstorable; only ``MemoryError`` (and
``KeyboardInterrupt``, ``SystemExit``) pass through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

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


def _covers(size: int, regions: list[Region]) -> bool:
    pos = 0
    for r in regions:
        if not isinstance(r, Region) or r.start != pos or r.end <= r.start or r.kind not in ("bytes", "tensor"):
            return False
        if r.kind == "tensor" and (not usable_name(r.name) or not isinstance(r.dtype, str)
                                   or type(r.width) is not int or r.width < 1):
            return False
        pos = r.end
    return pos == size


def _try(fmt: str, parser: Callable[[memoryview], list[Region]], buf: memoryview, name: str) -> list[Region] | None:
    try:
        regions = parser(buf)
    except NotThisFormat:
        return None
    except (MemoryError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - the last line of defence: the file is stored as bytes
        log.debug("%s parser failed on %r (stored as plain bytes): %s: %s", fmt, name, type(e).__name__, e)
        return None
    if not _covers(len(buf), regions):
        log.debug("%s parser returned regions that do not cover %r exactly (stored as plain bytes)", fmt, name)
        return None
    return regions


def split(buf: memoryview, name: str = "") -> tuple[str, list[Region]]:
    from coralfs.formats import safetensors_fmt, torchzip

    size = len(buf)
    if size >= 4 and bytes(buf[:4]) == b"PK\x03\x04":
        regions = _try("torch-zip", torchzip.regions, buf, name)
        if regions is not None:
            return "torch-zip", regions
    if size >= 10:
        regions = _try("safetensors", safetensors_fmt.regions, buf, name)
        if regions is not None:
            return "safetensors", regions
    return "bytes", [Region("bytes", 0, size)] if size else []
