"""Model-aware diff between two revisions, and the best commit by a metric.

``diff(repo, a, b, paths)`` compares two revisions file by file and, inside
checkpoints (safetensors and torch.save zips), tensor by tensor.

Change detection is exact and free: a tensor is unchanged when its dtype, shape and
chunk ids are equal (chunk ids are hashes of the raw bytes, so one flipped bit makes
the tensor "changed"). Unchanged files and unchanged tensors are never decoded.

For a changed tensor the numbers are computed in float64, streaming piece by piece
(a piece is one stored chunk, a few MiB), so a huge tensor is never held twice:

- ``changed_fraction``: elements whose bit pattern differs / elements (exact);
- ``l2``: ||b - a||_2 and ``rel_l2`` = ||b - a|| / ||a||;
- ``max_abs``: max |b - a|;
- ``cosine``: a.b / (||a|| ||b||).

Element types: F64/F32/F16, BF16 (the uint16 view shifted into float32: numpy has no
bfloat16), F8_E4M3/F8_E5M2 (lookup tables), signed/unsigned integers and BOOL (as
numbers), complex (each real/imaginary component counts as one element). Other
types are compared byte by byte (changed fraction only, no numbers).

torch.save zips: a tensor segment is a whole *storage*. A storage can back several
tensors (views, tied weights); the segment is named after the first tensor that uses
it and carries that tensor's shape. The numbers are computed over the raw storage
elements (which, for the usual state dict, are exactly the tensor's elements).
Names of nested values come from the manifest (``optimizer.state.0.exp_avg``).

Summary numbers: ``tensors_changed`` counts tensors that were added, removed, changed
or changed dtype/shape; ``params_changed`` counts elements whose bits differ, plus
every element of an added, removed or retyped/reshaped tensor; ``bytes_differ`` is
the same count in bytes (elements x element width).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from coralfs.repository import Repository
from coralfs.store.objects import Commit, Manifest, Piece, Segment, TreeEntry

CHECKPOINT_FORMATS = ("safetensors", "torch-zip")

# dtype name -> numpy little-endian dtype of one element (complex: of one component)
_NUMPY: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "u1",
    "C64": "<f4", "C128": "<f8",
}
_UINT = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}


def _f8_table(exp_bits: int, man_bits: int, bias: int, fn: bool) -> np.ndarray:
    """The 256 float values of an 8-bit float format (fn: no infinities, only one NaN pattern)."""
    out = np.empty(256, dtype=np.float64)
    emax = (1 << exp_bits) - 1
    for b in range(256):
        s = -1.0 if b & 0x80 else 1.0
        e = (b >> man_bits) & emax
        m = b & ((1 << man_bits) - 1)
        if fn and e == emax and m == (1 << man_bits) - 1:
            v = math.nan
        elif not fn and e == emax:
            v = math.inf if m == 0 else math.nan
        elif e == 0:
            v = m / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        out[b] = s * v
    return out


_F8 = {"F8_E4M3": _f8_table(4, 3, 7, True), "F8_E5M2": _f8_table(5, 2, 15, False)}


def element_width(dtype: str, width: int) -> int:
    """Bytes per element used for bit comparison and counting."""
    if dtype in _NUMPY:
        return np.dtype(_NUMPY[dtype]).itemsize
    if dtype == "BF16":
        return 2
    if dtype in _F8:
        return 1
    return width if width in _UINT else 1


def has_numbers(dtype: str) -> bool:
    return dtype in _NUMPY or dtype == "BF16" or dtype in _F8


def to_float64(raw: bytes | memoryview, dtype: str) -> np.ndarray:
    """Raw little-endian element bytes -> float64 array (one value per element/component)."""
    if dtype == "BF16":
        u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32).astype(np.float64)
    if dtype in _F8:
        return _F8[dtype][np.frombuffer(raw, dtype=np.uint8)]
    return np.frombuffer(raw, dtype=_NUMPY[dtype]).astype(np.float64)


# ------------------------------------------------------------------ results
@dataclass
class TensorDiff:
    """One tensor (for torch zips: one storage) of a checkpoint.

    ``status``: added | removed | changed | dtype-changed | shape-changed | unchanged."""

    name: str
    status: str
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None
    numel: int = 0
    changed_elements: int = 0
    changed_fraction: float | None = None
    l2: float | None = None
    rel_l2: float | None = None
    max_abs: float | None = None
    cosine: float | None = None
    norm_a: float | None = None
    norm_b: float | None = None
    bytes_differ: int = 0
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: _json_num(v) for k, v in asdict(self).items()}


@dataclass
class FileDiff:
    """One path. ``status``: added | removed | changed | unchanged; ``kind``: checkpoint | file."""

    path: str
    status: str
    kind: str = "file"
    format_a: str | None = None
    format_b: str | None = None
    size_a: int | None = None
    size_b: int | None = None
    mode_a: int | None = None
    mode_b: int | None = None
    tensors: list[TensorDiff] = field(default_factory=list)
    note: str | None = None

    @property
    def changed_tensors(self) -> list[TensorDiff]:
        return [t for t in self.tensors if t.status != "unchanged"]

    @property
    def params_changed(self) -> int:
        return sum(_params_changed(t) for t in self.tensors)

    @property
    def bytes_differ(self) -> int:
        return sum(t.bytes_differ for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "tensors"}
        d["tensors"] = [t.to_json() for t in self.tensors]
        d["tensors_changed"] = len(self.changed_tensors)
        d["tensors_unchanged"] = len(self.tensors) - len(self.changed_tensors)
        d["params_changed"] = self.params_changed
        d["bytes_differ"] = self.bytes_differ
        return d


@dataclass
class DiffResult:
    rev_a: str
    rev_b: str
    commit_a: bytes
    commit_b: bytes
    files: list[FileDiff] = field(default_factory=list)

    @property
    def changed_files(self) -> list[FileDiff]:
        return [f for f in self.files if f.status != "unchanged"]

    def summary(self) -> dict[str, int]:
        count = {s: sum(1 for f in self.files if f.status == s) for s in ("added", "removed", "changed",
                                                                          "unchanged")}
        return {
            "files_added": count["added"], "files_removed": count["removed"], "files_changed": count["changed"],
            "files_unchanged": count["unchanged"],
            "tensors_changed": sum(len(f.changed_tensors) for f in self.files),
            "params_changed": sum(f.params_changed for f in self.files),
            "bytes_differ": sum(f.bytes_differ for f in self.files),
        }

    def to_json(self) -> dict[str, Any]:
        return {"a": self.rev_a, "b": self.rev_b, "commit_a": self.commit_a.hex(), "commit_b": self.commit_b.hex(),
                "files": [f.to_json() for f in self.files], "summary": self.summary()}


def _params_changed(t: TensorDiff) -> int:
    return t.changed_elements if t.status == "changed" else (t.numel if t.status != "unchanged" else 0)


def _json_num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


# ------------------------------------------------------------------ tensors
def segment_key(seg: Segment | None) -> tuple | None:
    """Equal keys <=> equal tensor (dtype, shape and bytes); no decoding."""
    if seg is None:
        return None
    return (seg.dtype, seg.shape, tuple((p.length, p.chunk, p.inline) for p in seg.pieces))


def _piece_bytes(repo: Repository, p: Piece) -> bytes:
    if p.inline is not None:
        return p.inline
    assert p.chunk is not None
    return repo.objects.get_chunk(p.chunk)


def segment_bytes(repo: Repository, seg: Segment) -> bytes:
    """A tensor segment's raw bytes (the whole tensor, or the whole storage for torch zips)."""
    return b"".join(_piece_bytes(repo, p) for p in seg.pieces)


