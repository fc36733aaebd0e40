"""Refs: branches, tags and HEAD, stored in the ``refs`` database.

Keys: ``b"branch:NAME"`` -> commit id, ``b"tag:NAME"`` -> tag object id,
``b"HEAD"`` -> ``b"ref:branch:NAME"`` (attached) or a commit id (detached).
Every change is a compare-and-swap inside a write transaction.
"""

from __future__ import annotations

import re

from coralfs.errors import InvalidName

BRANCH = "branch:"
TAG = "tag:"
HEAD = b"HEAD"

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


def branch_key(name: str) -> bytes:
    return (BRANCH + name).encode()


def tag_key(name: str) -> bytes:
    return (TAG + name).encode()
