"""Objects: plain values with serialize/deserialize and no I/O.

Encoding (every object): ``b"CRO" | version u8 | type u8 | compression u8 | body``;
body is canonical JSON (sorted keys), zstd-compressed when that pays. The object id
is the BLAKE3 of the whole encoding.
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import zstandard

from coralfs.codec.tensor import zstd_compressor, zstd_decompressor
from coralfs.errors import FormatError, InvalidPath, NameTooLong

MAGIC = b"CRO"
VERSION = 1
TYPE_MANIFEST, TYPE_TREE, TYPE_COMMIT, TYPE_TAG = 1, 2, 3, 4
_TYPE_NAMES = {TYPE_MANIFEST: "manifest", TYPE_TREE: "tree", TYPE_COMMIT: "commit", TYPE_TAG: "tag"}

MODE_FILE = 0o100644
MODE_EXEC = 0o100755


#: Limits of a local Linux file system, in bytes of ``os.fsencode(path)``: a name (one
#: component) and a whole path. A tree path longer than these could not be checked out.
NAME_MAX = 255
PATH_MAX = 4095
RESERVED = ".coralfs"  # a first component naming the control directory


def path_error(path: object) -> InvalidPath | None:
    """Why ``path`` cannot name a file in a tree (the error to raise), or None if it can.

    One rule for paths being created (:func:`check_path`) and paths decoded from a stored
    tree (:meth:`Tree.from_body`): a repository may come from someone else, and a path
    that escapes the work tree (``..``, absolute), names the control directory, or cannot
    exist on a local file system must never reach the work tree. A path is a ``str`` whose
    ``os.fsencode`` is the file name's bytes (non-UTF-8 bytes as surrogate escapes); it must
    be the canonical spelling of those bytes (``os.fsdecode(os.fsencode(p)) == p``), so
    two tree entries can never name the same file."""
    if not isinstance(path, str) or not path:
        return InvalidPath("empty path")
    if "\x00" in path:
        return InvalidPath(f"path contains NUL: {path!r}")
    if path.startswith("/") or "\\" in path:
        return InvalidPath(f"path must be relative and use '/': {path!r}")
    try:
        raw = os.fsencode(path)
    except UnicodeError:
        return InvalidPath(f"path is not a file name (unencodable characters): {path!r}")
    if os.fsdecode(raw) != path:
        return InvalidPath(f"path is not in canonical form (surrogate-escaped UTF-8): {path!r}")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            return InvalidPath(f"invalid path component {part!r} in {path!r}")
    if parts[0].lower() == RESERVED:
        return InvalidPath(f"reserved path: {path!r}")
    if len(raw) > PATH_MAX:
        return NameTooLong(f"path is {len(raw)} bytes, over {PATH_MAX}: {path[:60]!r}...")
    for part in parts:
        n = len(os.fsencode(part))
        if n > NAME_MAX:
            return NameTooLong(f"path component is {n} bytes, over {NAME_MAX}: {part[:60]!r}...")
    return None


def check_path(path: str) -> str:
    """Validate a path inside a tree (relative, '/'-separated, no '..', fits a local file
    system; see :func:`path_error`); raises InvalidPath (NameTooLong for the length limits)."""
    err = path_error(path)
    if err is not None:
        raise err
    return path


def path_clash(paths: Iterable[str]) -> str | None:
    """A path that is both a file and a directory among ``paths`` (e.g. ``a`` and ``a/b``), or None."""
    files = set(paths)
    dirs: set[str] = set()
    for p in files:
        d = p.rpartition("/")[0]
        while d and d not in dirs:
            dirs.add(d)
            d = d.rpartition("/")[0]
    clash = dirs & files
    return min(clash) if clash else None


def _pack(type_: int, body: dict[str, Any]) -> bytes:
    # surrogatepass: a non-UTF-8 file name (surrogate escapes) is stored as the UTF-8 form of
    # its surrogates; any body that is valid UTF-8 keeps exactly the bytes (and id) it always had
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    if len(raw) > 4096:
        comp = zstd_compressor(6).compress(raw)
        if len(comp) < len(raw):
            return MAGIC + bytes((VERSION, type_, 1)) + comp
    return MAGIC + bytes((VERSION, type_, 0)) + raw


def unpack(data: bytes) -> tuple[int, dict[str, Any]]:
    if len(data) < 6 or data[:3] != MAGIC:
        raise FormatError("object has a bad magic")
    version, type_, comp = data[3], data[4], data[5]
    if version != VERSION:
        raise FormatError(f"object version {version} is not supported")
    if type_ not in _TYPE_NAMES:
        raise FormatError(f"unknown object type {type_}")
    body = data[6:]
    try:
        if comp == 1:
            body = zstd_decompressor().decompress(body, max_output_size=1 << 30)
        elif comp != 0:
            raise FormatError(f"unknown object compression {comp}")
        return type_, json.loads(bytes(body).decode("utf-8", "surrogatepass"))
    except (ValueError, zstandard.ZstdError) as e:
        raise FormatError(f"undecodable {_TYPE_NAMES[type_]} object: {e}") from e


@dataclass(frozen=True)
class Piece:
    """A run of a file's bytes: one chunk, or a few bytes kept inline."""

    length: int
    chunk: bytes | None = None
    inline: bytes | None = None

    def to_json(self) -> list:
        if self.inline is not None:
            return [self.length, None, base64.b64encode(self.inline).decode()]
        assert self.chunk is not None
        return [self.length, self.chunk.hex()]

    @classmethod
    def from_json(cls, v: list) -> Piece:
        if v[1] is None:
            return cls(int(v[0]), None, base64.b64decode(v[2]))
        return cls(int(v[0]), bytes.fromhex(v[1]))


