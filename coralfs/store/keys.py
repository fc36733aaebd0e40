"""The key layout: every LMDB database, every key family in it, and what gc and fsck do with it.

This module is the one place a key prefix is spelled. Each family is a :class:`Family` in
:data:`FAMILIES`: its database, its prefix, how its keys and values look, and what its
entries *name* (the chunks and objects they point at). gc and fsck walk that table and
nothing else, so a new family is one new row here, and a key that belongs to no family
stops gc (it cannot know what the key keeps alive) and is reported by fsck. docs/design.md's
"LMDB databases" table is this table (``python -m coralfs.store.keys`` prints it; a test
checks the two agree).

A family's :class:`Role` is what gc and fsck do with its entries (``ROLE_DOC`` says it in
words): ``data`` (the chunks and objects, marked and swept), ``root`` (what it names is
live), ``derived`` (an index over data, dropped when what it names is dead) or ``plain``
(names nothing).

Keys that carry a repository path (stage, stat cache, skip-worktree, the mount's pending
entries): one encoding, so that any path a local filesystem accepts fits. LMDB refuses
keys over 511 bytes (``BadValsizeError``), and a path may be 4095 bytes, or not valid UTF-8
(a Linux file name is bytes; Python gives it to us surrogate-escaped).

* A path is encoded with ``os.fsencode`` (UTF-8, surrogate escapes back to their bytes), so
  ``fsdecode`` of the key gives the very ``str`` back; for valid UTF-8 this is the key every
  earlier version wrote.
* A key that would be longer than ``MAX_INLINE`` bytes is ``prefix + b"/" + BLAKE3(path)``
  instead. A stored path never starts with ``/``, so the two forms cannot collide. Such a
  key cannot be read back into a path: its value must carry the path (``VALUE_PATH`` in the
  value's JSON), and readers use :func:`path_of`.
* Prefix scans over path keys (``everything under dir/``) miss hashed keys: scan the whole
  family and filter the decoded paths instead.
"""

from __future__ import annotations

import enum
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coralfs.hashing import ID_LEN, digest

if TYPE_CHECKING:
    from coralfs.store.lmdb import Txn

# ------------------------------------------------------------------ databases
CHUNKS = "chunks"
OBJECTS = "objects"
REFS = "refs"
STAGE = "stage"
INDEX = "index"
CONFIG = "config"
DATABASES = (CHUNKS, OBJECTS, REFS, STAGE, INDEX, CONFIG)
DATA_DATABASES = (CHUNKS, OBJECTS)  # keyed by id; every other database holds key families

# ------------------------------------------------------------------ prefixes (spelled here only)
HEAD = b"HEAD"  # refs
BRANCH = b"branch:"
TAG = b"tag:"
SYMREF = b"ref:"  # HEAD's value when attached: SYMREF + BRANCH + name
STAGE_PREFIX = b""  # the stage database holds one family: its keys are bare paths
COMMIT_INDEX = b"c\x00"  # index
TENSOR_INDEX = b"tb\x00"
DEMOTIONS = b"dm\x00"
BELOW = b"rv\x00"
STAT_CACHE = b"st\x00"
SKIP_WORKTREE = b"sw\x00"
PENDING = b"pend\x00"
CONFLICTS = b"pend-conflict\x00"
CONFIG_KEY = b"config"  # config
GC_NOTE = b"gc"
NOSPACE_NOTE = b"nospace"

SEP = b"\x00"  # between the parts of a composite key

# ------------------------------------------------------------------ path keys
MAX_INLINE = 480  # bytes of key (LMDB's limit is 511)
HASHED = b"/"  # first byte after the prefix of a hashed key
VALUE_PATH = "path"  # the JSON field of a hashed key's value that holds its path


def encode_path(path: str) -> bytes:
    return os.fsencode(path)


def decode_path(raw: bytes) -> str:
    return os.fsdecode(raw)


def path_key(prefix: bytes, path: str) -> bytes:
    raw = prefix + encode_path(path)
    if len(raw) <= MAX_INLINE:
        return raw
    return prefix + HASHED + digest(encode_path(path))


def is_hashed(prefix: bytes, key: bytes) -> bool:
    return key[len(prefix):len(prefix) + 1] == HASHED


def path_of(prefix: bytes, key: bytes, value: dict | None = None) -> str:
    """The path of a key made by ``path_key`` (its value's JSON, decoded, for a hashed key)."""
    if is_hashed(prefix, key):
        if not value or VALUE_PATH not in value:
            raise ValueError(f"hashed path key {key!r} without a path in its value")
        return str(value[VALUE_PATH])
    return decode_path(key[len(prefix):])


def path_of_raw(prefix: bytes, key: bytes, value: bytes) -> str:
    """:func:`path_of` for a raw value (JSON, parsed only when the key is hashed)."""
    return path_of(prefix, key, json.loads(value) if is_hashed(prefix, key) else None)


