"""A full disk: a clear NoSpace (exit 12, ENOSPC), nothing lost, nothing left behind.

The real cases run on small file systems mounted for the test (a tmpfs and an ext4 loop
image: both need root, else they are skipped with the reason), with a real checkpoint that
does not fit. The rest checks the cleanup's safety rules with simulated failures: a record
another process deduplicated against is kept, a busy repository leaves the records for gc,
a failing removal says so.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest

torch = pytest.importorskip("torch")

from coralfs import ingest  # noqa: E402
from coralfs.errors import NoSpace  # noqa: E402
from coralfs.repository import Repository  # noqa: E402
from coralfs.store.lmdb import Store  # noqa: E402
from tests.factories import save_pt, sha256, training_series  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# fsync stays on here (conftest turns it off elsewhere): a full disk may show at the sync
ENV = dict(os.environ, CORALFS_AUTO_REPACK="0", CORALFS_UNSAFE_NO_FSYNC="0",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest.fixture(autouse=True)
def _fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORALFS_UNSAFE_NO_FSYNC", "0")


# ------------------------------------------------------------------ small file systems
def _run(*cmd: str | os.PathLike[str]) -> subprocess.CompletedProcess:
    return subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True)


@pytest.fixture(params=["tmpfs", "ext4"])
def small_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A freshly mounted 128 MiB file system (always unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if request.param == "tmpfs":
        p = _run("mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", mnt)
    else:
        img = tmp_path / "fs.img"
        with open(img, "wb") as f:
            f.truncate(160 << 20)
        p = _run("mkfs.ext4", "-q", "-F", img)
        if p.returncode:
            pytest.skip(f"mkfs.ext4 failed: {p.stderr.strip()}")
        p = _run("mount", "-o", "loop", img, mnt)
    if p.returncode:
        pytest.skip(f"cannot mount a {request.param} here: {p.stderr.strip()}")

    def unmount() -> None:
        if _run("umount", mnt).returncode:
            _run("umount", "-l", mnt)

    request.addfinalizer(unmount)
    return mnt


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize  # the tests run as root, which may use the reserve


def _fill(fs: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free."""
    filler = fs / "filler"
    with open(filler, "wb") as f:
        block = b"\xa5" * (1 << 20)
        while _free(fs) > leave + len(block):
            f.write(block)
            f.flush()
            os.fsync(f.fileno())
    return filler


def _counts(root: Path) -> tuple[int, int]:
    r = Repository(root, auto_repack=False)
    try:
        with r.store.read() as t:
            return t.stat("chunks")["entries"], t.stat("objects")["entries"]
    finally:
        r.close()


