"""fsx for coralfs: random operations on ONE file of a branch through the mount, every
result checked against an in-memory model of the file.

    python -m tests.fsx_coral --mount MP --file main/fsx.bin --ops N --seed S [--mmap] [--mmap-write]
                              [--repo REPO] [--log OPLOG] [--replay OPLOG]

The idea is xfstests' fsx (random operations, a model, a seed, an op log to replay); the code
is our own and knows what coralfs promises:

* read (``pread`` at random offsets, also past EOF), write (``pwrite`` at random offsets,
  also past EOF: a hole, zeros in the model), truncate (grow and shrink), mmap read, mmap
  write (``--mmap-write``; msync or not), fsync, ``stat`` of the path, close-and-reopen
  (sometimes ``O_TRUNC``; half of them closed for up to ``--pause`` s, touching and stat-ing
  the path meanwhile, so that the mount's commit of the closed file lands around the reopen).
  ``--weights`` changes the mix; ``--churn`` has another process commit another file of the
  branch meanwhile (the branch moves under the open file).
  After every operation ``fstat``'s size must be the model's; every read must be the model's
  bytes; a reopen reads the whole file back.
* A close or fsync that returns acknowledges the content: the mount must commit it. With
  ``--repo``, some reopens first wait (``--commit-timeout``) until the branch head in the
  repository (read with the Python API from this process, not through the mount) holds the
  model as of the last close, and every version seen in the repository meanwhile must be
  one this run acknowledged (a close or fsync returned with that content). The mount is
  meant to run with a short ``--commit-delay`` (0.1 s), so commits land between operations.
* Written bytes name the operation that wrote them: byte at file offset ``p`` written by
  operation ``n`` is ``(p ^ p >> 8 ^ n * 0x9D) & 0xFF``, so a stale byte tells which write
  it came from (``n mod 256``).

The op log (``--log``, default ``fsx-SEED.log``) is JSON lines, each written before its
operation runs (a SIGBUS that kills the process still leaves the operation that caused
it in the log); ``--replay LOG`` runs the operations of a log again, in order. On a
mismatch: the seed, the failing operation and the log's tail, exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import hashlib
import itertools
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np

OPS = ("read", "write", "truncate", "mapread", "mapwrite", "fsync", "stat", "reopen")


class Mismatch(Exception):
    pass


def pattern(n: int, off: int, length: int) -> bytes:
    p = np.arange(off, off + length, dtype=np.int64)
    return ((p ^ (p >> 8) ^ (n * 0x9D)) & 0xFF).astype(np.uint8).tobytes()


_INV = pow(0x9D, -1, 256)


def writer_of(byte: int, off: int) -> int:
    """Which operation (mod 256) wrote ``byte`` at ``off`` (see ``pattern``)."""
    return (((byte ^ off ^ (off >> 8)) & 0xFF) * _INV) & 0xFF


def sha(b: bytes | bytearray) -> str:
    return hashlib.sha256(b).hexdigest()


class Generator:
    """Random operations from a seed, shaped by the model (sizes, whether mmap applies)."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.rng = random.Random(a.seed)
        w = {"read": 20, "write": 25, "truncate": 7, "mapread": 12, "mapwrite": 8, "fsync": 5, "stat": 3, "reopen": 8}
        for item in filter(None, (a.weights or "").split(",")):
            k, _, v = item.partition("=")
            if k not in w:
                raise SystemExit(f"--weights: unknown operation {k!r} (one of {', '.join(OPS)})")
            w[k] = int(v)
        if not a.mmap:
            w["mapread"] = 0
        if not a.mmap_write:
            w["mapwrite"] = 0
        self.ops = [o for o in OPS if w[o]]
        self.weights = [w[o] for o in self.ops]

    def offset_len(self, size: int, maxlen: int) -> tuple[int, int]:
        r = self.rng
        length = r.choice([1, r.randrange(1, 512), r.randrange(1, 8192), r.randrange(1, self.a.oplen + 1),
                           4096, 65536 if self.a.oplen >= 65536 else self.a.oplen])
        if r.random() < 0.1 and size:  # near the end of the file
            off = max(0, size - r.randrange(0, min(size, 8192) + 1))
        elif r.random() < 0.1:
            off = r.randrange(0, maxlen + 1) // 4096 * 4096
        else:
            off = r.randrange(0, maxlen + 1)
        return off, length

    def next(self, n: int, size: int) -> dict:
        r = self.rng
        op = r.choices(self.ops, self.weights)[0]
        if op in ("mapread", "mapwrite") and size == 0:
            op = "write"
        if op == "read":
            off, length = self.offset_len(size, max(size + 10000, 1))
            return {"n": n, "op": "read", "off": off, "len": length}
        if op == "write":
            off, length = self.offset_len(size, self.a.maxlen)
            if r.random() < 0.3:  # append, or past EOF (a hole)
                off = size + r.choice([0, 0, r.randrange(1, 70000)])
            off = min(off, self.a.maxlen - 1)
            length = max(1, min(length, self.a.maxlen - off))
            return {"n": n, "op": "write", "off": off, "len": length}
        if op == "truncate":
            new = r.choice([0, r.randrange(0, size + 1), r.randrange(0, self.a.maxlen + 1),
                            min(self.a.maxlen, size + r.randrange(1, 9000))])
            return {"n": n, "op": "truncate", "size": new}
        if op in ("mapread", "mapwrite"):
            off = r.randrange(0, size)
            length = min(size - off, r.choice([1, r.randrange(1, 9000), r.randrange(1, self.a.oplen + 1)]))
            d = {"n": n, "op": op, "off": off, "len": length}
            if op == "mapwrite":
                d["msync"] = r.random() < 0.5
            return d
        if op in ("fsync", "stat"):
            return {"n": n, "op": op}
        commit = self.a.repo is not None and r.random() < self.a.commit_check
        # closed for a moment: around the commit delay, the mount commits while the file is reopened
        pause = 0.0 if commit or r.random() >= self.a.pause_share else round(r.uniform(0, self.a.pause), 3)
        return {"n": n, "op": "reopen", "trunc": r.random() < 0.1, "commit": commit, "pause": pause}


