"""The mount's pending entries: files stored at close and not committed yet, and their commit.

A file written through the mount and closed (or fsync-ed) is ingested and recorded as a
**pending entry** in LMDB: ``index`` key ``pend\\0<branch>\\0<path>`` (a long path is
hashed, see :mod:`coralfs.store.keys`), JSON ``{"m": manifest hex, "size", "mode", "base":
the head it was based on, "time"[, "uid"]}``; a deletion is a tombstone ``{"del": true,
"base", "time"}``. Pending entries are durable: a crash before the commit loses nothing.

:func:`commit_pending` commits a branch's entries as one commit, compare-and-swap on the
head. A pending path that changed on the branch between its base and the head is a
conflict: those entries move, intact, to ``pend-conflict\\0<branch>\\0<id>\\0<path>``
(gc keeps them; ``coralfs flush-mount --conflicts`` lists them, ``--recover ID --to-branch
NAME`` commits them on a new branch) and the rest is committed. Paths held open for writing
stay pending.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coralfs.errors import ConcurrentUpdate, CoralError, InvalidArgument, NothingToCommit, RefExists
from coralfs.store import keys, refs
from coralfs.store.objects import TreeEntry
from coralfs.store.refs import Refs

if TYPE_CHECKING:
    from coralfs.repository import Repository
    from coralfs.store.lmdb import Txn

log = logging.getLogger("coralfs.mount")

MESSAGE_ITEMS = 6  # paths named in a commit message's first line


# ------------------------------------------------------------------ pending entries
# (their keys: coralfs.store.keys.pending_key, a long path hashed and then carried in the value)
def put_pend(t: Txn, branch: str, path: str, item: PendItem) -> None:
    key = keys.pending_key(branch, path)
    t.put("index", key, item.encode(path if keys.is_hashed(keys.pending_prefix(branch), key) else None))


@dataclass(frozen=True)
class PendItem:
    """A closed, ingested file (or a deletion: ``entry is None``) not committed yet."""

    entry: TreeEntry | None
    base: bytes | None  # the branch head the change was based on
    time: float
    uid: int | None = None  # who wrote it (through a mount shared with other users)

    def encode(self, path: str | None = None) -> bytes:
        d: dict[str, Any] = {"base": self.base.hex() if self.base else None, "time": self.time}
        if self.entry is None:
            d["del"] = True
        else:
            d.update(m=self.entry.manifest.hex(), size=self.entry.size, mode=self.entry.mode)
        if self.uid is not None:
            d["uid"] = self.uid
        if path is not None:
            d[keys.VALUE_PATH] = path
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PendItem:
        d = json.loads(raw)
        entry = None if d.get("del") else TreeEntry(bytes.fromhex(d["m"]), int(d["size"]), int(d["mode"]))
        base = bytes.fromhex(d["base"]) if d.get("base") else None
        uid = d.get("uid")
        return cls(entry, base, float(d.get("time", 0.0)), int(uid) if uid is not None else None)


# ------------------------------------------------------------------ commit of pending entries
@dataclass
class Outcome:
    """What ``commit_pending`` did."""

    commit: bytes | None = None  # the new commit, if any
    parent: bytes | None = None  # the head it was made on
    message: str = ""
    paths: list[str] = field(default_factory=list)  # pending paths consumed
    conflicts: list[str] = field(default_factory=list)  # paths that changed underneath (refused)
    conflict_id: str | None = None
    reason: str = ""
    refused: list[str] = field(default_factory=list)  # pending paths moved aside as conflict_id


def describe(changes: Mapping[str, TreeEntry | None], old: Mapping[str, TreeEntry]) -> str:
    """``mount: update model.pt, add config.json, remove old.pt`` (+ the full list when long)."""
    items = [f"update {p}" for p in sorted(changes) if changes[p] is not None and p in old]
    items += [f"add {p}" for p in sorted(changes) if changes[p] is not None and p not in old]
    items += [f"remove {p}" for p in sorted(changes) if changes[p] is None]
    if len(items) <= MESSAGE_ITEMS:
        return "mount: " + ", ".join(items)
    counts = {verb: sum(1 for i in items if i.startswith(verb + " ")) for verb in ("update", "add", "remove")}
    summary = ", ".join(f"{verb} {n}" for verb, n in counts.items() if n)
    return (f"mount: {', '.join(items[:MESSAGE_ITEMS])} and {len(items) - MESSAGE_ITEMS} more "
            f"({summary} files)\n\n" + "\n".join(items))


def _tree(repo: Repository, cid: bytes | None, cache: dict[bytes | None, dict[str, TreeEntry]]
          ) -> dict[str, TreeEntry]:
    if cid not in cache:
        cache[cid] = dict(repo.tree(cid).entries) if cid else {}
    return cache[cid]


def _author(repo: Repository, uids: set[int | None], author: str | None) -> tuple[str | None, dict[str, str]]:
    """Who a commit of mount changes is by: the mount's owner, unless other users wrote (a mount
    with ``--allow-other-write``): then their user names."""
    others = sorted(u for u in uids if u is not None and u != os.getuid())
    if not others:
        return author, {}
    names = [_user_name(u) for u in sorted(u for u in uids if u is not None)]
    meta = {"writers": ",".join(names)}
    if author is not None:
        return author, meta
    return (names[0] if len(names) == 1 else ", ".join(names)) + "@mount", meta


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return f"uid{uid}"


def commit_pending(repo: Repository, branch: str, author: str | None = None,
                   hold: frozenset[str] | set[str] = frozenset()) -> Outcome:
    """Commit ``branch``'s pending mount entries as one commit (compare-and-swap on the head).

    A pending path that changed on the branch between the entry's base and the current head
    is a conflict: those paths are moved aside under ``pend-conflict`` (logged; the rest is
    committed). Paths in ``hold`` (files open for writing) stay pending: an open file is never
    committed. Entries that change nothing are consumed without a commit."""
    prefix = keys.pending_prefix(branch)
    refused: Outcome | None = None
    for _attempt in range(20):
        with repo.store.read() as t:
            raw_all = {k: v for k, v in t.items("index", prefix)}
            head = Refs(t).branch(branch)
        raw = {}
        items: dict[str, PendItem] = {}
        for k, v in raw_all.items():
            p = keys.path_of_raw(prefix, k, v)
            if p in hold:
                continue
            raw[k] = v
            items[p] = PendItem.decode(v)
        if not items:
            return _merge(Outcome(parent=head), refused)
        paths = sorted(items)
        # written into the default branch's directory of an empty repository: the first commit
        unborn = head is None and branch == repo.default_branch and all(it.base is None for it in items.values())
        if head is None and not unborn:
            return _merge(_refuse(repo, branch, raw, head, paths, "the branch was deleted"), refused)
        trees: dict[bytes | None, dict[str, TreeEntry]] = {}
        cur = _tree(repo, head, trees)
        conflicts = []
        for p, it in items.items():
            if it.base == head:
                continue
            try:
                before = _tree(repo, it.base, trees)
            except CoralError:  # the base is gone (pruned): nothing proves the path is unchanged
                conflicts.append(p)
                continue
            if before.get(p) != cur.get(p):
                conflicts.append(p)
        if conflicts:
            bad = set(conflicts)
            out = _refuse(repo, branch, {k: v for k, v in raw.items() if keys.path_of_raw(prefix, k, v) in bad}, head,
                          sorted(conflicts), f"changed on {branch} since the mount's version was based on it")
            refused = _merge(out, refused)
            continue  # the rest: read again (the refused entries are gone from the pending ones)
        changes = {p: it.entry for p, it in items.items()
                   if cur.get(p) != it.entry and not (it.entry is None and p not in cur)}

        def consume(t: Txn, _cid: bytes | None = None, raw: dict[bytes, bytes] = raw) -> None:
            for k, v in raw.items():  # only what was read: a newer entry for a path stays pending
                if t.get("index", k) == v:
                    t.delete("index", k)

        if not changes:
            repo.store.write(consume)
            return _merge(Outcome(parent=head, paths=paths), refused)
        message = describe(changes, cur)
        who, meta = _author(repo, {items[p].uid for p in changes}, author)
        try:
            cid = repo.commit_changes(branch, changes, message, author=who, expected_head=head,
                                      meta={"via": "mount", **meta}, txn_hook=consume)
        except ConcurrentUpdate:
            continue  # the head moved between the read and the commit: look again
        except NothingToCommit:
            repo.store.write(consume)
            return _merge(Outcome(parent=head, paths=paths), refused)
        except InvalidArgument as e:  # e.g. a pending file where the new head has a directory
            return _merge(_refuse(repo, branch, raw, head, paths, str(e)), refused)
        return _merge(Outcome(cid, head, message, paths), refused)
    raise ConcurrentUpdate(f"{branch} kept moving; the mount's changes stay pending")


def _merge(out: Outcome, refused: Outcome | None) -> Outcome:
    """``out`` plus what an earlier round of the same commit set aside as a conflict."""
    if refused is None:
        return out
    out.conflicts = sorted(set(out.conflicts) | set(refused.conflicts))
    out.refused = sorted(set(out.refused) | set(refused.refused))
    out.conflict_id = out.conflict_id or refused.conflict_id
    out.reason = out.reason or refused.reason
    return out


def _refuse(repo: Repository, branch: str, raw: dict[bytes, bytes], head: bytes | None, conflicts: list[str],
            reason: str) -> Outcome:
    """Move refused pending entries under ``pend-conflict`` (one transaction) and log it."""
    cid = f"{time.time_ns():020d}"
    dst = keys.conflict_prefix(branch, cid)
    src = keys.pending_prefix(branch)

    def fn(t: Txn) -> list[str]:
        moved = []
        for k, v in raw.items():
            if t.get("index", k) != v:
                continue
            path = keys.path_of_raw(src, k, v)
            d = json.loads(v)
            d.update(head=head.hex() if head else None, reason=reason, conflicts=conflicts)
            t.delete("index", k)
            key = keys.path_key(dst, path)
            if keys.is_hashed(dst, key):
                d[keys.VALUE_PATH] = path
            t.put("index", key, json.dumps(d, sort_keys=True).encode())
            moved.append(path)
        return moved

    moved = repo.store.write(fn)
    log.error("commit of the mount's changes to %s: %s refused: %s (head now %s); the mount's versions of "
              "%d file(s) (%s) are kept as conflict %s: `coralfs flush-mount %s --conflicts` lists them, "
              "`--recover %s --to-branch NAME` commits them on a new branch", branch, ", ".join(conflicts), reason,
              head.hex()[:12] if head else "none", len(moved), ", ".join(sorted(moved)[:10]), cid, repo.root, cid)
    return Outcome(parent=head, paths=sorted(moved), conflicts=conflicts, conflict_id=cid, reason=reason,
                   refused=sorted(moved))


def list_conflicts(repo: Repository) -> dict[str, dict[str, Any]]:
    """Refused bursts: id -> {"branch", "head", "reason", "conflicts", "files": {path: entry json}}."""
    out: dict[str, dict[str, Any]] = {}
    with repo.store.read() as t:
        for k, v in t.items("index", keys.CONFLICTS):
            branch, cid = keys.conflict_of(k)
            d = json.loads(v)
            path = keys.path_of(keys.conflict_prefix(branch, cid), k, d)
            c = out.setdefault(cid, {"branch": branch, "head": d.get("head"), "reason": d.get("reason", ""),
                                     "conflicts": d.get("conflicts", []), "files": {}})
            c["files"][path] = d
    return out


def recover_conflict(repo: Repository, conflict_id: str, to_branch: str) -> bytes:
    """Commit a refused burst on a new branch ``to_branch``, made at the version the burst was
    based on (so ``diff``/``merge`` against the original branch show both sides); the
    conflict entries are removed in the commit's transaction."""
    c = list_conflicts(repo).get(conflict_id)
    if c is None:
        raise InvalidArgument(f"no mount conflict {conflict_id!r} (see `coralfs flush-mount REPO --conflicts`)")
    bases = [bytes.fromhex(d["base"]) for d in c["files"].values() if d.get("base")]
    base = min(bases, key=lambda b: repo.get_commit(b).time) if bases else None
    refs.check_ref_name(to_branch)
    if repo.branch_head(to_branch) is not None:
        raise RefExists(f"branch {to_branch!r} already exists")
    if base is not None:
        repo.create_branch(to_branch, base.hex())
    old = dict(repo.tree(base).entries) if base else {}
    changes = {p: None if d.get("del") else TreeEntry(bytes.fromhex(d["m"]), int(d["size"]), int(d["mode"]))
               for p, d in c["files"].items()}
    prefix = keys.conflict_prefix(c["branch"], conflict_id)

    def drop(t: Txn, _cid: bytes) -> None:
        for p in c["files"]:
            t.delete("index", keys.path_key(prefix, p))

    return repo.commit_changes(to_branch, changes, f"mount conflict {conflict_id} on {c['branch']}: "
                               + describe(changes, old)[len("mount: "):], expected_head=base, allow_empty=True,
                               meta={"via": "mount", "conflict": conflict_id}, txn_hook=drop)
