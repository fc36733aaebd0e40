"""Shared pytest fixtures.

* ``make_repo``: a factory for empty repositories in a temporary directory (closed at the end).
* ``cli``: run the command line in this process (``coralfs.cli.main``), output captured.
* ``fuse_mounter`` (session) / ``fuse_mount`` (per test): mount a repository with a real
  FUSE filesystem in a subprocess (``python -m coralfs.mount.daemon REPO MOUNTPOINT --foreground``),
  so a crash in the filesystem cannot take the test process down (``FuseMount.kill()``
  simulates one: SIGKILL, then the dead mount is detached). Every mount is always
  unmounted (and its process stopped) by a finalizer, also when the test fails. Tests that
  need FUSE are skipped, with the reason, only where /dev/fuse or fusermount3 is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MOUNT_TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parent.parent

# LMDB commits without fsync in the test process and in every process it starts (CLI
# subprocesses, mount daemons): fsync was a third of the time of the tests that write. The
# crash tests kill processes, which loses nothing either way (the page cache survives); only a
# power loss would. test_diskfull.py keeps fsync; CORALFS_UNSAFE_NO_FSYNC=0 keeps it everywhere
# (``make test-deep`` does). test_store.py checks that a repository syncs by default.
os.environ.setdefault("CORALFS_UNSAFE_NO_FSYNC", "1")

# Hypothesis profiles (tests/depth.py): "quick" for make test, "deep" for make test-deep
# (only where a test does not set its example counts itself: those use depth.pick).
try:
    from hypothesis import settings as _hypothesis_settings

    from tests import depth as _depth

    _hypothesis_settings.register_profile("quick", max_examples=100, deadline=None)
    _hypothesis_settings.register_profile("deep", max_examples=2000, deadline=None)
    _hypothesis_settings.load_profile(_depth.PROFILE)
except ImportError:  # (hypothesis is a dev dependency)
    pass


def fuse_unavailable_reason() -> str | None:
    """Why a FUSE mount cannot work here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this environment)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    return None


def _die_with_parent() -> None:
    """In the mount subprocess: SIGTERM when the test process dies (even by a crash, when no
    finalizer runs); libfuse then unmounts."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _mounted(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return any(line.split()[4] == path for line in f if len(line.split()) > 4)
    except OSError:
        return os.path.ismount(path)


@dataclass
class FuseMount:
    """A repository mounted by a ``python -m coralfs.mount.daemon --foreground`` subprocess."""

    repo: str
    path: str
    proc: subprocess.Popen
    output: str  # the subprocess's stdout+stderr
    log: str  # REPO/.coralfs/mount.log
    stopped: bool = field(default=False)

    def __truediv__(self, rel: str) -> str:
        return os.path.join(self.path, rel.lstrip("/"))

    def log_text(self) -> str:
        parts = []
        for p in (self.log, self.output):
            if os.path.exists(p):
                parts.append(Path(p).read_text(errors="replace"))
        return "\n".join(parts)

    @classmethod
    def start(cls, repo: str | os.PathLike[str], mountpoint: str | os.PathLike[str], *args: str,
              timeout: float = MOUNT_TIMEOUT, env: dict[str, str] | None = None) -> FuseMount:
        reason = fuse_unavailable_reason()
        if reason:
            pytest.skip(reason)
        repo, mp = os.path.abspath(os.fspath(repo)), os.path.abspath(os.fspath(mountpoint))
        os.makedirs(mp, exist_ok=True)
        output = mp.rstrip("/") + ".out"
        env = dict(os.environ, **(env or {}),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(output, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "coralfs.mount.daemon", repo, mp, "--foreground", *args],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent)
        m = cls(repo, mp, proc, output, os.path.join(repo, ".coralfs", "mount.log"))
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mp):
            if proc.poll() is not None or time.monotonic() > deadline:
                m.stop()
                pytest.fail(f"mount of {repo} on {mp} did not come up (exit {proc.returncode}):\n{m.log_text()}")
            time.sleep(0.02)
        return m

    def kill(self) -> None:
        """SIGKILL the filesystem process (a crash), then detach the dead mount."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.stopped = True
        if _mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True, timeout=30)

    def stop(self) -> None:
        """Unmount and stop the process; safe to call twice, never raises."""
        if self.stopped:
            return
        self.stopped = True
        for cmd in (["fusermount3", "-u", self.path], ["fusermount3", "-u", "-z", self.path]):
            if not _mounted(self.path):
                break
            subprocess.run(cmd, capture_output=True, timeout=30)
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if _mounted(self.path):  # the process is gone: detach whatever is left
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True, timeout=30)


