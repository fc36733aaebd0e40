"""fsck: verify that everything the repository stores is intact.

:class:`Checker` has one method per phase (as restic's checker does), run in this order:

``check_refs``
    every ref: a branch names a commit, a tag names a tag object naming a commit, a
    detached HEAD names a commit, an attached HEAD names a branch;
``check_stage``
    every stage path is a valid repository path (``objects.path_error``: nothing that could
    escape the work tree);
``check_roots``
    the entries of the other ``root`` key families (stage, the mount's pending files and
    conflicts; coralfs.store.keys) can be read;
``check_objects``
    every object reachable from the roots is present, decodes and hashes to its id (a tree
    with an invalid path is a corrupt object);
``check_files``
    every reachable manifest rebuilds (streamed in blocks, never a whole file in memory) to
    its recorded size and whole-file hash; this decodes every reachable chunk through its
    delta chain and checks it against its id;
``check_chunks``
    every remaining chunk in the store (garbage included) decodes and matches its id, and
    every other object decodes too;
``check_index``
    every entry of a ``derived`` key family names data that exists (the table in
    coralfs.store.keys says what each entry names: commit index entries name commits,
    tensor base entries and pending demotions chunks, stat cache entries manifests, ...),
    and every reachable commit has a commit index entry;
``check_keys``
    every key belongs to a key family.

``--repair`` fixes only what can be fixed without losing anything: entries of derived
families that name missing data are dropped, missing commit index entries are added, stage
entries with an invalid path (which no coralfs writes) are dropped, and garbage
(unreachable chunks and objects, including corrupt ones that nothing reachable needs) is
removed by running gc. Everything else is reported; the CLI exits with
IntegrityError's exit code when problems remain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from coralfs.errors import CoralError, GcAborted, MissingObject
from coralfs.gc import gc
from coralfs.hashing import ID_LEN, digest, hasher
from coralfs.reader import FileView
from coralfs.store import keys, refs
from coralfs.store.objects import Commit, Manifest, Tag, Tree, deserialize, path_error
from coralfs.store.objectstore import Headers, ObjectStore
from coralfs.store.refs import Refs

if TYPE_CHECKING:
    from coralfs.repository import Repository
    from coralfs.store.lmdb import Txn

READ_BLOCK = 8 << 20
_KIND = {keys.REFS: "ref", keys.STAGE: "stage", keys.INDEX: "index", keys.CONFIG: "config"}  # Problem.kind of a db


@dataclass
class Problem:
    kind: str  # ref | object | manifest | chunk | index | stage | config
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
    """Check the repository (see the module docstring); ``repair`` fixes what is safe to fix."""
    return Checker(repo, log).run(repair)


class Checker:
    """One fsck run: each ``check_*`` method is a phase; they share what the walk found."""

    def __init__(self, repo: Repository, log: Callable[[str], None] | None = None) -> None:
        self.repo = repo
        self.say = log or (lambda _m: None)
        self.report = FsckReport()
        self.problems = self.report.problems
        self.vs = _VerifyingStore(repo.store, cache_bytes=64 << 20)
        self.starts: list[tuple[bytes, str]] = []  # root object ids, and what names them
        self.seen: set[bytes] = set()  # reachable objects
        self.commits: set[bytes] = set()
        self.manifests: dict[bytes, Manifest] = {}
        self.reachable_chunks: set[bytes] = set()
        self.stage_drop: list[bytes] = []  # repairs: stage keys with an invalid path
        self.entry_drop: list[tuple[str, bytes]] = []  # ... (database, key) of broken derived entries
        self.missing_index: list[bytes] = []  # ... reachable commits without a commit index entry

    def run(self, repair: bool = False) -> FsckReport:
        t0 = time.monotonic()
        self.check_refs()
        self.check_stage()
        self.check_roots()
        self.check_objects()
        self.check_files()
        self.check_chunks()
        self.check_index()
        self.check_keys()
        if repair and any(p.repairable for p in self.problems):
            self.repair()
        self.report.seconds = time.monotonic() - t0
        return self.report

    def _object(self, oid: bytes, kind: str, where: str) -> Any:
        try:
            return self.vs.get_object(oid)
        except MissingObject:
            self.problems.append(Problem(kind, oid.hex(), f"missing (referenced by {where})"))
        except CoralError as e:
            self.problems.append(Problem(kind, oid.hex(), f"corrupt: {e} (referenced by {where})"))
        return None

    # ---------------------------------------------------------------- phases
    def check_refs(self) -> None:
        """Refs name what their kind says; the valid ones are roots of the walk."""
        with self.repo.store.read() as t:
            ref_items = list(Refs(t).all().items())
        for name, v in ref_items:
            self.report.refs += 1
            if name == refs.HEAD:
                target = refs.symref_target(v)
                if target is not None:
                    if not target.startswith(refs.BRANCH):
                        self.problems.append(Problem("ref", "HEAD", f"points at {target!r}, not a branch"))
                    continue
                expect: type = Commit
            elif name.startswith(refs.BRANCH):
                expect = Commit
            elif name.startswith(refs.TAG):
                expect = Tag
            else:
                continue  # a key of no family: check_keys reports it
            if len(v) != ID_LEN:
                self.problems.append(Problem("ref", name, f"value is {len(v)} bytes, not an id"))
                continue
            o = self._object(v, "object", name)
            if o is None:
                continue
            if not isinstance(o, expect):
                self.problems.append(Problem("ref", name, f"points at a {type(o).__name__}, not a {expect.__name__}"))
                continue
            self.starts.append((v, name))

    def check_stage(self) -> None:
        """A stage path may reach a commit and the work tree: it must be a valid path."""
        with self.repo.store.read() as t:
            stage_items = list(t.items(keys.STAGE))
        for k, v in stage_items:
            try:
                path = keys.path_of_raw(keys.STAGE_PREFIX, k, v)
            except (ValueError, TypeError) as e:
                self.problems.append(Problem("stage", repr(k)[:80], f"unreadable path: {e}", repairable=True))
                self.stage_drop.append(k)
                continue
            err = path_error(path)
            if err is not None:
                self.problems.append(Problem("stage", repr(k)[:80], f"invalid path: {err}", repairable=True))
                self.stage_drop.append(k)

    def check_roots(self) -> None:
        """The entries of every other root family (stage, pending mount data) can be read; what
        they name is a root of the walk."""
        with self.repo.store.read() as t:
            entries = [(fam, k, v) for fam in keys.families(role=keys.Role.ROOT) if fam.db != keys.REFS
                       for k, v in fam.items(t)]
        for fam, k, v in entries:
            try:
                named = fam.named(k, v)
            except keys.Unreadable:
                self.problems.append(Problem(_KIND.get(fam.db, fam.db), k.decode(errors="replace"), "unreadable entry"))
                continue
            self.starts.extend((oid, f"{fam.name} {k.decode(errors='replace')}") for _, oid in named)

    def check_objects(self) -> None:
        """Every object reachable from the roots is present and intact."""
        stack = list(self.starts)
        while stack:
            oid, where = stack.pop()
            if oid in self.seen:
                continue
            self.seen.add(oid)
            o = self._object(oid, "object", where)
            if o is None:
                continue
            self.report.objects += 1
            label = f"{type(o).__name__.lower()} {oid.hex()[:12]}"
            if isinstance(o, Tag):
                stack.append((o.commit, label))
            elif isinstance(o, Commit):
                self.commits.add(oid)
                stack.append((o.tree, label))
                stack.extend((p, label) for p in o.parents)
            elif isinstance(o, Tree):
                stack.extend((e.manifest, f"{label}:{p}") for p, e in o.entries.items())
            elif isinstance(o, Manifest):
                self.manifests[oid] = o
        self.say(f"checked {self.report.objects} reachable objects")

    def check_files(self) -> None:
        """Every reachable manifest rebuilds, streamed, to its size and whole-file hash."""
        rep = self.report
        for mid, man in self.manifests.items():
            self.reachable_chunks.update(man.chunk_ids())
            view = FileView(self.vs, man)
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
                self.problems.append(Problem("manifest", mid.hex(), f"unreadable at offset {pos}: {e}"))
                continue
            rep.manifests += 1
            rep.bytes_verified += pos
            if pos != man.size:
                self.problems.append(Problem("manifest", mid.hex(), f"rebuilds to {pos} bytes, expected {man.size}"))
            elif h.digest() != man.file_hash:
                self.problems.append(Problem("manifest", mid.hex(), "rebuilt file does not match its recorded hash"))
        self.vs.chunk_cache.clear()
        self.say(f"rebuilt {rep.manifests} files ({rep.bytes_verified} bytes)")

    def check_chunks(self) -> None:
        """Every other chunk and object in the store decodes (garbage included)."""
        rep, vs = self.report, self.vs
        with self.repo.store.read() as t:
            chunk_ids = list(t.keys(keys.CHUNKS))
            object_ids = list(t.keys(keys.OBJECTS))
        # base chains of reachable chunks (never garbage while needed)
        needed_bases = {b for _, h, _ in Headers(store=vs.store).walk(self.reachable_chunks, skip_bad=True)
                        for b in h.bases}
        for cid in chunk_ids:
            rep.chunks += 1
            garbage = cid not in self.reachable_chunks and cid not in needed_bases
            if garbage:
                rep.garbage_chunks += 1
            if cid in vs.verified:
                continue
            try:
                vs.get_chunk(cid)
            except CoralError as e:
                self.problems.append(Problem("chunk", cid.hex(), str(e) + (" (unreachable garbage)" if garbage else ""),
                                             repairable=garbage))
            if vs.chunk_cache.size > (48 << 20):
                vs.chunk_cache.clear()
        for oid in object_ids:
            if oid in self.seen:
                continue
            rep.garbage_objects += 1
            with self.repo.store.read() as t:
                data = t.get(keys.OBJECTS, oid)
            try:
                if data is None or digest(data) != oid:
                    raise CoralError("does not match its id")
                deserialize(data)
            except CoralError as e:
                self.problems.append(Problem("object", oid.hex(), f"unreachable and corrupt: {e}", repairable=True))
        self.say(f"checked {rep.chunks} chunks")

    def check_index(self) -> None:
        """Entries of derived key families name what exists; every reachable commit is indexed."""
        with self.repo.store.read() as t:
            for fam in keys.families(role=keys.Role.DERIVED):
                for k, v in fam.items(t):
                    msg = _entry_problem(t, fam, k, v)
                    if msg:
                        self.problems.append(Problem(_KIND.get(fam.db, fam.db), repr(k)[:80], msg, True))
                        self.entry_drop.append((fam.db, k))
            indexed = set(Refs(t).commits())
        self.missing_index = sorted(self.commits - indexed)
        for c in self.missing_index:
            self.problems.append(Problem("index", c.hex(), "reachable commit missing from the commit index", True))

    def check_keys(self) -> None:
        """Every key belongs to a key family (gc refuses to run while one does not)."""
        with self.repo.store.read() as t:
            unknown = keys.unknown_keys(t)
        for db, k in unknown:
            self.problems.append(Problem(_KIND.get(db, db), repr(k)[:80], "belongs to no key family known to "
                                         "this coralfs (gc will not run while it is there)"))

    # ---------------------------------------------------------------- repair
    def repair(self) -> None:
        rep, say = self.report, self.say
        entry_drop, missing_index, stage_drop = self.entry_drop, self.missing_index, self.stage_drop
        if entry_drop or missing_index or stage_drop:
            def fn(t: Txn) -> None:
                for db, k in entry_drop:
                    t.delete(db, k)
                r = Refs(t)
                for c in missing_index:
                    r.index_commit(c)
                for k in stage_drop:  # no coralfs writes such an entry: it came with the repository
                    t.delete(keys.STAGE, k)

            self.repo.store.write(fn)
            rep.repaired += [f"dropped {_KIND.get(db, db)} entry {k!r}"[:100] for db, k in entry_drop]
            rep.repaired += [f"dropped stage entry {k!r}"[:100] for k in stage_drop]
            rep.repaired += [f"indexed commit {c.hex()[:12]}" for c in missing_index]
        if any(p.repairable and p.kind in ("chunk", "object") for p in rep.problems):
            try:
                st = gc(self.repo, grace=0)
                rep.repaired.append(f"gc removed {st.chunks_swept} chunks and {st.objects_swept} objects")
            except GcAborted as e:
                say(f"garbage not removed: {e}")
                return
        with self.repo.store.read() as t:
            def still_there(p: Problem) -> bool:
                if p.kind in ("chunk", "object"):
                    return t.has(keys.CHUNKS if p.kind == "chunk" else keys.OBJECTS, bytes.fromhex(p.key))
                return False

            rep.problems[:] = [p for p in rep.problems if not p.repairable or still_there(p)]
        say(f"repaired {len(rep.repaired)} things")


def _entry_problem(t: Txn, fam: keys.Family, k: bytes, v: bytes) -> str | None:
    """What is wrong with an entry of a derived family, if anything: it cannot be read, or
    something it names is missing (a named commit must decode as a commit)."""
    try:
        named = fam.named(k, v)
    except keys.Unreadable:
        return "unreadable entry"
    for kind, i in named:
        if kind == keys.CHUNK:
            if len(i) != ID_LEN or not t.has(keys.CHUNKS, i):
                return fam.missing
            continue
        data = t.get(keys.OBJECTS, i) if len(i) == ID_LEN else None
        if data is None:
            return fam.missing
        if kind == keys.COMMIT:
            try:
                if not isinstance(deserialize(data), Commit):
                    return f"{fam.name} entry names a non-commit"
            except CoralError:
                return f"{fam.name} entry names an undecodable object"
    return None