def _windows(seg_a: Segment, seg_b: Segment) -> Iterator[tuple[Piece, int, int, Piece, int, int]]:
    """Split two equally long segments into windows that each lie inside one piece of each side.

    Yields (piece_a, lo_a, hi_a, piece_b, lo_b, hi_b): byte ranges inside the pieces."""
    ia = ib = 0
    oa = ob = 0  # offsets of the current pieces
    pos = 0
    total = seg_a.length
    while pos < total:
        pa, pb = seg_a.pieces[ia], seg_b.pieces[ib]
        end = min(oa + pa.length, ob + pb.length)
        yield pa, pos - oa, end - oa, pb, pos - ob, end - ob
        pos = end
        if pos == oa + pa.length:
            oa += pa.length
            ia += 1
        if pos == ob + pb.length:
            ob += pb.length
            ib += 1


class _Stats:
    """float64 accumulators for one tensor's difference, fed window by window."""

    def __init__(self, numeric: bool) -> None:
        self.numeric = numeric
        self.changed = 0
        self.d2 = 0.0
        self.a2 = 0.0
        self.b2 = 0.0
        self.ab = 0.0
        self.max_abs = 0.0

    def add_same(self, raw: bytes | memoryview, dtype: str) -> None:
        if not self.numeric:
            return
        a = to_float64(raw, dtype)
        s = float(np.dot(a, a))
        self.a2 += s
        self.b2 += s
        self.ab += s

    def add(self, ra: bytes | memoryview, rb: bytes | memoryview, dtype: str, ew: int) -> None:
        ua = np.frombuffer(ra, dtype=_UINT[ew])
        ub = np.frombuffer(rb, dtype=_UINT[ew])
        diff_mask = ua != ub
        self.changed += int(np.count_nonzero(diff_mask))
        if not self.numeric:
            return
        a = to_float64(ra, dtype)
        b = to_float64(rb, dtype)
        d = b - a
        d[diff_mask == 0] = 0.0  # equal bits are equal values (also for NaN payloads)
        self.d2 += float(np.dot(d, d))
        if d.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))
        self.a2 += float(np.dot(a, a))
        self.b2 += float(np.dot(b, b))
        self.ab += float(np.dot(a, b))


