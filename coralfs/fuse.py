"""The FUSE mount: a thin mfusepy adapter over :class:`coralfs.mountview.MountView`.

``mount(repo, mountpoint)`` makes every branch, commit and tag of a repository a
directory (see :mod:`coralfs.mountview` for the layout); ``umount(mountpoint)`` undoes it.

How it stays fast and correct:

* libfuse 3, chosen explicitly (mfusepy prefers libfuse 2 when both are installed),
  multithreaded: reads of different files run in parallel (zstd, numpy and BLAKE3
  release the GIL while a chunk is decoded and verified).
* Long attribute/entry timeouts. Paths under ``@commits`` never change; branch and tag
  directories do, so a watcher thread polls the refs (one short LMDB read transaction
  per ``refresh_interval``) and invalidates, in the kernel, every path of a branch or
  tag that moved. ``negative_timeout`` is 0, so new branches, commits and files show
  up at once. Until a moved ref has been invalidated, opens under it use direct I/O
  (the kernel's cached size may be the old one).
* Page cache: ``keep_cache`` on every open under ``@commits``; elsewhere only when the
  file's content is unchanged since the last open of that path. The kernel keeps one
  page cache per path, so while a reader of an older version of a branch file has it
  open, a newer version of that path is opened with direct I/O: each reader keeps
  reading exactly the version it opened. The kernel's automatic invalidation on mtime
  changes is off (we invalidate explicitly), so re-reads come from the page cache.
* A large ``st_blksize`` (1 MiB) so readers issue large reads; each read returns one
  ``bytes`` sliced from the repository's decoded-chunk cache (one decode per chunk at a
  time; sequential readers get the next chunks decoded ahead). Kernel readahead on the
  mount is raised to ``READAHEAD_KB`` (root only). ``direct_io`` is off by default (it
  defeats the page cache and shared mmap); ``--direct-io`` opts in.
* The compiled decode loops (:mod:`coralfs.kernels`, numba) load on a thread from the
  daemon's start; ``mount`` returns once they are ready (~0.4 s more than without).
* glibc ``mallopt(M_MMAP_THRESHOLD=64 MiB, M_TRIM_THRESHOLD=512 MiB, M_ARENA_MAX=1)`` at
  start-up: without it 1 MiB requests churn ``mmap``/``brk`` and stall. Then 256 MiB of heap
  (the decoded-chunk cache's size) is faulted in and freed: a fresh mount's first reads
  then fill the cache without page faults (~15% faster; the memory is resident from the
  start).
* Errors: a ``CoralError`` becomes its ``errno``; corruption (``IntegrityError``) and
  unexpected exceptions become EIO and a line in ``REPO/.coralfs/mount.log``. Wrong bytes
  are never returned: every chunk is verified against its id before it is served.
* Writes (see :mod:`coralfs.mountwrite`): a branch directory is writable and writing is
  committing. A written file is staged on local disk in the repository and stored
  (ingested, recorded as a durable pending entry) when it is closed (``flush``) or
  ``fsync``-ed: errors surface there (``release``'s return value is ignored by the
  kernel). A burst of writes on a branch becomes one commit after ``--commit-delay``
  seconds (1.5) of quiet with no file open for writing there; ``fsync`` of the branch
  directory (or ``coralfs flush-mount``) commits at once. Supported: create, ``O_EXCL``,
  ``O_TRUNC``, truncate/ftruncate, in-place overwrite, append, random-offset writes,
  temp-file-then-rename (also over an existing file), unlink, rename of files and
  directories inside a branch (between branches EXDEV, so ``mv`` copies), mkdir/rmdir
  (empty directories live only in the mount session: trees store files), chmod of the
  executable bit. ``mkdir NAME`` at the top level (or in a namespace directory) creates
  branch NAME at the default branch's head; ``rmdir`` of a branch directory deletes the
  branch if it shows no files and nothing is being written in it (not the checked-out
  branch: EBUSY). Symlinks, hard links and device nodes: EPERM; xattrs: ENOTSUP.
  ``@commits`` and ``@tags`` stay immutable (EROFS); ``--read-only`` makes everything so.
  A write-only handle opened while nothing else has the file open uses direct I/O (it
  cannot be memory-mapped; one copy less: ~25% faster ``torch.save``/``cp``); other
  writers (``O_RDWR``: read back, shared ``mmap``) use the page cache (``keep_cache`` off
  at open). Readers of a file being written use direct I/O and read the staged bytes; a
  reader that had the file open when a writer opened it in place follows the writer
  (same inode), never a mix. Written data arrives through ``write_buf`` and goes from
  libfuse's buffer to the staged file without a Python copy.
  ``hard_remove`` is on: a file unlinked or renamed over while open keeps working
  through its handle.

In the background, the filesystem runs in a daemon that is a fresh interpreter, which
opens the repository itself: no LMDB environment crosses a fork. ``mount`` returns once
the mount is live, or raises with the daemon's error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import select
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from coralfs import kernels
from coralfs.errors import CoralError, InvalidArgument, NotARepository

if TYPE_CHECKING:  # imported lazily: `coralfs --help` stays cheap
    from coralfs.mountview import MountView

log = logging.getLogger("coralfs.fuse")

CORAL_DIR = ".coralfs"
LOG_NAME = "mount.log"
COMMIT_DELAY = 1.5  # seconds; = coralfs.mountwrite.DEFAULT_COMMIT_DELAY (not imported: --help stays cheap)
ATTR_TIMEOUT = 3600.0  # seconds; branch/tag paths are invalidated explicitly when they move
REFRESH_INTERVAL = 0.2  # seconds between ref polls
MOUNT_TIMEOUT = 30.0
READAHEAD_KB = 1024  # 8x the kernel default; more only over-reads (and decodes) around mmap faults
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 512 << 20
RESERVE_BYTES = 256 << 20  # heap faulted in at start for decoded chunks (the chunk cache's size)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
FUSE_CAP_EXPLICIT_INVAL_DATA = 1 << 25


# ------------------------------------------------------------------ libfuse 3 via mfusepy
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
                         "(unset FUSE_LIBRARY_PATH, or import coralfs.fuse before mfusepy)")
    lib = mfusepy._libfuse
    lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.fuse_invalidate_path.restype = ctypes.c_int
    return mfusepy


def tune_malloc() -> bool:
    """glibc: keep 1 MiB read buffers in the heap, one heap for all threads (so memory one
    thread frees, another reuses), and do not trim it eagerly."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
            & bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) & bool(libc.mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.warning("mallopt failed (not glibc?): large reads may be slower")
    return ok


def reserve_heap(nbytes: int = RESERVE_BYTES) -> None:
    """Fault in ``nbytes`` of heap and give it back to malloc (it stays in the process: see
    ``tune_malloc``). The chunks a first read decodes stay in the decoded-chunk cache, so on
    a fresh mount each one is new memory, and page faults on it were ~10% of the daemon's
    CPU in a profile; with the heap reserved, a fresh mount's first read of an 89 MB
    checkpoint took 113-120 ms instead of 133-138 ms (bench/RESULTS.md, third session). The
    cost: the cache's memory is resident from the start."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = (ctypes.c_size_t,)
        libc.free.argtypes = (ctypes.c_void_p,)
        blocks = [libc.malloc(1 << 20) for _ in range(nbytes >> 20)]
        for b in blocks:
            if b:
                ctypes.memset(b, 0, 1 << 20)
        for b in blocks:
            libc.free(b)
    except (OSError, AttributeError) as e:
        log.warning("could not reserve heap for decoded chunks: %s", e)


# ------------------------------------------------------------------ the Operations adapter
def _fuse_op(fn: Callable[..., Any]) -> Callable[..., Any]:
    """CoralError -> its errno (EIO ones logged); anything unexpected -> EIO, logged."""

    @functools.wraps(fn)
    def wrapper(self: CoralOperations, path: str | None, *args: Any) -> Any:
        try:
            return fn(self, path, *args)
        except CoralError as e:
            if e.errno == errno.EIO:
                log.error("%s %s: %s: %s", fn.__name__, path, type(e).__name__, e)
            raise OSError(e.errno, str(e)) from None
        except OSError:
            raise
        except Exception:
            log.exception("%s %s: unexpected error, returning EIO", fn.__name__, path)
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from None

    return wrapper


class _FuseBuf(ctypes.Structure):  # struct fuse_buf (libfuse 3, fuse_common.h)
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p), ("fd", ctypes.c_int),
                ("pos", ctypes.c_int64)]


class _FuseBufvec(ctypes.Structure):  # struct fuse_bufvec: the buffers follow inline (mfusepy has a pointer)
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _FuseBuf * 1)]


FUSE_BUF_IS_FD = 1 << 1


def fuse_class(mfusepy: Any) -> Any:
    """mfusepy's FUSE, passing ``rename``'s flags (RENAME_NOREPLACE) and ``ftruncate``'s handle
    through (mfusepy drops both), and ``write_buf`` without a copy of the data."""

    class CoralFUSE(mfusepy.FUSE):  # type: ignore[misc,name-defined]
        def write_buf(self, path: bytes | None, bufv: Any, offset: int, fip: Any) -> int:
            """The written bytes go from libfuse's buffer to the staged file (``os.pwrite`` of a
            memoryview over it): no Python ``bytes`` copy of every 1 MiB request."""
            vec = ctypes.cast(bufv, ctypes.POINTER(_FuseBufvec)).contents
            bufs = ctypes.cast(ctypes.addressof(vec.buf), ctypes.POINTER(_FuseBuf))
            parts: list[Any] = []
            skip = vec.off
            for i in range(vec.idx, vec.count):
                b = bufs[i]
                n = b.size - skip
                if n <= 0:
                    skip -= b.size
                    continue
                if b.flags & FUSE_BUF_IS_FD:  # (spliced data: read it from the pipe)
                    parts.append(os.read(b.fd, n))
                else:
                    parts.append(memoryview((ctypes.c_char * n).from_address(b.mem + skip)).cast("B"))
                skip = 0
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            return self.operations.write_buf(None if path is None else path.decode(self.encoding, self.errors),
                                             data, offset, fip.contents.fh)

        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            """Decoded bytes go from the chunk cache straight into libfuse's reply buffer (mfusepy
            builds a ``bytes`` per request and copies it again)."""
            dst = memoryview((ctypes.c_char * size).from_address(ctypes.cast(buf, ctypes.c_void_p).value)).cast("B")
            return self.operations.read_into(None if path is None else path.decode(self.encoding, self.errors),
                                             dst, offset, fip.contents)

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags)

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors),
                                            length, fip.contents.fh if fip else None)

    return CoralFUSE


class CoralOperations:
    """mfusepy high-level operations (``raw_fi=True``, times in ns) over a MountView."""

    use_ns = True

    def __init__(self, view: MountView, *, direct_io: bool = False, attr_timeout: float = ATTR_TIMEOUT,
                 refresh_interval: float = REFRESH_INTERVAL, on_ready: Callable[[], None] | None = None,
                 mountpoint: str | None = None, readahead_kb: int | None = READAHEAD_KB) -> None:
        self.view = view
        self.mountpoint = mountpoint
        self.readahead_kb = readahead_kb
        self.direct_io = direct_io
        self.attr_timeout = attr_timeout
        self.refresh_interval = refresh_interval
        self.on_ready = on_ready
        self._fuse_ptr: int | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._libfuse: Any = None
        self.invalidations = 0
        self.initialized = False

    # -- life cycle ---------------------------------------------------------
    def init_with_config(self, conn: Any, config: Any) -> None:
        mfusepy = load_mfusepy()
        self._libfuse = mfusepy._libfuse
        if config is not None:
            config.entry_timeout = self.attr_timeout
            config.attr_timeout = self.attr_timeout
            config.negative_timeout = 0.0
            config.kernel_cache = 0
            config.auto_cache = 0
            config.direct_io = 0
            config.use_ino = 0
            config.hard_remove = 1  # no .fuse_hidden renames: open handles need no path
        if conn is not None:
            conn.want &= ~FUSE_CAP_AUTO_INVAL_DATA
            if conn.capable & FUSE_CAP_ATOMIC_O_TRUNC:  # O_TRUNC arrives with open: no copy, then truncate
                conn.want |= FUSE_CAP_ATOMIC_O_TRUNC
            if conn.capable & FUSE_CAP_EXPLICIT_INVAL_DATA:
                conn.want |= FUSE_CAP_EXPLICIT_INVAL_DATA
            log.info("fuse init: proto %d.%d, max_readahead %d, max_read %d, max_write %d, want 0x%x",
                     conn.proto_major, conn.proto_minor, conn.max_readahead, conn.max_read, conn.max_write,
                     conn.want)
        self._fuse_ptr = self._libfuse.fuse_get_context().contents.fuse
        self.view.poll_changes()  # the first snapshot of the refs
        self._watcher = threading.Thread(target=self._watch, name="coralfs-refs", daemon=True)
        self._watcher.start()
        self.initialized = True
        # "mounted" means serving at full speed (the kernels have been loading since start)
        log.info("decode loops: %s", "compiled (numba)" if kernels.wait(timeout=60) else "numpy")
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path: str) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        if self.view.writer is not None:
            self.view.writer.close()  # commits what is pending
        log.info("unmounted")

    def _tune_readahead(self) -> None:
        """A kernel readahead window of a few chunks: sequential readers then keep several
        requests in flight, so the next chunk decodes while this one is copied out (root only)."""
        if not self.readahead_kb or not self.mountpoint:
            return
        try:
            st = os.stat(self.mountpoint)
            path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
            with open(path, "w") as f:
                f.write(str(self.readahead_kb))
            log.info("readahead: %d KiB (%s)", self.readahead_kb, path)
        except OSError as e:
            log.info("readahead left at the kernel default (%s)", e)

    def _watch(self) -> None:
        """Invalidate the kernel's cache for paths of branches and tags that moved."""
        self._tune_readahead()
        while not self._stop.wait(self.refresh_interval):
            try:
                self.view.poll_changes(self._invalidate)
            except Exception:
                log.exception("polling the refs failed")

    def _invalidate(self, paths: list[str]) -> None:
        log.info("refs moved: invalidating %d paths", len(paths))
        for p in paths:
            if self._stop.is_set():
                return
            rc = self._libfuse.fuse_invalidate_path(self._fuse_ptr, p.encode("utf-8", "surrogateescape"))
            if rc == 0:
                self.invalidations += 1
            elif rc != -errno.ENOENT:
                log.debug("invalidate %s: %s", p, os.strerror(-rc))

    # -- reading ------------------------------------------------------------
    @_fuse_op
    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        if path is None:  # fstat of a file unlinked (or renamed over) while open
            if fh is None:
                raise OSError(errno.EBADF, "no path and no handle")
            return self.view.fgetattr(fh.fh).to_stat()
        return self.view.getattr(path).to_stat()

    @_fuse_op
    def readdir(self, path: str, fh: Any) -> list[Any]:
        entries: list[Any] = [(".", {"st_mode": stat.S_IFDIR}, 0), ("..", {"st_mode": stat.S_IFDIR}, 0)]
        for name, is_dir in self.view.scandir(path):
            entries.append((name, {"st_mode": stat.S_IFDIR if is_dir else stat.S_IFREG}, 0))
        return entries

    @_fuse_op
    def access(self, path: str, amode: int) -> int:
        attr = self.view.getattr(path)
        if amode & os.W_OK:
            self.view.check_write(path)
        if amode & os.X_OK and not attr.mode & 0o111:
            raise OSError(errno.EACCES, f"{path}: not executable")
        return 0

    @_fuse_op
    def open(self, path: str, fi: Any) -> int:
        fh = self.view.open(path, fi.flags)
        self._set_fi(fh, fi)
        return 0

    def _set_fi(self, fh: int, fi: Any) -> None:
        f = self.view.opened(fh)
        fi.fh = fh
        direct = self.direct_io or f.direct_io
        fi.keep_cache = 1 if f.keep_cache and not direct else 0
        fi.direct_io = 1 if direct else 0

    @_fuse_op
    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        # mfusepy registers libfuse's read callback only because this exists; CoralFUSE.read
        # then serves it through read_into (this stays correct for a plain mfusepy.FUSE)
        return self.view.read(fi.fh, offset, size)

    @_fuse_op
    def read_into(self, path: str | None, dst: memoryview, offset: int, fi: Any) -> int:
        return self.view.read_into(fi.fh, offset, dst)

    @_fuse_op
    def release(self, path: str | None, fi: Any) -> int:
        self.view.release(fi.fh)
        return 0

    @_fuse_op
    def flush(self, path: str | None, fi: Any) -> int:
        self.view.flush(fi.fh)  # a written file is stored now: its errors are close()'s
        return 0

    @_fuse_op
    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        self.view.fsync(fi.fh)
        return 0

    @_fuse_op
    def fsyncdir(self, path: str | None, datasync: int, fh: Any) -> int:
        if path is not None:
            self.view.fsyncdir(path)  # commits the branch's pending changes now
        return 0

    @_fuse_op
    def statfs(self, path: str) -> dict[str, int]:
        frsize = 4096
        if self.view.writer is not None:  # writes are staged in the repository: its free space
            st = os.statvfs(self.view.repo.control)
            return {"f_bsize": self.view.blksize, "f_frsize": st.f_frsize, "f_blocks": st.f_blocks,
                    "f_bfree": st.f_bfree, "f_bavail": st.f_bavail, "f_files": 0, "f_ffree": 0, "f_favail": 0,
                    "f_namemax": 255}
        try:
            used = os.stat(os.path.join(self.view.repo.store.path, "data.mdb")).st_size
        except OSError:
            used = 0
        return {"f_bsize": self.view.blksize, "f_frsize": frsize, "f_blocks": (used + frsize - 1) // frsize,
                "f_bfree": 0, "f_bavail": 0, "f_files": 0, "f_ffree": 0, "f_favail": 0, "f_namemax": 255}

    # -- writing (mountview / mountwrite do the work) --------------------------
    @_fuse_op
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        fh = self.view.create(path, fi.flags, mode)
        self._set_fi(fh, fi)
        return 0

    @_fuse_op
    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        return self.view.write(fi.fh, offset, data)

    @_fuse_op
    def write_buf(self, path: str | None, data: Any, offset: int, fh: int) -> int:
        return self.view.write(fh, offset, data)  # (a memoryview of libfuse's buffer: see fuse_class)

    @_fuse_op
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self.view.truncate(path, length, fh)
        return 0

    @_fuse_op
    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fi: Any) -> int:
        self.view.fallocate(fi.fh, mode, offset, size)
        return 0

    @_fuse_op
    def mkdir(self, path: str, mode: int) -> int:
        self.view.mkdir(path, mode)
        return 0

    @_fuse_op
    def rmdir(self, path: str) -> int:
        self.view.rmdir(path)
        return 0

    @_fuse_op
    def unlink(self, path: str) -> int:
        self.view.unlink(path)
        return 0

    @_fuse_op
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self.view.rename(old, new, flags)
        return 0

    @_fuse_op
    def chmod(self, path: str | None, mode: int) -> int:
        if path is not None:
            self.view.chmod(path, mode)
        return 0

    @_fuse_op
    def chown(self, path: str | None, uid: int, gid: int) -> int:
        if path is not None:
            self.view.check_write(path)  # ownership is not stored
        return 0

    @_fuse_op
    def utimens(self, path: str | None, times: Any = None) -> int:
        if path is not None:
            self.view.utimens(path, times)
        return 0

    def _unsupported(self, path: str, what: str) -> None:
        self.view.check_write(path)
        raise OSError(errno.EPERM, f"{path}: {what} are not supported")

    @_fuse_op
    def symlink(self, target: str, source: str) -> int:
        self._unsupported(target, "symbolic links")
        return 0

    @_fuse_op
    def link(self, target: str, source: str) -> int:
        self._unsupported(target, "hard links")
        return 0

    @_fuse_op
    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._unsupported(path, "device nodes and fifos")
        return 0

    @_fuse_op
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self.view.check_write(path)
        raise OSError(errno.ENOTSUP, "extended attributes are not stored")

    @_fuse_op
    def removexattr(self, path: str, name: str) -> int:
        self.view.check_write(path)
        raise OSError(errno.ENOTSUP, "extended attributes are not stored")


