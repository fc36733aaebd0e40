"""The codecs of chunk records (one registry) and the lossless transforms for tensor chunks:
byte planes, XOR/integer deltas, two-base prediction.

Pure transform layer (numpy + zstandard, no I/O). A chunk is the raw bytes of a piece of one
tensor; ``width`` is its element width. Everything works on the *unsigned integer view* of the
elements, so reconstruction is bit-exact for any bit pattern (NaN payloads, -0.0, denormals, ...):
no float arithmetic is ever done.

Codecs (one byte each, the id a record header names; ids never change). Each is one class
below with its id, its name (stats and the CLI show it), how many bases it needs, its
transforms and its compiled loop; ``CODECS`` is the one table of them, ``by_id`` the one
dispatch. 0 and 1 also serve non-tensor bytes (``coralfs.codec.records``):

* ``RAW`` (0)    payload is the data itself (``encode`` returns ``(0, b"")``).
* ``ZSTD`` (1)   payload is one plain zstd frame of the whole chunk.
* ``PLANES`` (2) byte-plane split (plane k = byte k of every element), each plane zstd'd or
  stored raw; optional rotate-left-by-one first (flag ``ROT``), which moves an IEEE sign bit
  out of the exponent byte so the exponent plane compresses better.
* ``XOR`` (3)    ``new ^ base`` on the uint view, then planes.
* ``SUB`` (4)    ``zigzag(new - base)`` (wrapping, on the uint view), then planes.
* ``LIN2`` (5)   two-base linear extrapolation on the integer view: residual
  ``zigzag(new - (2*b1 - b2))`` (wrapping), then planes. ``b1`` is the previous version, ``b2``
  the one before. Pays on smooth trajectories (fine-tuning, closely spaced saves), not on
  optimizer moments.

Bases may be shorter or longer than the chunk: the delta covers the common prefix of whole
elements, the rest is stored as with ``PLANES``.

Payload of codecs 2..5 (format 1)::

    u8 format (=1) | u8 flags | [varint c1: elements delta'd vs base]  (codecs 3, 4, 5)
                   | [varint c2: elements that also use base2]            (codec 5)
                   | per plane: u8 mode (0 raw, 1 zstd), varint stored length
                   | plane data ... | tail (raw_len % width bytes, verbatim)

``encode`` picks the codec by compressing a strided sample (~64 KiB) with every applicable
candidate, then compresses the full chunk once with the winner.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import zstandard

from coralfs.codec import kernels
from coralfs.errors import FormatError

RAW = 0
ZSTD = 1
PLANES = 2
XOR = 3
SUB = 4
LIN2 = 5

FORMAT = 1

# flags byte
ROT = 0x01  # plain (non-delta) elements are rotated left by one bit before the plane split
_KNOWN_FLAGS = ROT

# Explicit little-endian, so payloads (integer deltas, rotations) mean the same on any host.
_UINT = {w: np.dtype(f"<u{w}") for w in (1, 2, 4, 8)}
_SINT = {w: np.dtype(f"<i{w}") for w in (1, 2, 4, 8)}

_MODE_RAW = 0
_MODE_ZSTD = 1

SAMPLE_BYTES = 64 << 10  # bytes of the chunk compressed per candidate when choosing
_SAMPLE_BLOCKS = 16
_RAW_PLANE = 0.985  # a plane whose sampled zstd ratio is above this is stored raw
_BASE_PENALTY = 0.01  # each base a codec needs costs 1% of its estimate (favours short chains)


# --------------------------------------------------------------------------- zstd contexts
# One cache of zstd contexts per thread, for every zstd frame coralfs writes or reads (chunk
# records, their planes, objects): a context is costly to create and not thread-safe.

_tls = threading.local()


def _plane_params(level: int) -> zstandard.ZstdCompressionParameters:
    # Plane streams are mostly literals (exponent bytes, small residuals) plus zero runs. A tiny
    # hash table and min_match 7 stop zstd from emitting short junk matches: measured on real
    # checkpoints this is both smaller (~8%) and ~2x faster than plain level 1 or 3.
    if level <= 5:
        return zstandard.ZstdCompressionParameters.from_level(1, min_match=7, hash_log=7, window_log=20)
    return zstandard.ZstdCompressionParameters.from_level(level, min_match=7)


def zstd_compressor(level: int = 3, planes: bool = False) -> zstandard.ZstdCompressor:
    """This thread's compressor at ``level``; ``planes``: the parameters tuned for byte planes."""
    cache = getattr(_tls, "cctx", None)
    if cache is None:
        cache = _tls.cctx = {}
    key = (planes, level)
    c = cache.get(key)
    if c is None:
        if planes:
            c = zstandard.ZstdCompressor(compression_params=_plane_params(level))
        else:
            c = zstandard.ZstdCompressor(level=level)
        cache[key] = c
    return c


