"""One error hierarchy for coralfs.

Every error carries a CLI exit code and an errno for the FUSE layer. The class
docstring is the default message (borg style).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence


class CoralError(Exception):
    """coralfs error"""

    exit_code: int = 1
    errno: int = errno.EIO

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class NotARepository(CoralError):
    """not a coralfs repository"""

    exit_code = 2
    errno = errno.ENOENT


class RepositoryExists(CoralError):
    """a repository already exists here"""

    exit_code = 2
    errno = errno.EEXIST


class UnknownRevision(CoralError):
    """unknown revision"""

    exit_code = 3
    errno = errno.ENOENT


class AmbiguousRevision(UnknownRevision):
    """ambiguous revision prefix"""


class PathNotFound(CoralError):
    """path not found"""

    exit_code = 3
    errno = errno.ENOENT


class InvalidPath(CoralError):
    """invalid path name"""

    exit_code = 2
    errno = errno.EINVAL


class InvalidName(CoralError):
    """invalid branch or tag name"""

    exit_code = 2
    errno = errno.EINVAL


class RefExists(CoralError):
    """ref already exists"""

    exit_code = 4
    errno = errno.EEXIST


class NothingToCommit(CoralError):
    """nothing to commit"""

    exit_code = 5


class WouldOverwrite(CoralError):
    """checkout would overwrite uncommitted changes"""

    exit_code = 6
    errno = errno.EBUSY


class ConcurrentUpdate(CoralError):
    """the ref was changed by someone else"""

    exit_code = 7
    errno = errno.EAGAIN


class MergeConflict(CoralError):
    """merge conflict"""

    exit_code = 8


class MergeConflicts(MergeConflict):
    """merge conflict"""

    def __init__(self, conflicts: Sequence[object], branch: str = "") -> None:
        self.conflicts = list(conflicts)  # coralfs.merge.Conflict values
        head = "; ".join(str(c) for c in self.conflicts[:8])
        more = f" (and {len(self.conflicts) - 8} more)" if len(self.conflicts) > 8 else ""
        super().__init__(f"{len(self.conflicts)} merge conflict(s): {head}{more}; "
                         f"{branch or 'the branch'} is unchanged (resolve with --strategy / --strategy-for)")


class IntegrityError(CoralError):
    """stored data does not match its id (corruption)"""

    exit_code = 9
    errno = errno.EIO


class GcAborted(IntegrityError):
    """gc stopped: a reachable object is missing or corrupt (run `coralfs fsck`)"""


class UnknownKeys(GcAborted):
    """gc stopped: keys that belong to no key family (coralfs.store.keys)"""


class MissingObject(IntegrityError):
    """object missing from the store"""


class FormatError(CoralError):
    """malformed record or object"""

    exit_code = 9
    errno = errno.EIO


class ReadOnly(CoralError):
    """read-only: commits and tags are immutable"""

    exit_code = 10
    errno = errno.EROFS


class InvalidArgument(CoralError):
    """invalid argument"""

    exit_code = 2
    errno = errno.EINVAL


class NameTooLong(InvalidPath):
    """file name too long"""

    errno = errno.ENAMETOOLONG


class NotACheckpoint(CoralError):
    """not a checkpoint file (no tensors found in it)"""

    exit_code = 11
    errno = errno.EINVAL


class CheckpointLoadError(NotACheckpoint):
    """checkpoint cannot be loaded with torch's weights-only loader"""


class NoSpace(CoralError):
    """no space left on device"""

    exit_code = 12
    errno = errno.ENOSPC


class UnsafePath(InvalidPath):
    """path goes through a symbolic link or a non-directory in the work tree"""

    errno = errno.ELOOP


# ------------------------------------------------------------------ the mount's (errno first)
class DirectoryNotEmpty(CoralError):
    """directory not empty"""

    exit_code = 2
    errno = errno.ENOTEMPTY


class FileExists(CoralError):
    """file exists"""

    exit_code = 2
    errno = errno.EEXIST


class CrossDevice(CoralError):
    """cannot move between branches (copy instead)"""

    exit_code = 2
    errno = errno.EXDEV


class NotPermitted(CoralError):
    """operation not permitted"""

    exit_code = 2
    errno = errno.EPERM


class Busy(CoralError):
    """resource busy"""

    exit_code = 2
    errno = errno.EBUSY


class IngestFailed(CoralError):
    """the written file could not be stored"""

    exit_code = 1
    errno = errno.EIO


class AlreadyMounted(CoralError):
    """the repository is already mounted writable"""

    exit_code = 7
    errno = errno.EBUSY


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


class NotSupported(CoralError):
    """operation not supported"""

    exit_code = 2
    errno = errno.EOPNOTSUPP


class StaleNode(CoralError):
    """stale file handle: the path shows another version now (the kernel looks it up again)"""

    exit_code = 1
    errno = errno.ESTALE


class UnknownNode(CoralError):
    """no such inode"""

    exit_code = 1
    errno = errno.ENOENT
