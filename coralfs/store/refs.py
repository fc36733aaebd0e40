"""Refs: branches, tags and HEAD, seen through one transaction (:class:`Refs`).

A ref has a full name: ``branch:NAME`` (a commit id), ``tag:NAME`` (a tag object id), or
``HEAD`` (``ref:branch:NAME`` when attached, a commit id when detached); the full name is
its key in the ``refs`` database (layout: :mod:`coralfs.store.keys`). Every change is a
compare-and-swap inside a write transaction, as dulwich's ``RefsContainer`` does it:
:meth:`Refs.set_if_equals`, :meth:`Refs.add_if_new`, :meth:`Refs.delete_if_equals`.
Nothing outside this module reads or writes the ``refs`` database.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from coralfs.errors import ConcurrentUpdate, InvalidName, RefExists
from coralfs.hashing import ID_LEN
from coralfs.store import keys

if TYPE_CHECKING:
    from coralfs.store.lmdb import Txn

BRANCH = keys.BRANCH.decode()  # full-name prefixes
TAG = keys.TAG.decode()
HEAD = keys.HEAD.decode()

_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_ref_name(name: str, kind: str = "branch") -> str:
    """Git-like rules, plus: no component may start with '@' (reserved by the mount)."""
    if not name or _BAD.search(name) or name.startswith("/") or name.endswith("/") or "//" in name \
            or name.endswith(".lock") or name == "HEAD" or ".." in name:
        raise InvalidName(f"invalid {kind} name: {name!r}")
    for part in name.split("/"):
        if part.startswith(("@", ".")) or part == "":
            raise InvalidName(f"invalid {kind} name: {name!r} (components may not start with '@' or '.')")
    return name


def branch_ref(name: str) -> str:
    return BRANCH + name


def tag_ref(name: str) -> str:
    return TAG + name


def describe(ref: str) -> str:
    """``branch 'main'``, ``tag 'v1'``, ``HEAD``: a ref as error messages name it."""
    for prefix, kind in ((BRANCH, "branch"), (TAG, "tag")):
        if ref.startswith(prefix):
            return f"{kind} {ref[len(prefix):]!r}"
    return ref


def _short(v: bytes | None) -> str:
    if v is None:
        return "none"
    return v.hex()[:12] if len(v) == ID_LEN else v.decode(errors="replace")


def symref_target(value: bytes) -> str | None:
    """The ref a symbolic ref's stored value points at (HEAD attached to a branch), or None
    when the value is not symbolic (an id, or something else: fsck judges it)."""
    if not value.startswith(keys.SYMREF):
        return None
    return value[len(keys.SYMREF):].decode(errors="replace")


def _key(ref: str) -> bytes:
    return ref.encode(errors="surrogateescape")


def _name(key: bytes) -> str:
    return key.decode(errors="surrogateescape")


class Refs:
    """The refs of one transaction: ``Refs(t)``. Reads work in any transaction, changes in a
    write transaction (they take effect when it commits)."""

    def __init__(self, t: Txn) -> None:
        self.t = t

    # ---------------------------------------------------------------- reading
    def get(self, ref: str) -> bytes | None:
        """The raw value of a ref by full name (``branch:main``, ``tag:v1``, ``HEAD``)."""
        return self.t.get(keys.REFS, _key(ref))

    def branch(self, name: str) -> bytes | None:
        """A branch's commit id (None: no such branch)."""
        return self.get(branch_ref(name))

    def tag(self, name: str) -> bytes | None:
        """A tag's tag object id (None: no such tag)."""
        return self.get(tag_ref(name))

    def head(self) -> str | bytes | None:
        """The branch name HEAD is attached to, or the commit id of a detached HEAD."""
        v = self.get(HEAD)
        if v is None:
            return None
        if v.startswith(keys.SYMREF):
            return _name(v[len(keys.SYMREF):])[len(BRANCH):]
        return v

    def follow_head(self) -> tuple[str | None, bytes | None]:
        """(branch name, or None when detached; commit id, or None on an unborn branch)."""
        h = self.head()
        if isinstance(h, str):
            return h, self.branch(h)
        return None, h

    def _under(self, kind: str, prefix: str) -> dict[str, bytes]:
        return {_name(k)[len(kind):]: v for k, v in self.t.items(keys.REFS, _key(kind + prefix))}

    def branches(self, prefix: str = "") -> dict[str, bytes]:
        """Branch name -> commit id, for the branches whose name starts with ``prefix``."""
        return self._under(BRANCH, prefix)

    def tags(self, prefix: str = "") -> dict[str, bytes]:
        """Tag name -> tag object id, for the tags whose name starts with ``prefix``."""
        return self._under(TAG, prefix)

    def all(self) -> dict[str, bytes]:
        """Every ref: full name -> raw value (HEAD included)."""
        return {_name(k): v for k, v in self.t.items(keys.REFS)}

    def namespaces(self, prefix: str) -> list[str]:
        """The next name components of the refs whose full name starts with ``prefix`` (sorted,
        unique): ``namespaces("branch:exp/")`` of ``exp/a``, ``exp/b/c`` is ``["a", "b"]``."""
        out = {_name(k)[len(prefix):].split("/", 1)[0] for k in self.t.keys(keys.REFS, _key(prefix))}
        return sorted(out)

    # ---------------------------------------------------------------- the commit index
    def commits(self, hex_prefix: str = "") -> list[bytes]:
        """Every commit id (from the commit index) that starts with ``hex_prefix`` (lowercase)."""
        raw = keys.commit_key(bytes.fromhex(hex_prefix[: len(hex_prefix) // 2 * 2]))
        return [c for c in (keys.commit_of(k) for k in self.t.keys(keys.INDEX, raw)) if c.hex().startswith(hex_prefix)]

    def has_commit(self, cid: bytes) -> bool:
        return self.t.get(keys.INDEX, keys.commit_key(cid)) is not None

    def index_commit(self, cid: bytes) -> None:
        """Record a new commit in the commit index (every commit is indexed when written)."""
        self.t.put(keys.INDEX, keys.commit_key(cid), b"")

    # ---------------------------------------------------------------- changing
    def set_head(self, target: str | bytes) -> None:
        """Attach HEAD to branch ``target`` (a name), or detach it at commit ``target`` (an id)."""
        if isinstance(target, str):
            self.t.put(keys.REFS, keys.HEAD, keys.SYMREF + keys.branch_key(target))
        else:
            self.t.put(keys.REFS, keys.HEAD, target)

    def set_if_equals(self, ref: str, old: bytes | None, new: bytes) -> None:
        """Set ``ref`` to ``new`` if it is ``old`` now (None: absent); ConcurrentUpdate if not."""
        self._expect(ref, old)
        self.t.put(keys.REFS, _key(ref), new)

    def add_if_new(self, ref: str, new: bytes) -> None:
        """Create ``ref``; RefExists if it exists."""
        if self.get(ref) is not None:
            raise RefExists(f"{describe(ref)} already exists")
        self.t.put(keys.REFS, _key(ref), new)

    def delete_if_equals(self, ref: str, old: bytes) -> None:
        """Delete ``ref`` if it is ``old`` now; ConcurrentUpdate if not."""
        self._expect(ref, old)
        self.t.delete(keys.REFS, _key(ref))

    def set(self, ref: str, new: bytes) -> None:
        """Set ``ref`` whatever it is now (``--force``)."""
        self.t.put(keys.REFS, _key(ref), new)

    def delete(self, ref: str) -> bool:
        """Delete ``ref`` whatever it is now; False if there was none."""
        return self.t.delete(keys.REFS, _key(ref))

    def _expect(self, ref: str, old: bytes | None) -> None:
        cur = self.get(ref)
        if cur != old:
            raise ConcurrentUpdate(f"{describe(ref)} moved: expected {_short(old)}, found {_short(cur)}")
