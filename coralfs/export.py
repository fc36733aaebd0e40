"""Checkpoint format export (safetensors <-> torch .pt) and importing a model directory.

Export (``export_file``)
------------------------
- ``.pt`` -> safetensors: the file is loaded with torch's weights-only loader
  (``torch.load(weights_only=True)``; never full unpickling). Nested containers are
  flattened with ``.`` (``{"model": {"fc.weight": t}}`` -> ``model.fc.weight``; list and
  tuple items by index), the same names the manifest uses. Non-contiguous views and
  tensors that share a storage are written as their own contiguous copies (same
  element values, bit for bit). **Non-tensor values** (a step counter, optimizer
  hyper-parameters, ...) are written into the safetensors metadata as JSON strings under
  their flattened name (a container holding no tensors is one JSON value); a value that
  JSON cannot represent is an error naming it. With ``strict=True`` any non-tensor value
  is an error. ``format: pt`` is added to the metadata unless present (transformers
  expects it).
- safetensors -> ``.pt``: a flat ``{name: tensor}`` state dict written by ``torch.save``.
  The safetensors metadata has no place in a state dict and is dropped (reported in
  ``ExportResult.dropped_metadata``).
- Same format in and out: the stored bytes are copied verbatim.

A file that is not a checkpoint (no tensors coralfs or torch can find in it: a config, a
truncated or foreign file stored as plain bytes) raises ``NotACheckpoint`` (exit 11), and
so does a checkpoint the weights-only loader refuses (arbitrary pickled objects:
``CheckpointLoadError``), naming the file. Exit 9 stays reserved for corruption.

Import (``import_dir``)
-----------------------
Commits a directory (e.g. a Hugging Face model folder: config, tokenizer, sharded
weights) as it is, in ONE commit: every file is ingested straight from its source
path (no copy into the work tree) and ``commit_changes`` records them on the branch
with a compare-and-swap on its head. Symlinks inside the directory are not followed
and not stored (skipped, listed in ``ImportResult.skipped``; the CLI prints a warning
for each): a model directory must not pull in content from elsewhere.
"""

from __future__ import annotations

import errno
import fnmatch
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coralfs.errors import (
    CheckpointLoadError,
    CoralError,
    InvalidArgument,
    NoSpace,
    NotACheckpoint,
    NothingToCommit,
    PathNotFound,
)
from coralfs.repository import Repository
from coralfs.store.objects import TreeEntry, check_path
from coralfs.worktree import advance_branch, check_untracked, require_clean
from coralfs.worktree_fs import WorkTree

FORMATS = ("safetensors", "pt")


def load_weights_only(data: bytes | io.RawIOBase | Any, name: str) -> Any:
    """``torch.load(..., weights_only=True)`` on bytes or a seekable file; a clear error naming ``name``."""
    import torch

    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # the loader raises UnpicklingError, RuntimeError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointLoadError(
            f"{name}: not loadable with torch's weights-only loader (it may hold arbitrary Python objects, "
            f"which coralfs never unpickles): {first}") from None


def _fmt_of(path: str, explicit: str | None) -> str:
    if explicit:
        if explicit not in FORMATS:
            raise InvalidArgument(f"unknown format {explicit!r} (use safetensors or pt)")
        return explicit
    return "safetensors" if path.endswith(".safetensors") else "pt"


# ------------------------------------------------------------------ flatten
def _count_tensors(obj: Any) -> int:
    import torch

    n, stack, seen = 0, [obj], set()
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            n += 1
        elif id(x) not in seen:
            seen.add(id(x))
            if isinstance(x, Mapping):
                stack.extend(x.values())
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
    return n


