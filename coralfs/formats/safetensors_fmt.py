"""safetensors: u64 LE header length, JSON header, then the tensors' data.

The header is untrusted: its nesting depth is checked before it is parsed (the JSON
decoder recurses per level), and every field is type-checked (a shape of ``1e999`` is a
float, not a dimension). Anything that is not a well-formed safetensors header is
``NotThisFormat``: the file is then stored as plain bytes.
"""

from __future__ import annotations

import json
import math
import re
import struct

import numpy as np

from coralfs.formats.regions import NotThisFormat, Region, fill_gaps, usable_name, valid_shape

# dtype -> element width in bytes (safetensors names)
DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "C64": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER = 100 << 20
MAX_DEPTH = 64  # JSON nesting of a header (a real one nests 3 deep)
_DTYPE_NAME = re.compile(r"[A-Za-z0-9_]{1,32}")
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def json_depth(text: bytes, limit: int | None = None, block: int = 4 << 20) -> int:
    """The deepest nesting of ``[``/``{`` outside strings (exact for valid JSON), without recursion:
    vectorised, ``block`` bytes at a time; stops early once past ``limit``."""
    deepest = depth = bs_run = 0  # carried from block to block: depth, trailing backslashes
    inside = 0  # inside a string at the block boundary
    for off in range(0, len(text), block):
        a = np.frombuffer(text, dtype=np.uint8, count=min(block, len(text) - off), offset=off)
        idx = np.arange(a.size, dtype=np.int64)
        backslash = a == ord("\\")
        # the run of backslashes just before each position: a quote after an odd run is escaped
        last_other = np.maximum.accumulate(np.where(backslash, -1 - bs_run, idx))
        run_before = np.empty(a.size, dtype=np.int64)
        run_before[0] = bs_run
        run_before[1:] = idx[:-1] - last_other[:-1]
        quote = (a == ord('"')) & (run_before % 2 == 0)
        in_string = (inside + np.cumsum(quote) - quote) % 2 == 1  # after an opening quote, to its closing one
        levels = depth + np.cumsum(np.where(in_string | quote, 0, _OPEN[a]), dtype=np.int64)
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
        inside = int(inside + quote.sum()) % 2
        bs_run = int(a.size - 1 - last_other[-1]) if backslash[-1] else 0
        if limit is not None and deepest > limit:
            break
    return deepest


def _int(x: object) -> int:
    if type(x) is not int or x < 0:
        raise NotThisFormat(f"not a non-negative integer: {x!r:.40}")
    return x


def regions(buf: memoryview) -> list[Region]:
    size = len(buf)
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n < 2 or n > MAX_HEADER or 8 + n > size:
        raise NotThisFormat("bad safetensors header length")
    head = bytes(buf[8 : 8 + n])
    if head[:1] != b"{":
        raise NotThisFormat("safetensors header is not a JSON object")
    if json_depth(head, MAX_DEPTH) > MAX_DEPTH:
        raise NotThisFormat("safetensors header nests too deep")
    try:
        header = json.loads(head)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise NotThisFormat(f"safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise NotThisFormat("safetensors header is not an object")
    base = 8 + n
    tensors: list[Region] = []
    for tname, info in header.items():
        if tname == "__metadata__":
            continue
        if not usable_name(tname):
            raise NotThisFormat("a tensor name that is not valid UTF-8")
        if not isinstance(info, dict):
            raise NotThisFormat(f"tensor {tname!r:.60}: not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or not _DTYPE_NAME.fullmatch(dtype):
            raise NotThisFormat(f"tensor {tname!r:.60}: bad dtype")
        if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            raise NotThisFormat(f"tensor {tname!r:.60}: bad shape or data_offsets")
        dims = valid_shape(shape)
        if dims is None:
            raise NotThisFormat(f"tensor {tname!r:.60}: bad shape")
        start, end = _int(offsets[0]), _int(offsets[1])
        if not start <= end or base + end > size:
            raise NotThisFormat(f"tensor {tname!r:.60}: offsets out of range")
        width = DTYPES.get(dtype)
        if width is None:
            width = 1  # a dtype this version does not know: split out, compared byte by byte
        elif dtype not in ("F4", "F6_E2M3", "F6_E3M2") and (end - start) != math.prod(dims) * width:
            raise NotThisFormat(f"tensor {tname!r:.60}: data size does not match shape")
        tensors.append(Region("tensor", base + start, base + end, tname, dtype, width, dims))
    return fill_gaps(size, tensors)