def _changed_tensor(repo: Repository, name: str, sa: Segment, sb: Segment) -> TensorDiff:
    """Numbers for two segments of equal dtype and length, streaming window by window."""
    dtype = sa.dtype
    ew = element_width(dtype, sa.width)
    numeric = has_numbers(dtype)
    if sa.length % ew:
        ew, numeric = 1, False
    numel = sa.length // ew
    st = _Stats(numeric)
    for pa, la, ha, pb, lb, hb in _windows(sa, sb):
        if pa.chunk is not None and pa.chunk == pb.chunk and (la, ha) == (lb, hb):
            st.add_same(memoryview(_piece_bytes(repo, pa))[la:ha], dtype)  # equal bits: one side is enough
            continue
        st.add(memoryview(_piece_bytes(repo, pa))[la:ha], memoryview(_piece_bytes(repo, pb))[lb:hb], dtype, ew)
    td = TensorDiff(name, "changed" if st.changed else "unchanged", sa.dtype, sb.dtype, _shape(sa), _shape(sb),
                    numel=numel, changed_elements=st.changed,
                    changed_fraction=st.changed / numel if numel else 0.0, bytes_differ=st.changed * ew)
    if numeric:
        na, nb = math.sqrt(st.a2), math.sqrt(st.b2)
        td.l2 = math.sqrt(st.d2)
        td.norm_a, td.norm_b = na, nb
        td.rel_l2 = td.l2 / na if na > 0 else (0.0 if td.l2 == 0 else math.inf)
        td.max_abs = st.max_abs
        td.cosine = st.ab / (na * nb) if na > 0 and nb > 0 else (1.0 if st.changed == 0 else None)
        if td.cosine is not None and math.isfinite(td.cosine):
            td.cosine = max(-1.0, min(1.0, td.cosine))
    else:
        td.note = f"dtype {dtype}: compared bit patterns only (no numbers)"
    return td


def _shape(seg: Segment | None) -> list[int] | None:
    return list(seg.shape) if seg is not None and seg.shape is not None else None


def _numel(seg: Segment) -> int:
    ew = element_width(seg.dtype, seg.width)
    return seg.length // ew if seg.length % ew == 0 else seg.length


def diff_tensors(repo: Repository, ta: dict[str, Segment], tb: dict[str, Segment]) -> list[TensorDiff]:
    """Per-tensor comparison of two manifests' tensors (name -> segment), in name order."""
    out: list[TensorDiff] = []
    for name in sorted(set(ta) | set(tb)):
        sa, sb = ta.get(name), tb.get(name)
        if sa is None:
            assert sb is not None
            out.append(TensorDiff(name, "added", None, sb.dtype, None, _shape(sb), numel=_numel(sb),
                                  bytes_differ=sb.length))
        elif sb is None:
            out.append(TensorDiff(name, "removed", sa.dtype, None, _shape(sa), None, numel=_numel(sa),
                                  bytes_differ=sa.length))
        elif segment_key(sa) == segment_key(sb):
            out.append(TensorDiff(name, "unchanged", sa.dtype, sb.dtype, _shape(sa), _shape(sb), numel=_numel(sa),
                                  changed_fraction=0.0))
        elif sa.dtype != sb.dtype:
            out.append(TensorDiff(name, "dtype-changed", sa.dtype, sb.dtype, _shape(sa), _shape(sb),
                                  numel=max(_numel(sa), _numel(sb)), bytes_differ=max(sa.length, sb.length)))
        elif sa.shape != sb.shape or sa.length != sb.length:
            out.append(TensorDiff(name, "shape-changed", sa.dtype, sb.dtype, _shape(sa), _shape(sb),
                                  numel=max(_numel(sa), _numel(sb)), bytes_differ=max(sa.length, sb.length)))
        else:
            out.append(_changed_tensor(repo, name, sa, sb))
    return out


# ------------------------------------------------------------------ files
def is_checkpoint(m: Manifest | None) -> bool:
    return m is not None and m.format in CHECKPOINT_FORMATS and any(s.kind == "tensor" for s in m.segments)


