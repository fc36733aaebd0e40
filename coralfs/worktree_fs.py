"""Work-tree file operations that never leave their directory and never follow a symlink.

Why: a repository may come from someone else (its trees are hostile input), and a work
tree may hold symlinks the user made, or one swapped in while coralfs runs. A path
joined onto the root and handed to ``open()`` follows every symlink on the way, so a
symlinked directory inside the work tree (``d -> /home/user``) would let checkout write,
rename or delete outside it, and let ``add`` store a file from elsewhere.

So every operation here is relative to a directory file descriptor: the root is opened
once, each parent component is opened with ``O_DIRECTORY | O_NOFOLLOW`` relative to the
previous one, and the last component is created (``O_CREAT | O_EXCL | O_NOFOLLOW``),
renamed, unlinked or removed relative to its parent's fd. A component that is a symlink
or not a directory raises :class:`UnsafePath`; nothing is ever followed, so a check made
earlier cannot be raced by swapping a directory for a link (the operation itself refuses).
Paths are repository paths (``check_path``: relative, ``/``-separated, no ``..``), so
every name handed to the kernel is one plain component.

The same class walks a directory tree being imported (``coralfs import DIR``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator

from coralfs.errors import CoralError, InvalidPath, UnsafePath
from coralfs.store.objects import check_path

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO must not hang us
_O_TEMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

#: Prefix of every temporary file checkout creates next to its target (see :meth:`WorkTree.write_file`).
TEMP_PREFIX = ".coralfs-tmp-"
CONTROL_DIR = ".coralfs"

SkipCallback = Callable[[str, str], None]  # (repository path, reason)


def kind(st: os.stat_result | None) -> str:
    """'missing', 'file', 'dir', 'symlink' or 'other' for an lstat result."""
    if st is None:
        return "missing"
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "other"


class WorkTree:
    """A directory tree opened once; every operation stays inside it without following symlinks.

    The root itself is opened normally (the user chose it, perhaps through a symlink);
    nothing below it is followed. Use as a context manager (it holds the root's fd)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> WorkTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ walking components
    @staticmethod
    def _parts(path: str) -> list[str]:
        return check_path(path).split("/")

    def _unsafe(self, parts: list[str], i: int, dfd: int) -> UnsafePath:
        """The error for component ``parts[i]`` (relative to ``dfd``) that is not a real directory."""
        where = "/".join(parts[: i + 1])
        try:
            k = kind(os.stat(parts[i], dir_fd=dfd, follow_symlinks=False))
        except OSError:
            k = "other"
        what = {"symlink": "is a symbolic link", "file": "is a file, not a directory"}.get(k, "is not a directory")
        return UnsafePath(f"{where} {what} (coralfs never follows symlinks in the work tree"
                          + (" and does not store them)" if k == "symlink" else ")"))

    def open_dir(self, parts: list[str], create: bool = False) -> int:
        """A new fd of the directory ``parts`` (components) below the root, walked without
        following anything; ``create`` makes missing directories. Raises FileNotFoundError
        (a component is missing and not ``create``) or UnsafePath. The caller closes it."""
        fd = os.dup(self.fd)
        try:
            for i, name in enumerate(parts):
                try:
                    nfd = os.open(name, _O_DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(name, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                    try:
                        nfd = os.open(name, _O_DIR, dir_fd=fd)
                    except OSError as e:
                        if e.errno in (errno.ELOOP, errno.ENOTDIR):
                            raise self._unsafe(parts, i, fd) from None
                        raise
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self._unsafe(parts, i, fd) from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def parent(self, path: str, create: bool = False) -> tuple[int, str]:
        """(new fd of ``path``'s directory, its last component); see :meth:`open_dir`."""
        parts = self._parts(path)
        return self.open_dir(parts[:-1], create), parts[-1]

    # ------------------------------------------------------------ queries
    def lstat(self, path: str) -> os.stat_result | None:
        """lstat of ``path`` (None if it or a parent is missing); UnsafePath if a parent is
        a symlink or a file."""
        try:
            pfd, name = self.parent(path)
        except FileNotFoundError:
            return None
        try:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(pfd)

    def check_parents(self, path: str, ok: Callable[[str, str], bool] | None = None) -> bool:
        """Raise UnsafePath if an existing parent component of ``path`` is not a real
        directory, unless ``ok(component path, kind)`` accepts it (e.g. a tracked file that
        is about to be deleted). Changes nothing. Returns True when every parent exists as a
        directory (so ``lstat(path)`` is meaningful), False when one is missing or accepted."""
        parts = self._parts(path)
        fd = os.dup(self.fd)
        try:
            for i, name in enumerate(parts[:-1]):
                st = _lstat_at(fd, name)
                if st is None:
                    return False
                k = kind(st)
                if k != "dir":
                    if ok is not None and ok("/".join(parts[: i + 1]), k):
                        return False
                    raise self._unsafe(parts, i, fd)
                try:
                    nfd = os.open(name, _O_DIR, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self._unsafe(parts, i, fd) from None
                    raise
                os.close(fd)
                fd = nfd
            return True
        finally:
            os.close(fd)

    def open_read(self, path: str) -> tuple[int, os.stat_result]:
        """(fd, fstat) of the regular file ``path``, opened without following any symlink:
        the file read is the file named (no swap between a check and the open). InvalidPath
        for a symlink or anything that is not a regular file; FileNotFoundError if missing."""
        pfd, name = self.parent(path)
        try:
            try:
                fd = os.open(name, _O_READ, dir_fd=pfd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise InvalidPath(f"{path}: is a symbolic link (coralfs does not store symlinks)") from None
                raise
        finally:
            os.close(pfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise InvalidPath(f"{path}: not a regular file")
        return fd, st

    def walk(self, start: str = "", on_skip: SkipCallback | None = None,
             exclude: Callable[[str], bool] | None = None) -> Iterator[tuple[str, os.stat_result]]:
        """(path, lstat) of every regular file under directory ``start`` ("" = the root), sorted
        by name per directory, never entering a symlink. A symlink (or a FIFO, socket, device)
        is reported to ``on_skip(path, reason)`` and skipped; so is a directory that turned
        into a symlink while walking. ``exclude(path)`` prunes files and directories. The
        root's ``.coralfs`` is never entered."""
        parts = self._parts(start) if start else []
        fd = self.open_dir(parts)
        yield from self._walk_fd(fd, start, on_skip, exclude)

    def _walk_fd(self, fd: int, prefix: str, on_skip: SkipCallback | None,
                 exclude: Callable[[str], bool] | None) -> Iterator[tuple[str, os.stat_result]]:
        try:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                rel = f"{prefix}/{e.name}" if prefix else e.name
                if not prefix and e.name == CONTROL_DIR:
                    continue
                if exclude is not None and exclude(rel):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                k = kind(st)
                if k == "file":
                    yield rel, st
                elif k == "dir":
                    try:
                        sub = os.open(e.name, _O_DIR, dir_fd=fd)
                    except FileNotFoundError:
                        continue
                    except OSError as err:
                        if err.errno in (errno.ELOOP, errno.ENOTDIR):
                            if on_skip:
                                on_skip(rel, "replaced by a symbolic link while walking")
                            continue
                        raise
                    yield from self._walk_fd(sub, rel, on_skip, exclude)
                elif on_skip is not None:
                    on_skip(rel, "symbolic link (not stored)" if k == "symlink" else "not a regular file")
        finally:
            os.close(fd)

    # ------------------------------------------------------------ changes
    def write_file(self, path: str, blocks: Iterable[bytes], mode: int, temp_name: str) -> os.stat_result:
        """Write ``path`` atomically: the blocks go to ``temp_name`` (created with ``O_EXCL |
        O_NOFOLLOW`` in the same directory, so it never clobbers or follows anything), then
        ``rename`` over the target (which replaces a file, or a symlink itself, never what a
        link points at). Missing directories are created; a directory at ``path`` refuses.
        ``blocks`` may raise (e.g. a hash mismatch at the end): the temp file is removed and
        the target is untouched. Returns the new file's lstat."""
        pfd, name = self.parent(path, create=True)
        try:
            st = _lstat_at(pfd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{path}: is a directory in the work tree")
            fd = os.open(temp_name, _O_TEMP, 0o600, dir_fd=pfd)
            try:
                try:
                    for block in blocks:
                        view = memoryview(block)
                        while view:
                            n = os.write(fd, view)
                            view = view[n:]
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
                os.replace(temp_name, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                try:
                    os.unlink(temp_name, dir_fd=pfd)
                except FileNotFoundError:
                    pass
                raise
            new = _lstat_at(pfd, name)
            if new is None:
                raise CoralError(f"{path}: vanished right after it was written")
            return new
        finally:
            os.close(pfd)

    def unlink(self, path: str) -> bool:
        """Remove the file (or the symlink itself) at ``path``; False if it was not there.
        A directory is left alone (False)."""
        try:
            pfd, name = self.parent(path)
        except FileNotFoundError:
            return False
        try:
            st = _lstat_at(pfd, name)
            if st is None or stat.S_ISDIR(st.st_mode):
                return False
            try:
                os.unlink(name, dir_fd=pfd)
            except FileNotFoundError:
                return False
            return True
        finally:
            os.close(pfd)

    def prune_empty_dirs(self, path: str) -> None:
        """Remove ``path``'s parent directories that are now empty, deepest first, up to (not
        including) the root. ``rmdir`` relative to the parent's fd: a symlink is never
        followed (rmdir of one fails) and a non-empty directory stops the climb."""
        parts = self._parts(path)[:-1]
        fds = [os.dup(self.fd)]
        try:
            for name in parts:
                try:
                    fds.append(os.open(name, _O_DIR, dir_fd=fds[-1]))
                except OSError:
                    break
            for i in range(len(fds) - 1, 0, -1):
                try:
                    os.rmdir(parts[i - 1], dir_fd=fds[i - 1])
                except OSError:
                    break
        finally:
            for fd in fds:
                os.close(fd)

    def remove_temp_files(self, dirs: Iterable[str], prefix: str) -> list[str]:
        """Remove regular files named ``prefix*`` in each directory of ``dirs`` ("" = root)
        (temp files an interrupted checkout left behind); returns their paths."""
        removed = []
        for d in sorted(set(dirs)):
            try:
                fd = self.open_dir(d.split("/") if d else [])
            except (FileNotFoundError, UnsafePath):
                continue
            try:
                with os.scandir(fd) as it:
                    names = [e.name for e in it if e.name.startswith(prefix)]
                for n in names:
                    st = _lstat_at(fd, n)
                    if st is not None and stat.S_ISREG(st.st_mode):
                        os.unlink(n, dir_fd=fd)
                        removed.append(f"{d}/{n}" if d else n)
            finally:
                os.close(fd)
        return removed


def _lstat_at(dfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def read_blocks(fd: int, block: int = 8 << 20) -> Iterator[bytes]:
    """The content of an open file, from offset 0, in blocks."""
    pos = 0
    while True:
        data = os.pread(fd, block, pos)
        if not data:
            return
        pos += len(data)
        yield data
