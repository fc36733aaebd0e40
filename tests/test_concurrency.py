"""Several processes on one repository: no commit is lost, the repository stays consistent."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from coralfs.repository import Repository


def _committer(root: str, tag: str, n: int) -> None:
    import torch

    repo = Repository(root)
    for i in range(n):
        entry = repo.save({"w": torch.full((64,), float(i)), "who": torch.tensor([ord(c) for c in tag])},
                          f"{tag}/ckpt_{i}.pt", stage=False)
        # commit_changes applies on top of whatever the head is now, inside one write transaction
        repo.commit_changes("main", {f"{tag}/ckpt_{i}.pt": entry}, f"{tag} {i}")
    repo.close()


@pytest.mark.parametrize("n", [5])
def test_two_processes_commit_concurrently(tmp_path, n):
    root = str(tmp_path / "r")
    Repository.init(root).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_committer, args=(root, t, n)) for t in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    repo = Repository(root)
    files = repo.ls("main")
    assert len(files) == 2 * n, sorted(files)
    assert len(repo.log("main")) == 2 * n
    for path in files:
        assert repo.open("main", path).read()  # every file reads back


def test_stage_commit_does_not_drop_concurrent_add(tmp_path):
    """A commit only consumes the stage entries it read; one added meanwhile stays staged."""
    repo = Repository.init(tmp_path / "r")
    p = os.path.join(repo.root, "a.txt")
    with open(p, "w") as f:
        f.write("a")
    repo.add([p])
    other = Repository(repo.root)
    q = os.path.join(repo.root, "b.txt")
    with open(q, "w") as f:
        f.write("b")
    orig = repo.store.write

    def write_with_interleaved_add(fn):
        if not getattr(write_with_interleaved_add, "done", False):
            write_with_interleaved_add.done = True
            other.add([q])  # lands between our stage read and our commit transaction
        return orig(fn)

    repo.store.write = write_with_interleaved_add
    repo.commit("a")
    repo.store.write = orig
    assert repo.status().staged == {"b.txt": "added"}