class Fsx:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.path = os.path.join(a.mount, a.file)
        branch, _, rel = a.file.partition("/")
        self.branch = a.branch or branch
        self.rel = a.file[len(self.branch) + 1:] if a.branch else rel
        self.model = bytearray()
        self.fd = -1
        self.acked = bytes(self.model)  # the content as of the last successful close/fsync
        self.acked_all: set[str] = set()  # every acknowledged content since the last verified commit
        self.verified: str | None = None  # the content hash last seen committed
        self.tail: list[str] = []
        self.counts: Counter[str] = Counter()
        self.commit_checks = 0
        self.repo = None
        if a.repo:
            from coralfs.repository import Repository

            self.repo = Repository(a.repo)

    # ------------------------------------------------------------ model checks
    def fail(self, op: dict, msg: str) -> None:
        raise Mismatch(f"op {op.get('n')} {op.get('op')}: {msg}")

    def compare(self, op: dict, got: bytes, off: int, what: str) -> None:
        exp = bytes(self.model[off:off + len(got)]) if off < len(self.model) else b""
        want_len = max(0, min(op.get("len", len(got)), len(self.model) - off))
        if what == "whole file":
            want_len = len(self.model)
        if len(got) != want_len:
            self.fail(op, f"{what}: {len(got)} bytes at offset {off}, the model has {want_len} "
                          f"(model size {len(self.model)}, fstat {self.fstat_size()})")
        if got != exp:
            i = next(i for i in range(len(got)) if got[i] != exp[i])
            p = off + i
            bad = sum(1 for x, y in zip(got, exp, strict=True) if x != y)
            self.fail(op, f"{what}: {bad} wrong bytes in [{off}, {off + len(got)}), the first at offset {p}: "
                          f"got {got[i:i + 8].hex()} (written by op ~{writer_of(got[i], p)} mod 256"
                          f"{', or zeros' if got[i] == 0 else ''}), expected {exp[i:i + 8].hex()} "
                          f"(op ~{writer_of(exp[i], p)} mod 256{', or zeros' if exp[i] == 0 else ''}); "
                          f"model size {len(self.model)}")

    def fstat_size(self) -> int:
        return os.fstat(self.fd).st_size if self.fd >= 0 else -1

    def check_size(self, op: dict) -> None:
        s = self.fstat_size()
        if s != len(self.model):
            self.fail(op, f"fstat size {s}, the model has {len(self.model)}")

    def ack(self) -> None:
        self.acked = bytes(self.model)
        self.acked_all.add(sha(self.acked))

    # ------------------------------------------------------------ operations
    def open(self, op: dict, trunc: bool = False) -> None:
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if trunc else 0)
        self.fd = os.open(self.path, flags, 0o644)
        if trunc:
            del self.model[:]
        self.check_size(op)
        got = bytearray()
        while True:
            b = os.pread(self.fd, 1 << 20, len(got))
            if not b:
                break
            got += b
        self.compare(op, bytes(got), 0, "whole file")

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        os.close(fd)
        self.ack()

    def do(self, op: dict) -> None:
        kind = op["op"]
        self.counts[kind] += 1
        if kind == "read":
            got = os.pread(self.fd, op["len"], op["off"])
            self.compare(op, got, op["off"], "pread")
        elif kind == "write":
            data = pattern(op["n"], op["off"], op["len"])
            w = os.pwrite(self.fd, data, op["off"])
            if w != len(data):
                self.fail(op, f"short write: {w} of {len(data)}")
            end = op["off"] + len(data)
            if end > len(self.model):
                self.model.extend(bytes(end - len(self.model)))
            self.model[op["off"]:end] = data
        elif kind == "truncate":
            os.ftruncate(self.fd, op["size"])
            if op["size"] < len(self.model):
                del self.model[op["size"]:]
            else:
                self.model.extend(bytes(op["size"] - len(self.model)))
        elif kind in ("mapread", "mapwrite"):
            size = len(self.model)
            if size == 0:
                return
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if kind == "mapwrite" else 0)
            try:
                mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, prot)
            except ValueError as e:  # Python checks the length against fstat
                self.fail(op, f"mmap of {size} bytes: {e} (fstat {self.fstat_size()})")
            try:
                off, n = op["off"], op["len"]
                if kind == "mapread":
                    self.compare(op, mm[off:off + n], off, "mmap read")
                else:
                    data = pattern(op["n"], off, n)
                    mm[off:off + n] = data
                    self.model[off:off + n] = data
                    if op.get("msync"):
                        mm.flush()
            finally:
                mm.close()
        elif kind == "stat":
            self.stat_path(op)
        elif kind == "fsync":
            os.fsync(self.fd)
            self.ack()
        elif kind == "reopen":
            self.close()
            if op.get("commit") and self.repo is not None:
                self.wait_commit(op)
            self.closed_pause(op, op.get("pause", 0))
            self.open(op, trunc=op.get("trunc", False))
        else:
            self.fail(op, "unknown operation")
        self.check_size(op)

    def closed_pause(self, op: dict, seconds: float) -> None:
        """While the file is closed (the mount commits it meanwhile), ``stat`` of its path must
        show the size of what the last close stored; so must the attributes the mount returns
        for a ``touch`` (``utime``: the kernel caches them)."""
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            touch = i % 2 == 0
            if touch:
                os.utime(self.path)
            size = os.stat(self.path).st_size
            if size != len(self.model):
                self.fail(op, f"stat of the closed file during the pause{' (after a touch)' if touch else ''}: "
                              f"size {size}, the last close stored {len(self.model)} bytes")
            i += 1
            time.sleep(0.0005)

    def stat_path(self, op: dict) -> None:
        size = os.stat(self.path).st_size
        if size != len(self.model):
            self.fail(op, f"stat of the path: size {size}, the model (open fd) has {len(self.model)}")

    # ------------------------------------------------------------ the repository
    def committed(self) -> tuple[bytes | None, str | None]:
        head = self.repo.branch_head(self.branch)
        if head is None or self.rel not in self.repo.ls(head):
            return head, None
        h = hashlib.sha256()
        with self.repo.open(head, self.rel) as f:
            while b := f.read(1 << 20):
                h.update(b)
        return head, h.hexdigest()

    def wait_commit(self, op: dict) -> None:
        """The branch head must come to hold the content as of the last close, and hold
        nothing but acknowledged versions meanwhile."""
        self.commit_checks += 1
        want = sha(self.acked)
        ok = self.acked_all | ({self.verified} if self.verified else set())
        deadline = time.monotonic() + self.a.commit_timeout
        while True:
            head, got = self.committed()
            if got is not None and got not in ok:
                self.fail(op, f"commit {head.hex()[:12]} has a version of {self.rel} that no close or fsync "
                              f"acknowledged (sha {got[:12]})")
            if got == want:
                break
            if time.monotonic() > deadline:
                self.fail(op, f"after {self.a.commit_timeout} s the branch head ({head.hex()[:12] if head else None}) "
                              f"still does not hold the content of the last close ({len(self.acked)} bytes, "
                              f"sha {want[:12]}; it has {got[:12] if got else None})")
            time.sleep(0.02)
        self.verified = want
        self.acked_all = {want}

    # ------------------------------------------------------------ driver
    def run(self, ops: Iterator[dict], log) -> None:
        first = {"n": 0, "op": "open", "trunc": True}
        log.write(json.dumps(first) + "\n")
        log.flush()
        self.tail.append(json.dumps(first))
        self.open(first, trunc=True)
        for op in ops:
            line = json.dumps(op)
            log.write(line + "\n")
            log.flush()
            self.tail = (self.tail + [line])[-self.a.tail:]
            try:
                self.do(op)
            except OSError as e:
                self.fail(op, f"{e!r} (model size {len(self.model)})")
        end = {"n": -1, "op": "close", "commit": self.repo is not None}
        log.write(json.dumps(end) + "\n")
        log.flush()
        self.close()
        if self.repo is not None:
            self.wait_commit(end)