def zstd_decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor."""
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


# --------------------------------------------------------------------------- small helpers


_PyBytes_FromStringAndSize = ctypes.pythonapi.PyBytes_FromStringAndSize
_PyBytes_FromStringAndSize.restype = ctypes.py_object
_PyBytes_FromStringAndSize.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def _new_bytes(n: int) -> tuple[bytes | None, np.ndarray]:
    """A new ``bytes`` of length ``n`` and a writable uint8 array over its buffer, to decode
    into: what C extensions do with ``PyBytes_FromStringAndSize(NULL, n)``. The object is
    fresh (nothing else can see it until it is returned), and filling it in place saves
    copying every decoded chunk once more (``ndarray.tobytes``: ~8% of a mount's first read
    in a profile, bench/RESULTS.md third session)."""
    if n < 2:  # the empty and 1-byte objects are shared singletons: never written into
        return None, np.empty(n, dtype=np.uint8)
    b = _PyBytes_FromStringAndSize(None, n)
    addr = ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value
    return b, np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))


def _norm_width(width: int) -> int:
    return width if width in _UINT else 1


def _bytes_view(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return np.frombuffer(mv, dtype=np.uint8)


def _put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _get_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise FormatError("truncated tensor payload")
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, pos
        shift += 7


# --------------------------------------------------------------------------- bit transforms
# All operate on unsigned arrays; the in-place ones (trailing ``_``) return their argument.


def _zigzag_(x: np.ndarray) -> np.ndarray:
    bits = x.dtype.itemsize * 8
    sign = x.view(_SINT[x.dtype.itemsize]) >> (bits - 1)  # 0 or -1
    x <<= 1
    x ^= sign.view(x.dtype)
    return x


def _unzigzag_(x: np.ndarray) -> np.ndarray:
    low = x & 1
    np.negative(low, out=low)  # 0 or all ones (wrapping)
    x >>= 1
    x ^= low
    return x


def _rotl1(x: np.ndarray) -> np.ndarray:
    bits = x.dtype.itemsize * 8
    r = x >> (bits - 1)
    r |= x << 1
    return r


def _rotr1_(x: np.ndarray) -> np.ndarray:
    """Rotate right by one bit, in place (one temporary)."""
    low = x << (x.dtype.itemsize * 8 - 1)
    x >>= 1
    x |= low
    return x


def _lin2_pred(b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """2*b1 - b2 (wrapping) over len(b1); where b2 is missing the prediction is b1."""
    pred = b1 << 1
    c2 = len(b2)
    pred[:c2] -= b2
    if c2 < len(b1):
        pred[c2:] = b1[c2:]
    return pred


# --------------------------------------------------------------------------- planes


def _split_planes(r: np.ndarray, w: int) -> np.ndarray:
    """(w, n) contiguous uint8 array; row k = byte k (little-endian) of every element."""
    b = r.view(np.uint8)
    if w == 1:
        return b.reshape(1, -1)
    k = kernels.get()
    if k is not None and len(r) and r.flags.aligned and r.flags.c_contiguous:
        planes = np.empty((w, len(r)), dtype=np.uint8)
        k.split[w](r, planes)
        return planes
    return np.ascontiguousarray(b.reshape(-1, w).T)


def _plane_cost(planes: np.ndarray, cctx: zstandard.ZstdCompressor) -> tuple[int, list[bool]]:
    """Compressed size of the sampled planes and, per plane, whether zstd pays."""
    total = 0
    use = []
    for p in planes:
        n = p.nbytes
        if n == 0:
            use.append(False)
            continue
        s = len(cctx.compress(p.data))
        ok = s < n * _RAW_PLANE
        use.append(ok)
        total += s if ok else n
    return total, use


class _Chunk:
    """A chunk viewed as elements (+ tail) with its bases cut to the common prefix."""

    def __init__(self, raw, width: int, base, base2) -> None:
        self.w = w = _norm_width(width)
        self.raw8 = _bytes_view(raw)
        self.raw_len = len(self.raw8)
        self.n = n = self.raw_len // w
        dt = _UINT[w]
        self.u = self.raw8[: n * w].view(dt)
        self.tail = self.raw8[n * w :]
        self.b1 = self.b2 = None
        if base is not None:
            b = _bytes_view(base)
            c1 = min(n, len(b) // w)
            self.b1 = b[: c1 * w].view(dt)
            if base2 is not None and c1:
                b = _bytes_view(base2)
                self.b2 = b[: min(c1, len(b) // w) * w].view(dt)


# --------------------------------------------------------------------------- the codecs


class Codec:
    """A codec: ``id`` (the byte a record header names), ``name`` (what stats and the CLI
    show), ``nbases`` (how many decoded base chunks its decode needs), and how it encodes a
    chunk and decodes a payload."""

    id: int
    name: str
    nbases: int = 0

    def encode(self, ch: _Chunk, level: int = 3, flags: int = 0, use: list[bool] | None = None) -> bytes:
        """The payload of ``ch`` (no fallback to raw). ``flags``, ``use``: plane codecs only."""
        raise NotImplementedError

    def decode(self, payload, raw_len: int, width: int, base=None, base2=None,
               as_array: bool = False) -> bytes | np.ndarray:
        """The chunk's bytes (see the module function ``decode``)."""
        raise NotImplementedError


