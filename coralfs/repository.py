"""The repository API: init, add/rm/save, commit, branches, tags, checkout, log, open.

A repository directory is also the work tree; the store lives in ``.coralfs/``.
Every commit is one LMDB write transaction (tree + commit + ref compare-and-swap +
consumed stage entries), so a crash leaves either the old or the new head.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import heapq
import io
import json
import logging
import mmap
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from coralfs.errors import (
    AmbiguousRevision,
    ConcurrentUpdate,
    CoralError,
    InvalidArgument,
    InvalidPath,
    NotARepository,
    NothingToCommit,
    PathNotFound,
    RefExists,
    RepositoryExists,
    UnknownRevision,
)
from coralfs.ingest import DEFAULT_MAX_DEPTH, Ingestor, IngestStats, Progress
from coralfs.reader import FileReader, FileView
from coralfs.repack import RepackStats, pending_count, repack
from coralfs.store import keys, refs
from coralfs.store.lmdb import Store, Txn
from coralfs.store.locks import gate_for
from coralfs.store.objects import (
    MODE_EXEC,
    MODE_FILE,
    Commit,
    Manifest,
    Tag,
    Tree,
    TreeEntry,
    check_path,
    path_clash,
)
from coralfs.store.objectstore import ObjectStore
from coralfs.store.refs import Refs
from coralfs.worktree import Status, Worktree
from coralfs.worktree_fs import SkipCallback

CORAL_DIR = ".coralfs"
FORMAT_VERSION = 1
_REV_SUFFIX = re.compile(r"(~\d*|\^\d*)$")
_HEX = re.compile(r"^[0-9a-f]{4,64}$")

Changes = Mapping[str, "TreeEntry | None"]
log = logging.getLogger(__name__)



def default_author() -> str:
    env = os.environ.get("CORALFS_AUTHOR")
    if env:
        return env
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"



def repo_root(path: str | os.PathLike[str]) -> str:
    """The repository directory for ``path`` (which may name its .coralfs); nothing is opened."""
    p = os.path.abspath(os.fspath(path))
    if os.path.basename(p) == CORAL_DIR:
        p = os.path.dirname(p)
    if not os.path.isfile(os.path.join(p, CORAL_DIR, "store", "data.mdb")):
        raise NotARepository(f"not a coralfs repository: {p}")
    return p

class Repository:
    """A coralfs repository. ``Repository(path)`` opens one; ``Repository.init(path)`` makes one."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, cache_bytes: int = 256 << 20,
                 threads: int = 2, auto_repack: bool | None = None) -> None:
        self.root = self._locate(path)
        self.control = os.path.join(self.root, CORAL_DIR)
        self.store = Store(os.path.join(self.control, "store"))
        self.objects = ObjectStore(self.store, cache_bytes)
        with self.store.read() as t:
            raw = t.get("config", keys.CONFIG_KEY)
        self.config: dict[str, Any] = json.loads(raw) if raw else {}
        if self.config.get("format", FORMAT_VERSION) > FORMAT_VERSION:
            raise CoralError(f"repository format {self.config['format']} is newer than this coralfs")
        self.ingestor = Ingestor(self.objects, int(self.config.get("max_depth", DEFAULT_MAX_DEPTH)), threads)
        self._gate = gate_for(os.path.join(self.control, "gc.lock"))
        if auto_repack is None:
            auto_repack = os.environ.get("CORALFS_AUTO_REPACK", "1") != "0"
        self.auto_repack = auto_repack
        self._repack_lock = threading.Lock()
        self._repack_thread: threading.Thread | None = None
        self._repack_again = False
        self._repack_stop = threading.Event()
        self._repack_error: BaseException | None = None
        self.worktree = Worktree(self)  # the stage, the stat cache and the work tree's files

    # ---------------------------------------------------------------- gc interlock
    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Hold while writing chunks that nothing references yet (ingest -> stage/commit).

        Shared: any number of writers at once, across processes; ``gc`` takes the lock
        exclusively, so it never sweeps a chunk that an unfinished ingest has written but not
        yet referenced. Re-entrant per thread (see :mod:`coralfs.store.locks`)."""
        return self._gate.shared()

    def exclusive(self, wait: bool = True) -> contextlib.AbstractContextManager[None]:
        """Exclusive side of ``writing()`` (for gc). Waits for this process's own writers (the
        background repack included); ``wait=False`` refuses (ConcurrentUpdate) only when
        another process is writing."""
        return self._gate.exclusive(wait)

    @staticmethod
    def _locate(path: str | os.PathLike[str] | None) -> str:
        if path is None:
            env = os.environ.get("CORALFS_REPO")
            if env:
                path = env
            else:
                d = os.path.abspath(os.getcwd())
                while True:
                    if os.path.isdir(os.path.join(d, CORAL_DIR, "store")):
                        return d
                    parent = os.path.dirname(d)
                    if parent == d:
                        raise NotARepository("not a coralfs repository (or any parent): "
                                             f"{os.getcwd()} (use -R PATH or CORALFS_REPO)")
                    d = parent
        return repo_root(path)

    @classmethod
    def init(cls, path: str | os.PathLike[str], default_branch: str = "main", **kw: Any) -> Repository:
        root = os.path.abspath(os.fspath(path))
        control = os.path.join(root, CORAL_DIR)
        if os.path.exists(os.path.join(control, "store", "data.mdb")):
            raise RepositoryExists(f"a repository already exists at {root}")
        refs.check_ref_name(default_branch)
        os.makedirs(os.path.join(control, "staging"), exist_ok=True)
        store = Store(os.path.join(control, "store"), create=True)
        config = {"format": FORMAT_VERSION, "default_branch": default_branch, "max_depth": DEFAULT_MAX_DEPTH,
                  "created": time.time()}

        def fn(t: Txn) -> None:
            t.put("config", keys.CONFIG_KEY, json.dumps(config).encode())
            Refs(t).set_head(default_branch)

        store.write(fn)
        store.close()
        return cls(root, **kw)

    # ---------------------------------------------------------------- repacking
    def repack(self) -> RepackStats:
        """Apply every pending demotion now (coralfs.repack): replaced versions become reverse
        deltas against their successors, or stay whole as anchors."""
        return repack(self.objects, self.writing)

    def pending_demotions(self) -> int:
        return pending_count(self.objects)

    def repack_soon(self) -> None:
        """Repack on a background thread at a low CPU priority (one at a time; started
        again if more work arrives while it runs). Commits call this: they return before
        the re-encoding, which a training loop or the mount overlaps with its work."""
        with self._repack_lock:
            if self._repack_stop.is_set():
                return
            if self._repack_thread is not None and self._repack_thread.is_alive():
                self._repack_again = True
                return
            self._repack_again = False
            self._repack_thread = threading.Thread(target=self._repack_loop, name="coralfs-repack")
            self._repack_thread.start()

    def _repack_loop(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # a low priority for this thread (Linux)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            try:
                repack(self.objects, self.writing, self._repack_stop)
            except Exception as e:  # noqa: BLE001 - the work stays queued; reported by wait_repack
                self._repack_error = e
            with self._repack_lock:
                if not self._repack_again or self._repack_stop.is_set():
                    self._repack_thread = None
                    return
                self._repack_again = False

    def _repack_idle(self) -> None:
        th = self._repack_thread
        if th is not None and th is not threading.current_thread():
            th.join()

    def wait_repack(self, timeout: float | None = None) -> bool:
        """Wait for the background repack; True when none is running. Raises what it failed with."""
        th = self._repack_thread
        if th is not None:
            th.join(timeout)
        err, self._repack_error = self._repack_error, None
        if err is not None:
            raise err
        return self._repack_thread is None or not self._repack_thread.is_alive()

    def warm_index(self) -> int:
        """Bring the store's B-tree pages (chunk, object and ref lookups, not the data) into
        memory, within ``lmdb.WARM_BUDGET``; for long-lived readers such as the mount.
        Returns the bytes walked."""
        return self.objects.store.warm_index()

    def close(self) -> None:
        """Close the repository, after the background repack has finished its work."""
        try:
            self.wait_repack()
        except Exception as e:  # noqa: BLE001 - what it did not finish stays queued
            logging.getLogger(__name__).warning("background repack failed (its work stays queued; "
                                                "`coralfs repack` retries it): %s", e)
        self._repack_stop.set()
        th = self._repack_thread
        if th is not None:
            th.join()
        self.store.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- refs (coralfs.store.refs)
    def current_branch(self) -> str | None:
        with self.store.read() as t:
            return Refs(t).follow_head()[0]

    def head(self) -> bytes | None:
        with self.store.read() as t:
            return Refs(t).follow_head()[1]

    @property
    def default_branch(self) -> str:
        return str(self.config.get("default_branch", "main"))

    def branches(self) -> dict[str, bytes]:
        with self.store.read() as t:
            return Refs(t).branches()

    def tags(self) -> dict[str, Tag]:
        with self.store.read() as t:
            ids = Refs(t).tags()
        out = {}
        for name, v in ids.items():
            obj = self.objects.get_object(v)
            assert isinstance(obj, Tag)
            out[name] = obj
        return out

    def branch_head(self, name: str) -> bytes | None:
        with self.store.read() as t:
            return Refs(t).branch(name)

    def create_branch(self, name: str, rev: str = "HEAD", force: bool = False) -> bytes:
        refs.check_ref_name(name)
        cid = self.resolve(rev)

        def fn(t: Txn) -> None:
            r = Refs(t)
            for o in r.branches():  # a/b and a/b/c cannot both be directories
                if o != name and (o.startswith(name + "/") or name.startswith(o + "/")):
                    raise RefExists(f"branch {name!r} conflicts with existing branch {o!r}")
            if force:
                r.set(refs.branch_ref(name), cid)
            else:
                r.add_if_new(refs.branch_ref(name), cid)

        self.store.write(fn)
        return cid

    def delete_branch(self, name: str, expected: bytes | bool = False) -> None:
        """Delete a branch; ``expected`` (a commit id) makes it a compare-and-swap
        (ConcurrentUpdate if the branch moved)."""

        def fn(t: Txn) -> None:
            r = Refs(t)
            cur = r.branch(name)
            if cur is None:
                raise UnknownRevision(f"no such branch: {name}")
            if r.follow_head()[0] == name:
                raise InvalidArgument(f"cannot delete the checked-out branch {name!r}")
            r.delete_if_equals(refs.branch_ref(name), cur if expected is False else bytes(expected))

        self.store.write(fn)

    def set_branch(self, name: str, new: bytes, expected: bytes | None) -> None:
        """Move a branch by compare-and-swap."""
        refs.check_ref_name(name)
        self.store.write(lambda t: Refs(t).set_if_equals(refs.branch_ref(name), expected, new))

    def tag(self, name: str, rev: str = "HEAD", message: str = "", metrics: Mapping[str, float] | None = None,
            meta: Mapping[str, str] | None = None, force: bool = False, tagger: str | None = None) -> Tag:
        refs.check_ref_name(name, "tag")
        cid = self.resolve(rev)
        tag = Tag(name, cid, tagger or default_author(), time.time(), message, dict(metrics or {}),
                  dict(meta or {}))

        def fn(t: Txn) -> None:
            r = Refs(t)
            tag_id = self.objects.put_object(t, tag)  # (not kept if the tag exists: the transaction fails)
            if force:
                r.set(refs.tag_ref(name), tag_id)
            else:
                r.add_if_new(refs.tag_ref(name), tag_id)

        self.store.write(fn)
        return tag

    def delete_tag(self, name: str) -> None:
        def fn(t: Txn) -> None:
            if not Refs(t).delete(refs.tag_ref(name)):
                raise UnknownRevision(f"no such tag: {name}")

        self.store.write(fn)

    # ---------------------------------------------------------------- revisions
    def commits(self) -> list[bytes]:
        """Every commit id in the repository."""
        with self.store.read() as t:
            return Refs(t).commits()

    def resolve(self, rev: str) -> bytes:
        """A revision (HEAD, HEAD~2, HEAD^, branch, tag, id prefix) -> commit id."""
        if not rev:
            raise UnknownRevision("empty revision")
        suffixes: list[str] = []
        base = rev
        while True:
            m = _REV_SUFFIX.search(base)
            if not m or m.start() == 0:
                break
            suffixes.insert(0, m.group(1))
            base = base[: m.start()]
        cid = self._resolve_base(base, rev)
        for s in suffixes:
            n = int(s[1:]) if len(s) > 1 else 1
            if s[0] == "~":
                for _ in range(n):
                    c = self.get_commit(cid)
                    if not c.parents:
                        raise UnknownRevision(f"{rev}: history is not that long")
                    cid = c.parents[0]
            else:
                c = self.get_commit(cid)
                if n == 0:
                    continue
                if len(c.parents) < n:
                    raise UnknownRevision(f"{rev}: commit has no parent {n}")
                cid = c.parents[n - 1]
        return cid

    def _resolve_base(self, base: str, rev: str) -> bytes:
        with self.store.read() as t:
            r = Refs(t)
            if base in ("HEAD", "@"):
                head = r.follow_head()[1]
                if head is None:
                    raise UnknownRevision("HEAD has no commits yet")
                return head
            v = r.branch(base) if "\x00" not in base else None
            if v is not None:
                return v
            v = r.tag(base) if "\x00" not in base else None
        if v is not None:
            tag = self.objects.get_object(v)
            assert isinstance(tag, Tag)
            return tag.commit
        low = base.lower()
        if _HEX.match(low):
            with self.store.read() as t:
                found = Refs(t).commits(low)
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise AmbiguousRevision(f"ambiguous revision {base!r}: "
                                        + ", ".join(f.hex()[:12] for f in found[:5]))
        raise UnknownRevision(f"unknown revision: {rev}")

    @staticmethod
    def split_revpath(spec: str, default_rev: str = "HEAD") -> tuple[str, str]:
        """'rev:path' -> (rev, path); a bare path means ``default_rev``."""
        if ":" in spec:
            rev, path = spec.split(":", 1)
            return rev or default_rev, path
        return default_rev, spec

    # ---------------------------------------------------------------- objects
    def get_commit(self, cid: bytes) -> Commit:
        obj = self.objects.get_object(cid)
        if not isinstance(obj, Commit):
            raise UnknownRevision(f"{cid.hex()[:12]} is not a commit")
        return obj

    def get_tree(self, oid: bytes) -> Tree:
        obj = self.objects.get_object(oid)
        assert isinstance(obj, Tree)
        return obj

    def get_manifest(self, oid: bytes) -> Manifest:
        obj = self.objects.get_object(oid)
        assert isinstance(obj, Manifest)
        return obj

    def tree(self, rev: str | bytes = "HEAD") -> Tree:
        cid = rev if isinstance(rev, bytes) else self.resolve(rev)
        return self.get_tree(self.get_commit(cid).tree)

    def ls(self, rev: str | bytes = "HEAD") -> dict[str, TreeEntry]:
        return dict(self.tree(rev).entries)

    def entry(self, rev: str | bytes, path: str) -> TreeEntry:
        path = check_path(path)
        e = self.tree(rev).entries.get(path)
        if e is None:
            raise PathNotFound(f"{path}: not in {rev if isinstance(rev, str) else rev.hex()[:12]}")
        return e

    def file_view(self, manifest_id: bytes) -> FileView:
        return FileView(self.objects, self.get_manifest(manifest_id))

    def open(self, rev: str | bytes, path: str | None = None) -> FileReader:
        """A seekable read-only binary file for ``rev:path`` (or ``open("rev:path")``)."""
        if path is None:
            assert isinstance(rev, str)
            rev, path = self.split_revpath(rev)
        e = self.entry(rev, path)
        return FileReader(self.file_view(e.manifest), path)

    def cat(self, rev: str | bytes, path: str, out: io.RawIOBase | Any, block: int = 4 << 20) -> int:
        with self.open(rev, path) as f:
            n = 0
            while chunk := f.read(block):
                out.write(chunk)
                n += len(chunk)
            return n

    def log(self, rev: str | bytes = "HEAD", n: int | None = None) -> list[tuple[bytes, Commit]]:
        """Commits reachable from ``rev``, newest first."""
        start = rev if isinstance(rev, bytes) else self.resolve(rev)
        out: list[tuple[bytes, Commit]] = []
        seen = {start}
        c0 = self.get_commit(start)
        heap: list[tuple[float, bytes, Commit]] = [(-c0.time, start, c0)]
        while heap and (n is None or len(out) < n):
            _, cid, c = heapq.heappop(heap)
            out.append((cid, c))
            for p in c.parents:
                if p not in seen:
                    seen.add(p)
                    pc = self.get_commit(p)
                    heapq.heappush(heap, (-pc.time, p, pc))
        return out

    # ---------------------------------------------------------------- ingest

    def ingest_buffer(self, view: memoryview, path: str, prev: TreeEntry | None = None,
                      progress: Progress | None = None) -> tuple[bytes, Manifest, IngestStats]:
        """Store a file's bytes; returns (manifest id, manifest, stats). The manifest is stored too.

        Waits first for this process's background repack: pages the repack frees can then
        hold the new records. Overlapped, every new version's records went to the end of the
        database file (12 fp32 fine-tune versions: 770 MB of file for 365 MB stored, against
        427 MB when serialized; bench/RESULTS.md, third session)."""
        prev_manifest = self.get_manifest(prev.manifest) if prev is not None else None
        self._repack_idle()
        with self.writing():
            return self.ingestor.ingest(view, path, prev_manifest, progress)

    def ingest_fd(self, fd: int, path: str, prev: TreeEntry | None = None,
                  progress: Progress | None = None) -> tuple[TreeEntry, IngestStats]:
        """Store the open regular file ``fd`` as ``path``. Size and mode come from this very fd,
        so what is stored is the file that was opened (callers open without following links)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidPath(f"{path}: not a regular file")
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if st.st_size else None
        view = memoryview(mm) if mm is not None else memoryview(b"")
        try:
            mid, manifest, stats = self.ingest_buffer(view, path, prev, progress)
        finally:
            view.release()
            if mm is not None:
                mm.close()
        mode = MODE_EXEC if st.st_mode & 0o111 else MODE_FILE
        return TreeEntry(mid, manifest.size, mode), stats

    def ingest_file(self, fs_path: str | os.PathLike[str], path: str, prev: TreeEntry | None = None,
                    progress: Progress | None = None) -> tuple[TreeEntry, IngestStats]:
        """Store the file at ``fs_path`` as ``path``. Its last component is opened without
        following a symlink (InvalidPath: symlinks are not stored); to refuse symlinked
        parent directories too, open through a :class:`WorkTree` and use ``ingest_fd``."""
        try:
            fd = os.open(fs_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InvalidPath(f"{os.fspath(fs_path)}: is a symbolic link (symlinks are not stored)") from None
            raise
        try:
            return self.ingest_fd(fd, path, prev, progress)
        finally:
            os.close(fd)

    def save(self, obj: Any, path: str, format: str | None = None, metadata: dict[str, str] | None = None,
             stage: bool = True, prev: TreeEntry | None = None) -> TreeEntry:
        """Stage a state dict (or any torch-saveable object) as checkpoint file ``path``, without a temp file.

        ``format``: "safetensors" or "pt"; by default from the extension. The file is not
        written to the work tree (``checkout`` materialises it). With ``stage=False`` the
        file is only stored; pass the returned entry to ``commit_changes``."""
        path = check_path(path)
        if stage:
            self.worktree.recover_checkout()  # its end clears the stage: finish it before staging anything
        fmt = format or ("safetensors" if path.endswith(".safetensors") else "pt")
        data = serialize_checkpoint(obj, fmt, metadata)
        if prev is None:
            with self.store.read() as t:
                prev = self.worktree.index_entry(t, path)
        with self.writing():
            mid, manifest, _ = self.ingest_buffer(memoryview(data), path, prev)
            entry = TreeEntry(mid, manifest.size, MODE_FILE)
            if stage:
                self.worktree.stage_entry(path, entry)
        return entry

    # ---------------------------------------------------------------- commit
    def commit(self, message: str, metrics: Mapping[str, float] | None = None,
               meta: Mapping[str, str] | None = None, author: str | None = None, allow_empty: bool = False
               ) -> bytes:
        """Commit the staged changes on the current branch (or detached HEAD)."""
        changes, consumed = self.worktree.staged_changes()
        return self._commit(None, changes, message, metrics, meta, author, allow_empty, consumed=consumed)

    def commit_changes(self, branch: str, changes: Changes, message: str,
                       metrics: Mapping[str, float] | None = None, meta: Mapping[str, str] | None = None,
                       author: str | None = None, expected_head: bytes | None | bool = False,
                       allow_empty: bool = False, parents_extra: tuple[bytes, ...] = (),
                       txn_hook: Callable[[Txn, bytes], None] | None = None) -> bytes:
        """Commit ``changes`` (path -> entry, None deletes) on top of ``branch``'s head, bypassing the stage.

        ``expected_head``: False applies on top of whatever the head is now; a commit id
        (or None for an unborn branch) makes the commit fail with ConcurrentUpdate if the
        branch moved. ``txn_hook(txn, commit_id)`` runs inside the commit's write
        transaction (e.g. the mount deletes the pending entries the commit consumed)."""
        refs.check_ref_name(branch)
        return self._commit(branch, changes, message, metrics, meta, author, allow_empty,
                            expected_head=expected_head, parents_extra=parents_extra, txn_hook=txn_hook)

    def _commit(self, branch: str | None, changes: Changes, message: str,
                metrics: Mapping[str, float] | None, meta: Mapping[str, str] | None, author: str | None,
                allow_empty: bool, consumed: dict[bytes, bytes] | None = None,
                expected_head: bytes | None | bool = False, parents_extra: tuple[bytes, ...] = (),
                txn_hook: Callable[[Txn, bytes], None] | None = None) -> bytes:
        for p in changes:
            check_path(p)
        author = author or default_author()
        now = time.time()

        def fn(t: Txn) -> bytes:
            r = Refs(t)
            if branch is None:
                cur_branch, head = r.follow_head()
                ref = refs.branch_ref(cur_branch) if cur_branch is not None else refs.HEAD
            else:
                ref = refs.branch_ref(branch)
                head = r.get(ref)
            if expected_head is not False and head != expected_head:
                raise ConcurrentUpdate(f"{branch or 'HEAD'} moved: expected "
                                       f"{expected_head.hex()[:12] if expected_head else 'none'}, found "
                                       f"{head.hex()[:12] if head else 'none'}")
            old = self.get_tree(self.get_commit(head).tree).entries if head else {}
            entries = dict(old)
            for p, e in changes.items():
                if e is None:
                    entries.pop(p, None)
                else:
                    entries[p] = e
            _check_tree_paths(entries)
            if entries == old and not allow_empty and not parents_extra:
                raise NothingToCommit("nothing to commit")
            tree_id = self.objects.put_object(t, Tree(entries))
            c = Commit(tree_id, ((head,) if head else ()) + parents_extra, author, now, message,
                       {k: float(v) for k, v in (metrics or {}).items()}, {k: str(v) for k, v in (meta or {}).items()})
            cid = self.objects.put_object(t, c)
            r.index_commit(cid)
            r.set_if_equals(ref, head, cid)
            for k, v in (consumed or {}).items():  # only what we read: a concurrent `add` stays staged
                if t.get("stage", k) == v:
                    t.delete("stage", k)
            if txn_hook is not None:
                txn_hook(t, cid)
            return cid

        cid = self.store.write(fn)
        if self.auto_repack:
            self.repack_soon()
        return cid


    # ---------------------------------------------------------------- the work tree (coralfs.worktree)
    def add(self, paths: Iterable[str | os.PathLike[str]], progress: Callable[[str], Progress | None] | None = None,
            on_skip: SkipCallback | None = None) -> IngestStats:
        """Stage work-tree files (directories recursively); see :meth:`Worktree.add`."""
        return self.worktree.add(paths, progress, on_skip)

    def rm(self, paths: Iterable[str | os.PathLike[str]], cached: bool = False) -> list[str]:
        """Stage removal of tracked files; see :meth:`Worktree.rm`."""
        return self.worktree.rm(paths, cached)

    def stage_entry(self, path: str, entry: TreeEntry | None) -> None:
        """Stage an already-ingested entry (or a deletion) without touching the work tree."""
        self.worktree.stage_entry(path, entry)

    def status(self) -> Status:
        """Staged, modified, deleted and untracked paths; see :meth:`Worktree.status`."""
        return self.worktree.status()

    def checkout(self, rev: str, force: bool = False, progress: Callable[[str], Progress | None] | None = None
                 ) -> bytes:
        """Switch HEAD to ``rev`` and make the work tree match; see :meth:`Worktree.checkout`."""
        return self.worktree.checkout(rev, force, progress)

    def recover_checkout(self) -> bytes | None:
        """Finish a checkout a killed process left half done; see :meth:`Worktree.recover_checkout`."""
        return self.worktree.recover_checkout()

    # ---------------------------------------------------------------- stats
    def reachable_commits(self) -> set[bytes]:
        with self.store.read() as t:
            r = Refs(t)
            starts = list(r.branches().values())
            tag_ids = list(r.tags().values())
            head = r.follow_head()[1]
        starts += [self.objects.get_object(x).commit for x in tag_ids]  # type: ignore[union-attr]
        if head:
            starts.append(head)
        return self.ancestors(starts)

    def ancestors(self, starts: Iterable[bytes]) -> set[bytes]:
        """Every commit reachable from ``starts`` through parents (the starts included)."""
        seen: set[bytes] = set()
        stack = list(starts)
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen.add(c)
            stack.extend(self.get_commit(c).parents)
        return seen

    def stats(self) -> dict[str, Any]:
        """Logical vs stored bytes, dedup and codec breakdown."""
        from coralfs.store.objectstore import Headers

        manifests: set[bytes] = set()
        versions = 0
        for c in self.reachable_commits():
            for e in self.get_tree(self.get_commit(c).tree).entries.values():
                manifests.add(e.manifest)
        logical = 0
        refs_to_chunks = 0
        unique_chunks: set[bytes] = set()
        for m in manifests:
            man = self.get_manifest(m)
            logical += man.size
            versions += 1
            ids = man.chunk_ids()
            refs_to_chunks += len(ids)
            unique_chunks.update(ids)
        by_codec: dict[str, dict[str, int]] = {}
        stored_chunks = 0
        delta = 0
        with self.store.read() as t:
            n_chunks = 0
            for _, size, h in Headers(t).scan():  # headers only
                assert h is not None
                d = by_codec.setdefault(h.codec_name, {"chunks": 0, "raw": 0, "stored": 0})
                d["chunks"] += 1
                d["raw"] += h.raw_len
                d["stored"] += size
                stored_chunks += size
                n_chunks += 1
                delta += 1 if h.bases else 0
            objects_bytes = sum(len(v) for _, v in t.items("objects"))
            pending = sum(1 for _ in t.keys("index", keys.DEMOTIONS))
        info = self.store.info()
        stored = stored_chunks + objects_bytes
        return {
            "file_versions": versions, "logical_bytes": logical, "stored_bytes": stored,
            "ratio": logical / stored if stored else 0.0, "chunks": n_chunks, "delta_chunks": delta,
            "chunk_refs": refs_to_chunks, "dedup_hits": refs_to_chunks - len(unique_chunks),
            "object_bytes": objects_bytes, "by_codec": by_codec, "lmdb_file_bytes": info["file_size"],
            "lmdb_pages_used": info["last_pgno"] + 1, "page_size": info["psize"],
            "pending_demotions": pending,
        }


def _check_tree_paths(entries: Mapping[str, TreeEntry]) -> None:
    """A path cannot be both a file and a directory."""
    clash = path_clash(entries)
    if clash is not None:
        raise InvalidArgument(f"path is both a file and a directory: {clash}")


def serialize_checkpoint(obj: Any, fmt: str, metadata: dict[str, str] | None = None) -> bytes:
    """A state dict as the bytes of a checkpoint file (no temporary file)."""
    if fmt == "safetensors":
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in obj.items()}, metadata=metadata)
    if fmt in ("pt", "pth", "torch"):
        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()
    raise InvalidArgument(f"unknown checkpoint format {fmt!r} (use safetensors or pt)")