def flatten_state(obj: Any, strict: bool = False, name: str = "checkpoint"
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    """A loaded checkpoint -> ({flat name: tensor}, {flat name: JSON string of a non-tensor value})."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    bad: list[str] = []

    def has_tensor(x: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return True
        if isinstance(x, Mapping):
            return any(has_tensor(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return any(has_tensor(v) for v in x)
        return False

    def put(key: str) -> None:
        if key in tensors or key in meta:
            raise CoralError(f"{name}: two values flatten to the same name {key!r}")

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, torch.Tensor):
            key = prefix or "tensor"
            put(key)
            tensors[key] = x
        elif isinstance(x, Mapping) and has_tensor(x):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(x, (list, tuple)) and has_tensor(x):
            for i, v in enumerate(x):
                walk(f"{prefix}.{i}" if prefix else str(i), v)
        else:
            key = prefix or "value"
            if strict:
                bad.append(key)
                return
            try:
                text = json.dumps(x, allow_nan=True)
            except (TypeError, ValueError):
                bad.append(f"{key} ({type(x).__name__})")
                return
            put(key)
            meta[key] = text

    walk("", obj)
    if bad:
        what = "non-tensor values" if strict else "values that are neither tensors nor JSON-representable"
        raise CoralError(f"{name}: cannot export {what} to safetensors: {', '.join(bad[:10])}"
                         + (" ..." if len(bad) > 10 else ""))
    return tensors, meta


def pt_to_safetensors(obj: Any, strict: bool = False, name: str = "checkpoint") -> tuple[bytes, dict[str, str]]:
    """A loaded .pt object -> (safetensors bytes, the metadata written)."""
    from safetensors.torch import save

    tensors, meta = flatten_state(obj, strict, name)
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach()
        key = t.untyped_storage()._cdata
        if key in seen or not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()  # own storage: safetensors refuses shared or partial storages
        seen.add(key)
        out[k] = t
    meta.setdefault("format", "pt")
    return save(out, metadata=meta), meta


def safetensors_to_pt(data: bytes, name: str = "checkpoint") -> tuple[bytes, dict[str, str]]:
    """safetensors bytes -> (torch.save bytes of a flat state dict, the dropped metadata)."""
    import torch
    from safetensors.torch import load

    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = header.get("__metadata__") or {}
        tensors = load(data)
    except Exception as e:  # safetensors' own checks are stricter than the splitter's (dtypes it lacks)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NotACheckpoint(f"{name}: the safetensors library cannot load it: {first}") from None
    ordered = {k: tensors[k] for k in header if k != "__metadata__"}  # keep the file's order
    buf = io.BytesIO()
    torch.save(ordered, buf)
    return buf.getvalue(), dict(meta)


# ------------------------------------------------------------------ export
@dataclass
class ExportResult:
    source: str
    output: str
    format: str
    tensors: int
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    dropped_metadata: dict[str, str] = field(default_factory=dict)
    copied: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def export_bytes(repo: Repository, rev: str | bytes, path: str, fmt: str, strict: bool = False
                 ) -> tuple[bytes, ExportResult]:
    """``rev:path`` converted to ``fmt`` ("safetensors" or "pt"), as bytes."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown format {fmt!r} (use safetensors or pt)")
    entry = repo.entry(rev, path)
    manifest = repo.get_manifest(entry.manifest)
    label = f"{rev if isinstance(rev, str) else rev.hex()[:12]}:{path}"
    src = "safetensors" if manifest.format == "safetensors" else "pt"
    n_tensors = sum(1 for s in manifest.segments if s.kind == "tensor")
    if manifest.format == "bytes":
        # no tensors found in it: only a legacy (non-zip) torch.save pickle can still be one
        if path.endswith(".safetensors"):
            raise NotACheckpoint(f"{label}: not a valid safetensors file (stored as plain bytes)")
        with repo.open(rev, path) as f:
            head = f.read(2)
        if len(head) < 2 or head[0] != 0x80:
            raise NotACheckpoint(f"{label}: not a checkpoint (neither safetensors nor a torch.save file)")
    with repo.open(rev, path) as f:
        if src == fmt and manifest.format != "bytes":
            data = f.read()
            return data, ExportResult(label, "", fmt, n_tensors, len(data), copied=True)
        if src == "safetensors":
            data, dropped = safetensors_to_pt(f.read(), label)
            return data, ExportResult(label, "", fmt, n_tensors, len(data), dropped_metadata=dropped)
        obj = load_weights_only(f, label)
        if fmt == "pt":  # a legacy (non-zip) torch.save file that loads weights-only: copied as it is
            f.seek(0)
            data = f.read()
            return data, ExportResult(label, "", fmt, _count_tensors(obj), len(data), copied=True)
    data, meta = pt_to_safetensors(obj, strict, label)
    n = int.from_bytes(data[:8], "little")
    n_tensors = sum(1 for k in json.loads(data[8 : 8 + n]) if k != "__metadata__")
    return data, ExportResult(label, "", fmt, n_tensors, len(data), metadata=meta)


def export_file(repo: Repository, rev: str | bytes, path: str, out: str | os.PathLike[str],
                fmt: str | None = None, strict: bool = False) -> ExportResult:
    """Write ``rev:path`` as a ``fmt`` checkpoint to ``out`` (atomically); ``fmt`` defaults from ``out``'s name."""
    out = os.fspath(out)
    fmt = _fmt_of(out, fmt)
    data, res = export_bytes(repo, rev, path, fmt, strict)
    tmp = f"{out}.coralfs-tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left on device: writing {out} ({e.strerror})") from e
        raise
    res.output = out
    return res