class Raw(Codec):
    """The data itself (``encode`` of the chooser returns ``(RAW, b"")``: the caller stores the bytes)."""

    id, name = RAW, "raw"

    def encode(self, ch: _Chunk, level: int = 3, flags: int = 0, use: list[bool] | None = None) -> bytes:
        return ch.raw8.tobytes()

    def decode(self, payload, raw_len: int, width: int, base=None, base2=None,
               as_array: bool = False) -> bytes | np.ndarray:
        if len(payload) != raw_len:
            raise FormatError("raw chunk has the wrong length")
        return bytes(payload)


class Zstd(Codec):
    """One plain zstd frame of the whole chunk."""

    id, name = ZSTD, "zstd"

    def encode(self, ch: _Chunk, level: int = 3, flags: int = 0, use: list[bool] | None = None) -> bytes:
        return zstd_compressor(level).compress(ch.raw8.data)

    def decode(self, payload, raw_len: int, width: int, base=None, base2=None,
               as_array: bool = False) -> bytes | np.ndarray:
        try:
            out = zstd_decompressor().decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as e:
            raise FormatError(f"corrupt zstd chunk: {e}") from None
        if len(out) != raw_len:
            raise FormatError("zstd chunk has the wrong length")
        return out


class PlaneCodec(Codec):
    """Byte planes of a residual (payload format 1, see the module docstring). A subclass
    says what the residual is: ``forward`` (elements -> residual) and ``inverse_`` (undo it
    in place), and ``kernel_op``, the compiled loop's code for that inverse."""

    kernel_op: int

    def forward(self, flags: int, u: np.ndarray, b1, b2) -> np.ndarray:
        """Residual elements (same length and dtype as ``u``)."""
        raise NotImplementedError

    def inverse_(self, flags: int, x: np.ndarray, b1, b2) -> None:
        """Undo ``forward`` in place on ``x``."""
        raise NotImplementedError

    def _compiled_inverse(self, k, planes: list[np.ndarray], x: np.ndarray, flags: int, b1, b2, w: int) -> None:
        """Interleave ``planes`` into ``x`` and undo the residual, with the compiled loops ``k``."""
        k.unshuffle[w](*planes, x)
        k.inverse(x, self.kernel_op, bool(flags & ROT), kernels.base(b1, w), kernels.base(b2, w))

    def encode(self, ch: _Chunk, level: int = 3, flags: int = 0, use: list[bool] | None = None) -> bytes:
        """``use``: per-plane zstd decision (None = try zstd on all)."""
        r = self.forward(flags, ch.u, ch.b1, ch.b2)
        planes = _split_planes(r, ch.w)
        cctx = zstd_compressor(level, planes=True)
        head = bytearray((FORMAT, flags))
        if self.nbases >= 1:
            _put_varint(head, len(ch.b1))
        if self.nbases >= 2:
            _put_varint(head, len(ch.b2))
        parts: list = [head]
        for k, p in enumerate(planes):
            data = p.data
            mode = _MODE_RAW
            if p.nbytes and (use is None or use[k]):
                z = cctx.compress(data)
                if len(z) < p.nbytes:
                    data, mode = z, _MODE_ZSTD
            head.append(mode)
            _put_varint(head, len(data))
            parts.append(data)
        parts.append(ch.tail.data)
        return b"".join(parts)

    def decode(self, payload, raw_len: int, width: int, base=None, base2=None,
               as_array: bool = False) -> bytes | np.ndarray:
        need = self.nbases
        if need >= 1 and base is None or need >= 2 and base2 is None:
            raise ValueError(f"codec {self.id} needs {need} base(s)")

        w = _norm_width(width)
        n = raw_len // w
        dt = _UINT[w]
        buf = memoryview(payload)
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        if len(buf) < 2 or buf[0] != FORMAT:
            raise FormatError(f"unsupported tensor payload format {buf[0] if len(buf) else None}")
        flags = buf[1]
        if flags & ~_KNOWN_FLAGS:
            raise FormatError(f"unknown tensor payload flags {flags:#x}")
        pos = 2
        b1 = b2 = None
        if need >= 1:
            c1, pos = _get_varint(buf, pos)
            b = _bytes_view(base)
            if c1 > n or len(b) < c1 * w:
                raise FormatError("tensor delta longer than its chunk or base")
            b1 = b[: c1 * w].view(dt)
        if need >= 2:
            c2, pos = _get_varint(buf, pos)
            b = _bytes_view(base2)
            if c2 > len(b1) or len(b) < c2 * w:
                raise FormatError("tensor delta longer than its second base")
            b2 = b[: c2 * w].view(dt)
        dirs = []
        for _ in range(w):
            if pos >= len(buf):
                raise FormatError("truncated tensor payload")
            mode = buf[pos]
            size, pos = _get_varint(buf, pos + 1)
            dirs.append((mode, size))
        tail_len = raw_len - n * w
        if pos + sum(s for _, s in dirs) + tail_len != len(buf):
            raise FormatError("tensor payload has the wrong length")

        out_bytes, out = (None, np.empty(raw_len, dtype=np.uint8)) if as_array else _new_bytes(raw_len)
        fill_bytes = not as_array
        dctx = zstd_decompressor()
        planes = []
        for mode, size in dirs:
            data = buf[pos : pos + size]
            pos += size
            if mode == _MODE_ZSTD:
                try:
                    data = dctx.decompress(data, max_output_size=n)
                except zstandard.ZstdError as e:
                    raise FormatError(f"corrupt tensor plane: {e}") from None
            elif mode != _MODE_RAW:
                raise FormatError(f"unknown plane mode {mode}")
            if len(data) != n:
                raise FormatError("tensor plane has the wrong length")
            plane = np.frombuffer(data, dtype=np.uint8)
            plane.flags.writeable = False  # one compiled signature for raw and zstd planes
            planes.append(plane)
        if tail_len:
            out[n * w :] = np.frombuffer(buf[pos:], dtype=np.uint8)
        x = out[: n * w].view(dt)
        k = kernels.get()
        if k is not None and w > 1 and n:
            self._compiled_inverse(k, planes, x, flags, b1, b2, w)
        else:
            body = out[: n * w].reshape(n, w)
            for i, plane in enumerate(planes):
                body[:, i] = plane
            self.inverse_(flags, x, b1, b2)
        if not fill_bytes:
            return out
        return out_bytes if out_bytes is not None else out.tobytes()