# ------------------------------------------------------------------ mount / umount
def repo_root(path: str | os.PathLike[str]) -> str:
    """The repository directory for ``path`` (which may name its .coralfs); nothing is opened."""
    p = os.path.abspath(os.fspath(path))
    if os.path.basename(p) == CORAL_DIR:
        p = os.path.dirname(p)
    if not os.path.isfile(os.path.join(p, CORAL_DIR, "store", "data.mdb")):
        raise NotARepository(f"not a coralfs repository: {p}")
    return p


def log_path(repo: str | os.PathLike[str]) -> str:
    return os.path.join(repo_root(repo), CORAL_DIR, LOG_NAME)


def _unescape_mount_field(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts() -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/self/mountinfo (stale FUSE mounts included)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields = pre.split()
                if len(fields) >= 5:
                    out[_unescape_mount_field(fields[4])] = post.split()[0] if post else ""
    except OSError:
        pass
    return out


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    return os.path.abspath(os.fspath(mountpoint)) in mounts()


def _setup_logging(path: str, debug: bool) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d %(threadName)s] "
                                           "%(name)s: %(message)s"))
    for name in ("coralfs", "fuse"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("fuse").setLevel(logging.DEBUG if debug else logging.WARNING)
    return handler


def _serve(root: str, mountpoint: str, *, direct_io: bool, debug: bool, allow_other: bool,
           attr_timeout: float, refresh_interval: float, blksize: int | None, max_idle_threads: int = 16,
           readahead_kb: int | None = READAHEAD_KB, prefetch_mb: int | None = None, read_only: bool = False,
           commit_delay: float = COMMIT_DELAY, on_ready: Callable[[], None] | None = None) -> int:
    """Run the filesystem until it is unmounted (blocks). Opens the repository here; a writable
    mount first recovers what earlier mount sessions left (staged data, pending commits)."""
    from coralfs.mountview import DEFAULT_BLKSIZE, PREFETCH_BYTES, MountView
    from coralfs.mountwrite import Writer
    from coralfs.repository import Repository

    mfusepy = load_mfusepy()
    tune_malloc()
    kernels.load_in_background()  # compiled decode loops for this long-lived process
    reserve_heap()  # meanwhile (the loops take longer to load than this)
    repo = Repository(root)
    t0 = time.perf_counter()
    warmed = repo.warm_index()  # lookups in memory from the first read on
    log.info("index: %.1f MB of B-tree pages in memory (%.0f ms)", warmed / 1e6, (time.perf_counter() - t0) * 1000)
    view: MountView | None = None
    writer: Writer | None = None
    try:
        if not read_only:
            writer = Writer(repo, commit_delay=commit_delay, mountpoint=mountpoint)
            writer.start()
        view = MountView(repo, blksize=blksize or DEFAULT_BLKSIZE,
                         prefetch_bytes=PREFETCH_BYTES if prefetch_mb is None else prefetch_mb << 20, writer=writer)
        ops = CoralOperations(view, direct_io=direct_io, attr_timeout=attr_timeout,
                              refresh_interval=refresh_interval, on_ready=on_ready, mountpoint=mountpoint,
                              readahead_kb=readahead_kb)
        log.info("mounting %s on %s (libfuse %d.%d, pid %d, direct_io=%s, %s)", root, mountpoint,
                 mfusepy.fuse_version_major, mfusepy.fuse_version_minor, os.getpid(), direct_io,
                 "read-only" if read_only else f"writable, commit delay {commit_delay:g} s")
        options: dict[str, Any] = {"fsname": "coralfs", "subtype": "coralfs", "max_idle_threads": max_idle_threads,
                                   "noatime": True}
        if allow_other:
            options["allow_other"] = True
        try:
            fuse_class(mfusepy)(ops, mountpoint, foreground=True, debug=debug, raw_fi=True, **options)
        except RuntimeError as e:
            if ops.initialized:  # e.g. SIGTERM: libfuse unmounted, then reports an error code
                log.info("fuse loop ended with code %s (signal?)", e)
                return 0
            raise CoralError(f"mounting {mountpoint} failed (libfuse error {e}); see {log_path(root)}") from None
        log.info("fuse loop ended for %s", mountpoint)
        return 0
    finally:
        if writer is not None:
            writer.close()  # (already done by destroy after a clean unmount)
        if view is not None:
            view.close()
        repo.close()


def mount(repo_path: str | os.PathLike[str], mountpoint: str | os.PathLike[str], foreground: bool = False, *,
          direct_io: bool = False, debug: bool = False, allow_other: bool = False,
          attr_timeout: float = ATTR_TIMEOUT, refresh_interval: float = REFRESH_INTERVAL,
          blksize: int | None = None, readahead_kb: int | None = READAHEAD_KB, prefetch_mb: int | None = None,
          read_only: bool = False, commit_delay: float = COMMIT_DELAY, timeout: float = MOUNT_TIMEOUT) -> int:
    """Mount a repository. In the foreground this blocks until unmounted; otherwise the
    filesystem runs in a daemon and this returns (the daemon's pid) once the mount is live."""
    root = repo_root(repo_path)
    mp = os.path.abspath(os.fspath(mountpoint))
    if not os.path.isdir(mp):
        raise InvalidArgument(f"mount point {mp} is not a directory")
    if is_mounted(mp):
        raise InvalidArgument(f"{mp} is already a mount point (coralfs umount {mp})")
    if not os.path.exists("/dev/fuse"):
        raise CoralError("/dev/fuse is missing: FUSE is not available here")
    load_mfusepy()  # fail early and clearly, before forking
    lp = log_path(root)
    kw = dict(direct_io=direct_io, debug=debug, allow_other=allow_other, attr_timeout=attr_timeout,
              refresh_interval=refresh_interval, blksize=blksize, readahead_kb=readahead_kb,
              prefetch_mb=prefetch_mb, read_only=read_only, commit_delay=commit_delay)
    if foreground:
        handler = _setup_logging(lp, debug)
        try:
            return _serve(root, mp, **kw)  # type: ignore[arg-type]
        finally:
            for name in ("coralfs", "fuse"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()
    return _daemonize(root, mp, lp, kw, timeout)


def _daemon_args(kw: dict[str, Any]) -> list[str]:
    args = [f"--attr-timeout={kw['attr_timeout']}", f"--refresh-interval={kw['refresh_interval']}",
            f"--readahead-kb={kw['readahead_kb'] or 0}", f"--commit-delay={kw.get('commit_delay', COMMIT_DELAY)}"]
    if kw.get("blksize"):
        args.append(f"--blksize={kw['blksize']}")
    if kw.get("prefetch_mb") is not None:
        args.append(f"--prefetch-mb={kw['prefetch_mb']}")
    args += [flag for flag, key in (("--direct-io", "direct_io"), ("--allow-other", "allow_other"),
                                    ("--debug-fuse", "debug"), ("--read-only", "read_only")) if kw.get(key)]
    return args


def _daemonize(root: str, mp: str, lp: str, kw: dict[str, Any], timeout: float) -> int:
    """Start the daemon and wait until the mount is live; returns the daemon's pid.

    The daemon is a fresh interpreter (``python -m coralfs.fuse ... --detach``), not a fork
    of this process: nothing crosses over, neither this process's threads nor an LMDB
    environment it has open (py-lmdb refuses to reopen an environment a forked parent
    holds). It forks once more at start-up, before it opens anything, so it is not left
    as a zombie child of a long-lived caller."""
    import coralfs

    r, w = os.pipe()
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(coralfs.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "coralfs.fuse", root, mp, "--detach", f"--ready-fd={w}", *_daemon_args(kw)]
    try:
        with open(lp, "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,),
                                    cwd="/", env=env, start_new_session=True)
    finally:
        os.close(w)
    msg = b""
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout=timeout)  # the launcher exits as soon as the daemon has forked off
        while not msg.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                raise CoralError(f"mounting {mp} timed out after {timeout:.0f} s; see {lp}")
            part = os.read(r, 4096)
            if not part:
                break
            msg += part
    except subprocess.TimeoutExpired:
        proc.kill()
        raise CoralError(f"mounting {mp} timed out after {timeout:.0f} s; see {lp}") from None
    finally:
        os.close(r)
    text = msg.decode(errors="replace").strip()
    if not text.startswith("ok "):
        raise CoralError(f"mounting {mp} failed: {text or 'the mount process died'}; see {lp}")
    daemon_pid = int(text.split()[1])
    while not os.path.ismount(mp):  # init has run, so this is immediate
        if time.monotonic() > deadline:
            raise CoralError(f"mounting {mp} timed out after {timeout:.0f} s; see {lp}")
        time.sleep(0.01)
    return daemon_pid


def _daemon_main(root: str, mp: str, kw: dict[str, Any], ready_fd: int, detach: bool) -> int:
    """The daemon side of ``_daemonize``: serve, telling the waiting parent through
    ``ready_fd`` once the mount is live (or why it failed)."""
    if detach:
        if os.fork() != 0:
            os._exit(0)  # the launcher: the parent waits for it
        os.setsid()
    ready = {"sent": False}
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.close(null)
        _setup_logging(log_path(root), bool(kw.get("debug")))

        def on_ready() -> None:
            os.write(ready_fd, f"ok {os.getpid()}\n".encode())
            os.close(ready_fd)
            ready["sent"] = True

        code = _serve(root, mp, on_ready=on_ready, **kw)
    except BaseException as e:  # report to the waiting parent, then exit
        log.exception("mount failed")
        if not ready["sent"]:
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"{type(e).__name__}: {e}\n".encode())
    finally:
        logging.shutdown()
    return code