def path_value(prefix: bytes, key: bytes, path: str, value: dict) -> bytes:
    """``value`` as JSON, carrying the path when ``key`` is a hashed key (which cannot spell it)."""
    if is_hashed(prefix, key):
        value = {**value, VALUE_PATH: path}
    return json.dumps(value).encode()


# ------------------------------------------------------------------ encoders and decoders
def branch_key(name: str) -> bytes:
    return BRANCH + name.encode()


def tag_key(name: str) -> bytes:
    return TAG + name.encode()


def commit_key(cid: bytes) -> bytes:
    """Commit index: one key per commit (listing, id prefix lookup), value empty."""
    return COMMIT_INDEX + cid


def commit_of(key: bytes) -> bytes:
    return key[len(COMMIT_INDEX):]


def tensor_index_key(dtype: str, name: str, piece: int) -> bytes:
    """``tb\\0<dtype>\\0<name>\\0<piece>``; past ``MAX_INLINE`` bytes (LMDB refuses keys over
    511) ``tb\\0/`` + BLAKE3(dtype\\0name) + ``\\0<piece>`` instead. A dtype never starts with
    ``/``, and keys that fit are the ones every earlier version wrote (their delta bases stay)."""
    ident = dtype.encode("utf-8", "surrogatepass") + SEP + name.encode("utf-8", "surrogatepass")
    tail = SEP + str(piece).encode()
    key = TENSOR_INDEX + ident + tail
    if len(key) <= MAX_INLINE:
        return key
    return TENSOR_INDEX + HASHED + digest(ident) + tail


def demotion_key(new: bytes, prev: bytes, time_ns: int | None = None) -> bytes:
    """A pending demotion (coralfs.repack): ``dm\\0`` + time (8 bytes, big-endian) + new chunk +
    previous chunk, so the repacker demotes a lineage's versions oldest first (each one's
    chain accounting is final before the next)."""
    return DEMOTIONS + (time.time_ns() if time_ns is None else time_ns).to_bytes(8, "big") + new + prev


def demotion_chunks(key: bytes) -> tuple[bytes, bytes]:
    """(new chunk, previous chunk) of a demotion key; a malformed key gives what it holds
    (never both a valid id: check the lengths)."""
    body = key[len(DEMOTIONS) + 8 :]
    return body[:ID_LEN], body[ID_LEN:]


def below_key(cid: bytes) -> bytes:
    """A keyframe's reverse-chain counters (coralfs.repack)."""
    return BELOW + cid


def stage_key(path: str) -> bytes:
    return path_key(STAGE_PREFIX, path)


def stat_key(path: str) -> bytes:
    return path_key(STAT_CACHE, path)


def skip_key(path: str) -> bytes:
    return path_key(SKIP_WORKTREE, path)


def pending_prefix(branch: str) -> bytes:
    """The mount's pending entries of one branch: ``pend\\0<branch>\\0``."""
    return PENDING + branch.encode() + SEP


def pending_key(branch: str, path: str) -> bytes:
    """``pend\\0<branch>\\0<path>`` (a long path is hashed: the value then carries it)."""
    return path_key(pending_prefix(branch), path)


def pending_branch(key: bytes) -> str:
    return key[len(PENDING):].partition(SEP)[0].decode()


def pending_path(key: bytes, value: bytes) -> tuple[str, str]:
    """(branch, path) of a pending entry."""
    branch = pending_branch(key)
    return branch, path_of_raw(pending_prefix(branch), key, value)


def conflict_prefix(branch: str, conflict_id: str) -> bytes:
    """Mount changes a concurrent commit refused: ``pend-conflict\\0<branch>\\0<id>\\0``."""
    return CONFLICTS + branch.encode() + SEP + conflict_id.encode() + SEP


def conflict_of(key: bytes) -> tuple[str, str]:
    """(branch, conflict id) of a conflict entry."""
    branch, cid, _ = key[len(CONFLICTS):].split(SEP, 2)
    return branch.decode(), cid.decode()


# ------------------------------------------------------------------ the table
class Role(enum.Enum):
    """What gc and fsck do with a family's entries (see the module docstring)."""

    DATA = "data"
    ROOT = "root"  # names objects (never chunks: a root is a manifest, commit or tag)
    DERIVED = "derived"
    PLAIN = "plain"


# what an entry names: (kind, id); a chunk is in ``chunks``, anything else in ``objects``
CHUNK = "chunk"
COMMIT = "commit"
TAG_OBJECT = "tag"
MANIFEST = "manifest"
Named = tuple[tuple[str, bytes], ...]


class Unreadable(ValueError):  # noqa: N818 - a ValueError, named for what it is
    """an entry whose key or value cannot be decoded"""


