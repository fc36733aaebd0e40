"""Work-tree guards for commands that move a checked-out branch (merge, import): the work
tree must be clean, new files must not overwrite untracked ones, and the work tree follows
the branch like a checkout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coralfs.errors import CoralError, WouldOverwrite
from coralfs.repository import Repository


def require_clean(repo: Repository, branch: str) -> None:
    """If ``branch`` is checked out: the work tree must be clean (like git before a merge)."""
    if repo.current_branch() != branch:
        return
    st = repo.status()
    dirty = sorted(set(st.staged) | set(st.modified) | set(st.deleted))
    if dirty:
        raise WouldOverwrite("the work tree has uncommitted changes: " + ", ".join(dirty[:5])
                             + (" ..." if len(dirty) > 5 else "") + " (commit them first)")


def check_untracked(repo: Repository, branch: str, new_paths: list[str]) -> None:
    """If ``branch`` is checked out: none of ``new_paths`` may be an untracked file (it would be
    overwritten)."""
    if repo.current_branch() != branch or not new_paths:
        return
    untracked = set(repo.status().untracked)
    clash = [p for p in new_paths if p in untracked]
    if clash:
        raise WouldOverwrite("the merge would overwrite untracked files: " + ", ".join(clash[:5]))


def advance_branch(repo: Repository, branch: str, expected: bytes, move: Callable[[], bytes],
                   update_worktree: bool, progress: Any = None) -> bytes:
    """Run ``move`` (which moves ``branch`` from ``expected`` by compare-and-swap) and, if the
    branch is checked out and ``update_worktree``, make the work tree follow like a checkout.

    The work tree is clean at ``expected`` (``require_clean``): HEAD is detached at ``expected``
    (no file changes), the branch moves, and ``checkout(branch)`` updates the files and
    re-attaches HEAD. If the move fails, HEAD is re-attached unchanged."""
    if not update_worktree or repo.current_branch() != branch:
        return move()
    repo.checkout(expected.hex())
    try:
        new = move()
    except BaseException:
        repo.checkout(branch)
        raise
    try:
        repo.checkout(branch, progress=progress)
    except CoralError as e:
        raise CoralError(f"{branch} is now at {new.hex()[:12]}, but the work tree could not be updated ({e}); "
                         f"run 'coralfs checkout {branch}'") from e
    return new
