"""Branch / checkout / tag / log / status semantics of the Python API."""

from __future__ import annotations

import os

import pytest
import torch

from coralfs.errors import (
    AmbiguousRevision,
    InvalidName,
    NotARepository,
    NothingToCommit,
    RefExists,
    RepositoryExists,
    UnknownRevision,
    WouldOverwrite,
)
from coralfs.repository import Repository
from tests.factories import TinyNet, save_pt, sha256, train_steps


def _write_ckpt(repo: Repository, name: str, seed: int) -> str:
    torch.manual_seed(seed)
    m = TinyNet()
    train_steps(m, torch.optim.SGD(m.parameters(), lr=0.1), 1, seed)
    p = save_pt(m.state_dict(), os.path.join(repo.root, name))
    return sha256(p)


def test_quickstart_flow(repo):
    h1 = _write_ckpt(repo, "model_checkpoint.pth", 1)
    repo.add([os.path.join(repo.root, "model_checkpoint.pth")])
    c1 = repo.commit("Initial fine-tuned model", metrics={"accuracy": 0.925})
    repo.create_branch("experiment/lr-0.001")
    repo.checkout("experiment/lr-0.001")
    assert repo.current_branch() == "experiment/lr-0.001"
    h2 = _write_ckpt(repo, "model_checkpoint_epoch_10.pth", 2)
    repo.add([os.path.join(repo.root, "model_checkpoint_epoch_10.pth")])
    c2 = repo.commit("LR 0.001, acc 94.2")
    log = repo.log()
    assert [c for c, _ in log] == [c2, c1]
    assert log[1][1].metrics == {"accuracy": 0.925}
    repo.tag("v1.0-prod", metrics={"accuracy": 0.945}, message="Q4 production model")
    assert repo.tags()["v1.0-prod"].commit == c2
    # rollback to main: the epoch-10 file disappears, the first file is byte-identical
    repo.checkout("main")
    assert not os.path.exists(os.path.join(repo.root, "model_checkpoint_epoch_10.pth"))
    assert sha256(os.path.join(repo.root, "model_checkpoint.pth")) == h1
    repo.checkout("v1.0-prod")  # a tag detaches
    assert repo.current_branch() is None and repo.head() == c2
    assert sha256(os.path.join(repo.root, "model_checkpoint_epoch_10.pth")) == h2


def test_revisions(repo):
    ids = []
    for i in range(4):
        _write_ckpt(repo, "m.pt", i)
        repo.add([os.path.join(repo.root, "m.pt")])
        ids.append(repo.commit(f"c{i}"))
    assert repo.resolve("HEAD") == ids[3]
    assert repo.resolve("HEAD~2") == ids[1]
    assert repo.resolve("HEAD^") == ids[2]
    assert repo.resolve("main~3") == ids[0]
    assert repo.resolve(ids[1].hex()[:10]) == ids[1]
    assert repo.resolve(ids[1].hex().upper()) == ids[1]
    with pytest.raises(UnknownRevision):
        repo.resolve("HEAD~9")
    with pytest.raises(UnknownRevision):
        repo.resolve("nope")
    assert Repository.split_revpath("main:dir/m.pt") == ("main", "dir/m.pt")
    assert Repository.split_revpath("m.pt") == ("HEAD", "m.pt")


def test_ambiguous_prefix(repo):
    ids = []
    for i in range(40):
        (open(os.path.join(repo.root, "f"), "w")).write(str(i))
        repo.add([os.path.join(repo.root, "f")])
        ids.append(repo.commit(str(i)))
    firsts = [c.hex()[0] for c in ids]
    dup = next(ch for ch in firsts if firsts.count(ch) > 1)
    with pytest.raises(UnknownRevision):  # 1 hex char is below the 4-char minimum
        repo.resolve(dup)
    # construct an ambiguity check on the shortest shared prefix of length >= 4 if one exists
    hexes = sorted(c.hex() for c in ids)
    for a, b in zip(hexes, hexes[1:], strict=False):
        n = next(i for i in range(64) if a[i] != b[i])
        if n >= 4:
            with pytest.raises(AmbiguousRevision):
                repo.resolve(a[:n])
            break


