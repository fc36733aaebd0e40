"""The write side of the mount: writing into a branch directory is committing.

Real FUSE mounts (``fuse_mount``, a subprocess each, always unmounted), plus one test of
the FUSE-free core (MountView + Writer) for the on-disk contract with gc.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from coralfs.fsck import fsck
from coralfs.gc import gc
from coralfs.mount.pending import list_conflicts
from coralfs.mount.view import MountView
from coralfs.mount.writer import DEFAULT_COMMIT_DELAY, MAX_HOLD, RETRY_SECONDS, Writer
from coralfs.repository import Repository
from coralfs.store import keys
from coralfs.store.objects import MODE_EXEC, MODE_FILE
from tests.factories import TinyNet, train_steps

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "coralfs"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def api_sha(repo: Repository, rev: str | bytes, path: str) -> str:
    h = hashlib.sha256()
    with repo.open(rev, path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def wait_for(cond, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def n_commits(repo: Repository, branch: str = "main") -> int:
    return len(repo.log(branch))


def state_dict(seed: int, steps: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = TinyNet(d=128)
    train_steps(net, torch.optim.SGD(net.parameters(), lr=0.1), steps, seed)
    return {k: v.clone() for k, v in net.state_dict().items()}


def seeded(make_repo, files: dict[str, bytes] | None = None) -> Repository:
    """A repository whose main has one commit (and a branch 'experiment' at it)."""
    repo = make_repo()
    files = files or {"old.pt": b"old checkpoint" * 100, "config.json": b'{"hidden": 128}',
                      "data/train.bin": os.urandom(300_000)}
    for p, data in files.items():
        fp = Path(repo.root, p)
        fp.parent.mkdir(parents=True, exist_ok=True)
        fp.write_bytes(data)
    repo.add([os.path.join(repo.root, p) for p in files])
    repo.commit("seed")
    repo.create_branch("experiment", "main")
    return repo


def tree_shas(repo: Repository, rev: str | bytes) -> dict[str, str]:
    return {p: api_sha(repo, rev, p) for p in repo.ls(rev)}


# ====================================================================== the core, no FUSE
def test_view_pending_entries_and_gc_contract(make_repo) -> None:
    """A closed file is a pending entry (the key/JSON contract gc marks) before it is committed;
    gc keeps its chunks; the commit consumes it."""
    repo = seeded(make_repo)
    w = Writer(repo, commit_delay=3600)
    w.start(background=False)
    v = MountView(repo, writer=w)
    try:
        data = os.urandom(2_000_000)
        fh = v.create("/main/new.bin", os.O_WRONLY | os.O_CREAT)
        assert v.write(fh, 0, data[:1_000_000]) == 1_000_000
        assert v.getattr("/main/new.bin").size == 1_000_000  # the in-progress file is listed
        assert "new.bin" in v.readdir("/main")
        rfh = v.open("/main/new.bin")
        assert v.read(rfh, 0, 10) == data[:10]  # reads see what was written
        v.write(fh, 1_000_000, data[1_000_000:])
        v.flush(fh)
        v.release(fh)
        v.release(rfh)
        v.unlink("/main/old.pt")
        assert "old.pt" not in v.readdir("/main")
        with repo.store.read() as t:
            raw = t.get("index", keys.pending_key("main", "new.bin"))
            tomb = json.loads(t.get("index", keys.pending_key("main", "old.pt")))
        d = json.loads(raw)
        assert d["size"] == len(data) and d["mode"] == MODE_FILE and d["base"] == repo.branch_head("main").hex()
        assert tomb["del"] is True and "m" not in tomb
        assert sorted(os.listdir(w.session_dir)) == ["lock", "session.json"]  # staged data removed
        manifest = bytes.fromhex(d["m"])
        gc(repo, grace=0)  # pending data is a gc root
        assert sha(repo.file_view(manifest).pread(0, len(data) + 1)) == sha(data)
        head = repo.branch_head("main")
        cid = w.sync("main")
        assert cid is not None and repo.get_commit(cid).parents == (head,)
        assert repo.get_commit(cid).message == "mount: add new.bin, remove old.pt"
        assert api_sha(repo, "main", "new.bin") == sha(data) and "old.pt" not in repo.ls("main")
        with repo.store.read() as t:
            assert not list(t.keys("index", keys.PENDING))
    finally:
        v.close()
        w.close()
    assert DEFAULT_COMMIT_DELAY == 1.5 and not os.path.exists(w.session_dir)


class Clock:
    """The writer's clock in a test: time passes when the test says so."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@contextlib.contextmanager
def core(repo: Repository, commit_delay: float = DEFAULT_COMMIT_DELAY,
         max_hold: float = MAX_HOLD) -> Iterator[tuple[MountView, Writer, Clock]]:
    """The mount without FUSE: a view over a writer with no commit thread, on a test's clock
    (``tick(w, clock, dt)`` lets time pass and runs a round of the commit loop)."""
    clock = Clock()
    w = Writer(repo, commit_delay=commit_delay, max_hold=max_hold, clock=clock)
    w.start(background=False)
    v = MountView(repo, writer=w, prefetch_bytes=0)
    try:
        yield v, w, clock
    finally:
        v.close()
        w.close()


def tick(w: Writer, clock: Clock, dt: float) -> list[str]:
    clock.t += dt
    return w.tick()