def _big_checkpoint(path: Path) -> Path:
    """A real model's state dict, ~47 MB of float32 weights (does not compress much)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1536, 1536) for _ in range(5)])
    return save_pt(model.state_dict(), path)


@pytest.mark.parametrize("small_batch", [True, False], ids=["batches-stored-first", "one-batch"])
def test_cli_add_on_a_full_disk(small_fs, small_batch, cli, monkeypatch):
    """``coralfs add`` of a checkpoint that does not fit: exit 12 and one clear line; every earlier
    commit reads back bit-exactly, fsck is ok, no garbage; once space is freed the add succeeds.
    (The CLI runs in this process; ``small_batch``: ingest batches of 2 MiB instead of 64, so
    several are stored before the disk is full.)"""
    monkeypatch.setenv("CORALFS_AUTO_REPACK", "0")
    if small_batch:
        monkeypatch.setattr(ingest, "BATCH_BYTES", 2 << 20)
    root = small_fs / "repo"
    r = Repository.init(root, auto_repack=False)
    earlier = {}
    for i, ck in enumerate(training_series(2)):
        p = save_pt(ck, root / f"ckpt{i}.pt")
        earlier[p.name] = sha256(p)
        r.add([p])
        r.commit(f"checkpoint {i}")
    r.close()
    big = _big_checkpoint(root / "big.pt")
    before = _counts(root)
    filler = _fill(small_fs, 20 << 20)

    rc, _, err = cli("-R", root, "add", big)
    assert rc == NoSpace.exit_code == 12, err
    assert err.count("\n") == 1 and err.startswith("coralfs: error: no space left on device"), err
    assert "unexpected" not in err and "Traceback" not in err and "BufferError" not in err
    if small_batch:  # batches were stored before the disk filled up: removed again
        assert "were removed" in err and "nothing is left behind" in err, err

    assert _counts(root) == before  # no chunk or object left behind
    rc, out, err = cli("-R", root, "fsck")
    assert rc == 0 and out.splitlines()[1] == "ok", (out, err)
    r = Repository(root, auto_repack=False)
    try:
        from coralfs.gc import gc

        assert gc(r, dry_run=True).chunks_swept == 0
        for name, digest in earlier.items():
            assert hashlib.sha256(r.open("HEAD", name).read()).hexdigest() == digest
        assert "big.pt" in r.status().untracked  # not staged
    finally:
        r.close()

    filler.unlink()
    rc, _, err = cli("-R", root, "add", big)
    assert rc == 0, err
    r = Repository(root, auto_repack=False)
    try:
        r.commit("big")
        assert hashlib.sha256(r.open("HEAD", "big.pt").read()).hexdigest() == sha256(big)
    finally:
        r.close()


def test_api_raises_nospace_with_errno(small_fs, monkeypatch):
    monkeypatch.setattr(ingest, "BATCH_BYTES", 2 << 20)
    root = small_fs / "repo"
    r = Repository.init(root, auto_repack=False)
    try:
        big = _big_checkpoint(root / "big.pt")
        before = _counts(root)
        filler = _fill(small_fs, 16 << 20)
        with pytest.raises(NoSpace) as ei:
            r.add([big])
        assert ei.value.errno == errno.ENOSPC and ei.value.exit_code == 12
        assert "no space left on device" in str(ei.value) and "were removed" in str(ei.value)
        assert _counts(root) == before
        filler.unlink()
        r.add([big])
        r.commit("big")
        assert hashlib.sha256(r.open("HEAD", "big.pt").read()).hexdigest() == sha256(big)
    finally:
        r.close()


# ------------------------------------------------------------------ the cleanup's safety rules (simulated)
def _fail_on_write(monkeypatch, store: Store, n: int, before_failing=None) -> None:
    """The n-th write transaction of ``store`` fails as LMDB fails on a full disk (the earlier ones
    commit; with BATCH_BYTES = 1 an ingest writes one record per transaction); ``before_failing``
    runs just before it, outside any transaction."""
    real = store.write
    calls = [0]

    def write(fn):
        calls[0] += 1
        if calls[0] != n:
            return real(fn)
        if before_failing is not None:
            before_failing()

        def full(t):
            fn(t)
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")

        return real(full)

    monkeypatch.setattr(store, "write", write)


def _model_file(root: Path, seed: int, n: int = 6) -> tuple[Path, dict]:
    torch.manual_seed(seed)
    sd = {f"w{i}": torch.randn(256, 256) for i in range(n)}
    return save_pt(sd, root / f"m{seed}.pt"), sd


def test_a_record_another_process_deduplicated_is_kept(tmp_path, monkeypatch):
    """While our ingest runs, another process stores and commits a file that shares our first tensor
    (it deduplicates against the record we just stored); then our disk fills up. The cleanup removes
    our other records and keeps that one: their commit reads back, fsck is ok, no garbage."""
    monkeypatch.setattr(ingest, "BATCH_BYTES", 1)  # one transaction per record
    root = tmp_path / "repo"
    r = Repository.init(root, auto_repack=False)
    try:
        ours, sd = _model_file(root, 0)
        from safetensors.torch import save_file

        theirs = root / "theirs.safetensors"
        save_file({"w0": sd["w0"], "other": torch.ones(8)}, theirs)

        def other_process() -> None:
            script = textwrap.dedent(f"""
                from coralfs.repository import Repository
                r = Repository({str(root)!r}, auto_repack=False)
                stats = r.add([{str(theirs)!r}])
                r.commit("theirs")
                print(stats.dedup_chunks)
                r.close()
            """)
            p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
            assert p.returncode == 0, p.stderr
            assert int(p.stdout) >= 1  # it found our w0 record and used it

        _fail_on_write(monkeypatch, r.store, 3, other_process)
        with pytest.raises(NoSpace) as ei:
            r.add([ours])
        with r.open("HEAD", "theirs.safetensors") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha256(theirs)
        from coralfs.fsck import fsck
        from coralfs.gc import gc

        assert fsck(r).ok
        assert gc(r, dry_run=True).chunks_swept == 0
        msg = str(ei.value)
        assert "kept: another writer uses them" in msg and "nothing is left behind" in msg, msg
    finally:
        r.close()


def test_busy_repository_leaves_the_records_for_gc(tmp_path, monkeypatch):
    """Another process is writing (holds the shared side of the gc lock): the records stay, the
    error says they are left for gc, and gc removes them once that process is done."""
    monkeypatch.setattr(ingest, "BATCH_BYTES", 1)
    root = tmp_path / "repo"
    r = Repository.init(root, auto_repack=False)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from coralfs.repository import Repository
        r = Repository({str(root)!r}, auto_repack=False)
        with r.writing():
            print("holding", flush=True)
            sys.stdin.read()
        r.close()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "holding"
        ours, _ = _model_file(root, 1)
        _fail_on_write(monkeypatch, r.store, 4)
        with pytest.raises(NoSpace) as ei:
            r.add([ours])
        assert "left for `coralfs gc`" in str(ei.value) and "another process is writing" in str(ei.value)
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
        from coralfs.fsck import fsck
        from coralfs.gc import gc

        assert fsck(r).ok
        assert gc(r).chunks_swept == 3  # the three records stored before the failure
        assert gc(r, dry_run=True).chunks_swept == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        r.close()


def test_failing_removal_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "BATCH_BYTES", 1)
    root = tmp_path / "repo"
    r = Repository.init(root, auto_repack=False)
    try:
        ours, _ = _model_file(root, 2)
        _fail_on_write(monkeypatch, r.store, 3)

        def no_room(*a, **k):
            raise NoSpace("no space left on device: even for the removal")

        monkeypatch.setattr(ingest.Ingestor, "_remove_unreferenced", staticmethod(no_room))
        with pytest.raises(NoSpace) as ei:
            r.add([ours])
        msg = str(ei.value)
        assert "could not be removed (no space left on device: even for the removal)" in msg, msg
        assert "`coralfs gc` removes them" in msg
        from coralfs.fsck import fsck
        from coralfs.gc import gc

        assert fsck(r).ok and gc(r).chunks_swept == 2
    finally:
        r.close()


def test_nospace_after_the_ingest_removes_its_manifest_too(tmp_path, monkeypatch):
    """The ingest completed but staging it failed for lack of space: its records and its manifest
    are unreferenced and removed."""
    root = tmp_path / "repo"
    r = Repository.init(root, auto_repack=False)
    try:
        ours, _ = _model_file(root, 3)
        before = _counts(root)

        def stage(*a, **k):
            r.store.write(lambda t: (_ for _ in ()).throw(lmdb.DiskError("mdb_txn_commit: No space left on device")))

        monkeypatch.setattr(r.worktree, "_stage", stage)
        with pytest.raises(NoSpace) as ei:
            r.add([ours])
        assert "were removed" in str(ei.value), str(ei.value)
        assert _counts(root) == before
        monkeypatch.undo()
        r.add([ours])
        r.commit("m")
        assert hashlib.sha256(r.open("HEAD", ours.name).read()).hexdigest() == sha256(ours)
    finally:
        r.close()


def test_map_that_cannot_grow_is_nospace(tmp_path, monkeypatch):
    r = Repository.init(tmp_path / "repo", auto_repack=False)
    try:
        r.store.env.set_mapsize(1 << 20)
        monkeypatch.setattr(Store, "_grow", lambda self: None)
        ours, _ = _model_file(tmp_path / "repo", 4)
        with pytest.raises(NoSpace, match="map is full"):
            r.add([ours])
    finally:
        r.close()


def test_cli_maps_enospc_from_the_file_system(tmp_path, monkeypatch, capsys):
    """An OSError ENOSPC from anywhere (here: writing `cat -o` output) is exit 12, one line."""
    from coralfs import cli

    r = Repository.init(tmp_path / "repo", auto_repack=False)
    (tmp_path / "repo" / "a.txt").write_bytes(b"x" * 10)
    r.add([tmp_path / "repo" / "a.txt"])
    r.commit("a")
    r.close()
    real_open = open

    def full_open(path, mode="r", *a, **k):
        if "coralfs-tmp" in os.fspath(path) and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_open)
    rc = cli.main(["-R", str(tmp_path / "repo"), "cat", "a.txt", "-o", str(tmp_path / "out.txt")])
    err = capsys.readouterr().err
    assert rc == 12 and err.startswith("coralfs: error: no space left on device") and err.count("\n") == 1, err
