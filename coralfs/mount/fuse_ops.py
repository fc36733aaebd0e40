"""The FUSE protocol adapter: libfuse low-level requests -> the mount's node table and view.

See :mod:`coralfs.mount.daemon` for the mount's behaviour and life cycle, :mod:`coralfs.mount.view`
for what a repository looks like as a file system and :mod:`coralfs.mount.nodes` for which
kernel inode each version of a file gets. Nothing here decides semantics.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import signal
import stat
import threading
from collections.abc import Callable
from typing import Any

from coralfs.codec import kernels
from coralfs.errors import CoralError
from coralfs.mount import fuse_ll
from coralfs.mount.nodes import ROOT_INO, Node, NodeTable, StaleNode, join
from coralfs.mount.view import Attr, IsADirectory, MountView, NotADirectory
from coralfs.mount.writer import REQUEST

log = logging.getLogger("coralfs.mount.daemon")

# ------------------------------------------------------------------ the low-level adapter
S_IFMT_TYPE = {True: stat.S_IFDIR, False: stat.S_IFREG}


class CoralFS:
    """libfuse low-level requests -> :class:`coralfs.mount.nodes.NodeTable` + :class:`MountView`.

    Protocol adapter only: what a repository looks like as a file system is defined in
    :mod:`coralfs.mount.view` (names, contents, write semantics) and :mod:`coralfs.mount.nodes`
    (which inode each version gets). Every request gets exactly one reply: a handler
    computes its result first and replies last; an exception before the reply becomes its
    errno (``CoralError.errno``; anything unexpected EIO, logged)."""

    def __init__(self, view: MountView, ll: Any, *, direct_io: bool, attr_timeout: float, refresh_interval: float,
                 on_ready: Callable[[], None] | None = None, mountpoint: str | None = None,
                 readahead_kb: int | None = None) -> None:
        self.view = view
        self.ll = ll  # coralfs.mount.fuse_ll.Binding
        self.lib = ll.lib
        self.table = NodeTable(view)
        self.mountpoint = mountpoint
        self.readahead_kb = readahead_kb
        self.direct_io = direct_io
        self.attr_timeout = attr_timeout
        self.refresh_interval = refresh_interval
        self.on_ready = on_ready
        self.se: int | None = None
        self._stop = threading.Event()
        self._stopped = False
        self._wake = threading.Event()
        self._watcher: threading.Thread | None = None
        self._dirs: dict[int, list[tuple[str, bool, int]]] = {}
        self._dh = itertools.count(1)
        self.invalidations = 0
        self.initialized = False
        self._ops = self._build_ops()

    # -- the operation table ------------------------------------------------------
    def _build_ops(self) -> Any:
        ops = self.ll.Ops()
        self._callbacks: list[Any] = []  # keep the ctypes thunks alive
        for name, proto in self.ll.ops_fields:
            handler = getattr(self, "op_" + name, None)
            if handler is None or not hasattr(proto, "argtypes"):
                continue
            if name in ("init", "destroy"):
                cb = proto(self._guard_plain(handler))
            elif name in ("forget", "forget_multi"):
                cb = proto(self._guard_none(handler))
            else:
                cb = proto(self._guard(name, handler))
            self._callbacks.append(cb)
            setattr(ops, name, cb)
        return ops

    def _guard(self, name: str, fn: Callable[..., None]) -> Callable[..., None]:
        lib = self.lib

        def cb(req: int, *args: Any) -> None:
            try:
                if name in _WRITES:
                    REQUEST.uid = lib.fuse_req_ctx(req).contents.uid
                fn(req, *args)
            except CoralError as e:
                if e.errno == errno.EIO:
                    log.error("%s %s: %s: %s", name, self._where(args), type(e).__name__, e)
                lib.fuse_reply_err(req, e.errno or errno.EIO)
            except OSError as e:
                lib.fuse_reply_err(req, e.errno or errno.EIO)
            except BaseException:  # noqa: BLE001 - a reply is owed whatever happened
                log.exception("%s %s: unexpected error, returning EIO", name, self._where(args))
                lib.fuse_reply_err(req, errno.EIO)

        return cb

    def _where(self, args: tuple[Any, ...]) -> str:
        """The path a request is about, for the log (its inode, and its name if it has one)."""
        if not args or not isinstance(args[0], int):
            return ""
        node = self.table.by_ino.get(args[0])
        path = (node.path or f"(inode {node.ino}, no name now)") if node is not None else f"(inode {args[0]})"
        if len(args) > 1 and isinstance(args[1], bytes):
            path = join(path, self._name(args[1]))
        return path

    def _guard_none(self, fn: Callable[..., None]) -> Callable[..., None]:
        lib = self.lib

        def cb(req: int, *args: Any) -> None:
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001
                log.exception("forget failed")
            lib.fuse_reply_none(req)

        return cb

    @staticmethod
    def _guard_plain(fn: Callable[..., None]) -> Callable[..., None]:
        def cb(*args: Any) -> None:
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001
                log.exception("%s failed", fn.__name__)

        return cb

    # -- replies -------------------------------------------------------------------
    def _stat(self, ino: int, attr: Attr) -> Any:
        st = self.ll.Stat()
        st.st_ino = ino
        st.st_mode = attr.mode
        st.st_nlink = attr.nlink
        st.st_uid = attr.uid
        st.st_gid = attr.gid
        st.st_size = attr.size
        st.st_blksize = attr.blksize
        st.st_blocks = attr.blocks
        ns = int(attr.mtime * 1e9)
        for f in ("st_atimespec", "st_mtimespec", "st_ctimespec"):
            ts = getattr(st, f)
            ts.tv_sec, ts.tv_nsec = divmod(ns, 1_000_000_000)
        return st

    def _entry(self, node: Node) -> Any:
        e = self.ll.EntryParam()
        e.ino = node.ino
        e.generation = 0
        e.attr = self._stat(node.ino, node.attr)
        e.attr_timeout = e.entry_timeout = self.attr_timeout
        return e

    @staticmethod
    def _name(raw: bytes) -> str:
        return raw.decode("utf-8", "surrogateescape")

    def _fh_of(self, fi: Any) -> int | None:
        return int(fi.contents.fh) if fi else None

    # -- life cycle ----------------------------------------------------------------
    def op_init(self, userdata: Any, conn: Any) -> None:
        c = conn.contents
        c.want &= ~fuse_ll.CAP_AUTO_INVAL_DATA  # pages are never invalidated behind our back
        c.want &= ~fuse_ll.CAP_WRITEBACK_CACHE
        for cap in (fuse_ll.CAP_ATOMIC_O_TRUNC, fuse_ll.CAP_EXPLICIT_INVAL_DATA):
            if c.capable & cap:
                c.want |= cap
        log.info("fuse init: proto %d.%d, max_readahead %d, max_read %d, max_write %d, want 0x%x",
                 c.proto_major, c.proto_minor, c.max_readahead, c.max_read, c.max_write, c.want)
        self.table.revalidate()  # the first snapshot of the refs
        self._watcher = threading.Thread(target=self._watch, name="coralfs-refs", daemon=True)
        self._watcher.start()
        self.initialized = True
        # "mounted" means serving at full speed (the kernels have been loading since start)
        log.info("decode loops: %s", "compiled (numba)" if kernels.wait(timeout=60) else "numpy")
        if self.on_ready is not None:
            self.on_ready()

    def op_destroy(self, userdata: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._wake.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
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
        """Tell the kernel which names point at versions that are no longer current."""
        self._tune_readahead()
        while not self._stop.is_set():
            self._wake.wait(self.refresh_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception:
                log.exception("polling the refs failed")

    def refresh(self) -> None:
        entries, inodes = self.table.revalidate()
        if entries or inodes:
            log.debug("invalidating %d entries, %d directories", len(entries), len(inodes))
        for parent, name in entries:
            if self._stop.is_set() or self.se is None:
                return
            raw = name.encode("utf-8", "surrogateescape")
            rc = self.lib.fuse_lowlevel_notify_inval_entry(self.se, parent, raw, len(raw))
            if rc == 0:
                self.invalidations += 1
            elif rc not in (-errno.ENOENT, -errno.ENOTCONN):
                log.debug("invalidate entry %d/%s: %s", parent, name, os.strerror(-rc))
        for ino in inodes:
            if self._stop.is_set() or self.se is None:
                return
            self.lib.fuse_lowlevel_notify_inval_inode(self.se, ino, -1, 0)  # attributes only

    def _soon(self) -> None:
        """A stale entry was found by a request: have the watcher tell the kernel now."""
        self._wake.set()

    # -- names -----------------------------------------------------------------------
    def op_lookup(self, req: int, parent: int, name: bytes) -> None:
        node = self.table.lookup(parent, self._name(name))
        self.lib.fuse_reply_entry(req, ctypes.byref(self._entry(node)))

    def op_forget(self, ino: int, nlookup: int) -> None:
        self.table.forget(ino, nlookup)

    def op_forget_multi(self, count: int, forgets: Any) -> None:
        for i in range(count):
            self.table.forget(forgets[i].ino, forgets[i].nlookup)

    def op_getattr(self, req: int, ino: int, fi: Any) -> None:
        attr = self.table.attr(ino)  # (an fstat too: the inode is its version, fixed)
        if self.table.has_stale():
            self._soon()
        self.lib.fuse_reply_attr(req, ctypes.byref(self._stat(ino, attr)), self.attr_timeout)

    def _path(self, node: Node) -> str:
        """The current path of a node a request names by inode (ESTALE once it was superseded:
        the watcher is woken to tell the kernel now)."""
        try:
            self.table.check_current(node)
            if not node.path:
                raise StaleNode(f"inode {node.ino} has no name any more")
        except StaleNode:
            self._soon()
            raise
        return node.path

    def op_setattr(self, req: int, ino: int, attr_p: Any, to_set: int, fi: Any) -> None:
        node = self.table.get(ino)
        fh = self._fh_of(fi)
        a = attr_p.contents
        path = node.path or None
        if fh is None:
            path = self._path(node)
        if to_set & fuse_ll.SET_ATTR_SIZE:
            self.view.truncate(path, int(a.st_size), fh, ino)
            if fh is None:  # truncate(2): stored already, as a new version of this same inode
                self.table.changed_here(node)
        if to_set & fuse_ll.SET_ATTR_MODE:
            if path is None:
                raise OSError(errno.EPERM, "chmod of a file without a name")
            self.view.chmod(path, int(a.st_mode))
        if to_set & (fuse_ll.SET_ATTR_UID | fuse_ll.SET_ATTR_GID) and path is not None:
            self.view.check_write(path)  # ownership is not stored
        if to_set & (fuse_ll.SET_ATTR_ATIME | fuse_ll.SET_ATTR_MTIME | fuse_ll.SET_ATTR_ATIME_NOW
                     | fuse_ll.SET_ATTR_MTIME_NOW) and path is not None:
            if to_set & fuse_ll.SET_ATTR_MTIME_NOW or not to_set & fuse_ll.SET_ATTR_MTIME:
                times = None
            else:
                m = a.st_mtimespec.tv_sec * 1_000_000_000 + a.st_mtimespec.tv_nsec
                times = (m, m)
            self.view.utimens(path, times)
        out = self.table.attr(ino)
        self.lib.fuse_reply_attr(req, ctypes.byref(self._stat(ino, out)), self.attr_timeout)

    def op_access(self, req: int, ino: int, mask: int) -> None:
        node = self.table.get(ino)
        attr = self.table.attr(ino)
        if mask & os.W_OK and node.path:
            self.view.check_write(node.path)
        if mask & os.X_OK and not attr.mode & 0o111:
            raise OSError(errno.EACCES, "not executable")
        self.lib.fuse_reply_err(req, 0)

    # -- files ---------------------------------------------------------------------
    def _set_fi(self, node: Node, fh: int, fi: Any) -> None:
        f = self.view.opened(fh)
        fi.fh = fh
        direct = self.direct_io or f.direct_io
        keep = f.keep_cache and not direct and not node.drop_cache
        if not direct and f.keep_cache:
            node.drop_cache = False
        fi.keep_cache = 1 if keep else 0
        fi.direct_io = 1 if direct else 0

    def op_open(self, req: int, ino: int, fi: Any) -> None:
        node = self.table.get(ino)
        flags = fi.contents.flags
        if node.is_dir:
            raise IsADirectory(f"inode {ino}: is a directory")
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        fh: int | None = None
        if node.staged is not None and not writing:
            fh = self.view.open_staged(node.path or "/(unlinked)", node.staged, ino)
        if fh is None:
            path = self._path(node)
            manifest = node.token[1] if node.token[0] == "f" and not writing else None
            fh = self.view.open(path, flags, ino=ino, manifest=manifest)  # type: ignore[arg-type]
        f = self.view.opened(fh)
        self.table.opened(node, fh, f.staged if f.writable else None)
        self._set_fi(node, fh, fi.contents)
        self.lib.fuse_reply_open(req, fi)

    def op_create(self, req: int, parent: int, name: bytes, mode: int, fi: Any) -> None:
        path = self.table.child_path(parent, self._name(name))
        fh = self.view.create(path, fi.contents.flags, mode, ino=0)
        try:
            res = self.view.resolve(path)
            node = self.table.attach(parent, self._name(name), res)
        except BaseException:
            self.view.release(fh)
            raise
        f = self.view.opened(fh)
        f.ino = node.ino
        self.table.opened(node, fh, f.staged)
        self._set_fi(node, fh, fi.contents)
        self.lib.fuse_reply_create(req, ctypes.byref(self._entry(node)), fi)

    def op_read(self, req: int, ino: int, size: int, off: int, fi: Any) -> None:
        parts = self.view.read_parts(fi.contents.fh, off, size)
        n = len(parts)
        if n == 0:
            self.lib.fuse_reply_buf(req, None, 0)
            return
        iov = (fuse_ll.Iovec * n)()
        keep = []
        for i, (data, lo, hi) in enumerate(parts):
            p = ctypes.c_char_p(data)  # the bytes object's own buffer: no copy
            keep.append(p)
            iov[i].iov_base = ctypes.cast(p, ctypes.c_void_p).value + lo  # type: ignore[operator]
            iov[i].iov_len = hi - lo
        self.lib.fuse_reply_iov(req, iov, n)
        del keep

    def op_write_buf(self, req: int, ino: int, bufv: Any, off: int, fi: Any) -> None:
        vec = bufv.contents
        bufs = ctypes.cast(ctypes.addressof(vec.buf), ctypes.POINTER(fuse_ll.FuseBuf))
        parts: list[Any] = []
        skip = vec.off
        for i in range(vec.idx, vec.count):
            b = bufs[i]
            n = b.size - skip
            if n <= 0:
                skip -= b.size
                continue
            if b.flags & fuse_ll.BUF_IS_FD:  # (spliced data: read it from the pipe)
                parts.append(os.read(b.fd, n))
            else:  # libfuse's buffer: written to the staged file without a Python copy
                parts.append(memoryview((ctypes.c_char * n).from_address(b.mem + skip)).cast("B"))
            skip = 0
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        n = self.view.write(fi.contents.fh, off, data)
        self.lib.fuse_reply_write(req, n)

    def op_flush(self, req: int, ino: int, fi: Any) -> None:
        self.view.flush(fi.contents.fh)  # a written file is stored now: its errors are close()'s
        self.lib.fuse_reply_err(req, 0)

    def op_fsync(self, req: int, ino: int, datasync: int, fi: Any) -> None:
        self.view.fsync(fi.contents.fh)
        self.lib.fuse_reply_err(req, 0)

    def op_release(self, req: int, ino: int, fi: Any) -> None:
        fh = fi.contents.fh
        try:
            self.view.release(fh)
        finally:
            self.table.released(ino, fh)
        self.lib.fuse_reply_err(req, 0)

    def op_fallocate(self, req: int, ino: int, mode: int, offset: int, length: int, fi: Any) -> None:
        self.view.fallocate(fi.contents.fh, mode, offset, length)
        self.lib.fuse_reply_err(req, 0)

    # -- directories ---------------------------------------------------------------
    def op_opendir(self, req: int, ino: int, fi: Any) -> None:
        node = self.table.get(ino)
        if not node.is_dir:
            raise NotADirectory(f"inode {ino}: not a directory")
        names = self.view.scandir(node.path) if node.path else []
        parent = node.parent or ROOT_INO
        entries = [(".", True, ino), ("..", True, parent)]
        base = node.path
        for name, is_dir in names:
            child = self.table.by_path.get(join(base, name))
            entries.append((name, is_dir, child.ino if child is not None else 0))
        dh = next(self._dh)
        self._dirs[dh] = entries
        fi.contents.fh = dh
        self.lib.fuse_reply_open(req, fi)

    def op_readdir(self, req: int, ino: int, size: int, off: int, fi: Any) -> None:
        entries = self._dirs.get(fi.contents.fh, [])
        buf = ctypes.create_string_buffer(size)
        pos = 0
        st = self.ll.Stat()
        for i in range(off, len(entries)):
            name, is_dir, child = entries[i]
            st.st_ino = child or 0xFFFFFFFF  # (a name the kernel has not looked up yet)
            st.st_mode = S_IFMT_TYPE[is_dir]
            raw = name.encode("utf-8", "surrogateescape")
            need = self.lib.fuse_add_direntry(req, ctypes.byref(buf, pos), size - pos, raw, ctypes.byref(st), i + 1)
            if need > size - pos:
                break
            pos += need
        self.lib.fuse_reply_buf(req, buf, pos)

    def op_releasedir(self, req: int, ino: int, fi: Any) -> None:
        self._dirs.pop(fi.contents.fh, None)
        self.lib.fuse_reply_err(req, 0)

    def op_fsyncdir(self, req: int, ino: int, datasync: int, fi: Any) -> None:
        node = self.table.get(ino)
        if node.path:
            self.view.fsyncdir(node.path)  # commits the branch's pending changes now
        self.lib.fuse_reply_err(req, 0)

    def op_mkdir(self, req: int, parent: int, name: bytes, mode: int) -> None:
        n = self._name(name)
        path = self.table.child_path(parent, n)
        self.view.mkdir(path, mode)
        node = self.table.attach(parent, n, self.view.resolve(path))
        self.lib.fuse_reply_entry(req, ctypes.byref(self._entry(node)))

    def op_unlink(self, req: int, parent: int, name: bytes) -> None:
        path = self.table.child_path(parent, self._name(name))
        self.view.unlink(path)
        self.table.removed(path)
        self.lib.fuse_reply_err(req, 0)

    def op_rmdir(self, req: int, parent: int, name: bytes) -> None:
        path = self.table.child_path(parent, self._name(name))
        self.view.rmdir(path)
        self.table.removed(path)
        self.lib.fuse_reply_err(req, 0)

    def op_rename(self, req: int, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        old = self.table.child_path(parent, self._name(name))
        new = self.table.child_path(newparent, self._name(newname))
        self.view.rename(old, new, flags)
        self.table.moved(old, new)
        self.lib.fuse_reply_err(req, 0)

    def _unsupported(self, parent: int, name: bytes, what: str) -> None:
        self.view.check_write(self.table.child_path(parent, self._name(name)))
        raise OSError(errno.EPERM, f"{what} are not supported")

    def op_symlink(self, req: int, link: bytes, parent: int, name: bytes) -> None:
        self._unsupported(parent, name, "symbolic links")

    def op_link(self, req: int, ino: int, newparent: int, newname: bytes) -> None:
        self._unsupported(newparent, newname, "hard links")

    def op_mknod(self, req: int, parent: int, name: bytes, mode: int, rdev: int) -> None:
        if not stat.S_ISREG(mode):
            self._unsupported(parent, name, "device nodes and fifos")
        n = self._name(name)
        path = self.table.child_path(parent, n)
        fh = self.view.create(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, ino=0)
        try:
            self.view.flush(fh)
            node = self.table.attach(parent, n, self.view.resolve(path))
        finally:
            self.view.release(fh)
        self.lib.fuse_reply_entry(req, ctypes.byref(self._entry(node)))

    def op_setxattr(self, req: int, ino: int, name: bytes, value: Any, size: int, flags: int) -> None:
        node = self.table.get(ino)
        if node.path:
            self.view.check_write(node.path)
        raise OSError(errno.ENOTSUP, "extended attributes are not stored")

    def op_removexattr(self, req: int, ino: int, name: bytes) -> None:
        node = self.table.get(ino)
        if node.path:
            self.view.check_write(node.path)
        raise OSError(errno.ENOTSUP, "extended attributes are not stored")

    def op_statfs(self, req: int, ino: int) -> None:
        sv = self.ll.Statvfs()
        sv.f_bsize = self.view.blksize
        sv.f_namemax = 255
        if self.view.writer is not None:  # writes are staged in the repository: its free space
            st = os.statvfs(self.view.repo.control)
            sv.f_frsize, sv.f_blocks, sv.f_bfree, sv.f_bavail = st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail
        else:
            try:
                used = os.stat(os.path.join(self.view.repo.store.path, "data.mdb")).st_size
            except OSError:
                used = 0
            sv.f_frsize = 4096
            sv.f_blocks = (used + 4095) // 4096
        self.lib.fuse_reply_statfs(req, ctypes.byref(sv))

    # -- the session ---------------------------------------------------------------
    def run(self, mountpoint: str, options: list[str], debug: bool, max_idle_threads: int) -> int:
        """Mount, serve until unmounted (or SIGTERM/SIGINT/SIGHUP), unmount."""
        argv = ["coralfs"] + (["-d"] if debug else []) + ["-o", ",".join(options)]
        args, _keep = self.ll.make_args(argv)
        se = self.lib.fuse_session_new(ctypes.byref(args), ctypes.byref(self._ops), ctypes.sizeof(self._ops), None)
        if not se:
            raise CoralError(f"mounting {mountpoint} failed: libfuse refused the options {options}")
        try:
            if self.lib.fuse_session_mount(se, os.fsencode(mountpoint)) != 0:
                raise CoralError(f"mounting {mountpoint} failed (see the log for libfuse's reason)")
            self.se = se
            try:
                if self.lib.fuse_set_signal_handlers(se) != 0:
                    log.warning("could not install the signal handlers")
                # the signals go to this thread (the others block them): the loop's wait ends
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                try:
                    rc = self.ll.loop_mt(se, max_idle_threads, MAX_THREADS)
                finally:
                    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
                    self.lib.fuse_remove_signal_handlers(se)
                log.info("fuse loop ended (%d)", rc)
            finally:
                self._stop.set()
                self._wake.set()
                self.se = None
                self.lib.fuse_session_unmount(se)
        finally:
            self.lib.fuse_session_destroy(se)  # (calls destroy if the kernel did not)
        return 0


#: requests that change something: the caller's uid is recorded (see coralfs.mount.writer.REQUEST)
_WRITES = frozenset({"create", "open", "write_buf", "flush", "fsync", "setattr", "mkdir", "unlink", "rmdir",
                     "rename", "fallocate", "mknod", "release", "fsyncdir"})
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
MAX_THREADS = 16


