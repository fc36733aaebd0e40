"""LMDB keys that carry a repository path (stage, stat cache, skip-worktree, the mount's
pending entries): one encoding, so that any path a local filesystem accepts fits.

LMDB refuses keys over 511 bytes (``BadValsizeError``), and a path may be 4095 bytes, or not
valid UTF-8 (a Linux file name is bytes; Python gives it to us surrogate-escaped).

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

import os

from coralfs.hashing import digest

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


def needs_path_in_value(key: bytes, prefix: bytes) -> bool:
    """True when ``key`` (made by ``path_key``) does not spell its path."""
    return is_hashed(prefix, key)


def path_of(prefix: bytes, key: bytes, value: dict | None = None) -> str:
    """The path of a key made by ``path_key`` (its value's JSON, decoded, for a hashed key)."""
    if is_hashed(prefix, key):
        if not value or VALUE_PATH not in value:
            raise ValueError(f"hashed path key {key!r} without a path in its value")
        return str(value[VALUE_PATH])
    return decode_path(key[len(prefix):])