@dataclass(frozen=True)
class Family:
    """One key family: where it lives, what it looks like, what it names."""

    name: str
    db: str
    prefix: bytes
    key: str  # the key's layout (for docs/design.md)
    value: str  # the value (for docs/design.md)
    role: Role
    names: Callable[[bytes, bytes], Named] | None = None  # (key, value) -> what the entry names
    exact: bool = False  # the key is the prefix itself
    path: bool = False  # keys carry a repository path (path_key)
    missing: str = ""  # derived: fsck's finding when what it names is missing
    about: str = ""  # what it names, in words (docs/design.md)

    def matches(self, key: bytes) -> bool:
        return key == self.prefix if self.exact else key.startswith(self.prefix)

    def items(self, t: Txn) -> Iterator[tuple[bytes, bytes]]:
        """The family's entries in ``t``."""
        if self.exact:
            v = t.get(self.db, self.prefix)
            if v is not None:
                yield self.prefix, v
            return
        for k, v in t.items(self.db, self.prefix):
            if family_of(self.db, k) is self:  # a longer prefix of another family is not ours
                yield k, v

    def named(self, key: bytes, value: bytes) -> Named:
        """What the entry names; :class:`Unreadable` when it cannot be decoded."""
        if self.names is None:
            return ()
        try:
            return self.names(key, value)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise Unreadable(f"{self.name} entry {key[:80]!r}: {e}") from e



#: What each role means to gc and fsck (docs/design.md prints this under the table)
ROLE_DOC = {
    Role.DATA: "the content-addressed data: gc keeps what a root reaches (and the delta bases of kept chunks) "
               "and sweeps the rest; fsck verifies each against its id",
    Role.ROOT: "what it names is live: gc marks from it (an entry it cannot read stops gc); fsck walks from it",
    Role.DERIVED: "an index over data: gc drops it when anything it names is dead, or when it cannot be read; "
                  "fsck reports such an entry, `--repair` drops it",
    Role.PLAIN: "names nothing: kept as it is",
}


def _head(_k: bytes, v: bytes) -> Named:
    return () if v.startswith(SYMREF) or len(v) != ID_LEN else ((COMMIT, v),)


def _branch(_k: bytes, v: bytes) -> Named:
    return ((COMMIT, v),) if len(v) == ID_LEN else ()


def _tag(_k: bytes, v: bytes) -> Named:
    return ((TAG_OBJECT, v),) if len(v) == ID_LEN else ()


def _manifest_if_any(_k: bytes, v: bytes) -> Named:
    """JSON ``{"m": manifest hex, ...}``, or an entry without one (a deletion)."""
    d = json.loads(v)
    m = d.get("m") if isinstance(d, dict) else None
    return ((MANIFEST, bytes.fromhex(m)),) if m else ()


def _manifest(_k: bytes, v: bytes) -> Named:
    return ((MANIFEST, bytes.fromhex(json.loads(v)["m"])),)


def _commit_in_key(k: bytes, _v: bytes) -> Named:
    return ((COMMIT, commit_of(k)),)


def _chunk_in_value(_k: bytes, v: bytes) -> Named:
    return ((CHUNK, v),)


def _chunk_in_key(k: bytes, _v: bytes) -> Named:
    return ((CHUNK, k[len(BELOW):]),)


def _two_chunks_in_key(k: bytes, _v: bytes) -> Named:
    new, prev = demotion_chunks(k)
    return ((CHUNK, new), (CHUNK, prev))


_MANIFEST_JSON = '`{"m": manifest, "size", "mode"}` or `{"del": true}`'

