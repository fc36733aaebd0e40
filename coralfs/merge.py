"""Three-way, tensor-aware merge of a branch into another.

``merge(repo, theirs, branch)`` merges the revision ``theirs`` into ``branch`` (default:
the current branch) against their merge base (``merge_base``: the best common
ancestor in the commit DAG; with several, as after criss-cross merges, the newest).

File by file (paths compared by tree entry, so unchanged files cost nothing):

- changed on one side only: that side's entry (a deletion included);
- the same change on both sides: taken once;
- changed differently on both sides: checkpoints (safetensors, torch.save zips) of the
  same format merge tensor by tensor; any other file is a file-level conflict.

Tensor by tensor (tensors compared by dtype, shape and chunk ids: exact, no decoding):
the same rules; a tensor changed on both sides is a conflict unless a strategy
resolves it. Strategies (``MergeOptions``; per tensor-name pattern with ``rules``,
first ``fnmatch`` match wins, else ``strategy``):

- ``ours`` / ``theirs``: that side's tensor, bit for bit;
- ``average``: ``(1 - weight) * ours + weight * theirs``;
- ``task-arithmetic``: ``base + lambda * ((ours - base) + (theirs - base))``;
- ``ties`` (TIES-merging): per side the task vector ``side - base`` is trimmed to its
  top ``density`` fraction by magnitude, a sign is elected per element from the sum of
  the trimmed vectors, and the values agreeing with it are averaged (disjoint mean):
  ``base + lambda * merged``.

Arithmetic runs in float32 (float64 for F64 and integer tensors, which are rounded
back) and is cast back to the tensor's dtype. It needs equal dtype and shape on both
sides (and in the base, for task-arithmetic and ties); anything else is a conflict,
never a broadcast. torch.save zips are merged per *storage* (a segment), which for a
state dict is one tensor.

Non-tensor content of a checkpoint (safetensors ``__metadata__`` keys, non-tensor
values of a ``.pt`` such as a step counter) is merged three-way too; when both sides
changed it, a ``theirs`` strategy for its name takes theirs, any other strategy keeps
ours (with a note), no strategy is a conflict. A ``.pt`` value that holds tensors and
that both sides changed in a way the tensor-by-tensor merge cannot pair up (a list that
grew on one side, a tensor replaced by a plain value, ...) is never settled by keeping
ours: only an ``ours``/``theirs`` rule for its name resolves it, else it is a conflict
naming the file and the value. Mappings merge key by key whatever their type (a
``state_dict()`` OrderedDict against a plain dict re-saved elsewhere), as ours' type. Non-checkpoint files that both sides
changed are resolved only by an ``ours``/``theirs`` rule matching the file path, or a
global ``ours``/``theirs`` strategy.

Output files keep their format: a safetensors result is rebuilt with safetensors' own
``save`` (metadata kept); a ``.pt`` result is rebuilt by loading the three versions with
torch's weights-only loader (never full unpickling), putting the merged values into
ours' object tree and ``torch.save``-ing it: every tensor no strategy touched is
bit-identical to its source. A file whose result is one side's file is that side's
tree entry, reused as is (no re-encoding).

Conflicts: by default the merge stops and raises ``MergeConflicts`` (a ``MergeConflict``)
listing every conflict; nothing is changed. Merges never lose a change one side made.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coralfs.diff import is_checkpoint, segment_bytes, segment_key
from coralfs.errors import CheckpointLoadError, CoralError, InvalidArgument, MergeConflicts, UnknownRevision
from coralfs.export import load_weights_only
from coralfs.reader import FileReader
from coralfs.repository import Repository
from coralfs.store.objects import Manifest, Segment, TreeEntry
from coralfs.worktree import advance_branch, check_untracked, require_clean

STRATEGIES = ("ours", "theirs", "average", "task-arithmetic", "ties")
ARITHMETIC = ("average", "task-arithmetic", "ties")
_INT = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
_FLOAT = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_COMPLEX = ("C64", "C128")


# ------------------------------------------------------------------ results & options
@dataclass(frozen=True)
class Conflict:
    path: str
    name: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.path} [{self.name}]: {self.reason}" if self.name else f"{self.path}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name, "reason": self.reason}



@dataclass(frozen=True)
class MergeOptions:
    """How conflicts (changed on both sides) are resolved. ``None``: they are conflicts."""

    strategy: str | None = None
    weight: float = 0.5
    lam: float = 1.0
    density: float = 0.2
    rules: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for s in [self.strategy] + [r[1] for r in self.rules]:
            if s is not None and s not in STRATEGIES:
                raise InvalidArgument(f"unknown merge strategy {s!r} (use one of {', '.join(STRATEGIES)})")
        if not 0.0 < self.density <= 1.0:
            raise InvalidArgument("--density must be in (0, 1]")
        if not (math.isfinite(self.weight) and math.isfinite(self.lam)):
            raise InvalidArgument("--weight and --lambda must be finite numbers")

    @staticmethod
    def parse_rule(text: str) -> tuple[str, str]:
        pattern, sep, strategy = text.rpartition("=")
        if not sep or not pattern or strategy not in STRATEGIES:
            raise InvalidArgument(f"--strategy-for {text!r}: expected PATTERN=STRATEGY with STRATEGY one of "
                                  + ", ".join(STRATEGIES))
        return pattern, strategy

    def for_name(self, name: str) -> str | None:
        for pattern, strategy in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                return strategy
        return self.strategy

    def for_file(self, path: str) -> str | None:
        """Whole-file resolution: only ``ours``/``theirs`` apply to files."""
        for pattern, strategy in self.rules:
            if fnmatch.fnmatchcase(path, pattern):
                return strategy if strategy in ("ours", "theirs") else None
        return self.strategy if self.strategy in ("ours", "theirs") else None

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "weight": self.weight, "lambda": self.lam, "density": self.density,
                "rules": [list(r) for r in self.rules]}


@dataclass(frozen=True)
class Resolution:
    path: str
    name: str
    strategy: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name, "strategy": self.strategy}


@dataclass
class MergeResult:
    status: str  # "merged" | "fast-forward" | "up-to-date"
    branch: str
    ours: bytes
    theirs: bytes
    base: bytes | None
    commit: bytes | None = None
    files: dict[str, str] = field(default_factory=dict)  # path -> how it was merged (changed paths only)
    resolved: list[Resolution] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "branch": self.branch, "ours": self.ours.hex(), "theirs": self.theirs.hex(),
                "base": self.base.hex() if self.base else None, "commit": self.commit.hex() if self.commit else None,
                "files": self.files, "resolved": [r.to_json() for r in self.resolved], "notes": self.notes}


# ------------------------------------------------------------------ commit DAG
def is_ancestor(repo: Repository, a: bytes, b: bytes) -> bool:
    """True if ``a`` is ``b`` or reachable from ``b``."""
    return a in repo.ancestors([b])


def merge_bases(repo: Repository, a: bytes, b: bytes) -> list[bytes]:
    """The best common ancestors of ``a`` and ``b``: common ancestors that are not ancestors of another one."""
    common = repo.ancestors([a]) & repo.ancestors([b])
    redundant: set[bytes] = set()
    stack = [p for c in common for p in repo.get_commit(c).parents]
    while stack:
        c = stack.pop()
        if c in redundant:
            continue
        redundant.add(c)
        stack.extend(repo.get_commit(c).parents)
    return sorted(common - redundant, key=lambda c: (-repo.get_commit(c).time, c))


def merge_base(repo: Repository, a: bytes, b: bytes) -> bytes | None:
    """One best common ancestor (the newest if there are several), or None for unrelated histories."""
    bases = merge_bases(repo, a, b)
    return bases[0] if bases else None


# ------------------------------------------------------------------ arithmetic
def _torch_dtype(dtype: str) -> Any:
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "C64": torch.complex64, "C128": torch.complex128,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
    }
    td = table.get(dtype)
    if td is None:
        raise CoralError(f"dtype {dtype} is not supported by this torch")
    return td


def tensor_from_bytes(raw: bytes, dtype: str, shape: tuple[int, ...] | None = None) -> Any:
    """A torch tensor over a copy of ``raw`` (flat, or ``shape`` when it fits)."""
    import torch

    td = _torch_dtype(dtype)
    t = torch.frombuffer(bytearray(raw), dtype=td) if raw else torch.empty(0, dtype=td)
    if shape is not None and math.prod(shape) == t.numel():
        t = t.reshape(shape)
    return t


def _tensor_bytes(t: Any) -> bytes:
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def arithmetic_problem(strategy: str, b: Segment | None, o: Segment | None, t: Segment | None) -> str | None:
    """Why ``strategy`` cannot combine these versions of a tensor (None: it can)."""
    if o is None or t is None:
        return "deleted on one side and changed on the other"
    if o.dtype != t.dtype:
        return f"dtype differs (ours {o.dtype}, theirs {t.dtype})"
    if o.shape != t.shape:
        return f"shape differs (ours {list(o.shape or ())}, theirs {list(t.shape or ())}): never broadcast"
    if o.length != t.length:
        return (f"storage size differs (ours {o.length} bytes, theirs {t.length}: a view of a larger storage "
                "on one side): never broadcast")
    if strategy in ("task-arithmetic", "ties"):
        if b is None:
            return f"{strategy} needs the tensor in the merge base, which lacks it"
        if b.dtype != o.dtype or b.shape != o.shape or b.length != o.length:
            return f"{strategy}: the base version has another dtype or shape"
    if o.dtype in _FLOAT or o.dtype in _INT:
        return None
    if o.dtype in _COMPLEX and strategy != "ties":
        return None
    return f"{strategy} cannot combine {o.dtype} values"


def combine(strategy: str, opts: MergeOptions, dtype: str, ours: bytes, theirs: bytes, base: bytes | None
            ) -> bytes:
    """One tensor's merged bytes (flat element arrays of equal dtype and length)."""
    import torch

    td = _torch_dtype(dtype)
    work = torch.float64 if dtype in ("F64", *_INT) else torch.complex128 if dtype == "C128" else \
        torch.complex64 if dtype == "C64" else torch.float32
    o = tensor_from_bytes(ours, dtype).to(work)
    t = tensor_from_bytes(theirs, dtype).to(work)
    if strategy == "average":
        r = o * (1.0 - opts.weight) + t * opts.weight
    else:
        assert base is not None
        b = tensor_from_bytes(base, dtype).to(work)
        if strategy == "task-arithmetic":
            r = b + opts.lam * ((o - b) + (t - b))
        elif strategy == "ties":
            r = b + opts.lam * ties_merge([o - b, t - b], opts.density)
        else:
            raise InvalidArgument(f"not an arithmetic strategy: {strategy}")
    if dtype in _INT:
        info = torch.iinfo(td)
        r = torch.round(r).clamp(info.min, info.max)
    return _tensor_bytes(r.to(td))


