"""A model-based test of ``Repository``: a Hypothesis state machine drives a real repository and
a plain in-memory model of what it should hold side by side, and checks after every step
that they agree.

The model is deliberately naive: commits are nodes (files as ``path -> sha256``, message,
metrics, one parent), branches and tags map names to nodes, HEAD is a branch name or a
detached node, and the index and work tree are dicts of ``path -> sha256``. The rules
drive the public API only: ``save`` (a state dict, staged without touching the work tree),
writing a file into the work tree and ``add``, writing without ``add``, ``rm``, ``commit``,
``create_branch`` (also ``force=True`` to reset a branch), ``set_branch`` (compare-and-swap,
also with a stale expected value), ``delete_branch``, ``tag``/``delete_tag``, ``checkout``
(with and without ``force``), ``coralfs.prune.prune_branch``, ``coralfs.gc.gc`` (grace 0)
and ``repack``. Where the model says a call must fail, the test checks the error type and
that nothing changed.

Checked against the model: after every step, the refs, HEAD and ``status()`` (staged,
modified, deleted, untracked); after every commit, the new commit's files read back
byte-exact (sha256); after gc, repack and prune, and at the end of every run, every commit
the model says is reachable reads back byte-exact through a cache-free reader, each
branch's log holds exactly the model's ancestors, ``reachable_commits()`` is the model's
reachable set, ``fsck`` is ok, and after gc the repository's commits are exactly the
reachable ones (nothing reachable removed, nothing unreachable left).

Content: tiny safetensors and ``torch.save`` files of a drifting state dict (so versions
delta against each other, and identical versions dedup), plain text, a few KiB of binary;
any kind may land at any path (a path changing format between versions).

Example counts: a few seconds in ``make test``; ``HYPOTHESIS_PROFILE=deep`` runs many more
and longer programs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, event, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from safetensors.torch import save as st_save  # noqa: E402

from coralfs.errors import (  # noqa: E402
    ConcurrentUpdate,
    InvalidArgument,
    NothingToCommit,
    PathNotFound,
    RefExists,
    UnknownRevision,
    WouldOverwrite,
)
from coralfs.fsck import fsck  # noqa: E402
from coralfs.gc import gc  # noqa: E402
from coralfs.prune import prune_branch  # noqa: E402
from coralfs.repository import Repository  # noqa: E402
from tests.depth import DEEP  # noqa: E402

PATHS = ("model.safetensors", "ckpt/optim.pt", "config.json", "données/é.bin")
SAVE_PATHS = tuple(p for p in PATHS if p.endswith((".safetensors", ".pt")))
BRANCHES = ("main", "dev", "exp", "exp/a")  # exp and exp/a cannot both exist
TAGS = ("v1", "v2")
KINDS = ("safetensors", "pt", "text", "blob")
SEEDS = st.integers(0, 2)
STEPS = st.integers(0, 3)
METRICS = st.none() | st.sampled_from([0.5, 0.7, 0.9])


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ------------------------------------------------------------------ content
@functools.cache
def state_dict(seed: int, step: int) -> dict:
    """A small state dict that drifts a little per step (deltas), equal for equal arguments (dedup)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 32, generator=g)
    b = torch.randn(32, generator=g).to(torch.bfloat16)
    n = torch.arange(16, dtype=torch.int64) * (seed + 1)
    for s in range(1, step + 1):
        gs = torch.Generator().manual_seed(seed * 100 + s)
        w = w + torch.randn(w.shape, generator=gs) * 1e-3
        b = (b.float() + 1e-2).to(torch.bfloat16)
        n = n + s
    return {"layer.weight": w, "layer.bias": b, "counter": n}


def checkpoint_obj(kind: str, seed: int, step: int) -> dict:
    sd = state_dict(seed, step)
    return sd if kind == "safetensors" else {"model": sd, "step": step}


@functools.cache
def content(kind: str, seed: int, step: int) -> bytes:
    """The bytes of a file of ``kind`` (serialized here, independently of coralfs)."""
    if kind == "safetensors":
        return st_save(checkpoint_obj(kind, seed, step))
    if kind == "pt":
        buf = io.BytesIO()
        torch.save(checkpoint_obj(kind, seed, step), buf)
        return buf.getvalue()
    if kind == "text":
        return f'{{"seed": {seed}, "step": {step}, "name": "tiny"}}\n'.encode()
    rng = random.Random(seed)
    blob = bytearray(rng.randbytes(3000))
    for s in range(step):
        blob[s * 100:(s * 100) + 50] = bytes(50)
    return bytes(blob)


