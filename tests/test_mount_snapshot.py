"""A file opened from a branch directory is a snapshot for the life of that handle.

The promise (README, "The mount"): content, ``fstat`` size and ``mmap`` of
an open fd stay the version it opened; a new open after a commit sees the new version,
never a mix; the kernel's attribute and page caches never serve one version's bytes under
another's size. The same for the mount's own commits: a file closed through the mount shows
its size and bytes while the mount commits it. And, for the fix not to cost speed: an
unchanged file keeps its page cache when another file of the branch changes.

Real FUSE mounts (the ``fuse_mount`` fixture: a subprocess each, always unmounted). The
other process's commits go through the CLI (``coralfs add`` + ``commit``) or the Python API
in a subprocess, never through the mount. Only the mount's public behaviour is used.

``CORALFS_DEEP=1`` (``make test-deep``) runs the long variants: the stress test and the
closed-file test for ``CORALFS_STRESS_SECONDS`` (600) each; fsx (tests/test_mount_fsx.py)
for 100k operations over several seeds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tests.depth import DEEP
from tests.snapshot_tools import Contents, mmap_read, plan_sizes, read_fd

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "coralfs"]

MiB = 1 << 20
# the stress test: how long the writer commits in deep mode (normal mode: STRESS_COMMITS commits)
STRESS_SECONDS = float(os.environ.get("CORALFS_STRESS_SECONDS", "600"))
STRESS_COMMITS = int(os.environ.get("CORALFS_STRESS_COMMITS", "10"))


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def cli(*args: str, cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=120)
    assert res.returncode == 0, f"coralfs {' '.join(args)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def cli_commit(repo_root: str, path: str, data: bytes, message: str) -> None:
    """What another user does: put the file in the work tree, ``coralfs add``, ``coralfs commit``."""
    fp = Path(repo_root, path)
    fp.parent.mkdir(parents=True, exist_ok=True)
    fp.write_bytes(data)
    cli("add", path, cwd=repo_root)
    cli("commit", "-m", message, cwd=repo_root)


def seeded_repo(make_repo, files: dict[str, bytes]):
    repo = make_repo()
    for p, data in files.items():
        Path(repo.root, p).write_bytes(data)
    repo.add([os.path.join(repo.root, p) for p in files])
    repo.commit("seed")
    return repo


def wait_until(cond, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        r = cond()
        if r:
            return r
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)


class Versions:
    """Named versions of one file (see tests.snapshot_tools.Contents), checks of what an fd
    shows, and a list of the problems found (a test reports them all at its end, so that one
    run shows every way the mount got it wrong)."""

    def __init__(self, sizes: list[int]) -> None:
        self.c = Contents(sizes)
        self.data = [self.c.full(v) for v in range(len(sizes))]
        self.problems: list[str] = []

    def which(self, data: bytes) -> int | None:
        v = self.c.by_size.get(len(data))
        return v if v is not None and data == self.data[v] else None

    def explain(self, data: bytes, size: int | None = None) -> str:
        s = f"{len(data)} bytes"
        if size is not None:
            s += f", fstat size {size}"
        return f"{s}: {self.c.describe(data, 0)}"

    def problem(self, msg: str) -> None:
        self.problems.append(msg)

    def check_fd(self, fd: int, v: int, when: str, mmap_too: bool = True) -> bool:
        """``fd`` shows exactly version ``v``: fstat size, every byte by pread, every byte by mmap."""
        exp = self.data[v]
        ok = True
        size = os.fstat(fd).st_size
        data = read_fd(fd)
        if size != len(exp) or data != exp:
            ok = False
            self.problem(f"{when}: the fd must show v{v} ({len(exp)} bytes); pread from 0 and fstat show "
                         f"{self.explain(data, size)}")
        tail = os.pread(fd, 1 << 16, len(exp) - 100)  # past the other version's end: not cut at another size
        if tail != exp[-100:]:
            ok = False
            self.problem(f"{when}: pread of v{v}'s last 100 bytes returned {self.explain(tail)}")
        if mmap_too:
            mdata, err = mmap_read(fd, len(exp))
            if err is not None or mdata != exp:
                ok = False
                self.problem(f"{when}: mmap of the fd (v{v}, {len(exp)} bytes): {err or 'wrong bytes'}; "
                             f"read {self.explain(mdata)}")
        return ok

    def open_and_identify(self, path: str, when: str, allowed: set[int]) -> tuple[int, int | None]:
        """Open ``path``: ``(fd, v)`` if it shows one of ``allowed`` whole with that version's
        size, else ``(fd, None)`` and a problem."""
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        data = read_fd(fd)
        v = self.which(data)
        if v is None or v not in allowed or size != len(data):
            self.problem(f"{when}: a new open must show one of {', '.join(f'v{x}' for x in sorted(allowed))} whole "
                         f"with its size; it shows {self.explain(data, size)}")
            return fd, None
        return fd, v

    def assert_none(self) -> None:
        if self.problems:
            raise AssertionError(f"{len(self.problems)} problem(s):\n- " + "\n- ".join(self.problems[:40]))


def poll_new_opens(vs: Versions, path: str, want: int, allowed: set[int], when: str, timeout: float = 15) -> bool:
    """Open ``path`` again and again until it shows ``want`` (at most ``timeout`` s); every open
    meanwhile must show one of ``allowed`` whole (else a problem, and stop)."""
    deadline = time.monotonic() + timeout
    while True:
        n = len(vs.problems)
        fd, v = vs.open_and_identify(path, when, allowed)
        os.close(fd)
        if v == want:
            return True
        if len(vs.problems) > n:
            return False
        if time.monotonic() > deadline:
            vs.problem(f"{when}: after {timeout} s, new opens still do not show v{want}")
            return False
        time.sleep(0.05)


# ====================================================================== deterministic
def test_open_fd_keeps_its_version_when_the_branch_moves(make_repo, fuse_mount) -> None:
    """Deterministic: v0 (3 MiB) open and read; another process commits v1
    (700 KiB); the open fd still shows v0 (pread, fstat, mmap); a new open shows v1."""
    vs = Versions([3 * MiB, 700 * 1024])
    v0, v1 = vs.data
    repo = seeded_repo(make_repo, {"f.bin": v0, "other.bin": b"unchanged" * 1000})
    m = fuse_mount(repo.root)
    path = m / "main/f.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        vs.check_fd(fd, 0, "1. before the commit")
        cli_commit(repo.root, "f.bin", v1, "v1: 700 KiB")
        vs.check_fd(fd, 0, "2. right after another process committed v1", mmap_too=False)
        time.sleep(1.0)  # the mount polls the refs (0.2 s): let it notice before anything else looks
        vs.check_fd(fd, 0, "3. a second after the commit")
        # a new open shows v1 once the mount has noticed; meanwhile only whole v0 or whole v1
        poll_new_opens(vs, path, 1, {0, 1}, "4. new opens after the commit")
        vs.check_fd(fd, 0, "5. the old fd once new opens were made")
        st = os.stat(path)
        if st.st_size != len(v1):
            vs.problem(f"6. stat of the path after the commit: size {st.st_size}, v1 has {len(v1)}")
        fd2, v = vs.open_and_identify(path, "7. a new open after the commit", {1})
        try:
            if v is not None:
                vs.check_fd(fd2, 1, "8. the new open")
            vs.check_fd(fd, 0, "9. the old fd while a new fd shows v1")
            if v is not None:
                vs.check_fd(fd2, 1, "10. the new open after the old fd was read again")
        finally:
            os.close(fd2)
    finally:
        os.close(fd)
    fd3, v = vs.open_and_identify(path, "11. an open after every fd was closed", {1})
    os.close(fd3)
    vs.assert_none()


def test_reopen_right_after_a_commit_sees_one_whole_version(make_repo, fuse_mount) -> None:
    """Commits of very different sizes, each followed at once (no sleep) by a new open: it
    shows the old or the new version, whole, with that version's size (fstat and mmap), and
    keeps showing it after the mount has noticed the commit; the fd opened before the commit
    keeps the old one."""
    rounds = 12 if DEEP else 4
    vs = Versions([3 * MiB + 123, *plan_sizes(rounds, seed=5, lo=90 << 10, hi=5 * MiB)])
    repo = seeded_repo(make_repo, {"f.bin": vs.data[0]})
    m = fuse_mount(repo.root)
    path = m / "main/f.bin"
    for new in range(1, rounds + 1):
        old = new - 1
        if len(vs.problems) > 12:
            break
        if not poll_new_opens(vs, path, old, {old}, f"round {new}: before the commit"):
            continue
        fd_old = os.open(path, os.O_RDONLY)
        try:
            vs.check_fd(fd_old, old, f"round {new}: the fd opened before the commit", mmap_too=False)
            cli_commit(repo.root, "f.bin", vs.data[new], f"v{new}")
            fd_now, v_now = vs.open_and_identify(path, f"round {new}: an open right after the commit", {old, new})
            try:
                if v_now is not None:
                    vs.check_fd(fd_now, v_now, f"round {new}: the fd opened right after the commit (v{v_now})")
                vs.check_fd(fd_old, old, f"round {new}: the fd opened before the commit")
                poll_new_opens(vs, path, new, {old, new}, f"round {new}: new opens after the commit")
                if v_now is not None:
                    vs.check_fd(fd_now, v_now, f"round {new}: the fd opened right after the commit, "
                                f"once new opens show v{new}")
                vs.check_fd(fd_old, old, f"round {new}: the fd opened before the commit, once new opens show v{new}")
            finally:
                os.close(fd_now)
        finally:
            os.close(fd_old)
    vs.assert_none()


# ====================================================================== the mount's own commits
def test_closed_file_keeps_its_size_while_the_mount_commits_it(make_repo, fuse_mount) -> None:
    """A file written through the mount and closed is what the path shows, before, while and
    after the mount commits it: ``touch`` + ``stat`` (the attributes the mount returns for a
    setattr are cached by the kernel) and open + fstat + read, hammered by other threads while
    the writer closes versions of alternating sizes and fsyncs the branch directory (which
    commits at once). (fsx once found "a reopened file showed the previous head's size".)"""
    repo = seeded_repo(make_repo, {"README": b"closed-file test\n"})
    m = fuse_mount(repo.root, "--commit-delay", "60")
    path = m / "main/f.bin"
    seconds = STRESS_SECONDS if DEEP else 3.0
    state = {"seq": 0, "closed": False, "size": 0, "byte": 0, "stop": False}
    bad: list[str] = []
    checks = Counter()

    def expect() -> tuple[int, int, int] | None:
        s0 = state["seq"]
        return (s0, state["size"], state["byte"]) if state["closed"] else None

    def still(s0: int) -> bool:
        return state["closed"] and state["seq"] == s0

    def hammer(k: int) -> None:
        i = 0
        while not state["stop"] and len(bad) < 6:
            i += 1
            e = expect()
            if e is None:
                time.sleep(0.0002)
                continue
            s0, size, byte = e
            try:
                if (i + k) % 3:
                    os.utime(path)
                    got = os.stat(path).st_size
                    if still(s0) and got != size:
                        bad.append(f"close #{s0 // 2}: touch + stat of the closed file: size {got}, it has {size} bytes")
                    checks["touch+stat"] += 1
                else:
                    with open(path, "rb", buffering=0) as f:
                        fs = os.fstat(f.fileno()).st_size
                        data = f.read()
                    ok = fs == size and data == bytes([byte]) * size
                    if still(s0) and not ok:
                        kinds = sorted(set(data))[:4]
                        bad.append(f"close #{s0 // 2}: a new open of the closed file: fstat {fs}, read {len(data)} bytes "
                                   f"(byte values {kinds}); it has {size} bytes of {byte}")
                    checks["open+read"] += 1
            except OSError as ex:
                if still(s0):
                    bad.append(f"close #{s0 // 2}: {ex!r}")

    threads = [threading.Thread(target=hammer, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    dfd = os.open(m / "main", os.O_RDONLY | os.O_DIRECTORY)
    cycles = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(bad) < 6:
            cycles += 1
            size = (50_000 if cycles % 2 else 1_000) + cycles
            byte = 65 + cycles % 26
            state["closed"] = False
            state["seq"] += 1
            with open(path, "wb") as f:
                f.write(bytes([byte]) * size)
            state.update(size=size, byte=byte)
            state["seq"] += 1
            state["closed"] = True
            os.fsync(dfd)  # commits at once
            time.sleep(0.005)
    finally:
        state["stop"] = True
        os.close(dfd)
        for t in threads:
            t.join(timeout=30)
    if bad:
        pytest.fail(f"{len(bad)} wrong answers in {cycles} closes and commits ({dict(checks)} checks):\n- "
                    + "\n- ".join(bad), pytrace=False)
    assert cycles > 20 and checks["touch+stat"] > 100 and checks["open+read"] > 20, (cycles, dict(checks))
    print(f"{cycles} closes and commits, {dict(checks)} checks, no wrong answer")  # (shown with -s)


# ====================================================================== page cache kept
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


class Mapping:
    """A read-only shared mapping of a whole file, and which of its pages are in the page cache
    (``mincore``: for a file mapping it reports the page cache, whether or not this process
    touched the page)."""

    def __init__(self, fd: int, length: int) -> None:
        self.length = length
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.addr = addr

    def resident(self) -> float:
        pages = (self.length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(self.addr, self.length, vec) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return sum(b & 1 for b in vec) / pages

    def close(self) -> None:
        _libc.munmap(self.addr, self.length)


def resident_fraction(path: str) -> float:
    """Open ``path`` anew and tell how much of it the page cache holds (without reading it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        mp = Mapping(fd, os.fstat(fd).st_size)
        try:
            return mp.resident()
        finally:
            mp.close()
    finally:
        os.close(fd)


def test_unchanged_file_keeps_its_page_cache_when_another_file_changes(make_repo, fuse_mount) -> None:
    """Guards the fix against a regression: a distinct inode per version must not cost the
    page cache of files the commit did not change."""
    vs = Versions([4 * MiB + 17, 300 * 1024, 200 * 1024])
    a = vs.data[0]
    repo = seeded_repo(make_repo, {"a.bin": a, "b.bin": vs.data[1]})
    m = fuse_mount(repo.root)
    pa, pb = m / "main/a.bin", m / "main/b.bin"
    fd = os.open(pa, os.O_RDONLY)
    assert read_fd(fd) == a
    os.close(fd)
    before = resident_fraction(pa)
    assert before > 0.9, f"a re-open of a.bin after reading it has only {before:.0%} of it cached (precondition)"
    fd = os.open(pa, os.O_RDONLY)
    held = Mapping(fd, len(a))
    try:
        assert held.resident() > 0.9
        cli_commit(repo.root, "b.bin", vs.data[2], "change b.bin only")
        wait_until(lambda: os.stat(pb).st_size == len(vs.data[2]), 15, "the mount to show the new b.bin")
        with open(pb, "rb") as f:
            assert f.read() == vs.data[2]
        time.sleep(1.0)  # (give any invalidation the mount would do a chance to happen: not a timing check)
        held_after = held.resident()
        after = resident_fraction(pa)
        assert held_after > 0.9 and after > 0.9, (
            f"a.bin did not change, but its page cache went from {before:.0%} to {held_after:.0%} "
            f"(mapping kept open) / {after:.0%} (new open) after a commit that changed only b.bin")
        assert read_fd(fd) == a and os.fstat(fd).st_size == len(a)
    finally:
        held.close()
        os.close(fd)
    with open(pa, "rb") as f:
        assert f.read() == a


# ====================================================================== stress
def _start(args: list[str], out: Path) -> subprocess.Popen:
    with open(out, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "tests.snapshot_tools", *args], stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(), cwd=ROOT)