def ties_merge(task_vectors: list[Any], density: float) -> Any:
    """TIES-merging of flat task vectors: trim to top-``density`` magnitude, elect sign, disjoint mean."""
    import torch

    trimmed = []
    for tv in task_vectors:
        n = tv.numel()
        k = max(1, math.ceil(density * n)) if n else 0
        if k >= n:
            trimmed.append(tv)
            continue
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.topk(tv.abs().reshape(-1), k, sorted=False).indices] = True
        trimmed.append(torch.where(keep.reshape(tv.shape), tv, torch.zeros_like(tv)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    num = (stacked * agree).sum(0)
    cnt = agree.sum(0)
    return torch.where(cnt > 0, num / cnt.clamp(min=1), torch.zeros_like(num))


# ------------------------------------------------------------------ helpers
_MISSING: Any = object()


@dataclass
class _Decision:
    kind: str  # "ours" | "theirs" | "merge" | "drop"
    strategy: str | None = None
    data: bytes | None = None  # merged bytes for kind == "merge"


def _mode3(b: TreeEntry | None, o: TreeEntry, t: TreeEntry) -> int:
    return t.mode if b is not None and o.mode == b.mode else o.mode


def _st_metadata(repo: Repository, m: Manifest | None) -> dict[str, str]:
    if m is None:
        return {}
    view = _view(repo, m)
    n = int.from_bytes(view.pread(0, 8), "little")
    meta = json.loads(view.pread(8, n)).get("__metadata__") or {}
    return dict(meta)


def _view(repo: Repository, m: Manifest) -> Any:
    from coralfs.reader import FileView

    return FileView(repo.objects, m)


def _pickle_of(repo: Repository, m: Manifest | None) -> bytes | None:
    """The ``data.pkl`` member of a torch.save zip (structure and non-tensor values; no tensor data)."""
    if m is None:
        return None
    try:
        with zipfile.ZipFile(FileReader(_view(repo, m))) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            return z.read(names[0]) if names else None
    except (zipfile.BadZipFile, OSError, KeyError):
        return None


def _walk_paths(obj: Any) -> dict[str, Any]:
    """path -> tensor for every tensor in a loaded checkpoint (first path wins), named like the manifest
    (``formats.torchpickle``): depth first, in order; a tensor at the empty path (the checkpoint is
    one tensor) is named by its storage's key, which torch.save numbers in this same order."""
    import torch

    out: dict[str, Any] = {}
    seen: set[int] = set()
    storages: dict[int, int] = {}  # storage -> its key in torch.save's numbering (order of first use)
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, torch.Tensor):
            key = storages.setdefault(_cdata(x), len(storages))
            out.setdefault(path or str(key), x)
            continue
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, Mapping):
            children = [(_join(path, k), v) for k, v in x.items()]
        elif isinstance(x, (list, tuple)):
            children = [(_join(path, i), v) for i, v in enumerate(x)]
        else:
            continue
        stack.extend(reversed(children))
    return out