def test_status_and_nothing_to_commit(repo):
    with pytest.raises(NothingToCommit):
        repo.commit("empty")
    _write_ckpt(repo, "a.pt", 0)
    (open(os.path.join(repo.root, "untracked.txt"), "w")).write("x")
    st = repo.status()
    assert st.untracked == ["a.pt", "untracked.txt"]
    repo.add([os.path.join(repo.root, "a.pt")])
    assert repo.status().staged == {"a.pt": "added"}
    repo.commit("a")
    assert repo.status().clean
    with pytest.raises(NothingToCommit):
        repo.commit("again")
    _write_ckpt(repo, "a.pt", 5)
    assert repo.status().modified == ["a.pt"]
    os.unlink(os.path.join(repo.root, "a.pt"))
    assert repo.status().deleted == ["a.pt"]
    repo.add([os.path.join(repo.root, "a.pt")])  # adding a vanished tracked file stages its deletion
    assert repo.status().staged == {"a.pt": "deleted"}
    repo.commit("rm a")
    assert repo.ls() == {}


def test_status_uses_stat_cache(repo, monkeypatch):
    _write_ckpt(repo, "a.pt", 0)
    repo.add([os.path.join(repo.root, "a.pt")])
    repo.commit("a")
    import coralfs.worktree as mod

    def boom(fd):
        raise AssertionError("status re-hashed an unchanged file")

    monkeypatch.setattr(mod, "_hash_fd", boom)
    assert repo.status().clean


def test_checkout_refuses_to_overwrite_changes(repo):
    _write_ckpt(repo, "a.pt", 0)
    repo.add([os.path.join(repo.root, "a.pt")])
    repo.commit("a")
    repo.create_branch("b")
    repo.checkout("b")
    _write_ckpt(repo, "a.pt", 2)
    repo.add([os.path.join(repo.root, "a.pt")])
    repo.commit("a on b")
    repo.checkout("main")
    h = _write_ckpt(repo, "a.pt", 1)
    with pytest.raises(WouldOverwrite):
        repo.checkout("b")
    assert sha256(os.path.join(repo.root, "a.pt")) == h  # nothing lost
    repo.checkout("b", force=True)
    assert repo.status().clean


def test_rm(repo):
    _write_ckpt(repo, "d/a.pt", 0)
    _write_ckpt(repo, "d/b.pt", 1)
    repo.add([os.path.join(repo.root, "d")])
    repo.commit("two")
    repo.rm([os.path.join(repo.root, "d/a.pt")])
    assert not os.path.exists(os.path.join(repo.root, "d/a.pt"))
    repo.commit("rm")
    assert list(repo.ls()) == ["d/b.pt"]
    repo.rm([os.path.join(repo.root, "d/b.pt")], cached=True)
    repo.commit("rm cached")
    assert os.path.exists(os.path.join(repo.root, "d/b.pt")) and repo.ls() == {}


def test_branch_and_tag_management(repo):
    _write_ckpt(repo, "a.pt", 0)
    repo.add([os.path.join(repo.root, "a.pt")])
    c = repo.commit("a")
    repo.create_branch("exp/one")
    with pytest.raises(RefExists):
        repo.create_branch("exp/one")
    with pytest.raises(RefExists):
        repo.create_branch("exp")  # would be both a branch and a directory of branches
    for bad in ["", "..", "a/../b", "@x", "a/@b", "x:y", "a b", "/abs", "a\x00b", "HEAD"]:
        with pytest.raises(InvalidName):
            repo.create_branch(bad)
    assert set(repo.branches()) == {"main", "exp/one"}
    repo.delete_branch("exp/one")
    assert set(repo.branches()) == {"main"}
    repo.tag("v1", metrics={"acc": 1.0}, meta={"target": "k8s"})
    with pytest.raises(RefExists):
        repo.tag("v1")
    assert repo.resolve("v1") == c
    repo.delete_tag("v1")
    with pytest.raises(UnknownRevision):
        repo.resolve("v1")


def test_open_errors(tmp_path):
    with pytest.raises(NotARepository):
        Repository(tmp_path)
    Repository.init(tmp_path / "r").close()
    with pytest.raises(RepositoryExists):
        Repository.init(tmp_path / "r")


def test_repo_discovery_env_and_cwd(tmp_path, monkeypatch):
    Repository.init(tmp_path / "r").close()
    (tmp_path / "r" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "r" / "sub")
    assert Repository().root == str(tmp_path / "r")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CORALFS_REPO", str(tmp_path / "r"))
    assert Repository().root == str(tmp_path / "r")


def test_checkout_same_content_carries_changes_over(repo):
    _write_ckpt(repo, "a.pt", 0)
    repo.add([os.path.join(repo.root, "a.pt")])
    repo.commit("a")
    h = _write_ckpt(repo, "a.pt", 1)  # uncommitted change
    repo.create_branch("x")
    repo.checkout("x")  # same tree: allowed, change kept
    assert repo.current_branch() == "x"
    assert repo.status().modified == ["a.pt"] and sha256(os.path.join(repo.root, "a.pt")) == h
    repo.checkout("HEAD")  # stays attached
    assert repo.current_branch() == "x"
