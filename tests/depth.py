"""How hard the tests try: quick (``make test``) or deep (``make test-deep``).

One switch: ``CORALFS_DEEP=1`` (or ``HYPOTHESIS_PROFILE=deep``) selects the long variants of
the mount's stress tests and fsx, and Hypothesis' ``deep`` profile (registered, with
``quick``, in conftest.py); a test that sets its own example counts picks them with
:func:`pick`.
"""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")

DEEP = os.environ.get("CORALFS_DEEP", "") not in ("", "0") or os.environ.get("HYPOTHESIS_PROFILE") == "deep"
PROFILE = "deep" if DEEP else "quick"


def pick(quick: T, deep: T) -> T:
    """``quick`` in ``make test``, ``deep`` in ``make test-deep``."""
    return deep if DEEP else quick