#: Every key family of every database. gc and fsck walk this table; nothing else lists families.
FAMILIES: list[Family] = [
    Family("chunks", CHUNKS, b"", "chunk id (32 bytes)", "chunk record", Role.DATA, about="its delta bases (in the record)"),
    Family("objects", OBJECTS, b"", "object id (32 bytes)", "serialized object", Role.DATA,
           about="tag: a commit; commit: a tree and parents; tree: manifests; manifest: chunks"),
    Family("HEAD", REFS, HEAD, "`HEAD`", "`ref:branch:NAME` (attached) or a commit id (detached)", Role.ROOT,
           _head, exact=True, about="a commit, when detached"),
    Family("branch", REFS, BRANCH, "`branch:NAME`", "commit id", Role.ROOT, _branch, about="a commit"),
    Family("tag", REFS, TAG, "`tag:NAME`", "tag object id", Role.ROOT, _tag, about="a tag object"),
    Family("stage", STAGE, STAGE_PREFIX, "path (*)", f"JSON {_MANIFEST_JSON}", Role.ROOT, _manifest_if_any,
           path=True, about="a manifest (`m`; a deletion none)"),
    Family("commit index", INDEX, COMMIT_INDEX, "`c\\0<id>`", "empty: the commit index (listing, prefix lookup)",
           Role.DERIVED, _commit_in_key, missing="commit index entry names a missing commit",
           about="a commit (its key)"),
    Family("tensor base index", INDEX, TENSOR_INDEX, "`tb\\0<dtype>\\0<tensor name>\\0<piece>`",
           "latest chunk id of that tensor piece (delta base for files with no history); a key past 480 bytes "
           "is `tb\\0/` + BLAKE3(`<dtype>\\0<tensor name>`) + `\\0<piece>` (keys that fit are unchanged)",
           Role.DERIVED, _chunk_in_value, missing="tensor base index names a missing chunk",
           about="a chunk (its value)"),
    Family("pending demotion", INDEX, DEMOTIONS, "`dm\\0<time ns, 8 bytes BE><new chunk><previous chunk>`",
           "empty: re-encode the previous version as a delta against the new one (`repack.py`)",
           Role.DERIVED, _two_chunks_in_key, missing="pending demotion names a missing chunk",
           about="two chunks (its key)"),
    Family("reverse-chain counters", INDEX, BELOW, "`rv\\0<chunk>`",
           "a keyframe's reverse chains: deltas on the longest chain ending at it (u16), their bytes in "
           "1/256ths of the piece (u32), whether a lineage's first version is among them (u8)",
           Role.DERIVED, _chunk_in_key, missing="reverse-chain counters of a missing chunk",
           about="a chunk (its key)"),
    Family("stat cache", INDEX, STAT_CACHE, "`st\\0<path>` (*)",
           'stat cache: `{"sig": [size, mtime_ns, ino, ctime_ns], "m": manifest}`',
           Role.DERIVED, _manifest, path=True, missing="stat cache entry names a missing manifest",
           about="a manifest (`m`)"),
    Family("skip-worktree", INDEX, SKIP_WORKTREE, "`sw\\0<path>` (*)",
           "skip-worktree: staged by `save()`, not materialised yet: `1`", Role.PLAIN, path=True),
    Family("pending", INDEX, PENDING, "`pend\\0<branch>\\0<path>` (*)",
           'mount: a file ingested at close/fsync, not yet committed: `{"m", "size", "mode", "base": head it '
           'was based on, "time"}`; a deletion: `{"del": true, "base", "time"}`', Role.ROOT, _manifest_if_any,
           path=True, about="a manifest (`m`; a deletion none)"),
    Family("conflict", INDEX, CONFLICTS, "`pend-conflict\\0<branch>\\0<id>\\0<path>` (*)",
           "mount changes refused because a concurrent commit touched the same file (the pending entry, plus "
           '"head", "reason", "conflicts"); kept for `coralfs flush-mount --recover`', Role.ROOT,
           _manifest_if_any, path=True, about="a manifest (`m`; a deletion none)"),
    Family("config", CONFIG, CONFIG_KEY, "`config`", "JSON: format version, default branch, max delta depth",
           Role.PLAIN, exact=True),
    Family("gc note", CONFIG, GC_NOTE, "`gc`", "JSON: the last gc's progress (informational)", Role.PLAIN,
           exact=True),
    Family("no-space note", CONFIG, NOSPACE_NOTE, "`nospace`",
           "JSON: what the cleanup after a full disk removed (informational)", Role.PLAIN, exact=True),
]


def families(db: str | None = None, role: Role | None = None) -> list[Family]:
    return [f for f in FAMILIES if (db is None or f.db == db) and (role is None or f.role is role)]


def family_of(db: str, key: bytes) -> Family | None:
    """The family ``key`` of database ``db`` belongs to (the longest matching prefix), or None."""
    best: Family | None = None
    for f in FAMILIES:
        if f.db == db and f.matches(key) and (best is None or len(f.prefix) > len(best.prefix)):
            best = f
    return best


def unknown_keys(t: Txn, limit: int | None = None) -> list[tuple[str, bytes]]:
    """(database, key) of keys that belong to no family (data databases hold ids only)."""
    out: list[tuple[str, bytes]] = []
    for db in DATABASES:
        if db in DATA_DATABASES:
            continue
        for k in t.keys(db):
            if family_of(db, k) is None:
                out.append((db, k))
                if limit is not None and len(out) >= limit:
                    return out
    return out


def markdown_table() -> str:
    """docs/design.md's "LMDB databases" table, and what the roles mean."""
    rows = ["| db | key | value | names | role |", "|---|---|---|---|---|"]
    last = None
    for f in FAMILIES:
        db = f"`{f.db}`" if f.db != last else ""
        last = f.db
        rows.append(f"| {db} | {f.key} | {f.value} | {f.about or 'nothing'} | {f.role.value} |")
    rows.append("")
    rows += [f"* `{role.value}`: {text}." for role, text in ROLE_DOC.items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