def _has_tensor(x: Any) -> bool:
    import torch

    stack, seen = [x], set()
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            return True
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, Mapping):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return False


def _kind(x: Any) -> str:
    import torch

    if x is _MISSING:
        return "absent"
    if isinstance(x, torch.Tensor):
        return "a tensor"
    if isinstance(x, (Mapping, list, tuple)):
        return f"{_a(type(x).__name__)} of {len(x)}"
    return _a(type(x).__name__)


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _join(path: str, key: Any) -> str:
    try:
        k = key if isinstance(key, str) else str(key)
    except ValueError:  # an int past Python's digit limit: no manifest name has it either
        k = "?"
    return f"{path}.{k}" if path else k


def _cdata(t: Any) -> int:
    return int(t.untyped_storage()._cdata)


def _view_meta(t: Any) -> tuple:
    return (type(t), t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())


class _Side:
    """One version of a .pt checkpoint: its manifest, loaded object and storage -> segment name."""

    def __init__(self, manifest: Manifest, obj: Any, label: str) -> None:
        self.manifest = manifest
        self.obj = obj
        self.tensors = manifest.tensors()
        self.name_of: dict[int, str] = {}
        self.storage: dict[str, Any] = {}
        paths = _walk_paths(obj)
        for name, seg in self.tensors.items():
            t = paths.get(name)
            if t is None or t.untyped_storage().nbytes() != seg.length:
                raise CoralError(f"{label}: cannot match stored tensor {name!r} to the loaded checkpoint")
            self.name_of[_cdata(t)] = name
            self.storage[name] = t


