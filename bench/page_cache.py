"""Why a re-read through the mount is slower than from ext4: the kernel's page cache.

A re-read of a mounted file never reaches the coralfs daemon: the kernel serves it from
its page cache. This measures that path side by side for one 155 MB training checkpoint:

- the file on the local disk (ext4),
- a copy of it on tmpfs (``/dev/shm``),
- the same file through a coralfs mount (FUSE),

each read once to fill the cache, then re-read with ``cat`` (median of ``--reps``), in
``--rounds`` rounds with a fresh tmpfs copy and a fresh mount each (so fresh pages). A
second fresh mount per round is filled the way ``bench/mount.py`` does it: page cache
dropped (needs root), then a cold first read, then the re-reads. For each
it also reports the size of the page-cache pages (folios) holding the file, read from
``/proc/self/pagemap`` and ``/proc/kpageflags`` (root only): ext4 caches files in large
folios (up to 2 MiB on recent kernels), tmpfs without ``huge=`` and FUSE before Linux 6.19
in 4 KiB pages, so a re-read copies the same bytes in 4 KiB steps, with per-page overhead.

    python bench/page_cache.py [--reps 7] [--rounds 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import mmap
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mount as mbench  # noqa: E402  (bench/mount.py: the same corpus, repository and mount helpers)

_KPF_COMPOUND_HEAD, _KPF_COMPOUND_TAIL = 15, 16


def folio_sizes(path: str) -> dict[str, int] | None:
    """How the page cache holds ``path`` (read it first): {"4 KiB": pages in order-0 folios,
    "large": pages in larger folios, "largest KiB": the largest folio seen}; None without root."""
    try:
        pm = open("/proc/self/pagemap", "rb")
        kf = open("/proc/kpageflags", "rb")
    except OSError:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        try:
            view = memoryview(m)
            for off in range(0, size, mmap.PAGESIZE):  # map every page (they are cached already)
                view[off]
            base = _mapping_start(m, path)
            n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            pm.seek(base // mmap.PAGESIZE * 8)
            entries = struct.unpack(f"{n}Q", pm.read(8 * n))
            small = large = 0
            run = longest = 0
            for e in entries:
                if not e >> 63 & 1:
                    continue
                kf.seek((e & ((1 << 55) - 1)) * 8)
                flags = struct.unpack("Q", kf.read(8))[0]
                if flags >> _KPF_COMPOUND_HEAD & 1:
                    large += 1
                    run = 1
                elif flags >> _KPF_COMPOUND_TAIL & 1:
                    large += 1
                    run += 1
                else:
                    small += 1
                    run = 0
                longest = max(longest, run)
            del view
            if small + large == 0:
                return None  # no page frame numbers: not root
            return {"4 KiB": small, "large": large, "largest KiB": longest * mmap.PAGESIZE // 1024 or 4}
        finally:
            m.close()
    finally:
        os.close(fd)
        pm.close()
        kf.close()


def _mapping_start(m: mmap.mmap, path: str) -> int:
    real = os.path.realpath(path)
    starts = [int(line.split("-")[0], 16) for line in open("/proc/self/maps") if line.rstrip().endswith(real)]
    if not starts:
        raise RuntimeError(f"cannot find the mapping of {path}")
    return max(starts)  # the newest mapping of that file: ours


def reread(path: str, reps: int) -> float:
    mbench.cat(path)
    return statistics.median(mbench.timed(lambda: mbench.cat(path)) for _ in range(reps))


def run(reps: int, rounds: int) -> dict[str, Any]:
    series, ft = mbench.corpus_files()
    big = mbench.make_big_checkpoint(mbench.CACHE / "big_train.pt")
    repo, _ = mbench.build_repo(series, ft, big)
    size = big.stat().st_size
    shm = Path(tempfile.mkdtemp(prefix="coral-pc-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    mp = tempfile.mkdtemp(prefix="coral-pc-mnt-")
    res: dict[str, Any] = {"bytes": size, "reps": reps, "rounds": rounds, "kernel": platform.release(), "cases": {}}
    names = ("local disk (ext4)", "tmpfs copy", "coralfs mount", "coralfs mount, cold first read")
    times: dict[str, list[float]] = collections.defaultdict(list)
    folios: dict[str, Any] = {}
    try:
        for _ in range(rounds):  # each round: a fresh tmpfs copy and a fresh mount (new pages)
            copy = shm / big.name
            shutil.copyfile(big, copy)
            for cold in (False, True):
                mbench.mount(repo, mp, readahead_kb=mbench.READAHEAD_KB)
                try:
                    mounted = f"{mp}/main/big/train.pt"
                    if cold:  # as bench/mount.py measures it: page cache dropped, then a first read
                        mbench.drop_caches()
                        mbench.cat(mounted)
                        times[names[3]].append(reread(mounted, reps))
                        folios[names[3]] = folio_sizes(mounted)
                        continue
                    paths = dict(zip(names[:3], (str(big), str(copy), mounted), strict=True))
                    for p in paths.values():
                        mbench.cat(p)
                    for name, p in paths.items():  # one after another, the same machine load
                        times[name].append(reread(p, reps))
                        folios[name] = folio_sizes(p)
                finally:
                    mbench.umount(mp)
            copy.unlink()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        os.rmdir(mp)
    for name in names:
        res["cases"][name] = {"reread": statistics.median(times[name]), "min": min(times[name]),
                              "max": max(times[name]), "folios": folios[name]}
    return res


def table(res: dict[str, Any]) -> str:
    local = res["cases"]["local disk (ext4)"]["reread"]
    lines = [f"{'re-read from the page cache':30s} | {'median':>7s} | {'range':>13s} | {'MB/s':>7s} | {'vs ext4':>7s} | "
             "page-cache folios",
             "-" * 31 + "+" + "-" * 9 + "+" + "-" * 15 + "+" + "-" * 9 + "+" + "-" * 9 + "+" + "-" * 40]
    for name, c in res["cases"].items():
        f = c["folios"]
        folios = ("unknown (not root)" if f is None else
                  f"{f['large'] * 100 // max(1, f['large'] + f['4 KiB'])}% of pages in large folios"
                  f" (largest {f['largest KiB']} KiB)")
        lines.append(f"{name:30s} | {c['reread'] * 1000:4.1f} ms | {c['min'] * 1000:4.1f}-{c['max'] * 1000:4.1f} ms | "
                     f"{res['bytes'] / c['reread'] / 1e6:7,.0f} | "
                     f"{local / c['reread'] * 100:6.0f}% | {folios}")
    lines += ["", f"{res['bytes'] / 1e6:.0f} MB checkpoint, cat to /dev/null; {res['rounds']} rounds, each with a "
              f"fresh tmpfs copy and a fresh mount, median of {res['reps']} re-reads per round; median and range over "
              f"the rounds; kernel {res['kernel']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    res = run(args.reps, args.rounds)
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    mbench.log(f"done in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
