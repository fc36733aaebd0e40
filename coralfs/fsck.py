"""fsck: verify that everything the repository stores is intact.

Checks
    * every ref: a branch names a commit, a tag names a tag object naming a commit, a
      detached HEAD names a commit, an attached HEAD names a valid branch name;
    * every object reachable from the roots (refs, stage, pending mount data) is present,
      decodes and hashes to its id; every other object in the store decodes too;
    * every reachable manifest rebuilds (streamed in blocks, never a whole file in memory)
      to its recorded size and whole-file hash; this decodes every reachable chunk through
      its delta chain and checks it against its id;
    * every remaining chunk in the store (garbage included) decodes and matches its id;
    * the index: ``c\\0`` commit index entries name commits, every reachable commit has one,
      ``tb\\0`` tensor base entries and ``st\\0`` stat cache entries name existing data,
      ``pend\\0`` pending mount entries name existing manifests, ``dm\\0`` pending demotions
      and ``rv\\0`` reverse-chain counters name existing chunks;
    * every path in a tree and in the stage is a valid repository path (``objects.path_error``:
      nothing that could escape the work tree); a tree with such a path is a corrupt object.

``--repair`` fixes only what can be fixed without losing anything: index entries that
point at missing data are dropped, missing commit index entries are added, stage entries
with an invalid path (which no coralfs writes) are dropped, and garbage
(unreachable chunks and objects, including corrupt ones that nothing reachable needs) is
removed by running gc. Everything else is reported; the CLI exits with
IntegrityError's exit code when problems remain.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from coralfs.errors import CoralError, MissingObject
from coralfs.gc import GcAborted, gc
from coralfs.hashing import ID_LEN, digest, hasher
from coralfs.reader import FileView
from coralfs.store import keys, refs
from coralfs.store.keys import BELOW as BELOW_PREFIX
from coralfs.store.keys import COMMIT_INDEX, TENSOR_INDEX
from coralfs.store.keys import CONFLICTS as CONFLICT_PREFIX
from coralfs.store.keys import DEMOTIONS as DEMOTION_PREFIX
from coralfs.store.keys import PENDING as PEND_PREFIX
from coralfs.store.keys import STAT_CACHE as STAT_INDEX
from coralfs.store.objects import Commit, Manifest, Tag, Tree, deserialize, path_error
from coralfs.store.objectstore import ObjectStore
from coralfs.store.refs import Refs

if TYPE_CHECKING:
    from coralfs.repository import Repository
    from coralfs.store.lmdb import Txn

READ_BLOCK = 8 << 20


@dataclass
class Problem:
    kind: str  # ref | object | manifest | chunk | index | stage
    key: str
    message: str
    repairable: bool = False

    def __str__(self) -> str:
        return f"{self.kind} {self.key}: {self.message}" + (" (repairable)" if self.repairable else "")


@dataclass
class FsckReport:
    problems: list[Problem] = field(default_factory=list)
    refs: int = 0
    objects: int = 0
    manifests: int = 0
    chunks: int = 0
    bytes_verified: int = 0
    garbage_objects: int = 0
    garbage_chunks: int = 0
    repaired: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


class _VerifyingStore(ObjectStore):
    """An object store that remembers every chunk it decoded and verified."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.verified: set[bytes] = set()

    def get_chunk(self, cid: bytes, _depth: int = 0) -> bytes:
        data = super().get_chunk(cid, _depth)
        self.verified.add(cid)
        return data


