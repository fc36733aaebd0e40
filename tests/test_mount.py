"""The read side of the mount: MountView (no FUSE) and a real FUSE mount in a subprocess."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from coralfs.codec import records
from coralfs.errors import IsADirectory, NotADirectory, PathNotFound, ReadOnly, StaleNode
from coralfs.mount.nodes import NodeTable
from coralfs.mount.view import MountView
from coralfs.repository import Repository
from coralfs.store.lmdb import Store
from tests.conftest import fuse_unavailable_reason
from tests.factories import TinyNet, train_steps


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class MLP(torch.nn.Module):
    def __init__(self, hidden: int = 1024) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(128, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 128, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _pt_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class World:
    """A repository with real training checkpoints: 3 commits on main, branches, a tag."""

    def __init__(self, root: Path) -> None:
        torch.manual_seed(0)
        self.repo = Repository.init(root)
        self.files: dict[bytes, dict[str, str]] = {}  # commit id -> path -> sha256
        self.head_bytes: dict[str, bytes] = {}
        self.mlp = MLP()
        self.opt = torch.optim.SGD(self.mlp.parameters(), lr=1e-2, momentum=0.9)
        self.tiny = TinyNet()
        self.tiny_opt = torch.optim.SGD(self.tiny.parameters(), lr=0.1)
        self.main: list[bytes] = []
        for i in range(3):
            self.main.append(self.commit_step(i, f"step {i}"))
        self.repo.tag("v1.0-prod", self.main[1].hex())
        self.repo.create_branch("experiment", "main")
        self.repo.create_branch("exp/lr1", self.main[0].hex())
        tiny = TinyNet()
        train_steps(tiny, torch.optim.SGD(tiny.parameters(), lr=1.0), 2, 99)
        data = _pt_bytes(tiny.state_dict())
        e, _ = self.repo.ingest_file(_tmpfile(self.repo.root, data), "tiny/model.pt")
        self.lr1 = self.repo.commit_changes("exp/lr1", {"tiny/model.pt": e}, "lr 1.0")
        self.files[self.lr1] = dict(self.files[self.main[0]], **{"tiny/model.pt": sha(data)})

    def write_and_commit(self, contents: dict[str, bytes], message: str) -> bytes:
        for p, data in contents.items():
            fp = os.path.join(self.repo.root, p)
            os.makedirs(os.path.dirname(fp), exist_ok=True)
            with open(fp, "wb") as f:
                f.write(data)
        self.repo.add([os.path.join(self.repo.root, p) for p in contents])
        cid = self.repo.commit(message)
        head = self.repo.head()
        assert head == cid
        self.files[cid] = {p: sha(Path(self.repo.root, p).read_bytes())
                           for p in self.repo.ls(cid)}
        return cid

    def commit_step(self, i: int, message: str) -> bytes:
        _train(self.mlp, self.opt, 2, i)
        train_steps(self.tiny, self.tiny_opt, 2, i)
        contents = {
            "train.pt": _pt_bytes({"model": self.mlp.state_dict(), "optimizer": self.opt.state_dict(), "step": i}),
            "model.safetensors": st_save({k: v.contiguous() for k, v in self.mlp.state_dict().items()}),
            "tiny/model.pt": _pt_bytes(self.tiny.state_dict()),
            "config.json": json.dumps({"hidden": 1024, "step": i}).encode(),
        }
        self.head_bytes = contents
        return self.write_and_commit(contents, message)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    w = World(tmp_path_factory.mktemp("mountrepo") / "repo")
    yield w
    w.repo.close()


@pytest.fixture(scope="module")
def mnt(world: World, fuse_mounter, tmp_path_factory: pytest.TempPathFactory):
    m = fuse_mounter(world.repo.root, tmp_path_factory.mktemp("mnt") / "coral", "--read-only")  # writes: test_mount_write
    yield m
    m.stop()


# ====================================================================== MountView (no FUSE)
def test_view_layout(world: World) -> None:
    v = MountView(world.repo)
    assert v.readdir("/") == ["exp", "experiment", "main", "@commits", "@tags"]
    assert v.readdir("/exp") == ["lr1"]
    assert v.readdir("/exp/lr1") == ["config.json", "model.safetensors", "tiny", "train.pt"]
    assert v.scandir("/main/tiny") == [("model.pt", False)]
    assert sorted(v.readdir("/@commits")) == sorted(c.hex() for c in world.repo.commits())
    assert v.readdir("/@tags") == ["v1.0-prod"]
    c1 = world.main[1].hex()
    assert v.readdir(f"/@commits/{c1[:4]}") == v.readdir(f"/@commits/{c1}") == v.readdir("/@tags/v1.0-prod")
    for bad in ("/nope", "/@other", "/@commits/zzzz", "/@commits/abc", "/@commits/" + "0" * 64, "/main/missing",
                "/exp/lr2", "/@tags/v2", "/main/train.pt/x"):
        with pytest.raises(PathNotFound) as ei:
            v.getattr(bad)
        assert ei.value.errno == errno.ENOENT
    with pytest.raises(NotADirectory):
        v.readdir("/main/train.pt")
    with pytest.raises(IsADirectory):
        v.open("/main/tiny")


def test_view_attrs(world: World) -> None:
    v = MountView(world.repo)
    head = world.repo.get_commit(world.main[2])
    a = v.getattr("/main/train.pt")
    assert stat.S_ISREG(a.mode) and stat.S_IMODE(a.mode) == 0o644
    assert a.size == len(world.head_bytes["train.pt"]) and a.blocks == (a.size + 511) // 512
    assert a.mtime == head.time and a.blksize >= 1 << 20
    c = v.getattr(f"/@commits/{world.main[0].hex()}/train.pt")
    assert stat.S_IMODE(c.mode) == 0o444 and c.mtime == world.repo.get_commit(world.main[0]).time
    assert stat.S_IMODE(v.getattr("/@tags/v1.0-prod/tiny").mode) == 0o555
    assert stat.S_IMODE(v.getattr("/main/tiny").mode) == 0o755
    assert stat.S_IMODE(v.getattr("/@commits").mode) == 0o555
    root = v.getattr("/main")
    assert root.is_dir and root.nlink == 3 and root.mtime == head.time
    assert v.is_immutable("/@commits/x/y") and v.is_immutable("/@tags") and not v.is_immutable("/main/train.pt")


def test_view_read_and_pin(world: World) -> None:
    v = MountView(world.repo)
    for path, data in world.head_bytes.items():
        fh = v.open(f"/main/{path}")
        assert v.read(fh, 0, len(data) + 10) == data
        assert v.read(fh, 1000, 5000) == data[1000:6000]
        assert v.read(fh, len(data), 10) == b""
        v.release(fh)
    for mode in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(ReadOnly) as ei:
            v.open("/main/config.json", mode)
        assert ei.value.errno == errno.EROFS
    with pytest.raises(ReadOnly):
        v.refuse_write("/@commits")


def test_nodes_one_inode_per_version(world: World) -> None:
    """The kernel keeps one page cache and one size per inode: every version of a file gets its
    own inode, an unchanged file keeps its inode across commits, and a superseded inode keeps
    serving its own version (content and attributes) to whoever has it open."""
    now = [100.0]
    v = MountView(world.repo)
    t = NodeTable(v, clock=lambda: now[0])
    t.revalidate()  # the first snapshot
    r = world.repo
    r.create_branch("pin", "main")
    entries, dirs = t.revalidate()
    assert 1 in dirs  # a new ref: the root's attributes (its listing) changed
    pin = t.lookup(1, "pin")
    a = t.lookup(pin.ino, "config.json")
    train = t.lookup(pin.ino, "train.pt")
    assert t.lookup(pin.ino, "config.json") is a and a.nlookup == 2
    fh = v.open(a.path, ino=a.ino, manifest=a.token[1])
    old = v.read(fh, 0, 1 << 20)
    e, _ = r.ingest_file(_tmpfile(r.root, b'{"changed": true}'), "config.json")
    r.commit_changes("pin", {"config.json": e, "new.txt": e}, "change")
    # before the poll tells the kernel, an open of the superseded inode is refused (ESTALE: the
    # kernel walks the path again), unless the kernel has just looked it up
    now[0] += 1.0
    with pytest.raises(StaleNode) as ei:
        t.check_current(a)
    assert ei.value.errno == errno.ESTALE
    t.check_current(train)  # unchanged: still current
    entries, dirs = t.revalidate()
    assert (pin.ino, "config.json") in entries and pin.ino in dirs
    assert (pin.ino, "train.pt") not in entries
    b = t.lookup(pin.ino, "config.json")
    assert b.ino != a.ino and b.token != a.token
    assert t.lookup(pin.ino, "train.pt") is train  # the unchanged file keeps its inode (and page cache)
    assert v.read(fh, 0, 1 << 20) == old  # the old inode still reads its version ...
    assert t.attr(a.ino).size == len(old) != t.attr(b.ino).size == len(b'{"changed": true}')  # ... at its size
    fh_b = v.open(b.path, ino=b.ino, manifest=b.token[1])
    assert v.read(fh_b, 0, 100) == b'{"changed": true}'
    assert t.revalidate() == ([], [])
    # the old inode lives until the kernel forgets it and nobody has it open
    t.opened(a, fh, None)
    t.forget(a.ino, 2)
    assert a.ino in t.by_ino
    v.release(fh)
    t.released(a.ino, fh)
    assert a.ino not in t.by_ino
    r.delete_branch("pin")
    entries, dirs = t.revalidate()
    assert (1, "pin") in entries and 1 in dirs
    with pytest.raises(PathNotFound):
        v.getattr("/pin")
    assert v.read(fh_b, 0, 100) == b'{"changed": true}'  # still open: still readable
    v.release(fh_b)
    assert v.open_files == 0


def test_view_chunk_loading(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """One decode per chunk however many readers want it; sequential readers get the next chunks
    decoded ahead of them."""
    r = world.repo
    ostore = r.objects
    decoded: list[bytes] = []
    real = ostore._decode_chunk

    def slow_decode(cid: bytes, _depth: int = 0) -> bytes:
        if _depth == 0:
            decoded.append(cid)
            time.sleep(0.05)
        return real(cid, _depth)

    monkeypatch.setattr(ostore, "_decode_chunk", slow_decode)
    ostore.chunk_cache.clear()
    with MountView(r, prefetch_bytes=0) as v:
        fh = v.open(f"/@commits/{world.main[2].hex()}/train.pt")
        with ThreadPoolExecutor(8) as ex:
            parts = list(ex.map(lambda i: v.read(fh, i << 16, 1 << 16), range(8)))
        assert b"".join(parts) == world.head_bytes["train.pt"][: 8 << 16]
        assert sorted(decoded) == sorted(v.opened(fh).view.chunks_in(0, 8 << 16))  # each once
    ostore.chunk_cache.clear()
    decoded.clear()
    with MountView(r, prefetch_bytes=8 << 20) as v:
        fh = v.open(f"/@commits/{world.main[2].hex()}/train.pt")
        view = v.opened(fh).view
        for i in range(3):  # three sequential 1 MiB reads: the reader is sequential
            v.read(fh, i << 20, 1 << 20)
        ahead = view.chunks_in(3 << 20, 8 << 20)
        deadline = time.monotonic() + 10
        while not all(ostore.chunk_cache.get(c) is not None for c in ahead):
            assert time.monotonic() < deadline, "the next chunks were not decoded ahead"
            time.sleep(0.02)
        assert len(decoded) == len(set(decoded))  # prefetch and reads never decode a chunk twice


def _tmpfile(root: str, data: bytes) -> str:
    p = os.path.join(root, ".coralfs", "tmp-test-input")
    with open(p, "wb") as f:
        f.write(data)
    return p


# ====================================================================== the FUSE mount
def test_layout(world: World, mnt) -> None:
    assert {"main", "exp", "experiment", "@commits", "@tags"} <= set(os.listdir(mnt.path))
    assert os.listdir(mnt / "exp") == ["lr1"]
    assert sorted(os.listdir(mnt / "main")) == ["config.json", "model.safetensors", "tiny", "train.pt"]
    ids = sorted(os.listdir(mnt / "@commits"))
    assert ids == sorted(c.hex() for c in world.repo.commits()) and all(len(i) == 64 for i in ids)
    c0 = world.main[0].hex()
    for prefix in (c0[:4], c0[:6], c0[:20]):
        assert sorted(os.listdir(mnt / f"@commits/{prefix}")) == sorted(os.listdir(mnt / f"@commits/{c0}"))
    assert os.listdir(mnt / "@tags") == ["v1.0-prod"]
    assert file_sha(mnt / "@tags/v1.0-prod/train.pt") == world.files[world.main[1]]["train.pt"]
    for bad in ("nope", "@commits/" + c0[:3], "@commits/xyz0", "main/nope", "@x"):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / bad)
    st = os.stat(mnt / "main/train.pt")
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_size == len(world.head_bytes["train.pt"])
    assert st.st_blksize >= 1 << 20 and st.st_blocks == (st.st_size + 511) // 512
    assert abs(st.st_mtime - world.repo.get_commit(world.main[2]).time) < 1e-3
    st = os.stat(mnt / f"@commits/{c0}/tiny/model.pt")
    assert stat.S_IMODE(st.st_mode) == 0o444
    assert abs(st.st_ctime - world.repo.get_commit(world.main[0]).time) < 1e-3
    assert stat.S_IMODE(os.stat(mnt / f"@commits/{c0}").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(mnt / "main/tiny").st_mode) == 0o755
    du = subprocess.run(["du", "-s", "--block-size=1", mnt / "main"], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) >= sum(len(b) for b in world.head_bytes.values())


def test_every_file_matches(world: World, mnt) -> None:
    for cid, files in world.files.items():
        for path, digest in files.items():
            assert file_sha(mnt / f"@commits/{cid.hex()}/{path}") == digest, (cid.hex(), path)
    for path, digest in world.files[world.main[2]].items():
        assert file_sha(mnt / f"main/{path}") == digest
        assert file_sha(mnt / f"experiment/{path}") == digest
    assert file_sha(mnt / "exp/lr1/tiny/model.pt") == world.files[world.lr1]["tiny/model.pt"]
    # re-read (page cache) and a read at odd offsets
    p = mnt / f"@commits/{world.main[2].hex()}/train.pt"
    data = world.head_bytes["train.pt"]
    assert file_sha(p) == sha(data)
    with open(p, "rb") as f:
        for off, n in ((0, 1), (4095, 3), ((4 << 20) - 7, 100), (len(data) - 5, 100), (len(data) + 1, 10)):
            f.seek(off)
            assert f.read(n) == data[off:off + n]


def test_torch_and_safetensors(world: World, mnt) -> None:
    want = torch.load(io.BytesIO(world.head_bytes["train.pt"]), weights_only=True)
    for kw in ({}, {"mmap": True}):
        got = torch.load(mnt / "main/train.pt", weights_only=True, **kw)
        assert got["step"] == want["step"]
        for k, t in want["model"].items():
            assert torch.equal(got["model"][k], t)
        assert torch.equal(got["optimizer"]["state"][0]["momentum_buffer"],
                           want["optimizer"]["state"][0]["momentum_buffer"])
    with safe_open(mnt / "main/model.safetensors", "pt") as f:
        for k in ("net.2.weight", "net.6.bias"):
            assert torch.equal(f.get_tensor(k), want["model"][k])
    old = torch.load(mnt / "@tags/v1.0-prod/train.pt", weights_only=True, mmap=True)
    assert old["step"] == 1


def test_writes_are_refused(world: World, mnt) -> None:
    c0 = world.main[0].hex()
    targets = [f"@commits/{c0}/train.pt", "@tags/v1.0-prod/train.pt", "main/train.pt", "exp/lr1/config.json"]
    for t in targets:
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
            with pytest.raises(OSError) as ei:
                os.open(mnt / t, flags)
            assert ei.value.errno == errno.EROFS, (t, flags)
        for op in (lambda p: os.truncate(p, 0), os.unlink, lambda p: os.rename(p, p + ".x"),
                   lambda p: os.chmod(p, 0o600), lambda p: os.utime(p, (0, 0))):
            with pytest.raises(OSError) as ei:
                op(mnt / t)
            assert ei.value.errno == errno.EROFS, t
    for d in ("main", f"@commits/{c0}", "@tags/v1.0-prod", "", "@commits"):
        for op in (lambda p: os.mkdir(os.path.join(p, "newdir")),
                   lambda p: os.open(os.path.join(p, "new.bin"), os.O_WRONLY | os.O_CREAT, 0o644),
                   lambda p: os.symlink("x", os.path.join(p, "link"))):
            with pytest.raises(OSError) as ei:
                op(mnt / d)
            assert ei.value.errno == errno.EROFS, d
    with pytest.raises(OSError) as ei:
        os.rmdir(mnt / "main/tiny")
    assert ei.value.errno == errno.EROFS
    assert file_sha(mnt / "main/train.pt") == world.files[world.main[2]]["train.pt"]


def test_commit_while_mounted(world: World, mnt) -> None:
    r = world.repo
    r.create_branch("live", "main")
    deadline = time.monotonic() + 10
    while "live" not in os.listdir(mnt.path):
        assert time.monotonic() < deadline, "a new branch did not appear"
        time.sleep(0.05)
    old_path = mnt / "live/train.pt"
    old_sha = world.files[world.main[2]]["train.pt"]
    fd = os.open(old_path, os.O_RDONLY)
    try:
        head = os.pread(fd, 1 << 20, 0)  # the kernel caches what the handle has read
        # the next training step, committed through the Python API while mounted
        _train(world.mlp, world.opt, 1, 42)
        new = _pt_bytes({"model": world.mlp.state_dict(), "optimizer": world.opt.state_dict(), "step": 3})
        assert len(new) == len(world.head_bytes["train.pt"])
        e, _ = r.ingest_file(_tmpfile(r.root, new), "train.pt")
        n, _ = r.ingest_file(_tmpfile(r.root, b"notes\n"), "notes.txt")
        cid = r.commit_changes("live", {"train.pt": e, "notes.txt": n}, "one more step")
        deadline = time.monotonic() + 10
        while file_sha(old_path) != sha(new):
            assert time.monotonic() < deadline, "the branch directory did not follow the commit"
            time.sleep(0.05)
        assert "notes.txt" in os.listdir(mnt / "live")
        assert abs(os.stat(mnt / "live/train.pt").st_mtime - r.get_commit(cid).time) < 1e-3
        # the file opened before the commit still reads the version it opened
        h = hashlib.sha256(head)
        pos = len(head)
        while block := os.pread(fd, 1 << 20, pos):
            h.update(block)
            pos += len(block)
        assert h.hexdigest() == old_sha
        assert file_sha(mnt / f"@commits/{cid.hex()}/train.pt") == sha(new)
        assert file_sha(mnt / "main/train.pt") == old_sha
    finally:
        os.close(fd)
    r.delete_branch("live")
    deadline = time.monotonic() + 10
    while os.path.exists(mnt / "live"):
        assert time.monotonic() < deadline, "a deleted branch did not disappear"
        time.sleep(0.05)


_HASH_SCRIPT = """
import hashlib, json, sys
out = {}
for p in sys.argv[1:]:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    out[p] = h.hexdigest()
print(json.dumps(out))
"""


def test_concurrent_readers(world: World, mnt) -> None:
    want = {mnt / f"@commits/{c.hex()}/{p}": d for c, files in world.files.items() for p, d in files.items()}
    want.update({mnt / f"main/{p}": d for p, d in world.files[world.main[2]].items()})
    paths = sorted(want)
    procs = [subprocess.Popen([sys.executable, "-c", _HASH_SCRIPT, *(paths if i == 0 else paths[::-1])],
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    data = world.head_bytes["model.safetensors"]
    errors: list[str] = []

    def random_reads(seed: int) -> None:
        rnd = random.Random(seed)
        with open(mnt / "main/model.safetensors", "rb", buffering=0) as f:
            for _ in range(40):
                off, n = rnd.randrange(len(data)), rnd.choice((1, 4096, 1 << 20, 3 << 20))
                f.seek(off)
                if f.read(n) != data[off:off + n]:
                    errors.append(f"bytes differ at {off}+{n}")

    with ThreadPoolExecutor(8) as ex:
        hashes = list(ex.map(file_sha, paths * 2))
        list(ex.map(random_reads, range(4)))
    assert hashes == [want[p] for p in paths * 2]
    assert not errors
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        assert json.loads(out) == {k: want[k] for k in paths}


def test_cli_mount_umount(world: World, tmp_path: Path) -> None:
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from coralfs.mount.daemon import is_mounted, umount

    mp = tmp_path / "cli"
    mp.mkdir()
    run = [sys.executable, "-m", "coralfs"]
    try:
        res = subprocess.run([*run, "mount", world.repo.root, str(mp)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert os.path.ismount(mp)
        assert file_sha(str(mp / "main/config.json")) == world.files[world.main[2]]["config.json"]
        res = subprocess.run([*run, "mount", world.repo.root, str(mp)], capture_output=True, text=True)
        assert res.returncode == 2 and "already" in res.stderr
        res = subprocess.run([*run, "umount", str(mp)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert not is_mounted(str(mp))
        # a mount whose process died (kill -9) is detached by umount
        res = subprocess.run([*run, "mount", world.repo.root, str(mp)], capture_output=True, text=True, timeout=60)
        pid = int(res.stdout.rsplit("pid ", 1)[1].split(")")[0])
        os.kill(pid, 9)
        deadline = time.monotonic() + 10
        while True:
            try:
                os.listdir(mp)
            except OSError as e:
                assert e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        res = subprocess.run([*run, "umount", str(mp)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert not is_mounted(str(mp))
        res = subprocess.run([*run, "mount", str(tmp_path), str(mp)], capture_output=True, text=True)
        assert res.returncode == 2 and "not a coralfs repository" in res.stderr
    finally:
        if is_mounted(str(mp)):
            umount(str(mp), lazy=True)


def test_corruption_gives_eio(make_repo, fuse_mount) -> None:
    repo = make_repo("corrupt")
    torch.manual_seed(5)
    m = MLP(256)
    _train(m, torch.optim.SGD(m.parameters(), lr=0.1), 2, 5)
    good = st_save({k: v.contiguous() for k, v in m.state_dict().items()})
    bad = _pt_bytes(m.state_dict())
    _train(m, torch.optim.SGD(m.parameters(), lr=0.1), 1, 6)  # one more step: new weights
    wrong = st_save({"w": m.state_dict()["net.2.weight"].contiguous()})
    names = {"good.safetensors": good, "bad.pt": bad, "wrong.safetensors": wrong}
    for name, data in names.items():
        Path(repo.root, name).write_bytes(data)
    repo.add([os.path.join(repo.root, n) for n in names])
    repo.commit("three files")
    entry = repo.entry("HEAD", "bad.pt")
    good_chunks = set(repo.get_manifest(repo.entry("HEAD", "good.safetensors").manifest).chunk_ids())
    victim = next(c for c in repo.get_manifest(entry.manifest).chunk_ids() if c not in good_chunks)
    store = Store(repo.store.path)
    with store.read() as t:
        record = bytearray(t.get("chunks", victim))
    for i in range(len(record) - 16, len(record)):  # the payload's tail: decoding gives other bytes or fails
        record[i] ^= 0x5A
    store.write(lambda t: t.put("chunks", victim, bytes(record)))
    # a record that decodes cleanly to the wrong bytes: only the id check can catch it
    victim2 = next(c for c in repo.get_manifest(repo.entry("HEAD", "wrong.safetensors").manifest).chunk_ids()
                   if c not in good_chunks)
    with store.read() as t:
        n = records.parse_header(t.get("chunks", victim2)).raw_len
    store.write(lambda t: t.put("chunks", victim2, records.pack(records.RAW, 1, n, bytes(n))))
    store.close()

    m = fuse_mount(repo.root)
    with pytest.raises(OSError) as ei:
        with open(m / "main/bad.pt", "rb") as f:
            f.read()
    assert ei.value.errno == errno.EIO
    with pytest.raises(OSError) as ei:  # (not via mmap: an I/O error there is SIGBUS)
        with open(m / "main/wrong.safetensors", "rb") as f:
            f.read()
    assert ei.value.errno == errno.EIO
    assert file_sha(m / "main/good.safetensors") == sha(good)  # the rest of the repository still reads
    log = Path(m.log).read_text()
    assert "/main/bad.pt" in log and ("IntegrityError" in log or "corrupt" in log), log[-2000:]
    assert "/main/wrong.safetensors" in log and "does not match its id" in log, log[-2000:]