# ------------------------------------------------------------------ the model
@dataclass
class Node:
    n: int
    parent: int | None
    files: dict[str, str]  # path -> sha256
    message: str
    metrics: dict[str, float]


@dataclass
class Model:
    nodes: dict[int, Node] = field(default_factory=dict)
    ids: dict[int, bytes] = field(default_factory=dict)  # node -> the repository's commit id
    branches: dict[str, int] = field(default_factory=dict)
    tags: dict[str, int] = field(default_factory=dict)
    head_branch: str | None = "main"  # None: detached at ``detached``
    detached: int | None = None
    staged: dict[str, str | None] = field(default_factory=dict)  # path -> sha256, None: deletion
    skip: set[str] = field(default_factory=set)  # staged by save(): not in the work tree on purpose
    wt: dict[str, str] = field(default_factory=dict)  # the work tree's files
    blobs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes (for writing files)

    def head(self) -> int | None:
        return self.branches.get(self.head_branch) if self.head_branch is not None else self.detached

    def files(self, node: int | None) -> dict[str, str]:
        return dict(self.nodes[node].files) if node is not None else {}

    def index(self) -> dict[str, str]:
        out = self.files(self.head())
        for p, d in self.staged.items():
            if d is None:
                out.pop(p, None)
            else:
                out[p] = d
        return out

    def ancestors(self, starts: list[int]) -> set[int]:
        seen: set[int] = set()
        stack = list(starts)
        while stack:
            c = stack.pop()
            if c is None or c in seen:
                continue
            seen.add(c)
            stack.append(self.nodes[c].parent)  # type: ignore[arg-type]
        return seen

    def reachable(self) -> set[int]:
        starts = list(self.branches.values()) + list(self.tags.values())
        if self.head_branch is None and self.detached is not None:
            starts.append(self.detached)
        return self.ancestors(starts)

    def status(self) -> tuple[dict[str, str], list[str], list[str], list[str]]:
        """(staged: path -> added/modified/deleted, modified, deleted, untracked), like ``Status``."""
        head = self.files(self.head())
        staged = {}
        for p, d in self.staged.items():
            if d is None:
                if p in head:
                    staged[p] = "deleted"
            elif p not in head:
                staged[p] = "added"
            elif head[p] != d:
                staged[p] = "modified"
        index = self.index()
        modified = sorted(p for p, d in self.wt.items() if p in index and index[p] != d)
        untracked = sorted(p for p in self.wt if p not in index)
        deleted = sorted(p for p in index if p not in self.wt and p not in self.skip)
        return staged, modified, deleted, untracked


def select(chain: list[Node], keep_last: int | None, keep_best: int | None) -> set[int]:
    """What a prune keeps of ``chain`` (newest first): the head, the newest ``keep_last``, the
    ``keep_best`` best by metric "acc" (higher is better, ties to the newer)."""
    if not chain:
        return set()
    if keep_last is None and keep_best is None:
        return {c.n for c in chain}
    keep = {chain[0].n}
    if keep_last:
        keep.update(c.n for c in chain[:keep_last])
    if keep_best:
        scored = sorted(((c.metrics["acc"], -pos, c.n) for pos, c in enumerate(chain) if "acc" in c.metrics),
                        reverse=True)
        keep.update(n for _, _, n in scored[:keep_best])
    return keep


