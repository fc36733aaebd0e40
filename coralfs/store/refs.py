"""Refs: branches, tags and HEAD, stored in the ``refs`` database.

Keys (coralfs.store.keys): ``branch:NAME`` -> commit id, ``tag:NAME`` -> tag object id,
``HEAD`` -> ``ref:branch:NAME`` (attached) or a commit id (detached).
Every change is a compare-and-swap inside a write transaction.
"""

from __future__ import annotations

import re

from coralfs.errors import InvalidName
from coralfs.store import keys
from coralfs.store.keys import HEAD, branch_key, tag_key  # noqa: F401 - until every caller uses Refs

BRANCH = keys.BRANCH.decode()
TAG = keys.TAG.decode()

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
