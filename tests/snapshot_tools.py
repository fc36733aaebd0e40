"""Helpers for the mount's snapshot tests (tests/test_mount_snapshot.py): versioned file
contents in which any mix of two versions is visible, a writer that commits them to a
branch from its own process (Python API, not through the mount), and readers that hammer
the mount with open / fstat / pread / mmap and check every byte.

Run as ``python -m tests.snapshot_tools writer|reader ...`` (the test starts them as
subprocesses; see ``--help``). Everything here uses the mount's public behaviour only
(paths, file descriptors, the repository's Python API for the other process's commits).

Contents. Version ``v`` of size ``size_v`` is ``H[i] ^ key(v)`` at byte ``i`` (``H``: one
fixed pseudo-random stream shared by every version; ``key(v)``: a distinct non-zero byte
per version, so two versions differ at *every* byte and any byte tells which version it
came from), with a 64-byte text header ``CORALSNAP v=... size=...`` at the start. Sizes are
distinct, so the size alone names a version too. A hole (zeros) or a byte of a third
version shows up as a byte that matches no key at its position.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HEADER = 64
MAX_KEYS = 255
_H_SEED = 0xC0A1F5


# ---------------------------------------------------------------------------- contents
class Contents:
    """Version ``v`` of the test file: ``size(v)`` bytes, ``expected(v, off, n)`` at any offset."""

    def __init__(self, sizes: list[int]) -> None:
        if len(sizes) > MAX_KEYS:
            raise ValueError(f"at most {MAX_KEYS} distinct versions")
        if len(set(sizes)) != len(sizes):
            raise ValueError("sizes must be distinct (the size names the version)")
        self.sizes = list(sizes)
        self.max_size = max(sizes)
        self.h = np.frombuffer(np.random.default_rng(_H_SEED).bytes(self.max_size + 8), dtype=np.uint8)
        self.by_size = {s: v for v, s in enumerate(sizes)}
        self.by_key = {self.key(v): v for v in range(len(sizes))}

    def __len__(self) -> int:
        return len(self.sizes)

    @staticmethod
    def key(v: int) -> int:
        return (v * 97) % MAX_KEYS + 1  # 97 is prime to 255: distinct for v < 255, never 0

    def header(self, v: int) -> bytes:
        return f"CORALSNAP v={v:06d} size={self.sizes[v]:010d}\n".encode().ljust(HEADER, b"#")

    def size(self, v: int) -> int:
        return self.sizes[v]

    def expected(self, v: int, off: int, n: int) -> bytes:
        """Bytes ``[off, off+n)`` of version ``v`` (cut at its end)."""
        end = min(off + n, self.sizes[v])
        if off >= end:
            return b""
        out = self.h[off:end] ^ np.uint8(self.key(v))
        if off < HEADER:
            hd = np.frombuffer(self.header(v), dtype=np.uint8)
            k = min(end, HEADER) - off
            out[:k] = hd[off:off + k]
        return out.tobytes()

    def full(self, v: int) -> bytes:
        return self.expected(v, 0, self.sizes[v])

    def matching(self, data: bytes, off: int, candidates: set[int] | None = None) -> set[int]:
        """Versions whose bytes at ``off`` are exactly ``data`` (length not checked)."""
        cands = set(range(len(self))) if candidates is None else set(candidates)
        if not data:
            return cands
        n = len(data)
        if off + n > HEADER:  # one byte past the header names the only possible version
            q = max(off, HEADER)
            if q >= self.max_size:
                return set()
            v = self.by_key.get(data[q - off] ^ int(self.h[q]))
            cands &= {v} if v is not None else set()
        return {v for v in cands if off + n <= self.sizes[v] and self.expected(v, off, n) == data}

    def describe(self, data: bytes, off: int, limit: int = 8) -> str:
        """What ``data`` read at ``off`` looks like: runs of bytes by the version they belong to
        (``?`` = no version: zeros of a hole, garbage)."""
        if not data:
            return "(no bytes)"
        arr = np.frombuffer(data, dtype=np.uint8)
        parts: list[str] = []
        if off < HEADER:
            k = min(len(data), HEADER - off)
            parts.append(f"header {data[:k]!r}")
            arr, off2 = arr[k:], off + k
        else:
            off2 = off
        past = 0
        if off2 + len(arr) > self.max_size:  # bytes past the largest version's end
            past = off2 + len(arr) - max(off2, self.max_size)
            arr = arr[:len(arr) - past]
        if len(arr):
            keys = arr ^ self.h[off2:off2 + len(arr)]
            change = np.flatnonzero(np.diff(keys.astype(np.int16))) + 1
            starts = np.concatenate(([0], change))
            ends = np.concatenate((change, [len(arr)]))
            runs = []
            for s, e in zip(starts, ends, strict=True):
                v = self.by_key.get(int(keys[s])) if e - s >= 8 or len(arr) < 8 else None  # (chance matches)
                if runs and runs[-1][2] is None and v is None:  # merge garbage
                    runs[-1][1] = int(e)
                else:
                    runs.append([int(s), int(e), v])
            for s, e, v in runs[:limit]:
                name = f"v{v}" if v is not None else "?"
                zero = " (zeros)" if v is None and not arr[s:e].any() else ""
                parts.append(f"[{off2 + s},{off2 + e}) {name}{zero}")
            if len(runs) > limit:
                parts.append(f"... {len(runs) - limit} more runs")
        if past:
            parts.append(f"{past} bytes past the end of the largest version")
        return "; ".join(parts)


def plan_sizes(n: int, seed: int, lo: int = 100 << 10, hi: int = 4 << 20) -> list[int]:
    """``n`` distinct sizes in ``[lo, hi]`` that alternate between the upper and lower half of
    the range (each commit changes the size a lot), never page aligned."""
    rng = random.Random(seed)
    mid = (lo + hi) // 2
    out: list[int] = []
    while len(out) < n:
        s = rng.randrange(mid, hi) if len(out) % 2 == 0 else rng.randrange(lo, mid)
        if s % 4096 == 0:
            s += rng.randrange(1, 4096)
        if s not in out:
            out.append(s)
    return out


def plan_from_args(a: argparse.Namespace) -> Contents:
    return Contents(json.loads(Path(a.plan).read_text())["sizes"])


# ---------------------------------------------------------------------------- fd helpers
_MMAP_CHILD = ("import mmap, os, sys\n"
               "fd, n = int(sys.argv[1]), int(sys.argv[2])\n"
               "mm = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ)\n"
               "sys.stdout.buffer.write(mm[:]); sys.stdout.flush()\n")


def read_fd(fd: int, block: int = 1 << 20, limit: int = 1 << 30) -> bytes:
    """Everything ``pread`` returns from offset 0 to the first empty read."""
    parts, off = [], 0
    while off < limit:
        b = os.pread(fd, block, off)
        if not b:
            break
        parts.append(b)
        off += len(b)
    return b"".join(parts)


def mmap_read(fd: int, length: int, timeout: float = 60.0) -> tuple[bytes, str | None]:
    """The first ``length`` bytes of ``fd`` read through a shared mapping made by a child
    process (which inherits the fd: the same open file), so that a SIGBUS kills the child and
    is reported here: ``(bytes, None)`` or ``(bytes read before it failed, what failed)``."""
    import subprocess

    if length == 0:
        return b"", None
    res = subprocess.run([sys.executable, "-c", _MMAP_CHILD, str(fd), str(length)], pass_fds=(fd,),
                         capture_output=True, timeout=timeout)
    if res.returncode < 0:
        return res.stdout, f"killed by {signal.Signals(-res.returncode).name}"
    if res.returncode != 0:
        return res.stdout, "failed: " + res.stderr.decode(errors="replace").strip().splitlines()[-1]
    return res.stdout, None


# ---------------------------------------------------------------------------- writer
def run_writer(a: argparse.Namespace) -> int:
    """Commit versions ``1, 2, ...`` (cyclically through the plan) of ``--path`` on ``--branch``
    through the Python API, one commit each, ``--interval`` apart (randomised); appends
    ``seq version commit-id time`` to ``--log`` after each commit returns."""
    from coralfs.repository import Repository

    contents = plan_from_args(a)
    rng = random.Random(a.seed)
    repo = Repository(a.repo)
    tmp = Path(a.repo, ".coralfs", f"snapshot-writer-{os.getpid()}.bin")
    deadline = time.monotonic() + a.seconds if a.seconds else None
    try:
        with open(a.log, "a", encoding="utf-8") as log:
            for seq in range(1, a.commits + 1):
                if deadline is not None and time.monotonic() > deadline:
                    break
                v = seq % len(contents) if a.cycle else seq
                if v >= len(contents):
                    break
                tmp.write_bytes(contents.full(v))
                prev = repo.ls(a.branch).get(a.path)
                entry, _ = repo.ingest_file(tmp, a.path, prev)
                cid = repo.commit_changes(a.branch, {a.path: entry}, f"snapshot writer: v{v} ({contents.size(v)} bytes)")
                log.write(f"{seq} {v} {cid.hex()} {time.time():.6f}\n")
                log.flush()
                time.sleep(rng.uniform(a.interval * 0.2, a.interval * 1.8))
    finally:
        tmp.unlink(missing_ok=True)
        repo.close()
    return 0


# ---------------------------------------------------------------------------- readers
@dataclass
class Handle:
    fd: int
    path: str
    size: int
    cands: set[int]
    opened: float
    hold: float  # seconds to keep it open (across commits)
    commit: str | None = None  # @commits reader: the commit id
    reads: int = 0


@dataclass
class Reader:
    a: argparse.Namespace
    contents: Contents
    rng: random.Random
    out: object
    failures: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # failures by kind
    ops: dict[str, int] = field(default_factory=dict)
    commits: list[tuple[int, int, str, float]] = field(default_factory=list)  # seq, v, cid, time
    _log_pos: int = 0
    fresh_pending: list[tuple[float, float, int, str, int]] = field(default_factory=list)
    t0: float = field(default_factory=time.time)

    # ------------------------------------------------------------ bookkeeping
    def fail(self, kind: str, h: Handle | None, **detail: object) -> None:
        """Record a failed check: in detail (one JSON line) for the first ``--max-failures`` of
        each kind, then only counted (in the summary)."""
        self.failures += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if self.kinds[kind] > self.a.max_failures:
            return
        rec = {"reader": self.a.name, "kind": kind, "t": round(time.time() - self.t0, 3)}
        if h is not None:
            rec.update(path=h.path, fstat_at_open=h.size, fd_versions=sorted(h.cands), fd_reads=h.reads,
                       fd_age=round(time.time() - h.opened, 3))
            if h.commit:
                rec["commit"] = h.commit
        rec.update(detail)
        self.out.write(json.dumps(rec, default=str) + "\n")  # type: ignore[attr-defined]
        self.out.flush()  # type: ignore[attr-defined]

    def count(self, op: str) -> None:
        self.ops[op] = self.ops.get(op, 0) + 1

    def refresh_commits(self) -> None:
        try:
            with open(self.a.log, encoding="utf-8") as f:
                f.seek(self._log_pos)
                chunk = f.read()
        except FileNotFoundError:
            return
        cut = chunk.rfind("\n") + 1
        self._log_pos += len(chunk[:cut].encode())
        for line in chunk[:cut].splitlines():
            seq, v, cid, t = line.split()
            self.commits.append((int(seq), int(v), cid, float(t)))

    # ------------------------------------------------------------ checks
    def check_read(self, h: Handle, off: int, want: int, data: bytes, how: str) -> bool:
        h.reads += 1
        exp_len = max(0, min(want, h.size - off))
        if len(data) != exp_len:
            self.fail("wrong read length", h, how=how, offset=off, asked=want, got=len(data), expected=exp_len,
                      looks_like=self.contents.describe(data[:1 << 16], off))
            return False
        got = self.contents.matching(data, off, h.cands)
        if not got:
            any_v = self.contents.matching(data, off)
            self.fail("bytes of another version" if any_v else "bytes of no version", h, how=how, offset=off,
                      length=len(data), versions_with_these_bytes=sorted(any_v)[:8],
                      looks_like=self.contents.describe(data, off))
            return False
        h.cands = got
        return True

    def check_fstat(self, h: Handle, how: str) -> bool:
        s = os.fstat(h.fd).st_size
        if s != h.size:
            self.fail("fstat size changed on an open fd", h, how=how, fstat_now=s,
                      version_of_that_size=self.contents.by_size.get(s))
            return False
        return True

    # ------------------------------------------------------------ operations
    def open_one(self) -> Handle | None:
        commit = None
        expect: int | None = None
        if self.a.mode == "commits":
            self.refresh_commits()
            if not self.commits:
                return None
            _, expect, commit, _ = self.rng.choice(self.commits)
            path = os.path.join(self.a.mount, "@commits", commit, self.a.file_in_commit)
        else:
            path = os.path.join(self.a.mount, self.a.path)
        t_open = time.time()
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            self.fail("open failed", None, path=path, error=repr(e))
            return None
        size = os.fstat(fd).st_size
        v = self.contents.by_size.get(size)
        hold = self.rng.choice([0.0, 0.0, self.rng.uniform(0.2, 1.0), self.rng.uniform(1.0, self.a.max_hold)])
        h = Handle(fd, path, size, {v} if v is not None else set(), time.time(), hold, commit)
        self.count("open")
        if v is None:
            self.fail("fstat size of no version", h, fstat=size)
            os.close(fd)
            return None
        if expect is not None and v != expect:
            self.fail("@commits path shows another version", h, expected=expect, fstat=size)
            os.close(fd)
            return None
        if expect is None and self.a.stale_after > 0:
            self.check_fresh(h, v, t_open)
        return h

    def check_fresh(self, h: Handle, v: int, t_open: float) -> None:
        """A new open must not show a version superseded more than ``--stale-after`` seconds
        before it. Judged a few seconds later (the writer logs a commit after it returns, so a
        fresh version may be visible before it is in the log)."""
        self.fresh_pending.append((time.time() + 3.0, t_open, v, h.path, h.size))

    def judge_fresh(self, final: bool = False) -> None:
        if not self.fresh_pending:
            return
        now = time.time()
        due = [x for x in self.fresh_pending if final or x[0] <= now]
        if not due:
            return
        self.fresh_pending = [x for x in self.fresh_pending if not (final or x[0] <= now)]
        self.refresh_commits()
        for _, t_open, v, path, size in due:
            before = [c for c in self.commits if c[3] <= t_open - self.a.stale_after]
            if not before:
                continue
            cur = before[-1]
            if v == cur[1] or any(c[1] == v for c in self.commits if c[0] > cur[0]):
                continue
            self.fail("a new open shows a stale version", None, path=path, fstat=size, seen=f"v{v}",
                      head_since=f"v{cur[1]} (commit {cur[2][:12]}, {t_open - cur[3]:.1f} s before the open)")

    def op_pread(self, h: Handle) -> bool:
        self.count("pread")
        r = self.rng.random()
        if r < 0.15:  # around the EOF of this version and of the others
            other = self.rng.choice(self.contents.sizes)
            off = max(0, self.rng.choice([h.size, other]) + self.rng.randrange(-5000, 5000))
        elif r < 0.25:
            off = self.rng.randrange(0, h.size + 1) // 4096 * 4096
        else:
            off = self.rng.randrange(0, h.size + 1)
        want = self.rng.choice([1, 7, 4096, 65536, 1 << 20, self.rng.randrange(1, 300_000)])
        data = os.pread(h.fd, want, off)
        return self.check_read(h, off, want, data, "pread")

    def op_read_all(self, h: Handle) -> bool:
        self.count("read_all")
        off, parts = 0, []
        while True:
            b = os.pread(h.fd, 1 << 20, off)
            if not b:
                break
            parts.append(b)
            off += len(b)
            if off > self.contents.max_size + (4 << 20):
                break
        data = b"".join(parts)
        if len(data) != h.size:
            self.fail("whole read has another length than fstat", h, got=len(data),
                      looks_like=self.contents.describe(data, 0))
            return False
        return self.check_read(h, 0, h.size + 1, data, "read whole file")

    def op_mmap(self, h: Handle) -> bool:
        """mmap the fd in a forked child (a SIGBUS kills the child, not the reader) and read
        random ranges (sometimes all of it) through the mapping."""
        self.count("mmap")
        if h.size == 0:
            return True
        ranges = [(0, h.size)] if self.rng.random() < 0.3 else []
        for _ in range(self.rng.randrange(1, 5)):
            off = self.rng.randrange(0, h.size)
            ranges.append((off, min(h.size - off, self.rng.choice([1, 4096, 100_000, 1 << 20]))))
        if self.rng.random() < 0.3:  # the last byte (the last page is partly past EOF)
            ranges.append((h.size - 1, 1))
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: only os calls, then _exit
            code = 0
            try:
                os.close(rfd)
                try:
                    mm = mmap.mmap(h.fd, h.size, mmap.MAP_SHARED, mmap.PROT_READ)
                except (OSError, ValueError) as e:  # ValueError: fstat now says the file is shorter
                    os.write(wfd, json.dumps({"error": repr(e)}).encode())
                    os._exit(0)
                with os.fdopen(wfd, "wb") as w:
                    w.write(json.dumps({"ok": len(ranges)}).encode() + b"\n")
                    for off, n in ranges:
                        w.write(mm[off:off + n])
                    w.flush()
                mm.close()
            except BaseException:
                code = 3
            os._exit(code)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            head = r.readline()
            body = r.read()
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            got = len(body)
            self.fail(f"mmap reader killed by {signal.Signals(sig).name}", h, ranges=ranges[:6], bytes_before_signal=got)
            return False
        try:
            msg = json.loads(head) if head else {"error": "no answer"}
        except ValueError:
            msg = {"error": f"bad answer {head[:100]!r}"}
        if "error" in msg:
            self.fail("mmap failed", h, error=msg["error"])
            return False
        pos = 0
        for off, n in ranges:
            if not self.check_read(h, off, n, body[pos:pos + n], "mmap"):
                return False
            pos += n
        return True

    def close(self, h: Handle) -> None:
        os.close(h.fd)
        self.count("close")

    def run(self) -> None:
        end = time.monotonic() + self.a.seconds
        stop = Path(self.a.stop)
        held: list[Handle] = []
        while time.monotonic() < end and not stop.exists():
            self.judge_fresh()
            if not held or (len(held) < self.a.max_fds and self.rng.random() < 0.25):
                h = self.open_one()
                if h is None:
                    time.sleep(0.02)
                    continue
                held.append(h)
                first = self.rng.random()
                ok = self.op_read_all(h) if first < 0.3 else self.op_pread(h) if first < 0.8 else self.op_mmap(h)
                if not ok:
                    held.remove(h)
                    self.close(h)
                continue
            h = self.rng.choice(held)
            r = self.rng.random()
            if r < 0.5:
                ok = self.op_pread(h)
            elif r < 0.65:
                ok = self.op_read_all(h)
            elif r < 0.8 and self.a.mmap:
                ok = self.op_mmap(h)
            else:
                self.count("fstat")
                ok = self.check_fstat(h, "fstat")
            ok = ok and self.check_fstat(h, "fstat after the op")
            if not ok or (time.time() - h.opened > h.hold and self.rng.random() < 0.5):
                held.remove(h)
                self.close(h)
        for h in held:
            self.check_fstat(h, "fstat at the end")
            self.close(h)
        self.judge_fresh(final=True)


def run_reader(a: argparse.Namespace) -> int:
    contents = plan_from_args(a)
    with open(a.out, "a", encoding="utf-8") as out:
        r = Reader(a, contents, random.Random(a.seed), out)
        try:
            r.run()
        except Exception as e:  # an unexpected error (EIO, ENOTCONN...) is a failure too
            r.fail("reader error", None, error=repr(e))
        out.write(json.dumps({"reader": a.name, "summary": r.ops, "failures": r.failures,
                              "failures_by_kind": r.kinds}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.snapshot_tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("writer", help="commit versions of one file to a branch (Python API)")
    w.add_argument("--repo", required=True)
    w.add_argument("--branch", default="main")
    w.add_argument("--path", required=True, help="path in the branch")
    w.add_argument("--plan", required=True, help='JSON file {"sizes": [...]}')
    w.add_argument("--commits", type=int, default=40)
    w.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: no limit)")
    w.add_argument("--cycle", action="store_true", help="go round the plan's versions (v0 again after the last)")
    w.add_argument("--interval", type=float, default=0.5, help="mean seconds between commits")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--log", required=True, help="appends 'seq version commit time' per commit")
    r = sub.add_parser("reader", help="open/fstat/pread/mmap loop with checks")
    r.add_argument("--mount", required=True)
    r.add_argument("--mode", choices=["branch", "commits"], default="branch")
    r.add_argument("--path", default="main/f.bin", help="branch mode: the path under the mount")
    r.add_argument("--file-in-commit", default="f.bin", help="commits mode: the path inside @commits/<id>/")
    r.add_argument("--plan", required=True)
    r.add_argument("--log", required=True, help="the writer's log (commits mode: which commit has which version)")
    r.add_argument("--seconds", type=float, default=60.0)
    r.add_argument("--stop", required=True, help="stop when this file exists")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--name", default="reader")
    r.add_argument("--out", required=True, help="appends one JSON line per failure, then a summary")
    r.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--max-fds", type=int, default=3)
    r.add_argument("--max-hold", type=float, default=4.0, help="the longest an fd is kept open (seconds)")
    r.add_argument("--max-failures", type=int, default=10,
                   help="failures of one kind recorded in detail (the rest: counted)")
    r.add_argument("--stale-after", type=float, default=15.0,
                   help="a new open may show a version superseded at most this long ago (0: no check)")
    a = p.parse_args(argv)
    return run_writer(a) if a.cmd == "writer" else run_reader(a)


if __name__ == "__main__":
    sys.exit(main())