def diff_file(repo: Repository, path: str, ea: TreeEntry | None, eb: TreeEntry | None) -> FileDiff:
    if ea is not None and eb is not None and ea == eb:
        return FileDiff(path, "unchanged", size_a=ea.size, size_b=eb.size, mode_a=ea.mode, mode_b=eb.mode)
    ma = repo.get_manifest(ea.manifest) if ea is not None else None
    mb = repo.get_manifest(eb.manifest) if eb is not None else None
    status = "added" if ea is None else "removed" if eb is None else "changed"
    fd = FileDiff(path, status, format_a=ma.format if ma else None, format_b=mb.format if mb else None,
                  size_a=ea.size if ea else None, size_b=eb.size if eb else None,
                  mode_a=ea.mode if ea else None, mode_b=eb.mode if eb else None)
    ck_a, ck_b = is_checkpoint(ma), is_checkpoint(mb)
    if (ma is None or ck_a) and (mb is None or ck_b):
        fd.kind = "checkpoint"
        fd.tensors = diff_tensors(repo, ma.tensors() if ma else {}, mb.tensors() if mb else {})
        if status == "changed":
            if ea is not None and eb is not None and ea.manifest == eb.manifest:
                fd.note = "only the file mode changed"
            elif not fd.changed_tensors:
                fd.note = "tensors are identical; only non-tensor bytes changed (header, metadata or pickle)"
        return fd
    if status == "changed":
        if ea is not None and eb is not None and ea.manifest == eb.manifest:
            fd.note = "only the file mode changed"
        else:
            fmts = {f for f in (fd.format_a, fd.format_b) if f}
            what = "not a checkpoint" if not (ck_a or ck_b) else "a checkpoint on one side only"
            fd.note = f"{what} (format {'/'.join(sorted(fmts))}): compared as whole files"
    return fd


def _in_paths(path: str, paths: Sequence[str] | None) -> bool:
    if not paths:
        return True
    for p in paths:
        p = p.strip("/")
        if not p or path == p or path.startswith(p + "/"):
            return True
    return False


def diff(repo: Repository, a: str | bytes, b: str | bytes, paths: Iterable[str] | None = None) -> DiffResult:
    """Compare revision ``a`` (old) with ``b`` (new), optionally only under ``paths``."""
    ca = a if isinstance(a, bytes) else repo.resolve(a)
    cb = b if isinstance(b, bytes) else repo.resolve(b)
    plist = list(paths) if paths is not None else None
    ta, tb = repo.tree(ca).entries, repo.tree(cb).entries
    res = DiffResult(a if isinstance(a, str) else a.hex(), b if isinstance(b, str) else b.hex(), ca, cb)
    for path in sorted(set(ta) | set(tb)):
        if _in_paths(path, plist):
            res.files.append(diff_file(repo, path, ta.get(path), tb.get(path)))
    return res


# ------------------------------------------------------------------ metrics
@dataclass
class BestCommit:
    commit_id: bytes
    commit: Commit
    value: float
    source: str  # "commit" or "tag NAME"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.commit_id.hex(), "value": self.value, "source": self.source,
                "message": self.commit.message, "time": self.commit.time, "metrics": self.commit.metrics}


def best_commit(repo: Repository, metric: str, mode: str = "max", rev: str | bytes | None = "HEAD"
                ) -> BestCommit | None:
    """The commit with the best value of ``metric`` among the commits reachable from ``rev``.

    ``rev=None``: reachable from any branch, tag or HEAD. A commit's value comes from its
    own metrics, or from a tag on it that carries the metric. ``mode`` is ``max`` or ``min``;
    ties go to the newest commit. NaN values are ignored. None when no commit has the metric."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    if rev is None:
        ids = repo.reachable_commits()
        commits = sorted(((cid, repo.get_commit(cid)) for cid in ids), key=lambda x: -x[1].time)
    else:
        commits = repo.log(rev)
    tag_values: dict[bytes, list[tuple[str, float]]] = {}
    for name, tag in sorted(repo.tags().items()):
        if metric in tag.metrics:
            tag_values.setdefault(tag.commit, []).append((name, float(tag.metrics[metric])))
    best: BestCommit | None = None
    sign = 1.0 if mode == "max" else -1.0
    for cid, c in commits:
        cands: list[tuple[str, float]] = []
        if metric in c.metrics:
            cands.append(("commit", float(c.metrics[metric])))
        cands += [(f"tag {n}", v) for n, v in tag_values.get(cid, [])]
        for src, v in cands:
            if math.isnan(v):
                continue
            if best is None or sign * v > sign * best.value:
                best = BestCommit(cid, c, v, src)
    return best
