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

Errors are :mod:`coralfs.errors` exceptions; each carries the ``errno`` to return.
This issue is read-only: every write is refused with :class:`ReadOnly` (EROFS).
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coralfs import refs
from coralfs.errors import CoralError, PathNotFound, ReadOnly
from coralfs.objects import MODE_EXEC, Tag, TreeEntry
from coralfs.reader import FileView

if TYPE_CHECKING:
    from coralfs.repository import Repository
    from coralfs.store import Txn

COMMITS = "@commits"
TAGS = "@tags"
DEFAULT_BLKSIZE = 1 << 20  # st_blksize: readers (cat, cp, Python) then issue large reads
PREFETCH_BYTES = 8 << 20  # sequential readers: decode this far ahead (two 4 MiB chunks)
_HEX_NAME = re.compile(r"^[0-9a-f]{4,64}$")
_COMMIT_INDEX = b"c\x00"  # index db: b"c\0" + commit id -> b"" (see Repository.commits)


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
    """One commit's tree as directories: built once per commit id (commits are immutable)."""

    __slots__ = ("cid", "time", "files", "dirs")

    def __init__(self, cid: bytes, time_: float, entries: dict[str, TreeEntry]) -> None:
        self.cid = cid
        self.time = time_
        self.files = entries
        self.dirs: dict[str, dict[str, bool]] = {"": {}}  # dir -> {child name: is_dir}
        for path in entries:
            parts = path.split("/")
            d = ""
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                children = self.dirs.setdefault(d, {})
                children.setdefault(part, not last)
                if last:
                    break
                d = f"{d}/{part}" if d else part

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
    def entry(self) -> TreeEntry | None:
        return self.cv.files.get(self.sub) if self.cv is not None and self.sub else None


@dataclass
class OpenFile:
    """An open file: the FileView pinned at open time."""

    fh: int
    path: str
    view: FileView
    manifest: bytes
    immutable: bool
    keep_cache: bool  # the kernel may keep its page cache (content unchanged since the last open)
    direct_io: bool = False  # bypass the page cache: another version of this path is open and cached
    next_offset: int = 0  # where a sequential reader reads next
    sequential: int = 0  # consecutive sequential reads


