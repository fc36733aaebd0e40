"""Compiled inner loops for the tensor codec (numba), with the numpy code as the fallback.

The tensor codec (``coralfs.codec.tensor``) spends most of a decode interleaving byte
planes back into elements and undoing the delta (``body[:, k] = plane`` is a strided byte
copy numpy does one byte at a time, then two or three more passes over the chunk), and
most of an encode doing the reverse. These loops do each job in one or two vectorized passes and release the GIL, so
the read-ahead threads decode on both cores. They are integer-only, like the numpy code
they replace, and tests check both produce the same bytes for every codec, width, flag and
base length (``tests/test_kernels.py``).

numba compiles on first use and caches the machine code next to this file (or in the
user's cache directory when that is not writable): the very first use on a machine pays
the compile (a few seconds), every later process ~0.5 s of CPU to load it. So only
long-lived processes load them: the mount daemon (it starts loading them at once and
reports "mounted" when they are ready), any process with ``CORALFS_JIT=1``.
``CORALFS_JIT=0`` means numpy only everywhere; so does a missing or broken numba.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np

_lock = threading.Lock()
_done = threading.Event()
_loaded: Any = None  # None: not tried; False: unavailable; else the namespace of kernels

# op codes of a plane codec's inverse (each plane codec of coralfs.codec.tensor names its own: kernel_op)
OP_NONE = 0  # PLANES
OP_XOR = 1
OP_SUB = 2
OP_LIN2 = 3


def _build() -> Any:
    import numba  # noqa: F401  (ImportError -> numpy fallback)
    from numba import njit

    U = np.uint64
    opts = {"nogil": True, "cache": True, "boundscheck": False}

    @njit(**opts)
    def unshuffle2(p0, p1, out):  # out: uint16 elements
        for i in range(out.shape[0]):
            out[i] = U(p0[i]) | (U(p1[i]) << U(8))

    @njit(**opts)
    def unshuffle4(p0, p1, p2, p3, out):  # out: uint32 elements
        for i in range(out.shape[0]):
            out[i] = U(p0[i]) | (U(p1[i]) << U(8)) | (U(p2[i]) << U(16)) | (U(p3[i]) << U(24))

    @njit(**opts)
    def unshuffle2r(p0, p1, out):  # unshuffle2, then rotate each element right by one bit
        for i in range(out.shape[0]):
            v = U(p0[i]) | (U(p1[i]) << U(8))
            out[i] = (v >> U(1)) | ((v & U(1)) << U(15))

    @njit(**opts)
    def unshuffle4r(p0, p1, p2, p3, out):
        for i in range(out.shape[0]):
            v = U(p0[i]) | (U(p1[i]) << U(8)) | (U(p2[i]) << U(16)) | (U(p3[i]) << U(24))
            out[i] = (v >> U(1)) | ((v & U(1)) << U(31))

    @njit(**opts)
    def unshuffle8r(p0, p1, p2, p3, p4, p5, p6, p7, out):
        for i in range(out.shape[0]):
            lo = U(p0[i]) | (U(p1[i]) << U(8)) | (U(p2[i]) << U(16)) | (U(p3[i]) << U(24))
            hi = U(p4[i]) | (U(p5[i]) << U(8)) | (U(p6[i]) << U(16)) | (U(p7[i]) << U(24))
            v = lo | (hi << U(32))
            out[i] = (v >> U(1)) | (v << U(63))

    @njit(**opts)
    def unshuffle8(p0, p1, p2, p3, p4, p5, p6, p7, out):  # out: uint64 elements
        for i in range(out.shape[0]):
            lo = U(p0[i]) | (U(p1[i]) << U(8)) | (U(p2[i]) << U(16)) | (U(p3[i]) << U(24))
            hi = U(p4[i]) | (U(p5[i]) << U(8)) | (U(p6[i]) << U(16)) | (U(p7[i]) << U(24))
            out[i] = lo | (hi << U(32))

    @njit(**opts)
    def split2(u, planes):  # u: uint16 elements -> planes (2, n)
        for i in range(u.shape[0]):
            v = U(u[i])
            planes[0, i] = v & U(255)
            planes[1, i] = v >> U(8)

    @njit(**opts)
    def split4(u, planes):
        for i in range(u.shape[0]):
            v = U(u[i])
            planes[0, i] = v & U(255)
            planes[1, i] = (v >> U(8)) & U(255)
            planes[2, i] = (v >> U(16)) & U(255)
            planes[3, i] = v >> U(24)

    @njit(**opts)
    def split8(u, planes):
        for i in range(u.shape[0]):
            v = U(u[i])
            for k in range(8):
                planes[k, i] = (v >> U(8 * k)) & U(255)

    # Arithmetic runs in uint64 (the element is zero-extended); storing into the element
    # array truncates, which is exactly wrapping arithmetic modulo 2**bits.
    @njit(**opts)
    def inverse(x, op, rot, b1, b2):
        n = x.shape[0]
        one = U(1)
        zero = U(0)
        top = U(x.itemsize * 8 - 1)
        c1 = 0 if op == 0 else b1.shape[0]
        if op == 1:
            for i in range(c1):
                x[i] = U(x[i]) ^ U(b1[i])
        elif op == 2:
            for i in range(c1):
                v = U(x[i])
                x[i] = ((v >> one) ^ (zero - (v & one))) + U(b1[i])
        elif op == 3:
            c2 = b2.shape[0]
            for i in range(c2):
                v = U(x[i])
                x[i] = ((v >> one) ^ (zero - (v & one))) + (U(b1[i]) << one) - U(b2[i])
            for i in range(c2, c1):
                v = U(x[i])
                x[i] = ((v >> one) ^ (zero - (v & one))) + U(b1[i])
        if rot:
            for i in range(c1, n):
                v = U(x[i])
                x[i] = (v >> one) | (v << top)

    class K:
        pass

    k = K()
    k.unshuffle = {2: unshuffle2, 4: unshuffle4, 8: unshuffle8}
    k.unshuffle_rot = {2: unshuffle2r, 4: unshuffle4r, 8: unshuffle8r}  # a keyframe's whole inverse
    k.split = {2: split2, 4: split4, 8: split8}
    k.inverse = inverse
    return k


def _warm(k: Any) -> None:
    """Load every kernel's machine code (from numba's cache, or compile it) by calling it once."""
    for w in (2, 4, 8):
        p = np.zeros(2, dtype=np.uint8)
        p.flags.writeable = False
        x = np.zeros(2, dtype=f"<u{w}")
        k.unshuffle[w](*([p] * w), x)
        k.unshuffle_rot[w](*([p] * w), x)
        e = empty(w)
        k.inverse(x, OP_NONE, True, e, e)
        planes = np.zeros((w, 2), dtype=np.uint8)
        k.split[w](x, planes)
        x.flags.writeable = False
        k.split[w](x, planes)


def load() -> Any:
    """The compiled kernels, loading them now if needed (about 0.5 s the first time in a
    process); None when numba is missing or ``CORALFS_JIT=0``."""
    global _loaded
    with _lock:
        if _loaded is None:
            if os.environ.get("CORALFS_JIT", "1") == "0":
                _loaded = False
            else:
                try:
                    k = _build()
                    _warm(k)
                    _loaded = k
                except ImportError:
                    _loaded = False
                except Exception as e:  # a broken numba install must not break reading: numpy it is
                    logging.getLogger(__name__).warning("compiled decode loops unavailable (%s: %s); using numpy",
                                                        type(e).__name__, e)
                    _loaded = False
                finally:
                    _done.set()
    return _loaded or None


def wait(timeout: float | None = None) -> bool:
    """Wait for a load started by :func:`load_in_background`; True once loaded."""
    if _started:
        _done.wait(timeout)
    return bool(_loaded)


def get() -> Any:
    """The compiled kernels if this process has loaded them, else None (use numpy).

    Never waits for the compiler, except with ``CORALFS_JIT=1``, which loads them at the
    first call: loading costs ~0.5 s of CPU (more the first time on a machine), which a
    short command would spend mostly contending with its own decoding. Long-lived
    processes opt in: the mount daemon calls :func:`load_in_background` at start."""
    if _loaded is None and os.environ.get("CORALFS_JIT") == "1":
        load()
    return _loaded or None


def load_in_background() -> None:
    """Start :func:`load` on a daemon thread (once); decoding uses numpy until it is done."""
    global _started
    with _lock:
        if _started or _loaded is not None:
            return
        _started = True
    threading.Thread(target=load, name="coralfs-jit", daemon=True).start()


_started = False
_EMPTY = {w: np.empty(0, dtype=f"<u{w}") for w in (1, 2, 4, 8)}


def empty(w: int) -> np.ndarray:
    """A read-only empty base of element width ``w`` (keeps the compiled signatures few)."""
    a = _EMPTY[w]
    a.flags.writeable = False
    return a


def base(b: np.ndarray | None, w: int) -> np.ndarray:
    """``b`` as the kernels take a base: read-only, aligned, contiguous (empty for none)."""
    if b is None:
        return empty(w)
    if not (b.flags.aligned and b.flags.c_contiguous):
        b = b.copy()
    b.flags.writeable = False
    return b
