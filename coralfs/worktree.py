"""The work tree and the index: what ``add``, ``rm``, ``status`` and ``checkout`` do.

The index is the ``stage`` database (what the next commit holds, by path), the stat cache
(``st\\0`` keys: a file's stat signature and the manifest it held, so ``status`` and ``add``
do not re-hash unchanged files) and the skip-worktree set (``sw\\0``: staged by ``save()``,
not written to the work tree). Their keys carry a path: :mod:`coralfs.store.keys` encodes
them (hashed when long, the path then in the value).

The work tree may be hostile (symlinks placed to redirect writes): every file operation
goes through :class:`coralfs.worktree_fs.WorkTree` (relative to directory fds, nothing
followed). A checkout is planned before anything changes, journaled
(``.coralfs/checkout.json``) and idempotent, so the next command that uses the work tree
finishes one a killed process left half done.

:class:`Worktree` belongs to a :class:`coralfs.repository.Repository` (``repo.worktree``),
which keeps the public methods (``repo.add``, ``repo.checkout``, ...) and delegates here.
The guards at the end serve commands that move a checked-out branch (merge, import).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coralfs.errors import (
    ConcurrentUpdate,
    CoralError,
    FormatError,
    IntegrityError,
    InvalidPath,
    PathNotFound,
    UnsafePath,
    WouldOverwrite,
)
from coralfs.hashing import hasher
from coralfs.ingest import IngestStats, Progress
from coralfs.store import keys, refs
from coralfs.store.lmdb import Txn
from coralfs.store.objects import MODE_EXEC, MODE_FILE, TreeEntry, check_path, path_error
from coralfs.store.refs import Refs
from coralfs.worktree_fs import TEMP_PREFIX, SkipCallback, WorkTree, kind, read_blocks

if TYPE_CHECKING:
    from coralfs.repository import Repository

log = logging.getLogger(__name__)

#: The journal of a checkout in progress (``.coralfs/checkout.json``): written atomically
#: before the work tree is touched, removed once HEAD has moved. See ``Worktree.checkout``.
JOURNAL = "checkout.json"
CHECKOUT_LOCK = "checkout.lock"
#: Test hook: ``CORALFS_CHECKOUT_KILL_AT=POINT[:N]`` sends SIGKILL to this process at the N-th
#: (default 1st) event of POINT: ``journal`` (journal written, nothing changed yet), ``change``
#: (a work-tree file written or deleted), ``temp`` (a temp file half written: after its first
#: block), ``refs`` (HEAD moved, journal not yet removed).
KILL_ENV = "CORALFS_CHECKOUT_KILL_AT"


@dataclass
class Status:
    branch: str | None
    head: bytes | None
    staged: dict[str, str] = field(default_factory=dict)  # path -> added / modified / deleted
    modified: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    untracked: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.staged or self.modified or self.deleted)

    def to_json(self) -> dict[str, Any]:
        return {"branch": self.branch, "head": self.head.hex() if self.head else None, "staged": self.staged,
                "modified": self.modified, "deleted": self.deleted, "untracked": self.untracked}


def _key_path(prefix: bytes, key: bytes, value: bytes) -> str:
    """The path a stage/stat/skip key stands for, validated: the store may come from
    someone else, and such a path may end up in a tree or the work tree."""
    try:
        d = json.loads(value) if keys.is_hashed(prefix, key) else None
        path = keys.path_of(prefix, key, d)
    except (ValueError, TypeError) as e:
        raise FormatError(f"corrupt path key {key[:60]!r}: {e} (run 'coralfs fsck')") from e
    err = path_error(path)
    if err is not None:
        raise FormatError(f"corrupt path key {key[:60]!r}: {err} (run 'coralfs fsck --repair')")
    return path


def _stat_sig(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _hash_fd(fd: int) -> bytes:
    h = hasher()
    for block in read_blocks(fd):
        h.update(block)
    return h.digest()


def _log_skip(path: str, reason: str) -> None:
    log.warning("skipped %s: %s", path, reason)


class _KillHook:
    """``CORALFS_CHECKOUT_KILL_AT=POINT[:N]`` (test hook): SIGKILL at the N-th event of POINT."""

    def __init__(self) -> None:
        spec = os.environ.get(KILL_ENV, "")
        point, _, n = spec.partition(":")
        self.point = point
        self.left = int(n) if n else 1

    def step(self, point: str) -> None:
        if point != self.point:
            return
        self.left -= 1
        if self.left <= 0:
            os.kill(os.getpid(), signal.SIGKILL)



class Worktree:
    """A repository's index (stage, stat cache, skip-worktree) and its work tree's files."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._checkout_local = threading.local()

    def index_entry(self, t: Txn, path: str) -> TreeEntry | None:
        """The entry a path has in stage-then-HEAD (what the next commit would hold)."""
        return self._index_entry(t, path)

    def staged_changes(self) -> tuple[dict[str, TreeEntry | None], dict[bytes, bytes]]:
        """What a commit of the stage changes (path -> entry, None deletes), and the raw stage
        entries it consumes (the commit deletes exactly those: a concurrent ``add`` stays)."""
        self.recover_checkout()
        with self.repo.store.read() as t:
            staged_raw = list(t.items("stage"))
        changes: dict[str, TreeEntry | None] = {}
        for k, v in staged_raw:
            d = json.loads(v)
            changes[_key_path(keys.STAGE_PREFIX, k, v)] = (None if d.get("del")
                                                           else TreeEntry(bytes.fromhex(d["m"]), d["size"], d["mode"]))
        return changes, dict(staged_raw)

    def _rel(self, path: str | os.PathLike[str]) -> str:
        """A work-tree path (absolute or relative to cwd) -> normalised repository path."""
        p = os.fspath(path)
        if "\x00" in p:
            raise InvalidPath(f"invalid path (NUL): {p!r}")
        ap = os.path.abspath(p)
        rel = os.path.relpath(ap, self.repo.root)
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            raise PathNotFound(f"{p}: outside the repository {self.repo.root}")
        return check_path(rel.replace(os.sep, "/"))

    def _staged(self, t: Txn) -> dict[str, dict[str, Any]]:
        """path -> stage entry (a scan of the whole database: long paths have hashed keys)."""
        return {_key_path(keys.STAGE_PREFIX, k, v): json.loads(v) for k, v in t.items("stage")}

    def _index_entry(self, t: Txn, path: str) -> TreeEntry | None:
        """The entry a path has in stage-then-HEAD (what the next commit would hold)."""
        v = t.get("stage", keys.stage_key(path))
        if v is not None:
            d = json.loads(v)
            return None if d.get("del") else TreeEntry(bytes.fromhex(d["m"]), d["size"], d["mode"])
        head = Refs(t).follow_head()[1]
        if head is None:
            return None
        return self.repo.get_tree(self.repo.get_commit(head).tree).entries.get(path)

    def add(self, paths: Iterable[str | os.PathLike[str]], progress: Callable[[str], Progress | None] | None = None,
            on_skip: SkipCallback | None = None) -> IngestStats:
        """Stage work-tree files (directories recursively); a tracked file that is gone is staged as deleted.

        Symlinks are not stored (yet), and their targets' content never is: naming a symlink,
        or a path that goes through a symlinked directory, raises InvalidPath (``UnsafePath``
        for the directory case). A symlink (or FIFO, socket, ...) met while walking a named
        directory is skipped and reported to ``on_skip(path, reason)`` (default: a warning
        on this module's logger; the CLI prints it). Files are opened relative to the work
        tree without following anything, and the stat signature is taken from the open fd."""
        self.recover_checkout()
        skipped = on_skip or _log_skip
        total = IngestStats()
        with WorkTree(self.repo.root) as wt:
            for p in paths:
                if os.path.abspath(os.fspath(p)) == self.repo.root:  # `add .` at the top: the whole work tree
                    for frel, _ in wt.walk("", skipped):
                        total.add(self._add_file(wt, frel, progress))
                    continue
                rel = self._rel(p)
                try:
                    st = wt.lstat(rel)
                except UnsafePath as e:
                    raise UnsafePath(f"{os.fspath(p)}: {e}") from None
                k = kind(st)
                if k == "missing":
                    with self.repo.store.read() as t:
                        tracked = self._index_entry(t, rel) is not None
                        under = [q for q in self._staged(t) if q.startswith(rel + "/")]
                    head_paths = [q for q in self._head_paths() if q == rel or q.startswith(rel + "/")]
                    if not tracked and not under and not head_paths:
                        raise PathNotFound(f"{os.fspath(p)}: no such file")
                    for q in head_paths or [rel]:
                        self._stage(q, None)
                    continue
                if k == "symlink":
                    raise InvalidPath(f"{os.fspath(p)}: is a symbolic link; symlinks are not stored "
                                      "(add the file it points to instead)")
                if k == "other":
                    raise InvalidPath(f"{os.fspath(p)}: not a regular file or directory")
                files = wt.walk(rel, skipped) if k == "dir" else iter([(rel, st)])
                for frel, _ in files:
                    total.add(self._add_file(wt, frel, progress))
        if total.pending and self.repo.auto_repack:
            self.repo.repack_soon()  # while the new versions' bytes are still in this process's cache
        return total

    def _add_file(self, wt: WorkTree, rel: str, progress: Callable[[str], Progress | None] | None) -> IngestStats:
        check_path(rel)
        try:
            fd, st = wt.open_read(rel)
        except UnsafePath as e:
            raise UnsafePath(f"{rel}: {e}") from None
        try:
            with self.repo.store.read() as t:
                cached = t.get("index", keys.stat_key(rel))
                prev = self._index_entry(t, rel)
            if cached is not None:
                c = json.loads(cached)
                if c["sig"] == _stat_sig(st):
                    self._stage(rel, TreeEntry(bytes.fromhex(c["m"]), st.st_size,
                                               MODE_EXEC if st.st_mode & 0o111 else MODE_FILE))
                    return IngestStats()
            with self.repo.writing():
                entry, stats = self.repo.ingest_fd(fd, rel, prev, progress(rel) if progress else None)
                self._stage(rel, entry, st)
            return stats
        finally:
            os.close(fd)

    def _head_paths(self) -> list[str]:
        head = self.repo.head()
        return list(self.repo.tree(head).entries) if head else []

    def _stage(self, path: str, entry: TreeEntry | None, st: os.stat_result | None = None,
               skip_worktree: bool = False) -> None:
        path = check_path(path)

        stage_key, stat_key, skip_key = keys.stage_key(path), keys.stat_key(path), keys.skip_key(path)

        def fn(t: Txn) -> None:
            if entry is None:
                deleted = (keys.path_value(keys.STAGE_PREFIX, stage_key, path, {"del": True})
                           if keys.is_hashed(keys.STAGE_PREFIX, stage_key) else b'{"del":true}')
                t.put("stage", stage_key, deleted)
                t.delete("index", stat_key)
                t.delete("index", skip_key)
                return
            t.put("stage", stage_key, keys.path_value(keys.STAGE_PREFIX, stage_key, path, {
                "m": entry.manifest.hex(), "size": entry.size, "mode": entry.mode}))
            if st is not None:
                t.put("index", stat_key, keys.path_value(keys.STAT_CACHE, stat_key, path,
                                                     {"sig": _stat_sig(st), "m": entry.manifest.hex()}))
            if skip_worktree:
                t.put("index", skip_key, keys.path_value(keys.SKIP_WORKTREE, skip_key, path, {})
                      if keys.is_hashed(keys.SKIP_WORKTREE, skip_key) else b"1")
            else:
                t.delete("index", skip_key)

        self.repo.store.write(fn)

    def stage_entry(self, path: str, entry: TreeEntry | None) -> None:
        """Stage an already-ingested entry (or a deletion) without touching the work tree."""
        self.recover_checkout()  # its end clears the stage: finish it before staging anything
        self._stage(path, entry, skip_worktree=entry is not None)

    def rm(self, paths: Iterable[str | os.PathLike[str]], cached: bool = False) -> list[str]:
        """Stage removal of tracked files (and delete them from the work tree unless ``cached``).

        Every path is checked before anything changes: one that goes through a symlinked
        directory raises UnsafePath. A symlink at a tracked path is removed itself, never
        its target (work-tree deletions go through :class:`WorkTree`)."""
        self.recover_checkout()
        removed = []
        head_paths = set(self._head_paths())
        plan: list[list[str]] = []
        with WorkTree(self.repo.root) as wt:
            for p in paths:
                rel = self._rel(p)
                with self.repo.store.read() as t:
                    staged = set(self._staged(t))
                targets = sorted(q for q in head_paths | staged if q == rel or q.startswith(rel + "/"))
                if not targets:
                    raise PathNotFound(f"{os.fspath(p)}: not tracked")
                if not cached:
                    for q in targets:
                        wt.check_parents(q)
                plan.append(targets)
            for targets in plan:
                for q in targets:
                    if q in head_paths:
                        self._stage(q, None)
                    else:
                        self.repo.store.write(lambda t, q=q: t.delete("stage", keys.stage_key(q)))
                    if not cached:
                        wt.unlink(q)
                    removed.append(q)
        return removed

    def _file_matches(self, t: Txn, wt: WorkTree, path: str, entry: TreeEntry, st: os.stat_result | None) -> bool:
        """Whether the work-tree file at ``path`` (its lstat ``st``) holds ``entry``'s content:
        the stat cache answers when the signature matches, else the file is hashed (opened
        without following anything). A symlink or anything not a regular file never matches."""
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            return False
        cached = t.get("index", keys.stat_key(path))
        if cached is not None:
            c = json.loads(cached)
            if c["sig"] == _stat_sig(st):
                return bytes.fromhex(c["m"]) == entry.manifest
        try:
            fd, fst = wt.open_read(path)
        except (FileNotFoundError, InvalidPath):
            return False
        try:
            return fst.st_size == entry.size and _hash_fd(fd) == self.repo.get_manifest(entry.manifest).file_hash
        finally:
            os.close(fd)

    def status(self) -> Status:
        """Staged, modified, deleted and untracked paths. Finishes an interrupted checkout first
        (``recover_checkout``). Symlinks in the work tree are neither followed nor listed."""
        self.recover_checkout()
        return self._status()

    def _status(self) -> Status:
        with WorkTree(self.repo.root) as wt, self.repo.store.read() as t:
            branch, head = Refs(t).follow_head()
            head_entries = self.repo.get_tree(self.repo.get_commit(head).tree).entries if head else {}
            staged = self._staged(t)
            skip = {_key_path(keys.SKIP_WORKTREE, k, v) for k, v in t.items("index", keys.SKIP_WORKTREE)}
            s = Status(branch, head)
            index: dict[str, TreeEntry] = dict(head_entries)
            for p, d in staged.items():
                if d.get("del"):
                    if p in head_entries:
                        s.staged[p] = "deleted"
                    index.pop(p, None)
                else:
                    e = TreeEntry(bytes.fromhex(d["m"]), d["size"], d["mode"])
                    if p not in head_entries:
                        s.staged[p] = "added"
                    elif head_entries[p] != e:
                        s.staged[p] = "modified"
                    index[p] = e
            seen = set()
            for rel, st in wt.walk():
                seen.add(rel)
                e = index.get(rel)
                if e is None:
                    s.untracked.append(rel)
                elif not self._file_matches(t, wt, rel, e, st):
                    s.modified.append(rel)
            s.deleted = sorted(p for p in index if p not in seen and p not in skip)
        return s

    def checkout(self, rev: str, force: bool = False, progress: Callable[[str], Progress | None] | None = None
                 ) -> bytes:
        """Switch HEAD to ``rev`` (a branch attaches; anything else detaches) and make the work tree match.

        Safety (the repository may come from someone else; see docs/design.md, "The work
        tree"): every work-tree change goes through :class:`WorkTree` (relative to directory
        fds, nothing followed). Before changing anything, every path the checkout would
        write or delete is checked: a symlink or a file where a directory must be, or a
        directory where a file goes, refuses the whole checkout (``UnsafePath``, nothing
        changed; ``force`` does not override it). A symlink (or FIFO, ...) at a file's own
        path refuses too, unless ``force``: then the link itself is replaced or removed,
        never what it points at.

        Resumable: a journal (``.coralfs/checkout.json``: from, target, branch, temp-file
        token) is written atomically before the first change and removed after HEAD moved.
        If the process dies in between, the next command that uses the work tree (status,
        add, rm, commit, save, checkout) finishes this checkout first (``recover_checkout``)."""
        with self._checkout_lock():
            self._resume_checkout()
            with self.repo.store.read() as t:
                r = Refs(t)
                is_branch = r.branch(rev) is not None
                cur_branch, _ = r.follow_head()
            if rev in ("HEAD", "@"):  # like git: checking out HEAD keeps the current branch attached
                rev, is_branch = (cur_branch, True) if cur_branch else (rev, False)
            target = self.repo.resolve(rev)
            target_entries = self.repo.tree(target).entries
            st = self._status()
            head_entries = self.repo.tree(st.head).entries if st.head else {}
            if head_entries == target_entries and not force:
                # same content: move HEAD only; staged and work-tree changes carry over (as git does)
                self.repo.store.write(lambda t: Refs(t).set_head(rev if is_branch else target))
                return target
            with WorkTree(self.repo.root) as wt:
                if not force:
                    dirty = sorted(set(st.staged) | set(st.modified))
                    if dirty:
                        raise WouldOverwrite("checkout would overwrite uncommitted changes: " + ", ".join(dirty[:5])
                                             + (" ..." if len(dirty) > 5 else "") + " (commit them, or use --force)")
                    with self.repo.store.read() as t:
                        clash = [p for p in st.untracked if p in target_entries
                                 and not self._file_matches(t, wt, p, target_entries[p], wt.lstat(p))]
                    if clash:
                        raise WouldOverwrite("checkout would overwrite untracked files: " + ", ".join(clash[:5]))
                try:
                    deletions, writes = self._plan_checkout(wt, head_entries, target_entries, force)
                except UnsafePath as e:
                    raise UnsafePath(f"checkout refused, nothing was changed: {e}") from None
                job = {"version": 1, "from": st.head.hex() if st.head else None, "target": target.hex(),
                       "branch": rev if is_branch else None, "force": force, "token": secrets.token_hex(8),
                       "pid": os.getpid()}
                self._write_journal(job)
                try:
                    self._run_checkout(wt, job, deletions, writes, progress)
                except UnsafePath as e:  # something was swapped in after the plan: never followed
                    raise UnsafePath(f"checkout stopped halfway: {e}; remove it, then any coralfs command "
                                     "that uses the work tree finishes the checkout") from None
        return target

    def recover_checkout(self) -> bytes | None:
        """Finish a checkout that was interrupted (its process killed): remove its temp files,
        bring every path it touches to the target, move HEAD, drop the journal. Returns the
        commit it finished at, or None when there was nothing to finish. Paths the
        interrupted checkout touches become the target's (files of the old HEAD that the
        target lacks are removed), as the checkout would have made them; other files are
        left alone. Raises like ``checkout`` (e.g. ``UnsafePath``) if it still cannot."""
        if not os.path.exists(os.path.join(self.repo.control, JOURNAL)):
            return None
        with self._checkout_lock():
            return self._resume_checkout()

    def _resume_checkout(self) -> bytes | None:
        job = self._read_journal()
        if job is None:
            return None
        old = bytes.fromhex(job["from"]) if job.get("from") else None
        target = bytes.fromhex(job["target"])
        label = job.get("branch") or target.hex()[:12]
        try:
            head_entries = self.repo.tree(old).entries if old else {}
            target_entries = self.repo.tree(target).entries
        except CoralError as e:
            raise type(e)(f"an interrupted checkout of {label} cannot be finished: {e} "
                          f"(to give it up, remove {os.path.join(self.repo.control, JOURNAL)})") from e
        log.warning("finishing an interrupted checkout of %s", label)
        with WorkTree(self.repo.root) as wt:
            try:
                deletions, writes = self._plan_checkout(wt, head_entries, target_entries, bool(job.get("force")))
                self._run_checkout(wt, job, deletions, writes, None)
            except UnsafePath as e:
                raise UnsafePath(f"an interrupted checkout of {label} cannot be finished: {e}; remove it, "
                                 "then any coralfs command that uses the work tree finishes the checkout") from None
        return target

    def _plan_checkout(self, wt: WorkTree, head_entries: Mapping[str, TreeEntry],
                       target_entries: Mapping[str, TreeEntry], force: bool
                       ) -> tuple[list[str], list[tuple[str, TreeEntry]]]:
        """(paths to delete, entries to write), after checking every one of them against the
        work tree; raises UnsafePath, with everything that is in the way, before any change."""
        deletions = sorted(p for p in head_entries if p not in target_entries)
        doomed = set(deletions)
        problems: list[str] = []

        def in_way(p: str, k: str) -> str:
            what = {"symlink": "a symbolic link", "dir": "a directory"}.get(k, "not a regular file")
            return f"{p} is {what}"

        def doomed_parent(comp: str, k: str) -> bool:
            # a parent that is not a directory: fine only as a tracked file this checkout deletes
            return comp in doomed and (k == "file" or (force and k in ("symlink", "other")))

        for p in deletions:
            try:
                whole = wt.check_parents(p)
            except UnsafePath as e:
                problems.append(str(e))
                continue
            k = kind(wt.lstat(p)) if whole else "missing"
            if k in ("symlink", "other") and not force:
                problems.append(in_way(p, k) + " where a tracked file was (--force removes it, never its target)")
        for p, _e in sorted(target_entries.items()):
            try:
                whole = wt.check_parents(p, doomed_parent)
            except UnsafePath as e:
                problems.append(str(e))
                continue
            k = kind(wt.lstat(p)) if whole else "missing"
            if k == "dir":
                odd: list[str] = []  # symlinks, FIFOs, ...: never removed by a checkout
                inside = [q for q, _ in wt.walk(p, on_skip=lambda q, _why, odd=odd: odd.append(q))]
                if odd or not inside or any(q not in doomed for q in inside):
                    problems.append(in_way(p, k))
            elif k in ("symlink", "other") and not force:
                problems.append(in_way(p, k) + " (--force replaces it, never its target)")
        if problems:
            raise UnsafePath("; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        return deletions, sorted(target_entries.items())

    def _run_checkout(self, wt: WorkTree, job: dict[str, Any], deletions: list[str],
                      writes: list[tuple[str, TreeEntry]], progress: Callable[[str], Progress | None] | None
                      ) -> None:
        """Apply a planned (and journaled) checkout; idempotent, so a rerun finishes a killed one."""
        kill = _KillHook()
        kill.step("journal")
        temp_prefix = f"{TEMP_PREFIX}{job['token']}-"
        wt.remove_temp_files({p.rpartition("/")[0] for p, _ in writes}, temp_prefix)
        for p in deletions:
            if wt.unlink(p):
                kill.step("change")
            wt.prune_empty_dirs(p)
        stat_updates: dict[str, tuple[list[int], bytes]] = {}
        n = 0
        for p, e in writes:
            st = wt.lstat(p)
            with self.repo.store.read() as t:
                if self._file_matches(t, wt, p, e, st):
                    continue
            n += 1
            blocks = self._blocks(e, p, progress(p) if progress else None, kill)
            new = wt.write_file(p, blocks, 0o755 if e.mode == MODE_EXEC else 0o644, f"{temp_prefix}{n}")
            stat_updates[p] = (_stat_sig(new), e.manifest)
            kill.step("change")
        target = bytes.fromhex(job["target"])
        branch = job.get("branch")

        def fn(t: Txn) -> None:
            for k in list(t.keys("stage")):
                t.delete("stage", k)
            for k in list(t.keys("index", keys.SKIP_WORKTREE)):
                t.delete("index", k)
            for p, (sig, m) in stat_updates.items():
                key = keys.stat_key(p)
                t.put("index", key, keys.path_value(keys.STAT_CACHE, key, p, {"sig": sig, "m": m.hex()}))
            Refs(t).set_head(branch if branch else target)

        self.repo.store.write(fn)
        kill.step("refs")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.repo.control, JOURNAL))

    def _blocks(self, e: TreeEntry, path: str, progress: Progress | None, kill: _KillHook) -> Iterator[bytes]:
        """A file's content in blocks, verified: raises at the end (before the file is renamed
        into place) if the rebuilt bytes do not match the recorded hash."""
        view = self.repo.file_view(e.manifest)
        h = hasher()
        pos = 0
        while pos < view.size:
            block = view.pread(pos, 8 << 20)
            if not block:
                raise IntegrityError(f"{path}: rebuilt file ends at {pos} bytes, expected {view.size}")
            h.update(block)
            yield block
            pos += len(block)
            if progress:
                progress(pos, view.size)
            kill.step("temp")
        if h.digest() != view.manifest.file_hash:
            raise IntegrityError(f"{path}: rebuilt file does not match its recorded hash")

    @contextlib.contextmanager
    def _checkout_lock(self) -> Iterator[None]:
        """One checkout (or recovery) per work tree at a time (flock on ``.coralfs/checkout.lock``;
        re-entrant within a thread). Another process holding it: ConcurrentUpdate."""
        if getattr(self._checkout_local, "held", False):
            yield
            return
        fd = os.open(os.path.join(self.repo.control, CHECKOUT_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConcurrentUpdate("another process is checking out in this work tree "
                                       "(try again when it has finished)") from None
            self._checkout_local.held = True
            try:
                yield
            finally:
                self._checkout_local.held = False
        finally:
            os.close(fd)

    def _write_journal(self, job: dict[str, Any]) -> None:
        """Write the journal atomically and durably (temp, fsync, rename, fsync of the directory)."""
        path = os.path.join(self.repo.control, JOURNAL)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, json.dumps(job, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.repo.control, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _read_journal(self) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.repo.control, JOURNAL), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            job = json.loads(raw)
            bytes.fromhex(job["target"]), bytes.fromhex(job["token"])
            if job.get("branch") is not None:
                refs.check_ref_name(job["branch"])
        except (ValueError, KeyError, TypeError, CoralError) as e:
            raise FormatError(f"unreadable checkout journal {os.path.join(self.repo.control, JOURNAL)}: {e}") from e
        return job


# ------------------------------------------------------------------ guards for commands that move a branch
def require_clean(repo: Repository, branch: str) -> None:
    """If ``branch`` is checked out: the work tree must be clean (like git before a merge)."""
    if repo.current_branch() != branch:
        return
    st = repo.status()
    dirty = sorted(set(st.staged) | set(st.modified) | set(st.deleted))
    if dirty:
        raise WouldOverwrite("the work tree has uncommitted changes: " + ", ".join(dirty[:5])
                             + (" ..." if len(dirty) > 5 else "") + " (commit them first)")


def check_untracked(repo: Repository, branch: str, new_paths: list[str]) -> None:
    """If ``branch`` is checked out: none of ``new_paths`` may be an untracked file (it would be
    overwritten)."""
    if repo.current_branch() != branch or not new_paths:
        return
    untracked = set(repo.status().untracked)
    clash = [p for p in new_paths if p in untracked]
    if clash:
        raise WouldOverwrite("the merge would overwrite untracked files: " + ", ".join(clash[:5]))


def advance_branch(repo: Repository, branch: str, expected: bytes, move: Callable[[], bytes],
                   update_worktree: bool, progress: Any = None) -> bytes:
    """Run ``move`` (which moves ``branch`` from ``expected`` by compare-and-swap) and, if the
    branch is checked out and ``update_worktree``, make the work tree follow like a checkout.

    The work tree is clean at ``expected`` (``require_clean``): HEAD is detached at ``expected``
    (no file changes), the branch moves, and ``checkout(branch)`` updates the files and
    re-attaches HEAD. If the move fails, HEAD is re-attached unchanged."""
    if not update_worktree or repo.current_branch() != branch:
        return move()
    repo.checkout(expected.hex())
    try:
        new = move()
    except BaseException:
        repo.checkout(branch)
        raise
    try:
        repo.checkout(branch, progress=progress)
    except CoralError as e:
        raise CoralError(f"{branch} is now at {new.hex()[:12]}, but the work tree could not be updated ({e}); "
                         f"run 'coralfs checkout {branch}'") from e
    return new