class MountView:
    """Paths of a mounted repository -> attributes, listings, open files. Thread-safe."""

    def __init__(self, repo: Repository, *, blksize: int = DEFAULT_BLKSIZE, cache_commits: int = 64,
                 cache_views: int = 256, uid: int | None = None, gid: int | None = None,
                 prefetch_bytes: int = PREFETCH_BYTES, prefetch_threads: int = 2) -> None:
        self.repo = repo
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
        self._handles: dict[int, OpenFile] = {}
        self._fh = itertools.count(1)
        # branch/tag paths: the version the kernel's page cache may hold, and the open
        # page-cached handles per version
        self._cache_version: dict[str, bytes] = {}
        self._cached_opens: dict[str, dict[bytes, int]] = {}
        self._refs_seen: dict[bytes, bytes] | None = None

    # ---------------------------------------------------------------- caches
    def _commit_view(self, cid: bytes) -> _CommitView:
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

    @staticmethod
    def _ns_children(t: Txn, prefix: str, parts: list[str]) -> list[str]:
        """The next name components of the refs under ``prefix`` + ``parts`` (sorted, unique)."""
        ns = (prefix + "".join(p + "/" for p in parts)).encode()
        children: list[str] = []
        for k in t.keys("refs", ns):
            child = k[len(ns):].decode(errors="surrogateescape").split("/", 1)[0]
            if not children or children[-1] != child:
                children.append(child)
        return children

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

    def _dir_attr(self, mtime: float, immutable: bool, nlink: int = 1) -> Attr:
        return Attr(stat.S_IFDIR | (0o555 if immutable else 0o755), 0, mtime, nlink, self.blksize,
                    self.uid, self.gid)

    def getattr(self, path: str) -> Attr:
        node = self._resolve(path)
        if node.kind != "tree":
            return self._dir_attr(node.mtime, node.immutable)
        assert node.cv is not None
        e = node.entry
        if e is None:
            return self._dir_attr(node.mtime, node.immutable, 2 + node.cv.subdirs(node.sub))
        perm = 0o555 if e.mode == MODE_EXEC else 0o444
        if not node.immutable:
            perm |= 0o200
        return Attr(stat.S_IFREG | perm, e.size, node.mtime, 1, self.blksize, self.uid, self.gid)

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

    def open(self, path: str, flags: int = os.O_RDONLY) -> int:
        """Open a file for reading; returns a handle. Any write access is refused (EROFS)."""
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT | os.O_APPEND):
            self._resolve(path)  # a missing path is ENOENT first
            raise ReadOnly(f"{path}: read-only file system")
        node = self._resolve(path)
        e = node.entry
        if e is None:
            raise IsADirectory(f"{path}: is a directory")
        view = self._file_view(e.manifest)
        with self._lock:
            direct = False
            if path.startswith(f"/{COMMITS}/"):  # one content per path, forever
                keep = True
            else:
                # The kernel keeps one page cache per path. A path that moved keeps its old
                # content in the cache while a reader of the old version has it open; a new
                # version opened meanwhile bypasses the cache (direct I/O), so neither reader
                # ever sees the other's bytes.
                cached = self._cached_opens.get(path, {})
                seen = self._refs_seen
                if any(m != e.manifest for m in cached) or (
                        seen is not None and node.ref is not None and seen.get(node.ref[0]) != node.ref[1]):
                    # (or: the ref moved and the kernel has not been told yet, so its cached
                    # size may be the old one; direct reads are not cut at a stale size)
                    keep, direct = False, True
                else:
                    keep = self._cache_version.get(path) == e.manifest
                    self._cache_version[path] = e.manifest
                    cached[e.manifest] = cached.get(e.manifest, 0) + 1
                    self._cached_opens[path] = cached
            fh = next(self._fh)
            self._handles[fh] = OpenFile(fh, path, view, e.manifest, node.immutable, keep, direct)
        return fh

    def opened(self, fh: int) -> OpenFile:
        try:
            return self._handles[fh]
        except KeyError:
            raise BadFileHandle(f"no open file with handle {fh}") from None

    def read(self, fh: int, offset: int, size: int) -> bytes:
        f = self.opened(fh)
        if self._prefetcher is not None:
            # a sequential reader (cat, cp, torch.load): decode the next chunks while this
            # one is being copied out and the reader works on it
            f.sequential = f.sequential + 1 if offset == f.next_offset else 0
            f.next_offset = offset + size
            if f.sequential >= 2:
                self.repo.objects.prefetch(self._prefetcher, f.view.chunks_in(offset + size, self.prefetch_bytes))
        return f.view.pread(offset, size)

    def release(self, fh: int) -> None:
        with self._lock:
            f = self._handles.pop(fh, None)
            if f is None or f.direct_io or f.path.startswith(f"/{COMMITS}/"):
                return
            cached = self._cached_opens.get(f.path)
            if cached is not None and f.manifest in cached:
                cached[f.manifest] -= 1
                if not cached[f.manifest]:
                    del cached[f.manifest]
                if not cached:
                    del self._cached_opens[f.path]

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

    # ---------------------------------------------------------------- change tracking
    def _read_refs(self) -> dict[bytes, bytes]:
        with self.repo.store.read() as t:
            out = dict(t.items("refs", refs.BRANCH.encode()))
            out.update(t.items("refs", refs.TAG.encode()))
        return out

    def poll_changes(self, apply: Callable[[list[str]], object] | None = None) -> list[str]:
        """Mount paths whose attributes or content may have changed since the previous call
        (the first call only takes a snapshot and returns []). Directories come after their
        contents; ref namespaces and the root are included when refs appear or vanish.

        ``apply(paths)`` (the kernel invalidation) runs before the new snapshot is taken:
        until then, opens of a moved path bypass the kernel's page cache and cached size."""
        now = self._read_refs()
        before = self._refs_seen
        if before is None or before == now:
            self._refs_seen = now
            return []
        out: list[str] = []
        structural = set(before) ^ set(now)
        for key in sorted(set(before) | set(now)):
            if before.get(key) == now.get(key):
                continue
            k = key.decode(errors="surrogateescape")
            is_branch = k.startswith(refs.BRANCH)
            name = k[len(refs.BRANCH):] if is_branch else k[len(refs.TAG):]
            base = f"/{name}" if is_branch else f"/{TAGS}/{name}"
            for v in (before.get(key), now.get(key)):
                if v is None:
                    continue
                try:
                    cid = v if is_branch else self._tag_commit(v)
                    cv = self._commit_view(cid)
                except CoralError:
                    continue
                out.extend(f"{base}/{p}" for p in cv.files)
                out.extend(f"{base}/{d}" for d in sorted(cv.dirs, key=len, reverse=True) if d)
            out.append(base)
            if key in structural:  # the namespace directories above the ref, up to the root
                parts = base.strip("/").split("/")
                out.extend("/" + "/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
                out.append("/")
        seen: set[str] = set()
        paths = [p for p in out if not (p in seen or seen.add(p))]
        if apply is not None:
            apply(paths)
        self._refs_seen = now
        return paths

    def _tag_commit(self, tag_id: bytes) -> bytes:
        tag = self.repo.objects.get_object(tag_id)
        if not isinstance(tag, Tag):
            raise PathNotFound("not a tag object")
        return tag.commit
