"""Decode speed without FUSE or disk: numpy loops vs the compiled loops (coralfs.codec.kernels), side by side.

Each measurement is a fresh process reading one whole file through ``Repository.open()``
with the page cache warm (no disk) and the decoded-chunk cache empty, so it times decoding
alone: LMDB record -> zstd planes -> interleave -> delta inverse -> BLAKE3 check. The
compiled loops are loaded before the clock starts (the mount loads them at start-up).
Modes alternate run by run; medians of ``--reps``.

Data: the repository of ``bench/mount.py`` (the 12-version scratch_pt training series as
commits of one path: its newest version decodes up to 5 records per piece, its oldest 1;
a fine-tuned MiniLM safetensors; a 155 MB checkpoint with AdamW state).

Usage::

    python bench/decode.py [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mount import (  # noqa: E402
    CACHE,
    build_repo,
    corpus_files,
    disk_readahead_path,
    drop_caches,
    make_big_checkpoint,
)

_SCRIPT = r"""
import sys, time
from coralfs.codec import kernels
from coralfs.repository import Repository
if sys.argv[4] == "compiled":
    assert kernels.load() is not None, "numba is not available"
repo = Repository(sys.argv[1])
f = repo.open(sys.argv[2], sys.argv[3])
def disk_read() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("read_bytes"))
sink = 0
r0 = disk_read()
t = time.perf_counter()
while True:
    b = f.read(8 << 20)
    if not b:
        break
    sink += len(b)
dt = time.perf_counter() - t
r1 = disk_read()
# the records the read needed: every chunk of the file and its delta bases, once each
need = repo.objects.chain_records(p.chunk for _, p in f._view.chunks() if p.chunk is not None)
print(sink, dt, r1 - r0, sum(need.values()), len(need))
"""


def measure(repo: str, rev: str, path: str, mode: str, cold: bool = False) -> tuple[int, float, int, int, int]:
    """(file bytes, seconds, bytes read from disk during the read, record bytes needed, records)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CORALFS_JIT="0" if mode == "numpy" else "1")
    if cold:
        drop_caches()
    out = subprocess.run([sys.executable, "-c", _SCRIPT, repo, rev, path, mode], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), float(out[1]), int(out[2]), int(out[3]), int(out[4])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    series, ft = corpus_files()
    repo, meta = build_repo(series, ft, make_big_checkpoint(CACHE / "big_train.pt"))
    cases = [
        ("scratch_pt newest (v12)", "main", "scratch/ckpt.pt"),
        ("scratch_pt oldest (v1)", meta["series_commits"][0], "scratch/ckpt.pt"),
        ("finetune_fp32 model.safetensors", "main", "ft/model.safetensors"),
        ("155 MB checkpoint + AdamW (keyframes)", "main", "big/train.pt"),
    ]
    for _, rev, path in cases:  # warm the page cache (and numba's on-disk cache)
        measure(repo, rev, path, "compiled")
    rows = []
    for name, rev, path in cases:
        t: dict[str, list[float]] = {"numpy": [], "compiled": []}
        size = 0
        for _ in range(args.reps):
            for mode in ("numpy", "compiled"):
                size, s, *_ = measure(repo, rev, path, mode)
                t[mode].append(s)
        a, b = statistics.median(t["numpy"]), statistics.median(t["compiled"])
        rows.append((name, f"{size / 1e6:.0f} MB", f"{a * 1e3:.0f} ms ({size / a / 1e6:,.0f} MB/s)",
                     f"{b * 1e3:.0f} ms ({size / b / 1e6:,.0f} MB/s)", f"{a / b:.2f}x"))
    head = ("file", "size", "numpy loops", "compiled loops", "speed-up")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    print("\n".join(lines))
    print(f"\nmedians of {args.reps} fresh processes per cell, modes alternating; page cache warm, decoded-chunk "
          f"cache empty; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} after")

    # the same reads cold (page cache dropped, compiled loops): what the disk adds, and how
    # many bytes the kernel reads for the records the read needs
    rows = []
    for name, rev, path in cases:
        runs = [measure(repo, rev, path, "compiled", cold=True) for _ in range(args.reps)]
        size, _, _, need, nrec = runs[0]
        sec = statistics.median(r[1] for r in runs)
        disk = statistics.median(r[2] for r in runs)
        rows.append((name, f"{sec * 1e3:.0f} ms", f"{nrec} ({need / 1e6:.0f} MB)", f"{disk / 1e6:.0f} MB",
                     f"{disk / need:.1f}x"))
    head = ("file, cold", "read", "records needed", "read from disk", "disk / needed")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    ra = disk_readahead_path(CACHE)
    print("\n" + "\n".join(lines))
    print(f"\nmedians of {args.reps}; page cache dropped before each; disk = read_bytes of /proc/self/io during "
          f"the read; kernel readahead of this disk: {ra.read_text().strip() if ra else '?'} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
