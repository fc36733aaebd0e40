"""The mount's write semantics without FUSE: MountView + Writer against a model, on an injected clock.

``MountModel`` (a Hypothesis state machine) drives a ``MountView`` over a ``Writer`` started
with ``background=False`` (no commit thread) whose clock is the machine's own, so the
quiet-period commits happen when the machine advances its clock and calls
``Writer.tick()`` -- no sleeps, no real time. Next to it runs a plain model of one branch:

* ``history``: the branch's trees (path -> bytes and exec bit), one per commit; the last is
  the head. A commit by "another process" (the Repository API) appends one too.
* ``pend``: what close/fsync/unlink/rename/chmod recorded and no commit took yet
  (path -> new content or deletion, and the commit it was based on).
* open files (``MInode``: what a file open through the mount holds, where it is bound,
  its last stored content, writers, failed/poisoned) and handles (writers, readers of a
  file being written, readers of a stored version: a snapshot).
* the directories the branch shows (POSIX: they stay until rmdir).

What the mount shows is the head, overlaid with ``pend``, overlaid with the files open
through it. The rules: create (O_EXCL or not, O_TRUNC or not), open an existing file for
writing (O_TRUNC, O_APPEND, or neither), open for reading, write at any offset (holes),
ftruncate and truncate(2) (grow and shrink), fsync, close (flush + release), release
without flush (a shared mapping written after close), rename of files and directories
(RENAME_NOREPLACE; replacing a file or an empty directory), unlink (also of an open file),
mkdir, rmdir, chmod +x/-x, fsync of the branch directory (commit now), the clock advancing
(a burst quiet for ``commit_delay`` is committed, never a file still open for writing; a
handle open for ``max_hold`` stops holding the others back), and a commit by another
process to a file the mount also changed or to another one (the overlapping paths are set
aside under ``pend-conflict``, the rest is committed). Failures are injected: a write
whose ``pwrite`` fails with ENOSPC (the file is poisoned: no close stores it), and an
ingest that fails at close or fsync (``CORALFS_MOUNT_FAIL_INGEST``: that call's error).

After every step: every path the view lists (and nothing else) reads back what the model
says (bytes, size, exec bit; ``getattr``, and through a fresh handle), every open handle
reads and ``fgetattr``-s what the model says, the branch head (and the number of
commits) is the model's last commit -- so nothing unacknowledged (a file still open for
writing, a failed write or close) is ever committed --, the durable pending entries
(path, content, base commit) and the conflicts set aside are the model's. At the end the
writer is closed (the unmount): everything acknowledged is committed.

File paths and directory paths are disjoint sets of names (a name is never a file at one
time and a directory at another), which keeps the error cases the kernel resolves itself
(a path through a file) out of the view's model. Readers of stored versions are opened
with an inode number of their own, as the FUSE adapter does: the view's fallback for
handles without one (readers by path follow a writer that opens the path) is not the
mount's behaviour.

The quick profile runs in seconds; ``HYPOTHESIS_PROFILE=deep`` (``make test-deep``) runs
many more and longer programs.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from coralfs.errors import CoralError
from coralfs.mount import writer as writer_mod
from coralfs.mount.namespace import RENAME_NOREPLACE
from coralfs.mount.pending import PendItem, list_conflicts
from coralfs.mount.view import MountView
from coralfs.mount.writer import Writer
from coralfs.repository import Repository
from coralfs.store import keys
from coralfs.store.objects import MODE_EXEC, MODE_FILE, TreeEntry
from tests.depth import DEEP

DELAY = 1.5  # the writer's commit_delay (seconds of the machine's clock)
MAX_HOLD = 60.0
BRANCH = "main"
T0 = 1000.0

DIRS = ("d", "e", "d/e")  # directory paths (never files)
FILES = tuple(f"{p}/{n}" if p else n for p in ("", "d", "e", "d/e") for n in ("a", "b"))  # (never directories)
TOP = ("a", "b")  # what "another process" commits (top-level files only: its deletions never empty a directory)
SEED = {"a": (b"seed a " * 40, False), "d/b": (b"seed d/b", False), "d/e/a": (b"#!/bin/sh\n", True)}


@dataclass(frozen=True)
class F:
    """A stored file: content and exec bit."""

    data: bytes
    exe: bool = False


@dataclass(eq=False)
class MInode:
    """A file open through the mount (the writer's ``Staged``)."""

    data: bytearray
    exe: bool
    path: str | None  # where it is bound (None: unlinked or renamed over)
    base: int  # index in history of the head it was opened at
    stored: F | None  # what a close last stored of it (None: nothing: the path then shows nothing)
    handles: int = 0
    writers: int = 0
    dirty: bool = False  # written since it was last stored
    failed: bool = False  # its last store failed
    poisoned: int = 0  # errno of a write that failed

    def snapshot(self) -> F:
        return F(bytes(self.data), self.exe)


@dataclass(eq=False)
class MHandle:
    fh: int
    inode: MInode | None  # a file being written (None: a reader of a stored version)
    snap: F | None = None
    writable: bool = False
    append: bool = False

    def content(self) -> bytes:
        return bytes(self.inode.data) if self.inode is not None else self.snap.data  # type: ignore[union-attr]


@dataclass
class Model:
    history: list[dict[str, F]]
    dirs: set[str]
    pend: dict[str, tuple[F | None, int]] = field(default_factory=dict)
    live: dict[str, MInode] = field(default_factory=dict)
    handles: dict[int, MHandle] = field(default_factory=dict)
    conflicts: list[dict[str, F | None]] = field(default_factory=list)
    now: float = T0
    last_activity: float = 0.0
    first_pending: float | None = None

    # -- what the branch shows
    @property
    def head(self) -> dict[str, F]:
        return self.history[-1]

    def acked(self, p: str) -> F | None:
        """What closes and namespace changes made of ``p`` (committed or pending)."""
        if p in self.pend:
            return self.pend[p][0]
        return self.head.get(p)

    def shown(self) -> dict[str, F]:
        out = {}
        for p in set(self.head) | set(self.pend) | set(self.live):
            f = self.live[p].snapshot() if p in self.live else self.acked(p)
            if f is not None:
                out[p] = f
        return out

    def is_file(self, p: str) -> bool:
        return p in self.live or self.acked(p) is not None

    def children(self, d: str) -> set[str]:
        pre = d + "/" if d else ""
        names = {p for p in self.shown() if p.startswith(pre)} | {x for x in self.dirs if x.startswith(pre)}
        return {x[len(pre):].split("/", 1)[0] for x in names}

    def parent_error(self, p: str) -> int:
        """The errno of creating ``p`` (0: its parent directory exists)."""
        parent = p.rpartition("/")[0]
        return 0 if not parent or parent in self.dirs else errno.ENOENT

    def inodes(self) -> list[MInode]:
        return list({id(h.inode): h.inode for h in self.handles.values() if h.inode is not None}.values())

    def writers(self) -> int:
        return sum(i.writers for i in self.inodes())

    def held(self) -> set[str]:
        return {p for p, i in self.live.items() if i.writers > 0}

    # -- changes
    def touch(self) -> None:
        self.last_activity = self.now

    def record(self, changes: dict[str, F | None], base: int | None = None) -> None:
        """Pending entries for ``changes`` (None: deleted). A path already pending keeps its base;
        the head's own version again is nothing pending."""
        for p, v in changes.items():
            old = self.pend.get(p)
            b = old[1] if old is not None else (len(self.history) - 1 if base is None else base)
            if v is None:
                new = (None, b) if p in self.head else None
            else:
                new = None if self.head.get(p) == v else (v, b)
            if new is None:
                self.pend.pop(p, None)
            else:
                self.pend[p] = new
        self._pending_changed()
        self.touch()

    def _pending_changed(self) -> None:
        if self.pend and self.first_pending is None:
            self.first_pending = self.now
        elif not self.pend:
            self.first_pending = None

    def commit(self) -> tuple[dict[str, F | None], list[str]]:
        """The mount commits what is pending and not open for writing: (changes, conflicts)."""
        held = self.held()
        items = {p: v for p, v in self.pend.items() if p not in held}
        if not items:
            return {}, []
        cur_i = len(self.history) - 1
        cur = self.head
        conflicts = sorted(p for p, (_, b) in items.items() if b != cur_i and self.history[b].get(p) != cur.get(p))
        if conflicts:
            self.conflicts.append({p: items[p][0] for p in conflicts})
        for p in items:
            del self.pend[p]
        changes = {p: v for p, (v, _) in items.items() if p not in conflicts and cur.get(p) != v
                   and not (v is None and p not in cur)}
        if changes:
            new = dict(cur)
            for p, v in changes.items():
                if v is None:
                    new.pop(p, None)
                else:
                    new[p] = v
            self.history.append(new)
            for i in self.live.values():  # what they saw is in the new commit
                if i.base == cur_i:
                    i.base = cur_i + 1
        if self.pend:
            self.first_pending = self.first_pending or self.now
        else:
            self.first_pending = None
        return changes, conflicts

    def due(self) -> bool:
        """The quiet period: pending changes, no activity for DELAY, no writer (or one held too long)."""
        return bool(self.pend) and self.now - self.last_activity >= DELAY and (
            self.writers() == 0 or (self.first_pending is not None and self.now - self.first_pending >= MAX_HOLD))


def describe(changes: dict[str, F | None], old: dict[str, F]) -> str:
    items = [f"update {p}" for p in sorted(changes) if changes[p] is not None and p in old]
    items += [f"add {p}" for p in sorted(changes) if changes[p] is not None and p not in old]
    items += [f"remove {p}" for p in sorted(changes) if changes[p] is None]
    if len(items) <= 6:
        return "mount: " + ", ".join(items)
    n = {v: sum(1 for i in items if i.startswith(v + " ")) for v in ("update", "add", "remove")}
    return (f"mount: {', '.join(items[:6])} and {len(items) - 6} more ("
            + ", ".join(f"{v} {k}" for v, k in n.items() if k) + " files)\n\n" + "\n".join(items))


@contextlib.contextmanager
def failing_pwrite() -> Iterator[None]:
    """Every ``os.pwrite`` fails as on a full disk (the writer's staged file), while inside."""
    real = os.pwrite

    def pwrite(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device (test)")

    os.pwrite = pwrite  # type: ignore[assignment]
    try:
        yield
    finally:
        os.pwrite = real


@contextlib.contextmanager
def failing_ingest(path: str) -> Iterator[None]:
    """The next ingest of ``path`` fails with ENOSPC (the writer's ``CORALFS_MOUNT_FAIL_INGEST`` hook)."""
    old = os.environ.get(writer_mod.FAIL_ENV)
    os.environ[writer_mod.FAIL_ENV] = f"{path}:1"
    writer_mod._fail_counts.clear()
    try:
        yield
    finally:
        writer_mod._fail_counts.clear()
        if old is None:
            del os.environ[writer_mod.FAIL_ENV]
        else:
            os.environ[writer_mod.FAIL_ENV] = old


def errno_of(fn: Callable[[], object]) -> tuple[int, object]:
    """(0, result) or (errno, None) of a view call."""
    try:
        return 0, fn()
    except (CoralError, OSError) as e:
        assert e.errno, f"{type(e).__name__} without an errno: {e}"
        return e.errno, None


def mpath(p: str) -> str:
    return f"/{BRANCH}/{p}" if p else f"/{BRANCH}"


def entry_f(repo: Repository, e: TreeEntry, cache: dict[bytes, bytes]) -> F:
    if e.manifest not in cache:
        cache[e.manifest] = repo.file_view(e.manifest).pread(0, e.size + 1)
    return F(cache[e.manifest], e.mode == MODE_EXEC)


def new_repo(root: Path) -> Repository:
    repo = Repository.init(root, auto_repack=False)
    src = root.parent / "seed.tmp"
    changes = {}
    for p, (data, exe) in SEED.items():
        src.write_bytes(data)
        e, _ = repo.ingest_file(src, p)
        changes[p] = TreeEntry(e.manifest, e.size, MODE_EXEC if exe else MODE_FILE)
    src.unlink()
    repo.commit_changes(BRANCH, changes, "seed")
    return repo


# ====================================================================== the state machine
class MountModel(RuleBasedStateMachine):
    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(dir=tmp))
        self.repo = new_repo(self.dir / "repo")
        self.clock = T0
        self.w = Writer(self.repo, commit_delay=DELAY, max_hold=MAX_HOLD, clock=lambda: self.clock)
        self.w.start(background=False)
        self.v = MountView(self.repo, writer=self.w, prefetch_bytes=0)
        self.m = Model([{p: F(d, x) for p, (d, x) in SEED.items()}], {"d", "d/e"})
        self.ids = [self.repo.branch_head(BRANCH)]  # model history index -> commit id
        self.inos = itertools.count(1 << 40)  # inode numbers of readers (as the FUSE adapter passes them)
        self.blobs: dict[bytes, bytes] = {}
        self.other = itertools.count()

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is not None:
                return  # (a step failed: that is the error to report)
            for fh in sorted(self.m.handles):  # close everything, as the processes would on exit
                self._close(fh)
            self.w.close()  # the unmount: everything acknowledged is committed
            changes, conflicts = self.m.commit()
            self._check_commit(changes, conflicts)
            assert not self._lmdb_pending()
            assert not os.path.exists(self.w.session_dir)
        finally:
            self.v.close()
            self.repo.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers
    def _expect(self, want: int, fn: Callable[[], object], what: str) -> object:
        got, res = errno_of(fn)
        assert got == want, f"{what}: errno {errno.errorcode.get(got, got)}, the model says " \
                            f"{errno.errorcode.get(want, want)}"
        return res

    @staticmethod
    def _pick(data: st.DataObject, likely: list[str] | tuple[str, ...], anyof: tuple[str, ...], label: str) -> str:
        """Mostly a path the operation succeeds on (``likely``), sometimes any (the errors)."""
        if likely and data.draw(st.integers(0, 5), label=f"{label}: likely"):
            return data.draw(st.sampled_from(sorted(likely)), label=label)
        return data.draw(st.sampled_from(anyof), label=label)

    def _files(self) -> list[str]:
        return sorted(self.m.shown())

    def _handles(self, writable: bool | None = None) -> list[int]:
        return sorted(fh for fh, h in self.m.handles.items() if writable is None or h.writable == writable)

    def _bind_write(self, p: str, truncate: bool, append: bool = False) -> MInode:
        """Model of opening ``p`` (a file) for writing: its open file, or a new one."""
        m = self.m
        i = m.live.get(p)
        if i is None:
            cur = m.acked(p)
            keep = cur is not None and not truncate
            i = MInode(bytearray(cur.data) if keep else bytearray(), cur.exe if cur else False, p,
                       len(m.history) - 1, cur if keep else None)
            m.live[p] = i
        i.handles += 1
        i.writers += 1
        m.touch()
        return i

    def _truncate(self, i: MInode, length: int) -> None:
        del i.data[length:]
        i.data.extend(bytes(length - len(i.data)))
        i.dirty, i.failed = True, False
        if length == 0:
            i.poisoned = 0
        self.m.touch()

    def _store(self, i: MInode, fail: bool = False) -> int:
        """Model of close/fsync of a written file: the errno it returns."""
        if i.poisoned:
            return 0 if i.path is None else i.poisoned
        if not i.dirty:
            return 0
        if i.path is None:  # unlinked while open: nothing to keep
            i.dirty = False
            return 0
        if fail:
            i.failed = True
            return errno.ENOSPC
        f = i.snapshot()
        self.m.record({i.path: f}, base=i.base)
        i.stored, i.dirty, i.failed = f, False, False
        return 0

    def _release(self, h: MHandle) -> None:
        i = h.inode
        if i is None:
            return
        if h.writable:
            i.writers -= 1
            self.m.touch()
        if i.handles == 1 and i.dirty and not i.failed and not i.poisoned and i.path is not None:
            self._store(i)  # written after its last close (a shared mapping): stored as a close would
        i.handles -= 1
        if i.handles == 0 and i.path is not None and self.m.live.get(i.path) is i:
            del self.m.live[i.path]  # content no close stored goes with it

    def _close(self, fh: int, fail: bool = False) -> None:
        h = self.m.handles.pop(fh)
        want = self._store(h.inode, fail) if h.writable and h.inode is not None else 0
        with failing_ingest(h.inode.path) if fail and h.inode is not None and h.inode.path else \
                contextlib.nullcontext():
            got, _ = errno_of(lambda: self.v.flush(fh))
        self.v.release(fh)
        self._release(h)
        assert got == want, f"close: errno {got}, the model says {want}"

    def _check_commit(self, changes: dict[str, F | None], conflicts: list[str]) -> None:
        """After the model committed: did the mount make the same commit (or none)?"""
        head = self.repo.branch_head(BRANCH)
        if changes:
            assert head != self.ids[-1], f"the mount made no commit; the model committed {sorted(changes)}"
            c = self.repo.get_commit(head)
            assert c.parents == (self.ids[-1],)
            assert c.message == describe(changes, self.m.history[-2]), c.message
            self.ids.append(head)
        else:
            assert head == self.ids[-1], f"the mount committed {self.repo.get_commit(head).message!r}; the model " \
                                         f"had nothing to commit"

    def _lmdb_pending(self) -> dict[str, PendItem]:
        with self.repo.store.read() as t:
            return {keys.pending_path(k, v)[1]: PendItem.decode(v) for k, v in t.items(keys.INDEX, keys.PENDING)}

    # -- files
    @rule(data=st.data(), excl=st.booleans(), trunc=st.booleans(), exe=st.booleans())
    def create(self, data: st.DataObject, excl: bool, trunc: bool, exe: bool) -> None:
        m = self.m
        new = [f for f in FILES if not m.is_file(f) and not m.parent_error(f)]
        p = self._pick(data, new + self._files(), FILES + tuple(d for d in DIRS if d in m.dirs), "path")
        exists = m.is_file(p)
        want = m.parent_error(p) or (errno.EISDIR if p in m.dirs else errno.EEXIST if exists and excl else 0)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if excl else 0) | (os.O_TRUNC if trunc else 0)
        fh = self._expect(want, lambda: self.v.create(mpath(p), flags, 0o755 if exe else 0o644), f"create {p}")
        if want:
            return
        new = not exists
        i = self._bind_write(p, truncate=trunc or new)
        if new and i.handles == 1:
            i.exe = exe
        if trunc or new:
            self._truncate(i, 0)
        m.handles[fh] = MHandle(fh, i, writable=True)  # type: ignore[index]

    @rule(data=st.data(), mode=st.sampled_from(["w", "r+", "a", "w-rdwr"]))
    def open_for_writing(self, data: st.DataObject, mode: str) -> None:
        m = self.m
        p = self._pick(data, self._files(), FILES + DIRS, "path")
        trunc = mode in ("w", "w-rdwr")
        flags = {"w": os.O_WRONLY | os.O_TRUNC, "r+": os.O_RDWR, "a": os.O_WRONLY | os.O_APPEND,
                 "w-rdwr": os.O_RDWR | os.O_TRUNC}[mode]
        want = 0 if m.is_file(p) else errno.EISDIR if p in m.dirs else errno.ENOENT
        fh = self._expect(want, lambda: self.v.open(mpath(p), flags), f"open {p} {mode}")
        if want:
            return
        i = self._bind_write(p, truncate=trunc)
        if trunc:
            self._truncate(i, 0)
        m.handles[fh] = MHandle(fh, i, writable=True, append=mode == "a")  # type: ignore[index]

    @rule(data=st.data())
    def open_for_reading(self, data: st.DataObject) -> None:
        m = self.m
        p = self._pick(data, self._files(), FILES + DIRS, "path")
        want = 0 if m.is_file(p) else errno.EISDIR if p in m.dirs else errno.ENOENT
        fh = self._expect(want, lambda: self.v.open(mpath(p), os.O_RDONLY, ino=next(self.inos)), f"open {p} ro")
        if want:
            return
        i = m.live.get(p)
        if i is not None:
            i.handles += 1
            m.handles[fh] = MHandle(fh, i)  # type: ignore[index]
        else:
            m.handles[fh] = MHandle(fh, None, m.acked(p))  # type: ignore[index]

    @precondition(lambda self: self._handles(writable=True))
    @rule(data=st.data(), writes=st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 400), st.integers(0, 9)),
                                          min_size=1, max_size=3))
    def write(self, data: st.DataObject, writes: list[tuple[int, int, int]]) -> None:
        """Writes at any offsets (beyond the end: a hole of zeros); one in ten fails (ENOSPC)."""
        fh = data.draw(st.sampled_from(self._handles(writable=True)), label="fh")
        h = self.m.handles[fh]
        i = h.inode
        assert i is not None
        for offset, size, fail in writes:
            payload = random.Random(data.draw(st.integers(0, 1 << 32), label="seed")).randbytes(size)
            if fail == 0:
                with failing_pwrite():
                    self._expect(errno.ENOSPC, lambda: self.v.write(fh, offset, payload), "write")  # noqa: B023
                i.poisoned, i.dirty, i.failed = errno.ENOSPC, True, False
                continue
            n = self._expect(0, lambda: self.v.write(fh, offset, payload), "write")  # noqa: B023
            assert n == size
            if h.append:
                offset = len(i.data)
            if size:  # (a write of nothing extends nothing)
                i.data.extend(bytes(max(0, offset - len(i.data))))
                i.data[offset:offset + size] = payload
            i.dirty, i.failed = True, False
            self.m.touch()

    @precondition(lambda self: self._handles(writable=True))
    @rule(data=st.data(), length=st.integers(0, 7000))
    def ftruncate(self, data: st.DataObject, length: int) -> None:
        fh = data.draw(st.sampled_from(self._handles(writable=True)), label="fh")
        self._expect(0, lambda: self.v.truncate(None, length, fh), "ftruncate")
        self._truncate(self.m.handles[fh].inode, length)  # type: ignore[arg-type]

    @rule(data=st.data(), length=st.integers(0, 7000))
    def truncate_path(self, data: st.DataObject, length: int) -> None:
        """truncate(2): like open, ftruncate, close (stored at once unless others write it)."""
        m = self.m
        p = self._pick(data, self._files(), FILES + DIRS, "path")
        if not m.is_file(p):
            self._expect(errno.EISDIR if p in m.dirs else errno.ENOENT, lambda: self.v.truncate(mpath(p), length),
                         f"truncate {p}")
            return
        i = self._bind_write(p, truncate=False)
        self._truncate(i, length)
        want = self._store(i) if i.writers == 1 else 0
        self._release(MHandle(-1, i, writable=True))
        self._expect(want, lambda: self.v.truncate(mpath(p), length), f"truncate {p}")

    @precondition(lambda self: self.m.handles)
    @rule(data=st.data(), fail=st.integers(0, 5))
    def close(self, data: st.DataObject, fail: int) -> None:
        """close(): flush (stores a written file; its error is close's) and release."""
        fh = data.draw(st.sampled_from(self._handles()), label="fh")
        self._close(fh, fail=fail == 0)

    @precondition(lambda self: self._handles(writable=True))
    @rule(data=st.data(), fail=st.integers(0, 5))
    def fsync(self, data: st.DataObject, fail: int) -> None:
        fh = data.draw(st.sampled_from(self._handles(writable=True)), label="fh")
        i = self.m.handles[fh].inode
        assert i is not None
        want = self._store(i, fail == 0)
        with failing_ingest(i.path) if fail == 0 and i.path else contextlib.nullcontext():
            self._expect(want, lambda: self.v.fsync(fh), "fsync")

    @precondition(lambda self: self._handles(writable=True))
    @rule(data=st.data())
    def release_without_flush(self, data: st.DataObject) -> None:
        """The last reference of a file written through a shared mapping after its close goes."""
        fh = data.draw(st.sampled_from(self._handles(writable=True)), label="fh")
        h = self.m.handles.pop(fh)
        self.v.release(fh)
        self._release(h)

    # -- the namespace
    @rule(data=st.data(), noreplace=st.booleans())
    def rename(self, data: st.DataObject, noreplace: bool) -> None:
        m = self.m
        old = self._pick(data, self._files() + sorted(m.dirs), FILES + DIRS, "old")
        is_file = m.is_file(old)
        # a file goes to a file path, a directory to a directory path (the other kind: where one is)
        other = tuple(x for x in DIRS if x in m.dirs) if is_file else tuple(x for x in FILES if m.is_file(x))
        new = data.draw(st.sampled_from((FILES if is_file else DIRS) + other), label="new")
        dst_file, dst_dir = m.is_file(new), new in m.dirs
        if not is_file and old not in m.dirs:
            want = errno.ENOENT
        elif old == new:
            want = 0
        else:
            want = m.parent_error(new) or (
                errno.EEXIST if noreplace and (dst_file or dst_dir) else
                (errno.EISDIR if dst_dir else 0) if is_file else
                errno.ENOTDIR if dst_file else
                errno.EINVAL if new.startswith(old + "/") else
                errno.ENOTEMPTY if dst_dir and m.children(new) else 0)
        self._expect(want, lambda: self.v.rename(mpath(old), mpath(new), RENAME_NOREPLACE if noreplace else 0),
                     f"rename {old} -> {new}")
        if want or old == new:
            return
        shown = m.shown()
        moves = [(old, new)] if is_file else [(p, new + p[len(old):]) for p in sorted(shown)
                                              if p.startswith(old + "/")]
        changes: dict[str, F | None] = {p: None for p, _ in moves}
        replaced = m.live.pop(new, None) if is_file else None
        if replaced is not None:
            replaced.path = None
        moved = {}
        for p, q in moves:
            i = m.live.pop(p, None)
            changes[q] = i.stored if i is not None else shown[p]
            if i is not None:
                moved[q] = i
        m.record(changes)
        for q, i in moved.items():
            i.path = q
            m.live[q] = i
        if not is_file:
            under = {d for d in m.dirs if d == old or d.startswith(old + "/")}
            m.dirs = (m.dirs - under) | {new + d[len(old):] for d in under}

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        m = self.m
        p = self._pick(data, self._files(), FILES + DIRS, "path")
        want = 0 if m.is_file(p) else errno.EISDIR if p in m.dirs else errno.ENOENT
        self._expect(want, lambda: self.v.unlink(mpath(p)), f"unlink {p}")
        if want:
            return
        m.record({p: None})
        i = m.live.pop(p, None)
        if i is not None:
            i.path = None  # open handles keep it (read, write, fstat); nothing stores it

    @rule(data=st.data())
    def mkdir(self, data: st.DataObject) -> None:
        m = self.m
        new = [d for d in DIRS if d not in m.dirs and not m.parent_error(d)]
        p = self._pick(data, new, DIRS + tuple(f for f in FILES if m.is_file(f)), "path")
        want = errno.EEXIST if p in m.dirs or m.is_file(p) else m.parent_error(p)
        self._expect(want, lambda: self.v.mkdir(mpath(p)), f"mkdir {p}")
        if not want:
            m.dirs.add(p)
            m.touch()

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        m = self.m
        p = self._pick(data, [d for d in m.dirs if not m.children(d)], DIRS + FILES, "path")
        want = errno.ENOTDIR if m.is_file(p) else errno.ENOENT if p not in m.dirs else \
            errno.ENOTEMPTY if m.children(p) else 0
        self._expect(want, lambda: self.v.rmdir(mpath(p)), f"rmdir {p}")
        if not want:
            m.dirs.discard(p)
            m.touch()

    @rule(data=st.data(), exe=st.booleans())
    def chmod(self, data: st.DataObject, exe: bool) -> None:
        """The executable bit is stored (a file being written takes it at its next store)."""
        m = self.m
        p = self._pick(data, self._files(), FILES + DIRS, "path")
        want = 0 if m.is_file(p) or p in m.dirs else errno.ENOENT
        self._expect(want, lambda: self.v.chmod(mpath(p), 0o755 if exe else 0o644), f"chmod {p}")
        if want or p in m.dirs:
            return
        i = m.live.get(p)
        if i is not None:
            if i.exe == exe:
                return
            i.exe = exe
            if not i.dirty and i.stored is not None:
                i.stored = F(i.stored.data, exe)
                m.record({p: i.stored})
            m.touch()
        else:
            cur = m.acked(p)
            assert cur is not None
            if cur.exe != exe:
                m.record({p: F(cur.data, exe)})

    # -- commits
    @rule(dt=st.sampled_from([0.2, DELAY / 2, DELAY, DELAY + 0.1, 7.0, MAX_HOLD]))
    def advance_clock(self, dt: float) -> None:
        """Time passes; the commit loop runs a round (a quiet burst is committed)."""
        self.clock = self.m.now = self.clock + dt
        changes: dict[str, F | None] = {}
        conflicts: list[str] = []
        if self.m.due():
            changes, conflicts = self.m.commit()
        self.w.tick()
        self._check_commit(changes, conflicts)

    @rule()
    def fsync_branch_dir(self) -> None:
        """fsync of the branch directory: commit now (a conflict is its error, EAGAIN)."""
        changes, conflicts = self.m.commit()
        self._expect(errno.EAGAIN if conflicts else 0, lambda: self.v.fsyncdir(mpath("")), "fsync of the branch")
        self._check_commit(changes, conflicts)

    @rule(data=st.data(), delete=st.integers(0, 3))
    def commit_by_another_process(self, data: st.DataObject, delete: int) -> None:
        """Someone commits to the branch through the Repository API meanwhile (a file the mount
        changed too, or another one)."""
        m = self.m
        p = data.draw(st.sampled_from(TOP), label="path")
        if delete == 0 and p in m.head:
            new = dict(m.head)
            del new[p]
            self.repo.commit_changes(BRANCH, {p: None}, f"other: remove {p}")
        else:
            f = F(f"other {next(self.other)} ".encode() * 7, False)
            src = self.dir / "other.tmp"
            src.write_bytes(f.data)
            e, _ = self.repo.ingest_file(src, p)
            self.repo.commit_changes(BRANCH, {p: e}, f"other: write {p}")
            new = {**m.head, p: f}
        m.history.append(new)
        self.ids.append(self.repo.branch_head(BRANCH))

    # -- what must always hold
    @invariant()
    def the_view_shows_the_model(self) -> None:
        m = self.m
        want = m.shown()
        files: set[str] = set()
        dirs: set[str] = set()
        todo = [""]
        while todo:
            d = todo.pop()
            for name, is_dir in self.v.scandir(mpath(d)):
                p = f"{d}/{name}" if d else name
                (dirs if is_dir else files).add(p)
                if is_dir:
                    todo.append(p)
        assert files == set(want), f"the view lists {sorted(files)}, the model {sorted(want)}"
        assert dirs == m.dirs, f"directories: the view lists {sorted(dirs)}, the model {sorted(m.dirs)}"
        assert {p.rpartition("/")[0] for p in want} - {""} <= m.dirs and not set(want) & m.dirs  # (the model)
        for p, f in want.items():
            a = self.v.getattr(mpath(p))
            assert stat.S_ISREG(a.mode) and a.size == len(f.data), (p, a, len(f.data))
            assert bool(a.mode & 0o100) == f.exe, (p, oct(a.mode), f.exe)
            fh = self.v.open(mpath(p), os.O_RDONLY, ino=next(self.inos))
            try:
                assert self.v.read(fh, 0, len(f.data) + 10) == f.data, f"{p} reads back other bytes"
            finally:
                self.v.release(fh)
        for d in dirs:
            assert stat.S_ISDIR(self.v.getattr(mpath(d)).mode)

    @invariant()
    def open_handles_read_the_model(self) -> None:
        for fh, h in self.m.handles.items():
            data = h.content()
            assert self.v.fgetattr(fh).size == len(data), (fh, self.v.fgetattr(fh).size, len(data))
            assert self.v.read(fh, 0, len(data) + 10) == data, f"handle {fh} reads other bytes"

    @invariant()
    def the_repository_holds_what_was_acknowledged(self) -> None:
        m = self.m
        head = self.repo.branch_head(BRANCH)
        assert head == self.ids[-1]
        assert len(self.repo.log(BRANCH)) == len(m.history)
        tree = {p: entry_f(self.repo, e, self.blobs) for p, e in self.repo.tree(head).entries.items()}
        assert tree == m.head, "the branch's head is not the model's last commit"
        pending = self._lmdb_pending()
        assert set(pending) == set(m.pend), f"pending entries {sorted(pending)}, the model {sorted(m.pend)}"
        for p, it in pending.items():
            v, base = m.pend[p]
            assert (None if it.entry is None else entry_f(self.repo, it.entry, self.blobs)) == v, p
            assert it.base == self.ids[base], f"{p}: based on another commit than the model's"
        def entry(d: dict) -> F | None:
            return None if d.get("del") else entry_f(
                self.repo, TreeEntry(bytes.fromhex(d["m"]), int(d["size"]), int(d["mode"])), self.blobs)

        got = sorted((sorted((p, entry(d)) for p, d in c["files"].items())
                      for c in list_conflicts(self.repo).values()), key=repr)
        assert got == sorted((sorted(c.items()) for c in m.conflicts), key=repr), "conflicts set aside"


SETTINGS = settings(max_examples=1000 if DEEP else 40, stateful_step_count=80 if DEEP else 35, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], print_blob=True)


def test_mount_write_semantics_against_a_model(tmp_path: Path) -> None:
    run_state_machine_as_test(lambda: MountModel(tmp_path), settings=SETTINGS)


if __name__ == "__main__":  # (python -m tests.test_mount_model: one run, verbose)
    pytest.main([__file__, "-q", "-s"])
