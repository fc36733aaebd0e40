"""Only what close()/fsync() acknowledged is ever committed; one writable mount per repository;
other users get the permissions the mount shows. Real FUSE mounts, real disk-full, real other users."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from coralfs.fsck import fsck
from coralfs.repository import Repository
from tests.conftest import fuse_unavailable_reason
from tests.test_mount_write import api_sha, cli, fsync_dir, seeded, sha, wait_for


@contextlib.contextmanager
def small_tmpfs(size: str) -> object:
    """A tmpfs of ``size`` (root only), unmounted afterwards."""
    d = tempfile.mkdtemp(prefix="coralfs-full-")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], capture_output=True, text=True)
    if res.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")
    try:
        yield Path(d)
    finally:
        subprocess.run(["umount", "-l", d], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def test_write_that_hit_enospc_is_never_committed(fuse_mount, tmp_path: Path) -> None:
    """The adversarial run's case: a cp into the mount hit ENOSPC (cp reported it, close
    failed); once space was freed, a directory fsync or the unmount committed a prefix of the
    file. Now the failed file is discarded when its last handle goes, never committed."""
    if fuse_unavailable_reason():
        pytest.skip(fuse_unavailable_reason())
    with small_tmpfs("24m") as disk:
        repo = Repository.init(disk / "repo", auto_repack=False)
        try:
            (disk / "repo" / "small.txt").write_bytes(b"small")
            repo.add([disk / "repo" / "small.txt"])
            repo.commit("seed")
            head = repo.branch_head("main")
            m = fuse_mount(repo.root, "--commit-delay", "60")
            src = tmp_path / "big.bin"
            src.write_bytes(os.urandom(40 << 20))  # more than the disk holds
            res = subprocess.run(["cp", str(src), m / "main/big.bin"], capture_output=True, text=True)
            assert res.returncode != 0 and "No space left" in res.stderr, res.stderr
            # the failed file's space is given back when its last handle goes (FUSE releases it
            # asynchronously after cp's close)
            wait_for(lambda: os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > 16 << 20, what="free space")
            (Path(m.path) / "main/after.txt").write_bytes(b"space is back")
            fsync_dir(m / "main")
            assert "big.bin" not in repo.ls("main") and "after.txt" in repo.ls("main")
            assert "big.bin" not in os.listdir(m / "main")
            m.stop()  # nor at the unmount
            assert "big.bin" not in repo.ls("main")
            assert repo.get_commit(repo.branch_head("main")).parents == (head,)
            assert "discarded main/big.bin" in Path(m.log).read_text()
            assert fsck(repo).ok
        finally:
            repo.close()


def test_open_half_written_file_is_not_committed(make_repo, fuse_mount) -> None:
    """A fork+exec while a file is open for writing makes the kernel send a FUSE flush (the
    child's copy of the descriptor is closed): that stores the half file, but a commit
    (flush-mount, a directory fsync, the quiet period) must never take a file that is still
    open for writing; the rest of the burst is committed."""
    repo = seeded(make_repo)
    m = fuse_mount(repo.root, "--commit-delay", "0.3")
    b = Path(m.path) / "main"
    head = repo.branch_head("main")
    part = os.urandom(1 << 20)
    with open(b / "model.bin", "wb") as f:
        f.write(part)
        f.flush()
        subprocess.run(["true"], check=True)  # the child's close: a FUSE flush of the half file
        (b / "other.txt").write_bytes(b"other")
        out = cli("flush-mount", repo.root).stdout
        assert "mount: add other.txt" in out, out
        assert "model.bin" not in repo.ls("main") and "other.txt" in repo.ls("main")
        fsync_dir(b)
        assert "model.bin" not in repo.ls("main")
        f.write(part)
    wait_for(lambda: "model.bin" in repo.ls("main"), what="the commit after the close")
    assert api_sha(repo, "main", "model.bin") == sha(part + part)
    for c, _commit in repo.log("main"):  # no commit ever held half of it
        if c != head and "model.bin" in repo.ls(c):
            assert api_sha(repo, c, "model.bin") == sha(part + part)


def test_second_writable_mount_is_refused(make_repo, fuse_mount, tmp_path: Path) -> None:
    repo = seeded(make_repo)
    m = fuse_mount(repo.root)
    mp2 = tmp_path / "second"
    mp2.mkdir()
    res = cli("mount", repo.root, str(mp2), check=False)
    if os.path.ismount(mp2):  # (a failure: never leave it mounted)
        cli("umount", "--lazy", str(mp2), check=False)
    assert res.returncode != 0
    assert f"already mounted writable by pid {m.proc.pid} on {m.path}" in res.stderr, res.stderr
    assert not os.path.ismount(mp2)
    # a read-only second mount commits nothing: allowed
    m2 = fuse_mount(repo.root, "--read-only")
    assert os.listdir(Path(m2.path) / "main") == os.listdir(Path(m.path) / "main")
    m.stop()
    res = cli("flush-mount", repo.root)  # no writable mount any more: the CLI commits itself
    assert res.returncode == 0


def _as_nobody(cmd: str) -> subprocess.CompletedProcess[str]:
    """A shell command run as user nobody (uid/gid 65534)."""
    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    return subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, preexec_fn=drop, timeout=60,
                          cwd="/")


@pytest.fixture
def public_dir():
    """Mount points other users can reach (pytest's tmp_path is private to root)."""
    d = tempfile.mkdtemp(prefix="coralfs-public-")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_allow_other_reads_but_only_owner_writes(make_repo, fuse_mounter, public_dir: Path) -> None:
    repo = seeded(make_repo)
    m = fuse_mounter(repo.root, public_dir / "mnt", "--allow-other", "--commit-delay", "60")
    try:
        main = Path(m.path) / "main"
        st = os.stat(main / "config.json")
        assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o644
        assert os.stat(main).st_mode & 0o777 == 0o755
        res = _as_nobody(f"cat '{main / 'config.json'}'")
        assert res.returncode == 0 and '"hidden"' in res.stdout, res.stderr
        for op in (f"echo evil > '{main / 'evil.txt'}'", f"echo evil > '{main / 'config.json'}'",
                   f"rm -f '{main / 'config.json'}'", f"mkdir '{Path(m.path) / 'evilbranch'}'",
                   f"mv '{main / 'config.json'}' '{main / 'moved.json'}'", f"truncate -s 0 '{main / 'config.json'}'"):
            res = _as_nobody(op)
            assert res.returncode != 0 and "Permission denied" in res.stderr, (op, res.stderr)
        head = repo.branch_head("main")
        fsync_dir(main)
        assert repo.branch_head("main") == head and "evilbranch" not in repo.branches()
    finally:
        m.stop()


def test_allow_other_write_records_who_wrote(make_repo, fuse_mounter, public_dir: Path) -> None:
    repo = seeded(make_repo)
    m = fuse_mounter(repo.root, public_dir / "mnt", "--allow-other", "--allow-other-write", "--commit-delay", "60")
    try:
        main = Path(m.path) / "main"
        assert os.stat(main / "config.json").st_mode & 0o777 == 0o666
        res = _as_nobody(f"echo hello > '{main / 'by-nobody.txt'}'")
        assert res.returncode == 0, res.stderr
        fsync_dir(main)
        c = repo.get_commit(repo.branch_head("main"))
        assert c.message == "mount: add by-nobody.txt"
        try:
            nobody = pwd.getpwuid(65534).pw_name
        except KeyError:
            nobody = "uid65534"
        assert c.author == f"{nobody}@mount" and c.meta.get("writers") == nobody
        (main / "by-owner.txt").write_bytes(b"owner")
        fsync_dir(main)
        c = repo.get_commit(repo.branch_head("main"))
        assert c.author == "tester" and "writers" not in c.meta  # (CORALFS_AUTHOR in the tests)
    finally:
        m.stop()


def test_empty_repository_shows_its_default_branch(make_repo, fuse_mount) -> None:
    repo = make_repo()
    m = fuse_mount(repo.root, "--commit-delay", "60")
    root = Path(m.path)
    assert "main" in os.listdir(root) and os.listdir(root / "main") == []
    with pytest.raises(OSError) as ei:
        os.rmdir(root / "main")
    assert ei.value.errno == errno.EBUSY
    (root / "main" / "sub").mkdir()
    (root / "main" / "sub" / "first.bin").write_bytes(b"first")
    fsync_dir(root / "main")
    c = repo.branch_head("main")
    assert c is not None and repo.get_commit(c).parents == () and repo.ls("main") == {"sub/first.bin": repo.entry(
        "main", "sub/first.bin")}
    assert api_sha(repo, "main", "sub/first.bin") == sha(b"first")
    (root / "main" / "sub" / "first.bin").write_bytes(b"second")  # and the next commit goes on top
    fsync_dir(root / "main")
    assert repo.get_commit(repo.branch_head("main")).parents == (c,)


def test_unstorable_names_are_refused_before_any_data(make_repo, fuse_mount) -> None:
    """A name the repository cannot store or check out is refused when the file (or directory)
    is created, never at close() after the data was accepted."""
    repo = seeded(make_repo)
    m = fuse_mount(repo.root, "--commit-delay", "60")
    b = Path(m.path) / "main"
    long = "x" * 256  # a local file system's limit is 255 bytes a name (FUSE would pass 1024)
    for op in (lambda: open(b / long, "wb"), lambda: os.mkdir(b / long),
               lambda: os.rename(b / "config.json", b / long)):
        with pytest.raises(OSError) as ei:
            op()
        assert ei.value.errno == errno.ENAMETOOLONG
    deep = b
    for _ in range(20):  # 20 x 250 bytes: a path over 4095 bytes
        deep = deep / ("d" * 249)
    with pytest.raises(OSError) as ei:
        os.makedirs(deep)
    assert ei.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as ei:
        open(b / ".coralfs", "wb")  # reserved (the store's directory in a work tree)
    assert ei.value.errno == errno.EINVAL
    ok = "y" * 255
    (b / ok).write_bytes(b"fits")
    fsync_dir(b)
    assert api_sha(repo, "main", ok) == sha(b"fits")
    assert not [p for p in repo.ls("main") if p.startswith("x")]