# ------------------------------------------------------------------ import
@dataclass
class ImportResult:
    commit: bytes
    branch: str
    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source path, why): symlinks, FIFOs, ...
    logical: int = 0
    stored: int = 0

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["commit"] = self.commit.hex()
        return d


DEFAULT_EXCLUDE = (".git", ".coralfs")


def _walk(src: str, exclude: Sequence[str], skipped: list[tuple[str, str]]) -> list[str]:
    """Relative path of every regular file under ``src``, never following a symlink (each one
    found is added to ``skipped`` with the reason)."""

    def skip(rel: str) -> bool:
        base = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(rel, pat) or fnmatch.fnmatchcase(base, pat) for pat in exclude)

    with WorkTree(src) as wt:
        return [rel for rel, _ in wt.walk("", lambda rel, why: skipped.append((rel, why)), exclude=skip)]


def import_dir(repo: Repository, src: str | os.PathLike[str], branch: str | None = None,
               message: str | None = None, prefix: str = "", delete: bool = False,
               exclude: Sequence[str] = DEFAULT_EXCLUDE, orphan: bool = False,
               metrics: Mapping[str, float] | None = None, meta: Mapping[str, str] | None = None,
               author: str | None = None, progress: Callable[[str], Any] | None = None,
               update_worktree: bool = False) -> ImportResult:
    """Commit the directory ``src`` on ``branch`` (default: the current branch) in one commit.

    Files land under ``prefix``. ``delete``: also remove files under ``prefix`` that ``src``
    lacks (the commit then mirrors the directory exactly). A branch that does not exist
    is created at HEAD (``orphan``: as a new root commit). The files are ingested from
    ``src`` directly; the work tree is only touched with ``update_worktree`` when
    ``branch`` is checked out (it then needs to be clean, and follows the new commit
    like a checkout, as after a merge)."""

    src = os.fspath(src)
    if not os.path.isdir(src):
        raise PathNotFound(f"{src}: not a directory")
    prefix = prefix.strip("/")
    if prefix:
        check_path(prefix)
    if branch is None:
        branch = repo.current_branch()
        if branch is None:
            raise InvalidArgument("HEAD is detached: name the branch to import into (--branch)")
    if update_worktree:
        require_clean(repo, branch)
    head = repo.branch_head(branch)
    start = head
    if head is None and not orphan:
        start = repo.head()
    old = repo.tree(start).entries if start is not None else {}
    res = ImportResult(b"", branch)
    files = _walk(src, exclude, res.skipped)
    if not files:
        raise PathNotFound(f"{src}: no files to import")
    changes: dict[str, TreeEntry | None] = {}
    with repo.writing(), WorkTree(src) as wt:
        for rel in files:
            path = check_path(f"{prefix}/{rel}" if prefix else rel)
            prev = old.get(path)
            fd, _ = wt.open_read(rel)  # relative to src: no symlink followed, on the way or at the end
            try:
                entry, stats = repo.ingest_fd(fd, path, prev, progress(path) if progress else None)
            finally:
                os.close(fd)
            res.logical += stats.logical
            res.stored += stats.stored
            if prev is None:
                res.added.append(path)
            elif prev == entry:
                res.unchanged.append(path)
                continue
            else:
                res.modified.append(path)
            changes[path] = entry
        if delete:
            seen = {check_path(f"{prefix}/{rel}" if prefix else rel) for rel in files}
            for path in sorted(old):
                if (not prefix or path.startswith(prefix + "/")) and path not in seen:
                    changes[path] = None
                    res.deleted.append(path)
        if not changes and head is not None:
            raise NothingToCommit(f"nothing to commit: {src} matches {branch}")
        msg = message or f"Import {os.path.basename(os.path.abspath(src))}" + (f" into {prefix}/" if prefix else "")
        created = False
        if head is None and start is not None:
            repo.create_branch(branch, start.hex())  # start the new branch at HEAD
            created = True
        if update_worktree:
            check_untracked(repo, branch, [p for p, e in changes.items() if e is not None])

        def commit() -> bytes:
            return repo.commit_changes(branch, changes, msg, metrics=metrics, meta=meta, author=author,
                                       expected_head=start, allow_empty=True)

        try:
            if update_worktree and start is not None:
                res.commit = advance_branch(repo, branch, start, commit, True)
            else:
                res.commit = commit()
                if update_worktree and repo.current_branch() == branch:
                    # an unborn branch: nothing was tracked and untracked clashes were refused above
                    repo.checkout(branch, force=True)
        except BaseException:
            if created and repo.branch_head(branch) == start:
                try:
                    repo.delete_branch(branch)
                except CoralError:
                    pass
            raise
    return res
