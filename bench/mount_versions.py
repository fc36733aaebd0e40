"""A commit on a branch vs the kernel's page cache of the files it did not change.

Since every version of a file has its own inode (coralfs/mount/nodes.py), a commit that
changes one file of a branch leaves the other files' inodes, and their cached pages, alone;
before, the mount invalidated every path of a branch that moved, so a checkpoint re-read
after an unrelated commit (a config, a metrics file) went back to the daemon and decoded
again. This measures it with real data, side by side in one run:

- ``warm re-read``: the 155 MB training checkpoint read twice, nothing committed in between;
- ``re-read after a commit of another file``: another process commits a new ``config.json``
  to the branch, the mount notices (a new open shows the new config), then the checkpoint
  is re-read (its pages still resident? measured with ``mincore``);
- ``re-read after a commit of that file``: the checkpoint itself replaced by a new version
  (a new inode: a first read of the new version);
- ``cold read``: a fresh mount with the page cache dropped.

Every read is checked by sha256 against the version the branch holds.

    python bench/mount_versions.py [--reps 5]

Run it with ``PYTHONPATH`` pointing at another checkout to measure that code the same way.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mount as mbench  # noqa: E402  (bench/mount.py: the big checkpoint and the mount helpers)

from coralfs.mount.daemon import mount, umount  # noqa: E402
from coralfs.repository import Repository  # noqa: E402

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident(path: str) -> float | None:
    """Fraction of ``path``'s pages in the page cache (mincore over a shared read-only map,
    which faults nothing in); None if the file cannot be mapped (a direct-I/O open: ENODEV)."""
    try:
        return _resident(path)
    except OSError:
        return None


def _resident(path: str) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if not size:
            return 1.0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * n)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(v & 1 for v in vec) / n
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def read_time(path: str) -> float:
    """Seconds to read the whole file (8 MiB reads into one buffer; no hashing in the timing)."""
    buf = bytearray(8 << 20)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def timed_read(path: str, want: str) -> float:
    """``read_time``, then a check that the file holds ``want`` (sha256; not timed)."""
    t = read_time(path)
    got = sha_of(path)[0]
    assert got == want, f"{path}: read {got[:12]}, expected {want[:12]}"
    return t


def sha_of(path: str) -> tuple[str, float]:
    h = hashlib.sha256()
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest(), time.perf_counter() - t


def file_sha(path: Path) -> str:
    return sha_of(str(path))[0]


def commit_from_another_process(repo: str, path: str, data_file: Path) -> None:
    """``coralfs`` in its own process (the mount learns of it only by polling the refs)."""
    code = ("import sys; from coralfs.repository import Repository\n"
            "r = Repository(sys.argv[1])\n"
            "e, _ = r.ingest_file(sys.argv[3], sys.argv[2], r.tree('main').entries.get(sys.argv[2]))\n"
            "r.commit_changes('main', {sys.argv[2]: e}, 'bench: ' + sys.argv[2]); r.close()\n")
    subprocess.run([sys.executable, "-c", code, repo, path, str(data_file)], check=True)


def wait_shows(path: str, want: str, timeout: float = 10.0) -> float:
    """Until a new open of ``path`` shows content ``want`` (sha256); returns the seconds waited."""
    t0 = time.monotonic()
    while sha_of(path)[0] != want:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{path} did not show the new version within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - t0


def run(reps: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="coralfs-versions-"))
    big_src = mbench.make_big_checkpoint(mbench.CACHE / "big_train.pt")
    big_v2 = mbench.CACHE / "big_train_v2.pt"
    if not big_v2.exists():
        import torch

        ckpt = torch.load(big_src, weights_only=True)
        torch.save(mbench.next_step(ckpt), big_v2)
    repo = Repository.init(work / "repo")
    try:
        e, _ = repo.ingest_file(big_src, "train.pt")
        cfg = work / "config.json"
        cfg.write_text(json.dumps({"step": 0}))
        c, _ = repo.ingest_file(cfg, "config.json")
        repo.commit_changes("main", {"train.pt": e, "config.json": c}, "seed")
        repo.wait_repack()
    finally:
        repo.close()
    mp = work / "mnt"
    mp.mkdir()
    big_sha, v2_sha = file_sha(big_src), file_sha(big_v2)
    rows: dict[str, list[float]] = {"warm re-read": [], "re-read after a commit of another file": [],
                                    "first read after a commit of that file": [], "cold read (fresh mount)": []}
    res_after: list[float] = []
    noticed: list[float] = []
    cur = big_sha  # what train.pt holds now (each round replaces it with the other version)
    for i in range(reps):
        mount(str(work / "repo"), str(mp))
        try:
            train = str(mp / "main/train.pt")
            mbench.drop_caches()
            rows["cold read (fresh mount)"].append(timed_read(train, cur))
            rows["warm re-read"].append(timed_read(train, cur))
            cfg.write_text(json.dumps({"step": i + 1}))
            commit_from_another_process(str(work / "repo"), "config.json", cfg)
            noticed.append(wait_shows(str(mp / "main/config.json"), file_sha(cfg)))
            res_after.append(resident(train))
            rows["re-read after a commit of another file"].append(timed_read(train, cur))
            src, want = (big_v2, v2_sha) if cur == big_sha else (big_src, big_sha)
            commit_from_another_process(str(work / "repo"), "train.pt", src)
            wait_shows(str(mp / "main/config.json"), file_sha(cfg))  # (unchanged: just let a poll pass)
            time.sleep(0.3)
            rows["first read after a commit of that file"].append(timed_read(train, want))
            cur = want
        finally:
            umount(str(mp))
    mapped = [r for r in res_after if r is not None]
    return {"rows": {k: statistics.median(v) for k, v in rows.items()},
            "resident_after": statistics.median(mapped) if mapped else None, "unmappable": len(res_after) - len(mapped),
            "noticed_s": statistics.median(noticed), "size": big_src.stat().st_size, "reps": reps,
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "load": os.getloadavg()[0]}


def table(r: dict[str, Any]) -> str:
    warm = r["rows"]["warm re-read"]
    lines = [f"| case ({r['size'] / 1e6:.0f} MB training checkpoint) | median time | vs warm re-read |",
             "|---|---:|---:|"]
    for k, v in r["rows"].items():
        lines.append(f"| {k} | {v * 1000:.0f} ms | {v / warm:.2f}x |")
    lines.append("")
    cached = "could not be mapped (mmap: ENODEV)" if r["resident_after"] is None else \
        f"{r['resident_after'] * 100:.0f}% (mincore)"
    if r["unmappable"] and r["resident_after"] is not None:
        cached += f"; in {r['unmappable']} rounds mmap failed (ENODEV)"
    lines.append(f"pages of the unchanged checkpoint still cached after the other file's commit: "
                 f"{cached}; the mount showed the new config after "
                 f"{r['noticed_s'] * 1000:.0f} ms (median); {r['reps']} rounds; {r['machine']}, load {r['load']:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    r = run(args.reps)
    print(table(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
