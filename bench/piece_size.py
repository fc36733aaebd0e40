"""Tensor piece size, side by side: stored bytes, ingest time, one-tensor and full reads.

For each piece size, commits the finetune_fp32 and finetune_bf16 series (bench/corpus.py)
to a fresh repository, then in a fresh process reads one 2.4 MB tensor and the whole
newest version (page cache warm, decoded-chunk cache cold). Usage::

    python bench/piece_size.py [--sizes-kib 4096,1024]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import coralfs.ingest as ingest  # noqa: E402
from coralfs.repository import Repository  # noqa: E402

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "corpus")
READ = """
import json, struct, sys, time
from coralfs.repository import Repository
r = Repository(sys.argv[1]); f = r.open("HEAD", "m.safetensors")
n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n))
k = sorted((v["data_offsets"][1] - v["data_offsets"][0], k) for k, v in h.items() if k != "__metadata__")[-5][1]
s, e = h[k]["data_offsets"]
t = time.time(); f.seek(8 + n + s); f.read(e - s); one = time.time() - t
g = Repository(sys.argv[1]).open("HEAD", "m.safetensors"); t = time.time()
while g.read(8 << 20): pass
print(one, time.time() - t)
"""


def run(series: str, kib: int) -> tuple[int, float, float, float]:
    ingest.CHUNK_TARGET = kib << 10
    files = sorted(glob.glob(os.path.join(CORPUS, series, "*.safetensors")))
    d = tempfile.mkdtemp(prefix="coralfs-piece-")
    try:
        r = Repository.init(d)
        t = time.time()
        for f in files:
            dst = os.path.join(d, "m.safetensors")
            shutil.copyfile(f, dst)
            r.add([dst])
            r.commit(os.path.basename(f))
        ingest_s = time.time() - t
        stored = r.stats()["stored_bytes"]
        r.close()
        out = subprocess.run([sys.executable, "-c", READ, d], capture_output=True, text=True, check=True)
        one, full = (float(x) for x in out.stdout.split())
        return stored, ingest_s, one, full
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-kib", default="4096,1024")
    sizes = [int(x) for x in p.parse_args().sizes_kib.split(",")]
    print("| series | piece | stored bytes | ingest 12 versions (s) | one tensor (ms) | newest version (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for series in ("finetune_fp32", "finetune_bf16"):
        for kib in sizes:  # alternate sizes per series so machine drift hits both
            stored, ing, one, full = run(series, kib)
            print(f"| {series} | {kib} KiB | {stored:,} | {ing:.1f} | {one * 1000:.0f} | {full:.3f} |", flush=True)


if __name__ == "__main__":
    main()