@dataclass(frozen=True)
class Segment:
    """A contiguous range of a file: plain bytes, or one tensor's data."""

    kind: str  # "bytes" | "tensor"
    pieces: tuple[Piece, ...]
    name: str = ""
    dtype: str = ""
    width: int = 1
    shape: tuple[int, ...] | None = None

    @property
    def length(self) -> int:
        return sum(p.length for p in self.pieces)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"k": self.kind, "p": [p.to_json() for p in self.pieces]}
        if self.kind == "tensor":
            d.update(name=self.name, dtype=self.dtype, w=self.width)
            if self.shape is not None:
                d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Segment:
        shape = d.get("shape")
        return cls(d["k"], tuple(Piece.from_json(p) for p in d["p"]), d.get("name", ""), d.get("dtype", ""),
                   int(d.get("w", 1)), tuple(shape) if shape is not None else None)


@dataclass(frozen=True)
class Manifest:
    """How to rebuild one file's content: its segments, in order."""

    size: int
    file_hash: bytes
    format: str
    segments: tuple[Segment, ...]

    def serialize(self) -> bytes:
        return _pack(TYPE_MANIFEST, {"size": self.size, "hash": self.file_hash.hex(), "format": self.format,
                                     "segments": [s.to_json() for s in self.segments]})

    @classmethod
    def from_body(cls, b: dict[str, Any]) -> Manifest:
        return cls(int(b["size"]), bytes.fromhex(b["hash"]), b["format"],
                   tuple(Segment.from_json(s) for s in b["segments"]))

    def tensors(self) -> dict[str, Segment]:
        return {s.name: s for s in self.segments if s.kind == "tensor"}

    def chunk_ids(self) -> list[bytes]:
        return [p.chunk for s in self.segments for p in s.pieces if p.chunk is not None]


@dataclass(frozen=True)
class TreeEntry:
    manifest: bytes
    size: int
    mode: int = MODE_FILE


@dataclass(frozen=True)
class Tree:
    """A flat, sorted map of file path -> entry (directories are implied by paths)."""

    entries: dict[str, TreeEntry] = field(default_factory=dict)

    def serialize(self) -> bytes:
        return _pack(TYPE_TREE, {"entries": [[p, e.manifest.hex(), e.size, e.mode]
                                             for p, e in sorted(self.entries.items())]})

    @classmethod
    def from_body(cls, b: dict[str, Any]) -> Tree:
        """Decode, validating every path: a tree may come from someone else, and a path that
        escapes the work tree or cannot be a local file makes the whole object corrupt."""
        entries: dict[str, TreeEntry] = {}
        for p, m, s, mode in b["entries"]:
            err = path_error(p)
            if err is not None:
                raise FormatError(f"corrupt tree: {err}")
            if p in entries:
                raise FormatError(f"corrupt tree: path {p!r} listed twice")
            entries[p] = TreeEntry(bytes.fromhex(m), int(s), int(mode))
        clash = path_clash(entries)
        if clash is not None:
            raise FormatError(f"corrupt tree: path is both a file and a directory: {clash!r}")
        return cls(entries)

    def dirs(self) -> set[str]:
        out: set[str] = set()
        for p in self.entries:
            d = posixpath.dirname(p)
            while d and d not in out:
                out.add(d)
                d = posixpath.dirname(d)
        return out


@dataclass(frozen=True)
class Commit:
    tree: bytes
    parents: tuple[bytes, ...]
    author: str
    time: float
    message: str
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def serialize(self) -> bytes:
        return _pack(TYPE_COMMIT, {"tree": self.tree.hex(), "parents": [p.hex() for p in self.parents],
                                   "author": self.author, "time": self.time, "message": self.message,
                                   "metrics": self.metrics, "meta": self.meta})

    @classmethod
    def from_body(cls, b: dict[str, Any]) -> Commit:
        return cls(bytes.fromhex(b["tree"]), tuple(bytes.fromhex(p) for p in b["parents"]), b["author"],
                   float(b["time"]), b["message"], dict(b.get("metrics", {})), dict(b.get("meta", {})))


@dataclass(frozen=True)
class Tag:
    name: str
    commit: bytes
    tagger: str
    time: float
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def serialize(self) -> bytes:
        return _pack(TYPE_TAG, {"name": self.name, "commit": self.commit.hex(), "tagger": self.tagger,
                                "time": self.time, "message": self.message, "metrics": self.metrics,
                                "meta": self.meta})

    @classmethod
    def from_body(cls, b: dict[str, Any]) -> Tag:
        return cls(b["name"], bytes.fromhex(b["commit"]), b["tagger"], float(b["time"]), b.get("message", ""),
                   dict(b.get("metrics", {})), dict(b.get("meta", {})))


Object = Manifest | Tree | Commit | Tag
_CLASSES: dict[int, Any] = {TYPE_MANIFEST: Manifest, TYPE_TREE: Tree, TYPE_COMMIT: Commit, TYPE_TAG: Tag}


def deserialize(data: bytes) -> Object:
    type_, body = unpack(data)
    try:
        return _CLASSES[type_].from_body(body)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"malformed {_TYPE_NAMES[type_]} object: {e}") from e