def test_stress_readers_see_whole_versions(make_repo, fuse_mount, tmp_path: Path) -> None:
    """One process commits version after version of one file (100 KiB..4 MiB, sizes jumping
    up and down) to main through the Python API; six reader processes open, fstat, pread at
    random offsets, mmap (in a child: a SIGBUS is reported, not fatal), keep fds open across
    commits, on main/f.bin (four) and on @commits/<id>/f.bin (two). Every read must be exactly
    one committed version's bytes at that offset, the same version for the life of the fd,
    whose size fstat reports; short reads only at that version's end; @commits paths never
    change; a new open never shows a version superseded more than 15 s before.

    ``make test``: 10 commits (~5 s). ``CORALFS_DEEP=1``: commits for
    ``CORALFS_STRESS_SECONDS`` (600), going round 200 versions."""
    n_versions = 200 if DEEP else STRESS_COMMITS + 1
    sizes = plan_sizes(n_versions, seed=13)
    contents = Contents(sizes)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"sizes": sizes}))
    repo = seeded_repo(make_repo, {"f.bin": contents.full(0)})
    log = tmp_path / "commits.log"
    log.write_text(f"0 0 {repo.branch_head('main').hex()} {time.time():.6f}\n")
    m = fuse_mount(repo.root)
    stop = tmp_path / "stop"
    cap = STRESS_SECONDS + 300 if DEEP else 150  # the readers' own limit, if the test could not stop them
    readers: list[tuple[str, subprocess.Popen, Path]] = []
    for i in range(6):
        mode = "commits" if i >= 4 else "branch"
        name = f"{mode}-reader-{i}"
        out = tmp_path / f"{name}.jsonl"
        p = _start(["reader", "--mount", m.path, "--mode", mode, "--path", "main/f.bin", "--plan", str(plan),
                    "--log", str(log), "--seconds", str(cap), "--stop", str(stop), "--seed", str(1000 + i),
                    "--name", name, "--out", str(out)], tmp_path / f"{name}.stderr")
        readers.append((name, p, out))
    wargs = ["writer", "--repo", repo.root, "--path", "f.bin", "--plan", str(plan), "--log", str(log),
             "--interval", "0.4", "--seed", "7"]
    wargs += ["--commits", "1000000", "--seconds", str(STRESS_SECONDS), "--cycle"] if DEEP else \
        ["--commits", str(n_versions - 1)]
    writer = _start(wargs, tmp_path / "writer.out")
    problems: list[str] = []
    try:
        try:
            rc = writer.wait(timeout=STRESS_SECONDS + 120 if DEEP else 120)
            if rc != 0:
                problems.append(f"the writer failed (exit {rc}): {(tmp_path / 'writer.out').read_text()[-2000:]}")
        except subprocess.TimeoutExpired:
            problems.append("the writer did not finish in time")
        time.sleep(2.0)  # readers go on a little after the last commit
    finally:
        stop.touch()
        for p in [writer] + [p for _, p, _ in readers]:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                problems.append(f"a helper process (pid {p.pid}) did not stop and was killed")
    n_commits = len(log.read_text().splitlines()) - 1
    by_kind: dict[str, list[dict]] = defaultdict(list)  # the failures recorded in detail
    counts: Counter[str] = Counter()  # all failures, by kind
    summaries = []
    for name, p, out in readers:
        if p.returncode != 0:
            problems.append(f"{name} exited {p.returncode}: {(tmp_path / f'{name}.stderr').read_text()[-2000:]}")
        for line in out.read_text().splitlines() if out.exists() else []:
            rec = json.loads(line)
            if "summary" in rec:
                summaries.append(f"{name}: {rec['summary']}")
                for kind, n in rec["failures_by_kind"].items():
                    counts[kind] += n
            else:
                by_kind[rec["kind"]].append(rec)
    if m.proc.poll() is not None:
        problems.append(f"the mount died (exit {m.proc.returncode}): {m.log_text()[-3000:]}")
    report = [f"{n_commits} commits of main/f.bin; reader operations:", *summaries]
    if counts or by_kind:
        report.append(f"{sum(counts.values())} failed checks (details: {tmp_path}/*-reader-*.jsonl):")
        for kind, n in counts.most_common():
            report.append(f"  {n} x {kind}; e.g.")
            report.extend(f"      {json.dumps(r)[:900]}" for r in by_kind[kind][:3])
    if problems or counts or by_kind:
        pytest.fail("\n".join(problems + report), pytrace=False)
    assert n_commits >= (STRESS_COMMITS // 2 if not DEEP else 100), f"only {n_commits} commits were made"
    assert all("open" in s for s in summaries) and len(summaries) == 6
    print("\n".join(report))  # (shown with -s: what a passing run did)
