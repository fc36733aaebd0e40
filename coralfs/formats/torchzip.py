"""torch.save zip files: members are stored (not compressed) and 64-byte aligned.

Zip headers, the pickle, padding and the central directory become bytes regions
(so the file, CRCs included, is reproduced exactly); each ``<archive>/data/<key>``
payload becomes a tensor region whose element type comes from the pickle, read
without executing it (coralfs.formats.torchpickle).
"""

from __future__ import annotations

import struct

from coralfs.formats.regions import NotThisFormat, Region, fill_gaps, usable_name, valid_shape
from coralfs.formats.torchpickle import read_storages

_EOCD = b"PK\x05\x06"
_EOCD64_LOC = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CDH = b"PK\x01\x02"
_LFH = b"PK\x03\x04"


def _members(buf: memoryview) -> list[tuple[str, int, int, int]]:
    """(name, data_start, data_len, method) for every member, from the central directory."""
    size = len(buf)
    tail_start = max(0, size - (65535 + 22))
    tail = bytes(buf[tail_start:])
    pos = tail.rfind(_EOCD)
    if pos < 0:
        raise NotThisFormat("no end of central directory")
    eocd = tail_start + pos
    if eocd + 22 > size:
        raise NotThisFormat("truncated end of central directory")
    (_, _, _, _, count, cd_size, cd_off, _) = struct.unpack_from("<4sHHHHIIH", buf, eocd)
    if count == 0xFFFF or cd_off == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
        loc = eocd - 20
        if loc < 0 or bytes(buf[loc : loc + 4]) != _EOCD64_LOC:
            raise NotThisFormat("zip64 locator missing")
        (off64,) = struct.unpack_from("<Q", buf, loc + 8)
        if off64 + 56 > size or bytes(buf[off64 : off64 + 4]) != _EOCD64:
            raise NotThisFormat("zip64 end of central directory missing")
        count, cd_size, cd_off = struct.unpack_from("<QQQ", buf, off64 + 32)
    if cd_off + cd_size > size:
        raise NotThisFormat("central directory out of range")
    if count > cd_size // 46 + 1:  # an entry takes at least 46 bytes
        raise NotThisFormat("central directory entry count out of range")
    out = []
    p = cd_off
    for _ in range(count):
        if p + 46 > size or bytes(buf[p : p + 4]) != _CDH:
            raise NotThisFormat("bad central directory entry")
        (method, csize, usize, nlen, xlen, clen, lho) = struct.unpack_from("<10xH8xIIHHH8xI", buf, p)
        name = bytes(buf[p + 46 : p + 46 + nlen]).decode("utf-8", "replace")
        extra = bytes(buf[p + 46 + nlen : p + 46 + nlen + xlen])
        csize, usize, lho = _zip64_extra(extra, csize, usize, lho)
        p += 46 + nlen + xlen + clen
        if lho + 30 > size or bytes(buf[lho : lho + 4]) != _LFH:
            raise NotThisFormat(f"bad local header for {name!r}")
        lnlen, lxlen = struct.unpack_from("<HH", buf, lho + 26)
        start = lho + 30 + lnlen + lxlen
        if start + csize > size:
            raise NotThisFormat(f"member {name!r} out of range")
        out.append((name, start, csize, method))
    return out


def _zip64_extra(extra: bytes, csize: int, usize: int, lho: int) -> tuple[int, int, int]:
    """Sizes and offset from a zip64 extra field (tag 1), for those the entry marks 0xFFFFFFFF.
    A field that is cut short or claims more bytes than the entry has is read only as far as it
    goes; a value the entry needs and the field lacks is NotThisFormat."""
    i = 0
    while i + 4 <= len(extra):
        tag, ln = struct.unpack_from("<HH", extra, i)
        body = extra[i + 4 : i + 4 + ln]  # shorter than ln when the field lies about its length
        if tag == 1:
            vals = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if lho == 0xFFFFFFFF and vals:
                lho = vals.pop(0)
        i += 4 + ln
    if 0xFFFFFFFF in (csize, lho):
        raise NotThisFormat("zip64 size or offset missing from the extra field")
    return csize, usize, lho


def regions(buf: memoryview) -> list[Region]:
    members = _members(buf)
    pkl = [m for m in members if m[0].endswith("/data.pkl") or m[0] == "data.pkl"]
    data = [m for m in members if "/data/" in m[0] and m[3] == 0]
    if not pkl or not data and len(members) < 2:
        raise NotThisFormat("not a torch.save archive")
    storages = {}
    name, start, length, method = pkl[0]
    if method == 0:
        try:
            storages = read_storages(bytes(buf[start : start + length]))
        except ValueError:
            storages = {}  # dtypes unknown: tensors are still split out, with width 1
    tensors = []
    used: set[str] = set()
    for mname, start, length, _ in data:
        key = mname.rsplit("/data/", 1)[1]
        info = storages.get(key)
        name = info.name if info is not None and usable_name(info.name) else ""
        if not name or name in used:  # names must be unique in a manifest
            name = f"data/{key}"
            while name in used:
                name += "'"
        used.add(name)
        if info is not None:
            width = info.width if length % info.width == 0 else 1
            tensors.append(Region("tensor", start, start + length, name, info.dtype, width, valid_shape(info.shape)))
        else:
            tensors.append(Region("tensor", start, start + length, name, "U8", 1, None))
    return fill_gaps(len(buf), tensors)