def put(v: MountView, path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    """``open(path, "wb").write(data)`` through the view: create, write, close (flush + release)."""
    fh = v.create(path, flags)
    try:
        v.write(fh, 0, data)
        v.flush(fh)
    finally:
        v.release(fh)


def view_read(v: MountView, path: str) -> bytes:
    fh = v.open(path)
    try:
        return v.read(fh, 0, v.fgetattr(fh).size + 1)
    finally:
        v.release(fh)


def test_fsync_dir_commits_now_and_a_burst_is_one_commit_after_the_quiet_period(make_repo) -> None:
    """(FUSE-free, on the test's clock.) fsync of the branch directory commits at once; a burst
    of files is one commit, made once the branch was quiet for ``commit_delay`` (1.5 s), and
    nothing follows it; every write or close extends the quiet period."""
    repo = seeded(make_repo)
    with core(repo) as (v, w, clock):
        n0 = n_commits(repo)
        put(v, "/main/a.txt", b"a")
        put(v, "/main/b.txt", b"b")
        assert n_commits(repo) == n0  # (closed and stored, not committed yet)
        v.fsyncdir("/main")  # no time passes
        assert n_commits(repo) == n0 + 1
        assert repo.get_commit(repo.branch_head("main")).message == "mount: add a.txt, add b.txt"
        assert tick(w, clock, 60) == []  # nothing pending: nothing to do
        # a burst of files inside the quiet period: exactly one commit
        for i in range(5):
            put(v, f"/main/f{i}.bin", os.urandom(1000 + i))
            assert tick(w, clock, 0.15) == []
        assert tick(w, clock, 1.0) == [] and n_commits(repo) == n0 + 1  # 1.15 s quiet: still waiting
        assert tick(w, clock, 0.34) == [] and n_commits(repo) == n0 + 1  # 1.49 s
        assert tick(w, clock, 0.01) == ["main"] and n_commits(repo) == n0 + 2  # 1.5 s
        assert repo.get_commit(repo.branch_head("main")).message == \
            "mount: add f0.bin, add f1.bin, add f2.bin, add f3.bin, add f4.bin"
        assert tick(w, clock, 2.5) == [] and n_commits(repo) == n0 + 2  # nothing follows
        # writes to one open file keep the burst going: no commit while it is written
        put(v, "/main/g.txt", b"g")
        fh = v.create("/main/slow.bin", os.O_WRONLY | os.O_CREAT)
        for i in range(4):
            assert tick(w, clock, 1.0) == []
            v.write(fh, i * 10, b"x" * 10)
        v.flush(fh)
        v.release(fh)
        assert tick(w, clock, 1.4) == [] and n_commits(repo) == n0 + 2
        assert tick(w, clock, 0.1) == ["main"] and n_commits(repo) == n0 + 3
        assert repo.get_commit(repo.branch_head("main")).message == "mount: add g.txt, add slow.bin"
        assert api_sha(repo, "main", "slow.bin") == sha(b"x" * 40)


def test_a_file_open_for_writing_holds_the_commit_back(make_repo) -> None:
    """(FUSE-free.) While a file is open for writing nothing on its branch is committed by the
    quiet period (its close decides what it holds); once it is closed the burst is one
    commit. A handle open for ``max_hold`` (60 s) no longer holds the others back, but a file
    still open for writing is never committed, not even by fsync of the directory."""
    repo = seeded(make_repo)
    with core(repo) as (v, w, clock):
        n0 = n_commits(repo)
        fh = v.create("/main/held.bin", os.O_WRONLY | os.O_CREAT)
        v.write(fh, 0, b"x" * 100)
        put(v, "/main/other.txt", b"other")
        for _ in range(6):
            assert tick(w, clock, 0.5) == []  # 3 s
        assert n_commits(repo) == n0
        v.flush(fh)
        v.release(fh)
        assert tick(w, clock, 1.0) == [] and n_commits(repo) == n0  # (the close is activity too)
        assert tick(w, clock, 0.5) == ["main"] and n_commits(repo) == n0 + 1
        assert repo.get_commit(repo.branch_head("main")).message == "mount: add held.bin, add other.txt"
        # a log file kept open: the others are committed once the first of them waited max_hold
        log = v.create("/main/train.log", os.O_WRONLY | os.O_CREAT)
        v.write(log, 0, b"step 1\n")
        v.fsync(log)  # stored, still open for writing
        put(v, "/main/ckpt1.pt", b"checkpoint 1")
        assert tick(w, clock, 30) == [] and tick(w, clock, 29.9) == []
        assert tick(w, clock, 0.1) == ["main"] and n_commits(repo) == n0 + 2  # 60 s after the first change
        assert repo.get_commit(repo.branch_head("main")).message == "mount: add ckpt1.pt"
        assert "train.log" not in repo.ls("main")
        v.fsyncdir("/main")  # nor at fsync of the directory
        assert "train.log" not in repo.ls("main") and n_commits(repo) == n0 + 2
        put(v, "/main/ckpt2.pt", b"checkpoint 2")  # pending for more than max_hold already: 1.5 s quiet
        assert tick(w, clock, 1.4) == [] and tick(w, clock, 0.1) == ["main"]
        assert repo.get_commit(repo.branch_head("main")).message == "mount: add ckpt2.pt"
        v.write(log, 7, b"step 2\n")
        v.flush(log)
        v.release(log)
        assert tick(w, clock, 1.5) == ["main"]
        assert repo.get_commit(repo.branch_head("main")).message == "mount: add train.log"
        assert api_sha(repo, "main", "train.log") == sha(b"step 1\nstep 2\n")


def test_a_failed_commit_is_retried_later(make_repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """(FUSE-free.) A commit of the quiet period that fails (not a conflict) is logged and tried
    again ``RETRY_SECONDS`` (5 s) later; what is pending stays pending meanwhile."""
    from coralfs.errors import CoralError
    from coralfs.mount import writer as writer_mod

    repo = seeded(make_repo)
    real = writer_mod.commit_pending
    calls: list[str] = []

    def failing_once(*a, **kw):
        calls.append("commit")
        if len(calls) == 1:
            raise CoralError("the disk is full (test)")
        return real(*a, **kw)

    monkeypatch.setattr(writer_mod, "commit_pending", failing_once)
    with core(repo) as (v, w, clock):
        n0 = n_commits(repo)
        put(v, "/main/x.txt", b"x")
        assert tick(w, clock, 1.5) == ["main"] and n_commits(repo) == n0 and len(calls) == 1  # failed
        assert tick(w, clock, 4.9) == [] and len(calls) == 1  # waiting to retry
        assert tick(w, clock, 0.1) == ["main"] and n_commits(repo) == n0 + 1 and len(calls) == 2
        assert repo.get_commit(repo.branch_head("main")).message == "mount: add x.txt"
    assert RETRY_SECONDS == 5.0 and MAX_HOLD == 60.0


def test_saves_become_commits_with_messages(make_repo) -> None:
    """(FUSE-free; test_checkpoint_saves_become_commits does it with torch through the kernel.)
    A save is one commit once quiet, the next save of the same file is the next commit
    ("update"), a multi-file save is one commit naming every file."""
    repo = seeded(make_repo)
    with core(repo) as (v, w, clock):
        head0 = repo.branch_head("main")
        first = os.urandom(300_000)
        put(v, "/main/model.pt", first)
        assert view_read(v, "/main/model.pt") == first  # read back at once (pending)
        assert tick(w, clock, 1.5) == ["main"]
        c1 = repo.branch_head("main")
        assert repo.get_commit(c1).message == "mount: add model.pt" and repo.get_commit(c1).parents == (head0,)
        second = first[:100_000] + os.urandom(1000) + first[101_000:]
        put(v, "/main/model.pt", second)
        assert tick(w, clock, 1.5) == ["main"]
        c2 = repo.branch_head("main")
        assert repo.get_commit(c2).message == "mount: update model.pt" and repo.get_commit(c2).parents == (c1,)
        assert api_sha(repo, "main", "model.pt") == sha(second) and api_sha(repo, c1, "model.pt") == sha(first)
        files = {"config.json": b'{"hidden": 128, "step": 2}', "generation_config.json": b'{"max_length": 20}',
                 "model.safetensors": os.urandom(50_000), "tokenizer.json": b'{"vocab": [1, 2, 3]}'}
        for name, data in files.items():
            put(v, f"/main/{name}", data)
            assert tick(w, clock, 0.5) == []
        assert tick(w, clock, 1.0) == ["main"] and tick(w, clock, 10) == []
        c3 = repo.branch_head("main")
        assert repo.get_commit(c3).parents == (c2,)
        assert repo.get_commit(c3).message == ("mount: update config.json, add generation_config.json, "
                                               "add model.safetensors, add tokenizer.json")
        assert tree_shas(repo, c3) == {**{p: api_sha(repo, c2, p) for p in repo.ls(c2)},
                                       **{p: sha(d) for p, d in files.items()}}


def test_failed_rewrite_shows_what_was_last_stored(make_repo) -> None:
    """(FUSE-free; test_failed_close_is_never_committed checks the close's error through the
    kernel.) A new file whose close failed is gone once its last handle goes; an existing
    file whose rewrite failed shows the version last stored (also after a rename); neither is
    ever committed, by fsync of the directory or at the unmount."""
    from coralfs.errors import IngestFailed
    from coralfs.mount import writer as writer_mod

    repo = seeded(make_repo)
    old = repo.open("main", "config.json").read()
    os.environ[writer_mod.FAIL_ENV] = "full:2"  # the first two ingests of paths with "full" fail
    writer_mod._fail_counts.clear()
    try:
        with core(repo, commit_delay=60) as (v, w, _clock):
            fh = v.create("/main/full.bin", os.O_WRONLY | os.O_CREAT)
            v.write(fh, 0, os.urandom(200_000))
            with pytest.raises(IngestFailed) as ei:
                v.flush(fh)
            assert ei.value.errno == errno.ENOSPC
            assert "full.bin" in v.readdir("/main")  # (still open)
            v.release(fh)
            assert "full.bin" not in v.readdir("/main")  # a new file that never stored anything: gone
            v.rename("/main/config.json", "/main/fullconfig.json")
            fh = v.open("/main/fullconfig.json", os.O_WRONLY | os.O_TRUNC)
            v.write(fh, 0, b"never acknowledged")
            with pytest.raises(IngestFailed):
                v.flush(fh)
            v.release(fh)
            assert view_read(v, "/main/fullconfig.json") == old
            put(v, "/main/fine.txt", b"the mount still writes")
            v.fsyncdir("/main")
            files = repo.ls("main")
            assert "full.bin" not in files and "fine.txt" in files and api_sha(repo, "main", "fullconfig.json") == sha(old)
        assert "full.bin" not in repo.ls("main")  # nor at the unmount
    finally:
        del os.environ[writer_mod.FAIL_ENV]
        writer_mod._fail_counts.clear()


def test_rename_over_a_file_being_written(make_repo) -> None:
    """(FUSE-free; found by the model.) A closed file renamed over one still open for writing:
    the path shows the renamed file at once; the replaced file's writer keeps its handle (it
    reads what it wrote) and its close stores nothing; the commit holds the renamed file."""
    repo = seeded(make_repo)
    a = repo.open("main", "old.pt").read()
    with core(repo, commit_delay=60) as (v, w, clock):
        fh = v.create("/main/b.bin", os.O_RDWR | os.O_CREAT)
        v.write(fh, 0, b"being written")
        v.rename("/main/old.pt", "/main/b.bin")
        assert view_read(v, "/main/b.bin") == a and v.getattr("/main/b.bin").size == len(a)
        assert v.read(fh, 0, 100) == b"being written" and v.fgetattr(fh).size == 13
        assert tick(w, clock, 60) == ["main"]  # (the replaced file, open for writing, holds nothing back)
        assert repo.get_commit(repo.branch_head("main")).message == "mount: add b.bin, remove old.pt"
        v.write(fh, 13, b" and more")
        v.flush(fh)
        v.release(fh)
        assert view_read(v, "/main/b.bin") == a
        assert sorted(v.readdir("/main")) == ["b.bin", "config.json", "data"]
    assert api_sha(repo, "main", "b.bin") == sha(a) and "old.pt" not in repo.ls("main")


def test_the_directory_of_a_discarded_file_stays(make_repo) -> None:
    """(FUSE-free; found by the model.) A file renamed into a directory, over its only file,
    while still being written, then discarded (its close failed): the directory stays (as
    any directory does until rmdir); the path shows nothing (nothing was stored there)."""
    from coralfs.errors import IngestFailed
    from coralfs.mount import writer as writer_mod

    repo = seeded(make_repo)
    with core(repo, commit_delay=60) as (v, w, _clock):
        fh = v.create("/main/tmp.bin", os.O_WRONLY | os.O_CREAT)
        v.write(fh, 0, b"new data")
        v.rename("/main/tmp.bin", "/main/data/train.bin")
        os.environ[writer_mod.FAIL_ENV] = "train.bin:1"
        writer_mod._fail_counts.clear()
        try:
            with pytest.raises(IngestFailed):
                v.flush(fh)
        finally:
            del os.environ[writer_mod.FAIL_ENV]
        v.release(fh)
        assert v.readdir("/main/data") == [] and "data" in v.readdir("/main")
        v.rmdir("/main/data")
        assert "data" not in v.readdir("/main")
        v.fsyncdir("/main")
    assert "data/train.bin" not in repo.ls("main") and "tmp.bin" not in repo.ls("main")


def test_a_write_of_nothing_extends_nothing(make_repo) -> None:
    """(FUSE-free; found by the model; the kernel sends no empty writes.) ``write(fd, b"")`` at an
    offset past the end leaves the size alone: stat and read agree."""
    repo = seeded(make_repo)
    with core(repo, commit_delay=60) as (v, _w, _clock):
        fh = v.create("/main/f.bin", os.O_RDWR | os.O_CREAT)
        v.write(fh, 0, b"abc")
        assert v.write(fh, 5000, b"") == 0
        assert v.fgetattr(fh).size == 3 and v.getattr("/main/f.bin").size == 3 and v.read(fh, 0, 10) == b"abc"
        v.flush(fh)
        v.release(fh)
        v.fsyncdir("/main")
    assert repo.open("main", "f.bin").read() == b"abc"


def test_unstorable_names_are_refused_at_create(make_repo) -> None:
    """(FUSE-free; test_posix_operations checks the errno through the kernel.) A name the
    repository cannot store or check out is refused when the file (or directory) is created
    or renamed to, never at close() after the data was accepted."""
    from coralfs.errors import InvalidPath, NameTooLong

    repo = seeded(make_repo)
    with core(repo, commit_delay=60) as (v, _w, _clock):
        long = "/main/" + "x" * 256  # a local file system's limit is 255 bytes a name (FUSE would pass 1024)
        for op in (lambda: v.create(long), lambda: v.mkdir(long), lambda: v.rename("/main/config.json", long)):
            with pytest.raises(NameTooLong) as ei:
                op()
            assert ei.value.errno == errno.ENAMETOOLONG
        deep = "/main"
        with pytest.raises(NameTooLong):
            for _ in range(20):  # 20 x 250 bytes: a path over 4095 bytes
                deep += "/" + "d" * 249
                v.mkdir(deep)
        assert len(deep.encode()) - len("/main/") > 4095
        with pytest.raises(InvalidPath) as ei:
            v.create("/main/.coralfs")  # reserved (the store's directory in a work tree)
        assert ei.value.errno == errno.EINVAL
        ok = "y" * 255
        put(v, f"/main/{ok}", b"fits")
        v.fsyncdir("/main")
    assert api_sha(repo, "main", ok) == sha(b"fits")
    assert not [p for p in repo.ls("main") if p.startswith(("x", "d" * 249))]


# ====================================================================== checkpoints through a real mount
def test_checkpoint_saves_become_commits(make_repo, fuse_mount, tmp_path: Path) -> None:
    repo = seeded(make_repo)
    m = fuse_mount(repo.root, "--commit-delay", "0.5")
    local = tmp_path / "local"
    local.mkdir()
    sd = state_dict(1)

    # torch.save into the branch: one commit
    head0 = repo.branch_head("main")
    torch.save(sd, m / "main/model.pt")
    torch.save(sd, local / "model.pt")
    want = file_sha(local / "model.pt")
    assert file_sha(m / "main/model.pt") == want  # read back at once (pending)
    wait_for(lambda: repo.branch_head("main") != head0, what="the commit of model.pt")
    c1 = repo.branch_head("main")
    assert repo.get_commit(c1).message == "mount: add model.pt" and repo.get_commit(c1).parents == (head0,)
    assert api_sha(repo, "main", "model.pt") == want
    got = torch.load(m / "main/model.pt", weights_only=True)
    assert all(torch.equal(got[k], sd[k]) for k in sd)

    # the next step, saved over the old one: stored as a delta against it
    sd2 = state_dict(1, steps=2)
    torch.save(sd2, m / "main/model.pt")
    torch.save(sd2, local / "model.pt")
    wait_for(lambda: repo.branch_head("main") != c1, what="the commit of the second model.pt")
    c2 = repo.branch_head("main")
    assert repo.get_commit(c2).message == "mount: update model.pt"
    assert api_sha(repo, "main", "model.pt") == file_sha(local / "model.pt")

    # a save_pretrained-like directory: several files, one commit
    files = {"config.json": json.dumps({"hidden": 128, "step": 2}).encode(),
             "generation_config.json": b'{"max_length": 20}',
             "tokenizer.json": json.dumps({"vocab": list(range(500))}).encode()}
    save_file({k: v.contiguous() for k, v in sd2.items()}, m / "main/model.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in sd2.items()}, local / "model.safetensors", metadata={"format": "pt"})
    for name, data in files.items():
        (Path(m.path) / "main" / name).write_bytes(data)
    fsync_dir(m / "main")  # (what a trainer's save callback may do: commit the directory now)
    c3 = repo.branch_head("main")
    assert c3 != c2
    assert repo.get_commit(c3).parents == (c2,)
    assert repo.get_commit(c3).message == ("mount: update config.json, add generation_config.json, "
                                           "add model.safetensors, add tokenizer.json")
    assert "mount: update config.json" in cli("-R", repo.root, "log", "--oneline").stdout
    want_all = {"model.pt": file_sha(local / "model.pt"), "model.safetensors": file_sha(local / "model.safetensors"),
                **{k: sha(v) for k, v in files.items()}}
    for p, digest in want_all.items():
        assert file_sha(m / f"main/{p}") == digest, p
        assert api_sha(repo, "main", p) == digest, p
        assert file_sha(m / f"@commits/{c3.hex()}/{p}") == digest, p
    cli("-R", repo.root, "cat", "main:model.safetensors", "-o", str(tmp_path / "cat.out"))  # the CLI
    assert file_sha(tmp_path / "cat.out") == want_all["model.safetensors"]
    loaded = load_file(m / "main/model.safetensors")
    assert all(torch.equal(loaded[k], sd2[k]) for k in sd2)
    del loaded, got  # (tensors loaded from the mount may map it: the unmount would be busy)
    # a fresh mount reads the same bytes
    m.stop()
    m2 = fuse_mount(repo.root)
    for p, digest in want_all.items():
        assert file_sha(m2 / f"main/{p}") == digest, p
    assert fsck(repo).ok


def test_posix_operations(make_repo, fuse_mount) -> None:
    repo = seeded(make_repo)
    seed_files = {p: repo.open("main", p).read() for p in repo.ls("main")}
    m = fuse_mount(repo.root, "--commit-delay", "60")
    b = Path(m.path) / "main"
    want = dict(seed_files)

    # create with O_EXCL; a second O_EXCL create fails
    fd = os.open(b / "excl.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"exclusive")
    os.close(fd)
    want["excl.bin"] = b"exclusive"
    with pytest.raises(FileExistsError):
        os.open(b / "excl.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL)

    # a file being written: listed, stat-able, and readable by others while open
    part = os.urandom(1 << 20)
    with open(b / "growing.bin", "wb") as f:
        f.write(part)
        f.flush()
        assert os.stat(b / "growing.bin").st_size == len(part)
        assert "growing.bin" in os.listdir(b)
        with open(b / "growing.bin", "rb") as r:
            assert r.read() == part
        f.write(part[::-1])
    want["growing.bin"] = part + part[::-1]

    # O_TRUNC rewrite, in-place overwrite (no O_TRUNC), append
    with open(b / "config.json", "wb") as f:
        f.write(b'{"hidden": 256}')
    want["config.json"] = b'{"hidden": 256}'
    with open(b / "data/train.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"PATCHED")
    d = bytearray(want["data/train.bin"])
    d[1000:1007] = b"PATCHED"
    want["data/train.bin"] = bytes(d)
    with open(b / "excl.bin", "ab") as f:
        f.write(b"+appended")
    want["excl.bin"] += b"+appended"

    # truncate: ftruncate through a handle, truncate(2) by path, and extending
    with open(b / "growing.bin", "r+b") as f:
        f.truncate(3000)
    want["growing.bin"] = want["growing.bin"][:3000]
    os.truncate(b / "growing.bin", 100)
    os.truncate(b / "excl.bin", 20)
    want["growing.bin"] = want["growing.bin"][:100]
    want["excl.bin"] = (want["excl.bin"] + bytes(20))[:20]

    # random-offset writes (a hole is zeros)
    with open(b / "sparse.bin", "wb") as f:
        f.seek(3 << 20)
        f.write(b"tail")
        f.seek(10)
        f.write(b"head")
    want["sparse.bin"] = bytes(10) + b"head" + bytes((3 << 20) - 14) + b"tail"

    # temp file then rename over an existing file (how torch/safetensors/HF save atomically)
    new_old = os.urandom(5000)
    with open(b / ".old.pt.tmp", "wb") as f:
        f.write(new_old)
    os.replace(b / ".old.pt.tmp", b / "old.pt")
    want["old.pt"] = new_old
    assert ".old.pt.tmp" not in os.listdir(b)

    # mkdir, rename across subdirectories, rename a directory, rmdir
    os.makedirs(b / "runs/run1")
    os.rename(b / "sparse.bin", b / "runs/run1/sparse.bin")
    want["runs/run1/sparse.bin"] = want.pop("sparse.bin")
    os.mkdir(b / "empty")
    assert stat.S_ISDIR(os.stat(b / "empty").st_mode) and os.listdir(b / "empty") == []
    with pytest.raises(OSError) as ei:
        os.rmdir(b / "runs")
    assert ei.value.errno == errno.ENOTEMPTY
    os.rmdir(b / "empty")
    assert not os.path.exists(b / "empty")
    os.rename(b / "runs", b / "runs2")
    want["runs2/run1/sparse.bin"] = want.pop("runs/run1/sparse.bin")
    assert os.listdir(b / "runs2/run1") == ["sparse.bin"]

    # unlink (a directory emptied by it stays until rmdir, as on any filesystem)
    os.unlink(b / "data/train.bin")
    del want["data/train.bin"]
    assert os.listdir(b / "data") == []
    os.rmdir(b / "data")
    with pytest.raises(FileNotFoundError):
        os.stat(b / "data/train.bin")

    # chmod +x is stored; links are not supported; across branches: EXDEV, so mv copies
    os.chmod(b / "excl.bin", 0o755)
    assert os.stat(b / "excl.bin").st_mode & 0o111
    for op in (lambda: os.symlink("x", b / "link"), lambda: os.link(b / "excl.bin", b / "hard")):
        with pytest.raises(OSError) as ei:
            op()
        assert ei.value.errno == errno.EPERM
    with pytest.raises(OSError) as ei:
        os.rename(b / "old.pt", Path(m.path) / "experiment/old.pt")
    assert ei.value.errno == errno.EXDEV
    (b / "moveme.bin").write_bytes(b"to experiment")
    shutil.move(b / "moveme.bin", Path(m.path) / "experiment/moved.bin")
    assert not (b / "moveme.bin").exists()

    # several writers at once (their ingests run concurrently in the mount)
    par = {f"par/{i}.pt": state_dict(10 + i) for i in range(4)}
    os.mkdir(b / "par")

    def save(i: int) -> None:
        torch.save(par[f"par/{i}.pt"], b / f"par/{i}.pt")

    threads = [threading.Thread(target=save, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, sd in par.items():
        want[p] = (b / p).read_bytes()
        got = torch.load(b / p, weights_only=True)
        assert all(torch.equal(got[k], v) for k, v in sd.items())

    # what the mount shows, what the commit holds, what a fresh mount shows
    shown = {str(p.relative_to(b)): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    assert shown == want
    head = repo.branch_head("main")
    fsync_dir(b)  # commits at once (the delay is 60 s)
    c = repo.branch_head("main")
    assert c != head and repo.get_commit(c).parents == (head,)
    assert tree_shas(repo, c) == {p: sha(v) for p, v in want.items()}
    assert repo.entry(c, "excl.bin").mode == MODE_EXEC and repo.entry(c, "config.json").mode == MODE_FILE
    msg = repo.get_commit(c).message
    assert msg.startswith("mount: update config.json, update old.pt") and "remove data/train.bin" in msg
    fsync_dir(Path(m.path) / "experiment")
    assert api_sha(repo, "experiment", "moved.bin") == sha(b"to experiment")
    m.stop()
    m2 = fuse_mount(repo.root, "--read-only")
    b2 = Path(m2.path) / "main"
    assert {str(p.relative_to(b2)): sha(p.read_bytes()) for p in b2.rglob("*") if p.is_file()} == \
        {p: sha(v) for p, v in want.items()}
    assert fsck(repo).ok


def test_burst_is_one_commit_fsync_dir_commits_now(make_repo, fuse_mount) -> None:
    """Through the kernel: an fsync of the branch directory commits at once, and the daemon's
    commit thread makes a burst one commit after its quiet period. (The timing rules -- the
    quiet period, a file open for writing holding the commit back, max-hold, retries -- are
    tested on an injected clock, FUSE-free, above and in test_mount_model.py.)"""
    repo = seeded(make_repo)
    m = fuse_mount(repo.root, "--commit-delay", "0.3")
    b = Path(m.path) / "main"
    n0 = n_commits(repo)
    # fsync of the branch directory commits at once (a burst written faster than the quiet period)
    (b / "a.txt").write_bytes(b"a")
    (b / "b.txt").write_bytes(b"b")
    fsync_dir(b)
    assert n_commits(repo) == n0 + 1
    assert repo.get_commit(repo.branch_head("main")).message == "mount: add a.txt, add b.txt"
    # a burst, then quiet: one commit by the daemon's commit thread
    for i in range(5):
        (b / f"f{i}.bin").write_bytes(os.urandom(1000 + i))
    wait_for(lambda: n_commits(repo) == n0 + 2, what="the burst's commit")
    assert repo.get_commit(repo.branch_head("main")).message == \
        "mount: " + ", ".join(f"add f{i}.bin" for i in range(5))
    assert {f"f{i}.bin" for i in range(5)} <= set(repo.ls("main"))


def test_commits_and_tags_immutable_branch_dirs(make_repo, fuse_mount, tmp_path: Path) -> None:
    repo = seeded(make_repo)
    repo.tag("v1", "main")
    c0 = repo.branch_head("main").hex()
    m = fuse_mount(repo.root, "--commit-delay", "60")
    root = Path(m.path)
    for d in (f"@commits/{c0}", "@tags/v1"):
        for op in (lambda d=d: open(root / d / "new.bin", "wb"), lambda d=d: open(root / d / "config.json", "r+b"),
                   lambda d=d: os.unlink(root / d / "config.json"), lambda d=d: os.mkdir(root / d / "x"),
                   lambda d=d: os.rename(root / d / "config.json", root / d / "c.json"),
                   lambda d=d: os.truncate(root / d / "config.json", 0)):
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.EROFS, d
    with pytest.raises(OSError) as ei:
        os.mkdir(root / "@commits/x")
    assert ei.value.errno == errno.EROFS
    with pytest.raises(OSError) as ei:
        open(root / "toplevel.txt", "wb")
    assert ei.value.errno == errno.EPERM
    # mkdir NAME: a branch at the default branch's head
    os.mkdir(root / "feature")
    assert repo.branch_head("feature") == repo.branch_head("main")
    assert sorted(os.listdir(root / "feature")) == sorted(os.listdir(root / "main"))
    os.makedirs(root / "team/run1")  # a namespace-level mkdir makes branch "team", then a directory in it
    assert repo.branch_head("team") is not None
    with pytest.raises(FileExistsError):
        os.mkdir(root / "feature")
    (root / "feature/notes.txt").write_bytes(b"feature work")
    fsync_dir(root / "feature")
    assert api_sha(repo, "feature", "notes.txt") == sha(b"feature work") and "notes.txt" not in repo.ls("main")
    # rmdir of a branch directory: only when it shows no files
    with pytest.raises(OSError) as ei:
        os.rmdir(root / "feature")
    assert ei.value.errno == errno.ENOTEMPTY
    shutil.rmtree(root / "feature")
    assert repo.branch_head("feature") is None and "feature" not in os.listdir(root)
    # an empty repository shows its default branch's directory: writing into it starts it
    empty = make_repo("empty")
    m2 = fuse_mount(empty.root, "--commit-delay", "60")
    assert os.listdir(m2.path) == ["main", "@commits", "@tags"]
    with pytest.raises(FileExistsError):
        os.mkdir(Path(m2.path) / "main")
    (Path(m2.path) / "main/first.txt").write_bytes(b"first")
    fsync_dir(Path(m2.path) / "main")
    assert [c.message for _, c in empty.log("main")] == ["mount: add first.txt"]


def test_concurrent_commit_to_the_same_branch(make_repo, fuse_mount, tmp_path: Path) -> None:
    repo = seeded(make_repo)
    m = fuse_mount(repo.root, "--commit-delay", "60")
    b = Path(m.path) / "main"

    def api_commit(path: str, data: bytes, message: str) -> bytes:
        src = tmp_path / "api-input"
        src.write_bytes(data)
        e, _ = repo.ingest_file(src, path)
        return repo.commit_changes("main", {path: e}, message)

    # different files: the mount's change goes on top of the other commit, both survive
    (b / "mount.bin").write_bytes(b"from the mount")
    api = api_commit("api.bin", b"from the API", "api commit")
    out = cli("flush-mount", repo.root, "main").stdout  # asks the running mount to commit
    assert "mount: add mount.bin" in out
    c = repo.branch_head("main")
    assert repo.get_commit(c).parents == (api,)
    assert api_sha(repo, c, "mount.bin") == sha(b"from the mount") and api_sha(repo, c, "api.bin") == sha(b"from the API")

    # the same file: refused, the mount's version kept for recovery, the branch shows the other
    # one; the burst's other files are committed (one conflicting path does not hold them back)
    (b / "config.json").write_bytes(b'{"mount": true}')
    (b / "unrelated.txt").write_bytes(b"unrelated")
    api2 = api_commit("config.json", b'{"api": true}', "api changes config")
    with pytest.raises(OSError) as ei:
        fsync_dir(b)
    assert ei.value.errno == errno.EAGAIN
    c2 = repo.branch_head("main")
    assert repo.get_commit(c2).parents == (api2,) and repo.get_commit(c2).message == "mount: add unrelated.txt"
    assert api_sha(repo, c2, "config.json") == sha(b'{"api": true}')
    log = Path(m.log).read_text()
    assert "refused" in log and "config.json" in log
    wait_for(lambda: (b / "config.json").read_bytes() == b'{"api": true}', what="the branch dir to show the API's file")
    conflicts = list_conflicts(repo)
    assert len(conflicts) == 1
    (cid, c), = conflicts.items()
    assert c["branch"] == "main" and c["conflicts"] == ["config.json"]
    with repo.store.read() as t:
        assert not list(t.keys("index", keys.PENDING)) and list(t.keys("index", keys.CONFLICTS))
    gc(repo, grace=0)  # kept data survives gc
    out = cli("flush-mount", repo.root, "--conflicts").stdout
    assert cid in out and "config.json" in out
    cli("flush-mount", repo.root, "--recover", cid, "--to-branch", "rescued")
    assert api_sha(repo, "rescued", "config.json") == sha(b'{"mount": true}')
    assert not list_conflicts(repo)
    # the mount keeps working
    (b / "after.txt").write_bytes(b"after")
    fsync_dir(b)
    assert repo.get_commit(repo.branch_head("main")).parents == (c2,)
    assert fsck(repo).ok


def _write_until_killed(path: Path, total: int, errors: list[BaseException], written: list[int]) -> None:
    block = os.urandom(1 << 20)
    try:
        with open(path, "wb") as f:
            for _ in range(total >> 20):
                f.write(block)
                f.flush()
                written.append(len(block))
    except OSError as e:
        errors.append(e)


def test_sigkill_during_a_large_write(make_repo, fuse_mount) -> None:
    repo = seeded(make_repo)
    before = tree_shas(repo, "main")
    seed_commit = repo.branch_head("main")
    m = fuse_mount(repo.root, "--commit-delay", "60")
    b = Path(m.path) / "main"
    (b / "closed.bin").write_bytes(b"closed before the crash")  # durable, not committed yet
    errors: list[BaseException] = []
    written: list[int] = []
    t = threading.Thread(target=_write_until_killed, args=(b / "big.bin", 512 << 20, errors, written))
    t.start()
    wait_for(lambda: len(written) >= 8, what="8 MB written")
    m.kill()
    t.join(timeout=30)
    assert errors and errors[0].errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    assert repo.branch_head("main") == seed_commit
    m2 = fuse_mount(repo.root, "--commit-delay", "60")
    log = Path(m2.log).read_text()
    assert "discarded incomplete write of main/big.bin (" in log, log[-2000:]
    # the closed file was committed at start-up; everything earlier is intact
    c = repo.branch_head("main")
    assert repo.get_commit(c).parents == (seed_commit,) and repo.get_commit(c).message == "mount: add closed.bin"
    assert tree_shas(repo, seed_commit) == before
    assert file_sha(Path(m2.path) / "main/closed.bin") == sha(b"closed before the crash")
    assert "big.bin" not in os.listdir(Path(m2.path) / "main")
    staging = Path(repo.root, ".coralfs/staging")
    assert len([d for d in staging.iterdir() if d.name.startswith("mount-")]) == 1  # only the live session
    assert fsck(repo).ok


def test_sigkill_during_ingest(make_repo, fuse_mount) -> None:
    repo = seeded(make_repo)
    before = tree_shas(repo, "main")
    m = fuse_mount(repo.root, "--commit-delay", "60", env={"CORALFS_MOUNT_KILL_AT": "ingest"})
    sd = state_dict(3)
    # the close (FUSE flush) never returns success: the process dies halfway through the ingest
    # (torch's C++ writer reports the failed close as a RuntimeError)
    with pytest.raises((OSError, RuntimeError)):
        torch.save({"model": sd, "blob": torch.randn(3_000_000)}, Path(m.path) / "main/ingest.pt")
    assert m.proc.wait(timeout=10) == -9
    m.kill()
    # without a mount, `coralfs flush-mount` recovers (so would the next mount's start-up)
    out = cli("flush-mount", repo.root).stdout
    assert "discarded incomplete write of main/ingest.pt (" in out, out
    m2 = fuse_mount(repo.root)
    assert "ingest.pt" not in os.listdir(Path(m2.path) / "main")
    assert tree_shas(repo, "main") == before
    report = fsck(repo)
    assert report.ok, [str(p) for p in report.problems]


def test_failed_close_is_never_committed(make_repo, fuse_mount) -> None:
    """close() returned an error: that content was never acknowledged, so nothing commits it
    later (not a directory fsync, not the unmount, not the next mount); the path shows what
    was last stored there, and the mount keeps working."""
    repo = seeded(make_repo)
    m = fuse_mount(repo.root, "--commit-delay", "60", env={"CORALFS_MOUNT_FAIL_INGEST": "full:2"})
    b = Path(m.path) / "main"
    f = open(b / "full.bin", "wb")  # noqa: SIM115
    f.write(os.urandom(200_000))
    with pytest.raises(OSError) as ei:
        f.close()
    assert ei.value.errno == errno.ENOSPC
    assert "storing main/full.bin failed" in Path(m.log).read_text()
    assert "full.bin" not in os.listdir(b)  # a new file that never stored anything: gone
    # an existing file's failed rewrite: the path shows the version last stored
    old = (b / "config.json").read_bytes()
    os.rename(b / "config.json", b / "fullconfig.json")  # (the hook fails paths containing "full")
    with pytest.raises(OSError), open(b / "fullconfig.json", "wb") as g:
        g.write(b"never acknowledged")
    assert (b / "fullconfig.json").read_bytes() == old
    (b / "fine.txt").write_bytes(b"the mount still writes")
    fsync_dir(b)
    files = repo.ls("main")
    assert "full.bin" not in files and "fine.txt" in files and api_sha(repo, "main", "fullconfig.json") == sha(old)
    m.stop()
    assert "full.bin" not in repo.ls("main")  # nor at the unmount
    assert fsck(repo).ok


def test_open_readers_keep_their_version(make_repo, fuse_mount) -> None:
    old = os.urandom(3 << 20)
    repo = seeded(make_repo, {"model.bin": old, "inplace.bin": b"A" * 100_000})
    m = fuse_mount(repo.root, "--commit-delay", "0.3")
    b = Path(m.path) / "main"
    new = os.urandom(3 << 20)
    with open(b / "model.bin", "rb") as r:
        first = r.read(1 << 20)
        with open(b / ".model.bin.tmp", "wb") as f:  # an atomic save replaces the file meanwhile
            f.write(new)
        os.replace(b / ".model.bin.tmp", b / "model.bin")
        head = repo.branch_head("main")
        wait_for(lambda: repo.branch_head("main") != head, what="the commit")
        time.sleep(0.5)  # (the ref watcher has invalidated the branch's paths)
        assert sha(first + r.read()) == sha(old)  # the open reader still reads the version it opened
    assert file_sha(b / "model.bin") == sha(new)
    # in place (same file, no rename): an open reader sees the new bytes, never a mix
    with open(b / "inplace.bin", "rb", buffering=0) as r:
        assert r.read(10) == b"A" * 10
        with open(b / "inplace.bin", "r+b") as f:
            f.write(b"B" * 100_000)
        r.seek(0)
        assert r.read() == b"B" * 100_000


def test_cli_mount_write_umount(make_repo, tmp_path: Path) -> None:
    """The background daemon (`coralfs mount`): a written file is committed by the time
    `coralfs umount` returns, whatever the commit delay."""
    from tests.conftest import fuse_unavailable_reason

    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from coralfs.mount.daemon import is_mounted, umount

    repo = seeded(make_repo)
    mp = tmp_path / "daemon"
    mp.mkdir()
    head = repo.branch_head("main")
    try:
        cli("mount", repo.root, str(mp), "--commit-delay", "300")
        (mp / "main/daemon.txt").write_bytes(b"written through the daemon")
        assert repo.branch_head("main") == head  # (not yet: the delay is 300 s)
        cli("umount", str(mp))
        assert not is_mounted(str(mp))
        c = repo.branch_head("main")
        assert c != head and repo.get_commit(c).message == "mount: add daemon.txt"
        assert api_sha(repo, c, "daemon.txt") == sha(b"written through the daemon")
    finally:
        if is_mounted(str(mp)):
            umount(str(mp), lazy=True)
