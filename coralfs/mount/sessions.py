"""Mount sessions: one writable mount per repository, staging directories, recovery.

* ``.coralfs/mount.lock`` (flock, JSON with the pid and mount point) is held by the writable
  mount for its whole life: a second writable mount is refused, naming the first;
  ``coralfs flush-mount`` without a mount holds it while it commits.
* Each mount stages written files in its own directory
  ``.coralfs/staging/mount-<pid>-<ms>/`` (``<n>.data`` + ``<n>.json``), locked for the life of
  the process. A session whose lock is free belongs to a dead mount: the next mount (or
  ``flush-mount``) discards what it was still writing (only what a close stored is ever
  committed: that is a pending entry already) and commits the pending entries left behind.
* :func:`flush` is ``coralfs flush-mount``: with a running mount it asks the mount to commit
  (``fsync`` of the branch directory), without one it commits here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coralfs.errors import AlreadyMounted, CoralError
from coralfs.mount.mtab import fsync_dir, log_path
from coralfs.mount.pending import Outcome, PendItem, commit_pending
from coralfs.store import keys
from coralfs.store.objects import TreeEntry

if TYPE_CHECKING:
    from coralfs.repository import Repository

log = logging.getLogger("coralfs.mount")

STAGING_DIR = "staging"
SESSION_PREFIX = "mount-"


# ------------------------------------------------------------------ one writable mount per repository
MOUNT_LOCK = "mount.lock"


def take_mount_lock(repo_root: str, mountpoint: str | None) -> int:
    """Hold ``.coralfs/mount.lock`` (flock, for the life of the mount) or refuse, naming the mount
    that holds it. Two writable mounts of one repository would commit each other's files."""
    path = os.path.join(repo_root, ".coralfs", MOUNT_LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = mount_lock_holder(repo_root) or {}
        os.close(fd)
        raise AlreadyMounted(f"{repo_root} is already mounted writable by pid {holder.get('pid', '?')} on "
                             f"{holder.get('mountpoint', '?')}: unmount it first, or mount this one --read-only"
                             ) from None
    info = json.dumps({"pid": os.getpid(), "mountpoint": mountpoint, "started": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    return fd


def mount_lock_holder(repo_root: str) -> dict[str, Any] | None:
    """The running writable mount of a repository (pid, mountpoint), or None."""
    path = os.path.join(repo_root, ".coralfs", MOUNT_LOCK)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return dict(json.loads(os.pread(fd, 4096, 0) or b"{}"))
            except ValueError:
                return {}
        return None  # nobody holds it
    finally:
        os.close(fd)


# ------------------------------------------------------------------ mount sessions (staging dirs)
def staging_root(repo_root: str) -> str:
    return os.path.join(repo_root, ".coralfs", STAGING_DIR)


class Session:
    """This mount's staging directory, locked (flock) for the life of the process: a session
    whose lock is free belongs to a dead mount and is recovered by the next one."""

    def __init__(self, repo_root: str, mountpoint: str | None) -> None:
        root = staging_root(repo_root)
        os.makedirs(root, exist_ok=True)
        name = f"{SESSION_PREFIX}{os.getpid()}-{int(time.time() * 1000)}"
        tmp = os.path.join(root, ".tmp-" + name)
        os.mkdir(tmp)
        self.lock_fd = os.open(os.path.join(tmp, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        write_json(os.path.join(tmp, "session.json"), {"pid": os.getpid(), "mountpoint": mountpoint,
                                                         "started": time.time()})
        self.dir = os.path.join(root, name)
        os.rename(tmp, self.dir)  # recovery only looks at locked-or-dead "mount-*" directories

    def close(self, remove: bool) -> None:
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self.lock_fd)


def write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


@contextlib.contextmanager
def _dead_session(path: str) -> Iterator[bool]:
    """Yields True (holding its lock) if the session directory belongs to no live process."""
    try:
        fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield os.path.basename(path).startswith(".tmp-") and time.time() - os.stat(path).st_mtime > 60
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def live_sessions(repo_root: str) -> list[dict[str, Any]]:
    """The running mounts of a repository (their session.json), found by their held locks."""
    out = []
    root = staging_root(repo_root)
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            if not name.startswith(SESSION_PREFIX) or not os.path.isdir(d):
                continue
            with _dead_session(d) as dead:
                if dead:
                    continue
            try:
                with open(os.path.join(d, "session.json")) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                out.append({"dir": d})
    return out


def recover_sessions(repo: Repository) -> list[str]:
    """Clean up the staging directories of dead mount sessions; returns what was done (logged).

    Only what a successful ``close()``/``fsync()`` stored is ever committed (it is a pending
    entry already): whatever a dead session was still writing, or failed to store, is
    discarded, with a line saying so."""
    done: list[str] = []
    root = staging_root(repo.root)
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return done
    for name in names:
        d = os.path.join(root, name)
        if not os.path.isdir(d) or not name.startswith((SESSION_PREFIX, ".tmp-" + SESSION_PREFIX)):
            continue
        with _dead_session(d) as dead:
            if not dead:
                continue
            for f in sorted(os.listdir(d)):
                if f.endswith(".data"):
                    done.append(_recover_file(repo, d, f[: -len(".data")]))
            shutil.rmtree(d, ignore_errors=True)
    return [x for x in done if x]


def _recover_file(repo: Repository, d: str, sid: str) -> str:
    data = os.path.join(d, sid + ".data")
    size = os.path.getsize(data)
    try:
        with open(os.path.join(d, sid + ".json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = {}
    branch, path, state = meta.get("branch"), meta.get("path"), meta.get("state")
    where = f"{branch}/{path}" if branch and path else f"{os.path.basename(d)}/{sid} (unknown path)"
    if not branch or not path or state == "ingested":
        return ""
    if state == "closed":  # its close() had returned an error: never acknowledged
        msg = f"discarded write of {where} ({size} bytes), whose close had failed"
    else:
        msg = f"discarded incomplete write of {where} ({size} bytes)"
    log.warning(msg)
    return msg


def durable_entry(repo: Repository, branch: str, path: str, head: bytes | None) -> TreeEntry | None:
    with repo.store.read() as t:
        raw = t.get("index", keys.pending_key(branch, path))
    if raw is not None:
        return PendItem.decode(raw).entry
    return repo.tree(head).entries.get(path) if head else None


def flush_repository(repo: Repository, branches: list[str] | None = None, recovered: list[str] | None = None
                     ) -> list[tuple[str, Outcome]]:
    """Without a running mount: recover dead sessions (what was done is appended to
    ``recovered``), then commit pending entries (all branches, or ``branches``). Used at
    mount start-up and by ``coralfs flush-mount``."""
    done = recover_sessions(repo)
    if recovered is not None:
        recovered.extend(done)
    with repo.store.read() as t:
        names = sorted({keys.pending_branch(k) for k in t.keys("index", keys.PENDING)})
    out = []
    for b in names if branches is None else branches:
        o = commit_pending(repo, b)
        if o.commit:
            log.info("committed pending mount changes on %s as %s: %s", b, o.commit.hex()[:12],
                     o.message.splitlines()[0])
        out.append((b, o))
    return out


# ------------------------------------------------------------------ coralfs flush-mount
@dataclass
class FlushResult:
    """What a flush did on one branch."""

    branch: str
    commit: bytes | None = None
    message: str = ""
    conflict: str | None = None  # the id the refused paths are kept under
    conflicts: list[str] = field(default_factory=list)
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"branch": self.branch, "commit": self.commit.hex() if self.commit else None,
                "message": self.message, "conflict": self.conflict}


@dataclass
class FlushReport:
    results: list[FlushResult] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # what was done with dead sessions' data
    mountpoint: str | None = None  # the running mount that committed, if one did


def flush(root: str, branches: list[str] | None = None) -> FlushReport:
    """``coralfs flush-mount``: commit what was written through a mount and not committed yet.

    With a writable mount running, the mount commits (``fsync`` of the branch directories or
    of its root: it holds the files being written, and only it may commit them); otherwise
    the pending entries are committed here, holding the mount lock so that no mount starts
    meanwhile, after the staging data of dead sessions is dealt with."""
    from coralfs.mount.mtab import is_mounted
    from coralfs.repository import Repository

    holder = mount_lock_holder(root)
    live = [s for s in live_sessions(root) if s.get("mountpoint") and is_mounted(s["mountpoint"])]
    if holder is not None and not live:
        raise CoralError(f"a writable mount of {root} is running (pid {holder.get('pid', '?')}) but its mount point "
                         f"{holder.get('mountpoint', '?')} is not mounted; unmount it or stop that process")
    report = FlushReport()
    if live:
        with Repository(root) as repo:
            before = repo.branches()
        for s in live:
            for target in [os.path.join(s["mountpoint"], b) for b in branches or []] or [s["mountpoint"]]:
                try:
                    fsync_dir(target)
                except OSError as e:
                    raise CoralError(f"the mount on {s['mountpoint']} could not commit {target}: {e.strerror} "
                                     f"(see {log_path(root)})") from None
        report.mountpoint = live[0]["mountpoint"]
        with Repository(root) as repo:
            after = repo.branches()
            for b in sorted(after):
                if before.get(b) != after[b] and (not branches or b in branches):
                    report.results.append(FlushResult(b, after[b], repo.get_commit(after[b]).message.splitlines()[0]))
        return report
    lock = take_mount_lock(root, None)
    try:
        with Repository(root) as repo:
            for b, o in flush_repository(repo, branches, report.recovered):
                report.results.append(FlushResult(b, o.commit, o.message.splitlines()[0] if o.message else "",
                                                  o.conflict_id, list(o.conflicts), o.reason))
    finally:
        os.close(lock)
    return report