# ------------------------------------------------------------------ the merger
class _Merger:
    def __init__(self, repo: Repository, opts: MergeOptions, labels: tuple[str, str, str]) -> None:
        self.repo = repo
        self.opts = opts
        self.labels = labels  # base, ours, theirs revision labels (for messages)
        self.conflicts: list[Conflict] = []
        self.resolved: list[Resolution] = []
        self.notes: list[str] = []
        self.files: dict[str, str] = {}

    def conflict(self, path: str, name: str | None, reason: str) -> None:
        self.conflicts.append(Conflict(path, name, reason))

    # -- trees
    def merge_trees(self, base: Mapping[str, TreeEntry], ours: Mapping[str, TreeEntry],
                    theirs: Mapping[str, TreeEntry]) -> dict[str, TreeEntry | None]:
        """Changes to apply to ours' tree (path -> entry, None deletes)."""
        changes: dict[str, TreeEntry | None] = {}
        for path in sorted(set(base) | set(ours) | set(theirs)):
            b, o, t = base.get(path), ours.get(path), theirs.get(path)
            if o == t or t == b:
                continue
            if o == b:
                changes[path] = t
                self.files[path] = "deleted (theirs)" if t is None else "added (theirs)" if o is None \
                    else "theirs"
                continue
            res = self.merge_file(path, b, o, t)
            if res is not _MISSING and res != o:
                changes[path] = res
        return changes

    # -- files
    def merge_file(self, path: str, b: TreeEntry | None, o: TreeEntry | None, t: TreeEntry | None) -> Any:
        if o is None or t is None:
            return self._file_level(path, o, t, "deleted on one side, changed on the other")
        if o.manifest == t.manifest:
            self.files[path] = "same content, mode merged"
            return TreeEntry(o.manifest, o.size, _mode3(b, o, t))
        if b is not None and b.manifest in (o.manifest, t.manifest):  # one side changed only the mode
            side = t if b.manifest == o.manifest else o
            self.files[path] = "content from " + ("theirs" if side is t else "ours") + ", mode merged"
            return TreeEntry(side.manifest, side.size, _mode3(b, o, t))
        mb = self.repo.get_manifest(b.manifest) if b is not None else None
        mo, mt = self.repo.get_manifest(o.manifest), self.repo.get_manifest(t.manifest)
        if is_checkpoint(mo) and is_checkpoint(mt) and mo.format == mt.format and \
                (mb is None or mb.format == mo.format):
            return self.merge_checkpoint(path, b, o, t, mb, mo, mt)
        if is_checkpoint(mo) or is_checkpoint(mt):
            why = "checkpoint formats differ between the versions"
        else:
            why = f"not a checkpoint (format {mo.format}): changed on both sides, merged at file level"
        return self._file_level(path, o, t, why)

    def _file_level(self, path: str, o: TreeEntry | None, t: TreeEntry | None, why: str) -> Any:
        s = self.opts.for_file(path)
        if s is None:
            self.conflict(path, None, why)
            return _MISSING
        self.resolved.append(Resolution(path, "(file)", s))
        self.files[path] = f"{s} (file-level: {why})"
        return o if s == "ours" else t

    # -- checkpoints
    def _decide(self, path: str, tb: dict[str, Segment], to: dict[str, Segment], tt: dict[str, Segment]
                ) -> dict[str, _Decision] | None:
        decisions: dict[str, _Decision] = {}
        n_conf = len(self.conflicts)
        for name in sorted(set(tb) | set(to) | set(tt)):
            b, o, t = tb.get(name), to.get(name), tt.get(name)
            kb, ko, kt = segment_key(b), segment_key(o), segment_key(t)
            if ko == kt or kt == kb:
                decisions[name] = _Decision("ours" if o is not None else "drop")
                continue
            if ko == kb:
                decisions[name] = _Decision("theirs" if t is not None else "drop")
                continue
            s = self.opts.for_name(name)
            if s in ("ours", "theirs"):
                keep = o if s == "ours" else t
                decisions[name] = _Decision(s if keep is not None else "drop", s)
                self.resolved.append(Resolution(path, name, s))
                continue
            if s is None:
                if o is None or t is None:
                    why = "deleted on one side, changed on the other"
                elif b is None:
                    why = "added on both sides with different values"
                elif o.dtype != t.dtype or o.shape != t.shape or o.length != t.length:
                    why = (f"changed on both sides, to different dtype/shape (ours {o.dtype}{list(o.shape or ())},"
                           f" theirs {t.dtype}{list(t.shape or ())})")
                else:
                    why = "changed on both sides"
                self.conflict(path, name, why)
                continue
            problem = arithmetic_problem(s, b, o, t)
            if problem is not None:
                self.conflict(path, name, problem)
                continue
            assert o is not None and t is not None
            data = combine(s, self.opts, o.dtype, segment_bytes(self.repo, o), segment_bytes(self.repo, t),
                           segment_bytes(self.repo, b) if b is not None else None)
            decisions[name] = _Decision("merge", s, data)
            self.resolved.append(Resolution(path, name, s))
        return decisions if len(self.conflicts) == n_conf else None

    def _value_strategy(self, path: str, name: str, ours: Any, theirs: Any) -> str | None:
        """Both sides changed a non-tensor value: 'ours' / 'theirs', or None (a conflict, recorded)."""
        s = self.opts.for_name(name)
        if s is None:
            self.conflict(path, name, f"non-tensor value changed on both sides (ours {_short(ours)}, "
                                      f"theirs {_short(theirs)})")
            return None
        if s != "theirs":
            self.notes.append(f"{path} [{name}]: non-tensor value changed on both sides; kept ours "
                              f"({_short(ours)}; theirs {_short(theirs)})")
            s = "ours"
        self.resolved.append(Resolution(path, name, s))
        return s

    def merge_checkpoint(self, path: str, b: TreeEntry | None, o: TreeEntry, t: TreeEntry,
                         mb: Manifest | None, mo: Manifest, mt: Manifest) -> Any:
        tb = mb.tensors() if mb is not None else {}
        to, tt = mo.tensors(), mt.tensors()
        decisions = self._decide(path, tb, to, tt)
        if decisions is None:
            return _MISSING
        mode = _mode3(b, o, t)
        all_ours = all(d.kind == "ours" or (d.kind == "drop" and n not in to) for n, d in decisions.items())
        all_theirs = all(d.kind == "theirs" or (d.kind == "drop" and n not in tt) or
                         (d.kind == "ours" and segment_key(to.get(n)) == segment_key(tt.get(n)))
                         for n, d in decisions.items())
        n_merged = sum(1 for d in decisions.values() if d.kind == "merge")
        n_theirs = sum(1 for n, d in decisions.items() if d.kind == "theirs" or (d.kind == "drop" and n in to))
        if mo.format == "safetensors":
            meta_b, meta_o, meta_t = _st_metadata(self.repo, mb), _st_metadata(self.repo, mo), \
                _st_metadata(self.repo, mt)
            meta = self._merge_mapping(path, meta_b, meta_o, meta_t)
            if meta is None:
                return _MISSING
            if all_ours and meta == meta_o:
                self.files[path] = "ours (tensors unchanged)"
                return TreeEntry(o.manifest, o.size, mode)
            if all_theirs and meta == meta_t:
                self.files[path] = "theirs"
                return TreeEntry(t.manifest, t.size, mode)
            data = self._rebuild_safetensors(decisions, to, tt, meta)
        else:
            pb, po, pt = _pickle_of(self.repo, mb), _pickle_of(self.repo, mo), _pickle_of(self.repo, mt)
            if all_ours and po is not None and pt in (pb, po):
                self.files[path] = "ours (tensors unchanged)"
                return TreeEntry(o.manifest, o.size, mode)
            if all_theirs and pt is not None and po in (pb, pt):
                self.files[path] = "theirs"
                return TreeEntry(t.manifest, t.size, mode)
            data = self._rebuild_pt(path, decisions, b, o, t, mb, mo, mt)
            if data is None:
                return _MISSING
        mid, manifest, _ = self.repo.ingest_buffer(memoryview(data), path, o)
        self.files[path] = f"rebuilt: {n_theirs} tensor(s) from theirs, {n_merged} merged by strategy"
        return TreeEntry(mid, manifest.size, mode)

    def _merge_mapping(self, path: str, b: dict[str, str], o: dict[str, str], t: dict[str, str]
                       ) -> dict[str, str] | None:
        out = dict(o)
        ok = True
        for k in sorted(set(b) | set(o) | set(t)):
            bv, ov, tv = b.get(k, _MISSING), o.get(k, _MISSING), t.get(k, _MISSING)
            if ov == tv or tv == bv:
                continue
            if ov == bv:
                chosen = tv
            else:
                s = self._value_strategy(path, f"__metadata__.{k}", ov, tv)
                if s is None:
                    ok = False
                    continue
                chosen = ov if s == "ours" else tv
            if chosen is _MISSING:
                out.pop(k, None)
            else:
                out[k] = chosen
        return out if ok else None

    def _rebuild_safetensors(self, decisions: dict[str, _Decision], to: dict[str, Segment],
                             tt: dict[str, Segment], meta: dict[str, str]) -> bytes:
        from safetensors.torch import save

        tensors = {}
        for name, d in decisions.items():
            if d.kind == "drop":
                continue
            seg = tt[name] if d.kind == "theirs" else to[name]
            raw = d.data if d.kind == "merge" else segment_bytes(self.repo, seg)
            assert raw is not None
            tensors[name] = tensor_from_bytes(raw, seg.dtype, seg.shape)
        return save(tensors, metadata=meta or None)

    # -- .pt
    def _rebuild_pt(self, path: str, decisions: dict[str, _Decision], b: TreeEntry | None, o: TreeEntry,
                    t: TreeEntry, mb: Manifest | None, mo: Manifest, mt: Manifest) -> bytes | None:
        import io

        import torch

        lb, lo, lt = (f"{lab}:{path}" for lab in self.labels)
        try:
            so = _Side(mo, load_weights_only(FileReader(_view(self.repo, mo)), lo), lo)
            st = _Side(mt, load_weights_only(FileReader(_view(self.repo, mt)), lt), lt)
            sb = _Side(mb, load_weights_only(FileReader(_view(self.repo, mb)), lb), lb) if mb is not None else None
        except CheckpointLoadError:
            raise  # a clear error naming the file
        except CoralError as e:
            self.conflict(path, None, f"cannot merge tensor by tensor ({e}); merge at file level with a "
                                      "--strategy-for rule for this path")
            return None
        for name, d in decisions.items():  # merged values go into ours' storages, in place
            if d.kind == "merge":
                assert d.data is not None
                storage = so.storage[name].untyped_storage()
                dst = torch.empty(0, dtype=torch.uint8)
                dst.set_(storage, 0, (storage.nbytes(),), (1,))
                dst.copy_(torch.frombuffer(bytearray(d.data), dtype=torch.uint8))
        n_conf = len(self.conflicts)
        ctx = _PtMerge(self, path, decisions, sb, so, st)
        result = ctx.merge("", sb.obj if sb is not None else _MISSING, so.obj, st.obj)
        if len(self.conflicts) != n_conf:
            return None
        buf = io.BytesIO()
        torch.save(result, buf)
        return buf.getvalue()