def fsck(repo: Repository, repair: bool = False, log: Callable[[str], None] | None = None) -> FsckReport:
    t0 = time.monotonic()
    say = log or (lambda _m: None)
    rep = FsckReport()
    vs = _VerifyingStore(repo.store, cache_bytes=64 << 20)
    problems = rep.problems

    def obj(oid: bytes, kind: str, where: str) -> Any:
        try:
            return vs.get_object(oid)
        except MissingObject:
            problems.append(Problem(kind, oid.hex(), f"missing (referenced by {where})"))
        except CoralError as e:
            problems.append(Problem(kind, oid.hex(), f"corrupt: {e} (referenced by {where})"))
        return None

    # -- roots
    with repo.store.read() as t:
        ref_items = [(k.encode(errors="surrogateescape"), v) for k, v in Refs(t).all().items()]
        stage_items = list(t.items("stage"))
        pend_items = list(t.items("index", PEND_PREFIX)) + list(t.items("index", CONFLICT_PREFIX))
    starts: list[tuple[bytes, str]] = []
    for k, v in ref_items:
        rep.refs += 1
        name = k.decode(errors="replace")
        if k == keys.HEAD:
            if v.startswith(keys.SYMREF):
                target = v[len(keys.SYMREF):].decode(errors="replace")
                if not target.startswith(refs.BRANCH):
                    problems.append(Problem("ref", "HEAD", f"points at {target!r}, not a branch"))
                continue
            expect: type = Commit
        elif name.startswith(refs.BRANCH):
            expect = Commit
        elif name.startswith(refs.TAG):
            expect = Tag
        else:
            problems.append(Problem("ref", name, "unknown kind of ref"))
            continue
        if len(v) != ID_LEN:
            problems.append(Problem("ref", name, f"value is {len(v)} bytes, not an id"))
            continue
        o = obj(v, "object", name)
        if o is None:
            continue
        if not isinstance(o, expect):
            problems.append(Problem("ref", name, f"points at a {type(o).__name__}, not a {expect.__name__}"))
            continue
        starts.append((v, name))
    stage_drop: list[bytes] = []
    for k, v in stage_items:  # a stage path may reach a commit and the work tree: validate it
        try:
            path = keys.path_of(b"", k, json.loads(v) if keys.is_hashed(b"", k) else None)
        except (ValueError, TypeError) as e:
            problems.append(Problem("stage", repr(k)[:80], f"unreadable path: {e}", repairable=True))
            stage_drop.append(k)
            continue
        err = path_error(path)
        if err is not None:
            problems.append(Problem("stage", repr(k)[:80], f"invalid path: {err}", repairable=True))
            stage_drop.append(k)
    for k, v, where in [(k, v, "stage " + k.decode(errors="replace")) for k, v in stage_items] + \
            [(k, v, "pending " + k.decode(errors="replace")) for k, v in pend_items]:
        try:
            d = json.loads(v)
        except ValueError:
            problems.append(Problem("stage", k.decode(errors="replace"), "unreadable entry"))
            continue
        if isinstance(d, dict) and d.get("m"):
            starts.append((bytes.fromhex(d["m"]), where))

    # -- reachable objects
    seen: set[bytes] = set()
    commits: set[bytes] = set()
    manifests: dict[bytes, Manifest] = {}
    stack = list(starts)
    while stack:
        oid, where = stack.pop()
        if oid in seen:
            continue
        seen.add(oid)
        o = obj(oid, "object", where)
        if o is None:
            continue
        rep.objects += 1
        label = f"{type(o).__name__.lower()} {oid.hex()[:12]}"
        if isinstance(o, Tag):
            stack.append((o.commit, label))
        elif isinstance(o, Commit):
            commits.add(oid)
            stack.append((o.tree, label))
            stack.extend((p, label) for p in o.parents)
        elif isinstance(o, Tree):
            stack.extend((e.manifest, f"{label}:{p}") for p, e in o.entries.items())
        elif isinstance(o, Manifest):
            manifests[oid] = o
    say(f"checked {rep.objects} reachable objects")

    # -- manifests: rebuild every file, streamed
    reachable_chunks: set[bytes] = set()
    for mid, man in manifests.items():
        reachable_chunks.update(man.chunk_ids())
        view = FileView(vs, man)
        h = hasher()
        pos = 0
        try:
            while pos < man.size:
                block = view.pread(pos, READ_BLOCK)
                if not block:
                    break
                h.update(block)
                pos += len(block)
        except CoralError as e:
            problems.append(Problem("manifest", mid.hex(), f"unreadable at offset {pos}: {e}"))
            continue
        rep.manifests += 1
        rep.bytes_verified += pos
        if pos != man.size:
            problems.append(Problem("manifest", mid.hex(), f"rebuilds to {pos} bytes, expected {man.size}"))
        elif h.digest() != man.file_hash:
            problems.append(Problem("manifest", mid.hex(), "rebuilt file does not match its recorded hash"))
    vs.chunk_cache.clear()
    say(f"rebuilt {rep.manifests} files ({rep.bytes_verified} bytes)")

    # -- every other chunk and object in the store
    with repo.store.read() as t:
        chunk_ids = list(t.keys("chunks"))
        object_ids = list(t.keys("objects"))
    needed_bases: set[bytes] = set()  # base chains of reachable chunks (never garbage while needed)
    todo = [c for c in reachable_chunks]
    while todo:
        cid = todo.pop()
        try:
            bases = vs.chunk_header(cid).bases
        except CoralError:
            continue
        for b in bases:
            if b not in needed_bases:
                needed_bases.add(b)
                todo.append(b)
    garbage_bad: list[bytes] = []
    for cid in chunk_ids:
        rep.chunks += 1
        if cid not in reachable_chunks and cid not in needed_bases:
            rep.garbage_chunks += 1
        if cid in vs.verified:
            continue
        try:
            vs.get_chunk(cid)
        except CoralError as e:
            garbage = cid not in reachable_chunks and cid not in needed_bases
            problems.append(Problem("chunk", cid.hex(), str(e) + (" (unreachable garbage)" if garbage else ""),
                                    repairable=garbage))
            if garbage:
                garbage_bad.append(cid)
        if vs.chunk_cache.size > (48 << 20):
            vs.chunk_cache.clear()
    for oid in object_ids:
        if oid in seen:
            continue
        rep.garbage_objects += 1
        with repo.store.read() as t:
            data = t.get("objects", oid)
        try:
            if data is None or digest(data) != oid:
                raise CoralError("does not match its id")
            deserialize(data)
        except CoralError as e:
            problems.append(Problem("object", oid.hex(), f"unreachable and corrupt: {e}", repairable=True))
    say(f"checked {rep.chunks} chunks")

    # -- index
    index_drop: list[bytes] = []
    with repo.store.read() as t:
        indexed = {k[len(COMMIT_INDEX):] for k in t.keys("index", COMMIT_INDEX)}
        for prefix in (COMMIT_INDEX, TENSOR_INDEX, STAT_INDEX, PEND_PREFIX, DEMOTION_PREFIX, BELOW_PREFIX):
            for k, v in t.items("index", prefix):
                msg = _index_problem(t, k, v, prefix)
                if msg:
                    repairable = prefix != PEND_PREFIX
                    problems.append(Problem("index", repr(k)[:80], msg, repairable))
                    if repairable:
                        index_drop.append(k)
    missing_index = sorted(commits - indexed)
    for c in missing_index:
        problems.append(Problem("index", c.hex(), "reachable commit missing from the commit index", True))

    if repair and any(p.repairable for p in problems):
        _repair(repo, rep, index_drop, missing_index, say, stage_drop)
    rep.seconds = time.monotonic() - t0
    return rep