Mounter = Callable[..., FuseMount]


@pytest.fixture(scope="session")
def fuse_mounter() -> Iterator[Mounter]:
    """``fuse_mounter(repo, mountpoint, *extra_args) -> FuseMount``; usable from fixtures of any
    scope. Call ``.stop()`` when done; whatever is still mounted at the end of the session is
    unmounted here."""
    mounts: list[FuseMount] = []

    def make(repo: str | os.PathLike[str], mountpoint: str | os.PathLike[str], *args: str,
             env: dict[str, str] | None = None) -> FuseMount:
        m = FuseMount.start(repo, mountpoint, *args, env=env)
        mounts.append(m)
        return m

    yield make
    for m in mounts:
        m.stop()


@pytest.fixture
def fuse_mount(fuse_mounter: Mounter, tmp_path: Path) -> Iterator[Callable[..., FuseMount]]:
    """``fuse_mount(repo, *extra_args, env=None) -> FuseMount`` on a fresh mount point (``env``: extra
    environment variables of the filesystem process); unmounted after the test."""
    mounts: list[FuseMount] = []

    def make(repo: str | os.PathLike[str], *args: str, env: dict[str, str] | None = None) -> FuseMount:
        m = fuse_mounter(repo, tmp_path / f"mnt{len(mounts)}", *args, env=env)
        mounts.append(m)
        return m

    yield make
    for m in mounts:
        m.stop()


@pytest.fixture
def make_repo(tmp_path: Path) -> Iterator[Callable[..., object]]:
    """``make_repo(name="repo", **kw) -> Repository`` (empty, in tmp_path); closed after the test."""
    from coralfs.repository import Repository

    repos: list[Repository] = []

    def make(name: str = "repo", **kw: object) -> Repository:
        r = Repository.init(tmp_path / name, **kw)  # type: ignore[arg-type]
        repos.append(r)
        return r

    yield make
    for r in repos:
        r.close()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    """``cli(*argv, cwd=None, env=None) -> (exit code, stdout, stderr)``: the command line run in
    this process (``coralfs.cli.main``, what the console script calls), in ``cwd`` with ``env``
    added. For what a command does; a test of the process itself (its argv and stdout bytes,
    a kill, its memory) runs ``python -m coralfs`` in a subprocess."""
    from coralfs.cli import main

    def run(*argv: str | bytes | os.PathLike[str], cwd: str | os.PathLike[str] | None = None,
            env: dict[str, str] | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        with monkeypatch.context() as mp:
            if cwd is not None:
                mp.chdir(cwd)
            for k, v in (env or {}).items():
                mp.setenv(k, v)
            rc = main([os.fsdecode(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


# ---------------------------------------------------------------- shared by every test file
@pytest.fixture(autouse=True)
def _test_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No repository from the caller's environment, a fixed author, and single-threaded
    torch (tiny models: intra-op threads only contend on 2 cores)."""
    monkeypatch.delenv("CORALFS_REPO", raising=False)
    monkeypatch.setenv("CORALFS_AUTHOR", "tester")
    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None else 0
    if torch is not None:
        torch.set_num_threads(1)
    yield
    if torch is not None:
        torch.set_num_threads(n)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[object]:
    """A fresh repository in ``tmp_path/repo``, closed afterwards."""
    from coralfs.repository import Repository

    r = Repository.init(tmp_path / "repo")
    yield r
    r.close()
