"""The mount's FUSE-free core: repository paths -> attributes, listings and open files.

Layout (every version is a directory)::

    /                       branch namespace + @commits + @tags
    /main/...               branch ``main``: follows its head
    /exp/lr1/...            branch ``exp/lr1`` (``exp/`` is a namespace directory)
    /@commits/<64 hex>/...  one directory per commit; a unique prefix (>= 4 hex) resolves on lookup
    /@tags/<name>/...       the commit a tag points at (tag names nest like branch names)

Names starting with ``@`` are reserved (``refs.check_ref_name`` refuses them in branch names).

Branch (and tag) directories read the ref on every lookup, in a short LMDB read
transaction; everything below a commit is immutable and cached per commit id, so a
repeated lookup costs a ref read and a dict hit. An open file pins its FileView: a
reader keeps reading the version it opened even if the branch moves meanwhile.

Chunks are decoded through the repository's ObjectStore (decoded-chunk LRU, one decode
per chunk at a time: concurrent requests for it wait for that one), and the next chunks
of a sequential reader are decoded ahead on a small thread pool.

``poll_changes()`` tells the FUSE adapter which paths to invalidate in the kernel when a
branch or tag moves (the adapter uses long attribute/entry timeouts).

Writing (with a :class:`coralfs.mount.writer.Writer`; without one every write is refused
with :class:`ReadOnly`, EROFS): a branch directory is writable and writing is committing,
see :mod:`coralfs.mount.writer`. A branch directory shows its head tree overlaid with the
mount's pending entries (closed, stored, not committed yet; deletions hide files) and the
files being written (served from their staged copy); session-only empty directories are
listed too. ``mkdir`` at the top level (or in a namespace directory) creates a branch at
the default branch's head; ``rmdir`` of a branch directory deletes the branch when the
directory is empty. ``@commits`` and ``@tags`` stay immutable (EROFS).

Errors are :mod:`coralfs.errors` exceptions; each carries the ``errno`` to return.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coralfs.errors import CoralError, InvalidArgument, InvalidPath, PathNotFound, ReadOnly
from coralfs.mount.writer import (
    Busy,
    CrossDevice,
    DirectoryNotEmpty,
    FileExists,
    NotPermitted,
    Staged,
    Writer,
    exec_mode,
)
from coralfs.reader import PREFETCH_POOL_THREADS, FileView, prefetch_pool
from coralfs.store import refs
from coralfs.store.objects import MODE_EXEC, MODE_FILE, Tag, TreeEntry, check_path
from coralfs.store.objectstore import start_threads

if TYPE_CHECKING:
    from coralfs.repository import Repository
    from coralfs.store.lmdb import Txn

COMMITS = "@commits"
TAGS = "@tags"
DEFAULT_BLKSIZE = 1 << 20  # st_blksize: readers (cat, cp, Python) then issue large reads
PREFETCH_BYTES = 8 << 20  # sequential readers: decode this far ahead (eight 1 MiB pieces)
ADVISE_BYTES = 64 << 20  # ... and have the disk read this far ahead
_HEX_NAME = re.compile(r"^[0-9a-f]{4,64}$")
_COMMIT_INDEX = b"c\x00"  # index db: b"c\0" + commit id -> b"" (see Repository.commits)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
UNBORN = b""  # the "head" of the default branch of an empty repository
MAX_NAME_BYTES = 255  # what a local file system accepts (a checkout must be able to write it)
MAX_PATH_BYTES = 4095


class NotADirectory(CoralError):
    """not a directory"""

    exit_code = 2
    errno = errno.ENOTDIR


class IsADirectory(CoralError):
    """is a directory"""

    exit_code = 2
    errno = errno.EISDIR


class BadFileHandle(CoralError):
    """bad file handle"""

    exit_code = 2
    errno = errno.EBADF


@dataclass(frozen=True)
class Attr:
    """What ``stat`` shows for a mount path."""

    mode: int  # full st_mode (type bits + permissions)
    size: int
    mtime: float
    nlink: int = 1
    blksize: int = DEFAULT_BLKSIZE
    uid: int = 0
    gid: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def blocks(self) -> int:
        """st_blocks (512-byte units) of the logical content, for ``du``."""
        return 0 if self.is_dir else (self.size + 511) // 512

    def to_stat(self) -> dict[str, int]:
        """A stat dict in nanoseconds (mfusepy with ``use_ns = True``)."""
        ns = int(self.mtime * 1e9)
        return {"st_mode": self.mode, "st_size": self.size, "st_nlink": self.nlink, "st_uid": self.uid,
                "st_gid": self.gid, "st_blksize": self.blksize, "st_blocks": self.blocks,
                "st_atime": ns, "st_mtime": ns, "st_ctime": ns}


class _CommitView:
    """One commit's tree as directories: built once per commit id (commits are immutable).

    A branch with changes made through the mount gets an overlay view instead: files may
    then be :class:`Staged` (being written), ``extra_dirs`` are session-only directories and
    ``mtimes`` the times of pending files."""

    __slots__ = ("cid", "time", "files", "dirs", "mtimes")

    def __init__(self, cid: bytes, time_: float, entries: dict[str, TreeEntry | Staged],
                 extra_dirs: frozenset[str] = frozenset(), mtimes: dict[str, float] | None = None) -> None:
        self.cid = cid
        self.time = time_
        self.files = entries
        self.mtimes = mtimes or {}
        self.dirs: dict[str, dict[str, bool]] = {"": {}}  # dir -> {child name: is_dir}
        for path in entries:
            self._add(path, True)
        for d in sorted(extra_dirs):
            self._add(d, False)

    def _add(self, path: str, is_file: bool) -> None:
        parts = path.split("/")
        d = ""
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            self.dirs.setdefault(d, {}).setdefault(part, not (last and is_file))
            if last:
                break
            d = f"{d}/{part}" if d else part
        if not is_file:
            self.dirs.setdefault(path, {})

    def subdirs(self, d: str) -> int:
        return sum(1 for is_dir in self.dirs[d].values() if is_dir)


@dataclass(frozen=True)
class _Node:
    """A resolved path."""

    kind: str  # root | ns | commits | tags | tree
    immutable: bool
    mtime: float
    cv: _CommitView | None = None
    sub: str = ""  # path inside the commit's tree ("" = the version's root directory)
    names: tuple[str, ...] = ()  # for ns: child names (always directories)
    ref: tuple[bytes, bytes] | None = None  # (ref key, value) a branch/tag path was resolved through

    @property
    def entry(self) -> TreeEntry | Staged | None:
        return self.cv.files.get(self.sub) if self.cv is not None and self.sub else None


@dataclass(frozen=True)
class Resolved:
    """A path resolved for the inode layer: its attributes and what identifies its content.

    ``token`` is ``("d",)`` for a directory, ``("f", manifest id)`` for a stored file
    (committed or pending) and ``("w", staged id)`` for a file being written through this
    mount. Two lookups with equal tokens show the same bytes, so they may share a kernel
    inode (and its page cache); a different token needs a new inode."""

    attr: Attr
    token: tuple[object, ...]
    immutable: bool
    staged: Staged | None = None


@dataclass
class OpenFile:
    """An open file: the FileView pinned at open time, or a staged file (being written)."""

    fh: int
    path: str
    view: FileView | None
    manifest: bytes
    immutable: bool
    keep_cache: bool  # the kernel may keep its page cache (the inode's content is fixed)
    direct_io: bool = False  # bypass the page cache (a file being written by a write-only handle)
    next_offset: int = 0  # where a sequential reader reads next
    sequential: int = 0  # consecutive sequential reads
    advised_to: int = 0  # the disk has been asked to read the records up to here
    staged: Staged | None = None  # reads (and writes) go to this staged file
    writable: bool = False
    append: bool = False
    cur_path: str | None = None  # where the kernel's inode of this handle is now (None: unlinked)
    ino: int | None = None  # the inode it was opened on (None: opened by path, without the inode layer)

    def __post_init__(self) -> None:
        if self.cur_path is None:
            self.cur_path = self.path


class MountView:
    """Paths of a mounted repository -> attributes, listings, open files. Thread-safe."""

    def __init__(self, repo: Repository, *, blksize: int = DEFAULT_BLKSIZE, cache_commits: int = 64,
                 cache_views: int = 256, uid: int | None = None, gid: int | None = None,
                 prefetch_bytes: int = PREFETCH_BYTES, prefetch_threads: int = 2,
                 writer: Writer | None = None, shared_write: bool = False) -> None:
        self.repo = repo
        self.writer = writer  # None: read-only
        # branch files and directories writable by everyone (a mount with --allow-other-write);
        # otherwise only by the mount's owner (uid/gid below; the kernel checks the modes)
        self.shared_write = shared_write and writer is not None
        self._overlays: dict[str, tuple[tuple[bytes, int], _CommitView]] = {}
        self.blksize = blksize
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.start_time = time.time()
        self._lock = threading.Lock()
        self._commits: OrderedDict[bytes, _CommitView] = OrderedDict()
        self._cache_commits = cache_commits
        self._views: OrderedDict[bytes, FileView] = OrderedDict()
        self._cache_views = cache_views
        self.prefetch_bytes = prefetch_bytes
        self._prefetcher = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="coralfs-prefetch") \
            if prefetch_bytes > 0 and prefetch_threads > 0 else None
        if self._prefetcher is not None:  # their threads now, not on the first reader's path
            start_threads(self._prefetcher, prefetch_threads)
            start_threads(prefetch_pool(), PREFETCH_POOL_THREADS)
            repo.objects.start_io()
        self._handles: dict[int, OpenFile] = {}
        self._fh = itertools.count(1)

    # ---------------------------------------------------------------- caches
    def _commit_view(self, cid: bytes) -> _CommitView:
        if cid == UNBORN:  # the default branch of an empty repository
            return _CommitView(UNBORN, self.start_time, {})
        with self._lock:
            cv = self._commits.get(cid)
            if cv is not None:
                self._commits.move_to_end(cid)
                return cv
        commit = self.repo.get_commit(cid)
        cv = _CommitView(cid, commit.time, dict(self.repo.get_tree(commit.tree).entries))
        with self._lock:
            self._commits[cid] = cv
            while len(self._commits) > self._cache_commits:
                self._commits.popitem(last=False)
        return cv

    def _branch_view(self, name: str, cid: bytes) -> _CommitView:
        """A branch's head, overlaid with what the mount changed on it (cached per change)."""
        cv = self._commit_view(cid)
        w = self.writer
        if w is None:
            return cv
        with w.lock:
            key = (cid, w.version)
            cached = self._overlays.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
            ov = w.overlay(name, cv.files)
            if ov is None:
                self._overlays.pop(name, None)
                return cv
            ocv = _CommitView(cid, cv.time, ov.files, ov.dirs, ov.mtimes)
            self._overlays[name] = (key, ocv)
            return ocv

    def _file_view(self, manifest_id: bytes) -> FileView:
        with self._lock:
            v = self._views.get(manifest_id)
            if v is not None:
                self._views.move_to_end(manifest_id)
                return v
        v = FileView(self.repo.objects, self.repo.get_manifest(manifest_id))
        with self._lock:
            self._views[manifest_id] = v
            while len(self._views) > self._cache_views:
                self._views.popitem(last=False)
        return v

    # ---------------------------------------------------------------- resolution
    @staticmethod
    def _split(path: str) -> list[str]:
        if not path.startswith("/"):
            raise PathNotFound(f"{path}: mount paths are absolute")
        parts = [p for p in path.split("/") if p]
        for p in parts:
            if p in (".", "..") or "\x00" in p:
                raise PathNotFound(f"{path}: no such file or directory")
        return parts

    def _ref_lookup(self, prefix: str, parts: list[str], path: str, immutable: bool) -> _Node:
        """Resolve ``parts`` in a ref namespace (``branch:`` or ``tag:``): a ref dir, a subtree or a
        namespace directory."""
        with self.repo.store.read() as t:
            for i in range(1, len(parts) + 1):
                name = "/".join(parts[:i])
                target = t.get("refs", (prefix + name).encode())
                if target is not None:
                    break
            else:
                i, name = self._unborn_default(t, parts) if prefix == refs.BRANCH else (0, "")
                if i:
                    target = UNBORN
                else:
                    children = self._ns_children(t, prefix, parts)
                    if not children:
                        raise PathNotFound(f"{path}: no such file or directory")
                    return _Node("ns", immutable, self.start_time, names=tuple(children))
        ref = ((prefix + name).encode(), target)
        if prefix == refs.TAG:
            tag = self.repo.objects.get_object(target)
            if not isinstance(tag, Tag):
                raise PathNotFound(f"{path}: tag {name!r} does not point at a tag object")
            target = tag.commit
            return self._in_commit(self._commit_view(target), parts[i:], path, immutable, ref)
        return self._in_commit(self._branch_view(name, target), parts[i:], path, immutable, ref)

    def _unborn_default(self, t: Txn, parts: list[str]) -> tuple[int, str]:
        """``(n, name)`` if the first ``n`` of ``parts`` name the default branch and it has no commit
        yet (an empty repository): its directory is shown, empty, so that files can be written
        into it (the first commit makes the branch). ``(0, "")`` otherwise."""
        name = self.repo.default_branch
        dparts = name.split("/")
        if parts[: len(dparts)] != dparts or t.get("refs", refs.branch_key(name)) is not None:
            return 0, ""
        return len(dparts), name

    def _ns_children(self, t: Txn, prefix: str, parts: list[str]) -> list[str]:
        """The next name components of the refs under ``prefix`` + ``parts`` (sorted, unique); the
        unborn default branch counts as a ref."""
        ns = (prefix + "".join(p + "/" for p in parts)).encode()
        children: list[str] = []
        if prefix == refs.BRANCH:
            dparts = self.repo.default_branch.split("/")
            if len(dparts) > len(parts) and dparts[: len(parts)] == parts \
                    and t.get("refs", refs.branch_key(self.repo.default_branch)) is None:
                children.append(dparts[len(parts)])
        for k in t.keys("refs", ns):
            child = k[len(ns):].decode(errors="surrogateescape").split("/", 1)[0]
            if not children or children[-1] != child:
                children.append(child)
        return sorted(set(children))

    @staticmethod
    def _in_commit(cv: _CommitView, rest: list[str], path: str, immutable: bool,
                   ref: tuple[bytes, bytes] | None = None) -> _Node:
        sub = "/".join(rest)
        if sub and sub not in cv.files and sub not in cv.dirs:
            raise PathNotFound(f"{path}: no such file or directory")
        return _Node("tree", immutable, cv.time, cv=cv, sub=sub, ref=ref)

    def _resolve_commit(self, name: str, path: str) -> bytes:
        if not _HEX_NAME.match(name):
            raise PathNotFound(f"{path}: not a commit id (4 to 64 lowercase hex digits)")
        with self.repo.store.read() as t:
            if len(name) == 64:
                cid = bytes.fromhex(name)
                if t.get("index", _COMMIT_INDEX + cid) is None:
                    raise PathNotFound(f"{path}: no such commit")
                return cid
            key = _COMMIT_INDEX + bytes.fromhex(name[: len(name) // 2 * 2])
            found = []
            for k in t.keys("index", key):
                if k[2:].hex().startswith(name):
                    found.append(k[2:])
                    if len(found) > 1:
                        raise PathNotFound(f"{path}: ambiguous commit prefix {name!r}")
        if not found:
            raise PathNotFound(f"{path}: no such commit")
        return found[0]

    def _resolve(self, path: str) -> _Node:
        parts = self._split(path)
        if not parts:
            return _Node("root", False, self.start_time)
        head = parts[0]
        if head == COMMITS:
            if len(parts) == 1:
                return _Node("commits", True, self.start_time)
            cid = self._resolve_commit(parts[1], path)
            return self._in_commit(self._commit_view(cid), parts[2:], path, True)
        if head == TAGS:
            if len(parts) == 1:
                return _Node("tags", True, self.start_time)
            return self._ref_lookup(refs.TAG, parts[1:], path, True)
        if head.startswith("@"):
            raise PathNotFound(f"{path}: no such file or directory (names starting with '@' are reserved)")
        return self._ref_lookup(refs.BRANCH, parts, path, False)

    # ---------------------------------------------------------------- the API
    def is_immutable(self, path: str) -> bool:
        """True for paths that can never change content: everything under @commits and @tags."""
        parts = [p for p in path.split("/") if p]
        return bool(parts) and parts[0] in (COMMITS, TAGS)

    def _perm(self, executable: bool, immutable: bool) -> int:
        """Permission bits: read for everyone; write for the owner where writing is possible
        (for everyone with ``shared_write``). With ``allow_other`` the kernel enforces them."""
        perm = 0o555 if executable else 0o444
        if not immutable:
            perm |= 0o222 if self.shared_write else 0o200
        return perm

    def _dir_attr(self, mtime: float, immutable: bool, nlink: int = 1) -> Attr:
        return Attr(stat.S_IFDIR | self._perm(True, immutable), 0, mtime, nlink, self.blksize, self.uid, self.gid)

    def getattr(self, path: str) -> Attr:
        return self.resolve(path).attr

    def resolve(self, path: str) -> Resolved:
        """Attributes and content identity of ``path`` (see :class:`Resolved`)."""
        w = self.writer
        with w.lock if w is not None else contextlib.nullcontext():
            node = self._resolve(path)
        if node.kind != "tree":
            return Resolved(self._dir_attr(node.mtime, node.immutable), ("d",), node.immutable)
        assert node.cv is not None
        e = node.entry
        if e is None:
            return Resolved(self._dir_attr(node.mtime, node.immutable, 2 + node.cv.subdirs(node.sub)), ("d",),
                            node.immutable)
        if isinstance(e, Staged):
            return Resolved(self._staged_attr(e), ("w", e.sid), False, e)
        perm = self._perm(e.mode == MODE_EXEC, node.immutable)
        mtime = node.cv.mtimes.get(node.sub, node.mtime)
        return Resolved(Attr(stat.S_IFREG | perm, e.size, mtime, 1, self.blksize, self.uid, self.gid),
                        ("f", e.manifest), node.immutable)

    def _staged_attr(self, s: Staged) -> Attr:
        perm = self._perm(s.mode == MODE_EXEC, False)
        return Attr(stat.S_IFREG | perm, s.size, s.mtime, 1, self.blksize, self.uid, self.gid)

    def fgetattr(self, fh: int) -> Attr:
        """``fstat`` of an open file (also one unlinked or renamed over since it was opened)."""
        f = self.opened(fh)
        if f.staged is not None:
            return self._staged_attr(f.staged)
        assert f.view is not None
        perm = self._perm(False, f.immutable)
        return Attr(stat.S_IFREG | perm, f.view.size, self.start_time, 1, self.blksize, self.uid, self.gid)

    def scandir(self, path: str) -> list[tuple[str, bool]]:
        """Directory entries as (name, is_dir), without '.' and '..'."""
        node = self._resolve(path)
        if node.kind in ("root", "tags"):
            with self.repo.store.read() as t:
                names = self._ns_children(t, refs.BRANCH if node.kind == "root" else refs.TAG, [])
            return [(n, True) for n in names] + ([(COMMITS, True), (TAGS, True)] if node.kind == "root" else [])
        if node.kind == "commits":
            return [(c.hex(), True) for c in self.repo.commits()]
        if node.kind == "ns":
            return [(n, True) for n in node.names]
        assert node.cv is not None
        if node.entry is not None:
            raise NotADirectory(f"{path}: not a directory")
        return sorted(node.cv.dirs[node.sub].items())

    def readdir(self, path: str) -> list[str]:
        return [n for n, _ in self.scandir(path)]

    def open(self, path: str, flags: int = os.O_RDONLY, *, ino: int | None = None,
             manifest: bytes | None = None) -> int:
        """Open a file; returns a handle. Write access: only in branch directories of a
        writable view (elsewhere EROFS).

        The inode layer passes the inode (``ino``: writers then share it with the readers of
        that inode only) and, for a reader, the version that inode stands for (``manifest``):
        the handle reads exactly that version, whatever the branch shows now."""
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if self.writer is None or self.is_immutable(path):
            writing = writing or bool(flags & (os.O_CREAT | os.O_APPEND))
        if writing:
            if self.writer is None or self.is_immutable(path):
                self._resolve(path)  # a missing path is ENOENT first
                raise ReadOnly(f"{path}: read-only file system" if self.writer is None
                               else f"{path}: commits and tags are immutable")
            return self._open_write(path, flags, ino)
        immutable = self.is_immutable(path)
        if manifest is None:
            w = self.writer
            with w.lock if w is not None else contextlib.nullcontext():
                node = self._resolve(path)
                e = node.entry
                if e is None:
                    raise IsADirectory(f"{path}: is a directory")
                if isinstance(e, Staged):  # being written: read what was written so far
                    assert w is not None
                    w.attach(e)
                    return self._add_handle(path, e, writable=False, ino=ino)
            manifest, immutable = e.manifest, node.immutable
        view = self._file_view(manifest)
        with self._lock:
            fh = next(self._fh)
            # an inode's content never changes (a new version is a new inode): keep its cache
            self._handles[fh] = OpenFile(fh, path, view, manifest, immutable, True, False, ino=ino)
        return fh

    def opened(self, fh: int) -> OpenFile:
        try:
            return self._handles[fh]
        except KeyError:
            raise BadFileHandle(f"no open file with handle {fh}") from None

    def read(self, fh: int, offset: int, size: int) -> bytes:
        f = self.opened(fh)
        if f.staged is not None:
            assert self.writer is not None
            return self.writer.read(f.staged, offset, size)
        assert f.view is not None
        self._read_ahead(f, offset, size)
        return f.view.pread(offset, size)

    def read_into(self, fh: int, offset: int, dst: memoryview) -> int:
        """``read`` into a caller's buffer (the FUSE reply): no ``bytes`` per request."""
        f = self.opened(fh)
        if f.staged is not None:
            assert self.writer is not None
            data = self.writer.read(f.staged, offset, len(dst))
            dst[: len(data)] = data
            return len(data)
        assert f.view is not None
        self._read_ahead(f, offset, len(dst))
        return f.view.pread_into(offset, dst)

    def read_parts(self, fh: int, offset: int, size: int) -> list[tuple[bytes, int, int]]:
        """``read`` as slices ``(bytes, lo, hi)`` of decoded chunks (or of the staged file's bytes):
        the FUSE reply gathers them straight from the chunk cache, with no copy in Python."""
        f = self.opened(fh)
        if f.staged is not None:
            assert self.writer is not None
            data = self.writer.read(f.staged, offset, size)
            return [(data, 0, len(data))] if data else []
        assert f.view is not None
        self._read_ahead(f, offset, size)
        return f.view.parts(offset, size)

    def _read_ahead(self, f: OpenFile, offset: int, size: int) -> None:
        if self._prefetcher is not None:
            # a sequential reader (cat, cp, torch.load): decode the next chunks while this
            # one is being copied out and the reader works on it
            f.sequential = f.sequential + 1 if offset == f.next_offset else 0
            f.next_offset = end = offset + size
            if not f.sequential:
                f.advised_to = 0
            if f.sequential >= 2:
                self.repo.objects.prefetch(self._prefetcher, f.view.chunks_in(end, self.prefetch_bytes))
                if f.advised_to < end + ADVISE_BYTES // 2:  # in steps of half the window
                    start = max(end, f.advised_to)
                    self.repo.objects.advise(f.view.chunks_in(start, end + ADVISE_BYTES - start))
                    f.advised_to = end + ADVISE_BYTES

    def release(self, fh: int) -> None:
        with self._lock:
            f = self._handles.pop(fh, None)
        if f is None:
            return
        if f.staged is not None:
            assert self.writer is not None
            self.writer.release(f.staged, f.writable)

    def close(self) -> None:
        """Stop background decoding (the repository stays open: it belongs to the caller)."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
            self._prefetcher = None

    def __enter__(self) -> MountView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def open_files(self) -> int:
        return len(self._handles)

    def refuse_write(self, path: str) -> None:
        """Raise the error a write (create, mkdir, unlink, rename, truncate, ...) gets: ReadOnly."""
        raise ReadOnly(f"{path}: read-only file system" if not self.is_immutable(path)
                       else f"{path}: commits and tags are immutable")

    # ---------------------------------------------------------------- writing
    def _writer(self, path: str) -> Writer:
        if self.writer is None or self.is_immutable(path):
            self.refuse_write(path)
        assert self.writer is not None
        return self.writer

    def _locate(self, path: str) -> tuple[str | None, list[str], bytes | None]:
        """(branch, path components inside it, head) of a path that need not exist; the branch is
        None at the top level and in namespace directories."""
        parts = self._split(path)
        if parts and parts[0].startswith("@"):
            if parts[0] in (COMMITS, TAGS):
                raise ReadOnly(f"{path}: commits and tags are immutable")
            raise NotPermitted(f"{path}: names starting with '@' are reserved")
        with self.repo.store.read() as t:
            for i in range(1, len(parts) + 1):
                target = t.get("refs", refs.branch_key("/".join(parts[:i])))
                if target is not None:
                    return "/".join(parts[:i]), parts[i:], target
            n, name = self._unborn_default(t, parts)
            if n:
                return name, parts[n:], UNBORN
        return None, parts, None

    def _in_branch(self, path: str) -> tuple[str, bytes, _CommitView, str]:
        """(branch, head, overlay view, path inside the branch) for a path below a branch directory."""
        branch, rest, head = self._locate(path)
        if branch is None or head is None:
            raise NotPermitted(f"{path}: files live in branch directories (mkdir NAME at the top makes a branch)")
        if not rest:
            raise NotPermitted(f"{path}: is a branch directory")
        return branch, head, self._branch_view(branch, head), "/".join(rest)

    @staticmethod
    def _parent_ok(cv: _CommitView, sub: str, path: str) -> None:
        parent = sub.rsplit("/", 1)[0] if "/" in sub else ""
        if parent and parent not in cv.dirs:
            if parent in cv.files:
                raise NotADirectory(f"{path}: a parent is a file")
            raise PathNotFound(f"{path}: no such directory")

    def _add_handle(self, path: str, s: Staged, writable: bool, append: bool = False, direct: bool = True,
                    ino: int | None = None) -> int:
        with self._lock:
            fh = next(self._fh)
            self._handles[fh] = OpenFile(fh, path, None, b"", False, False, direct, staged=s,
                                         writable=writable, append=append, ino=ino)
            return fh

    def _same_inode(self, h: OpenFile, path: str, ino: int | None) -> bool:
        """Does handle ``h`` share the kernel inode a writer opens (by inode, else by path)?"""
        return h.ino == ino if ino is not None else h.ino is None and h.cur_path == path

    def open_staged(self, path: str, s: Staged, ino: int | None = None) -> int | None:
        """A reader of a file being written (the inode layer knows the staged file it stands for,
        also when it has been renamed or unlinked since); None if nothing has it open any more
        (it was stored, or dropped: the inode layer then opens what the path shows)."""
        assert self.writer is not None
        if not self.writer.attach_live(s):
            return None
        return self._add_handle(path, s, writable=False, ino=ino)

    def _bind_write(self, path: str, branch: str, head: bytes, sub: str, cur: TreeEntry | Staged | None,
                    flags: int, mode: int = MODE_FILE, ino: int | None = None) -> tuple[int, Staged, bool]:
        """A write handle on ``sub`` (caller holds the writer's lock); returns (fh, staged, truncate)."""
        assert self.writer is not None
        truncate = cur is None or bool(flags & os.O_TRUNC)
        src = self._file_view(cur.manifest) if isinstance(cur, TreeEntry) and not truncate else None
        s = self.writer.open_file(branch, sub, head, cur, src, writable=True, truncate=truncate, mode=mode)
        if ino and s.ino is None:
            s.ino = ino  # (set under the writer's lock: a lookup that sees the staged file sees its inode)
        with self._lock:
            shared = any(self._same_inode(h, path, ino) for h in self._handles.values())
            if not isinstance(cur, Staged):
                # readers that have this inode open share its page cache with the writer: from
                # now on they read the staged file too (never a mix of old and new bytes).
                # Readers of other versions of the path have inodes of their own.
                for h in self._handles.values():
                    if self._same_inode(h, path, ino) and h.staged is None:
                        h.staged = s
                        self.writer.attach(s)
        # A write-only handle cannot be memory-mapped: when nothing else has the file open it
        # bypasses the page cache (one copy less: ~25% faster torch.save / cp); a handle that
        # can read (O_RDWR: mmap, read back) or shares the file with others uses the page cache.
        direct = (flags & os.O_ACCMODE) == os.O_WRONLY and not shared
        return self._add_handle(path, s, True, bool(flags & os.O_APPEND), direct, ino), s, truncate

    def _truncate_new(self, fh: int, s: Staged, truncate: bool) -> int:
        if truncate:
            assert self.writer is not None
            try:
                self.writer.truncate(s, 0)
            except BaseException:
                self.release(fh)
                raise
        return fh

    def _open_write(self, path: str, flags: int, ino: int | None = None) -> int:
        w = self._writer(path)
        with w.lock:
            branch, head, cv, sub = self._in_branch(path)
            cur = cv.files.get(sub)
            if cur is None:
                if sub in cv.dirs:
                    raise IsADirectory(f"{path}: is a directory")
                raise PathNotFound(f"{path}: no such file or directory")
            fh, s, truncate = self._bind_write(path, branch, head, sub, cur, flags, ino=ino)
        return self._truncate_new(fh, s, truncate)

    def create(self, path: str, flags: int = os.O_WRONLY | os.O_CREAT, mode: int = 0o644,
               ino: int | None = None) -> int:
        """Create (or, without O_EXCL, open) a file in a branch directory; returns a write handle."""
        w = self._writer(path)
        with w.lock:
            branch, head, cv, sub = self._in_branch(path)
            check_new_path(sub, path)
            self._parent_ok(cv, sub, path)
            if sub in cv.dirs:
                raise IsADirectory(f"{path}: is a directory")
            cur = cv.files.get(sub)
            if cur is not None and flags & os.O_EXCL:
                raise FileExists(f"{path}: file exists")
            fh, s, truncate = self._bind_write(path, branch, head, sub, cur, flags, exec_mode(mode), ino)
        return self._truncate_new(fh, s, truncate)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        f = self.opened(fh)
        if not f.writable or f.staged is None:
            raise BadFileHandle(f"{f.path}: not open for writing")
        assert self.writer is not None
        return self.writer.write(f.staged, offset, data, f.append)

    def flush(self, fh: int) -> None:
        """``close()``: a written file is stored (ingested, pending entry) before this returns."""
        f = self.opened(fh)
        if f.writable and f.staged is not None:
            assert self.writer is not None
            self.writer.flush(f.staged)

    fsync = flush

    def truncate(self, path: str | None, length: int, fh: int | None = None, ino: int | None = None) -> None:
        f = self._handles.get(fh) if fh is not None else None
        if f is not None and f.writable and f.staged is not None:
            assert self.writer is not None
            self.writer.truncate(f.staged, length)
            return
        if path is None:
            raise BadFileHandle("truncate of an unlinked file that is not open for writing")
        w = self._writer(path)
        with w.lock:  # truncate(2): like open, ftruncate, close
            branch, head, cv, sub = self._in_branch(path)
            cur = cv.files.get(sub)
            if cur is None:
                raise IsADirectory(f"{path}: is a directory") if sub in cv.dirs else PathNotFound(path)
            fh2, s, _ = self._bind_write(path, branch, head, sub, cur, 0, ino=ino)
        try:
            w.truncate(s, length)
            if s.writers == 1:  # nobody else has it open for writing: store it now
                w.flush(s)
        finally:
            self.release(fh2)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        f = self.opened(fh)
        if not f.writable or f.staged is None:
            raise BadFileHandle(f"{f.path}: not open for writing")
        if mode != 0:
            raise NotSupported(f"{f.path}: fallocate mode {mode} is not supported")
        assert self.writer is not None
        self.writer.allocate(f.staged, offset, length)

    def _rehome(self, old: str, new: str | None) -> None:
        """Open handles follow their file's kernel inode (moved to ``new``, or unlinked)."""
        with self._lock:
            for h in self._handles.values():
                if h.cur_path == old:
                    h.cur_path = new

    def unlink(self, path: str) -> None:
        w = self._writer(path)
        with w.lock:
            branch, head, cv, sub = self._in_branch(path)
            cur = cv.files.get(sub)
            if cur is None:
                raise IsADirectory(f"{path}: is a directory") if sub in cv.dirs else PathNotFound(path)
            staged = (cur,) if isinstance(cur, Staged) else ()
            w.change(branch, head, self._commit_view(head).files, durable={sub: None},
                     bind={sub: None} if staged else {}, unbind=staged, add_dirs=(_parent(sub),))
            self._rehome(path, None)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        """Within one branch (files and directories); between branches EXDEV (``mv`` copies)."""
        w = self._writer(old)
        self._writer(new)
        with w.lock:
            b1, rest1, head = self._locate(old)
            b2, rest2, _ = self._locate(new)
            if b1 is None or b2 is None or not rest1 or not rest2 or head is None:
                if b1 is not None and b2 is not None and b1 != b2 and rest1:
                    raise CrossDevice(f"{old} -> {new}: different branches")
                raise NotPermitted(f"{old} -> {new}: branch directories cannot be renamed "
                                   "(files can, inside a branch)")
            if b1 != b2:
                raise CrossDevice(f"{old} -> {new}: different branches")
            if flags & RENAME_EXCHANGE:
                raise InvalidArgument("RENAME_EXCHANGE is not supported")
            osub, nsub = "/".join(rest1), "/".join(rest2)
            check_new_path(nsub, new)
            cv = self._branch_view(b1, head)
            src_file = cv.files.get(osub)
            if src_file is None and osub not in cv.dirs:
                raise PathNotFound(f"{old}: no such file or directory")
            if osub == nsub:
                return
            self._parent_ok(cv, nsub, new)
            dst_file = cv.files.get(nsub)
            dst_dir = nsub in cv.dirs
            if (dst_file is not None or dst_dir) and flags & RENAME_NOREPLACE:
                raise FileExists(f"{new}: file exists")
            if src_file is not None:
                if dst_dir:
                    raise IsADirectory(f"{new}: is a directory")
                moves = [(osub, nsub)]
                dirs_from: list[str] = []
            else:
                if dst_file is not None:
                    raise NotADirectory(f"{new}: not a directory")
                if nsub.startswith(osub + "/"):
                    raise InvalidArgument(f"{old} -> {new}: cannot move a directory into itself")
                if dst_dir and cv.dirs[nsub]:
                    raise DirectoryNotEmpty(f"{new}: directory not empty")
                moves = [(p, nsub + p[len(osub):]) for p in cv.files if p.startswith(osub + "/")]
                dirs_from = [d for d in cv.dirs if d == osub or d.startswith(osub + "/")]
            durable: dict[str, TreeEntry | None] = {}
            bind: dict[str, Staged | None] = {}
            for p, _q in moves:
                durable[p] = None
                if isinstance(cv.files[p], Staged):
                    bind[p] = None
            for p, q in moves:
                item = cv.files[p]
                if isinstance(item, Staged):
                    durable[q] = item.durable  # the last closed content; its next close records the rest
                    bind[q] = item
                else:
                    durable[q] = item
            replaced = (dst_file,) if isinstance(dst_file, Staged) else ()
            w.change(b1, head, self._commit_view(head).files, durable=durable, bind=bind, unbind=replaced,
                     add_dirs=tuple(nsub + d[len(osub):] for d in dirs_from) + (_parent(osub),),
                     remove_dirs=tuple(dirs_from) + ((nsub,) if dst_dir else ()))
            if dst_file is not None:
                self._rehome(new, None)
            base = f"/{b1}/"
            for p, q in moves:
                self._rehome(base + p, base + q)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """In a branch: a directory (session-only until files are written into it). At the top
        level or in a namespace directory: a new branch at the default branch's head."""
        w = self._writer(path)
        with w.lock:
            branch, rest, head = self._locate(path)
            if not rest and branch is None:
                raise FileExists(f"{path}: file exists")
            if branch is None:
                w.create_branch("/".join(rest))
                return
            sub = "/".join(rest)
            assert head is not None
            cv = self._branch_view(branch, head)
            if not sub or sub in cv.files or sub in cv.dirs:
                raise FileExists(f"{path}: file exists")
            check_new_path(sub, path)
            self._parent_ok(cv, sub, path)
            w.change(branch, head, {}, add_dirs=(sub,))

    def rmdir(self, path: str) -> None:
        """In a branch: an empty directory. A branch directory: deletes the branch if it shows no
        files (its pending deletions included) and nothing is being written in it."""
        w = self._writer(path)
        with w.lock:
            branch, rest, head = self._locate(path)
            if branch is None:
                if not rest:
                    raise Busy(f"{path}: the mount's root")
                self._resolve(path)  # ENOENT, or a namespace directory (it always has branches)
                raise DirectoryNotEmpty(f"{path}: a namespace directory (delete its branches first)")
            assert head is not None
            cv = self._branch_view(branch, head)
            sub = "/".join(rest)
            if not sub:
                if head == UNBORN:
                    raise Busy(f"{path}: the default branch (it has no commit yet)")
                if cv.files or len(cv.dirs) > 1 or cv.dirs[""]:
                    raise DirectoryNotEmpty(f"{path}: the branch still has files (rm them first)")
                w.delete_branch(branch, head)
                return
            if sub in cv.files:
                raise NotADirectory(f"{path}: not a directory")
            if sub not in cv.dirs:
                raise PathNotFound(f"{path}: no such directory")
            if cv.dirs[sub]:
                raise DirectoryNotEmpty(f"{path}: directory not empty")
            w.change(branch, head, {}, remove_dirs=(sub,), add_dirs=(_parent(sub),))

    def chmod(self, path: str, mode: int) -> None:
        """The executable bit of a branch file (stored in the tree); other bits are ignored."""
        w = self._writer(path)
        with w.lock:
            branch, rest, head = self._locate(path)
            if branch is None or not rest or head is None:
                return  # the root, namespace and branch directories: nothing to record
            cv = self._branch_view(branch, head)
            sub = "/".join(rest)
            item = cv.files.get(sub)
            if item is None:
                if sub in cv.dirs:
                    return
                raise PathNotFound(f"{path}: no such file or directory")
            new = exec_mode(mode)
            if item.mode == new:
                return
            durable: dict[str, TreeEntry | None] = {}
            if isinstance(item, Staged):
                item.mode = new
                if not item.dirty and item.durable is not None:
                    item.durable = durable[sub] = TreeEntry(item.durable.manifest, item.durable.size, new)
                with contextlib.suppress(OSError):
                    item.write_meta()
            else:
                durable[sub] = TreeEntry(item.manifest, item.size, new)
            w.change(branch, head, self._commit_view(head).files, durable=durable)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        """Times are not stored (a file's mtime is its commit's); a file being written takes them
        for this session."""
        w = self._writer(path)
        with w.lock:
            branch, rest, head = self._locate(path)
            if branch is None or not rest or head is None:
                return
            item = self._branch_view(branch, head).files.get("/".join(rest))
        if isinstance(item, Staged):
            item.mtime = times[1] / 1e9 if times else time.time()

    def check_write(self, path: str) -> None:
        """access(W_OK): EROFS where nothing can be written."""
        self._writer(path)

    def fsyncdir(self, path: str) -> None:
        """``fsync`` of a directory in a branch: commit the branch's pending changes now (of the
        root or a namespace directory: every branch's)."""
        if self.writer is None or self.is_immutable(path):
            return
        branch, _, _ = self._locate(path)
        if branch is None:
            self.writer.sync_all()
        else:
            self.writer.sync(branch)

    # ---------------------------------------------------------------- change tracking
    def read_refs(self) -> dict[bytes, bytes]:
        """Every branch and tag ref (key -> value), from one short read transaction: the inode
        layer compares snapshots to find what moved."""
        with self.repo.store.read() as t:
            out = dict(t.items("refs", refs.BRANCH.encode()))
            out.update(t.items("refs", refs.TAG.encode()))
        return out

    def take_invalidations(self) -> list[str]:
        """Mount paths whose content changed behind the kernel's back (e.g. a refused burst)."""
        return self.writer.take_invalidations() if self.writer is not None else []

    def _tag_commit(self, tag_id: bytes) -> bytes:
        tag = self.repo.objects.get_object(tag_id)
        if not isinstance(tag, Tag):
            raise PathNotFound("not a tag object")
        return tag.commit


class NotSupported(CoralError):
    """operation not supported"""

    exit_code = 2
    errno = errno.EOPNOTSUPP


def check_new_path(sub: str, path: str) -> None:
    """A name a file or directory is created under (or renamed to) must be storable and must
    check out: refused here, before any data is written (never at ``close()``)."""
    try:
        check_path(sub)
    except InvalidPath as e:  # (NameTooLong: ENAMETOOLONG; the rest EINVAL)
        raise type(e)(f"{path}: {e}") from None


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""