def _index_problem(t: Txn, k: bytes, v: bytes, prefix: bytes) -> str | None:
    if prefix == COMMIT_INDEX:
        data = t.get("objects", k[len(prefix):])
        if data is None:
            return "commit index entry names a missing commit"
        try:
            if not isinstance(deserialize(data), Commit):
                return "commit index entry names a non-commit"
        except CoralError:
            return "commit index entry names an undecodable object"
        return None
    if prefix == TENSOR_INDEX:
        return None if len(v) == ID_LEN and t.has("chunks", v) else "tensor base index names a missing chunk"
    if prefix == DEMOTION_PREFIX:  # dropping one loses nothing: the older version stays whole
        body = k[len(prefix) + 8 :]
        ok = len(body) == 2 * ID_LEN and t.has("chunks", body[:ID_LEN]) and t.has("chunks", body[ID_LEN:])
        return None if ok else "pending demotion names a missing chunk"
    if prefix == BELOW_PREFIX:
        return None if t.has("chunks", k[len(prefix):]) else "reverse-chain counters of a missing chunk"
    try:
        m = bytes.fromhex(json.loads(v)["m"])
    except (ValueError, KeyError, TypeError):
        return "unreadable entry"
    if not t.has("objects", m):
        return ("pending mount data names a missing manifest" if prefix == PEND_PREFIX
                else "stat cache entry names a missing manifest")
    return None


def _repair(repo: Repository, rep: FsckReport, index_drop: list[bytes], missing_index: list[bytes],
            say: Callable[[str], None], stage_drop: list[bytes] | None = None) -> None:
    stage_drop = stage_drop or []
    if index_drop or missing_index or stage_drop:
        def fn(t: Txn) -> None:
            for k in index_drop:
                t.delete("index", k)
            for c in missing_index:
                Refs(t).index_commit(c)
            for k in stage_drop:  # no coralfs writes such an entry: it came with the repository
                t.delete("stage", k)

        repo.store.write(fn)
        rep.repaired += [f"dropped index entry {k!r}"[:100] for k in index_drop]
        rep.repaired += [f"dropped stage entry {k!r}"[:100] for k in stage_drop]
        rep.repaired += [f"indexed commit {c.hex()[:12]}" for c in missing_index]
    if any(p.repairable and p.kind in ("chunk", "object") for p in rep.problems):
        try:
            st = gc(repo, grace=0)
            rep.repaired.append(f"gc removed {st.chunks_swept} chunks and {st.objects_swept} objects")
        except GcAborted as e:
            say(f"garbage not removed: {e}")
            return
    with repo.store.read() as t:
        def still_there(p: Problem) -> bool:
            if p.kind in ("chunk", "object"):
                return t.has("chunks" if p.kind == "chunk" else "objects", bytes.fromhex(p.key))
            return False

        rep.problems[:] = [p for p in rep.problems if not p.repairable or still_there(p)]
    say(f"repaired {len(rep.repaired)} things")