def umount(mountpoint: str | os.PathLike[str], lazy: bool = False) -> None:
    """Unmount: ``fusermount3 -u`` (else ``fusermount -u``); a stale mount (its process died)
    or ``lazy=True`` detaches lazily (``fusermount3 -uz`` / ``umount -l``).

    A coralfs mount first commits what was written and is still pending (``fsync`` of its
    root), so the commits exist when this returns (the daemon would otherwise make them
    after the kernel has let go of the mount point)."""
    mp = os.path.abspath(os.fspath(mountpoint))
    fstype = mounts().get(mp)
    if fstype is None:
        raise InvalidArgument(f"{mp} is not mounted")
    stale = False
    try:
        os.listdir(mp)  # a request to the filesystem (stat may be answered from the kernel's cache)
    except OSError as e:
        stale = e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    if not stale and fstype == "fuse.coralfs":
        try:
            fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:  # e.g. a refused (conflicting) burst: it is kept, see mount.log
            log.warning("committing pending changes before unmounting %s: %s", mp, e.strerror)
    errors: list[str] = []
    attempts = [["fusermount3", "-u", mp], ["fusermount", "-u", mp]]
    if lazy or stale:
        attempts += [["fusermount3", "-u", "-z", mp], ["fusermount", "-u", "-z", mp], ["umount", "-l", mp]]
    for i, cmd in enumerate(attempts):
        if shutil.which(cmd[0]) is None:
            continue
        res = subprocess.run(cmd, capture_output=True, text=True)
        for _ in range(10 if i == 0 else 0):  # busy just after the last file was closed: retry briefly
            if res.returncode == 0 or "busy" not in res.stderr:
                break
            time.sleep(0.1)
            res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode == 0 and not is_mounted(mp):
            return
        if res.stderr.strip():
            errors.append(res.stderr.strip())
        if not is_mounted(mp):
            return
    hint = "" if lazy else " (busy? close the files using it, or umount --lazy)"
    raise CoralError(f"could not unmount {mp}{hint}: " + ("; ".join(dict.fromkeys(errors)) or "no fusermount"))


