"""A repository can never touch anything outside its own directory.

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
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from coralfs import cli
from coralfs.errors import FormatError, InvalidPath, NameTooLong, UnsafePath
from coralfs.fsck import fsck
from coralfs.gc import gc
from coralfs.hashing import digest
from coralfs.repository import Repository
from coralfs.store import keys, refs
from coralfs.store.objects import TYPE_TREE, Commit, Tree, TreeEntry, check_path, deserialize
from coralfs.store.refs import Refs
from coralfs.worktree import JOURNAL

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
        Refs(t).set(refs.branch_ref(branch), cid)
        Refs(t).index_commit(cid)

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


def test_hostile_stage_entry_is_refused_reported_and_repairable(repo, tmp_path, outside):
    commit_files(repo, {"keep.bin": b"k"})
    mid, man, _ = repo.ingest_buffer(memoryview(b"pwned"), "x.bin")
    value = json.dumps({"m": mid.hex(), "size": man.size, "mode": 0o100644}).encode()
    repo.store.write(lambda t: t.put("stage", b"../x", value))
    before = outside_state(tmp_path)
    for op in (repo.status, lambda: repo.commit("evil"), lambda: repo.rm([os.path.join(repo.root, "keep.bin")])):
        with pytest.raises(FormatError, match="corrupt path key"):
            op()
    assert outside_state(tmp_path) == before and repo.ls("HEAD").keys() == {"keep.bin"}
    rep = fsck(repo)
    assert [p.kind for p in rep.problems] == ["stage"] and "'..'" in rep.problems[0].message
    assert fsck(repo, repair=True).ok and fsck(repo).ok
    assert repo.status().clean


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


# ------------------------------------------------------------------ non-UTF-8 and long paths
def _write_at(root: str, rel: bytes, data: bytes) -> None:
    """Create ``root/rel`` through directory fds (a 4000-byte path is over PATH_MAX as one string)."""
    parts = rel.split(b"/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        f = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
        os.write(f, data)
        os.close(f)
    finally:
        os.close(fd)


def _read_at(root: str, rel: bytes) -> bytes | None:
    parts = rel.split(b"/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        f = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            return os.read(f, 1 << 20)
        finally:
            os.close(f)
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)


ODD_PATHS = {
    "non-utf8": b"caf\xe9/\xff\xfe-weights.bin",
    "300-bytes": b"p" * 150 + b"/" + b"q" * 149,
    "600-bytes": b"/".join([b"r" * 199, b"s" * 199, b"t" * 200]),
    "4000-bytes": b"/".join([b"u" * 249] * 15 + [b"\xe9" * 250]),
    "255-byte-non-utf8-name": b"\xff" * 255,
}


@pytest.mark.parametrize("name", sorted(ODD_PATHS))
def test_odd_paths_round_trip(repo, name):
    raw = ODD_PATHS[name]
    path = os.fsdecode(raw)
    assert len(raw) <= 4000 and check_path(path) == path and (name != "4000-bytes" or len(raw) == 4000)
    data = name.encode() * 1000
    commit_files(repo, {"base.bin": b"base"}, "base")
    repo.create_branch("plain")
    _write_at(repo.root, raw, data)
    assert repo.status().untracked == [path]
    repo.add([os.path.join(repo.root, path)])
    assert repo.status().staged == {path: "added"}
    cid = repo.commit("odd")
    st = repo.status()
    assert st.clean and not st.untracked, st
    assert repo.ls(cid)[path].size == len(data)
    with repo.open(cid, path) as f:
        assert f.read() == data
    repo.checkout("plain")
    assert _read_at(repo.root, raw) is None and repo.status().clean
    assert set(os.listdir(repo.root)) == {".coralfs", "base.bin"}  # directories of the odd path pruned
    repo.checkout("main")
    assert _read_at(repo.root, raw) == data
    assert repo.status().clean
    # a changed file is seen as modified, restaged, committed
    _write_at(repo.root, raw, data + b"!")
    assert repo.status().modified == [path]
    repo.add([os.path.join(repo.root, path)])
    repo.commit("changed")
    assert repo.status().clean
    assert repo.rm([os.path.join(repo.root, path)]) == [path]
    assert _read_at(repo.root, raw) is None
    assert repo.status().staged == {path: "deleted"}
    repo.commit("gone")
    assert path not in repo.ls("HEAD")
    assert fsck(repo).ok
    gc(repo, grace=0)
    repo.checkout("HEAD~1")
    assert _read_at(repo.root, raw) == data + b"!"


def test_long_paths_use_hashed_keys_with_the_path_in_the_value(repo):
    path = "/".join(["k" * 200] * 3)
    _write_at(repo.root, os.fsencode(path), b"long")
    repo.add([os.path.join(repo.root, path.split("/")[0])])  # a directory: found by walking
    with repo.store.read() as t:
        stage = list(t.items("stage"))
        stat_keys = [(k, v) for k, v in t.items(keys.INDEX, keys.STAT_CACHE)]
    assert len(stage) == 1 and stage[0][0].startswith(b"/") and json.loads(stage[0][1])["path"] == path
    assert len(stat_keys) == 1 and json.loads(stat_keys[0][1])["path"] == path
    # a deleted directory is staged as deleted through a scan (a prefix scan would miss the hashed key)
    repo.commit("long")
    import shutil

    shutil.rmtree(os.path.join(repo.root, "k" * 200))
    repo.add([os.path.join(repo.root, "k" * 200)])
    assert repo.status().staged == {path: "deleted"}
    repo.rm([os.path.join(repo.root, "k" * 200)], cached=True)  # unstage-by-rm finds it too
    # staged without a work-tree file (what save() does): the skip-worktree key is hashed too
    repo.commit("rm")
    saved = "/".join(["s" * 200] * 3)
    mid, man, _ = repo.ingest_buffer(memoryview(b"saved"), "x.bin")
    repo.stage_entry(saved, TreeEntry(mid, man.size))
    with repo.store.read() as t:
        skip = list(t.items(keys.INDEX, keys.SKIP_WORKTREE))
    assert len(skip) == 1 and json.loads(skip[0][1])["path"] == saved
    st = repo.status()
    assert st.staged == {saved: "added"} and st.deleted == []
    assert fsck(repo).ok
    repo.commit("saved")
    repo.checkout("HEAD", force=True)  # materialises it
    assert _read_at(repo.root, os.fsencode(saved)) == b"saved"


def test_cli_non_utf8_name(repo, tmp_path):
    name = b"caf\xe9.bin"
    with open(os.path.join(os.fsencode(repo.root), name), "wb") as f:
        f.write(b"latin-1 name")
    r = coralfs(b"add", name, cwd=repo.root)
    assert r.returncode == 0, r.stderr
    r = coralfs("status", cwd=repo.root)
    assert r.returncode == 0 and b"added:     caf\xe9.bin\n" in r.stdout, r
    assert coralfs("commit", "-m", "odd", cwd=repo.root).returncode == 0
    assert b"caf\xe9.bin" in coralfs("ls", "HEAD", cwd=repo.root).stdout


# ------------------------------------------------------------------ hostile work trees
def _main_and_branch(repo: Repository) -> None:
    """main: keep.bin; branch b: keep.bin, d/secret.txt, d/sub/x.bin."""
    commit_files(repo, {"keep.bin": b"k"}, "main")
    repo.create_branch("b")
    repo.checkout("b")
    commit_files(repo, {"d/secret.txt": b"from the repo", "d/sub/x.bin": b"x"}, "b")
    repo.checkout("main")
    assert not os.path.exists(os.path.join(repo.root, "d"))


@pytest.mark.parametrize("force", [False, True])
def test_checkout_refuses_to_write_through_a_symlinked_directory(repo, tmp_path, outside, force):
    _main_and_branch(repo)
    os.symlink(outside, os.path.join(repo.root, "d"))
    before = outside_state(tmp_path)
    with pytest.raises(UnsafePath, match="d is a symbolic link"):
        repo.checkout("b", force=force)
    assert outside_state(tmp_path) == before
    assert (outside / "secret.txt").read_bytes() == b"not yours"
    assert repo.current_branch() == "main" and not os.path.exists(os.path.join(repo.control, JOURNAL))
    os.unlink(os.path.join(repo.root, "d"))
    repo.checkout("b")
    assert Path(repo.root, "d", "secret.txt").read_bytes() == b"from the repo"


@pytest.mark.parametrize("force", [False, True])
def test_checkout_refuses_to_delete_through_a_symlinked_directory(repo, tmp_path, outside, force):
    _main_and_branch(repo)
    repo.checkout("b")
    # the user moves d away and puts a symlink to a directory with same-named files in its place
    os.rename(os.path.join(repo.root, "d"), tmp_path / "moved")
    (outside / "sub").mkdir()
    (outside / "sub" / "x.bin").write_bytes(b"x")
    os.symlink(outside, os.path.join(repo.root, "d"))
    before = outside_state(tmp_path)
    with pytest.raises(UnsafePath, match="symbolic link"):
        repo.checkout("main", force=force)
    assert outside_state(tmp_path) == before
    assert (outside / "victim.txt").exists() and (outside / "sub" / "x.bin").exists()
    assert repo.current_branch() == "b"


def test_symlink_at_a_file_path_refused_unless_force_then_replaced_not_followed(repo, tmp_path, outside):
    commit_files(repo, {"a.bin": b"one"}, "one")
    repo.create_branch("two")
    repo.checkout("two")
    commit_files(repo, {"a.bin": b"two"}, "two")
    os.unlink(os.path.join(repo.root, "a.bin"))
    os.symlink(outside / "victim.txt", os.path.join(repo.root, "a.bin"))
    before = outside_state(tmp_path)
    with pytest.raises(UnsafePath, match="a.bin is a symbolic link"):
        repo.checkout("main")
    assert outside_state(tmp_path) == before and repo.current_branch() == "two"
    repo.checkout("main", force=True)
    assert outside_state(tmp_path) == before  # the link's target is untouched
    assert not os.path.islink(os.path.join(repo.root, "a.bin"))
    assert Path(repo.root, "a.bin").read_bytes() == b"one" and repo.status().clean


def test_untracked_file_where_a_directory_must_go_refuses_before_any_change(repo):
    _main_and_branch(repo)
    Path(repo.root, "d").write_bytes(b"mine")  # untracked file in the way of d/
    Path(repo.root, "keep.bin").write_bytes(b"k")
    with pytest.raises(UnsafePath, match="is a file, not a directory"):
        repo.checkout("b", force=True)
    assert Path(repo.root, "d").read_bytes() == b"mine" and repo.current_branch() == "main"


def test_symlink_swapped_in_during_checkout_is_never_followed(repo, tmp_path, outside):
    _main_and_branch(repo)
    moved = tmp_path / "moved"

    def progress(path: str):
        if path == "d/sub/x.bin":  # d/secret.txt is written; now d becomes a link to outside
            os.rename(os.path.join(repo.root, "d"), moved)
            os.symlink(outside, os.path.join(repo.root, "d"))
        return None

    before = outside_state(tmp_path)
    with pytest.raises(UnsafePath, match="d is a symbolic link"):
        repo.checkout("b", progress=progress)
    after = outside_state(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("moved")} == {
        k: v for k, v in before.items()}
    assert (outside / "secret.txt").read_bytes() == b"not yours" and not (outside / "sub").exists()
    # the checkout stays pending: every work-tree command tries to finish it, and refuses while d is a link
    assert os.path.exists(os.path.join(repo.control, JOURNAL))
    with pytest.raises(UnsafePath):
        repo.status()
    os.unlink(os.path.join(repo.root, "d"))
    st = repo.status()  # finishes the checkout
    assert st.branch == "b" and st.clean and not st.untracked, st
    assert Path(repo.root, "d", "sub", "x.bin").read_bytes() == b"x"
    assert not os.path.exists(os.path.join(repo.control, JOURNAL))


# ------------------------------------------------------------------ add / rm / import never read outside
def test_add_refuses_symlinks_and_never_stores_their_targets(repo, tmp_path, outside):
    root = Path(repo.root)
    os.symlink(outside / "secret.txt", root / "link.txt")
    (root / "dir").mkdir()
    os.symlink(outside, root / "dir" / "out")
    (root / "dir" / "real.bin").write_bytes(b"real")
    with pytest.raises(InvalidPath, match="link.txt: is a symbolic link; symlinks are not stored"):
        repo.add([root / "link.txt"])
    with pytest.raises(UnsafePath, match="dir/out is a symbolic link"):
        repo.add([root / "dir" / "out" / "secret.txt"])
    skipped: list[tuple[str, str]] = []
    repo.add([root / "dir"], on_skip=lambda p, why: skipped.append((p, why)))
    assert skipped == [("dir/out", "symbolic link (not stored)")]
    repo.add([root], on_skip=lambda p, why: skipped.append((p, why)))  # `add .`
    assert ("link.txt", "symbolic link (not stored)") in skipped
    assert repo.status().staged == {"dir/real.bin": "added"}
    cid = repo.commit("no links")
    assert set(repo.ls(cid)) == {"dir/real.bin"}


def test_add_reads_the_file_it_checked_not_a_swapped_in_symlink(repo, outside, monkeypatch):
    from coralfs.worktree_fs import WorkTree

    target = Path(repo.root, "model.bin")
    target.write_bytes(b"mine")
    real_open = WorkTree.open_read

    def swap_then_open(self, path):  # the file is checked (lstat), then swapped for a link, then opened
        os.unlink(target)
        os.symlink(outside / "secret.txt", target)
        return real_open(self, path)

    monkeypatch.setattr(WorkTree, "open_read", swap_then_open)
    with pytest.raises(InvalidPath, match="symbolic link"):
        repo.add([target])
    with repo.store.read() as t:
        assert list(t.items("stage")) == []


def test_rm_refuses_a_path_through_a_symlinked_directory(repo, tmp_path, outside):
    commit_files(repo, {"d/victim.txt": b"tracked"}, "d")
    os.rename(os.path.join(repo.root, "d"), tmp_path / "moved")
    os.symlink(outside, os.path.join(repo.root, "d"))
    before = outside_state(tmp_path)
    with pytest.raises(UnsafePath):
        repo.rm([os.path.join(repo.root, "d", "victim.txt")])
    with pytest.raises(UnsafePath):
        repo.rm([os.path.join(repo.root, "d")])
    assert outside_state(tmp_path) == before and (outside / "victim.txt").read_bytes() == b"precious"
    assert repo.status().staged == {}
    assert repo.rm([os.path.join(repo.root, "d")], cached=True) == ["d/victim.txt"]  # the index only


def test_cli_add_and_import_warn_about_symlinks(repo, tmp_path, outside, cli):
    root = Path(repo.root)
    (root / "dir").mkdir()
    (root / "dir" / "a.bin").write_bytes(b"a")
    os.symlink(outside / "secret.txt", root / "dir" / "s.txt")
    rc, _, err = cli("add", "dir", cwd=root)
    assert rc == 0 and "warning: skipped dir/s.txt: symbolic link" in err, err
    rc, _, err = cli("add", "dir/s.txt", cwd=root)
    assert rc == 2 and "symlinks are not stored" in err, err
    assert cli("commit", "-m", "a", cwd=root)[0] == 0
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_bytes(b"{}")
    os.symlink(outside / "secret.txt", src / "tokenizer.json")
    os.symlink(outside, src / "sub" / "linked")
    rc, _, err = cli("import", str(src), "-m", "import", "--no-checkout", cwd=root)
    assert rc == 0, err
    assert "skipped" in err and "tokenizer.json" in err and "linked" in err
    with Repository(root) as again:
        assert set(again.ls("main")) == {"dir/a.bin", "config.json"}


# ------------------------------------------------------------------ killed checkout
def _tree_hashes(repo: Repository, rev: str) -> dict[str, str]:
    out = {}
    for p in repo.ls(rev):
        with repo.open(rev, p) as f:
            out[p] = _sha(f.read())
    return out


def _worktree_hashes(root: str) -> dict[str, str]:
    return {k: v for k, v in snapshot(Path(root)).items()
            if not k.startswith(".coralfs") and v != "dir"}


@pytest.fixture(scope="module")
def two_branches_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """main: 6 files; b: 4 of them changed, 2 deleted, 3 new (files of several pieces)."""
    root = tmp_path_factory.mktemp("two_branches") / "repo"
    with Repository.init(root) as repo:
        commit_files(repo, {f"m/{i}.bin": os.urandom(200_000) for i in range(6)}, "main")
        repo.create_branch("b")
        repo.checkout("b")
        for i in range(2):
            os.unlink(root / "m" / f"{i}.bin")
        repo.add([root / "m" / f"{i}.bin" for i in range(2)])
        commit_files(repo, {**{f"m/{i}.bin": os.urandom(150_000) for i in range(2, 6)},
                            **{f"n/{i}.bin": os.urandom(100_000) for i in range(3)}}, "b")
        repo.checkout("main")
    return root


@pytest.fixture
def two_branches(two_branches_template: Path, tmp_path: Path) -> str:
    """A copy of ``two_branches_template`` (made once per module), checked out at main."""
    root = tmp_path / "repo"
    shutil.copytree(two_branches_template, root, symlinks=True, ignore=shutil.ignore_patterns("lock.mdb"))
    return str(root)


@pytest.mark.parametrize("point", ["journal", "change:1", "change:3", "change:6", "temp:1", "temp:4", "refs"])
@pytest.mark.parametrize("rerun", ["checkout", "status"])
def test_killed_checkout_is_finished_by_the_next_command(two_branches, point, rerun, cli):
    root = two_branches
    r = coralfs("checkout", "b", cwd=root, env={"CORALFS_CHECKOUT_KILL_AT": point})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert os.path.exists(os.path.join(root, ".coralfs", JOURNAL))
    rc, _, err = cli(rerun, *(["b"] if rerun == "checkout" else []), cwd=root)  # (in this process)
    assert rc == 0, err
    with Repository(root) as repo:
        assert repo.current_branch() == "b"
        assert _worktree_hashes(root) == _tree_hashes(repo, "b")
        st = repo.status()
        assert st.clean and not st.untracked, st
    leftovers = [p for p in snapshot(Path(root)) if ".coralfs-tmp" in p]
    assert leftovers == [] and not os.path.exists(os.path.join(root, ".coralfs", JOURNAL))


def test_temp_files_are_left_by_a_kill_and_removed_by_the_rerun(two_branches, cli):
    root = two_branches
    r = coralfs("checkout", "b", cwd=root, env={"CORALFS_CHECKOUT_KILL_AT": "temp:2"})
    assert r.returncode == -signal.SIGKILL
    temps = [p for p in snapshot(Path(root)) if os.path.basename(p).startswith(".coralfs-tmp-")]
    assert len(temps) == 1
    st = os.stat(os.path.join(root, temps[0]))
    assert stat.S_ISREG(st.st_mode)
    assert cli("checkout", "main", cwd=root)[0] == 0  # another target: finishes b first
    with Repository(root) as repo:
        assert repo.current_branch() == "main" and _worktree_hashes(root) == _tree_hashes(repo, "main")
        assert [log[1].message for log in repo.log("HEAD")] == ["main"]
    assert not [p for p in snapshot(Path(root)) if ".coralfs-tmp" in p]


def test_a_killed_recovery_is_recovered_the_same_way(two_branches, cli):
    root = two_branches
    assert coralfs("checkout", "b", cwd=root, env={"CORALFS_CHECKOUT_KILL_AT": "change:2"}).returncode == -signal.SIGKILL
    r = coralfs("status", cwd=root, env={"CORALFS_CHECKOUT_KILL_AT": "temp:2"})  # the recovery dies too
    assert r.returncode == -signal.SIGKILL
    rc, _, err = cli("add", ".", cwd=root)  # any work-tree command finishes it
    assert rc == 0, err
    with Repository(root) as repo:
        assert repo.current_branch() == "b" and _worktree_hashes(root) == _tree_hashes(repo, "b")
        assert repo.status().clean
    assert not [p for p in snapshot(Path(root)) if ".coralfs-tmp" in p]


def test_one_checkout_at_a_time(two_branches):
    import fcntl

    from coralfs.errors import ConcurrentUpdate

    with Repository(two_branches) as repo:
        fd = os.open(os.path.join(repo.control, "checkout.lock"), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # as another process's checkout would hold it
            with pytest.raises(ConcurrentUpdate, match="another process is checking out"):
                repo.checkout("b")
        finally:
            os.close(fd)
        assert repo.current_branch() == "main"
        repo.checkout("b")
        assert repo.current_branch() == "b" and repo.status().clean
