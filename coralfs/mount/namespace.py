"""The mount's write namespace: how requests on a branch directory change it.

A branch directory is writable, and writing is committing (see :mod:`coralfs.mount.writer`
for staging, storing at close and the commits). This is the namespace half of the view:
create and open for writing, write, truncate, unlink, rename, mkdir, rmdir, chmod,
utimens, and ``fsync`` of a directory (commit now). Every change goes through the
:class:`~coralfs.mount.writer.Writer` under its lock; names a checkout could not write are
refused here, before any data (:func:`check_new_path`).

:class:`WriteNamespace` is the write half of :class:`coralfs.mount.view.MountView` (which
inherits it): it uses the view's resolution (``_resolve``, ``_branch_view``,
``_commit_view``, ``_file_view``), its handle table (``_handles``, ``_add_handle``,
``_same_inode``, ``release``) and ``writer``.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING

from coralfs.errors import (
    BadFileHandle,
    Busy,
    CrossDevice,
    DirectoryNotEmpty,
    FileExists,
    InvalidArgument,
    InvalidPath,
    IsADirectory,
    NotADirectory,
    NotPermitted,
    NotSupported,
    PathNotFound,
    ReadOnly,
)
from coralfs.mount.writer import Staged, Writer, exec_mode
from coralfs.store.objects import MODE_FILE, TreeEntry, check_path
from coralfs.store.refs import Refs

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from coralfs.mount.view import OpenFile, _CommitView, _Node
    from coralfs.reader import FileView
    from coralfs.repository import Repository

COMMITS = "@commits"
TAGS = "@tags"
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
UNBORN = b""  # the "head" of the default branch of an empty repository


class WriteNamespace:
    """The write operations of a branch directory (mixed into MountView)."""

    if TYPE_CHECKING:  # what the view provides
        repo: Repository
        writer: Writer | None
        _lock: threading.Lock
        _handles: dict[int, OpenFile]
        _split: Callable[[str], list[str]]

        def is_immutable(self, path: str) -> bool: ...
        def _resolve(self, path: str) -> _Node: ...
        def _branch_view(self, name: str, cid: bytes) -> _CommitView: ...
        def _commit_view(self, cid: bytes) -> _CommitView: ...
        def _file_view(self, manifest_id: bytes) -> FileView: ...
        def _add_handle(self, path: str, s: Staged, writable: bool, append: bool = False, direct: bool = True,
                        ino: int | None = None) -> int: ...
        def _same_inode(self, h: OpenFile, path: str, ino: int | None) -> bool: ...
        def opened(self, fh: int) -> OpenFile: ...
        def release(self, fh: int) -> None: ...

    def refuse_write(self, path: str) -> None:
        """Raise the error a write (create, mkdir, unlink, rename, truncate, ...) gets: ReadOnly."""
        raise ReadOnly(f"{path}: read-only file system" if not self.is_immutable(path)
                       else f"{path}: commits and tags are immutable")

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
                target = Refs(t).branch("/".join(parts[:i]))
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
            branch, head, osub, nsub = self._rename_ends(old, new, flags)
            cv = self._branch_view(branch, head)
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
            moves, dirs_from = self._rename_moves(cv, osub, nsub, old, new, src_file is not None, dst_file, dst_dir)
            durable, bind = _moved_entries(cv, moves)
            replaced = (dst_file,) if isinstance(dst_file, Staged) else ()
            w.change(branch, head, self._commit_view(head).files, durable=durable, bind=bind, unbind=replaced,
                     add_dirs=tuple(nsub + d[len(osub):] for d in dirs_from) + (_parent(osub), _parent(nsub)),
                     remove_dirs=tuple(dirs_from) + ((nsub,) if dst_dir else ()))
            if dst_file is not None:
                self._rehome(new, None)
            base = f"/{branch}/"
            for p, q in moves:
                self._rehome(base + p, base + q)

    def _rename_ends(self, old: str, new: str, flags: int) -> tuple[str, bytes, str, str]:
        """(branch, head, old path, new path inside the branch) of a rename, or the error."""
        b1, rest1, head = self._locate(old)
        b2, rest2, _ = self._locate(new)
        if b1 is None or b2 is None or not rest1 or not rest2 or head is None:
            if b1 is not None and b2 is not None and b1 != b2 and rest1:
                raise CrossDevice(f"{old} -> {new}: different branches")
            raise NotPermitted(f"{old} -> {new}: branch directories cannot be renamed (files can, inside a branch)")
        if b1 != b2:
            raise CrossDevice(f"{old} -> {new}: different branches")
        if flags & RENAME_EXCHANGE:
            raise InvalidArgument("RENAME_EXCHANGE is not supported")
        nsub = "/".join(rest2)
        check_new_path(nsub, new)
        return b1, head, "/".join(rest1), nsub

    @staticmethod
    def _rename_moves(cv: _CommitView, osub: str, nsub: str, old: str, new: str, src_is_file: bool,
                      dst_file: TreeEntry | Staged | None, dst_dir: bool) -> tuple[list[tuple[str, str]], list[str]]:
        """The files (old path, new path) and the session directories a rename moves."""
        if src_is_file:
            if dst_dir:
                raise IsADirectory(f"{new}: is a directory")
            return [(osub, nsub)], []
        if dst_file is not None:
            raise NotADirectory(f"{new}: not a directory")
        if nsub.startswith(osub + "/"):
            raise InvalidArgument(f"{old} -> {new}: cannot move a directory into itself")
        if dst_dir and cv.dirs[nsub]:
            raise DirectoryNotEmpty(f"{new}: directory not empty")
        moves = [(p, nsub + p[len(osub):]) for p in cv.files if p.startswith(osub + "/")]
        return moves, [d for d in cv.dirs if d == osub or d.startswith(osub + "/")]

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


def check_new_path(sub: str, path: str) -> None:
    """A name a file or directory is created under (or renamed to) must be storable and must
    check out: refused here, before any data is written (never at ``close()``)."""
    try:
        check_path(sub)
    except InvalidPath as e:  # (NameTooLong: ENAMETOOLONG; the rest EINVAL)
        raise type(e)(f"{path}: {e}") from None


def _moved_entries(cv: _CommitView, moves: list[tuple[str, str]]
                   ) -> tuple[dict[str, TreeEntry | None], dict[str, Staged | None]]:
    """The pending entries (None: gone) and staged-file bindings a set of moves makes. A file
    being written moves with its last closed content; its next close records the rest."""
    durable: dict[str, TreeEntry | None] = {p: None for p, _ in moves}
    bind: dict[str, Staged | None] = {p: None for p, _ in moves if isinstance(cv.files[p], Staged)}
    for p, q in moves:
        item = cv.files[p]
        if isinstance(item, Staged):
            durable[q] = item.durable
            bind[q] = item
        else:
            durable[q] = item
    return durable, bind


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""