# ------------------------------------------------------------------ python -m coralfs.fuse
def add_mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repository", metavar="REPO", help="the repository to mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground until unmounted")
    p.add_argument("--direct-io", action="store_true",
                   help="bypass the kernel page cache (one-shot streaming; breaks shared mmap)")
    p.add_argument("--debug", action="store_true", help="log every FUSE request (implies --foreground)")
    p.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    p.add_argument("--read-only", action="store_true", help="refuse every write (EROFS)")
    p.add_argument("--commit-delay", type=float, default=COMMIT_DELAY, metavar="SECONDS",
                   help="commit a branch's written files after this long without writes (default: "
                        f"{COMMIT_DELAY:g}); fsync of the branch directory commits at once")
    p.add_argument("--attr-timeout", type=float, default=ATTR_TIMEOUT, help=argparse.SUPPRESS)
    p.add_argument("--refresh-interval", type=float, default=REFRESH_INTERVAL, help=argparse.SUPPRESS)
    p.add_argument("--readahead-kb", type=int, default=READAHEAD_KB, help=argparse.SUPPRESS)
    p.add_argument("--blksize", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prefetch-mb", type=int, default=None, help=argparse.SUPPRESS)


def mount_options(args: argparse.Namespace, debug: bool) -> dict[str, Any]:
    return dict(direct_io=args.direct_io, debug=debug, allow_other=args.allow_other,
                attr_timeout=args.attr_timeout, refresh_interval=args.refresh_interval,
                blksize=args.blksize, readahead_kb=args.readahead_kb or None, prefetch_mb=args.prefetch_mb,
                read_only=args.read_only, commit_delay=args.commit_delay)


def mount_from_args(args: argparse.Namespace) -> int:
    pid = mount(args.repository, args.mountpoint, foreground=args.foreground or args.debug,
                **mount_options(args, args.debug))
    if not (args.foreground or args.debug):
        print(f"mounted {repo_root(args.repository)} on {os.path.abspath(args.mountpoint)} (pid {pid}); "
              f"log: {log_path(args.repository)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coralfs.fuse", description="Mount a coralfs repository.")
    add_mount_arguments(p)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # set by _daemonize
    p.add_argument("--detach", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug-fuse", action="store_true", help=argparse.SUPPRESS)  # --debug in a daemon
    args = p.parse_args(argv)
    try:
        if args.ready_fd is not None:
            return _daemon_main(repo_root(args.repository), os.path.abspath(args.mountpoint),
                                mount_options(args, args.debug or args.debug_fuse), args.ready_fd, args.detach)
        return mount_from_args(args)
    except CoralError as e:
        print(f"coralfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
