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

When a branch or tag moves, ``read_refs()`` and ``take_invalidations()`` tell the inode
table (:meth:`coralfs.mount.nodes.NodeTable.revalidate`) which names changed; the FUSE
adapter (``CoralFS.refresh``) invalidates those in the kernel (it uses long attribute and
entry timeouts).

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
import itertools
import os
import re
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coralfs.errors import (
    BadFileHandle,
    IsADirectory,
    NotADirectory,
    PathNotFound,
    ReadOnly,
)
from coralfs.lru import LRU
from coralfs.mount.namespace import COMMITS, TAGS, UNBORN, WriteNamespace
from coralfs.mount.writer import Staged, Writer
from coralfs.reader import PREFETCH_POOL_THREADS, READAHEAD_BYTES, FileView, ReadAhead, prefetch_pool
from coralfs.store import refs
from coralfs.store.objects import MODE_EXEC, Tag, TreeEntry
from coralfs.store.objectstore import start_threads
from coralfs.store.refs import Refs

if TYPE_CHECKING:
    from coralfs.repository import Repository
    from coralfs.store.lmdb import Txn

DEFAULT_BLKSIZE = 1 << 20  # st_blksize: readers (cat, cp, Python) then issue large reads
PREFETCH_BYTES = READAHEAD_BYTES  # the default of prefetch_bytes (reader.ReadAhead is the policy)
_HEX_NAME = re.compile(r"^[0-9a-f]{4,64}$")
MAX_NAME_BYTES = 255  # what a local file system accepts (a checkout must be able to write it)
MAX_PATH_BYTES = 4095


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
    ref: tuple[str, bytes] | None = None  # (full ref name, value) a branch/tag path was resolved through

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
    readahead: ReadAhead = field(default_factory=ReadAhead)  # a sequential reader's (reader.ReadAhead)
    staged: Staged | None = None  # reads (and writes) go to this staged file
    writable: bool = False
    append: bool = False
    cur_path: str | None = None  # where the kernel's inode of this handle is now (None: unlinked)
    ino: int | None = None  # the inode it was opened on (None: opened by path, without the inode layer)

    def __post_init__(self) -> None:
        if self.cur_path is None:
            self.cur_path = self.path


class MountView(WriteNamespace):
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
        self._commits: LRU[bytes, _CommitView] = LRU(cache_commits)
        self._views: LRU[bytes, FileView] = LRU(cache_views)
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
        cv = self._commits.get(cid)
        if cv is not None:
            return cv
        commit = self.repo.get_commit(cid)
        cv = _CommitView(cid, commit.time, dict(self.repo.get_tree(commit.tree).entries))
        self._commits.put(cid, cv)
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
        v = self._views.get(manifest_id)
        if v is not None:
            return v
        v = FileView(self.repo.objects, self.repo.get_manifest(manifest_id))
        self._views.put(manifest_id, v)
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
                target = Refs(t).get(prefix + name)
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
        ref = (prefix + name, target)
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
        if parts[: len(dparts)] != dparts or Refs(t).branch(name) is not None:
            return 0, ""
        return len(dparts), name

    def _ns_children(self, t: Txn, prefix: str, parts: list[str]) -> list[str]:
        """The next name components of the refs under ``prefix`` + ``parts`` (sorted, unique); the
        unborn default branch counts as a ref."""
        r = Refs(t)
        children = r.namespaces(prefix + "".join(p + "/" for p in parts))
        if prefix == refs.BRANCH:
            dparts = self.repo.default_branch.split("/")
            if len(dparts) > len(parts) and dparts[: len(parts)] == parts \
                    and r.branch(self.repo.default_branch) is None:
                children.append(dparts[len(parts)])
        return sorted(set(children))

    @staticmethod
    def _in_commit(cv: _CommitView, rest: list[str], path: str, immutable: bool,
                   ref: tuple[str, bytes] | None = None) -> _Node:
        sub = "/".join(rest)
        if sub and sub not in cv.files and sub not in cv.dirs:
            raise PathNotFound(f"{path}: no such file or directory")
        return _Node("tree", immutable, cv.time, cv=cv, sub=sub, ref=ref)

    def _resolve_commit(self, name: str, path: str) -> bytes:
        if not _HEX_NAME.match(name):
            raise PathNotFound(f"{path}: not a commit id (4 to 64 lowercase hex digits)")
        with self.repo.store.read() as t:
            r = Refs(t)
            if len(name) == 64:
                cid = bytes.fromhex(name)
                if not r.has_commit(cid):
                    raise PathNotFound(f"{path}: no such commit")
                return cid
            found = r.commits(name)
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
            self._handles[fh] = OpenFile(fh, path, view, manifest, immutable, True, False, ino=ino,
                                         readahead=ReadAhead(self.prefetch_bytes, self._prefetcher))
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
            assert f.view is not None
            f.readahead.on_read(f.view, offset, size)

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

    # ---------------------------------------------------------------- change tracking
    def read_refs(self) -> dict[str, bytes]:
        """Every branch and tag ref (full name -> value), from one short read transaction: the
        inode layer compares snapshots to find what moved."""
        with self.repo.store.read() as t:
            r = Refs(t)
            out = {refs.branch_ref(n): v for n, v in r.branches().items()}
            out.update((refs.tag_ref(n), v) for n, v in r.tags().items())
        return out

    def take_invalidations(self) -> list[str]:
        """Mount paths whose content changed behind the kernel's back (e.g. a refused burst)."""
        return self.writer.take_invalidations() if self.writer is not None else []

    def _tag_commit(self, tag_id: bytes) -> bytes:
        tag = self.repo.objects.get_object(tag_id)
        if not isinstance(tag, Tag):
            raise PathNotFound("not a tag object")
        return tag.commit