class Planes(PlaneCodec):
    """The elements themselves (rotated left by one bit with ``ROT``)."""

    id, name, kernel_op = PLANES, "planes", kernels.OP_NONE

    def forward(self, flags: int, u: np.ndarray, b1, b2) -> np.ndarray:
        return _rotl1(u) if flags & ROT else u

    def inverse_(self, flags: int, x: np.ndarray, b1, b2) -> None:
        if len(x) and flags & ROT:
            _rotr1_(x)

    def _compiled_inverse(self, k, planes: list[np.ndarray], x: np.ndarray, flags: int, b1, b2, w: int) -> None:
        (k.unshuffle_rot if flags & ROT else k.unshuffle)[w](*planes, x)  # a keyframe: one pass


class _Delta(PlaneCodec):
    """A residual against the base(s) over the elements they cover (``len(b1)``); the rest of
    the chunk's elements as ``Planes`` has them."""

    nbases = 1

    def residual(self, u: np.ndarray, b1: np.ndarray, b2, out: np.ndarray) -> None:
        """``out`` = the residual of ``u`` (as long as ``b1``)."""
        raise NotImplementedError

    def restore_(self, x: np.ndarray, b1: np.ndarray, b2) -> None:
        """Undo ``residual`` in place on ``x`` (as long as ``b1``)."""
        raise NotImplementedError

    def forward(self, flags: int, u: np.ndarray, b1, b2) -> np.ndarray:
        c1 = len(b1)
        r = np.empty_like(u)
        self.residual(u[:c1], b1, b2, r[:c1])
        if c1 < len(u):
            r[c1:] = _rotl1(u[c1:]) if flags & ROT else u[c1:]
        return r

    def inverse_(self, flags: int, x: np.ndarray, b1, b2) -> None:
        c1 = len(b1)
        if c1 < len(x) and flags & ROT:
            _rotr1_(x[c1:])
        if c1:
            self.restore_(x[:c1], b1, b2)


