"""libfuse 3's low-level API through ctypes: the session, the operation table, replies and
kernel notifications.

Why not mfusepy's ``FUSE``/``Operations``: that is libfuse's *high-level* API, which names
files by path and lets libfuse keep one kernel inode per path. Every version of a branch
file then shares one inode, so one page cache and one ``i_size``: a reader that opened
version 0 read version 0's bytes cut at version 1's size once a commit moved the branch
(a read must never return wrong bytes). The low-level API lets the filesystem choose the inode of
every lookup, so each version of a file gets its own inode (see :mod:`coralfs.mount.nodes`).
mfusepy has no low-level binding; it still loads libfuse for us (the same library search,
``FUSE_LIBRARY_PATH``, the libfuse 3 preference of :func:`load_mfusepy`) and
provides the ABI-aware structures (``fuse_file_info`` across libfuse 3 minor versions,
``struct stat``, ``struct statvfs``, ``fuse_conn_info``), which are reused here.

The operation table follows ``struct fuse_lowlevel_ops`` of libfuse 3.x (fuse_lowlevel.h;
the order has been stable since 3.0; fields past the ones libfuse knows are never read,
``op_size`` says how many we pass). Every callback must reply exactly once; the
adapter's dispatcher (``CoralFS._guard`` in :mod:`coralfs.mount.fuse_ops`) guarantees that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

from coralfs.errors import CoralError

c_ino = ctypes.c_uint64
c_req = ctypes.c_void_p
c_mode = ctypes.c_uint32
c_off = ctypes.c_int64
c_dev = ctypes.c_uint64

FUSE_ROOT_ID = 1

# setattr's to_set
SET_ATTR_MODE = 1 << 0
SET_ATTR_UID = 1 << 1
SET_ATTR_GID = 1 << 2
SET_ATTR_SIZE = 1 << 3
SET_ATTR_ATIME = 1 << 4
SET_ATTR_MTIME = 1 << 5
SET_ATTR_ATIME_NOW = 1 << 7
SET_ATTR_MTIME_NOW = 1 << 8
SET_ATTR_CTIME = 1 << 10

# capabilities (fuse_common.h)
CAP_ASYNC_READ = 1 << 0
CAP_POSIX_LOCKS = 1 << 1
CAP_ATOMIC_O_TRUNC = 1 << 3
CAP_EXPORT_SUPPORT = 1 << 4
CAP_DONT_MASK = 1 << 6
CAP_SPLICE_WRITE = 1 << 7
CAP_SPLICE_MOVE = 1 << 8
CAP_SPLICE_READ = 1 << 9
CAP_FLOCK_LOCKS = 1 << 10
CAP_AUTO_INVAL_DATA = 1 << 12
CAP_READDIRPLUS = 1 << 13
CAP_READDIRPLUS_AUTO = 1 << 14
CAP_ASYNC_DIO = 1 << 15
CAP_WRITEBACK_CACHE = 1 << 16
CAP_PARALLEL_DIROPS = 1 << 18
CAP_EXPLICIT_INVAL_DATA = 1 << 25

BUF_IS_FD = 1 << 1


# ------------------------------------------------------------------ loading libfuse 3 (through mfusepy)
def _find_libfuse3() -> str | None:
    name = ctypes.util.find_library("fuse3")
    if name:
        return name
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
              "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib64", "/lib"):
        p = os.path.join(d, "libfuse3.so.3")
        if os.path.exists(p):
            return p
    return None


def load_mfusepy() -> Any:
    """Import mfusepy bound to libfuse 3 (it would pick libfuse 2 if both are installed)."""
    if "mfusepy" not in sys.modules and not os.environ.get("FUSE_LIBRARY_PATH"):
        lib = _find_libfuse3()
        if lib is None:
            raise CoralError("libfuse 3 is not installed (apt-get install fuse3)")
        os.environ["FUSE_LIBRARY_PATH"] = lib
        try:
            import mfusepy
        finally:
            del os.environ["FUSE_LIBRARY_PATH"]
    else:
        try:
            import mfusepy
        except OSError as e:
            raise CoralError(f"cannot load libfuse: {e}") from e
    if mfusepy.fuse_version_major != 3:
        raise CoralError(f"mfusepy is bound to libfuse {mfusepy.fuse_version_major}."
                         f"{mfusepy.fuse_version_minor} ({mfusepy._libfuse_path}); coralfs needs libfuse 3 "
                         "(unset FUSE_LIBRARY_PATH, or load it through coralfs.mount.fuse_ll before mfusepy)")
    return mfusepy


# ------------------------------------------------------------------ structures and functions
class FuseBuf(ctypes.Structure):  # struct fuse_buf
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p), ("fd", ctypes.c_int),
                ("pos", c_off)]


class FuseBufvec(ctypes.Structure):  # struct fuse_bufvec: the buffers follow inline
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", FuseBuf * 1)]


class FuseCtx(ctypes.Structure):  # struct fuse_ctx
    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("pid", ctypes.c_int32),
                ("umask", c_mode)]


class ForgetData(ctypes.Structure):  # struct fuse_forget_data
    _fields_ = [("ino", c_ino), ("nlookup", ctypes.c_uint64)]


class FuseArgs(ctypes.Structure):  # struct fuse_args
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)), ("allocated", ctypes.c_int)]


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Binding:
    """The structures and functions of one loaded libfuse 3 (from mfusepy's loader)."""

    def __init__(self, mfusepy: Any) -> None:
        self.lib = lib = mfusepy._libfuse
        self.minor = int(mfusepy.fuse_version_minor)
        FileInfo = self.FileInfo = mfusepy.fuse_file_info  # noqa: N806
        Stat = self.Stat = mfusepy.c_stat  # noqa: N806
        self.Statvfs = mfusepy.c_statvfs
        self.ConnInfo = mfusepy.fuse_conn_info
        fi_p = ctypes.POINTER(FileInfo)

        class EntryParam(ctypes.Structure):  # struct fuse_entry_param
            _fields_ = [("ino", c_ino), ("generation", ctypes.c_uint64), ("attr", Stat),
                        ("attr_timeout", ctypes.c_double), ("entry_timeout", ctypes.c_double)]

        self.EntryParam = EntryParam
        V = None  # noqa: N806 (void)
        F = ctypes.CFUNCTYPE  # noqa: N806
        s = ctypes.c_char_p
        self.ops_fields: list[tuple[str, Any]] = [
            ("init", F(V, ctypes.c_void_p, ctypes.POINTER(self.ConnInfo))),
            ("destroy", F(V, ctypes.c_void_p)),
            ("lookup", F(V, c_req, c_ino, s)),
            ("forget", F(V, c_req, c_ino, ctypes.c_uint64)),
            ("getattr", F(V, c_req, c_ino, fi_p)),
            ("setattr", F(V, c_req, c_ino, ctypes.POINTER(Stat), ctypes.c_int, fi_p)),
            ("readlink", F(V, c_req, c_ino)),
            ("mknod", F(V, c_req, c_ino, s, c_mode, c_dev)),
            ("mkdir", F(V, c_req, c_ino, s, c_mode)),
            ("unlink", F(V, c_req, c_ino, s)),
            ("rmdir", F(V, c_req, c_ino, s)),
            ("symlink", F(V, c_req, s, c_ino, s)),
            ("rename", F(V, c_req, c_ino, s, c_ino, s, ctypes.c_uint)),
            ("link", F(V, c_req, c_ino, c_ino, s)),
            ("open", F(V, c_req, c_ino, fi_p)),
            ("read", F(V, c_req, c_ino, ctypes.c_size_t, c_off, fi_p)),
            ("write", F(V, c_req, c_ino, ctypes.c_void_p, ctypes.c_size_t, c_off, fi_p)),
            ("flush", F(V, c_req, c_ino, fi_p)),
            ("release", F(V, c_req, c_ino, fi_p)),
            ("fsync", F(V, c_req, c_ino, ctypes.c_int, fi_p)),
            ("opendir", F(V, c_req, c_ino, fi_p)),
            ("readdir", F(V, c_req, c_ino, ctypes.c_size_t, c_off, fi_p)),
            ("releasedir", F(V, c_req, c_ino, fi_p)),
            ("fsyncdir", F(V, c_req, c_ino, ctypes.c_int, fi_p)),
            ("statfs", F(V, c_req, c_ino)),
            ("setxattr", F(V, c_req, c_ino, s, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)),
            ("getxattr", F(V, c_req, c_ino, s, ctypes.c_size_t)),
            ("listxattr", F(V, c_req, c_ino, ctypes.c_size_t)),
            ("removexattr", F(V, c_req, c_ino, s)),
            ("access", F(V, c_req, c_ino, ctypes.c_int)),
            ("create", F(V, c_req, c_ino, s, c_mode, fi_p)),
            ("getlk", ctypes.c_void_p),
            ("setlk", ctypes.c_void_p),
            ("bmap", ctypes.c_void_p),
            ("ioctl", ctypes.c_void_p),
            ("poll", ctypes.c_void_p),
            ("write_buf", F(V, c_req, c_ino, ctypes.POINTER(FuseBufvec), c_off, fi_p)),
            ("retrieve_reply", ctypes.c_void_p),
            ("forget_multi", F(V, c_req, ctypes.c_size_t, ctypes.POINTER(ForgetData))),
            ("flock", ctypes.c_void_p),
            ("fallocate", F(V, c_req, c_ino, ctypes.c_int, c_off, c_off, fi_p)),
        ]

        class Ops(ctypes.Structure):
            _fields_ = self.ops_fields

        self.Ops = Ops
        vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        sig = {
            "fuse_session_new": (vp, [ctypes.POINTER(FuseArgs), ctypes.POINTER(Ops), sz, vp]),
            "fuse_session_mount": (i, [vp, s]),
            "fuse_session_unmount": (None, [vp]),
            "fuse_session_destroy": (None, [vp]),
            "fuse_session_exit": (None, [vp]),
            "fuse_session_exited": (i, [vp]),
            "fuse_session_fd": (i, [vp]),
            "fuse_set_signal_handlers": (i, [vp]),
            "fuse_remove_signal_handlers": (None, [vp]),
            "fuse_reply_err": (i, [c_req, i]),
            "fuse_reply_none": (None, [c_req]),
            "fuse_reply_entry": (i, [c_req, ctypes.POINTER(EntryParam)]),
            "fuse_reply_create": (i, [c_req, ctypes.POINTER(EntryParam), fi_p]),
            "fuse_reply_attr": (i, [c_req, ctypes.POINTER(Stat), ctypes.c_double]),
            "fuse_reply_open": (i, [c_req, fi_p]),
            "fuse_reply_write": (i, [c_req, sz]),
            "fuse_reply_buf": (i, [c_req, vp, sz]),
            "fuse_reply_iov": (i, [c_req, ctypes.POINTER(Iovec), i]),
            "fuse_reply_statfs": (i, [c_req, ctypes.POINTER(self.Statvfs)]),
            "fuse_reply_xattr": (i, [c_req, sz]),
            "fuse_add_direntry": (sz, [c_req, vp, sz, s, ctypes.POINTER(Stat), c_off]),
            "fuse_req_ctx": (ctypes.POINTER(FuseCtx), [c_req]),
            "fuse_lowlevel_notify_inval_entry": (i, [vp, c_ino, s, sz]),
            "fuse_lowlevel_notify_inval_inode": (i, [vp, c_ino, c_off, c_off]),
            "fuse_lowlevel_notify_delete": (i, [vp, c_ino, c_ino, s, sz]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.loop_cfg = hasattr(lib, "fuse_loop_cfg_create")
        if self.loop_cfg:  # libfuse >= 3.12
            lib.fuse_loop_cfg_create.restype = vp
            lib.fuse_loop_cfg_create.argtypes = []
            lib.fuse_loop_cfg_destroy.argtypes = [vp]
            lib.fuse_loop_cfg_set_idle_threads.argtypes = [vp, ctypes.c_uint]
            lib.fuse_loop_cfg_set_max_threads.argtypes = [vp, ctypes.c_uint]
            lib.fuse_loop_cfg_set_clone_fd.argtypes = [vp, ctypes.c_uint]
            self._loop = lib.fuse_session_loop_mt_312
            self._loop.argtypes = [vp, vp]
        else:
            self._loop = lib.fuse_session_loop_mt_31
            self._loop.argtypes = [vp, i]
        self._loop.restype = i

    def loop_mt(self, se: int, max_idle_threads: int, max_threads: int) -> int:
        """``fuse_session_loop_mt`` (blocks, the GIL released, until the session ends)."""
        if not self.loop_cfg:
            return int(self._loop(se, 0))
        cfg = self.lib.fuse_loop_cfg_create()
        try:
            self.lib.fuse_loop_cfg_set_clone_fd(cfg, 0)
            self.lib.fuse_loop_cfg_set_idle_threads(cfg, max_idle_threads)
            self.lib.fuse_loop_cfg_set_max_threads(cfg, max_threads)
            return int(self._loop(se, cfg))
        finally:
            self.lib.fuse_loop_cfg_destroy(cfg)

    def make_args(self, argv: list[str]) -> tuple[FuseArgs, Any]:
        """A ``struct fuse_args`` (and the buffers it points at, to keep alive)."""
        raw = [a.encode("utf-8", "surrogateescape") for a in argv]
        arr = (ctypes.c_char_p * (len(raw) + 1))(*raw, None)
        return FuseArgs(len(raw), arr, 0), (arr, raw)
