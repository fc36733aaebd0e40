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

from coralfs.formats.regions import MAX_NAME, NotThisFormat, Region, fill_gaps, usable_name, valid_shape

__all__ = ["MAX_NAME", "NotThisFormat", "Region", "fill_gaps", "split", "usable_name", "valid_shape"]

log = logging.getLogger(__name__)

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