class XorDelta(_Delta):
    """``new ^ base``."""

    id, name, kernel_op = XOR, "xor-delta", kernels.OP_XOR

    def residual(self, u: np.ndarray, b1: np.ndarray, b2, out: np.ndarray) -> None:
        np.bitwise_xor(u, b1, out=out)

    def restore_(self, x: np.ndarray, b1: np.ndarray, b2) -> None:
        x ^= b1


class SubDelta(_Delta):
    """``zigzag(new - base)``, wrapping."""

    id, name, kernel_op = SUB, "sub-delta", kernels.OP_SUB

    def residual(self, u: np.ndarray, b1: np.ndarray, b2, out: np.ndarray) -> None:
        np.subtract(u, b1, out=out)
        _zigzag_(out)

    def restore_(self, x: np.ndarray, b1: np.ndarray, b2) -> None:
        _unzigzag_(x)
        x += b1


class Lin2(_Delta):
    """``zigzag(new - (2*b1 - b2))``, wrapping: two-base linear extrapolation."""

    id, name, kernel_op, nbases = LIN2, "lin2", kernels.OP_LIN2, 2

    def residual(self, u: np.ndarray, b1: np.ndarray, b2, out: np.ndarray) -> None:
        np.subtract(u, _lin2_pred(b1, b2), out=out)
        _zigzag_(out)

    def restore_(self, x: np.ndarray, b1: np.ndarray, b2) -> None:
        _unzigzag_(x)
        x += _lin2_pred(b1, b2)


#: The one table of codecs, by id: every id a record header may name.
CODECS: dict[int, Codec] = {c.id: c for c in (Raw(), Zstd(), Planes(), XorDelta(), SubDelta(), Lin2())}
_PLANE_CODECS = tuple(c for c in CODECS.values() if isinstance(c, PlaneCodec))


def by_id(codec_id: int) -> Codec:
    """The codec with this id (``FormatError`` for an id no version of coralfs wrote)."""
    try:
        return CODECS[codec_id]
    except KeyError:
        raise FormatError(f"unknown codec id {codec_id}") from None


def uses_bases(codec_id: int) -> int:
    """0, 1 or 2: how many bases ``decode`` needs for ``codec_id``."""
    return by_id(codec_id).nbases


# --------------------------------------------------------------------------- encode


