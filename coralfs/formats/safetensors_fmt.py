"""safetensors: u64 LE header length, JSON header, then the tensors' data."""

from __future__ import annotations

import json
import math
import struct

from coralfs.formats import NotThisFormat, Region, fill_gaps

# dtype -> element width in bytes (safetensors names)
DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "C64": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER = 100 << 20


def regions(buf: memoryview) -> list[Region]:
    size = len(buf)
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n < 2 or n > MAX_HEADER or 8 + n > size:
        raise NotThisFormat("bad safetensors header length")
    head = bytes(buf[8 : 8 + n])
    if head[:1] != b"{":
        raise NotThisFormat("safetensors header is not a JSON object")
    try:
        header = json.loads(head)
    except ValueError as e:
        raise NotThisFormat(f"safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise NotThisFormat("safetensors header is not an object")
    base = 8 + n
    tensors: list[Region] = []
    for tname, info in header.items():
        if tname == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(x) for x in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise NotThisFormat(f"tensor {tname!r}: {e}") from e
        width = DTYPES.get(dtype)
        if width is None:
            width = 1
        elif dtype not in ("F4", "F6_E2M3", "F6_E3M2") and (end - start) != math.prod(shape) * width:
            raise NotThisFormat(f"tensor {tname!r}: data size does not match shape")
        if not 0 <= start <= end or base + end > size:
            raise NotThisFormat(f"tensor {tname!r}: offsets out of range")
        tensors.append(Region("tensor", base + start, base + end, tname, dtype, width, shape))
    return fill_gaps(size, tensors)
