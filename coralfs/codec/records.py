"""Chunk records: the self-describing value stored under a chunk id.

Layout (little endian)::

    magic  b"CRF"   3 bytes
    version         u8   (1)
    codec           u8   a codec id of the registry ``coralfs.codec.tensor.CODECS`` (0 raw, 1 zstd, ...)
    width           u8   element width in bytes (1 for non-tensor data)
    nbases          u8   number of base chunk ids that follow the header
    gen             u8   chain policy: a tensor piece's generation (capped at 255; see coralfs.ingest)
    depth           u16  delta-chain depth (0 = decodes on its own)
    raw_len         u64  length of the decoded bytes
    bases           nbases * 32 bytes
    payload

The chunk id is the BLAKE3 of the decoded bytes, so a record can be re-encoded
(other codec, other base) without changing any id that points at it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zstandard

from coralfs.codec import tensor as tensorcodec
from coralfs.errors import FormatError
from coralfs.hashing import ID_LEN

MAGIC = b"CRF"
VERSION = 1
_HEADER = struct.Struct("<3sBBBBBHQ")
HEADER_LEN = _HEADER.size
PEEK_LEN = HEADER_LEN + 2 * ID_LEN  # enough of a record to parse its header (at most two bases)

RAW = tensorcodec.RAW
ZSTD = tensorcodec.ZSTD


@dataclass(frozen=True)
class RecordHeader:
    codec: int
    width: int
    depth: int
    raw_len: int
    bases: tuple[bytes, ...]
    payload_offset: int
    gen: int = 0

    @property
    def codec_name(self) -> str:
        """The codec's name (stats, the CLI)."""
        return tensorcodec.CODECS[self.codec].name


def parse_header(value: bytes | memoryview) -> RecordHeader:
    if len(value) < HEADER_LEN:
        raise FormatError("chunk record too short")
    magic, version, codec, width, nbases, gen, depth, raw_len = _HEADER.unpack_from(value, 0)
    if magic != MAGIC:
        raise FormatError("chunk record has a bad magic")
    if version != VERSION:
        raise FormatError(f"chunk record version {version} is not supported")
    if codec not in tensorcodec.CODECS:
        raise FormatError(f"unknown codec id {codec}")
    end = HEADER_LEN + nbases * ID_LEN
    if len(value) < end:
        raise FormatError("chunk record truncated")
    bases = tuple(bytes(value[HEADER_LEN + i * ID_LEN : HEADER_LEN + (i + 1) * ID_LEN]) for i in range(nbases))
    return RecordHeader(codec, width, depth, raw_len, bases, end, gen)


def pack(codec: int, width: int, raw_len: int, payload: bytes | memoryview,
         bases: tuple[bytes, ...] = (), depth: int = 0, gen: int = 0) -> bytes:
    header = _HEADER.pack(MAGIC, VERSION, codec, width, len(bases), min(gen, 255), depth, raw_len)
    return b"".join((header, *bases, payload))


def encode_bytes(raw: bytes | memoryview) -> bytes:
    """Record for non-tensor bytes: zstd, or raw when compression does not pay."""
    comp = tensorcodec.zstd_compressor(3).compress(raw)
    if len(comp) < len(raw) * 0.97:
        return pack(ZSTD, 1, len(raw), comp)
    return pack(RAW, 1, len(raw), raw)


def encode_tensor(raw: bytes | memoryview, width: int, base: tuple[bytes, Any] | None = None,
                  base2: tuple[bytes, Any] | None = None, base_depth: int = 0, gen: int = 0) -> bytes:
    """Record for tensor bytes. ``base``/``base2`` are ``(chunk_id, decoded_bytes)``;
    ``base_depth`` the deepest chain among them; ``gen`` the chain-policy generation."""
    codec, payload = tensorcodec.encode(raw, width, base[1] if base else None, base2[1] if base2 else None)
    if codec == RAW:
        return pack(RAW, width, len(raw), raw, gen=gen)
    used = tensorcodec.CODECS[codec].nbases
    bases: tuple[bytes, ...] = ()
    if used >= 1 and base is not None:
        bases = (base[0],) if used == 1 or base2 is None else (base[0], base2[0])
    depth = base_depth + 1 if bases else 0
    return pack(codec, width, len(raw), payload, bases, depth, gen)


def decode(value: bytes | memoryview, load_base: Callable[[bytes], Any], as_array: bool = False) -> Any:
    """Decode a record; ``load_base(chunk_id)`` returns a base chunk's decoded bytes (or a
    uint8 array). Returns ``bytes``, or with ``as_array`` possibly a uint8 numpy array (for
    a result that is only another chunk's base: saves a copy)."""
    h = parse_header(value)
    codec = tensorcodec.CODECS[h.codec]
    payload = memoryview(value)[h.payload_offset :]
    bases = [load_base(b) for b in h.bases[: codec.nbases]]
    try:
        out = codec.decode(payload, h.raw_len, h.width, *bases, as_array=as_array)
    except (ValueError, zstandard.ZstdError) as e:
        raise FormatError(f"{codec.name}: {e}") from e
    if len(out) != h.raw_len:
        raise FormatError("decoded chunk has the wrong length")
    return out