def _sample_index(n: int, w: int) -> np.ndarray | None:
    """Indices of ~SAMPLE_BYTES worth of elements in evenly spaced contiguous blocks (None = all)."""
    if n * w <= 2 * SAMPLE_BYTES:
        return None
    blk = max(1, SAMPLE_BYTES // (_SAMPLE_BLOCKS * w))
    starts = np.linspace(0, n - blk, _SAMPLE_BLOCKS).astype(np.int64)
    return (starts[:, None] + np.arange(blk, dtype=np.int64)).reshape(-1)


def _candidates(ch: _Chunk) -> list[tuple[PlaneCodec, int]]:
    """The plane codecs ``ch``'s bases allow, with their flags, in id order (``PLANES`` also rotated)."""
    have = 0 if ch.b1 is None or not len(ch.b1) else 1 if ch.b2 is None or not len(ch.b2) else 2
    out: list[tuple[PlaneCodec, int]] = []
    for c in _PLANE_CODECS:
        if c.nbases <= have:
            out.append((c, 0))
            if c.id == PLANES and ch.w > 1:
                out.append((c, ROT))
    return out


def encode(
    raw: bytes | memoryview,
    width: int,
    base: bytes | None = None,
    base2: bytes | None = None,
    level: int = 3,
) -> tuple[int, bytes]:
    """Choose the cheapest lossless encoding and return ``(codec_id, payload)``.

    Candidates: raw, plain zstd at ``level``, PLANES (always), XOR/SUB (with ``base``), LIN2
    (with ``base`` and ``base2``). The choice is made on a ~64 KiB strided sample; the full
    chunk is then compressed once with the winner. ``(0, b"")`` means "store raw".
    Each base a codec needs adds 1% to its estimate, so a delta is only chosen when it really
    pays (keeps chains short when it does not).
    """
    ch = _Chunk(raw, width, base, base2)
    if ch.raw_len == 0:
        return RAW, b""
    w, n = ch.w, ch.n
    idx = _sample_index(n, w)
    if idx is None:
        s = ch
        scale = 1.0
        sample_raw = ch.raw8
    else:
        s = _Chunk.__new__(_Chunk)
        s.w, s.n = w, len(idx)
        s.u = ch.u[idx]
        s.tail = ch.tail[:0]
        s.b1 = s.b2 = None
        if ch.b1 is not None:
            c1 = int(np.searchsorted(idx, len(ch.b1)))
            s.b1 = ch.b1[idx[:c1]]
            if ch.b2 is not None:
                s.b2 = ch.b2[idx[: int(np.searchsorted(idx, len(ch.b2)))]]
        scale = n / len(idx)
        sample_raw = s.u.view(np.uint8)

    overhead = 4 + 4 * w + len(ch.tail)
    # (estimated size, number of bases, codec, flags, per-plane zstd use)
    est: list[tuple[float, int, Codec, int, list | None]] = [(float(ch.raw_len), 0, CODECS[RAW], 0, None)]
    zs = len(zstd_compressor(level).compress(sample_raw.data))
    est.append((zs * (ch.raw_len / max(1, len(sample_raw))) + 16, 0, CODECS[ZSTD], 0, None))
    pcctx = zstd_compressor(level, planes=True)
    rot_wins = False
    for c, flags in _candidates(ch):
        if c.id != PLANES and rot_wins:
            flags |= ROT
        cost, use = _plane_cost(_split_planes(c.forward(flags, s.u, s.b1, s.b2), w), pcctx)
        e = cost * scale + overhead
        if c.id == PLANES and flags & ROT and e < est[-1][0]:
            rot_wins = True
        est.append((e, c.nbases, c, flags, use))

    best = min(est, key=lambda t: t[0] * (1.0 + _BASE_PENALTY * t[1]))
    _, _, c, flags, use = best
    if c.id == RAW:
        return RAW, b""
    payload = c.encode(ch, level, flags, use if idx is not None else None)
    if len(payload) >= ch.raw_len:
        return RAW, b""
    return c.id, payload


def _encode_with(
    codec_id: int,
    raw: bytes | memoryview,
    width: int,
    base: bytes | None = None,
    base2: bytes | None = None,
    level: int = 3,
    flags: int = 0,
) -> bytes:
    """Payload for a forced codec (tests, benchmarks). No fallback to raw."""
    ch = _Chunk(raw, width, base, base2)
    c = CODECS.get(codec_id)
    if c is None:
        raise ValueError(f"unknown tensor codec {codec_id}")
    if isinstance(c, PlaneCodec):
        if flags & ~_KNOWN_FLAGS:
            raise ValueError(f"unknown flags {flags:#x}")
        need = c.nbases
        if need >= 1 and base is None or need >= 2 and base2 is None:
            raise ValueError(f"codec {codec_id} needs {need} base(s)")
        if need >= 2 and ch.b2 is None:  # LIN2 with a base shorter than one element
            ch.b2 = ch.b1[:0]
    return c.encode(ch, level, flags)


# --------------------------------------------------------------------------- decode


def decode(
    codec_id: int,
    payload: bytes,
    raw_len: int,
    width: int,
    base: bytes | np.ndarray | None = None,
    base2: bytes | np.ndarray | None = None,
    as_array: bool = False,
) -> bytes | np.ndarray:
    """Exact inverse of ``encode``. For codec 0 the caller passes the raw bytes as payload.
    ``as_array``: a plane codec returns its uint8 array as is (no copy into ``bytes``); for
    a decode whose result only serves as another chunk's base."""
    return by_id(codec_id).decode(payload, raw_len, width, base, base2, as_array)