# ------------------------------------------------------------------ the state machine
class RepositoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="coralfs-model-")
        self.root = Path(self.tmp) / "repo"
        self.repo = Repository.init(self.root, auto_repack=False)
        self.m = Model()
        self.serial = 0

    def teardown(self) -> None:
        try:
            self.check_everything()
        finally:
            self.repo.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -------------------------------------------------------------- helpers
    def expect(self, error: type[BaseException] | None, fn, *a, **kw):  # noqa: ANN001
        """Call ``fn``; it must raise ``error`` when the model says so, else succeed."""
        if error is None:
            return fn(*a, **kw)
        event(f"{fn.__name__}: {error.__name__}")
        with pytest.raises(error):
            fn(*a, **kw)
        return None

    def new_node(self, parent: int | None, files: dict[str, str], message: str, metrics: dict[str, float]) -> Node:
        self.serial += 1
        node = Node(self.serial, parent, files, message, metrics)
        self.m.nodes[node.n] = node
        return node

    def rev_of(self, node: int, data: st.DataObject) -> str:
        """A revision naming ``node``: its full id or a 16-digit prefix."""
        h = self.m.ids[node].hex()
        return data.draw(st.sampled_from([h, h[:16]]), label="rev")

    def draw_reachable(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.m.reachable())), label="node")

    def write_wt(self, path: str, blob: bytes) -> None:
        p = self.root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
        self.m.wt[path] = sha(blob)

    def read_sha(self, repo: Repository, cid: bytes, path: str) -> str:
        with repo.open(cid, path) as f:
            return sha(f.read())

    def check_commit(self, repo: Repository, node: int) -> None:
        cid = self.m.ids[node]
        want = self.m.nodes[node].files
        c = repo.get_commit(cid)
        assert c.message == self.m.nodes[node].message
        assert c.metrics == self.m.nodes[node].metrics
        parent = self.m.nodes[node].parent
        assert c.parents == ((self.m.ids[parent],) if parent is not None else ())
        assert sorted(repo.ls(cid)) == sorted(want)
        for path, digest in want.items():
            assert self.read_sha(repo, cid, path) == digest, f"{path} at {cid.hex()[:12]}"

    def check_everything(self, after_gc: bool = False) -> None:
        """Every reachable commit byte-exact through a cache-free reader, logs, fsck."""
        reachable = self.m.reachable()
        reader = Repository(self.root, cache_bytes=0, auto_repack=False)
        try:
            for node in sorted(reachable):
                self.check_commit(reader, node)
            for name, node in self.m.branches.items():
                assert {cid for cid, _ in reader.log(name)} == {self.m.ids[n] for n in self.m.ancestors([node])}
            assert reader.reachable_commits() == {self.m.ids[n] for n in reachable}
            if after_gc:
                assert set(reader.commits()) == {self.m.ids[n] for n in reachable}
        finally:
            reader.close()
        rep = fsck(self.repo)
        assert rep.ok, [str(p) for p in rep.problems]

    # -------------------------------------------------------------- staging
    @initialize(seed=SEEDS, step=STEPS)
    def first_commit(self, seed: int, step: int) -> None:
        """Most runs start from a commit (a safetensors file and a text file)."""
        self.save("model.safetensors", seed, step)
        self.write_file("config.json", "text", seed, step, add=True)
        self.commit("first", None)

    @rule(path=st.sampled_from(SAVE_PATHS), seed=SEEDS, step=STEPS)
    def save(self, path: str, seed: int, step: int) -> None:
        kind = "safetensors" if path.endswith(".safetensors") else "pt"
        blob = content(kind, seed, step)
        self.repo.save(checkpoint_obj(kind, seed, step), path)
        self.m.staged[path] = sha(blob)
        self.m.blobs[sha(blob)] = blob
        self.m.skip.add(path)

    @rule(path=st.sampled_from(PATHS), kind=st.sampled_from(KINDS), seed=SEEDS, step=STEPS,
          add=st.booleans())
    def write_file(self, path: str, kind: str, seed: int, step: int, add: bool) -> None:
        """Write a work-tree file and (usually) ``add`` it."""
        blob = content(kind, seed, step)
        self.m.blobs[sha(blob)] = blob
        self.write_wt(path, blob)
        if add:
            self.repo.add([self.root / path])
            self.m.staged[path] = sha(blob)
            self.m.skip.discard(path)

    @rule(path=st.sampled_from(PATHS))
    def rm(self, path: str) -> None:
        head = self.m.files(self.m.head())
        if path not in head and path not in self.m.staged:
            self.expect(PathNotFound, self.repo.rm, [self.root / path])
            return
        assert self.repo.rm([self.root / path]) == [path]
        if path in head:
            self.m.staged[path] = None
            self.m.skip.discard(path)
        else:
            del self.m.staged[path]
        self.m.wt.pop(path, None)

    @rule(message=st.sampled_from(["a", "b", "c"]), acc=METRICS, repack=st.booleans())
    def commit(self, message: str, acc: float | None, repack: bool = False) -> None:
        """Commit the stage; ``repack``: then re-encode the replaced versions at once (what the
        background repack does after a commit; without it, demotions stay pending for gc and
        the later rules to meet)."""
        head = self.m.head()
        index = self.m.index()
        metrics = {"acc": acc} if acc is not None else {}
        if index == self.m.files(head):
            self.expect(NothingToCommit, self.repo.commit, message, metrics=metrics)
            return
        cid = self.repo.commit(message, metrics=metrics)
        node = self.new_node(head, index, message, metrics)
        self.m.ids[node.n] = cid
        if self.m.head_branch is not None:
            self.m.branches[self.m.head_branch] = node.n
        else:
            self.m.detached = node.n
        self.m.staged.clear()
        if repack:
            self.repo.repack()
        self.check_commit(self.repo, node.n)

    @rule(path=st.sampled_from(SAVE_PATHS), seed=SEEDS, step=STEPS, acc=METRICS, repack=st.booleans())
    def save_and_commit(self, path: str, seed: int, step: int, acc: float | None, repack: bool) -> None:
        """A training loop's step: save a checkpoint, commit it."""
        self.save(path, seed, step)
        self.commit("step", acc, repack)

    # -------------------------------------------------------------- refs
    def name_conflict(self, name: str) -> bool:
        return any(o != name and (o.startswith(name + "/") or name.startswith(o + "/")) for o in self.m.branches)

    @precondition(lambda self: self.m.nodes)
    @rule(name=st.sampled_from(BRANCHES), force=st.booleans(), data=st.data())
    def create_branch(self, name: str, force: bool, data: st.DataObject) -> None:
        """Create a branch, or with ``force`` reset an existing one (to any reachable commit)."""
        node = self.draw_reachable(data)
        rev = self.rev_of(node, data)
        if self.name_conflict(name) or (name in self.m.branches and not force):
            self.expect(RefExists, self.repo.create_branch, name, rev, force=force)
            return
        assert self.repo.create_branch(name, rev, force=force) == self.m.ids[node]
        self.m.branches[name] = node

    @precondition(lambda self: self.m.branches)
    @rule(data=st.data(), back=st.integers(1, 3), stale=st.sampled_from([False, False, True]))
    def reset_to_ancestor(self, data: st.DataObject, back: int, stale: bool) -> None:
        """Move a branch ``back`` commits back (discarding its newest checkpoints) by
        compare-and-swap; a stale expected value: ConcurrentUpdate, nothing moves."""
        name = data.draw(st.sampled_from(sorted(self.m.branches)), label="branch")
        cur = target = self.m.branches[name]
        for _ in range(back):
            parent = self.m.nodes[target].parent
            target = parent if parent is not None else target
        if stale:
            wrong = next((i for n, i in sorted(self.m.ids.items()) if n != cur), None)
            self.expect(ConcurrentUpdate, self.repo.set_branch, name, self.m.ids[target], wrong)
            return
        self.repo.set_branch(name, self.m.ids[target], self.m.ids[cur])
        self.m.branches[name] = target

    @rule(name=st.sampled_from(BRANCHES))
    def delete_branch(self, name: str) -> None:
        if name not in self.m.branches:
            self.expect(UnknownRevision, self.repo.delete_branch, name)
        elif name == self.m.head_branch:
            self.expect(InvalidArgument, self.repo.delete_branch, name)
        else:
            self.repo.delete_branch(name)
            del self.m.branches[name]

    @precondition(lambda self: self.m.nodes)
    @rule(name=st.sampled_from(TAGS), data=st.data())
    def tag(self, name: str, data: st.DataObject) -> None:
        node = self.draw_reachable(data)
        if name in self.m.tags:
            self.expect(RefExists, self.repo.tag, name, self.rev_of(node, data))
            return
        t = self.repo.tag(name, self.rev_of(node, data), message="m", metrics={"acc": 1.0})
        assert t.commit == self.m.ids[node]
        self.m.tags[name] = node

    @rule(name=st.sampled_from(TAGS))
    def delete_tag(self, name: str) -> None:
        if name not in self.m.tags:
            self.expect(UnknownRevision, self.repo.delete_tag, name)
            return
        self.repo.delete_tag(name)
        del self.m.tags[name]

    # -------------------------------------------------------------- checkout
    @precondition(lambda self: self.m.nodes)
    @rule(data=st.data(), force=st.booleans())
    def checkout(self, data: st.DataObject, force: bool) -> None:
        m = self.m
        choices = [("branch", b) for b in sorted(m.branches)] + [("tag", t) for t in sorted(m.tags)] \
            + [("commit", n) for n in sorted(m.reachable())]
        what, ref = data.draw(st.sampled_from(choices), label="target")
        if what == "branch":
            rev, target, branch = ref, m.branches[ref], ref
        elif what == "tag":
            rev, target, branch = ref, m.tags[ref], None
        else:
            rev, target, branch = self.rev_of(ref, data), ref, None
        head_files, target_files = m.files(m.head()), m.files(target)

        def move_head() -> None:
            m.head_branch, m.detached = branch, (None if branch is not None else target)

        if head_files == target_files and not force:  # HEAD moves; stage and work tree carry over
            assert self.repo.checkout(rev) == m.ids[target]
            move_head()
            return
        if not force:
            staged, modified, _, untracked = m.status()
            clash = [p for p in untracked if p in target_files and m.wt[p] != target_files[p]]
            if staged or modified or clash:
                self.expect(WouldOverwrite, self.repo.checkout, rev)
                return
        assert self.repo.checkout(rev, force=force) == m.ids[target]
        for p in head_files:
            if p not in target_files:
                m.wt.pop(p, None)
        m.wt.update(target_files)
        m.staged.clear()
        m.skip.clear()
        move_head()
        for p, d in target_files.items():  # the files are really there, byte-exact
            assert sha((self.root / p).read_bytes()) == d

    # -------------------------------------------------------------- maintenance
    @precondition(lambda self: self.m.branches)
    @rule(data=st.data(), keep_last=st.none() | st.integers(0, 3), keep_best=st.none() | st.integers(0, 2))
    def prune(self, data: st.DataObject, keep_last: int | None, keep_best: int | None) -> None:
        m = self.m
        name = data.draw(st.sampled_from(sorted(m.branches)), label="branch")
        others = m.ancestors([n for b, n in m.branches.items() if b != name])
        chain: list[Node] = []  # newest first, down to the fork point
        fork: int | None = None
        cur: int | None = m.branches[name]
        while cur is not None:
            if cur in others:
                fork = cur
                break
            chain.append(m.nodes[cur])
            cur = m.nodes[cur].parent
        kept = select(chain, keep_last, keep_best)
        plan = prune_branch(self.repo, name, keep_last=keep_last, keep_best=keep_best, metric="acc")
        assert set(plan.keep) == {m.ids[c.n] for c in chain if c.n in kept}
        assert set(plan.drop) == {m.ids[c.n] for c in chain if c.n not in kept}
        # the new chain: the oldest kept commits with an intact history keep their ids, the
        # rest are rewritten (same tree, message, metrics; a new parent)
        parent, unchanged, rewritten = fork, True, []
        for c in reversed(chain):
            if c.n not in kept:
                unchanged = False
                continue
            if unchanged:
                parent = c.n
                continue
            parent = self.new_node(parent, dict(c.files), c.message, dict(c.metrics)).n
            rewritten.append(parent)
        assert parent is not None
        m.branches[name] = parent
        real = self.repo.branch_head(name)
        for n in reversed(rewritten):  # learn the new ids from the repository's first-parent chain
            assert real is not None
            m.ids[n] = real
            parents = self.repo.get_commit(real).parents
            real = parents[0] if parents else None
        event(f"prune: dropped {bool(plan.drop)}, rewritten {bool(rewritten)}")
        assert plan.rewritten == len(rewritten)
        assert plan.new_head == m.ids[parent]
        for n in rewritten:
            self.check_commit(self.repo, n)
        self.check_everything()

    @rule()
    def gc(self) -> None:
        stats = gc(self.repo, grace=0)
        note(f"gc: {stats.to_json()}")
        event(f"gc swept chunks: {bool(stats.chunks_swept)}, re-encoded: {bool(stats.reencoded)}")
        for n in set(self.m.ids) - self.m.reachable():  # swept: never named again
            del self.m.ids[n]
        self.check_everything(after_gc=True)

    @rule()
    def repack(self) -> None:
        event(f"repack: demoted {bool(self.repo.repack().demoted)}")
        assert self.repo.pending_demotions() == 0
        self.check_everything()

    # -------------------------------------------------------------- after every step
    @invariant()
    def refs_match(self) -> None:
        m = self.m
        assert self.repo.branches() == {b: m.ids[n] for b, n in m.branches.items()}
        assert {name: t.commit for name, t in self.repo.tags().items()} == {t: m.ids[n] for t, n in m.tags.items()}
        assert self.repo.current_branch() == m.head_branch
        head = m.head()
        assert self.repo.head() == (m.ids[head] if head is not None else None)

    @invariant()
    def status_matches(self) -> None:
        s = self.repo.status()
        staged, modified, deleted, untracked = self.m.status()
        assert (s.staged, sorted(s.modified), sorted(s.deleted), sorted(s.untracked)) == \
            (staged, modified, deleted, untracked)


TestRepositoryModel = RepositoryMachine.TestCase
TestRepositoryModel.settings = settings(
    max_examples=400 if DEEP else 20, stateful_step_count=60 if DEEP else 40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
