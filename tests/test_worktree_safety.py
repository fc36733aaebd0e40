"""A repository can never touch anything outside its own directory (issue 13, item 2).

Hostile trees (crafted object bytes put straight into the store, bypassing validation),
hostile work trees (symlinks made by the user or swapped in during a checkout), paths
that are not UTF-8 or are long, and a checkout killed with SIGKILL at several points.
Every test that could hurt checks the files in ``tmp_path/outside`` (and ``tmp_path``
itself, where ``../x`` lands) by content hash and existence.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coralfs import cli, refs
from coralfs.errors import FormatError, InvalidPath, NameTooLong
from coralfs.fsck import fsck
from coralfs.hashing import digest
from coralfs.objects import TYPE_TREE, Commit, Tree, TreeEntry, check_path, deserialize
from coralfs.repository import Repository

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ helpers
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(top: Path) -> dict[str, str]:
    """rel path -> content hash (or link target, or 'dir') of everything under ``top``, links not followed."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, top)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                out[rel] = _sha(Path(p).read_bytes())
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim.txt").write_bytes(b"precious")
    (d / "secret.txt").write_bytes(b"not yours")
    return d


def outside_state(tmp_path: Path) -> dict[str, str]:
    """Everything in tmp_path except the repository itself."""
    return {k: v for k, v in snapshot(tmp_path).items() if not (k == "repo" or k.startswith("repo" + os.sep))}


def raw_object(type_: int, body: dict) -> bytes:
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    return b"CRO" + bytes((1, type_, 0)) + raw


def plant(repo: Repository, files: list[tuple[str, bytes]], branch: str = "evil") -> bytes:
    """A branch whose tree holds exactly ``files`` (path, content), paths unchecked."""
    entries = []
    for path, data in files:
        mid, _, _ = repo.ingest_buffer(memoryview(data), "x.bin")
        entries.append([path, mid.hex(), len(data), 0o100644])
    tree = raw_object(TYPE_TREE, {"entries": entries})
    tid = digest(tree)
    commit = Commit(tid, (), "mallory", 0.0, "hostile").serialize()
    cid = digest(commit)

    def fn(t):
        t.put("objects", tid, tree)
        t.put("objects", cid, commit)
        t.put("refs", refs.branch_key(branch), cid)
        t.put("index", b"c\x00" + cid, b"")

    repo.store.write(fn)
    return cid


def commit_files(repo: Repository, files: dict[str, bytes], message: str = "c") -> bytes:
    for p, data in files.items():
        fs = os.path.join(repo.root, p)
        os.makedirs(os.path.dirname(fs), exist_ok=True)
        Path(fs).write_bytes(data)
    repo.add([os.path.join(repo.root, p) for p in files])
    return repo.commit(message)


def coralfs(*args: str | bytes, cwd: str | os.PathLike[str] | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    e = dict(os.environ, PYTHONPATH=str(ROOT), CORALFS_AUTHOR="tester", **(env or {}))
    e.pop("CORALFS_REPO", None)
    return subprocess.run([sys.executable, "-m", "coralfs", *args], cwd=cwd, env=e, capture_output=True,
                          timeout=120)


# ------------------------------------------------------------------ hostile trees
HOSTILE = {
    "dotdot": "../x",
    "absolute": "{outside}/abs.txt",
    "dotdot-inside": "a/../../x",
    "control-dir": ".coralfs/store/data.mdb",
    "control-dir-case": ".CoralFS/store/data.mdb",
    "nul": "a\x00b",
    "empty-component": "a//b",
    "dot": "./a",
    "trailing-slash": "a/",
    "backslash": "..\\x",
    "name-too-long": "n" * 256,
    "path-too-long": "/".join(["d" * 200] * 21) + "/f",  # 4223 bytes
    "non-canonical": "\udcc3\udca9",  # the surrogate-escaped spelling of the valid UTF-8 "é"
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_tree_is_corrupt_and_checkout_touches_nothing(repo, tmp_path, outside, name):
    path = HOSTILE[name].format(outside=outside)
    commit_files(repo, {"keep.bin": b"k"})
    cid = plant(repo, [(path, b"pwned")])
    before_out, before_repo = outside_state(tmp_path), snapshot(Path(repo.root) / ".coralfs" / "store")
    with pytest.raises(FormatError, match="corrupt tree"):
        repo.checkout("evil")
    with pytest.raises(FormatError):
        repo.checkout("evil", force=True)
    assert outside_state(tmp_path) == before_out
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(outside / "abs.txt")
    assert snapshot(Path(repo.root) / ".coralfs" / "store").keys() == before_repo.keys()
    assert repo.current_branch() == "main" and repo.status().clean
    with pytest.raises(FormatError):
        repo.tree(cid)
    rep = fsck(repo)
    assert not rep.ok
    assert any(p.kind == "object" and "corrupt" in p.message for p in rep.problems), rep.problems


@pytest.mark.parametrize("paths", [["a", "a/b"], ["a/b", "a/b/c"], ["x", "x"]], ids=["file-dir", "nested", "dup"])
def test_tree_with_a_path_both_file_and_directory_is_corrupt(repo, paths):
    cid = plant(repo, [(p, b"v") for p in paths])
    with pytest.raises(FormatError, match="corrupt tree"):
        repo.tree(cid)
    assert not fsck(repo).ok


def test_cli_fsck_and_checkout_report_a_hostile_tree(repo, tmp_path, outside, capsys):
    commit_files(repo, {"keep.bin": b"k"})
    plant(repo, [("../x", b"pwned"), ("ok.bin", b"fine")])
    before = outside_state(tmp_path)
    assert cli.main(["-R", repo.root, "fsck"]) == 9
    out, err = capsys.readouterr()
    assert "corrupt tree" in out + err and "'..'" in out + err
    assert cli.main(["-R", repo.root, "checkout", "evil"]) == 9
    assert "corrupt tree" in capsys.readouterr().err
    assert outside_state(tmp_path) == before


def test_check_path_limits():
    assert check_path("n" * 255) == "n" * 255
    with pytest.raises(NameTooLong):
        check_path("n" * 256)
    with pytest.raises(NameTooLong):
        check_path("é" * 128)  # 256 bytes in 128 characters: limits are in bytes
    deep = "/".join(["d" * 254] * 16)  # 4079 bytes
    assert check_path(deep + "/" + "f" * 15) == deep + "/" + "f" * 15  # 4095 bytes
    with pytest.raises(NameTooLong):
        check_path(deep + "/" + "f" * 16)  # 4096
    assert check_path(os.fsdecode(b"caf\xe9.bin")) == "caf\udce9.bin"
    for bad in ("\udcc3\udca9", "\ud800x", "a\x00", "../a", "/a", "a/./b", ".coralfs", "a\\b", ""):
        with pytest.raises(InvalidPath):
            check_path(bad)


def test_object_bytes_of_valid_utf8_are_unchanged():
    """surrogatepass only changes objects that could not be stored before: ids stay."""
    m = bytes(range(32))
    tree = Tree({"é/ü.bin": TreeEntry(m, 3), "plain.pt": TreeEntry(m, 5)})
    body = {"entries": [[p, e.manifest.hex(), e.size, e.mode] for p, e in sorted(tree.entries.items())]}
    old = b"CRO" + bytes((1, TYPE_TREE, 0)) + json.dumps(body, sort_keys=True, separators=(",", ":"),
                                                         ensure_ascii=False).encode()
    assert tree.serialize() == old
    odd = Tree({os.fsdecode(b"caf\xe9.bin"): TreeEntry(m, 3)})
    assert deserialize(odd.serialize()) == odd