def churn(repo_root: str, branch: str, path: str, interval: float, seed: int, max_size: int) -> int:
    """``--churn``'s child process: commit another file of the branch every ``interval`` s
    (Python API), so that the branch moves under the file fsx has open."""
    from coralfs.repository import Repository

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # (the finally below runs)
    repo = Repository(repo_root)
    rng = random.Random(seed)
    tmp = os.path.join(repo_root, ".coralfs", f"fsx-churn-{os.getpid()}.bin")
    try:
        for i in itertools.count():
            with open(tmp, "wb") as f:
                f.write(pattern(i, 0, rng.randrange(1, max_size + 1)))
            entry, _ = repo.ingest_file(tmp, path)
            repo.commit_changes(branch, {path: entry}, f"fsx churn {i}")
            time.sleep(rng.uniform(interval * 0.2, interval * 1.8))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        repo.close()
    return 0


def generated(a: argparse.Namespace, fsx: Fsx) -> Iterator[dict]:
    g = Generator(a)
    for n in range(1, a.ops + 1):
        yield g.next(n, len(fsx.model))


def replayed(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            op = json.loads(line)
            if "fsx" in op or op["op"] in ("open", "close"):
                continue
            yield op


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fsx_coral", description=__doc__.split("\n\n")[0])
    p.add_argument("--mount", required=True, help="the coralfs mount point")
    p.add_argument("--file", default="main/fsx.bin", help="BRANCH/PATH under the mount (created, truncated)")
    p.add_argument("--branch", default=None, help="the branch, when its name has a '/' (default: --file's first part)")
    p.add_argument("--ops", type=int, default=1000)
    p.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    p.add_argument("--mmap", action="store_true", help="mmap reads")
    p.add_argument("--mmap-write", action="store_true", help="mmap writes too (implies --mmap)")
    p.add_argument("--maxlen", type=int, default=256 << 10, help="the file's largest size")
    p.add_argument("--oplen", type=int, default=64 << 10, help="the largest read/write")
    p.add_argument("--repo", default=None, help="the mounted repository: check what the mount commits")
    p.add_argument("--commit-check", type=float, default=0.3,
                   help="the share of reopens that wait for the commit first (with --repo)")
    p.add_argument("--commit-timeout", type=float, default=30.0)
    p.add_argument("--pause", type=float, default=0.3,
                   help="the longest a reopen waits between close and open (stat-ing the path meanwhile)")
    p.add_argument("--pause-share", type=float, default=0.5, help="the share of reopens that pause")
    p.add_argument("--weights", default=None, metavar="OP=W,...",
                   help=f"relative frequencies of the operations ({', '.join(OPS)}); default "
                        "read=20,write=25,truncate=7,mapread=12,mapwrite=8,fsync=5,stat=3,reopen=8")
    p.add_argument("--log", default=None, help="the op log to write (default fsx-SEED.log)")
    p.add_argument("--replay", default=None, help="run the operations of this op log instead")
    p.add_argument("--tail", type=int, default=25, help="operations shown on a failure")
    p.add_argument("--churn", type=float, default=0.0, metavar="SECONDS",
                   help="with --repo: another process commits another file of the branch (CHURN_PATH) "
                        "every SECONDS on average (0: none)")
    p.add_argument("--churn-path", default="fsx-churn.bin", help=argparse.SUPPRESS)
    p.add_argument("--churn-size", type=int, default=300_000, help="the churned file's largest size")
    p.add_argument("--churn-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.churn_child:
        return churn(a.repo, a.branch or a.file.partition("/")[0], a.churn_path, a.churn, a.seed or 0, a.churn_size)
    a.mmap = a.mmap or a.mmap_write
    if a.replay:
        with open(a.replay, encoding="utf-8") as f:
            head = json.loads(f.readline())
        if a.seed is None:
            a.seed = head.get("seed")
    if a.seed is None:
        a.seed = int(time.time() * 1000) % 1_000_000_007
    log_path = a.log or f"fsx-{a.seed}.log"
    if a.replay and os.path.abspath(log_path) == os.path.abspath(a.replay):
        log_path += ".replay"
    faulthandler.enable()  # a SIGBUS (mmap past the end) prints where; the log has the operation
    fsx = Fsx(a)
    t0 = time.monotonic()
    churner = None
    if a.churn and a.repo:
        churner = subprocess.Popen([sys.executable, "-m", "tests.fsx_coral", "--churn-child", "--mount", a.mount,
                                    "--file", a.file, "--repo", a.repo, "--churn", str(a.churn),
                                    "--churn-path", a.churn_path, "--churn-size", str(a.churn_size),
                                    "--seed", str(a.seed)]
                                   + (["--branch", a.branch] if a.branch else []), stdin=subprocess.DEVNULL)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(json.dumps({"fsx": 1, "seed": a.seed, "file": a.file, "ops": a.ops, "mmap": a.mmap,
                              "mmap_write": a.mmap_write, "maxlen": a.maxlen, "oplen": a.oplen,
                              "replay": a.replay}) + "\n")
        try:
            fsx.run(replayed(a.replay) if a.replay else generated(a, fsx), log)
        except Mismatch as e:
            print(f"fsx: FAILED (seed {a.seed}): {e}", file=sys.stderr)
            print(f"fsx: the last operations (op log: {os.path.abspath(log_path)}):", file=sys.stderr)
            for line in fsx.tail:
                print("    " + line, file=sys.stderr)
            print(f"fsx: replay with: python -m tests.fsx_coral --mount {a.mount} --file {a.file} "
                  f"{'--repo ' + a.repo + ' ' if a.repo else ''}--replay {os.path.abspath(log_path)}", file=sys.stderr)
            with contextlib.suppress(OSError):
                if fsx.fd >= 0:
                    os.close(fsx.fd)
            return 1
        finally:
            if churner is not None:
                churner.terminate()
                churner.wait(timeout=30)
            if fsx.repo is not None:
                fsx.repo.close()
    if not a.quiet:
        n = sum(fsx.counts.values())
        print(f"fsx: ok (seed {a.seed}): {n} operations in {time.monotonic() - t0:.1f} s "
              f"({dict(sorted(fsx.counts.items()))}), {fsx.commit_checks} commits checked, "
              f"final size {len(fsx.model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
