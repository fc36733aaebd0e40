"""Retention: drop old checkpoints from a branch's history by rewriting the branch.

``prune_branch(repo, "exp/lr1", keep_last=2, keep_best=3, metric="val_acc", mode="max")``
walks the branch's first-parent chain from its head down to the *fork point* (the first
commit that another branch also reaches; the chain's root if none). Of those candidate
commits it keeps

* the newest ``keep_last`` (the head is always kept: ``resume`` needs it), and
* the ``keep_best`` commits with the best value of commit metric ``metric`` (``mode``
  "max" or "min"; commits without a finite value of the metric never count as best; ties
  go to the newer commit),

and rewrites the branch as a linear chain of the kept commits on top of the fork point.
Rewritten commits keep their tree, author, time, message, metrics, metadata and any
extra (merge) parents; only the first parent changes. The oldest kept commits whose
history does not change keep their ids. The new commits and the ref update are one
write transaction with a compare-and-swap on the branch ref, so a concurrent commit on
the branch makes the prune retry (or fail with ConcurrentUpdate), never lose the commit.

Tags, other branches and a detached HEAD keep whatever they reference: pruning only
changes this branch's ref. The dropped commits become unreachable (unless something else
references them) and ``coralfs gc`` reclaims their space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coralfs.errors import ConcurrentUpdate, InvalidArgument, UnknownRevision
from coralfs.store import refs
from coralfs.store.objects import Commit
from coralfs.store.refs import Refs

if TYPE_CHECKING:
    from coralfs.repository import Repository
    from coralfs.store.lmdb import Txn


@dataclass
class PrunePlan:
    """What a prune keeps and drops; ``new_head`` is set once applied."""

    branch: str
    head: bytes | None
    fork_point: bytes | None
    keep: list[bytes] = field(default_factory=list)  # candidate commits kept, oldest first
    drop: list[bytes] = field(default_factory=list)  # candidate commits dropped, oldest first
    new_head: bytes | None = None
    rewritten: int = 0  # commits written anew (the kept ones above the first dropped one)

    @property
    def changes(self) -> bool:
        return bool(self.drop)

    def to_json(self) -> dict[str, Any]:
        return {"branch": self.branch, "head": _hex(self.head), "fork_point": _hex(self.fork_point),
                "keep": [c.hex() for c in self.keep], "drop": [c.hex() for c in self.drop],
                "new_head": _hex(self.new_head), "rewritten": self.rewritten}


def _hex(v: bytes | None) -> str | None:
    return v.hex() if v else None


def select(candidates: list[tuple[bytes, Commit]], keep_last: int | None, keep_best: int | None,
           metric: str | None, mode: str = "max") -> set[bytes]:
    """The ids to keep among ``candidates`` (newest first)."""
    if not candidates:
        return set()
    if keep_last is None and keep_best is None:
        return {cid for cid, _ in candidates}
    keep: set[bytes] = {candidates[0][0]}  # the head, always
    if keep_last:
        keep.update(cid for cid, _ in candidates[:keep_last])
    if keep_best:
        if not metric:
            raise InvalidArgument("keep_best needs a metric")
        sign = 1.0 if mode == "max" else -1.0
        scored = []
        for pos, (cid, c) in enumerate(candidates):
            v = c.metrics.get(metric)
            if v is None or not math.isfinite(float(v)):
                continue
            scored.append((sign * float(v), -pos, cid))  # newer (smaller pos) wins ties
        scored.sort(reverse=True)
        keep.update(cid for _, _, cid in scored[:keep_best])
    return keep


def plan_prune(repo: Repository, branch: str, keep_last: int | None = None, keep_best: int | None = None,
               metric: str | None = None, mode: str = "max") -> PrunePlan:
    """Decide what a prune of ``branch`` would keep and drop (no writes)."""
    if mode not in ("max", "min"):
        raise InvalidArgument(f"mode must be 'max' or 'min', not {mode!r}")
    for name, v in (("keep_last", keep_last), ("keep_best", keep_best)):
        if v is not None and v < 0:
            raise InvalidArgument(f"{name} must be >= 0")
    if keep_best and not metric:
        raise InvalidArgument("--keep-best needs --metric")
    refs.check_ref_name(branch)
    branches = repo.branches()
    if branch not in branches:
        raise UnknownRevision(f"no such branch: {branch}")
    head = branches[branch]
    others = repo.ancestors([c for b, c in branches.items() if b != branch])
    chain: list[tuple[bytes, Commit]] = []  # newest first
    fork: bytes | None = None
    cur: bytes | None = head
    while cur is not None:
        if cur in others:
            fork = cur
            break
        c = repo.get_commit(cur)
        chain.append((cur, c))
        cur = c.parents[0] if c.parents else None
    kept = select(chain, keep_last, keep_best, metric, mode)
    plan = PrunePlan(branch, head, fork)
    for cid, _ in reversed(chain):
        (plan.keep if cid in kept else plan.drop).append(cid)
    return plan


def _rewrite(repo: Repository, t: Txn, plan: PrunePlan) -> bytes | None:
    """Write the new chain in ``t``; returns the new head (does not move the ref)."""
    keep = set(plan.keep)
    parent = plan.fork_point
    unchanged = True  # still inside the oldest run of kept commits whose history is intact
    chain_oldest_first: list[bytes] = []
    cur = plan.head
    while cur is not None and cur != plan.fork_point:
        chain_oldest_first.append(cur)
        c = repo.objects.get_object(cur, t)
        assert isinstance(c, Commit)
        cur = c.parents[0] if c.parents else None
    chain_oldest_first.reverse()
    plan.rewritten = 0
    for cid in chain_oldest_first:
        if cid not in keep:
            unchanged = False
            continue
        if unchanged:
            parent = cid
            continue
        c = repo.objects.get_object(cid, t)
        assert isinstance(c, Commit)
        new = Commit(c.tree, ((parent,) if parent else ()) + c.parents[1:], c.author, c.time, c.message,
                     dict(c.metrics), dict(c.meta))
        parent = repo.objects.put_object(t, new)
        Refs(t).index_commit(parent)
        plan.rewritten += 1
    return parent


def apply_prune(repo: Repository, plan: PrunePlan) -> PrunePlan:
    """Rewrite the branch as planned: one write transaction, CAS on the branch ref."""
    if not plan.drop:
        plan.new_head = plan.head
        return plan

    def fn(t: Txn) -> bytes | None:
        r = Refs(t)
        if r.branch(plan.branch) != plan.head:
            raise ConcurrentUpdate(f"branch {plan.branch!r} moved while pruning")
        new_head = _rewrite(repo, t, plan)
        if new_head is None:  # cannot happen: the head is always kept
            raise InvalidArgument("prune would leave the branch empty")
        r.set_if_equals(refs.branch_ref(plan.branch), plan.head, new_head)
        return new_head

    plan.new_head = repo.store.write(fn)
    return plan


def prune_branch(repo: Repository, branch: str, keep_last: int | None = None, keep_best: int | None = None,
                 metric: str | None = None, mode: str = "max", dry_run: bool = False,
                 retries: int = 5) -> PrunePlan:
    """Plan and apply a prune; re-plans when a commit lands on the branch meanwhile."""
    for attempt in range(retries + 1):
        plan = plan_prune(repo, branch, keep_last, keep_best, metric, mode)
        if dry_run:
            return plan
        try:
            return apply_prune(repo, plan)
        except ConcurrentUpdate:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")
