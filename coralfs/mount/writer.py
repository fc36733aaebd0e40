"""Writes through the mount: a branch directory is writable, and writing is committing.

What happens to a file written into ``MOUNT/BRANCH/...``
--------------------------------------------------------
1. **Staging.** Its bytes go to a file on local disk inside the repository,
   ``REPO/.coralfs/staging/mount-<pid>-<ms>/<n>.data`` (never held whole in memory), with a
   small ``<n>.json`` beside it naming the branch and path (:mod:`coralfs.mount.sessions`).
   Opening an existing file for writing without ``O_TRUNC`` copies its current content into
   the staged file (streamed, and only once something is written or truncated); reads of
   a file being written are served from the staged file.
2. **Stored at close.** ``close()`` (FUSE ``flush``) or ``fsync`` of a written file stores it
   with the code path of ``coralfs add`` (the branch's previous version of that path as the
   delta base) and records a durable **pending entry** (:mod:`coralfs.mount.pending`), both
   inside ``repo.writing()`` (gc cannot sweep the new chunks in between). When
   ``close``/``fsync`` returns 0 the file is durable; a failure to store it is that call's
   error (EIO, ENOSPC) and the mount stays writable.
3. **Only what was acknowledged is committed.** A write or truncate that failed marks the
   file: its close and fsync return that error and store nothing (until it is truncated to
   nothing). A failed store is never retried behind the writer's back. When the last
   handle goes, content that nothing stored is discarded (logged; its space given back at
   once) and the path shows what was last stored there. Content written after the last
   close (through a shared mapping) is stored when the last handle goes.
4. **One commit per burst.** A branch with pending entries is committed after
   ``commit_delay`` seconds (1.5 s) without writes and without open-for-write handles on
   that branch (a handle kept open longer than ``max_hold`` seconds no longer holds the
   rest back), so a multi-file save (``save_pretrained``, ``cp -r``) becomes one commit.
   ``fsync`` of the branch directory commits at once, and so does ``coralfs flush-mount``.
   A file still open for writing is never committed: it stays pending until its last
   writer closes. The message says what changed: ``mount: update model.pt, add
   config.json, remove old.pt``.
5. **Concurrency.** The head moves by compare-and-swap; paths another commit changed
   meanwhile are set aside as a conflict and the rest is committed
   (:func:`coralfs.mount.pending.commit_pending`). One writable mount per repository
   (``.coralfs/mount.lock``).
6. **Crash safety.** Pending entries are durable, so a crash before the commit loses
   nothing: the next mount commits them at start-up (so does ``coralfs flush-mount`` when
   no mount is running). Staged data of a dead session is discarded and logged
   (``discarded incomplete write of BRANCH/PATH (N bytes)``). Chunks written by an ingest
   that was cut short are unreferenced garbage for gc.

Directories exist in trees only as prefixes of file paths: an empty directory (``mkdir``,
or one whose files were all removed) lives only in this mount session.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coralfs.errors import (
    Busy,
    ConcurrentUpdate,
    CoralError,
    DirectoryNotEmpty,
    IngestFailed,
    RefExists,
)
from coralfs.mount.pending import PendItem, commit_pending, put_pend
from coralfs.mount.sessions import Session, durable_entry, flush_repository, take_mount_lock, write_json
from coralfs.store import keys, refs
from coralfs.store.objects import MODE_EXEC, MODE_FILE, TreeEntry

if TYPE_CHECKING:
    from coralfs.reader import FileView
    from coralfs.repository import Repository
    from coralfs.store.lmdb import Txn

log = logging.getLogger("coralfs.mount")

DEFAULT_COMMIT_DELAY = 1.5  # seconds of quiet before a branch's pending changes are committed
MAX_HOLD = 60.0  # an open-for-write handle holds a branch's commit back at most this long
COPY_BLOCK = 8 << 20
RETRY_SECONDS = 5.0  # after a failed commit (not a conflict)
#: Test hook: ``CORALFS_MOUNT_KILL_AT=ingest`` (SIGKILL halfway through an ingest at close)
#: or ``ingest-done`` (after the ingest, before the pending entry is recorded).
KILL_ENV = "CORALFS_MOUNT_KILL_AT"
#: Test hook: ``CORALFS_MOUNT_FAIL_INGEST=TEXT:N``: the first N ingests of a path containing
#: TEXT fail with ENOSPC.
FAIL_ENV = "CORALFS_MOUNT_FAIL_INGEST"
_fail_counts: dict[str, int] = {}
#: The user a request through the mount comes from (set by the FUSE adapter per request):
#: recorded with what they wrote when it is not the mount's owner.
REQUEST = threading.local()


def request_uid() -> int | None:
    uid = getattr(REQUEST, "uid", None)
    return None if uid is None or uid == os.getuid() else int(uid)




# ------------------------------------------------------------------ the writer (one per mount)
class Staged:
    """A file with data on local disk: being written, or closed and not yet stored.

    ``branch``/``path`` is where it is bound (``path`` None: unlinked while open). Until
    something is written or truncated, ``src`` (the version it was opened at) is its
    content and nothing is copied."""

    def __init__(self, writer: Writer, branch: str, path: str, mode: int, base: bytes | None,
                 src: FileView | None, src_entry: TreeEntry | None) -> None:
        self.sid = next(writer._ids)
        self.fs_path = os.path.join(writer.session_dir, f"{self.sid}.data")
        self.meta_path = os.path.join(writer.session_dir, f"{self.sid}.json")
        self.branch = branch
        self.path: str | None = path
        self.mode = mode
        self.base = base  # the head the writer saw when it opened the file
        self.src = src
        self.durable = src_entry  # the last closed content this inode had (None: never closed)
        self.fd: int | None = None
        self.handles = 0
        self.writers = 0
        self.dirty = False  # written since the last successful ingest
        self.failed = False  # the last ingest failed (close/fsync returned the error)
        self.poisoned = 0  # errno of a write or truncate that failed: the content is not what was meant
        self.uid: int | None = None  # who opened it for writing (a mount shared with other users)
        self.ino: int | None = None  # the kernel inode it is written through (the mount's inode layer)
        self.state = ""  # as written to the .json: writing | closed | ingested
        self.lock = threading.RLock()  # data: writes, truncates and ingests of this file
        # kept here (not fstat-ed): getattr reads them without the lock, also after the fd is gone
        self.size = src.size if src is not None else 0
        self.mtime = time.time()

    def write_meta(self, state: str | None = None) -> None:
        if state is not None:
            self.state = state
        if self.fd is None:
            return
        write_json(self.meta_path, {"branch": self.branch, "path": self.path, "state": self.state,
                                     "mode": self.mode, "base": self.base.hex() if self.base else None})

    def __repr__(self) -> str:
        return f"<Staged {self.sid} {self.branch}/{self.path} handles={self.handles} dirty={self.dirty}>"


@dataclass
class BranchState:
    pend: dict[str, PendItem] = field(default_factory=dict)  # mirror of the branch's LMDB entries
    live: dict[str, Staged] = field(default_factory=dict)  # paths bound to staged files
    dirs: set[str] = field(default_factory=set)  # directories that live only in this session
    last_activity: float = 0.0  # Writer.clock() of the last write or namespace change
    first_pending: float | None = None
    writers: int = 0  # open-for-write handles
    retry_at: float = 0.0


@dataclass(frozen=True)
class Overlay:
    """A branch as the mount shows it: head tree + pending entries + files being written."""

    files: dict[str, TreeEntry | Staged]
    mtimes: dict[str, float]
    dirs: frozenset[str]


class Writer:
    """The write side of one mount: staged files, pending entries, the commit thread."""

    def __init__(self, repo: Repository, *, commit_delay: float = DEFAULT_COMMIT_DELAY, max_hold: float = MAX_HOLD,
                 mountpoint: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.repo = repo
        self.commit_delay = commit_delay
        self.max_hold = max_hold
        self.mountpoint = mountpoint
        #: seconds, for every quiet-period, max-hold and retry decision (a test injects its own
        #: and drives the commit loop with :meth:`tick`: no thread, no real time)
        self.clock = clock
        self.lock = threading.RLock()  # namespace state; never held while waiting for an ingest
        self.branches: dict[str, BranchState] = {}
        self.version = 0  # bumped on every namespace change (the view caches overlays by it)
        self._ids = itertools.count(1)
        self._invalid: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.session: Session | None = None
        self.commit_count = 0  # commits made by this mount
        self._closed = False
        self._trash: list[str] = []
        self._lock_fd: int | None = None
        self.refused: list[dict[str, Any]] = []  # conflicts set aside this session (for flush-mount)

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    @property
    def session_dir(self) -> str:
        assert self.session is not None, "Writer.start() first"
        return self.session.dir

    # -- life cycle ---------------------------------------------------------
    def start(self, background: bool = True) -> None:
        """Take the repository's write-mount lock (one writable mount per repository), lock a
        staging session, recover dead ones, commit what earlier sessions left pending."""
        self._lock_fd = take_mount_lock(self.repo.root, self.mountpoint)
        try:
            self.session = Session(self.repo.root, self.mountpoint)
        except BaseException:
            self._release_lock()
            raise
        for b, o in flush_repository(self.repo):
            if o.conflicts:
                log.error("start-up: pending changes on %s conflicted (kept as %s)", b, o.conflict_id)
        with self.lock:
            with self.repo.store.read() as t:
                for k, v in t.items("index", keys.PENDING):
                    b, p = keys.pending_path(k, v)
                    self._state(b).pend[p] = PendItem.decode(v)
            for st in self.branches.values():
                st.first_pending = self.clock() if st.pend else None
        if background:
            self._thread = threading.Thread(target=self._run, name="coralfs-commit", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the commit thread; store what can be stored and commit everything pending now."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self.lock:
            states = list(self.branches.items())
        for name, _st in states:
            try:
                self.commit(name)
            except CoralError as e:
                log.error("unmount: pending changes on %s not committed: %s (they stay pending)", name, e)
        self.empty_trash()
        for st in self.branches.values():
            for s in list(st.live.values()):
                if s.dirty:  # still open at the end (a lazy unmount): never acknowledged
                    log.warning("discarded %s/%s (%d bytes): still open for writing when the mount ended",
                                s.branch, s.path, s.size)
                if s.fd is not None:
                    os.close(s.fd)
                    s.fd = None
        if self.session is not None:
            self.session.close(remove=True)
        self._release_lock()

    def _state(self, branch: str) -> BranchState:
        st = self.branches.get(branch)
        if st is None:
            st = self.branches[branch] = BranchState()
        return st

    def _touch(self, st: BranchState) -> None:
        st.last_activity = self.clock()

    def take_invalidations(self) -> list[str]:
        """Mount paths whose overlay changed behind the kernel's back (e.g. a refused burst)."""
        with self.lock:
            out, self._invalid = self._invalid, []
        return out

    # -- what the view shows --------------------------------------------------
    def overlay(self, branch: str, head_files: Mapping[str, TreeEntry]) -> Overlay | None:
        with self.lock:
            st = self.branches.get(branch)
            if st is None or not (st.pend or st.live or st.dirs):
                return None
            files: dict[str, TreeEntry | Staged] = dict(head_files)
            mtimes: dict[str, float] = {}
            for p, it in st.pend.items():
                if it.entry is None:
                    files.pop(p, None)
                else:
                    files[p] = it.entry
                    mtimes[p] = it.time
            files.update(st.live)
            return Overlay(files, mtimes, frozenset(st.dirs))

    # -- files ----------------------------------------------------------------
    def open_file(self, branch: str, path: str, head: bytes | None, current: TreeEntry | Staged | None,
                  src: FileView | None, *, writable: bool, truncate: bool, mode: int = MODE_FILE) -> Staged:
        """Bind (or reuse) the staged file for ``path``; ``current`` is what the path shows now and
        ``src`` its content. With ``truncate`` the old content is not kept: the caller then
        truncates, after releasing ``self.lock`` (a truncate waits for a running ingest)."""
        with self.lock:
            st = self._state(branch)
            if isinstance(current, Staged):
                s = current
            else:
                if current is not None:
                    mode = current.mode
                s = Staged(self, branch, path, mode, head, None if truncate else src,
                           None if truncate else current)
                st.live[path] = s
                self.version += 1
            if writable:
                s.uid = request_uid()
            s.handles += 1
            if writable:
                s.writers += 1
                st.writers += 1
                self._touch(st)
        return s

    def attach(self, s: Staged) -> None:
        """Another handle reads ``s`` (it keeps the staged data alive)."""
        with self.lock:
            s.handles += 1

    def attach_live(self, s: Staged) -> bool:
        """``attach`` unless ``s`` has been dropped (its last handle released): then False, and the
        caller reads what it was stored as instead."""
        with self.lock:
            if s.handles <= 0:
                return False
            s.handles += 1
            return True

    def _materialize(self, s: Staged, keep: int | None = None) -> None:
        """Create the staged file, copying (up to ``keep`` bytes of) the version it was opened at."""
        if s.fd is not None:
            return
        fd = os.open(s.fs_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            s.fd = fd
            s.write_meta("writing")
            src, n = s.src, 0
            if src is not None:
                n = src.size if keep is None else min(keep, src.size)
                pos = 0
                while pos < n:
                    block = src.pread(pos, min(COPY_BLOCK, n - pos))
                    if not block:
                        raise IngestFailed(f"{s.branch}/{s.path}: short read while copying the current version")
                    os.pwrite(fd, block, pos)
                    pos += len(block)
            s.src = None
            s.size = n
        except BaseException:
            s.fd = None
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(s.fs_path)
            raise

    def _dirty(self, s: Staged) -> None:
        if not s.dirty or s.state != "writing":
            s.dirty = True
            s.failed = False
            s.write_meta("writing")

    def read(self, s: Staged, offset: int, size: int) -> bytes:
        with s.lock:
            if s.fd is None:
                return s.src.pread(offset, size) if s.src is not None else b""
            return os.pread(s.fd, size, offset)

    def write(self, s: Staged, offset: int, data: bytes, append: bool = False) -> int:
        with s.lock:
            try:
                self._materialize(s)
                assert s.fd is not None
                if append:
                    offset = s.size
                self._dirty(s)
                n = os.pwrite(s.fd, data, offset)
            except OSError as e:
                self._poison(s, e)
                raise
            if n:  # (a write of nothing does not extend the file)
                s.size = max(s.size, offset + n)
            s.mtime = time.time()
        st = self.branches.get(s.branch)
        if st is not None:
            st.last_activity = self.clock()
        return n

    def truncate(self, s: Staged, length: int) -> None:
        with s.lock:
            try:
                self._materialize(s, keep=length)
                assert s.fd is not None
                self._dirty(s)
                os.ftruncate(s.fd, length)
            except OSError as e:
                self._poison(s, e)
                raise
            if length == 0:
                s.poisoned = 0  # nothing left of what failed: a fresh start
            s.size = length
            s.mtime = time.time()
        with self.lock:
            self._touch(self._state(s.branch))

    def allocate(self, s: Staged, offset: int, length: int) -> None:
        with s.lock:
            try:
                self._materialize(s)
                assert s.fd is not None
                if s.size < offset + length:
                    self._dirty(s)
                os.posix_fallocate(s.fd, offset, length)
            except OSError as e:
                self._poison(s, e)
                raise
            s.size = max(s.size, offset + length)

    def _poison(self, s: Staged, e: OSError) -> None:
        """A write that failed (the writer was told): what the file holds now was never meant,
        so no close or fsync of it may store it (until it is truncated to nothing)."""
        s.poisoned = e.errno or errno.EIO
        s.dirty = True
        log.error("writing %s/%s failed (%s): the file will not be stored", s.branch, s.path, e)

    def flush(self, s: Staged) -> None:
        """Store the file if it was written (close/fsync): ingest + pending entry, durable on return."""
        with s.lock:
            if s.poisoned:
                if s.path is None:
                    return
                err = IngestFailed(f"{s.branch}/{s.path}: not stored: an earlier write to it failed "
                                   f"({os.strerror(s.poisoned)})")
                err.errno = s.poisoned
                raise err
            if not s.dirty:
                return
            if s.path is None:  # unlinked while open: nothing to keep
                s.dirty = False
                return
            self._materialize(s)
            try:
                with self.repo.writing():
                    with self.lock:
                        branch, path = s.branch, s.path
                        prev = self._prev_entry(branch, path)
                    _fail_hook(path)
                    t0 = time.perf_counter()
                    entry, stats = self.repo.ingest_file(s.fs_path, path, prev, _kill_hook("ingest"))
                    entry = TreeEntry(entry.manifest, entry.size, s.mode)
                    log.info("stored %s/%s: %d bytes in %.2f s (%d new chunks, %d deduplicated, %d delta; "
                             "%d bytes stored)", branch, path, entry.size, time.perf_counter() - t0, stats.new_chunks,
                             stats.dedup_chunks, stats.delta_chunks, stats.stored)
                    _kill_hook("ingest-done")
                    with self.lock:
                        if s.path is not None:  # (renamed meanwhile: recorded under its new path)
                            head = self.repo.branch_head(s.branch)
                            self._apply(s.branch, head, {s.path: entry}, base=s.base, uid=s.uid)
                s.dirty = False
                s.failed = False
                s.durable = entry
                s.write_meta("ingested")
            except Exception as e:
                s.failed = True
                with contextlib.suppress(OSError):
                    s.write_meta("closed")
                code = e.errno if isinstance(e, (OSError, CoralError)) and e.errno else errno.EIO
                if "No space left" in str(e) or "MDB_MAP_FULL" in str(e):
                    code = errno.ENOSPC
                log.error("storing %s/%s failed (%s: %s): close/fsync returned the error; what it held is not "
                          "stored (a later successful close or fsync of the file stores what it holds then)",
                          s.branch, s.path, type(e).__name__, e)
                err = IngestFailed(f"{s.branch}/{s.path}: storing the file failed: {e}")
                err.errno = code
                raise err from e

    def release(self, s: Staged, writable: bool) -> None:
        with self.lock:
            st = self._state(s.branch)
            if writable:
                s.writers -= 1
                st.writers -= 1
                self._touch(st)
            last = s.handles == 1
        if last and s.dirty and not s.failed and not s.poisoned and s.path is not None:
            # written after the last close (e.g. through a shared mapping, then munmap): store it
            # now, as a last close would
            try:
                self.flush(s)
            except CoralError as e:
                log.error("%s/%s: written after its last close and not stored (%s)", s.branch, s.path, e)
        with self.lock:
            s.handles -= 1
            discarded = s.handles == 0 and s.dirty
            if s.handles == 0:
                self._drop(s)
        if self._thread is None or discarded:
            # (otherwise the commit thread deletes them, off the request path; a discarded file's
            # space is given back at once: it may be what filled the disk)
            self.empty_trash()

    def _drop(self, s: Staged) -> None:
        """Forget a staged file nobody has open (caller locks). Content that no close or fsync
        stored (a failed write or close) goes with it: the path shows again what was last
        stored there (or nothing, for a file that never was)."""
        if s.handles:
            return
        if s.path is not None:
            st = self._state(s.branch)
            if st.live.get(s.path) is s:
                del st.live[s.path]
                self.version += 1
            if s.dirty:
                log.warning("discarded %s/%s (%d bytes): %s", s.branch, s.path, s.size,
                            "a write to it failed" if s.poisoned else "its close failed" if s.failed
                            else "not stored")
                self._invalid.append(f"/{s.branch}/{s.path}")
                if not st.pend and not st.live and not st.writers:
                    st.first_pending = None
        with s.lock:
            fd, s.fd = s.fd, None
            if fd is not None:
                os.close(fd)
        # deleting a large file that was just written and read takes tens of ms: not under the lock
        self._trash += [s.fs_path, s.meta_path]

    def empty_trash(self) -> None:
        """Delete the staged files of dropped ones (call without holding ``self.lock``)."""
        with self.lock:
            trash, self._trash = self._trash, []
        for p in trash:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    def _prev_entry(self, branch: str, path: str) -> TreeEntry | None:
        """The version a new one of ``path`` deltas against: pending, else the head's (caller locks)."""
        it = self._state(branch).pend.get(path)
        if it is not None:
            return it.entry
        return durable_entry(self.repo, branch, path, self.repo.branch_head(branch))

    # -- namespace ------------------------------------------------------------
    def _apply(self, branch: str, head: bytes | None, durable: Mapping[str, TreeEntry | None], *,
               base: bytes | None | bool = False, head_files: Mapping[str, TreeEntry] | None = None,
               uid: int | None = None) -> None:
        """Record pending entries (None: deleted) for ``branch`` in one transaction and in memory
        (caller holds ``self.lock``). A path already pending keeps its base (the oldest)."""
        st = self._state(branch)
        if head_files is None:
            head_files = self.repo.tree(head).entries if head else {}
        now = time.time()
        if uid is None:
            uid = request_uid()
        new: dict[str, PendItem | None] = {}
        for p, e in durable.items():
            old = st.pend.get(p)
            b = old.base if old is not None else (head if base is False else base)
            if e is None:
                new[p] = PendItem(None, b, now, uid) if p in head_files else None
            else:  # the head's own version again: nothing pending
                new[p] = None if head_files.get(p) == e else PendItem(e, b, now, uid)

        def fn(t: Txn) -> None:
            for p, it in new.items():
                if it is None:
                    t.delete("index", keys.pending_key(branch, p))
                else:
                    put_pend(t, branch, p, it)

        self.repo.store.write(fn)
        for p, it in new.items():
            if it is None:
                st.pend.pop(p, None)
            else:
                st.pend[p] = it
        if st.pend and st.first_pending is None:
            st.first_pending = self.clock()
        elif not st.pend:
            st.first_pending = None
        self.version += 1
        self._touch(st)

    def change(self, branch: str, head: bytes | None, head_files: Mapping[str, TreeEntry], *,
               durable: Mapping[str, TreeEntry | None] = {}, bind: Mapping[str, Staged | None] = {},
               unbind: tuple[Staged, ...] = (), add_dirs: tuple[str, ...] = (), remove_dirs: tuple[str, ...] = ()
               ) -> None:
        """One namespace change (unlink, rename, mkdir, rmdir, chmod): durable entries, staged
        files bound to paths or unbound (unlinked), session directories. Caller holds the lock."""
        st = self._state(branch)
        if durable:
            self._apply(branch, head, durable, head_files=head_files)
        for p, s in bind.items():
            if s is None:
                st.live.pop(p, None)
            else:
                st.live[p] = s
                if s.path != p:
                    s.path = p
                    with contextlib.suppress(OSError):
                        s.write_meta()
        for s in unbind:
            if s.path is not None and st.live.get(s.path) is s:
                del st.live[s.path]  # (a file renamed over it: the path shows that one now)
            s.path = None
            with contextlib.suppress(OSError):
                s.write_meta()
            self._drop(s)
        st.dirs.difference_update(remove_dirs)
        st.dirs.update(d for d in add_dirs if d)
        self.version += 1
        self._touch(st)

    # -- branches -----------------------------------------------------------------
    def create_branch(self, name: str) -> bytes:
        """``mkdir MOUNT/NAME``: a branch at the default branch's head (an empty first commit if
        the default branch has none yet)."""
        refs.check_ref_name(name)
        head = self.repo.branch_head(self.repo.default_branch)
        if head is not None:
            return self.repo.create_branch(name, head.hex())
        try:
            return self.repo.commit_changes(name, {}, f"mount: create branch {name}", expected_head=None,
                                            allow_empty=True, meta={"via": "mount"})
        except ConcurrentUpdate:
            raise RefExists(f"branch {name!r} already exists") from None

    def delete_branch(self, name: str, head: bytes) -> None:
        """``rmdir MOUNT/NAME`` of an empty branch directory (the caller checked it shows no files):
        the ref goes (compare-and-swap) and so do its pending entries (all deletions)."""
        with self.lock:
            st = self.branches.get(name)
            if st is not None and (st.live or st.writers):
                raise DirectoryNotEmpty(f"{name}: files are being written")
            if self.repo.current_branch() == name:
                raise Busy(f"{name} is the repository's checked-out branch (HEAD)")
            try:
                self.repo.delete_branch(name, expected=head)
            except ConcurrentUpdate:
                raise DirectoryNotEmpty(f"{name}: the branch moved meanwhile") from None
            prefix = keys.pending_prefix(name)

            def fn(t: Txn) -> None:
                for k in list(t.keys("index", prefix)):
                    t.delete("index", k)

            self.repo.store.write(fn)
            self.branches.pop(name, None)
            self.version += 1
        log.info("branch %s deleted (rmdir through the mount)", name)

    # -- commits --------------------------------------------------------------------
    def commit(self, branch: str, raise_conflict: bool = False) -> bytes | None:
        """Commit the branch's pending entries now (no quiet period)."""
        with self.lock:
            st = self._state(branch)
            # a file open for writing is never committed (its last close decides what it holds)
            hold = {p for p, s in st.live.items() if s.writers > 0}
            try:
                out = commit_pending(self.repo, branch, hold=hold)
            finally:
                self._reload(branch)
            if out.commit is not None:
                self.commit_count += 1
                log.info("committed %s on %s: %s", out.commit.hex()[:12], branch, out.message.splitlines()[0])
                for s in st.live.values():  # what they saw is in the new commit
                    if (s.base or None) == out.parent:
                        s.base = out.commit
            if out.conflicts:
                self._invalid += [f"/{branch}/{p}" for p in out.refused] + [f"/{branch}"]
                self.version += 1
                self.refused.append({"branch": branch, "conflict": out.conflict_id, "paths": out.refused,
                                     "conflicts": out.conflicts, "reason": out.reason, "time": time.time()})
                if raise_conflict:
                    raise ConcurrentUpdate(f"{branch}: {', '.join(out.conflicts)} {out.reason}; the mount's "
                                           f"versions are kept as conflict {out.conflict_id} (`coralfs flush-mount "
                                           f"--conflicts`)" + (" (the rest was committed)" if out.commit else ""))
            return out.commit

    def _reload(self, branch: str) -> None:
        st = self._state(branch)
        prefix = keys.pending_prefix(branch)
        with self.repo.store.read() as t:
            st.pend = {keys.path_of_raw(prefix, k, v): PendItem.decode(v) for k, v in t.items("index", prefix)}
        st.first_pending = (st.first_pending or self.clock()) if st.pend else None
        self.version += 1

    def sync(self, branch: str) -> bytes | None:
        """``fsync`` of a branch directory: commit its pending changes now (files still open for
        writing stay pending)."""
        return self.commit(branch, raise_conflict=True)

    def sync_all(self) -> None:
        with self.lock:
            names = list(self.branches)
        for b in names:
            self.sync(b)

    def tick(self, now: float | None = None) -> list[str]:
        """One round of the commit loop at ``now`` (default ``self.clock()``): commit each branch
        whose pending changes are due -- ``commit_delay`` seconds without activity, something
        pending that is not open for writing, no open-for-write handle on the branch unless its
        first pending change is ``max_hold`` seconds old, and not waiting to retry a failed commit
        (a failure is logged and the branch tried again ``RETRY_SECONDS`` later). Returns the
        branches it tried to commit. The commit thread runs it every tick; a test calls it."""
        if now is None:
            now = self.clock()
        due = []
        with self.lock:
            for name, st in self.branches.items():
                if not st.pend or now < st.retry_at or now - st.last_activity < self.commit_delay:
                    continue
                held = {p for p, s in st.live.items() if s.writers > 0}
                if all(p in held for p in st.pend):
                    continue  # only files still open for writing: nothing to commit yet
                if st.writers == 0 or (st.first_pending is not None and now - st.first_pending >= self.max_hold):
                    due.append((name, st))
        for name, st in due:
            try:
                self.commit(name)
            except Exception as e:
                st.retry_at = max(now, self.clock()) + RETRY_SECONDS
                log.error("committing the mount's changes to %s failed (%s: %s); retrying in %.0f s", name,
                          type(e).__name__, e, RETRY_SECONDS)
        if self._trash:
            self.empty_trash()
        return [name for name, _ in due]

    def _run(self) -> None:
        tick = max(0.02, min(0.1, self.commit_delay / 4))
        while not self._stop.wait(tick):
            self.tick()


def _kill_hook(point: str) -> Callable[[int, int], None] | None:
    """Test hook (``CORALFS_MOUNT_KILL_AT``): SIGKILL this process at ``point``."""
    if os.environ.get(KILL_ENV) != point:
        return None
    if point == "ingest":
        def progress(done: int, total: int) -> None:
            if total and done >= total // 2:
                log.warning("test hook: SIGKILL halfway through an ingest")
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)

        return progress
    log.warning("test hook: SIGKILL at %s", point)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
    return None


def _fail_hook(path: str) -> None:
    """Test hook (``CORALFS_MOUNT_FAIL_INGEST``): fail an ingest as a full disk would."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    text, _, n = spec.rpartition(":")
    if text in path and _fail_counts.get(text, 0) < int(n):
        _fail_counts[text] = _fail_counts.get(text, 0) + 1
        raise OSError(errno.ENOSPC, "No space left on device (test hook)")


def exec_mode(mode: int) -> int:
    return MODE_EXEC if mode & 0o111 else MODE_FILE