def _short(v: Any) -> str:
    if v is _MISSING:
        return "absent"
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


class _PtMerge:
    """Three-way merge of loaded .pt object trees; tensors follow the per-storage decisions."""

    def __init__(self, m: _Merger, path: str, decisions: dict[str, _Decision], b: _Side | None, o: _Side,
                 t: _Side) -> None:
        self.m = m
        self.path = path
        self.decisions = decisions
        self.b, self.o, self.t = b, o, t

    def _seg_key(self, side: _Side | None, x: Any) -> Any:
        if side is None:
            return None
        if x.untyped_storage().nbytes() == 0:
            return ("empty",)
        name = side.name_of.get(_cdata(x))
        return segment_key(side.tensors[name]) if name is not None else ("unknown", _cdata(x))

    def same(self, x: Any, sx: _Side | None, y: Any, sy: _Side | None) -> bool:
        import torch

        if x is _MISSING or y is _MISSING:
            return x is y
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and \
                _view_meta(x) == _view_meta(y) and self._seg_key(sx, x) == self._seg_key(sy, y)
        if type(x) is not type(y):
            return False
        if isinstance(x, Mapping):
            return list(x) == list(y) and all(self.same(x[k], sx, y[k], sy) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(self.same(a, sx, c, sy) for a, c in zip(x, y, strict=True))
        if isinstance(x, float) and math.isnan(x) and math.isnan(y):
            return True
        try:
            return bool(x == y)
        except Exception:
            return False

    def merge(self, path: str, b: Any, o: Any, t: Any) -> Any:
        import torch

        if isinstance(o, torch.Tensor) and isinstance(t, torch.Tensor):
            return self._tensor(path, b, o, t)
        if isinstance(o, Mapping) and isinstance(t, Mapping) and (b is _MISSING or isinstance(b, Mapping)):
            return self._mapping(path, b, o, t)  # a dict and an OrderedDict merge key by key (ours' type)
        if isinstance(o, (list, tuple)) and type(o) is type(t) and len(o) == len(t) and type(o) in (list, tuple) \
                and (b is _MISSING or (type(b) is type(o) and len(b) == len(o))):
            items = [self.merge(_join(path, i), b[i] if b is not _MISSING else _MISSING, o[i], t[i])
                     for i in range(len(o))]
            return type(o)(items)
        return self._leaf(path, b, o, t)

    def _leaf(self, path: str, b: Any, o: Any, t: Any) -> Any:
        if self.same(o, self.o, t, self.t) or (b is not _MISSING and self.same(b, self.b, t, self.t)):
            return o
        if b is not _MISSING and self.same(b, self.b, o, self.o):
            return t
        if _has_tensor(o) or _has_tensor(t):
            return self._both_changed_tensors(path, o, t)
        s = self.m._value_strategy(self.path, path or "(root)", o, t)
        return t if s == "theirs" else o

    def _both_changed_tensors(self, path: str, o: Any, t: Any) -> Any:
        """Both sides changed a value that holds tensors, in a way the tensor-by-tensor merge cannot
        pair up (another container type or length, a tensor against a plain value, a tensor that
        moved to another storage). Keeping ours would silently drop theirs' tensors: only an
        explicit ours/theirs rule settles it, anything else is a conflict naming it."""
        name = path or "(root)"
        s = self.m.opts.for_name(name)
        if s in ("ours", "theirs"):
            self.m.resolved.append(Resolution(self.path, name, s))
            return o if s == "ours" else t
        why = (f"changed on both sides and holds tensors that cannot be merged one by one (ours {_kind(o)}, "
               f"theirs {_kind(t)})")
        if s is not None:
            why += f"; {s} applies to tensors only: resolve with --strategy-for '{name}=ours' or '=theirs'"
        self.m.conflict(self.path, name, why)
        return o

    def _mapping(self, path: str, b: Any, o: Mapping, t: Mapping) -> Any:
        res = copy.copy(o)  # keeps the type and attributes (an OrderedDict's _metadata)
        res.clear()  # type: ignore[attr-defined]
        for k in list(o) + [k for k in t if k not in o]:
            bv = b.get(k, _MISSING) if b is not _MISSING else _MISSING
            ov, tv = o.get(k, _MISSING), t.get(k, _MISSING)
            p = _join(path, k)
            if ov is _MISSING or tv is _MISSING:
                present, side = (tv, self.t) if ov is _MISSING else (ov, self.o)
                if bv is _MISSING:
                    res[k] = present  # added on one side
                elif self.same(bv, self.b, present, side):
                    pass  # deleted on the other side, unchanged here
                elif _has_tensor(present) or _has_tensor(bv):
                    chosen = self._both_changed_tensors(p, ov, tv)
                    if chosen is not _MISSING:
                        res[k] = chosen
                else:
                    s = self.m._value_strategy(self.path, p, ov, tv)
                    chosen = ov if s == "ours" else tv if s == "theirs" else _MISSING
                    if chosen is not _MISSING:
                        res[k] = chosen
                continue
            res[k] = self.merge(p, bv, ov, tv)
        return res

    def _tensor(self, path: str, b: Any, o: Any, t: Any) -> Any:
        import torch

        no = self.o.name_of.get(_cdata(o)) if o.untyped_storage().nbytes() else None
        nt = self.t.name_of.get(_cdata(t)) if t.untyped_storage().nbytes() else None
        if no is None or nt is None or no != nt:
            return self._leaf(path, b, o, t)  # empty, or storages named differently: compare as values
        d = self.decisions.get(no)
        if d is None or d.kind == "drop":
            return self._leaf(path, b, o, t)
        pick, other = (t, o) if d.kind == "theirs" else (o, t)
        if _view_meta(o) == _view_meta(t):
            return pick
        b_ok = isinstance(b, torch.Tensor) and _view_meta(b) == _view_meta(other)
        if b_ok:
            return pick  # only pick's side changed how the tensor views its storage
        self.m.conflict(self.path, path, "the tensor's shape/stride/offset (view) changed on both sides")
        return o


# ------------------------------------------------------------------ branch moves & work tree
# ------------------------------------------------------------------ merge
def merge(repo: Repository, theirs: str | bytes, branch: str | None = None, options: MergeOptions | None = None,
          message: str | None = None, author: str | None = None, metrics: Mapping[str, float] | None = None,
          meta: Mapping[str, str] | None = None, fast_forward: bool = True, update_worktree: bool = False,
          progress: Any = None) -> MergeResult:
    """Merge revision ``theirs`` into ``branch`` (default: the current branch).

    Raises ``MergeConflicts`` (nothing changed) when tensors or files conflict and no
    strategy resolves them. ``update_worktree``: when ``branch`` is checked out, require a
    clean work tree and update it after the merge (the CLI does this)."""
    opts = options or MergeOptions()
    if branch is None:
        branch = repo.current_branch()
        if branch is None:
            raise InvalidArgument("HEAD is detached: check out the branch to merge into")
    ours_id = repo.branch_head(branch)
    if ours_id is None:
        raise UnknownRevision(f"branch {branch!r} has no commits")
    theirs_label = theirs if isinstance(theirs, str) else theirs.hex()[:12]
    theirs_id = theirs if isinstance(theirs, bytes) else repo.resolve(theirs)
    if update_worktree:
        require_clean(repo, branch)
    ours_anc = repo.ancestors([ours_id])
    if theirs_id in ours_anc:
        return MergeResult("up-to-date", branch, ours_id, theirs_id, theirs_id, ours_id)
    base = merge_base(repo, ours_id, theirs_id)
    if base == ours_id and fast_forward:
        ours_entries = repo.tree(ours_id).entries
        new_paths = [p for p, e in repo.tree(theirs_id).entries.items() if ours_entries.get(p) != e]
        if update_worktree:
            check_untracked(repo, branch, new_paths)

        def ff() -> bytes:
            repo.set_branch(branch, theirs_id, ours_id)
            return theirs_id

        advance_branch(repo, branch, ours_id, ff, update_worktree, progress)
        return MergeResult("fast-forward", branch, ours_id, theirs_id, base, theirs_id,
                           files={p: "theirs" for p in sorted(new_paths)})
    merger = _Merger(repo, opts, (base.hex()[:12] if base else "base", branch, theirs_label))
    result = MergeResult("merged", branch, ours_id, theirs_id, base)
    if base is None:
        result.notes.append("no common ancestor: merging unrelated histories against an empty base")
    with repo.writing():
        changes = merger.merge_trees(repo.tree(base).entries if base else {}, repo.tree(ours_id).entries,
                                     repo.tree(theirs_id).entries)
        if merger.conflicts:
            raise MergeConflicts(merger.conflicts, branch)
        if update_worktree:
            check_untracked(repo, branch, [p for p, e in changes.items() if e is not None])
        commit_meta = {"merge.base": base.hex() if base else "", "merge.theirs": theirs_label}
        if merger.resolved:
            commit_meta["merge.options"] = json.dumps(opts.to_json(), sort_keys=True)
        commit_meta.update(meta or {})
        msg = message or f"Merge {theirs_label} into {branch}"

        def commit() -> bytes:
            return repo.commit_changes(branch, changes, msg, metrics=metrics, meta=commit_meta, author=author,
                                       expected_head=ours_id, parents_extra=(theirs_id,))

        result.commit = advance_branch(repo, branch, ours_id, commit, update_worktree, progress)
    result.files, result.resolved, result.notes = merger.files, merger.resolved, result.notes + merger.notes
    return result
