"""The FUSE mount: life cycle (mount, daemon, umount) and options.

``mount(repo, mountpoint)`` makes every branch, commit and tag of a repository a
directory (see :mod:`coralfs.mount.view` for the layout); ``umount(mountpoint)`` undoes it.
The protocol adapter is :mod:`coralfs.mount.fuse_ops` (libfuse 3's low-level API, bound in
:mod:`coralfs.mount.fuse_ll`), over :mod:`coralfs.mount.nodes` (inodes) and
:mod:`coralfs.mount.view` (what the file system shows).

How it stays correct and fast:

* **One inode per version of a file** (:mod:`coralfs.mount.nodes`). The kernel keeps one
  page cache and one size per inode, so a file opened from a branch directory is a
  snapshot for the life of its handle: ``read``, ``fstat`` and ``mmap`` all show the
  version it opened, whatever the branch does meanwhile. An unchanged file keeps its
  inode (and its cached pages) across commits. A watcher thread polls the refs (one short
  LMDB read transaction per ``refresh_interval``) and tells the kernel to drop the names
  whose version changed (``notify_inval_entry``); until then an ``open`` of a superseded
  inode returns ``ESTALE``, on which the kernel walks the path again and opens the new
  version. So a new open after a commit sees the new version, never a mix.
* libfuse 3 (chosen explicitly: mfusepy, which loads it, prefers libfuse 2 when both are
  installed), multithreaded: reads of different files run in parallel (zstd, numpy and
  BLAKE3 release the GIL). Long attribute and entry timeouts (names that move are
  invalidated explicitly); ``keep_cache`` on every open of a stored version (an inode's
  content never changes behind the kernel); no automatic invalidation on mtime changes.
* A large ``st_blksize`` (1 MiB) so readers issue large reads; a read is answered with an
  iovec over the decoded chunks in the repository's chunk cache (no copy in Python; one
  decode per chunk at a time; sequential readers get the next chunks decoded ahead).
  Kernel readahead on the mount is raised to ``READAHEAD_KB`` (root only). ``direct_io``
  is off by default (it defeats the page cache and shared mmap); ``--direct-io`` opts in.
* The compiled decode loops (:mod:`coralfs.codec.kernels`, numba) load on a thread from the
  daemon's start; ``mount`` returns once they are ready (~0.4 s more than without).
* glibc ``mallopt(M_MMAP_THRESHOLD=64 MiB, M_TRIM_THRESHOLD=512 MiB, M_ARENA_MAX=1)`` at
  start-up: without it 1 MiB requests churn ``mmap``/``brk`` and stall. Then 256 MiB of heap
  (the decoded-chunk cache's size) is faulted in and freed: a fresh mount's first reads
  then fill the cache without page faults (~15% faster; the memory is resident from the
  start).
* Errors: a ``CoralError`` becomes its ``errno``; corruption (``IntegrityError``) and
  unexpected exceptions become EIO and a line in ``REPO/.coralfs/mount.log``. Wrong bytes
  are never returned: every chunk is verified against its id before it is served.
* Other users: without ``--allow-other`` only the mount's owner can use it. With it, the
  kernel checks the modes shown (``default_permissions``): files and directories belong to
  the owner and are writable by the owner only; ``--allow-other-write`` makes branch
  directories writable by everyone, and commits then name who wrote.
* Writes (see :mod:`coralfs.mount.writer`): a branch directory is writable and writing is
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
  writers (``O_RDWR``: read back, shared ``mmap``) use the page cache. Readers of a file
  being written use direct I/O and read the staged bytes; a reader that had the file's
  inode open when a writer opened it in place follows the writer (same inode), never a
  mix. Written data goes from libfuse's buffer to the staged file without a Python copy.
  A file unlinked or renamed over while open keeps working through its handle.

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
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from coralfs.codec import kernels
from coralfs.errors import CoralError, InvalidArgument
from coralfs.mount.mtab import fsync_dir, is_mounted, log_path, mounts, repo_root
from coralfs.mount.options import MountOptions, add_mount_arguments

if TYPE_CHECKING:  # imported lazily: `coralfs --help` stays cheap
    from coralfs.mount.view import MountView

log = logging.getLogger("coralfs.mount.daemon")

MOUNT_TIMEOUT = 30.0
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 512 << 20
RESERVE_BYTES = 256 << 20  # heap faulted in at start for decoded chunks (the chunk cache's size)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


# ------------------------------------------------------------------ the process
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


# ------------------------------------------------------------------ mount / umount
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


def _serve(root: str, mountpoint: str, opts: MountOptions, on_ready: Callable[[], None] | None = None) -> int:
    """Run the filesystem until it is unmounted (blocks). Opens the repository here; a writable
    mount first recovers what earlier mount sessions left (staged data, pending commits)."""
    # SIGTERM/SIGINT/SIGHUP end the session: libfuse's handlers run in this thread only (the
    # one waiting for the session to end); every thread started from here on blocks them
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    from coralfs.mount import fuse_ll
    from coralfs.mount.fuse_ops import CoralFS
    from coralfs.mount.view import DEFAULT_BLKSIZE, PREFETCH_BYTES, MountView
    from coralfs.mount.writer import Writer
    from coralfs.repository import Repository

    mfusepy = fuse_ll.load_mfusepy()
    ll = fuse_ll.Binding(mfusepy)
    tune_malloc()
    kernels.load_in_background()  # compiled decode loops for this long-lived process
    reserve_heap()  # meanwhile (the loops take longer to load than this)
    repo = Repository(root)
    t0 = time.perf_counter()
    warmed = repo.warm_index()  # lookups in memory from the first read on
    log.info("index: %.1f MB of B-tree pages in memory (%.0f ms)", warmed / 1e6, (time.perf_counter() - t0) * 1000)
    view: MountView | None = None
    writer: Writer | None = None
    fs: CoralFS | None = None
    try:
        if not opts.read_only:
            writer = Writer(repo, commit_delay=opts.commit_delay, mountpoint=mountpoint)
            writer.start()
        prefetch = PREFETCH_BYTES if opts.prefetch_mb is None else opts.prefetch_mb << 20
        view = MountView(repo, blksize=opts.blksize or DEFAULT_BLKSIZE, prefetch_bytes=prefetch, writer=writer,
                         shared_write=opts.allow_other_write)
        fs = CoralFS(view, ll, direct_io=opts.direct_io, attr_timeout=opts.attr_timeout,
                     refresh_interval=opts.refresh_interval, on_ready=on_ready, mountpoint=mountpoint,
                     readahead_kb=opts.readahead_kb)
        log.info("mounting %s on %s (libfuse %d.%d low-level, pid %d, %s)", root, mountpoint,
                 mfusepy.fuse_version_major, mfusepy.fuse_version_minor, os.getpid(), opts)
        return fs.run(mountpoint, opts.fuse_options(), opts.debug, opts.max_idle_threads)
    finally:
        if fs is not None:
            fs.stop()  # (already done by destroy after a clean unmount)
        elif writer is not None:
            writer.close()
        if view is not None:
            view.close()
        repo.close()


def mount(repo_path: str | os.PathLike[str], mountpoint: str | os.PathLike[str], options: MountOptions | None = None,
          *, foreground: bool = False, timeout: float = MOUNT_TIMEOUT, **changes: Any) -> int:
    """Mount a repository (``changes``: MountOptions fields, e.g. ``read_only=True``). In the
    foreground this blocks until unmounted; otherwise the filesystem runs in a daemon and this
    returns (the daemon's pid) once the mount is live."""
    opts = (options or MountOptions()).with_(**changes)
    root = repo_root(repo_path)
    mp = os.path.abspath(os.fspath(mountpoint))
    if not os.path.isdir(mp):
        raise InvalidArgument(f"mount point {mp} is not a directory")
    if is_mounted(mp):
        raise InvalidArgument(f"{mp} is already a mount point (coralfs umount {mp})")
    if not os.path.exists("/dev/fuse"):
        raise CoralError("/dev/fuse is missing: FUSE is not available here")
    from coralfs.mount.fuse_ll import load_mfusepy

    load_mfusepy()  # fail early and clearly, before forking
    lp = log_path(root)
    if foreground:
        handler = _setup_logging(lp, opts.debug)
        try:
            return _serve(root, mp, opts)
        finally:
            for name in ("coralfs", "fuse"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()
    return _daemonize(root, mp, lp, opts, timeout)


def _daemonize(root: str, mp: str, lp: str, opts: MountOptions, timeout: float) -> int:
    """Start the daemon and wait until the mount is live; returns the daemon's pid.

    The daemon is a fresh interpreter (``python -m coralfs.mount.daemon ... --detach``), not a fork
    of this process: nothing crosses over, neither this process's threads nor an LMDB
    environment it has open (py-lmdb refuses to reopen an environment a forked parent
    holds). It forks once more at start-up, before it opens anything, so it is not left
    as a zombie child of a long-lived caller."""
    import coralfs

    r, w = os.pipe()
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(coralfs.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "coralfs.mount.daemon", root, mp, "--detach", f"--ready-fd={w}", *opts.to_argv()]
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


def _daemon_main(root: str, mp: str, opts: MountOptions, ready_fd: int, detach: bool) -> int:
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
        _setup_logging(log_path(root), opts.debug)

        def on_ready() -> None:
            os.write(ready_fd, f"ok {os.getpid()}\n".encode())
            os.close(ready_fd)
            ready["sent"] = True

        code = _serve(root, mp, opts, on_ready=on_ready)
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
            fsync_dir(mp)
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


# ------------------------------------------------------------------ python -m coralfs.mount.daemon
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coralfs.mount.daemon", description="Mount a coralfs repository.")
    add_mount_arguments(p)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # set by _daemonize
    p.add_argument("--detach", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        opts = MountOptions.from_args(args)
        if args.ready_fd is not None:
            return _daemon_main(repo_root(args.repository), os.path.abspath(args.mountpoint), opts, args.ready_fd,
                                args.detach)
        pid = mount(args.repository, args.mountpoint, opts, foreground=args.foreground or opts.debug)
        if not (args.foreground or opts.debug):
            print(f"mounted {repo_root(args.repository)} on {os.path.abspath(args.mountpoint)} (pid {pid}); "
                  f"log: {log_path(args.repository)}")
        return 0
    except CoralError as e:
        print(f"coralfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
